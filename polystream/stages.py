"""The stages of a run, on the pipeline thread, with no threads or I/O of their own: the frames of
one pass flow through decode → bars → indicators → filters and come out as `Output`s.

`step(frames)` yields the events and the trade and quote alerts first, so that they reach the
sinks before any bar work; the bars come after. Trades wait for the bar engine until a bar could
become final or a trade could be late (an upper bound of the watermark tells): the engine's
results do not depend on how the stream is cut, so a pass under light load costs no bar work at
all, and a bar is still emitted in the same pass as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal, TypeAlias

import polars as pl

from .batch import Batch, Batcher
from .drift import DriftMeter
from .events import Book
from .features import BookFeatures, book_features
from .filters import FilterEngine
from .schema import TRADE, Notice
from .sinks import Output
from .source import Frame
from .window import BarEngine, BarOptions

BarSource: TypeAlias = Literal["trades", "polygon"]

_NEVER = -(2**62)


class Stages:
    """decode → bars → indicators → filters for `symbols`; see the module docstring.

    With `bar_source="polygon"` bars come from the feed's XA/XAS aggregates, and the drift of
    trade-built bars from them is measured when trades are subscribed too. `max_pending` bounds
    the trades that wait for the bar engine.
    """

    def __init__(
        self,
        symbols: Sequence[str],
        options: BarOptions | None = None,
        *,
        filters: FilterEngine | None = None,
        bar_source: BarSource = "trades",
        max_pending: int = 200_000,
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
        self.other = 0  # events of symbols nobody watches
        self._pending: list[pl.DataFrame] = []
        self._rows = 0
        # over the pending trades: latest receipt, greatest lead of event time over receipt,
        # and the earliest end (plus lateness) of a bar they fall in
        self._received = _NEVER
        self._lead = _NEVER
        self._first_due = -_NEVER
        self._due = -_NEVER  # the engine's own `due_at`, kept between calls
        self._no_bars = self.engine.add_trades(pl.DataFrame(schema=TRADE))

    # -- a pass ------------------------------------------------------------------------------

    def step(self, frames: Sequence[Frame]) -> Iterator[Output]:
        """The outputs of one pass over `frames`: the events first, then any bars."""
        batch = self.batcher.build(frames)
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
        records = self._bars(batch)
        if records.height:
            yield self._bar_output(records)

    def tick(self, now_ms: int) -> Output | None:
        """Live only: the wall clock moves the watermark (corrected by the feed's clock offset),
        so quiet bars close."""
        offset = self.engine.offset if self.engine.offset is not None else self._lead
        if offset == _NEVER or now_ms + offset < min(self._due, self._first_due):
            return None
        records = self._ingest()
        records = pl.concat([records, self.engine.advance(now_ms)], how="vertical_relaxed")
        self._due = self.engine.due_at()
        if self.drift is not None:
            self.drift.advance(now_ms)
        return self._bar_output(records) if records.height else None

    def finish(self) -> Output | None:
        """The end of a replay: every open bar is final."""
        records = pl.concat([self._ingest(), self.engine.finish()], how="vertical_relaxed")
        if self.drift is not None:
            self.drift.finish()
        return self._bar_output(records) if records.height else None

    def partial(self) -> Output | None:
        """The end of a live run: the open bars as `partial`, nothing final."""
        records = pl.concat([self._ingest(), self.engine.partial()], how="vertical_relaxed")
        return self._bar_output(records) if records.height else None

    # -- history -----------------------------------------------------------------------------

    def warm(self, history: pl.DataFrame, now_ms: int) -> Output:
        """Seed the indicators and the filters with earlier final bar records (see
        `BarEngine.warm`) before the first pass."""
        records = self.engine.warm(history)
        self._due = self.engine.due_at()
        if records.height and self.filters is not None:
            self.filters.seed(records)
        notice = Notice("warmed", now_ms, f"{records.height:,} earlier bars loaded")
        return Output(history=records, notices=[notice])

    def flush(self) -> Output | None:
        """Give the bar engine every trade that waits for it now; the bars that emits."""
        records = self._ingest()
        return self._bar_output(records) if records.height else None

    def rebuild(
        self,
        symbol: str,
        tf: int,
        lo: int,
        hi: int,
        trades: pl.DataFrame | None,
        aggregates: pl.DataFrame | None = None,
    ) -> Output | None:
        """Gap repair, after `flush`: the bars of `symbol` at `tf` starting in [lo, hi) made
        again from every trade of that window (or, without trades, the REST API's aggregates),
        as `revised`."""
        if trades is not None:
            records = self.engine.rebuild(symbol, tf, lo, hi, trades)
        else:
            assert aggregates is not None
            records = self.engine.rebuild_from_aggregates(symbol, tf, lo, hi, aggregates)
        self._due = self.engine.due_at()
        return self._bar_output(records) if records.height else None

    # -- bars --------------------------------------------------------------------------------

    def _bars(self, batch: Batch) -> pl.DataFrame:
        if self.bar_source == "polygon":
            if self.drift is not None and batch.trades.height:
                self.drift.trades(batch.trades)
            records = self.engine.add_aggregates(batch.aggregates)
            self._due = self.engine.due_at()
            return records
        trades = batch.trades
        if trades.height:
            self._hold(trades)
        if not self._rows:
            return self._no_bars
        # The watermark can reach at most the latest receipt plus the greatest lead seen.
        offset = max(self.engine.offset if self.engine.offset is not None else _NEVER, self._lead)
        bound = max(self.engine.watermark, self._received + offset)
        if self._rows >= self.max_pending or bound >= min(self._due, self._first_due):
            return self._ingest()
        return self._no_bars

    def _hold(self, trades: pl.DataFrame) -> None:
        self._pending.append(trades)
        self._rows += trades.height
        tf = self.options.timeframes
        shortest = min(tf)
        first = int(trades["time"].min())  # type: ignore[arg-type]
        lead = int((trades["time"] - trades["received"]).max())  # type: ignore[arg-type]
        self._received = max(self._received, int(trades["received"].max()))  # type: ignore[arg-type]
        self._lead = max(self._lead, lead)
        self._first_due = min(
            self._first_due, first // shortest * shortest + shortest + self.options.lateness
        )

    def _ingest(self) -> pl.DataFrame:
        """Give the bar engine every trade that waits; the bars that emits."""
        if not self._pending:
            return self._no_bars
        trades = pl.concat(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending = []
        self._rows = 0
        self._received = self._lead = _NEVER
        self._first_due = -_NEVER
        records = self.engine.add_trades(trades)
        self._due = self.engine.due_at()
        return records

    def _bar_output(self, records: pl.DataFrame) -> Output:
        if self.drift is not None:
            self.drift.bars(records)
        alerts = self.filters.on_bars(records) if self.filters is not None else []
        return Output(bars=records, alerts=alerts)


def _latest_books(books: Sequence[tuple[str, Book]]) -> list[BookFeatures]:
    """Features of each symbol's latest snapshot."""
    latest = dict(books)
    return [book_features(sym, b.time, b.bids, b.asks) for sym, b in latest.items()]
