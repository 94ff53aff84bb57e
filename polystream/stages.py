"""The stages of a run: the frames of one pass flow through decode → bars → indicators → filters
and come out as `Output`s. Called from the pipeline thread only.

`step(frames)` decodes the frames, evaluates the trade and quote filters and yields those results
at once; the bar engine runs on its own thread (`polystream-bars`), so that building bars (polars,
which lets go of the GIL) never holds up the next frame's alerts, and on two cores overlaps with
decoding. Trades wait for it until a bar could become final or a trade could be late (an upper
bound of the watermark tells), and while it is busy: its results do not depend on how the stream
is cut, so nothing but when they arrive changes. Bars and their alerts come out of the first
`step` or `tick` after the engine made them, and at once from `finish`, `partial` and `flush`.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, TypeAlias

import polars as pl

from .batch import Batch, Batcher
from .drift import DriftMeter
from .events import Book
from .features import BookFeatures, book_features
from .filters import FilterEngine
from .schema import TRADE, Notice
from .sinks import Output
from .source import Decoded, Frame
from .window import BarEngine, BarOptions
from .worker import Worker, WorkerError

BarSource: TypeAlias = Literal["trades", "polygon"]

_NEVER = -(2**62)
_PENDING_PIECES = 64
# A feed that keeps sending trades stamped in the future is reported at most this often (s).
AHEAD_EVERY = 10.0


class _Job:
    """One call on the bar engine; the thread fills in `records` (or `error`) and sets `done`."""

    __slots__ = ("call", "done", "error", "records")

    def __init__(self, call: Callable[[BarEngine], pl.DataFrame]) -> None:
        self.call = call
        self.records: pl.DataFrame | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class _BarThread(Worker[_Job]):
    """Runs jobs on the bar engine in the order given; finished ones wait in `finished`, and
    `due` is the engine's `due_at` after the last one. `busy` counts the jobs given whose
    results the pipeline thread has not collected yet."""

    def __init__(self, engine: BarEngine) -> None:
        super().__init__("polystream-bars", inbox_size=1_000)
        self.engine = engine
        self.finished: collections.deque[_Job] = collections.deque()
        self.busy = 0
        self.due = engine.due_at()

    def run(self) -> None:
        while not (self.stopping and self.inbox is not None and self.inbox.empty()):
            job = self.next_item(0.5)
            if job is None:
                continue
            try:
                job.records = job.call(self.engine)
            except Exception as exc:  # handed back to the pipeline thread, which raises it
                job.error = exc
            self.due = self.engine.due_at()
            self.finished.append(job)
            job.done.set()

    def give(self, call: Callable[[BarEngine], pl.DataFrame]) -> _Job:
        job = _Job(call)
        self.busy += 1
        self.start().put(job)
        return job


class Stages:
    """decode → bars → indicators → filters for `symbols`; see the module docstring.

    With `bar_source="polygon"` bars come from the feed's XA/XAS aggregates, and the drift of
    trade-built bars from them is measured when trades are subscribed too. `max_pending` bounds
    the trades that wait for the bar engine; a replay sets `min_pending`, the trades worth one
    call (each call has a fixed cost, and a replay's watermark makes bars due all the time).
    `close` ends the bar engine's thread.
    """

    def __init__(
        self,
        symbols: Sequence[str],
        options: BarOptions | None = None,
        *,
        filters: FilterEngine | None = None,
        bar_source: BarSource = "trades",
        max_pending: int = 200_000,
        min_pending: int = 0,
    ) -> None:
        self.symbols = tuple(symbols)
        self.options = options or BarOptions()
        self.batcher = Batcher(self.symbols)
        self.decoder = self.batcher.decoder
        self.engine = BarEngine(self.options)
        self.filters = filters
        self.bar_source = bar_source
        self.drift = DriftMeter(self.options) if bar_source == "polygon" else None
        self.max_pending = max_pending
        self.min_pending = min_pending
        self.other = 0  # events of symbols nobody watches
        self._bars = _BarThread(self.engine)
        self._pending: list[pl.DataFrame] = []
        self._rows = 0
        # over the pending trades: latest receipt, greatest lead of event time over receipt,
        # and the earliest end (plus lateness) of a bar they fall in
        self._received = _NEVER
        self._lead = _NEVER
        self._first_due = -_NEVER
        self._ahead = 0  # trades ahead of the feed's clock already reported
        self._ahead_said = -AHEAD_EVERY  # monotonic time of that report
        self._decoded: set[str] = set()  # symbols of the events decoded elsewhere

    # -- a pass ------------------------------------------------------------------------------

    def step(self, frames: Sequence[Frame]) -> Iterator[Output]:
        """The outputs of one pass over `frames`: the events first, then any bars made since."""
        yield from self.step_batch(self.batcher.build(frames), frames)

    def step_decoded(self, decoded: Decoded) -> Iterator[Output]:
        """A pass over events decoded elsewhere (a shard's share of a run): the same, with
        the run's clock rows for the watermark."""
        stats = self.decoder.stats
        stats.frames += decoded.frames
        stats.events += decoded.batch.size
        batch, count = decoded.batch, self.decoder.count
        for channel, n in (("XT", batch.trades.height), ("XQ", batch.quotes.height)):
            count(channel, n)
        count("XL2", len(batch.books))
        if batch.aggregates.height:
            for ev, n in batch.aggregates["ev"].value_counts().iter_rows():
                count(ev, n)
        for frame in (decoded.batch.trades, decoded.batch.quotes):
            if frame.height:
                self._decoded.update(frame["symbol"].unique().to_list())
        yield from self.step_batch(decoded.batch, clock=decoded.clock)

    def step_batch(
        self, batch: Batch, frames: Sequence[Frame] = (), clock: pl.DataFrame | None = None
    ) -> Iterator[Output]:
        """The outputs of one pass over decoded events (`clock`: see `step_decoded`)."""
        self.other += batch.other
        alerts = []
        if self.filters is not None:
            alerts = self.filters.on_trades(batch.trades) + self.filters.on_quotes(batch.quotes)
        yield Output(
            frames=frames,
            trades=batch.trades,
            quotes=batch.quotes,
            books=batch.books,
            book_features=_latest_books(batch.books),
            alerts=alerts,
        )
        self._hold(batch, clock)
        rows = self._rows
        if rows >= self.max_pending or (
            rows and rows >= self.min_pending and not self._bars.busy and self._due_now(None)
        ):
            self._send()
        yield from self._finished()

    def tick(self, now_ms: int | None) -> Iterator[Output]:
        """Whatever the bar engine finished meanwhile; live (`now_ms` given), the wall clock
        also moves the watermark (corrected by the feed's clock offset), so quiet bars close."""
        if now_ms is not None and not self._bars.busy and self._due_now(now_ms):
            self._send(lambda engine: engine.advance(now_ms))
            if self.drift is not None:
                self.drift.advance(now_ms)
        yield from self._finished()

    def finish(self) -> Iterator[Output]:
        """The end of a replay: every open bar is final; symbols it never had are named."""
        yield from self._wait(self._send(BarEngine.finish))
        if self.drift is not None:
            self.drift.finish()
        seen, other = self.batcher.seen()
        seen += sorted(self._decoded)
        missing = [s for s in self.symbols if s not in seen]
        if missing:
            holds = f"it holds {', '.join(other)}" if other else "it holds no other symbol either"
            detail = f"no events of {', '.join(missing)} in this replay; {holds}"
            yield Output(notices=[Notice("no_events", int(time.time() * 1000), detail)])

    def partial(self) -> Iterator[Output]:
        """The end of a live run: the open bars as `partial`, nothing final."""
        yield from self._wait(self._send(BarEngine.partial))

    def flush(self) -> Iterator[Output]:
        """Give the bar engine every trade that waits, and wait for what that makes."""
        yield from self._wait(self._send())

    @property
    def busy(self) -> bool:
        """Whether the bar engine is working on something whose results are not out yet."""
        return self._bars.busy > 0

    def close(self) -> None:
        self._bars.stop(5.0)

    # -- history -----------------------------------------------------------------------------

    def warm(self, history: pl.DataFrame, now_ms: int) -> Output:
        """Seed the indicators and the filters with earlier final bar records (see
        `BarEngine.warm`) before the first pass."""
        # the engine's thread has nothing to do yet: this runs here, before it starts
        records = self.engine.warm(history)
        self._bars.due = self.engine.due_at()
        if records.height and self.filters is not None:
            self.filters.seed(records)
        notice = Notice("warmed", now_ms, f"{records.height:,} earlier bars loaded")
        return Output(history=records, notices=[notice])

    def rebuild(
        self,
        symbol: str,
        tf: int,
        lo: int,
        hi: int,
        trades: pl.DataFrame | None,
        aggregates: pl.DataFrame | None = None,
    ) -> Iterator[Output]:
        """Gap repair: the bars of `symbol` at `tf` starting in [lo, hi) made again from every
        trade of that window (or, without trades, the REST API's aggregates), as `revised`."""

        def call(engine: BarEngine) -> pl.DataFrame:
            if trades is not None:
                return engine.rebuild(symbol, tf, lo, hi, trades)
            assert aggregates is not None
            return engine.rebuild_from_aggregates(symbol, tf, lo, hi, aggregates)

        yield from self._wait(self._send(call))

    # -- bars --------------------------------------------------------------------------------

    def _hold(self, batch: Batch, clock: pl.DataFrame | None = None) -> None:
        """Keep the pass's trades (or aggregates; or `clock`, which holds the trades) for the
        bar engine."""
        if self.bar_source == "polygon":
            if self.drift is not None and batch.trades.height:
                self.drift.trades(batch.trades)
            rows = batch.aggregates
            if rows.height:
                self._pending.append(rows)
                self._rows += rows.height
                self._first_due = _NEVER  # aggregates go to the engine as they come
            return
        trades = batch.trades if clock is None else clock
        if not trades.height:
            return
        self._pending.append(trades)
        self._rows += trades.height
        if len(self._pending) >= _PENDING_PIECES:
            # A frame of thousands of one-pass pieces makes every polars step on it several
            # times slower, some of them holding the GIL: join the pieces as they come.
            self._pending = [pl.concat(self._pending, rechunk=True)]
        shortest = min(self.options.timeframes)
        first = int(trades["time"].min())  # type: ignore[arg-type]
        lead = int((trades["time"] - trades["received"]).max())  # type: ignore[arg-type]
        self._received = max(self._received, int(trades["received"].max()))  # type: ignore[arg-type]
        self._lead = max(self._lead, lead)
        self._first_due = min(
            self._first_due, first // shortest * shortest + shortest + self.options.lateness
        )

    def _due_now(self, now_ms: int | None) -> bool:
        """Whether the engine could emit something: the watermark that the waiting trades (or,
        live, the clock) can bring reaches the next bar's end plus the lateness."""
        engine = self.engine
        offset = max(engine.lead_bound(), self._lead)
        if offset == _NEVER:
            return False
        bound = max(engine.watermark, self._received + offset)
        if now_ms is not None:
            bound = max(bound, now_ms + offset)
        return bound >= min(self._bars.due, self._first_due)

    def _send(self, then: Callable[[BarEngine], pl.DataFrame] | None = None) -> _Job:
        """Give the bar engine the waiting trades (or aggregates), then `then`, as one job."""
        pending = self._pending
        self._pending = []
        self._rows = 0
        self._received = self._lead = _NEVER
        self._first_due = -_NEVER
        polygon = self.bar_source == "polygon"

        def call(engine: BarEngine) -> pl.DataFrame:
            parts = []
            if pending:
                rows = pl.concat(pending, rechunk=True) if len(pending) > 1 else pending[0]
                parts.append(engine.add_aggregates(rows) if polygon else engine.add_trades(rows))
            if then is not None:
                parts.append(then(engine))
            if not parts:
                return engine.add_trades(pl.DataFrame(schema=TRADE))
            return parts[0] if len(parts) == 1 else pl.concat(parts, how="vertical_relaxed")

        return self._bars.give(call)

    def _finished(self) -> Iterator[Output]:
        """The bars of every job the engine finished, in order, with their alerts."""
        finished = self._bars.finished
        while finished:
            job = finished.popleft()
            self._bars.busy -= 1
            if job.error is not None:
                raise job.error
            records = job.records
            if records is not None and records.height:
                if self.drift is not None:
                    self.drift.bars(records)
                alerts = self.filters.on_bars(records) if self.filters is not None else []
                yield Output(bars=records, alerts=alerts)
        ahead = self.engine.stats.ahead
        if ahead > self._ahead and time.monotonic() - self._ahead_said >= AHEAD_EVERY:
            yield Output(notices=[self._ahead_notice(ahead - self._ahead)])
            self._ahead, self._ahead_said = ahead, time.monotonic()
        if self._bars.fatal is not None:
            raise self._bars.fatal

    def _ahead_notice(self, count: int) -> Notice:
        limit = self.options.max_ahead / 1000
        trades = "trade" if count == 1 else "trades"
        return Notice(
            "ahead",
            int(time.time() * 1000),
            f"{count:,} {trades} stamped more than {limit:g} s ahead of the feed's clock "
            "left out of the bars",
        )

    def _wait(self, job: _Job) -> Iterator[Output]:
        """Everything up to and including `job`, once it is done."""
        while not job.done.wait(0.5):
            if not self._bars.alive:
                raise self._bars.fatal or WorkerError("The bar engine's thread has ended.")
        yield from self._finished()


def _latest_books(books: Sequence[tuple[str, Book]]) -> list[BookFeatures]:
    """Features of each symbol's latest snapshot."""
    latest = dict(books)
    return [book_features(sym, b.time, b.bids, b.asks) for sym, b in latest.items()]
