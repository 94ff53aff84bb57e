"""A shard of a run spread over processes (`watch --from nats://… --shard K/N`): the same
pipeline as `watch`, fed from the stream that `ingest` publishes instead of from the feed, and
its results published back (see `wire`).

A shard owns the partitions p with p % N == K. It reads the stream from its start: the clock
message of each batch, then its partitions' messages of that batch, and hands the pipeline
`Decoded` items (its own events, and every trade of the run for the watermark). So a shard
that is restarted, even after a SIGKILL, computes everything again exactly as before; what it
had published already is not published again, because every results subject carries a count
of the records published on it (`Polystream-Count`) and the shard skips that many records of
the subject before it publishes (and `Nats-Msg-Id`s make a publish that raced the kill a
duplicate the server drops). The results are each subject's records in order, whatever the
number of shards and however often one restarted.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time

import msgspec
import polars as pl

from . import display, wire
from .bus import Bus, BusError, Message, Reader
from .errors import ConfigError, PolystreamError
from .schema import Gap, Notice
from .sinks import BaseSink, Output
from .source import Decoded, EndOfStream, Item

_JSON = msgspec.json.Encoder()
QUEUE = 64  # decoded batches waiting for the pipeline


def wait_for_run(bus: Bus, timeout: float = 30.0) -> wire.Run:
    """The run that ingest describes on the stream, waiting for it to start."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            last = bus.last(wire.MD_STREAM, wire.RUN)
        except BusError:
            last = None  # no stream yet: ingest has not started
        if last is not None:
            return msgspec.json.decode(last.data, type=wire.Run)
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"No ingest has published to {bus.shown} within {timeout:g} s: start "
                "`polystream ingest … --publish` first."
            )
        time.sleep(0.2)


def owned(run: wire.Run, shard: int, shards: int) -> tuple[set[int], tuple[str, ...]]:
    """The partitions of shard K of N, and the run's symbols in them."""
    parts = {p for p in range(run.partitions) if p % shards == shard}
    symbols = tuple(s for s in run.symbols if wire.partition(s, run.partitions) in parts)
    return parts, symbols


class _Stopped(Exception):
    """The pipeline stopped the source while it waited for a message."""


