"""The loop, on the main thread: it takes what the source has waiting, runs it through the stages
and hands every output to the sinks; between passes it lets the clock close quiet bars, runs the
units (filter reload, gap repair) and ticks the sinks.

Natural batching: a pass starts as soon as one item is waiting and takes whatever else is waiting
then, so under light load each frame is handled at once and under heavy load passes grow by
themselves; `max_bytes` and `max_age` only bound them. The first Ctrl-C asks the loop to stop
between passes, and so do SIGTERM and SIGHUP (what service managers send): the run drains in
order (partial bars, gaps, every sink flushed). A second signal cuts the drain short: the workers
keep what they hold on disk (journal, outbox) and the run ends at once. The CLI exits 128 + the
signal's number (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import collections
import gc
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec

from .config import timeframe_name
from .errors import FeedError, PolystreamError
from .schema import Gap, Notice
from .sinks import FeedState, Output, Sink, Sinks, View
from .source import Decoded, EndOfStream, Frame, Frames, Item
from .stages import Stages


class Source(Protocol):
    """A live feed client or a replay. `take` gives what is waiting as one pass: the first
    item within `timeout` seconds, then whatever else is there, up to `max_bytes` of frames or
    `max_age` seconds of taking; `depth` is what waits and how much can."""

    state: str
    reconnects: int
    gaps: list[Gap]
    fatal: PolystreamError | None

    def start(self) -> object: ...

    def take(self, timeout: float, max_bytes: int, max_age: float) -> list[Item]: ...

    def depth(self) -> tuple[int, int]: ...

    def stop(self, timeout: float | None = None) -> None: ...

    def join(self, timeout: float | None = None) -> bool: ...


class Unit(Protocol):
    """Work done between passes on the pipeline thread (filter reload, gap repair): `tick` on
    every sink tick, `close` once at the end; both return outputs for the sinks."""

    def tick(self, now_ms: int) -> Sequence[Output]: ...

    def close(self, now_ms: int) -> Sequence[Output]: ...


# Signals that ask a run to stop in order, like Ctrl-C.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class RunResult(msgspec.Struct):
    """How a run ended: `signal` is the number of the signal that stopped it, if one did."""

    interrupted: bool
    view: View
    signal: int | None = None


class Pipeline:
    """Runs `source` through `stages` into `sinks` until the source ends, a duration passes or
    Ctrl-C; see the module docstring. `live` sources let the wall clock close quiet bars and
    leave their open bars `partial` at the end; a replay's end makes every bar final."""

    def __init__(
        self,
        source: Source,
        stages: Stages,
        sinks: Sequence[Sink] = (),
        *,
        units: Sequence[Unit] = (),
        live: bool = True,
        clock: Callable[[], float] = time.time,
        max_bytes: int = 24_000_000,
        max_age: float = 0.05,
        tick_every: float = 0.25,
        drain_timeout: float = 5.0,
        duration: float | None = None,
        watchdog: float = 0.0,
    ) -> None:
        self.source = source
        self.stages = stages
        self.sinks = Sinks(sinks, clock)
        self.units = list(units)
        self.live = live
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.duration = duration
        self.watchdog = watchdog  # seconds without data after which a live feed counts as down
        self.passes = 0
        # called after each pass over frames (or decoded events) with the frames, the events
        # decoded and the seconds the pass took, outputs handed to the sinks included
        self.on_pass: list[Callable[[int, int, float], None]] = []
        self._clock = clock
        self._tick_every = tick_every
        self._drain_timeout = drain_timeout
        self._reported: collections.deque[Notice] = collections.deque()
        self._gaps = 0
        self._lag = 0
        self._last_data: int | None = None  # pipeline clock ms of the latest frame, live
        self._started = self.now_ms()
        self._ended = False
        self._interrupted = False
        self._signal: int | None = None
        self._hurry = False  # a second signal: close at once, keeping what is unsent on disk
        self._error: PolystreamError | None = None

    def add(self, sink: Sink) -> None:
        """Register a sink; it gets every output from now on."""
        self.sinks.add(sink)

    def report(self, event: str, detail: str = "") -> None:
        """A status record for the sinks, from any thread; it goes out between passes."""
        self._reported.append(Notice(event, self.now_ms(), detail))

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- the loop ----------------------------------------------------------------------------

    def run(self, duration: float | None = None) -> RunResult:
        """Process until the source ends, `duration` seconds pass (default: the pipeline's
        own), or Ctrl-C."""
        duration = self.duration if duration is None else duration
        stop_at = float("inf") if duration is None else time.monotonic() + duration
        # What exists now lives as long as the run: keep full collections from rescanning it.
        gc.freeze()
        previous = self._catch_signals()
        self.source.start()
        next_tick = time.monotonic()
        try:
            while not (self._ended or self._interrupted or self.sinks.error):
                now = time.monotonic()
                if now >= stop_at:
                    break
                # while the bar engine works, look back soon for what it made
                wait = min(next_tick, stop_at, now + 0.002 if self.stages.busy else stop_at)
                self._pass(self._take(max(0.0, wait - now)))
                for out in self.stages.tick(self.now_ms() if self.live else None):
                    self.sinks.write(out)
                if time.monotonic() >= next_tick:
                    self._tick()
                    next_tick = time.monotonic() + self._tick_every
        except KeyboardInterrupt:
            self._interrupted = True
            self._signal = self._signal or signal.SIGINT
        finally:
            try:
                self._shutdown()
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
        error = self._error or self.sinks.error
        if error is not None:
            raise error
        return RunResult(self._interrupted, self.view(), self._signal)

    def _take(self, timeout: float) -> list[Item]:
        """What the source has waiting (the first item within `timeout`), as one pass."""
        return self.source.take(timeout, self.max_bytes, self.max_age)

    def _pass(self, items: list[Item]) -> None:
        if not items:
            return
        frames: list[Frame] = []
        decoded: list[Decoded] = []
        end: EndOfStream | None = None
        for item in items:
            if type(item) is Frame:
                frames.append(item)
            elif type(item) is Frames:
                frames += item.frames
            elif type(item) is Decoded:
                decoded.append(item)
            elif type(item) is Notice:
                self.sinks.write(Output(notices=[item]))
            elif type(item) is EndOfStream:
                end = item
        stats = self.stages.decoder.stats
        if frames:
            self.passes += 1
            started, events = time.perf_counter(), stats.events
            for out in self.stages.step(frames):
                self.sinks.write(out)
            if self.live:
                self._last_data = frames[-1].received
                self._lag = max(0, self.now_ms() - self._last_data)
            for observe in self.on_pass:
                observe(len(frames), stats.events - events, time.perf_counter() - started)
        for part in decoded:
            self.passes += 1
            started, events = time.perf_counter(), stats.events
            for out in self.stages.step_decoded(part):
                self.sinks.write(out)
            if self.live:
                self._last_data = part.batch.received
                self._lag = max(0, self.now_ms() - self._last_data)
            for observe in self.on_pass:
                observe(part.frames, stats.events - events, time.perf_counter() - started)
        if end is not None:
            self._end(end)

    def _end(self, end: EndOfStream) -> None:
        self._ended = True
        if not self.live:  # a replay's end makes every open bar final; a live stop does not
            for out in self.stages.finish():
                self.sinks.write(out)
        if end.error is not None:
            fatal = self.source.fatal
            self._error = fatal if isinstance(fatal, PolystreamError) else FeedError(end.error)

    def _tick(self) -> None:
        now = self.now_ms()
        for unit in self.units:
            for out in unit.tick(now):
                self.sinks.write(out)
        self._news()
        self.sinks.tick(self.view())

    def _news(self) -> None:
        """Outages the source recorded and status records reported since the last call."""
        gaps = self.source.gaps[self._gaps :]
        self._gaps += len(gaps)
        notices = []
        while self._reported:
            notices.append(self._reported.popleft())
        if gaps or notices:
            self.sinks.write(Output(gaps=gaps, notices=notices))

    def _shutdown(self) -> None:
        self.source.stop()
        drain_until = time.monotonic() + self._drain_timeout
        try:
            while not (self._ended or self._hurry) and time.monotonic() < drain_until:
                self._pass(self._take(0.1))
            self.source.join(timeout=max(0.0, drain_until - time.monotonic()))
            for out in self.stages.partial() if self.live else self.stages.flush():
                self.sinks.write(out)
        except KeyboardInterrupt:
            self._hurry = True
        self.stages.close()
        now = self.now_ms()
        for unit in self.units:
            for out in unit.close(now):
                self.sinks.write(out)
        drift = self.stages.drift
        if drift is not None:
            self.report("drift", drift.summary() or "no bars to compare")
        self._news()
        self.sinks.close(self.view)

    def _catch_signals(self) -> dict[int, Any]:
        """On the main thread, make the first stop signal a request to stop (checked between
        passes) rather than an exception that could land inside a polars call; the second
        interrupts what runs and cuts the drain short. Returns the handlers it replaced."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def again(signum: int, frame: object) -> None:
            self._hurry = True
            raise KeyboardInterrupt

        def first(signum: int, frame: object) -> None:
            self._interrupted = True
            self._signal = signum
            for sig in STOP_SIGNALS:
                signal.signal(sig, again)

        return {sig: signal.signal(sig, first) for sig in STOP_SIGNALS}

    # -- what the sinks see ------------------------------------------------------------------

    def view(self) -> View:
        st, source = self.stages, self.source
        decoded, bars = st.decoder.stats, st.engine.stats
        filters = st.filters
        depth, capacity = source.depth()
        now = self.now_ms()
        quiet = now - (self._started if self._last_data is None else self._last_data)
        feed = FeedState(
            state=source.state,
            reconnects=source.reconnects,
            lag_ms=self._lag,
            queue_depth=depth,
            queue_size=capacity,
            frames=decoded.frames,
            events=decoded.events,
            rejected=decoded.rejected_events,
            malformed_frames=decoded.malformed_frames,
            other_symbols=st.other,
            gaps=len(source.gaps),
            bars=bars.final,
            revised=bars.revised,
            too_late=bars.too_late,
            ahead=bars.ahead,
            drift=st.drift.summary() if st.drift is not None else "",
            filters=len(filters.filters) if filters is not None else 0,
            alerts=sum(filters.fired.values()) if filters is not None else 0,
            sinks=self.sinks.counters(),
            quiet_ms=max(0, quiet) if self.live else 0,
            watchdog_ms=int(self.watchdog * 1000) if self.live else 0,
        )
        options = st.options
        return View(
            now,
            st.symbols,
            tuple(timeframe_name(tf) for tf in options.timeframes),
            options.params.warmup,
            feed,
            hurry=self._hurry,
        )
