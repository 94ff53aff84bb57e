"""Frames → columns, on the pipeline thread: the only place where per-event data becomes columnar.

`Batcher.build(frames)` decodes the frames of one pass and returns a `Batch`: polars DataFrames
of the watched symbols' trades, quotes and aggregates (schemas from `schema`), in arrival order,
and their book snapshots. Events of other symbols are counted and dropped; events whose pair names
no symbol, and trades and quotes with a number outside its range (`events.MAX_*`), are rejected
through the decoder, which counts them and logs the first few.
"""

from __future__ import annotations

import collections
import contextlib
import gc
from collections.abc import Iterable, Sequence
from itertools import chain, compress, repeat
from operator import is_, not_
from typing import Any, Protocol, TypeVar

import msgspec
import polars as pl

from .decode import Decoder, channel_of
from .errors import SymbolError
from .events import (
    MAX_EXCHANGE,
    MAX_NOTIONAL,
    MAX_PRICE,
    MAX_SIZE,
    MAX_TIME,
    Aggregate,
    Book,
    Quote,
    SecondAggregate,
    Trade,
)
from .schema import AGGREGATE, QUOTE, SIDE_BUY, SIDE_SELL, TRADE, Schema, empty, trade_side
from .source import Frame
from .symbols import from_pair

# Frames are decoded and turned into columns this many bytes at a time, so that the objects of
# one chunk are still in the CPU's caches when their columns are built.
CHUNK_BYTES = 500_000
_SIDES = (SIDE_SELL, SIDE_BUY)
# A feed sending endless made-up pairs stays bounded: beyond this many, a new pair is looked up
# each time, and one that names no symbol is counted as another symbol's.
MAX_PAIRS = 100_000

_Ranges = tuple[tuple[str, float, float], ...]
# Ranges of the columns whose events msgspec does not check (see `events.Trade`). Columns are
# built leniently, so an integer beyond its dtype is already null there.
_TRADE_RANGES: _Ranges = (
    ("time", 0, MAX_TIME),
    ("exchange", 0, MAX_EXCHANGE),
    ("price", 0, MAX_PRICE),
    ("size", 0, MAX_SIZE),
)
_QUOTE_RANGES: _Ranges = (
    ("time", 0, MAX_TIME),
    ("exchange", 0, MAX_EXCHANGE),
    ("bid", 0, MAX_PRICE),
    ("bid_size", 0, MAX_SIZE),
    ("ask", 0, MAX_PRICE),
    ("ask_size", 0, MAX_SIZE),
)


class _Paired(Protocol):
    @property
    def pair(self) -> str: ...


_E = TypeVar("_E", bound=_Paired)


class Batch(msgspec.Struct):
    """Columnar events of one pass, each kind in arrival order."""

    trades: pl.DataFrame
    quotes: pl.DataFrame
    aggregates: pl.DataFrame
    books: list[tuple[str, Book]]
    received: int  # receipt time of the last frame (epoch ms)
    other: int = 0  # events of symbols nobody watches, dropped

    @property
    def size(self) -> int:
        return self.trades.height + self.quotes.height + self.aggregates.height + len(self.books)


# The kinds of events `Batcher` sorts into trades, quotes, aggregates and books.
_SORTED = frozenset((Trade, Quote, Aggregate, SecondAggregate, Book))

# Shared, never changed in place: a pass without quotes costs no frame construction.
_NO_TRADES, _NO_QUOTES, _NO_AGGREGATES = empty(TRADE), empty(QUOTE), empty(AGGREGATE)


def empty_batch(received: int = 0) -> Batch:
    return Batch(_NO_TRADES, _NO_QUOTES, _NO_AGGREGATES, [], received)


def _frame(schema: Schema, columns: dict[str, list[Any]]) -> pl.DataFrame:
    # a Series per column costs about half what polars' dict construction does on a small pass
    return pl.DataFrame(
        [pl.Series(c, columns[c], dtype=t, strict=False) for c, t in schema.items()]
    )


def _in_range(frame: pl.DataFrame, ranges: _Ranges, notional: bool) -> bool:
    """Whether every row is within `ranges` (and, with `notional`, price × size within
    `MAX_NOTIONAL`): a few calls per column, whatever the number of rows."""
    for name, low, high in ranges:
        column = frame.get_column(name)
        if column.null_count() or column.min() < low or column.max() > high:  # type: ignore[operator]
            return False
    if notional:
        largest = (frame.get_column("price") * frame.get_column("size")).max()
        return bool(largest <= MAX_NOTIONAL)  # type: ignore[operator]
    return True


