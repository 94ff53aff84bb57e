"""`polystream ingest`: one process holds the feed (or replays a recording, or runs the demo
feed) and publishes what it receives to NATS JetStream for the shards (see `wire`).

Each batch is decoded once, split by symbol partition and published: the partitions' messages
first, then the batch's clock message, all with `Nats-Msg-Id`s made of the batch's number, so
that a publish retried after a lost ack, or a batch published again by a restarted ingest, is
stored once. A live source is published as it arrives (natural batching, as in `watch`), with
a clock message at least every `TICK` seconds so that quiet shards still close bars. A finite
one is cut into batches of `BATCH_FRAMES` frames, the same cut on every run, so that a restarted
ingest of the same recording skips what the stream already holds; its end is published as an
end marker, on which shards make every open bar final, as a replay does.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from . import wire
from .batch import Batcher
from .bus import Bus
from .errors import ConfigError
from .pipeline import STOP_SIGNALS, Source
from .schema import Notice
from .source import EndOfStream, Frame, Frames

BATCH_FRAMES = 1_000  # a finite source's frames per batch
TICK = 0.25  # seconds: a live ingest's clock message at least this often
MAX_AGE_S = 7 * 24 * 3600.0  # how long the streams keep messages
_JSON = msgspec.json.Encoder()


class IngestStats(msgspec.Struct):
    batches: int = 0
    skipped: int = 0  # batches the stream held already (a restarted replay)
    frames: int = 0
    events: int = 0
    messages: int = 0
    bytes: int = 0


def prepare_streams(bus: Bus, replicas: int = 1) -> None:
    """The market-data stream and the results stream, created or updated (nats-server 2.9),
    each kept on `replicas` servers of a cluster."""
    streams = ((wire.MD_STREAM, wire.MD_SUBJECTS), (wire.OUT_STREAM, wire.OUT_SUBJECTS))
    for name, subjects in streams:
        bus.ensure_stream(name, subjects, max_age_s=MAX_AGE_S, replicas=replicas)


class Ingest:
    """Publishes `source` to `bus`: see the module docstring. `say` gets status lines for
    people; `run` returns when the source ends, after `duration` seconds or on a signal."""

    def __init__(
        self,
        bus: Bus,
        source: Source,
        symbols: Sequence[str],
        *,
        live: bool,
        partitions: int = wire.DEFAULT_PARTITIONS,
        replicas: int = 1,
        say: Callable[[Notice], None] = lambda notice: None,
    ) -> None:
        if not 1 <= partitions <= 4096:
            raise ConfigError(f"Invalid --partitions {partitions}: give 1 to 4096.")
        self.bus = bus
        self.source = source
        self.symbols = tuple(symbols)
        self.live = live
        self.partitions = partitions
        self.replicas = replicas
        self.say = say
        self.stats = IngestStats()
        self.signal: int | None = None
        self._batcher = Batcher(self.symbols or None)  # none: every symbol
        self._seq = 0
        self._held = 0  # the last batch the stream holds already
        self._stop = threading.Event()

    def run(self, duration: float | None = None) -> IngestStats:
        prepare_streams(self.bus, self.replicas)
        self._resume()
        previous = self._catch_signals()
        stop_at = float("inf") if duration is None else time.monotonic() + duration
        waiting: list[Frame] = []
        ended = False
        last_clock = time.monotonic()
        self.source.start()
        try:
            while not (ended or self._stop.is_set()) and time.monotonic() < stop_at:
                for item in self.source.take(TICK, 24_000_000, 0.05):
                    if type(item) is Frame:
                        waiting.append(item)
                    elif type(item) is Frames:
                        waiting += item.frames
                    elif type(item) is Notice:
                        self._status(item)
                    elif type(item) is EndOfStream:
                        ended = True
                if self.live:
                    if waiting or time.monotonic() - last_clock >= TICK:
                        self._publish(waiting)
                        waiting = []
                        last_clock = time.monotonic()
                else:
                    while len(waiting) >= BATCH_FRAMES or (ended and waiting):
                        self._publish(waiting[:BATCH_FRAMES])
                        waiting = waiting[BATCH_FRAMES:]
            if self.live and waiting:
                self._publish(waiting)
            if ended and not self.live and self.source.fatal is None:
                self._publish([], end=True)
        finally:
            self.source.stop()
            self.source.join(2.0)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if self.source.fatal is not None:
            raise self.source.fatal
        return self.stats

    def stop(self) -> None:
        self._stop.set()

    def _resume(self) -> None:
        """Publish the run's description; continue the batch numbers where the stream is."""
        run = wire.Run(self.symbols, self.partitions, self.live, int(time.time() * 1000))
        last = self.bus.last(wire.MD_STREAM, wire.RUN)
        if last is not None:
            before = msgspec.json.decode(last.data, type=wire.Run)
            if (before.symbols, before.partitions) != (run.symbols, run.partitions):
                held = ", ".join(before.symbols) or "every symbol"
                raise ConfigError(
                    f"The stream {wire.MD_STREAM} holds a run of {held} in "
                    f"{before.partitions} partitions: ingest the same, or start with --reset "
                    "to empty the streams first."
                )
        clock = self.bus.last(wire.MD_STREAM, wire.CLOCK)
        self._held = int(clock.headers.get(wire.SEQ, "0")) if clock is not None else 0
        if self.live:
            self._seq = self._held  # the batches go on from there
        if last is None or self.live:
            self.bus.publish(wire.RUN, _JSON.encode(run), msg_id=f"run.{self._held}")

    def _publish(self, frames: list[Frame], *, end: bool = False) -> None:
        self._seq += 1
        seq = self._seq
        if seq <= self._held:
            self.stats.skipped += 1
            return
        batch = self._batcher.build(frames)
        bodies, clock = wire.split(batch, self.partitions)
        headers = {wire.SEQ: str(seq)}
        items: list[tuple[str, bytes, dict[str, str] | None, str | None]] = [
            (wire.md_subject(p), body, headers, f"{seq}.{p}") for p, body in bodies.items()
        ]
        clock_headers = {
            wire.SEQ: str(seq),
            wire.RECEIVED: str(frames[-1].received if frames else 0),
            wire.FRAMES: str(len(frames)),
            wire.PARTS: ",".join(map(str, bodies)),
        }
        if self.live:
            clock_headers[wire.NOW] = str(int(time.time() * 1000))
        if end:
            clock_headers[wire.END] = "1"
        body = wire.clock_body(clock)
        self.bus.publish_many(items)
        self.bus.publish(wire.CLOCK, body, headers=clock_headers, msg_id=f"{seq}.clock")
        stats = self.stats
        stats.batches += 1
        stats.frames += len(frames)
        stats.events += batch.size
        stats.messages += len(items) + 1
        stats.bytes += sum(len(b) for b in bodies.values()) + len(body)

    def _status(self, notice: Notice) -> None:
        """A feed status record: shown, and published for whoever watches the results."""
        record = {"type": "status", "event": notice.event, "time": notice.time}
        record["detail"] = notice.detail
        self.bus.publish("polystream.status.ingest", _JSON.encode(record))
        self.say(notice)

    def _catch_signals(self) -> dict[int, Any]:
        """The first stop signal ends the run after the batch in hand, the second at once."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def first(signum: int, frame: object) -> None:
            self.signal = signum
            self._stop.set()
            for sig in STOP_SIGNALS:
                signal.signal(sig, again)

        def again(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        return {sig: signal.signal(sig, first) for sig in STOP_SIGNALS}
