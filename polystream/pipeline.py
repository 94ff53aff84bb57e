"""The pipeline, on the main thread: drains a source's queue in batches, decodes, keeps per-symbol
state and hands status records and snapshots to the outputs. The only module importing every stage.

Ctrl-C (KeyboardInterrupt) stops the source, drains what it already delivered, and returns a result
with `interrupted` set; the CLI turns that into exit code 130.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from .decode import Decoder
from .errors import FeedError, PolystreamError
from .events import SIDE_UNKNOWN, Aggregate, FairValue, Quote, Status, Trade
from .record import Recorder
from .source import EndOfStream, Frame, Gap, Item, Notice
from .symbols import from_pair


class SymbolState(msgspec.Struct):
    """What the dashboard shows for one symbol."""

    symbol: str
    last_price: float | None = None
    last_size: float | None = None
    last_side: int = SIDE_UNKNOWN
    bid: float | None = None
    ask: float | None = None
    trades: int = 0
    quotes: int = 0
    events: int = 0
    rate: float = 0.0
    last_event_ms: int | None = None

    @property
    def spread(self) -> float | None:
        if self.bid is None or self.ask is None:
            return None
        return self.ask - self.bid


class FeedState(msgspec.Struct):
    """What the dashboard footer shows for the connection and the queue."""

    state: str = "idle"
    reconnects: int = 0
    lag_ms: int = 0
    queue_depth: int = 0
    queue_size: int = 0
    frames: int = 0
    events: int = 0
    rejected: int = 0
    malformed_frames: int = 0
    other_symbols: int = 0
    gaps: int = 0


class Snapshot(msgspec.Struct):
    """A consistent view of the run for outputs; `now_ms` is the pipeline clock."""

    now_ms: int
    symbols: list[SymbolState]
    feed: FeedState


class Output(Protocol):
    """Where the pipeline sends what users see (dashboard, JSON lines, plain log)."""

    def status(self, notice: Notice) -> None: ...

    def refresh(self, snapshot: Snapshot) -> None: ...

    def close(self, snapshot: Snapshot) -> None: ...


class Source(Protocol):
    """A live feed client or a replay: both deliver `Item`s on a bounded queue."""

    queue: queue.Queue[Item]
    state: str
    reconnects: int
    gaps: list[Gap]

    @property
    def fatal(self) -> Exception | None: ...

    def start(self) -> object: ...

    def stop(self) -> None: ...

    def join(self, timeout: float | None = None) -> bool: ...


class RunResult(msgspec.Struct):
    """How a run ended."""

    interrupted: bool
    snapshot: Snapshot


class Pipeline:
    """Runs one source to its end, a duration, or Ctrl-C; see the module docstring."""

    def __init__(
        self,
        source: Source,
        symbols: Sequence[str],
        outputs: Sequence[Output] = (),
        *,
        recorder: Recorder | None = None,
        clock: Callable[[], float] = time.time,
        max_batch: int = 2_000,
        refresh_every: float = 0.25,
        drain_timeout: float = 5.0,
    ) -> None:
        self.source = source
        self.symbols = {s: SymbolState(s) for s in symbols}
        self.outputs = list(outputs)
        self.recorder = recorder
        self.decoder = Decoder()
        self.feed = FeedState(queue_size=source.queue.maxsize)
        self._clock = clock
        self._max_batch = max_batch
        self._refresh_every = refresh_every
        self._drain_timeout = drain_timeout
        self._counted_at = 0.0
        self._counted: dict[str, int] = {}
        self._ended = False
        self._error: PolystreamError | None = None

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def snapshot(self) -> Snapshot:
        feed = self.feed
        feed.state = self.source.state
        feed.reconnects = self.source.reconnects
        feed.queue_depth = self.source.queue.qsize()
        feed.gaps = len(self.source.gaps)
        stats = self.decoder.stats
        feed.frames, feed.events = stats.frames, stats.events
        feed.rejected, feed.malformed_frames = stats.rejected_events, stats.malformed_frames
        return Snapshot(self._now_ms(), list(self.symbols.values()), feed)

    def run(self, duration: float | None = None) -> RunResult:
        """Process until the source ends, `duration` seconds pass, or Ctrl-C."""
        deadline = None if duration is None else time.monotonic() + duration
        interrupted = False
        self.source.start()
        next_refresh = time.monotonic()
        try:
            while not self._ended:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self._step(timeout=self._refresh_every)
                if time.monotonic() >= next_refresh:
                    self._refresh()
                    next_refresh = time.monotonic() + self._refresh_every
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self._shutdown()
        if self._error is not None:
            raise self._error
        return RunResult(interrupted, self.snapshot())

    def _shutdown(self) -> None:
        self.source.stop()
        drain_until = time.monotonic() + self._drain_timeout
        while not self._ended and time.monotonic() < drain_until:
            try:
                self._step(timeout=0.1)
            except KeyboardInterrupt:
                break
        self.source.join(timeout=max(0.0, drain_until - time.monotonic()))
        if self.recorder is not None:
            self.recorder.close()
        snap = self.snapshot()
        for out in self.outputs:
            out.close(snap)

    def _step(self, timeout: float) -> None:
        """Take one batch off the queue: wait for the first item, then what is already there."""
        q = self.source.queue
        try:
            item = q.get(timeout=timeout)
        except queue.Empty:
            return
        batch = [item]
        while len(batch) < self._max_batch:
            try:
                batch.append(q.get_nowait())
            except queue.Empty:
                break
        for item in batch:
            if isinstance(item, Frame):
                self._frame(item)
            elif isinstance(item, Notice):
                for out in self.outputs:
                    out.status(item)
            else:
                self._end(item)
        last = batch[-1]
        if isinstance(last, Frame):
            self.feed.lag_ms = max(0, self._now_ms() - last.received)

    def _end(self, item: EndOfStream) -> None:
        self._ended = True
        if item.error is not None:
            fatal = self.source.fatal
            self._error = fatal if isinstance(fatal, PolystreamError) else FeedError(item.error)

    def _frame(self, frame: Frame) -> None:
        if self.recorder is not None:
            self.recorder.write(frame)
        symbols = self.symbols
        for ev in self.decoder.decode(frame.data):
            if isinstance(ev, Status):
                continue
            state = symbols.get(from_pair(ev.sym if isinstance(ev, FairValue) else ev.pair))
            if state is None:
                self.feed.other_symbols += 1
                continue
            state.events += 1
            if isinstance(ev, Trade):
                state.last_price, state.last_size, state.last_side = ev.price, ev.size, ev.side
                state.trades += 1
                state.last_event_ms = ev.time
            elif isinstance(ev, Quote):
                state.bid, state.ask = ev.bid, ev.ask
                state.quotes += 1
                state.last_event_ms = ev.time
            elif isinstance(ev, Aggregate):
                state.last_event_ms = max(state.last_event_ms or 0, ev.end)
            else:
                state.last_event_ms = max(state.last_event_ms or 0, ev.time)

    def _refresh(self) -> None:
        now = time.monotonic()
        elapsed = now - self._counted_at
        if elapsed >= 1.0:
            for name, state in self.symbols.items():
                before = self._counted.get(name, state.events)
                state.rate = (state.events - before) / elapsed if self._counted_at else 0.0
                self._counted[name] = state.events
            self._counted_at = now
        snap = self.snapshot()
        for out in self.outputs:
            out.refresh(snap)
