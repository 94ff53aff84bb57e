"""Sinks: everything that consumes a run's results sits behind `Sink` and is registered with the
pipeline, never wired into it. The pipeline thread hands every `Output` to every sink in turn.

A sink that raises an unexpected error is reported (an `error` status record) and removed, and the
others keep running; a `PolystreamError` from a sink (the database refusing the login, say) ends
the run as one sentence after an orderly stop.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

import msgspec
import polars as pl

from .errors import PolystreamError
from .events import Book
from .features import BookFeatures
from .schema import Alert, Gap, Notice, alert_rows, book_rows, gap_rows
from .source import Frame

if TYPE_CHECKING:
    from .commands import Mutes, RunState, TelegramCommands
    from .notify import TelegramNotifier
    from .record import Recorder
    from .store import Store

log = logging.getLogger(__name__)

_R = TypeVar("_R")
# Seconds a worker gets to close after a second stop signal: what it has not delivered by then
# stays on disk (the journal, the outbox) for the next run.
HURRY = 1.0


class Output(msgspec.Struct):
    """What one step of the pipeline produced; any field may be empty.

    `trades` and `quotes` are the watched symbols' events of the step (`schema.TRADE`/`QUOTE`),
    `bars` bar records (final, revised or partial), `history` the bars a warm-up loaded (context
    for displays, never new records), `repaired` trades fetched over REST to repair a gap
    (stored, not analysed again).
    """

    frames: Sequence[Frame] = ()
    trades: pl.DataFrame | None = None
    quotes: pl.DataFrame | None = None
    books: Sequence[tuple[str, Book]] = ()
    book_features: Sequence[BookFeatures] = ()
    bars: pl.DataFrame | None = None
    alerts: Sequence[Alert] = ()
    notices: Sequence[Notice] = ()
    gaps: Sequence[Gap] = ()
    history: pl.DataFrame | None = None
    repaired: pl.DataFrame | None = None


class FeedState(msgspec.Struct):
    """Counters of the run for footers and summaries."""

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
    bars: int = 0
    revised: int = 0
    too_late: int = 0
    ahead: int = 0
    drift: str = ""
    filters: int = 0
    alerts: int = 0
    sinks: dict[str, int] = msgspec.field(default_factory=dict)  # rows stored, messages sent…
    # live runs: ms since the latest frame arrived (since the start before any), and the silence
    # after which the feed counts as down (0: no watchdog, as in a replay)
    quiet_ms: int = 0
    watchdog_ms: int = 0


class View(msgspec.Struct):
    """The state of the run as sinks see it on each tick and at the end; `now_ms` is the
    pipeline's clock."""

    now_ms: int
    symbols: tuple[str, ...]
    timeframes: tuple[str, ...]  # the first is the run's main timeframe
    warmup: int  # bars an indicator needs before every value is there
    feed: FeedState
    # asked twice to stop: close at once, keeping what is not delivered on disk
    hurry: bool = False


def feed_down(feed: FeedState) -> str | None:
    """Why the feed counts as down (no data for longer than the watchdog), or None."""
    if feed.watchdog_ms <= 0 or feed.quiet_ms <= feed.watchdog_ms:
        return None
    return f"no data for {feed.quiet_ms / 1000:.0f} s (feed {feed.state})"


class Sink(Protocol):
    """A consumer of the run's results, called on the pipeline thread only.

    `write` gets every output as it is made; `tick` comes about four times a second and may
    return status records for the other sinks (a worker's problem, say); `close` comes once,
    after the last `write`. `counters` are shown beside the pipeline's own.
    """

    name: str

    def write(self, out: Output) -> None: ...

    def tick(self, view: View) -> Sequence[Notice]: ...

    def close(self, view: View) -> Sequence[Notice]: ...

    def counters(self) -> dict[str, int]: ...


class BaseSink:
    """A sink that does nothing; subclasses override what they need."""

    name = "sink"

    def write(self, out: Output) -> None:
        pass

    def tick(self, view: View) -> Sequence[Notice]:
        return ()

    def close(self, view: View) -> Sequence[Notice]:
        return ()

    def counters(self) -> dict[str, int]:
        return {}