def _out_of_range(frame: pl.DataFrame, ranges: _Ranges, notional: bool) -> tuple[pl.Series, str]:
    """Which rows break `ranges` (or the notional bound), and what they break."""
    checks = {
        f"{name} outside [{low:g}, {high:g}]": pl.col(name).is_between(low, high)
        for name, low, high in ranges
    }
    if notional:
        checks[f"price × size above {MAX_NOTIONAL:g}"] = (
            pl.col("price") * pl.col("size") <= MAX_NOTIONAL
        )
    passed = frame.select(check.fill_null(False).alias(why) for why, check in checks.items())
    broken = "; ".join(column.name for column in passed.iter_columns() if not column.all())
    return passed.select(~pl.all_horizontal(pl.all())).to_series(), broken


class Batcher:
    """Builds `Batch`es for `symbols` (REST form; None: every symbol the feed sends)."""

    def __init__(self, symbols: Iterable[str] | None = None, decoder: Decoder | None = None):
        self.decoder = decoder or Decoder()
        self._watched = None if symbols is None else frozenset(symbols)
        self._symbols: dict[str, str | None] = {}  # feed pair → watched symbol, or None
        self._invalid: set[str] = set()  # feed pairs that name no symbol at all

    def build(self, frames: Sequence[Frame]) -> Batch:
        """The events of `frames`, as columns."""
        if not frames:
            return empty_batch()
        chunks: list[Batch] = []
        start = size = 0
        for i, frame in enumerate(frames):
            size += len(frame.data)
            if size >= CHUNK_BYTES:
                chunks.append(self._chunk(frames[start : i + 1]))
                start, size = i + 1, 0
        if start < len(frames):
            chunks.append(self._chunk(frames[start:]))
        if len(chunks) == 1:
            return chunks[0]
        # one contiguous column each: polars works on many small chunks far slower
        return Batch(
            pl.concat([c.trades for c in chunks], rechunk=True),
            pl.concat([c.quotes for c in chunks], rechunk=True),
            pl.concat([c.aggregates for c in chunks], rechunk=True),
            [b for c in chunks for b in c.books],
            chunks[-1].received,
            sum(c.other for c in chunks),
        )

    def seen(self) -> tuple[list[str], list[str]]:
        """The watched symbols that had events so far, and the other symbols that did."""
        watched, other = [], []
        for pair, symbol in self._symbols.items():
            if symbol is not None:
                watched.append(symbol)
            elif pair not in self._invalid:
                with contextlib.suppress(SymbolError):
                    other.append(from_pair(pair))
        return sorted(set(watched)), sorted(set(other))

    def symbol(self, pair: str) -> str | None:
        """The watched symbol of a feed pair (`BTC-USD` → `X:BTCUSD`), or None."""
        try:
            return self._symbols[pair]
        except KeyError:
            pass
        try:
            symbol: str | None = from_pair(pair)
        except SymbolError:
            symbol = None
            if len(self._invalid) < MAX_PAIRS:
                self._invalid.add(pair)
        if self._watched is not None and symbol not in self._watched:
            symbol = None
        if len(self._symbols) < MAX_PAIRS:
            self._symbols[pair] = symbol
        return symbol

    def _chunk(self, frames: Sequence[Frame]) -> Batch:
        # A chunk makes tens of thousands of short-lived objects that reference counting frees;
        # letting the cyclic collector scan them as they pile up costs about 15 %.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._columns(frames)
        finally:
            if enabled:
                gc.enable()

    def _columns(self, frames: Sequence[Frame]) -> Batch:
        decode = self.decoder.decode
        decoded = [decode(f.data) for f in frames]
        events = list(chain.from_iterable(decoded))
        counts = map(len, decoded)
        received = list(chain.from_iterable(map(repeat, [f.received for f in frames], counts)))
        kinds = list(map(type, events))
        is_trade = list(map(is_, kinds, repeat(Trade)))
        is_quote = list(map(is_, kinds, repeat(Quote)))
        tr: list[Trade] = list(compress(events, is_trade))  # type: ignore[arg-type]
        qu: list[Quote] = list(compress(events, is_quote))  # type: ignore[arg-type]
        ag: list[Aggregate] = []
        books: list[tuple[str, Book]] = []
        ag_received: list[int] = []
        other = 0
        count = self.decoder.count  # events per channel, from what is sorted out anyway
        count("XT", len(tr))
        count("XQ", len(qu))
        if len(tr) + len(qu) < len(events):
            n_books = 0
            for ev, at in zip(events, received, strict=True):
                if isinstance(ev, Aggregate):
                    ag.append(ev)
                    ag_received.append(at)
                elif isinstance(ev, Book):
                    n_books += 1
                    symbol = self.symbol(ev.pair)
                    if symbol is not None:
                        books.append((symbol, ev))
                    elif ev.pair in self._invalid:
                        self.decoder.reject("a pair that names no symbol", [ev])
                    else:
                        other += 1
            seconds = sum(map(is_, map(type, ag), repeat(SecondAggregate)))
            count("XA", len(ag) - seconds)
            count("XAS", seconds)
            count("XL2", n_books)
            if len(tr) + len(qu) + len(ag) + n_books < len(events):  # rare: FMV, status
                for kind, n in collections.Counter(kinds).items():
                    if kind not in _SORTED:
                        count(channel_of(kind), n)
        trades, n = self._trades(tr, list(compress(received, is_trade)))
        other += n
        quotes, n = self._quotes(qu, list(compress(received, is_quote)))
        other += n
        aggregates, n = self._aggregates(ag, ag_received)
        other += n
        return Batch(trades, quotes, aggregates, books, frames[-1].received, other)

    def _keep(
        self, events: list[_E], received: list[int]
    ) -> tuple[list[_E], list[str], list[int], int]:
        """The events of watched symbols, their symbols and receipt times, and how many events
        of other symbols were dropped; events whose pair names no symbol are rejected."""
        lookup = self._symbols.get
        symbols = [lookup(e.pair, "") for e in events]
        if "" in symbols:  # a pair seen for the first time
            symbols = [self.symbol(e.pair) for e in events]
        if None not in symbols:
            return events, symbols, received, 0  # type: ignore[return-value]
        keep = [s is not None for s in symbols]
        kept = list(compress(events, keep))
        dropped = len(events) - len(kept)
        if self._invalid:
            invalid = self._invalid
            bad = [e for e in compress(events, map(not_, keep)) if e.pair in invalid]
            if bad:
                self.decoder.reject("a pair that names no symbol", bad)
                dropped -= len(bad)
        return (
            kept,
            list(compress(symbols, keep)),  # type: ignore[arg-type]
            list(compress(received, keep)),
            dropped,
        )

    def _checked(
        self,
        frame: pl.DataFrame,
        events: Sequence[Trade | Quote],
        ranges: _Ranges,
        notional: bool = False,
    ) -> pl.DataFrame:
        """`frame` without the rows (made from `events`) that break `ranges` (or, with
        `notional`, the bound of price × size), which are rejected."""
        if not frame.height or _in_range(frame, ranges, notional):
            return frame
        bad, why = _out_of_range(frame, ranges, notional)
        self.decoder.reject(why, [events[i] for i in bad.arg_true()])
        return frame.filter(~bad)

    def _trades(self, tr: list[Trade], received: list[int]) -> tuple[pl.DataFrame, int]:
        if not tr:
            return _NO_TRADES, 0
        kept, symbols, received, dropped = self._keep(tr, received)
        conditions = [t.conditions for t in kept]
        frame = _frame(
            TRADE,
            {
                "symbol": symbols,
                "time": [t.time for t in kept],
                "price": [t.price for t in kept],
                "size": [t.size for t in kept],
                "side": [c[0] if c and c[0] in _SIDES else trade_side(c) for c in conditions],
                "exchange": [t.exchange for t in kept],
                "trade_id": [t.id for t in kept],
                "received": received,
            },
        )
        return self._checked(frame, kept, _TRADE_RANGES, notional=True), dropped

    def _quotes(self, qu: list[Quote], received: list[int]) -> tuple[pl.DataFrame, int]:
        if not qu:
            return _NO_QUOTES, 0
        kept, symbols, received, dropped = self._keep(qu, received)
        frame = _frame(
            QUOTE,
            {
                "symbol": symbols,
                "time": [q.time for q in kept],
                "bid": [q.bid for q in kept],
                "bid_size": [q.bid_size for q in kept],
                "ask": [q.ask for q in kept],
                "ask_size": [q.ask_size for q in kept],
                "exchange": [q.exchange for q in kept],
                "received": received,
            },
        )
        return self._checked(frame, kept, _QUOTE_RANGES), dropped

    def _aggregates(self, ag: list[Aggregate], received: list[int]) -> tuple[pl.DataFrame, int]:
        if not ag:
            return _NO_AGGREGATES, 0
        kept, symbols, received, dropped = self._keep(ag, received)
        frame = _frame(
            AGGREGATE,
            {
                "symbol": symbols,
                "ev": ["XAS" if type(a) is SecondAggregate else "XA" for a in kept],
                "start": [a.start for a in kept],
                "end": [a.end for a in kept],
                "open": [a.open for a in kept],
                "high": [a.high for a in kept],
                "low": [a.low for a in kept],
                "close": [a.close for a in kept],
                "volume": [a.volume for a in kept],
                "vwap": [a.vwap for a in kept],
                "avg_size": [a.avg_size for a in kept],
                "received": received,
            },
        )
        return frame, dropped
