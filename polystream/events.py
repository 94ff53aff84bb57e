"""Typed crypto feed events: msgspec Structs forming a tagged union on `ev`.

Field types follow what the feed really sends (POLYGON.md §3), not only its spec: a trade id may be
a string or an integer, volumes are fractional, optional fields may be missing, unknown fields are
ignored.
"""

from __future__ import annotations

from typing import TypeAlias

import msgspec
from msgspec import field

from .schema import trade_side


class Trade(msgspec.Struct, tag_field="ev", tag="XT", gc=False):
    """`XT`: one trade. `conditions` 1 = seller-initiated, 2 = buyer-initiated."""

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
    """`XQ`: top of book on one exchange."""

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
    open: float = field(name="o")
    high: float = field(name="h")
    low: float = field(name="l")
    close: float = field(name="c")
    volume: float = field(name="v")
    start: int = field(name="s")
    end: int = field(name="e")
    vwap: float | None = field(name="vw", default=None)
    avg_size: float | None = field(name="z", default=None)


class SecondAggregate(Aggregate, tag="XAS"):
    """`XAS`: per-second aggregate, same fields as `XA`."""


class Book(msgspec.Struct, tag_field="ev", tag="XL2", gc=False):
    """`XL2`: level-2 book snapshot (deprecated upstream), best levels first."""

    pair: str
    time: int = field(name="t")
    bids: list[tuple[float, float]] = field(name="b", default_factory=list)
    asks: list[tuple[float, float]] = field(name="a", default_factory=list)
    exchange: int = field(name="x", default=0)
    received: int | None = field(name="r", default=None)


class FairValue(msgspec.Struct, tag_field="ev", tag="FMV", gc=False):
    """`FMV`: fair market value (business feed); `sym` is `X:BTC-USD`, `time` is made ms."""

    sym: str
    fmv: float
    time: int = field(name="t")

    def __post_init__(self) -> None:
        # The spec says nanoseconds while its example is milliseconds: decide by magnitude.
        if self.time > 10**15:
            self.time //= 1_000_000


class Status(msgspec.Struct, tag_field="ev", tag="status", gc=False):
    """`status`: connection, auth, subscription and disconnect notices."""

    status: str
    message: str = ""


Event: TypeAlias = Trade | Quote | Aggregate | SecondAggregate | Book | FairValue | Status
MarketEvent: TypeAlias = Trade | Quote | Aggregate | SecondAggregate | Book | FairValue
EVENT_TYPES = ("XT", "XQ", "XA", "XAS", "XL2", "FMV", "status")