class Sinks:
    """The registered sinks, in order (see the module docstring for failures)."""

    def __init__(self, sinks: Sequence[Sink] = (), clock: Callable[[], float] = time.time):
        self._sinks: list[Sink] = list(sinks)
        self._clock = clock
        self.error: PolystreamError | None = None
        self._view = View(0, (), (), 0, FeedState())

    def add(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def write(self, out: Output) -> None:
        for sink in list(self._sinks):
            self._call(sink, sink.write, out)

    def tick(self, view: View) -> None:
        self._view = view
        notices: list[Notice] = []
        for sink in list(self._sinks):
            notices += self._call(sink, sink.tick, view) or ()
        if notices:
            self.write(Output(notices=notices))

    def close(self, view: Callable[[], View]) -> None:
        """Close every sink, the last registered first (workers drain before the displays
        show the end); what a closing sink reports reaches the ones still open."""
        while self._sinks:
            sink = self._sinks.pop()
            try:
                notices = self._call(sink, sink.close, view()) or ()
            except KeyboardInterrupt:  # a second stop signal: close again, now in a hurry
                notices = self._call(sink, sink.close, view()) or ()
            if notices:
                self.write(Output(notices=notices))

    def counters(self) -> dict[str, int]:
        shown: dict[str, int] = {}
        for sink in list(self._sinks):
            shown.update(self._call(sink, sink.counters) or {})
        return shown

    def _call(self, sink: Sink, method: Callable[..., _R], *args: object) -> _R | None:
        try:
            return method(*args)
        except PolystreamError as exc:
            self.error = self.error or exc
            self._drop(sink)
        except Exception as exc:
            log.debug("the %s output failed", sink.name, exc_info=True)
            self._drop(sink)
            detail = (
                f"The {sink.name} output failed ({type(exc).__name__}: {exc}) and was closed; "
                "the rest of the run goes on without it."
            )
            self.write(Output(notices=[Notice("error", int(self._clock() * 1000), detail)]))
        return None

    def _drop(self, sink: Sink) -> None:
        if sink not in self._sinks:
            return  # already closing
        self._sinks.remove(sink)
        # give it the chance to release what it holds (a terminal, a thread); it failed already
        with contextlib.suppress(Exception):
            sink.close(self._view)


# -- the workers as sinks ---------------------------------------------------------------------


class StoreSink(BaseSink):
    """Rows to the database writer: trades, quotes, book snapshots, bars, alerts and gaps."""

    name = "database"

    def __init__(self, store: Store, timeout: float = 15.0, *, down: str | None = None) -> None:
        """`down`: why the database could not be reached as the run started."""
        self.store = store
        self.timeout = timeout
        self._up: bool | None = None  # as last reported: None before the first connection
        self._down = down

    def write(self, out: Output) -> None:
        self.store.start()  # on first use: a run that never starts leaves no thread behind
        offer = self.store.offer
        for table, frame in (("trades", out.trades), ("quotes", out.quotes), ("bars", out.bars)):
            if frame is not None and frame.height:
                offer(table, frame)
        if out.repaired is not None and out.repaired.height:
            offer("trades", out.repaired)
        if out.books:
            offer("books", book_rows(out.books))
        if out.alerts:
            offer("alerts", alert_rows(out.alerts))
        if out.gaps:
            offer("gaps", gap_rows(out.gaps))

    def tick(self, view: View) -> Sequence[Notice]:
        self.store.start()
        if self.store.fatal is not None:
            raise self.store.fatal
        return self._changes(view.now_ms)

    def close(self, view: View) -> Sequence[Notice]:
        self.store.stop(min(self.timeout, HURRY) if view.hurry else self.timeout)
        if self.store.fatal is not None:
            raise self.store.fatal
        stats = self.store.stats
        if not stats.journal_rows:
            return ()
        return [
            Notice(
                "store_pending",
                view.now_ms,
                f"{stats.journal_rows:,} rows wait in the journal in {self.store.journal.dir}; "
                "the next run with --store writes them once the database takes them",
            )
        ]

    def _changes(self, now_ms: int) -> list[Notice]:
        """`store_down` when the writer loses the database (or cannot reach it), `store_up`
        when it writes again."""
        stats = self.store.stats
        if stats.connected and self._up is not True:
            was_down, self._up = self._up is False, True
            if was_down:
                detail = f"writing to PostgreSQL at {self.store.where} again"
                if stats.journal_rows:
                    detail += f"; {stats.journal_rows:,} rows in the journal go in first"
                return [Notice("store_up", now_ms, detail)]
        elif not stats.connected and self._up is not False and (self._down or stats.last_error):
            self._up = False
            reason = (self._down or stats.last_error or "").rstrip(".")
            journal = self.store.journal.dir
            detail = f"{reason}; rows wait in the journal in {journal} until it is back"
            return [Notice("store_down", now_ms, detail)]
        return []

    def counters(self) -> dict[str, int]:
        return self.store.counters()


class TelegramSink(BaseSink):
    """Alerts routed to `telegram` to the notifier, but for muted ones (counted as `muted`);
    an alert that asks for a chart goes with the recent bars of its symbol and timeframe. Its
    problems and the commands worker's (a chat that blocked the bot) become `error` status
    records, once each. `state` is kept up to date for the `commands` worker, which runs as
    long as the sink."""

    name = "Telegram"

    def __init__(
        self,
        notifier: TelegramNotifier,
        timeout: float = 15.0,
        *,
        state: RunState | None = None,
        mutes: Mutes | None = None,
        commands: TelegramCommands | None = None,
    ) -> None:
        self.notifier = notifier
        self.timeout = timeout
        self.state = state
        self.mutes = mutes
        self.commands = commands
        self._shown = 0
        self._shown_commands = 0
        self._muted = 0

    def _start(self) -> None:
        # on first use: a run that never starts leaves no thread behind
        self.notifier.start()
        if self.commands is not None:
            self.commands.start()

    def write(self, out: Output) -> None:
        self._start()
        if self.state is not None:
            self.state.update(out)
        routed = [a for a in out.alerts if "telegram" in a.notify]
        if routed and self.mutes is not None:
            kept = [a for a in routed if not self.mutes.muted(a)]
            self._muted += len(routed) - len(kept)
            routed = kept
        if not routed:
            return
        charts = [self._chart(a) for a in routed]
        if any(c is not None for c in charts):
            self.notifier.offer(routed, charts=charts)
        else:
            self.notifier.offer(routed)

    def _chart(self, alert: Alert) -> pl.DataFrame | None:
        if alert.attach != "chart" or self.state is None or alert.timeframe is None:
            return None
        return self.state.bars(alert.symbol, alert.timeframe)

    def tick(self, view: View) -> Sequence[Notice]:
        self._start()
        if self.state is not None:
            self.state.tick(view)
            if self.mutes is not None:
                self.mutes.expire(self.state.now_ms())
        problems = self.notifier.problems[self._shown :]
        self._shown += len(problems)
        if self.commands is not None:
            more = self.commands.problems[self._shown_commands :]
            self._shown_commands += len(more)
            problems = [*problems, *more]
        return [Notice("error", view.now_ms, text) for text in problems]

    def close(self, view: View) -> Sequence[Notice]:
        if self.commands is not None:
            self.commands.stop()
        if view.hurry:  # a request in flight is not waited for: its alerts stay in the outbox
            self.notifier.stop(0.0, in_flight=HURRY)
        else:
            self.notifier.stop(self.timeout)
        return self.tick(view)

    def counters(self) -> dict[str, int]:
        shown = self.notifier.counters()
        if self._muted:
            shown["muted"] = self._muted
        return shown


class RecorderSink(BaseSink):
    """Every frame as received, to a recording."""

    name = "recording"

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def write(self, out: Output) -> None:
        write = self.recorder.write
        for frame in out.frames:
            write(frame)

    def close(self, view: View) -> Sequence[Notice]:
        self.recorder.close()
        return ()
