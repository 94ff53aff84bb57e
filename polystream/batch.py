"""Micro-batching, on the pipeline thread: the only place where per-event data becomes columnar.

`Batcher.add` keeps each frame as received, with its receipt time; `flush` decodes them all in
one pass and returns a `Batch` of polars DataFrames, one per event kind, in arrival order.
Flush on size (events, estimated from the frames' bytes until decoded) or age.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from itertools import chain, compress, repeat
from operator import not_

import msgspec
import polars as pl

from .decode import Decoder
from .events import Aggregate, Book, Quote, SecondAggregate, Trade
from .symbols import from_pair

TRADE_SCHEMA = {
    "symbol": pl.String,
    "time": pl.Int64,
    "price": pl.Float64,
    "size": pl.Float64,
    "side": pl.Int8,
    "exchange": pl.Int16,
    "trade_id": pl.String,
    "received": pl.Int64,
}
QUOTE_SCHEMA = {
    "symbol": pl.String,
    "time": pl.Int64,
    "bid": pl.Float64,
    "bid_size": pl.Float64,
    "ask": pl.Float64,
    "ask_size": pl.Float64,
    "exchange": pl.Int16,
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
# A trade takes about this many bytes of JSON: the size trigger counts bytes until decoding.
BYTES_PER_EVENT = 120
CHUNK_BYTES = 2_000_000


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


class Batcher:
    """Accumulates frames; `due()` says when a flush is owed (size or age)."""

    def __init__(
        self,
        decoder: Decoder | None = None,
        max_events: int = 200_000,
        max_age: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.decoder = decoder or Decoder()
        self.max_events = max_events
        self.max_age = max_age
        self._clock = clock
        self._symbols: dict[str, str] = {}
        self._reset()

    def _reset(self) -> None:
        self._frames: list[bytes] = []
        self._received: list[int] = []
        self._bytes = 0
        self._total = 0
        self._count = 0
        self._since: float | None = None
        self._chunks: list[Batch] = []

    def __len__(self) -> int:
        """Frames waiting for the next flush."""
        return self._count

    def add(self, data: bytes, received: int) -> None:
        """Take one frame, received at `received` (epoch ms)."""
        self.add_many(((received, data),))

    def add_many(self, frames: Sequence[tuple[int, bytes]]) -> None:
        """Take several frames (receipt time, data) at once, as a replay hands them over."""
        if not frames:
            return
        if self._since is None:
            self._since = self._clock()
        self._received += [f[0] for f in frames]
        data = [f[1] for f in frames]
        self._frames += data
        self._bytes += sum(map(len, data))
        self._count += len(frames)
        if self._bytes >= CHUNK_BYTES:
            # Columns are built a cache-sized chunk at a time; the bars work on the whole batch.
            self._chunks.append(self._columns())

    def due(self) -> bool:
        if self._total + self._bytes >= self.max_events * BYTES_PER_EVENT:
            return True
        return self._since is not None and self._clock() - self._since >= self.max_age

    def _symbol_column(self, pairs: list[str]) -> pl.Series:
        """Feed pairs mapped to REST symbols, the mapping done once per distinct pair."""
        series = pl.Series("symbol", pairs, dtype=pl.String)
        known = self._symbols
        for pair in series.unique().to_list():
            if pair not in known:
                known[pair] = from_pair(pair)
        return series.replace_strict(known, return_dtype=pl.String)

    def flush(self) -> Batch:
        """Everything added since the last flush, as one batch."""
        chunks = [*self._chunks, self._columns()]
        self._reset()
        if len(chunks) == 1:
            return chunks[0]
        return Batch(
            pl.concat([c.trades for c in chunks]),
            pl.concat([c.quotes for c in chunks]),
            pl.concat([c.aggregates for c in chunks]),
            [b for c in chunks for b in c.books],
            max(c.received for c in chunks),
        )

    def _columns(self) -> Batch:
        # A chunk makes tens of thousands of short-lived objects that reference counting frees;
        # letting the cyclic collector scan them as they pile up costs about 15 %.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._build()
        finally:
            if enabled:
                gc.enable()

    def _build(self) -> Batch:
        decoded = self.decoder.decode_many(self._frames)
        events = list(chain.from_iterable(decoded))
        received = list(chain.from_iterable(map(repeat, self._received, map(len, decoded))))
        last = max(self._received, default=0)
        self._total += self._bytes
        self._frames, self._received, self._bytes = [], [], 0
        # Trades are most of the stream: split them off with C-level loops.
        is_trade = [type(e) is Trade for e in events]
        tr: list[Trade] = list(compress(events, is_trade))  # type: ignore[arg-type]
        tr_received = list(compress(received, is_trade))
        qu: list[Quote] = []
        qu_received: list[int] = []
        ag: list[Aggregate] = []
        ag_received: list[int] = []
        books: list[tuple[str, Book]] = []
        if len(tr) < len(events):
            for ev, at in compress(zip(events, received, strict=True), map(not_, is_trade)):
                if isinstance(ev, Quote):
                    qu.append(ev)
                    qu_received.append(at)
                elif isinstance(ev, Aggregate):
                    ag.append(ev)
                    ag_received.append(at)
                elif isinstance(ev, Book):
                    books.append((from_pair(ev.pair), ev))
        trades = pl.DataFrame(
            {
                "symbol": self._symbol_column([t.pair for t in tr]),
                "time": [t.time for t in tr],
                "price": [t.price for t in tr],
                "size": [t.size for t in tr],
                "side": [2 if 2 in t.conditions else (1 if 1 in t.conditions else 0) for t in tr],
                "exchange": [t.exchange for t in tr],
                # the feed sends string ids, but an integer one is kept too, as text
                "trade_id": pl.Series([t.id for t in tr], dtype=pl.String, strict=False),
                "received": tr_received,
            },
            schema=TRADE_SCHEMA,
        )
        quotes = pl.DataFrame(
            {
                "symbol": self._symbol_column([q.pair for q in qu]),
                "time": [q.time for q in qu],
                "bid": [q.bid for q in qu],
                "bid_size": [q.bid_size for q in qu],
                "ask": [q.ask for q in qu],
                "ask_size": [q.ask_size for q in qu],
                "exchange": [q.exchange for q in qu],
                "received": qu_received,
            },
            schema=QUOTE_SCHEMA,
        )
        aggregates = pl.DataFrame(
            {
                "symbol": self._symbol_column([a.pair for a in ag]),
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
                "received": ag_received,
            },
            schema=AGG_SCHEMA,
        )
        return Batch(trades, quotes, aggregates, books, last)
