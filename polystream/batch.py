"""Micro-batching, on the pipeline thread: the only place where per-event data becomes columnar.

`Batcher.add` takes the events of one frame with the frame's receipt time; `flush` returns a
`Batch` of polars DataFrames, one per event kind, in arrival order. Flush on size or age.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import msgspec
import polars as pl

from .events import Aggregate, Book, Event, Quote, SecondAggregate, Trade
from .symbols import from_pair

TRADE_SCHEMA = {
    "symbol": pl.String,
    "time": pl.Int64,
    "price": pl.Float64,
    "size": pl.Float64,
    "side": pl.Int8,
    "received": pl.Int64,
}
QUOTE_SCHEMA = {
    "symbol": pl.String,
    "time": pl.Int64,
    "bid": pl.Float64,
    "bid_size": pl.Float64,
    "ask": pl.Float64,
    "ask_size": pl.Float64,
    "received": pl.Int64,
}
AGG_SCHEMA = {
    "symbol": pl.String,
    "ev": pl.String,
    "start": pl.Int64,
    "end": pl.Int64,
    "open": pl.Float64,
    "high": pl.Float64,
    "low": pl.Float64,
    "close": pl.Float64,
    "volume": pl.Float64,
    "vwap": pl.Float64,
    "avg_size": pl.Float64,
    "received": pl.Int64,
}


class Batch(msgspec.Struct):
    """Columnar events of one micro-batch, each frame in arrival order."""

    trades: pl.DataFrame
    quotes: pl.DataFrame
    aggregates: pl.DataFrame
    books: list[tuple[str, Book]]
    received: int

    @property
    def size(self) -> int:
        return self.trades.height + self.quotes.height + self.aggregates.height + len(self.books)


def _side(conditions: list[int]) -> int:
    if 2 in conditions:
        return 2
    return 1 if 1 in conditions else 0


def _symbols(pairs: list[str]) -> pl.Series:
    """Map feed pairs to REST symbols once per distinct pair, not once per event."""
    series = pl.Series("symbol", pairs, dtype=pl.String)
    unique = series.unique().to_list()
    return series.replace_strict({p: from_pair(p) for p in unique}, return_dtype=pl.String)


class Batcher:
    """Accumulates events; `due()` says when a flush is owed (size or age)."""

    def __init__(
        self,
        max_events: int = 50_000,
        max_age: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_events = max_events
        self.max_age = max_age
        self._clock = clock
        self._reset()

    def _reset(self) -> None:
        self._trades: list[Trade] = []
        self._trade_received: list[int] = []
        self._quotes: list[Quote] = []
        self._quote_received: list[int] = []
        self._aggs: list[Aggregate] = []
        self._agg_received: list[int] = []
        self._books: list[tuple[str, Book]] = []
        self._count = 0
        self._received = 0
        self._since: float | None = None

    def __len__(self) -> int:
        return self._count

    def add(self, events: Iterable[Event], received: int) -> None:
        trades, quotes, aggs = self._trades, self._quotes, self._aggs
        nt, nq, na = len(trades), len(quotes), len(aggs)
        for ev in events:
            kind = type(ev)
            if kind is Trade:
                trades.append(ev)  # type: ignore[arg-type]
            elif kind is Quote:
                quotes.append(ev)  # type: ignore[arg-type]
            elif kind is Aggregate or kind is SecondAggregate:
                aggs.append(ev)  # type: ignore[arg-type]
            elif isinstance(ev, Book):
                self._books.append((from_pair(ev.pair), ev))
        added = len(trades) - nt + len(quotes) - nq + len(aggs) - na
        if len(trades) > nt:
            self._trade_received.extend([received] * (len(trades) - nt))
        if len(quotes) > nq:
            self._quote_received.extend([received] * (len(quotes) - nq))
        if len(aggs) > na:
            self._agg_received.extend([received] * (len(aggs) - na))
        self._count += added
        self._received = max(self._received, received)
        if self._since is None and self._count:
            self._since = self._clock()

    def due(self) -> bool:
        if self._count >= self.max_events:
            return True
        return self._since is not None and self._clock() - self._since >= self.max_age

    def flush(self) -> Batch:
        tr, qu, ag = self._trades, self._quotes, self._aggs
        trades = pl.DataFrame(
            {
                "symbol": _symbols([t.pair for t in tr]),
                "time": [t.time for t in tr],
                "price": [t.price for t in tr],
                "size": [t.size for t in tr],
                "side": [_side(t.conditions) for t in tr],
                "received": self._trade_received,
            },
            schema=TRADE_SCHEMA,
        )
        quotes = pl.DataFrame(
            {
                "symbol": _symbols([q.pair for q in qu]),
                "time": [q.time for q in qu],
                "bid": [q.bid for q in qu],
                "bid_size": [q.bid_size for q in qu],
                "ask": [q.ask for q in qu],
                "ask_size": [q.ask_size for q in qu],
                "received": self._quote_received,
            },
            schema=QUOTE_SCHEMA,
        )
        aggregates = pl.DataFrame(
            {
                "symbol": _symbols([a.pair for a in ag]),
                "ev": ["XAS" if type(a) is SecondAggregate else "XA" for a in ag],
                "start": [a.start for a in ag],
                "end": [a.end for a in ag],
                "open": [a.open for a in ag],
                "high": [a.high for a in ag],
                "low": [a.low for a in ag],
                "close": [a.close for a in ag],
                "volume": [a.volume for a in ag],
                "vwap": [a.vwap for a in ag],
                "avg_size": [a.avg_size for a in ag],
                "received": self._agg_received,
            },
            schema=AGG_SCHEMA,
        )
        batch = Batch(trades, quotes, aggregates, self._books, self._received)
        self._reset()
        return batch
