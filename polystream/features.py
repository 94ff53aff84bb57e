"""Order-flow and book features, on the pipeline thread: quote, trade and bar DataFrames in →
DataFrames or polars expressions out; `XL2` snapshots in → `BookFeatures` or one row per snapshot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import pairwise

import msgspec
import polars as pl

from .errors import SymbolError
from .events import Book
from .schema import SIDE_BUY, SIDE_SELL
from .symbols import from_pair

CLUSTER_RELATIVE_WIDTH = 0.0005
"""Narrowest support/resistance cluster, as a fraction of the mid (5 bp)."""

# Prices one tick apart must not merge because their difference came out a hair under the tick.
_SPAN_TOLERANCE = 1e-9

_BOOK_SCHEMA = pl.Schema({"_book": pl.UInt32(), "symbol": pl.String(), "time": pl.Int64()})
_LEVEL_SCHEMA = pl.Schema({"_book": pl.UInt32(), "price": pl.Float64(), "size": pl.Float64()})

Level = tuple[float, float]


def _imbalance(first: pl.Expr, second: pl.Expr) -> pl.Expr:
    """(first − second) / (first + second); null unless both are ≥ 0 with a finite, positive sum."""
    total = first + second
    # NaN compares greater than any number in polars, so finiteness is what rejects it.
    usable = (first >= 0) & (second >= 0) & (total > 0) & total.is_finite()
    return pl.when(usable).then((first - second) / total)


def _quoted(price: pl.Expr) -> pl.Expr:
    # The feed may send price 0 for a side with nothing quoted (POLYGON.md §3.2).
    return price.is_finite() & (price > 0)


def quote_features(quotes: pl.DataFrame) -> pl.DataFrame:
    """Add `spread`, `mid` and top-of-book `imbalance` to `XQ` rows.

    Input: `symbol`, `time`, `bid`, `bid_size`, `ask`, `ask_size`. `imbalance` is
    (bid_size − ask_size) / (bid_size + ask_size), in [−1, 1]. All three are null on a row where
    either side is unquoted (price 0, negative or missing); `imbalance` is also null when both
    sizes are 0. A crossed quote keeps its negative spread: that is what the venue showed.
    """
    bid = pl.col("bid").cast(pl.Float64)
    ask = pl.col("ask").cast(pl.Float64)
    two_sided = _quoted(bid) & _quoted(ask)
    return quotes.with_columns(
        pl.when(two_sided).then(ask - bid).alias("spread"),
        pl.when(two_sided).then((bid + ask) / 2).alias("mid"),
        pl.when(two_sided)
        .then(_imbalance(pl.col("bid_size").cast(pl.Float64), pl.col("ask_size").cast(pl.Float64)))
        .alias("imbalance"),
    )


def latest_quote_features(quotes: pl.DataFrame) -> pl.DataFrame:
    """The latest quote per symbol with its features, one row per symbol sorted by symbol.

    Latest means the greatest `time`; among rows with equal times the one later in the input wins.
    """
    latest = (
        quotes.sort("symbol", "time", maintain_order=True)
        .unique(subset="symbol", keep="last", maintain_order=True)
        .sort("symbol")
    )
    return quote_features(latest)


def flow_imbalance_expr(buy: str = "buy_volume", sell: str = "sell_volume") -> pl.Expr:
    """`(buy − sell) / (buy + sell)` as `flow_imbalance`; null when both volumes are 0."""
    return _imbalance(pl.col(buy), pl.col(sell)).alias("flow_imbalance")


def trade_flow(trades: pl.DataFrame, window_ms: int) -> pl.DataFrame:
    """Buy and sell volume and their imbalance per symbol over the recent `window_ms` of trades.

    Input: `symbol`, `time`, `size`, `side` (1 sell, 2 buy, 0 unknown). The window is event time,
    (latest − window_ms, latest] where latest is that symbol's newest trade, so the answer does not
    depend on the wall clock. Output: `symbol`, `time` (that latest trade time), `buy_volume`,
    `sell_volume`, `flow_imbalance`, sorted by symbol. Trades of unknown side count in neither.
    """
    if window_ms <= 0:
        raise ValueError(f"window_ms must be positive, got {window_ms}")
    size = pl.col("size").cast(pl.Float64)
    latest = pl.col("time").max().over("symbol")
    return (
        trades.lazy()
        .filter(pl.col("time") > latest - window_ms)
        .group_by("symbol")
        .agg(
            pl.col("time").max(),
            size.filter(pl.col("side") == SIDE_BUY).sum().alias("buy_volume"),
            size.filter(pl.col("side") == SIDE_SELL).sum().alias("sell_volume"),
        )
        .with_columns(flow_imbalance_expr())
        .sort("symbol")
        .collect()
    )


class BookFeatures(msgspec.Struct, frozen=True):
    """Depth and support/resistance for one `XL2` snapshot.

    `supports`/`resistances` are cluster prices, heaviest first, with their total sizes at the
    same index of `support_sizes`/`resistance_sizes`. `mid` is None unless both sides have levels.
    """

    symbol: str
    time: int
    mid: float | None
    bid_depth: float
    ask_depth: float
    depth_imbalance: float | None
    supports: list[float]
    support_sizes: list[float]
    resistances: list[float]
    resistance_sizes: list[float]


def _check(levels: int, clusters: int = 0) -> None:
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    if clusters < 0:
        raise ValueError(f"clusters must not be negative, got {clusters}")


def _clean(side: Iterable[Level], highest_first: bool) -> list[Level]:
    """Usable levels of one side, best first; repeated prices are merged."""
    sizes: dict[float, float] = {}
    for price, size in side:
        if math.isfinite(price) and math.isfinite(size) and price > 0 and size > 0:
            sizes[price] = sizes.get(price, 0.0) + size
    return sorted(sizes.items(), reverse=highest_first)


def _smallest_gap(side: list[Level]) -> float:
    gaps = [abs(a[0] - b[0]) for a, b in pairwise(side)]
    return min(gaps, default=0.0)


def _clusters(side: list[Level], width: float, count: int) -> list[Level]:
    """Up to `count` (size-weighted price, total size) clusters of `side`, heaviest first.

    `side` is best first. A cluster is a run of consecutive unclaimed levels spanning less than
    `width`; the heaviest run is claimed, then the next heaviest among the rest, and so on. Ties
    go to the run nearer the top of the book.
    """
    n = len(side)
    size_sums = [0.0]
    notional_sums = [0.0]
    for price, size in side:
        size_sums.append(size_sums[-1] + size)
        notional_sums.append(notional_sums[-1] + price * size)
    limit = width * (1 - _SPAN_TOLERANCE)
    claimed = [False] * n
    found: list[Level] = []
    while len(found) < count:
        best: tuple[float, int, int] | None = None
        end = 0
        for start in range(n):
            if claimed[start]:
                continue
            end = max(end, start + 1)
            # Prices are monotonic, so the end of the window only ever moves outward.
            while end < n and not claimed[end] and abs(side[end][0] - side[start][0]) < limit:
                end += 1
            total = size_sums[end] - size_sums[start]
            if best is None or total > best[0]:
                best = (total, start, end)
        if best is None:
            break
        total, start, end = best
        for i in range(start, end):
            claimed[i] = True
        found.append(((notional_sums[end] - notional_sums[start]) / total, total))
    return found


def _depth_imbalance(bid_depth: float, ask_depth: float) -> float | None:
    total = bid_depth + ask_depth
    return (bid_depth - ask_depth) / total if total > 0 else None


def book_features(
    symbol: str,
    time: int,
    bids: Sequence[Level],
    asks: Sequence[Level],
    levels: int = 10,
    clusters: int = 3,
) -> BookFeatures:
    """Depth imbalance over the best `levels` levels, and support/resistance clusters.

    The book is cleaned first: levels with a non-positive or non-finite price or size are dropped,
    repeated prices merged, bids sorted high to low and asks low to high, so unsorted input is fine.

    `bid_depth`/`ask_depth` sum the sizes of the best `levels` levels of each side;
    `depth_imbalance` = (bid_depth − ask_depth) / (bid_depth + ask_depth), None for an empty book.

    Clusters use every level in the snapshot, not only the best `levels`, since walls often rest
    deeper. Width w = max(tick, mid × CLUSTER_RELATIVE_WIDTH), where tick is the smallest gap
    between adjacent price levels on either side (the mid is the best price of the only side
    present in a one-sided book). A cluster is a run of adjacent levels whose prices span less than
    w. The heaviest run (by total size) is taken first, its levels are removed, and the search
    repeats, so clusters never share a level and a wall is never cut in two by a fixed grid. Each
    cluster is reported at its size-weighted average price, heaviest first, ties nearer the mid
    first. Supports come from bids strictly below the mid, resistances from asks strictly above,
    so the crossed part of a crossed book supports nothing.
    """
    _check(levels, clusters)
    clean_bids = _clean(bids, highest_first=True)
    clean_asks = _clean(asks, highest_first=False)
    bid_depth = sum((size for _, size in clean_bids[:levels]), 0.0)
    ask_depth = sum((size for _, size in clean_asks[:levels]), 0.0)

    mid: float | None = None
    if clean_bids and clean_asks:
        mid = (clean_bids[0][0] + clean_asks[0][0]) / 2
        below = [level for level in clean_bids if level[0] < mid]
        above = [level for level in clean_asks if level[0] > mid]
        reference = mid
    else:
        below, above = clean_bids, clean_asks
        reference = (clean_bids or clean_asks or [(0.0, 0.0)])[0][0]
    gaps = (_smallest_gap(clean_bids), _smallest_gap(clean_asks))
    tick = min((gap for gap in gaps if gap > 0), default=0.0)
    width = max(tick, reference * CLUSTER_RELATIVE_WIDTH)
    supports = _clusters(below, width, clusters)
    resistances = _clusters(above, width, clusters)
    return BookFeatures(
        symbol=symbol,
        time=time,
        mid=mid,
        bid_depth=bid_depth,
        ask_depth=ask_depth,
        depth_imbalance=_depth_imbalance(bid_depth, ask_depth),
        supports=[price for price, _ in supports],
        support_sizes=[size for _, size in supports],
        resistances=[price for price, _ in resistances],
        resistance_sizes=[size for _, size in resistances],
    )


def _symbol(pair: str) -> str:
    try:
        return from_pair(pair)
    except SymbolError:
        # A feature row must not cost the batch; the pair as sent still identifies the book.
        return pair


def _side_depth(books: Sequence[Book], bids: bool, levels: int) -> pl.LazyFrame:
    """`_book` → summed size of that book's best `levels` levels on one side."""
    sides = [book.bids if bids else book.asks for book in books]
    # Flat columns: polars builds a nested list column from Python objects far more slowly.
    counts = pl.Series("n", [len(side) for side in sides], dtype=pl.UInt32)
    index = pl.int_range(len(sides), dtype=pl.UInt32, eager=True).repeat_by(counts).explode()
    levels_frame = pl.DataFrame(
        {
            "_book": index.drop_nulls(),
            "price": [price for side in sides for price, _ in side],
            "size": [size for side in sides for _, size in side],
        },
        schema=_LEVEL_SCHEMA,
    )
    price, size = pl.col("price"), pl.col("size")
    best = size.top_k_by(price, levels) if bids else size.bottom_k_by(price, levels)
    return (
        levels_frame.lazy()
        .filter(_quoted(price) & _quoted(size))
        .group_by("_book", "price")
        .agg(size.sum())
        .group_by("_book")
        .agg(best.sum().alias("bid_depth" if bids else "ask_depth"))
    )


def book_frame(books: Sequence[Book], levels: int = 10) -> pl.DataFrame:
    """One row per snapshot, in input order: `symbol`, `time`, `depth_imbalance`, `bid_depth`,
    `ask_depth`, with the same cleaning and definitions as `book_features`.
    """
    _check(levels)
    frame = pl.DataFrame(
        {
            "_book": range(len(books)),
            "symbol": [_symbol(book.pair) for book in books],
            "time": [book.time for book in books],
        },
        schema=_BOOK_SCHEMA,
    )
    bid_depth, ask_depth = pl.col("bid_depth"), pl.col("ask_depth")
    return (
        frame.lazy()
        .join(_side_depth(books, True, levels), on="_book", how="left")
        .join(_side_depth(books, False, levels), on="_book", how="left")
        .with_columns(bid_depth.fill_null(0.0), ask_depth.fill_null(0.0))
        .select(
            "_book",
            "symbol",
            "time",
            _imbalance(bid_depth, ask_depth).alias("depth_imbalance"),
            bid_depth,
            ask_depth,
        )
        .sort("_book")
        .drop("_book")
        .collect()
    )
