"""Every record polystream makes, shows or stores, defined once: the columns of trades, quotes,
aggregates, book snapshots, bars, alerts and gaps, the trade side, bar states and row kinds.

Decoding, bars, REST, storage, filters, analyze and the outputs import these; none spells out a
record's columns itself. Columns are polars dtypes; times are epoch milliseconds, UTC.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal, TypeAlias

import msgspec
import polars as pl
from polars._typing import PolarsDataType

if TYPE_CHECKING:
    from .events import Book

Schema: TypeAlias = dict[str, PolarsDataType]

BarState: TypeAlias = Literal["final", "revised", "partial"]
"""`final` once the watermark passes the bar's end plus the lateness, `revised` when a late
trade (or a gap repair) changes a final bar, `partial` for the open bars of a live run that
stops."""

RowKind: TypeAlias = Literal["bar", "trade", "quote"]
"""What a filter runs on."""

Severity: TypeAlias = Literal["info", "warning", "critical"]

# -- the trade side ---------------------------------------------------------------------------

SIDE_UNKNOWN = 0
SIDE_SELL = 1  # condition 1: seller-initiated
SIDE_BUY = 2  # condition 2: buyer-initiated


def trade_side(conditions: Iterable[object] | None) -> int:
    """A trade's side from its conditions: the first side condition listed (1 sell, 2 buy),
    else unknown (0). The feed's `c` and the REST API's `conditions` are read the same way."""
    if conditions is None or isinstance(conditions, str | bytes):
        return SIDE_UNKNOWN
    for c in conditions:
        if c in (SIDE_BUY, SIDE_SELL):
            return SIDE_BUY if c == SIDE_BUY else SIDE_SELL
    return SIDE_UNKNOWN


# -- market data --------------------------------------------------------------------------------

TRADE: Schema = {
    "symbol": pl.String,
    "time": pl.Int64,
    "price": pl.Float64,
    "size": pl.Float64,
    "side": pl.Int8,
    "exchange": pl.Int16,
    "trade_id": pl.String,
    "received": pl.Int64,
}
QUOTE: Schema = {
    "symbol": pl.String,
    "time": pl.Int64,
    "bid": pl.Float64,
    "bid_size": pl.Float64,
    "ask": pl.Float64,
    "ask_size": pl.Float64,
    "exchange": pl.Int16,
    "received": pl.Int64,
}
AGGREGATE: Schema = {
    "symbol": pl.String,
    "ev": pl.String,  # XA (minute) or XAS (second)
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
BOOK: Schema = {
    "symbol": pl.String,
    "time": pl.Int64,
    "exchange": pl.Int16,
    "bids": pl.String,  # [[price, size], …] best first, as JSON text
    "asks": pl.String,
}

# -- bars ---------------------------------------------------------------------------------------

PRICES = ("open", "high", "low", "close")
OHLCV = (*PRICES, "volume")
BAR: Schema = {
    "symbol": pl.String,
    "timeframe": pl.String,
    "start": pl.Int64,
    "end": pl.Int64,
    **dict.fromkeys(OHLCV, pl.Float64),
    "vwap": pl.Float64,
    "trades": pl.Int64,
    "buy_volume": pl.Float64,
    "sell_volume": pl.Float64,
    "state": pl.String,
}
"""A bar record's leading columns; the run's indicator columns follow `state`, then
`BAR_FEATURES`."""
BAR_FIELDS = tuple(c for c in BAR if BAR[c] != pl.String and c not in ("start", "end"))
"""The numbers of a bar a filter can name (open … sell_volume)."""
BAR_FEATURES: Schema = {"flow_imbalance": pl.Float64}


def bar_columns(indicators: Sequence[str]) -> list[str]:
    """Every column of a bar record, in the order of the JSON contract."""
    return [*BAR, *indicators, *BAR_FEATURES]


def bar_schema(indicators: Sequence[str]) -> Schema:
    return {**BAR, **dict.fromkeys(indicators, pl.Float64), **BAR_FEATURES}


# -- alerts, gaps, status -----------------------------------------------------------------------


class Alert(msgspec.Struct):
    """One firing of a filter; `record()` is its JSON line (DESIGN §1). `time` is the start of
    the bar it fired on, or the trade's or quote's own time."""

    filter: str
    symbol: str
    timeframe: str | None
    time: int
    severity: str
    message: str
    values: dict[str, float | None]
    notify: tuple[str, ...] = ()
    attach: str | None = None  # "chart": Telegram sends it with a chart of the bars around it

    def record(self) -> dict[str, object]:
        return {"type": "alert", **{c: getattr(self, c) for c in ALERT}}


ALERT: Schema = {
    "filter": pl.String,
    "symbol": pl.String,
    "timeframe": pl.String,
    "time": pl.Int64,
    "severity": pl.String,
    "message": pl.String,
    "values": pl.String,  # JSON text
}


class Gap(msgspec.Struct, frozen=True):
    """An outage of the feed for one symbol, in epoch ms: no data from `start` to `end`."""

    symbol: str
    start: int
    end: int


GAP: Schema = {"symbol": pl.String, "start": pl.Int64, "end": pl.Int64}


class Notice(msgspec.Struct, frozen=True):
    """A status record: `event` is one of the names in DESIGN §1 (or one added since)."""

    event: str
    time: int
    detail: str = ""


# -- rows ---------------------------------------------------------------------------------------


def empty(schema: Schema) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def alert_rows(alerts: Sequence[Alert]) -> pl.DataFrame:
    """Alerts as `ALERT` rows, their values as JSON text."""
    encode = msgspec.json.encode
    columns: dict[str, list[object]] = {c: [getattr(a, c) for a in alerts] for c in ALERT}
    columns["values"] = [encode(a.values).decode() for a in alerts]
    return pl.DataFrame(columns, schema=ALERT)


def gap_rows(gaps: Sequence[Gap]) -> pl.DataFrame:
    return pl.DataFrame({c: [getattr(g, c) for g in gaps] for c in GAP}, schema=GAP)


def book_rows(books: Sequence[tuple[str, Book]]) -> pl.DataFrame:
    """Book snapshots (symbol, snapshot) as `BOOK` rows, levels as JSON text."""
    encode = msgspec.json.encode
    return pl.DataFrame(
        {
            "symbol": [sym for sym, _ in books],
            "time": [b.time for _, b in books],
            "exchange": [b.exchange for _, b in books],
            "bids": [encode(b.bids).decode() for _, b in books],
            "asks": [encode(b.asks).decode() for _, b in books],
        },
        schema=BOOK,
    )
