"""Recordings: one frame per line, `<receipt ms>\\t<frame>`, optionally `.gz` or `.zst` compressed.

`Recorder` appends frames (pipeline thread). `ReplaySource` is a source that reads a file back on
the thread that takes from it, as fast as it is consumed or at `speed` × real time.
"""

from __future__ import annotations

import gzip
import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import zstandard

from .errors import PolystreamError, RecordingError
from .events import MAX_TIME
from .schema import Gap, Notice
from .source import EndOfStream, Frame, Frames, Item

log = logging.getLogger(__name__)

MAX_LOGGED_BAD_LINES = 5
_STAMP_DIGITS = len(str(MAX_TIME))


# Compressed forms polystream does not read or write: refused rather than taken for plain text.
_OTHER_COMPRESSION = (".bz2", ".xz", ".lzma", ".lz4", ".br", ".zip", ".7z", ".tgz")


def _open(path: Path, mode: str) -> IO[bytes]:
    suffix = path.suffix.lower()
    if suffix in _OTHER_COMPRESSION:
        raise RecordingError(
            f"{path} names {suffix} compression, which recordings do not use: "
            "end the name in .gz or .zst, or leave it plain."
        )
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
                    # Out of range, the stamp makes a damaged line, even the first (the file is
                    # a recording); its length is checked first, as int() of thousands of
                    # digits raises.
                    received = int(stamp) if len(stamp) <= _STAMP_DIGITS else MAX_TIME + 1
                    if received <= MAX_TIME:
                        yield Frame(received, data)
                        continue
                elif number == 1:
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


class ReplaySource:
    """A recording as a source, read on the thread that takes from it: a replay waits for
    nothing but the file, so a thread of its own would only compete for the GIL.

    Unpaced, each `take` reads up to `max_bytes` of frames; at `speed` × real time, it hands
    over the frames that are due, waiting up to `timeout` for the next one. The first take
    brings a `connected` status, the last one `EndOfStream` (with the error, if the file could
    not be read); after `stop`, the next take ends the replay.
    """

    def __init__(self, path: Path, *, speed: float | None = None) -> None:
        if path.is_dir():
            raise RecordingError(
                f"{path} is a directory, not a recording: give the path of a recording file "
                "(one that --record wrote)."
            )
        if not path.exists():
            raise RecordingError(f"The recording {path} does not exist.")
        if not path.is_file():
            raise RecordingError(f"{path} is not a regular file, so it cannot be a recording.")
        self.path = path
        self.speed = speed
        self.state = "idle"
        self.reconnects = 0
        self.gaps: list[Gap] = []
        self.fatal: PolystreamError | None = None
        self._frames: Iterator[Frame] | None = None
        self._next: Frame | None = None  # read, not handed over yet
        self._started = 0.0
        self._first: int | None = None
        self._stopping = False

    def start(self) -> ReplaySource:
        if self._frames is None:
            self._frames = read_recording(self.path)
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stopping = True

    def join(self, timeout: float | None = None) -> bool:
        return True

    def depth(self) -> tuple[int, int]:
        return 0, 0

    def take(self, timeout: float, max_bytes: int, max_age: float) -> list[Item]:
        self.start()
        if self.state == "ended":
            time.sleep(timeout)
            return []
        items: list[Item] = []
        if self.state == "idle":
            self.state = "replaying"
            items.append(
                Notice("connected", int(time.time() * 1000), f"replaying {self.path.name}")
            )
        if self._stopping:
            return [*items, self._end()]
        try:
            if self.speed:
                items += self._due(timeout, max_bytes)
            else:
                items += self._read(max_bytes)
        except RecordingError as exc:
            self.fatal = exc
            items.append(self._end(str(exc)))
        return items

    def _read(self, max_bytes: int) -> list[Item]:
        assert self._frames is not None
        frames: list[Frame] = []
        size = 0
        for frame in self._frames:
            frames.append(frame)
            size += len(frame.data)
            if size >= max_bytes:
                return [Frames(frames, size)]
        return [Frames(frames, size), self._end()] if frames else [self._end()]

    def _due(self, timeout: float, max_bytes: int) -> list[Item]:
        """The frames due by now, at `speed` × real time from the first; when none is, waits up
        to `timeout` for the next."""
        assert self._frames is not None and self.speed
        frames: list[Item] = []
        size = 0
        deadline = time.monotonic() + timeout
        while size < max_bytes:
            frame = self._next if self._next is not None else next(self._frames, None)
            self._next = None
            if frame is None:
                return [*frames, self._end()]
            if self._first is None:
                self._first, self._started = frame.received, time.monotonic()
            due = self._started + (frame.received - self._first) / 1000 / self.speed
            now = time.monotonic()
            if due > now:
                if frames or due > deadline:
                    self._next = frame
                    if not frames:
                        time.sleep(max(0.0, deadline - now))
                    break
                time.sleep(due - now)
            frames.append(frame)
            size += len(frame.data)
        return frames

    def _end(self, error: str | None = None) -> EndOfStream:
        self.state = "ended"
        return EndOfStream(error)
