"""Recordings: one frame per line, `<receipt ms>\\t<frame>`, optionally `.gz` or `.zst` compressed.

`Recorder` appends frames (pipeline thread). `ReplaySource` plays a file back on a named thread
into a bounded queue, as fast as it is consumed or at `speed` × real time, like a live `FeedClient`.
"""

from __future__ import annotations

import gzip
import io
import logging
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import zstandard

from .errors import RecordingError
from .schema import Gap, Notice
from .source import EndOfStream, Frame, Frames, Item
from .worker import Worker

log = logging.getLogger(__name__)

MAX_LOGGED_BAD_LINES = 5
CHUNK = 256  # frames per queue item when replaying as fast as possible


def _open(path: Path, mode: str) -> IO[bytes]:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, mode + "b")  # type: ignore[return-value]
    if suffix == ".zst":
        if mode == "r":
            raw: IO[bytes] = open(path, "rb")  # noqa: SIM115  (closed by the reader's close)
            return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        raw = open(path, "wb")  # noqa: SIM115
        return zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=True)
    return open(path, mode + "b")


class Recorder:
    """Writes frames to a recording; lines are flushed at most `flush_every` seconds apart."""

    def __init__(self, path: Path, flush_every: float = 1.0) -> None:
        self.path = path
        try:
            self._out = _open(path, "w")
        except OSError as exc:
            raise RecordingError(f"Cannot write the recording {path}: {exc.strerror}.") from None
        self._flush_every = flush_every
        self._last_flush = time.monotonic()
        self.frames = 0

    def write(self, frame: Frame) -> None:
        data = frame.data
        # JSON strings cannot hold raw line breaks, so these are insignificant whitespace.
        if b"\n" in data or b"\r" in data:
            data = data.replace(b"\r", b" ").replace(b"\n", b" ")
        self._out.write(b"%d\t%s\n" % (frame.received, data))
        self.frames += 1
        now = time.monotonic()
        if now - self._last_flush >= self._flush_every:
            self._out.flush()
            self._last_flush = now

    def close(self) -> None:
        self._out.close()


def read_recording(path: Path) -> Iterator[Frame]:
    """Yield the frames of a recording; a damaged line is skipped and logged, never fatal."""
    try:
        stream = _open(path, "r")
    except OSError as exc:
        raise RecordingError(f"Cannot open the recording {path}: {exc.strerror}.") from None
    bad = 0
    with stream, io.BufferedReader(stream) as lines:  # type: ignore[type-var]
        try:
            for number, line in enumerate(lines, 1):
                stamp, tab, data = line.rstrip(b"\r\n").partition(b"\t")
                if tab and stamp.isdigit() and data:
                    yield Frame(int(stamp), data)
                    continue
                if number == 1:
                    raise RecordingError(
                        f"{path} is not a polystream recording: line 1 should be "
                        "a time in epoch milliseconds, a tab, then the frame."
                    )
                if line.strip():
                    bad += 1
                    if bad <= MAX_LOGGED_BAD_LINES:
                        log.warning("%s line %d is damaged and was skipped", path, number)
        except (OSError, EOFError, zstandard.ZstdError) as exc:
            raise RecordingError(f"Cannot read the recording {path}: {exc}.") from None


class ReplaySource(Worker[None]):
    """A source that replays a recording into `queue`, ending with `EndOfStream`."""

    def __init__(
        self,
        path: Path,
        *,
        speed: float | None = None,
        queue_size: int = 10_000,
        chunk: int = CHUNK,
    ) -> None:
        if not path.is_file():
            raise RecordingError(f"The recording {path} does not exist.")
        super().__init__("polystream-replay")
        self.path = path
        self.speed = speed
        self.chunk = chunk
        # Unpaced, frames travel in chunks: the bound counts chunks, so scale it to keep about
        # `queue_size` frames in flight either way.
        slots = queue_size if speed else max(4, queue_size // chunk)
        self.queue: queue.Queue[Item] = queue.Queue(maxsize=slots)
        self.state = "idle"
        self.reconnects = 0
        self.gaps: list[Gap] = []

    def _put(self, item: Item) -> bool:
        while not self.stopping:
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        self.state = "replaying"
        error: str | None = None
        try:
            self._put(Notice("connected", int(time.time() * 1000), f"replaying {self.path.name}"))
            frames = read_recording(self.path)
            if self.speed:
                self._paced(frames, self.speed)
            else:
                self._chunked(frames)
        except RecordingError as exc:
            self.fatal = exc
            error = str(exc)
        finally:
            self.state = "ended"
            try:
                self.queue.put(EndOfStream(error), timeout=5)
            except queue.Full:
                log.warning("replay queue stayed full at shutdown; end-of-stream not delivered")

    def _paced(self, frames: Iterator[Frame], speed: float) -> None:
        started = time.monotonic()
        first: int | None = None
        for frame in frames:
            first = frame.received if first is None else first
            wait = started + (frame.received - first) / 1000 / speed - time.monotonic()
            if (wait > 0 and self.sleep(wait)) or not self._put(frame):
                return

    def _chunked(self, frames: Iterator[Frame]) -> None:
        chunk: list[Frame] = []
        size = 0
        for frame in frames:
            chunk.append(frame)
            size += len(frame.data)
            if len(chunk) >= self.chunk:
                if not self._put(Frames(chunk, size)):
                    return
                chunk, size = [], 0
        if chunk:
            self._put(Frames(chunk, size))
