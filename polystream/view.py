"""The dashboard's view-model, on the pipeline thread: the run's outputs in, one row per symbol
out (latest trade and quote, session change and range, event rate, latest bar and recent closes
of every timeframe, latest book) and the recent alerts with a count per filter.

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
# closes kept per symbol and timeframe for the sparklines
RECENT_CLOSES = 20


class Bars(msgspec.Struct):
    """One symbol's bars of one timeframe: the latest bar record, how many final bars were
    seen (warm-up included) and the closes of the latest bars, oldest first."""

    bar: dict[str, Any] | None = None
    count: int = 0
    starts: list[int] = msgspec.field(default_factory=list)
    closes: list[float] = msgspec.field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        """Take in a bar record (final, partial or revised); `count` is kept by the caller."""
        start, close = row["start"], row["close"]
        if self.bar is None or start >= self.bar["start"]:
            self.bar = row
        if close is None:
            return
        if not self.starts or start > self.starts[-1]:
            self.starts.append(start)
            self.closes.append(close)
            if len(self.starts) > RECENT_CLOSES:
                del self.starts[0], self.closes[0]
        elif start in self.starts:  # a partial bar grown, or a revision
            self.closes[self.starts.index(start)] = close


class SymbolState(msgspec.Struct):
    """What the dashboard shows for one symbol; `bar`, `bars` and `closes` are those of the
    main timeframe, `frames` every timeframe's."""

    symbol: str
    timeframe: str = ""
    last_price: float | None = None
    last_size: float | None = None
    last_side: int = SIDE_UNKNOWN
    first_price: float | None = None
    high: float | None = None
    low: float | None = None
    bid: float | None = None
    ask: float | None = None
    trades: int = 0
    quotes: int = 0
    events: int = 0
    rate: float = 0.0
    last_event_ms: int | None = None
    frames: dict[str, Bars] = msgspec.field(default_factory=dict)
    imbalance: float | None = None
    book: BookFeatures | None = None

    @property
    def spread(self) -> float | None:
        if self.bid is None or self.ask is None:
            return None
        return self.ask - self.bid

    @property
    def change(self) -> float | None:
        """The change of the last price since the run's first, as a fraction."""
        if self.last_price is None or not self.first_price:
            return None
        return self.last_price / self.first_price - 1.0

    @property
    def bar(self) -> dict[str, Any] | None:
        return self.of(self.timeframe).bar

    @property
    def bars(self) -> int:
        """Final bars of the main timeframe, warm-up included."""
        return self.of(self.timeframe).count

    @property
    def closes(self) -> list[float]:
        return self.of(self.timeframe).closes

    def of(self, timeframe: str) -> Bars:
        return self.frames.get(timeframe) or Bars()


class Board:
    """Rows for `symbols`; `timeframe` is the run's main one, `timeframes` every one expected
    (others are added as their bars arrive)."""

    def __init__(
        self,
        symbols: Sequence[str],
        timeframe: str,
        clock: Callable[[], float] = time.monotonic,
        timeframes: Sequence[str] = (),
    ) -> None:
        self.timeframe = timeframe
        self.timeframes: list[str] = list(dict.fromkeys((timeframe, *timeframes)))
        self.alerts: collections.deque[Alert] = collections.deque(maxlen=RECENT_ALERTS)
        self.fired: collections.Counter[str] = collections.Counter()
        self._states = {s: SymbolState(s, timeframe) for s in symbols}
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
        if out.alerts:
            self.alerts.extend(out.alerts)
            self.fired.update(a.filter for a in out.alerts)

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
            pl.col("price").first().alias("first"),
            pl.col("price").last(),
            pl.col("size").last(),
            pl.col("side").last(),
            pl.col("price").max().alias("high"),
            pl.col("price").min().alias("low"),
            pl.col("time").max(),
            pl.len().alias("n"),
        )
        for sym, first, price, size, side, high, low, t, n in last.iter_rows():
            st = self._states.get(sym)
            if st is not None:
                st.last_price, st.last_size, st.last_side = price, size, side
                if st.first_price is None:
                    st.first_price = first
                st.high = high if st.high is None else max(st.high, high)
                st.low = low if st.low is None else min(st.low, low)
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
        records = pl.concat(self._bars, how="vertical_relaxed")
        self._bars = []
        keys = ("symbol", "timeframe")
        finals = records.filter(pl.col("state") == "final").group_by(keys).len()
        # only the latest few bars of each series can show; the finals before them are counted
        recent = (
            records.unique((*keys, "start"), keep="last", maintain_order=True)
            .group_by(keys, maintain_order=True)
            .tail(RECENT_CLOSES)
        )
        for sym, tf, n in finals.iter_rows():
            st = self._states.get(sym)
            if st is not None:
                st.frames.setdefault(tf, Bars()).count += n
        for row in recent.iter_rows(named=True):
            st = self._states.get(row["symbol"])
            if st is None:
                continue
            tf = row["timeframe"]
            if tf not in self.timeframes:
                self.timeframes.append(tf)
            st.frames.setdefault(tf, Bars()).add(row)