class ShardSource:
    """The stream as a pipeline source (see `pipeline.Source`): a thread reads and joins the
    messages of each batch into `Decoded` items; `take` hands them over. Its `clock` is
    ingest's wall clock from the last live batch, for the pipeline to close quiet bars by."""

    def __init__(self, bus: Bus, run: wire.Run, parts: set[int], name: str) -> None:
        self.bus = bus
        self.run = run
        self.parts = parts
        self.name = name
        self.state = "idle"
        self.reconnects = 0
        self.gaps: list[Gap] = []
        self.fatal: PolystreamError | None = None
        self.now_ms = 0
        self._queue: queue.Queue[Item] = queue.Queue(QUEUE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="polystream-shard", daemon=True)
        self._buffers: dict[int, list[Message]] = {p: [] for p in parts}
        self._readers: dict[str, Reader] = {}
        self._done = 0  # the last batch handed over

    def clock(self) -> float:
        """Seconds since the epoch by ingest's clock as of the last batch taken (0 before): a
        live shard closes quiet bars by it, never by its own."""
        return self.now_ms / 1000

    def start(self) -> ShardSource:
        if not self._thread.is_alive() and self.state == "idle":
            self.state = "replaying" if not self.run.live else "streaming"
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def depth(self) -> tuple[int, int]:
        return self._queue.qsize(), QUEUE

    def take(self, timeout: float, max_bytes: int, max_age: float) -> list[Item]:
        try:
            items = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if type(item) is Decoded and item.now:
                self.now_ms = item.now
        return items

    # -- the reading thread ------------------------------------------------------------------

    def _put(self, item: Item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _end(self, error: str | None = None) -> None:
        """The end of the stream for the pipeline, which drains until it sees it (a stopped
        shard too)."""
        with contextlib.suppress(queue.Full):
            self._queue.put(EndOfStream(error), timeout=2.0)

    def _read(self) -> None:
        self._put(Notice("connected", int(time.time() * 1000), f"{self.name} of {self.bus.shown}"))
        try:
            while not self._stop.is_set():
                for clock in self._pull(wire.CLOCK):
                    if self._stop.is_set():
                        break
                    ended = self._batch(clock)
                    if ended:
                        self.state = "ended"
                        self._end()
                        return
        except _Stopped:
            pass
        except PolystreamError as exc:
            self.fatal = exc
            self.state = "failed"
            self._end(str(exc))
            return
        self._end()

    def _pull(self, subject: str) -> list[Message]:
        """What `subject` has now, waiting up to half a second for the first message: pushed
        by the server as it is stored, so a live shard waits for no request per batch."""
        reader = self._readers.get(subject)
        if reader is None:
            reader = self._readers[subject] = self.bus.reader(wire.MD_STREAM, subject)
        return reader.take(0.5)

    def _batch(self, clock: Message) -> bool:
        """Hand over one batch (its clock message given); whether it was the end marker."""
        headers = clock.headers
        seq = int(headers.get(wire.SEQ, "0"))
        if seq <= self._done:  # published again by a restarted ingest
            return False
        self._done = seq
        now = int(headers.get(wire.NOW, "0"))
        listed = {int(p) for p in headers.get(wire.PARTS, "").split(",") if p}
        mine = sorted(listed & self.parts)
        bodies = [self._message(p, seq).data for p in mine]
        frames = int(headers.get(wire.FRAMES, "0"))
        received = int(headers.get(wire.RECEIVED, "0"))
        trades = wire.read_clock(clock.data)
        if frames or now:
            batch, engine = wire.join(bodies, trades, self.parts, received)
            self._put(Decoded(batch, engine, frames, now))
        return headers.get(wire.END) == "1"

    def _message(self, part: int, seq: int) -> Message:
        """Partition `part`'s message of batch `seq`, skipping older batches' (published again
        by a restarted ingest)."""
        buffer = self._buffers[part]
        subject = wire.md_subject(part)
        while True:
            while not buffer:
                if self._stop.is_set():
                    raise _Stopped
                buffer += self._pull(subject)
            message = buffer.pop(0)
            found = int(message.headers.get(wire.SEQ, "0"))
            if found == seq:
                return message
            if found > seq:
                raise BusError(
                    f"The stream lacks partition {part}'s message of batch {seq} (the next one "
                    f"is of batch {found}): it was lost or trimmed, so this shard cannot go on."
                )


class ResultSink(BaseSink):
    """Publishes a shard's bars, alerts, book records and status to their own subjects, one
    record per message; the bars and alerts of each subject counted (see the module docstring).
Partial bars, which a stopping shard has open, are not published."""

    name = "results"

    def __init__(self, bus: Bus, shard: str) -> None:
        self.bus = bus
        self.shard = shard
        self._counts: dict[str, int] = {}
        self._skip: dict[str, int] = {}
        self.published = 0
        self.skipped = 0

    def write(self, out: Output) -> None:
        # partial bars are what a stopping run had open: its own, never the run's results
        bars = None if out.bars is None else out.bars.filter(pl.col("state") != "partial")
        shown = Output(
            bars=bars, alerts=out.alerts, book_features=out.book_features, notices=out.notices
        )
        timeframes = iter(bars["timeframe"].to_list() if bars is not None else [])
        filters = iter([a.filter for a in out.alerts])
        items: list[tuple[str, bytes, dict[str, str] | None, str | None]] = []
        # the records exactly as `--json` prints them
        for record in display.json_records(shown, _JSON.encode):
            if record.type == "bar":
                self._add(items, f"polystream.bar.{next(timeframes)}.{record.symbol}", record.data)
            elif record.type == "alert":
                self._add(items, f"polystream.alert.{next(filters)}.{record.symbol}", record.data)
            elif record.type == "book":  # a pass's latest snapshot: not counted, passes vary
                items.append((f"polystream.book.{record.symbol}", record.data, None, None))
            else:
                items.append((f"polystream.status.{self.shard}", record.data, None, None))
        if items:
            self.bus.publish_many(items)
            self.published += len(items)

    def _add(
        self,
        items: list[tuple[str, bytes, dict[str, str] | None, str | None]],
        subject: str,
        data: bytes,
    ) -> None:
        count = self._counts.get(subject, 0) + 1
        self._counts[subject] = count
        if count <= self._already(subject):
            self.skipped += 1
            return
        headers = {wire.COUNT: str(count)}
        items.append((subject, data, headers, f"{subject}#{count}"))

    def _already(self, subject: str) -> int:
        """How many records a shard before this one published on `subject`."""
        if subject not in self._skip:
            last = self.bus.last(wire.OUT_STREAM, subject)
            self._skip[subject] = int(last.headers.get(wire.COUNT, "0")) if last else 0
        return self._skip[subject]

    def counters(self) -> dict[str, int]:
        return {"published": self.published, "republish_skipped": self.skipped}
