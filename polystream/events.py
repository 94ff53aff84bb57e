"""Typed crypto feed events: msgspec Structs forming a tagged union on `ev`.

Field types follow what the feed really sends (POLYGON.md §3), not only its spec: a trade id may be
a string or an integer, volumes are fractional, optional fields may be missing, unknown fields are
ignored. Every number has a valid range (`MAX_TIME` … `MAX_AGGREGATE_TRADES`); a value outside it
makes the element malformed. Books, aggregates and fair values are checked as they decode; trades
and quotes, the bulk of the feed, where their columns are built (`batch`), in bulk.
"""

from __future__ import annotations

from typing import Annotated, TypeAlias

import msgspec
from msgspec import field

from .schema import trade_side

MAX_TIME = 253_402_300_799_999
"""Event times are epoch ms in [0, MAX_TIME]: up to 9999-12-31T23:59:59.999Z, the last instant
Python's datetime, strftime and PostgreSQL all represent."""
MAX_EXCHANGE = 32_767
"""Exchange ids are in [0, MAX_EXCHANGE], the range of the schema's Int16 column."""
MAX_PRICE = 1e15
"""Prices are in [0, MAX_PRICE]; 0 is a side with nothing quoted."""
MAX_SIZE = 1e15
"""Sizes and volumes are in [0, MAX_SIZE] base units, far above a minute's volume of even the
cheapest tokens."""
MAX_NOTIONAL = 1e18
"""price × size (an aggregate's vwap, or close, × volume) is at most MAX_NOTIONAL: bars keep
notionals as Int128 counts of 1e-12 units (at most 1.7e38), so even 1.7e8 trades of this notional
in one bar sum exactly."""
MAX_AGGREGATE_TRADES = 1e12
"""An aggregate's trade count (volume / average size) is at most this: bars sum it as Int64."""

Time = Annotated[int, msgspec.Meta(ge=0, le=MAX_TIME)]
Exchange = Annotated[int, msgspec.Meta(ge=0, le=MAX_EXCHANGE)]
Price = Annotated[float, msgspec.Meta(ge=0, le=MAX_PRICE)]
Size = Annotated[float, msgspec.Meta(ge=0, le=MAX_SIZE)]


class Trade(msgspec.Struct, tag_field="ev", tag="XT", gc=False):
    """`XT`: one trade. `conditions` 1 = seller-initiated, 2 = buyer-initiated.

    Its ranges are checked on its columns (`batch`): checked here, element by element, they
    would cost 7 % of the decoding rate. `conditions` only give the side and `received` is not
    used (the frame's receipt time is), so neither has a range.
    """

    # Fields follow the feed's key order, which lets msgspec match keys without a lookup.
    pair: str
    price: float = field(name="p")
    time: int = field(name="t")
    size: float = field(name="s")
    conditions: list[int] = field(name="c", default_factory=list)
    id: str | int | None = field(name="i", default=None)
    exchange: int = field(name="x", default=0)
    received: int | None = field(name="r", default=None)

    @property
    def side(self) -> int:
        """`schema.SIDE_BUY`, `SIDE_SELL` or `SIDE_UNKNOWN`, from the side condition."""
        return trade_side(self.conditions)

    @property
    def trade_id(self) -> str | None:
        """The trade id as a string whatever form the feed sent it in."""
        return None if self.id is None else str(self.id)


class Quote(msgspec.Struct, tag_field="ev", tag="XQ", gc=False):
    """`XQ`: top of book on one exchange; ranges checked like a trade's (`batch`)."""

    pair: str
    bid: float = field(name="bp")
    bid_size: float = field(name="bs")
    ask: float = field(name="ap")
    ask_size: float = field(name="as")
    time: int = field(name="t")
    exchange: int = field(name="x", default=0)
    received: int | None = field(name="r", default=None)


class Aggregate(msgspec.Struct, tag_field="ev", tag="XA", gc=False):
    """`XA`: per-minute aggregate; `start`/`end` in ms, `end` exclusive."""

    pair: str
    open: Price = field(name="o")
    high: Price = field(name="h")
    low: Price = field(name="l")
    close: Price = field(name="c")
    volume: Size = field(name="v")
    start: Time = field(name="s")
    end: Time = field(name="e")
    vwap: Price | None = field(name="vw", default=None)
    avg_size: Size | None = field(name="z", default=None)

    def __post_init__(self) -> None:
        # An aggregate is rare enough for one Python check of what the bars multiply and divide.
        price = self.close if self.vwap is None else self.vwap
        if price * self.volume > MAX_NOTIONAL:
            raise ValueError(f"price × volume above {MAX_NOTIONAL:g}")
        if self.avg_size and self.volume > self.avg_size * MAX_AGGREGATE_TRADES:
            raise ValueError(f"volume / average size above {MAX_AGGREGATE_TRADES:g}")


class SecondAggregate(Aggregate, tag="XAS"):
    """`XAS`: per-second aggregate, same fields as `XA`."""


class Book(msgspec.Struct, tag_field="ev", tag="XL2", gc=False):
    """`XL2`: level-2 book snapshot (deprecated upstream), best levels first."""

    pair: str
    time: Time = field(name="t")
    bids: list[tuple[Price, Size]] = field(name="b", default_factory=list)
    asks: list[tuple[Price, Size]] = field(name="a", default_factory=list)
    exchange: Exchange = field(name="x", default=0)
    received: Time | None = field(name="r", default=None)


class FairValue(msgspec.Struct, tag_field="ev", tag="FMV", gc=False):
    """`FMV`: fair market value (business feed); `sym` is `X:BTC-USD`, `time` is made ms."""

    sym: str
    fmv: Price
    time: int = field(name="t")

    def __post_init__(self) -> None:
        # The spec says nanoseconds while its example is milliseconds: decide by magnitude.
        if self.time > 10**15:
            self.time //= 1_000_000
        if not 0 <= self.time <= MAX_TIME:
            raise ValueError(f"time outside [0, {MAX_TIME}] ms")


class Status(msgspec.Struct, tag_field="ev", tag="status", gc=False):
    """`status`: connection, auth, subscription and disconnect notices."""

    status: str
    message: str = ""


Event: TypeAlias = Trade | Quote | Aggregate | SecondAggregate | Book | FairValue | Status
MarketEvent: TypeAlias = Trade | Quote | Aggregate | SecondAggregate | Book | FairValue
EVENT_TYPES = ("XT", "XQ", "XA", "XAS", "XL2", "FMV", "status")
