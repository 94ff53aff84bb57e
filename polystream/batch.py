"""Micro-batching, on the pipeline thread: the only place where per-event data becomes columnar.

`Batcher.add` takes the events of one frame with the frame's receipt time; `flush` returns a
`Batch` of polars DataFrames, one per event kind, in arrival order. Flush on size or age.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
        self._events: list[Event] = []
        self._event_received: list[int] = []
        self._count = 0
        self._received = 0
        self._since: float | None = None

    def __len__(self) -> int:
        return self._count

    def add(self, events: list[Event], received: int) -> None:
        """Take the events of one frame, received at `received` (epoch ms)."""
        if not events:
            return
        if self._since is None:
            self._since = self._clock()
        self._events += events
        self._event_received += [received] * len(events)
        self._count += len(events)
        if received > self._received:
            self._received = received

    def due(self) -> bool:
        if self._count >= self.max_events:
            return True
        return self._since is not None and self._clock() - self._since >= self.max_age

    def flush(self) -> Batch:
        events, received = self._events, self._event_received
        # One comprehension per kind keeps the per-event work in C-level loops.
        tr = [(e, r) for e, r in zip(events, received, strict=True) if type(e) is Trade]
        qu = [(e, r) for e, r in zip(events, received, strict=True) if type(e) is Quote]
        ag = [
            (e, r)
            for e, r in zip(events, received, strict=True)
            if type(e) is Aggregate or type(e) is SecondAggregate
        ]
        books = [(from_pair(e.pair), e) for e in events if isinstance(e, Book)]
        trades = pl.DataFrame(
            {
                "symbol": _symbols([t.pair for t, _ in tr]),
                "time": [t.time for t, _ in tr],
                "price": [t.price for t, _ in tr],
                "size": [t.size for t, _ in tr],
                "side": [
                    2 if 2 in c else (1 if 1 in c else 0) for c in (t.conditions for t, _ in tr)
                ],
                "received": [r for _, r in tr],
            },
            schema=TRADE_SCHEMA,
        )
        quotes = pl.DataFrame(
            {
                "symbol": _symbols([q.pair for q, _ in qu]),
                "time": [q.time for q, _ in qu],
                "bid": [q.bid for q, _ in qu],
                "bid_size": [q.bid_size for q, _ in qu],
                "ask": [q.ask for q, _ in qu],
                "ask_size": [q.ask_size for q, _ in qu],
                "received": [r for _, r in qu],
            },
            schema=QUOTE_SCHEMA,
        )
        aggregates = pl.DataFrame(
            {
                "symbol": _symbols([a.pair for a, _ in ag]),
                "ev": ["XAS" if type(a) is SecondAggregate else "XA" for a, _ in ag],
                "start": [a.start for a, _ in ag],
                "end": [a.end for a, _ in ag],
                "open": [a.open for a, _ in ag],
                "high": [a.high for a, _ in ag],
                "low": [a.low for a, _ in ag],
                "close": [a.close for a, _ in ag],
                "volume": [a.volume for a, _ in ag],
                "vwap": [a.vwap for a, _ in ag],
                "avg_size": [a.avg_size for a, _ in ag],
                "received": [r for _, r in ag],
            },
            schema=AGG_SCHEMA,
        )
        batch = Batch(trades, quotes, aggregates, books, self._received)
        self._reset()
        return batch
