"""The dashboard's view-model, on the pipeline thread: the run's outputs in, one row per symbol
out (latest trade and quote, event rate, latest bar of the main timeframe, latest book) and the
recent alerts.

`Board.update` only keeps references to what it is given, so an output costs it nothing; the
rows are worked out when the screen is drawn (a few times a second), whatever the pass rate.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import polars as pl

from .features import BookFeatures, quote_features
from .schema import SIDE_UNKNOWN, Alert
from .sinks import Output

RECENT_ALERTS = 50


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
    bar: dict[str, Any] | None = None
    bars: int = 0  # final bars of the main timeframe, warm-up included
    imbalance: float | None = None
    book: BookFeatures | None = None

    @property
    def spread(self) -> float | None:
        if self.bid is None or self.ask is None:
            return None
        return self.ask - self.bid


class Board:
    """Rows for `symbols`; bars are those of `timeframe` (the run's main one)."""

    def __init__(
        self,
        symbols: Sequence[str],
        timeframe: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeframe = timeframe
        self.alerts: collections.deque[Alert] = collections.deque(maxlen=RECENT_ALERTS)
        self._states = {s: SymbolState(s) for s in symbols}
        self._clock = clock
        self._trades: list[pl.DataFrame] = []
        self._quotes: list[pl.DataFrame] = []
        self._bars: list[pl.DataFrame] = []
        self._counted_at: float | None = None
        self._counted: dict[str, int] = {}

    def update(self, out: Output) -> None:
        if out.trades is not None and out.trades.height:
            self._trades.append(out.trades)
        if out.quotes is not None and out.quotes.height:
            self._quotes.append(out.quotes)
        for frame in (out.history, out.bars):
            if frame is not None and frame.height:
                self._bars.append(frame)
        for sym, _ in out.books:
            if sym in self._states:
                self._states[sym].events += 1
        for f in out.book_features:
            if f.symbol in self._states:
                self._states[f.symbol].book = f
        self.alerts.extend(out.alerts)

    def rows(self) -> list[SymbolState]:
        """Every symbol's row, with what arrived since the last call folded in."""
        self._fold_trades()
        self._fold_quotes()
        self._fold_bars()
        now = self._clock()
        if self._counted_at is None or now - self._counted_at >= 1.0:
            elapsed = now - self._counted_at if self._counted_at is not None else 0.0
            for name, st in self._states.items():
                before = self._counted.get(name, st.events)
                st.rate = (st.events - before) / elapsed if elapsed else 0.0
                self._counted[name] = st.events
            self._counted_at = now
        return list(self._states.values())

    def _fold_trades(self) -> None:
        if not self._trades:
            return
        trades = pl.concat(self._trades)
        self._trades = []
        last = trades.group_by("symbol").agg(
            pl.col("price").last(),
            pl.col("size").last(),
            pl.col("side").last(),
            pl.col("time").max(),
            pl.len().alias("n"),
        )
        for sym, price, size, side, t, n in last.iter_rows():
            st = self._states.get(sym)
            if st is not None:
                st.last_price, st.last_size, st.last_side = price, size, side
                st.trades += n
                st.events += n
                st.last_event_ms = max(st.last_event_ms or 0, t)

    def _fold_quotes(self) -> None:
        if not self._quotes:
            return
        quotes = pl.concat(self._quotes)
        self._quotes = []
        counts = dict(quotes.group_by("symbol").len().iter_rows())
        # the last quote received per symbol is what the dashboard shows
        latest = quote_features(quotes.group_by("symbol").last()).select(
            "symbol", "bid", "ask", "imbalance", "time"
        )
        for sym, bid, ask, imbalance, t in latest.iter_rows():
            st = self._states.get(sym)
            if st is not None:
                st.bid, st.ask, st.imbalance = bid, ask, imbalance
                st.quotes += counts[sym]
                st.events += counts[sym]
                st.last_event_ms = max(st.last_event_ms or 0, t)

    def _fold_bars(self) -> None:
        if not self._bars:
            return
        records = pl.concat(self._bars, how="vertical_relaxed").filter(
            pl.col("timeframe") == self.timeframe
        )
        self._bars = []
        for row in records.iter_rows(named=True):
            st = self._states.get(row["symbol"])
            if st is None:
                continue
            if row["state"] == "final":
                st.bars += 1
            if st.bar is None or row["start"] >= st.bar["start"]:
                st.bar = row
