"""Symbol forms: the REST form `X:BTCUSD` users see, and the feed's pair `BTC-USD`.

`normalize` accepts `X:BTCUSD`, `BTC-USD`, `btcusd`, `btc/usd`; `to_pair` and `from_pair` convert;
each raises `SymbolError` for anything else.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .errors import SymbolError

# Longest first so that USDT/USDC win over USD when a pair is written without a separator.
QUOTE_CURRENCIES = (
    "USDT",
    "USDC",
    "BUSD",
    "TUSD",
    "DAI",
    "USD",
    "EUR",
    "GBP",
    "JPY",
    "AUD",
    "CAD",
    "CHF",
    "KRW",
    "TRY",
    "BRL",
    "BTC",
    "ETH",
)
_JOINED = re.compile(r"^(?:X:)?([A-Z0-9]{2,12})$")
_SPLIT = re.compile(r"^(?:X:)?([A-Z0-9]{1,12})[-/_]([A-Z0-9]{2,6})$")


@lru_cache(maxsize=4096)
def _split(symbol: str) -> tuple[str, str]:
    text = symbol.strip().upper()
    m = _SPLIT.match(text)
    if m:
        return m.group(1), m.group(2)
    m = _JOINED.match(text)
    if m:
        joined = m.group(1)
        for quote in QUOTE_CURRENCIES:
            if joined.endswith(quote) and len(joined) > len(quote):
                return joined[: -len(quote)], quote
    raise SymbolError(f"Unknown symbol form {symbol!r}: write it as X:BTCUSD, BTC-USD or btcusd.")


def normalize(symbol: str) -> str:
    """Return the REST form (`X:BTCUSD`) of any accepted spelling."""
    base, quote = _split(symbol)
    return f"X:{base}{quote}"


def to_pair(symbol: str) -> str:
    """Return the feed's pair (`BTC-USD`) for any accepted spelling."""
    base, quote = _split(symbol)
    return f"{base}-{quote}"


@lru_cache(maxsize=4096)
def from_pair(pair: str) -> str:
    """Map a feed pair (`BTC-USD`, or FMV's `X:BTC-USD`) to the REST form users see; a pair that
    names no symbol (`""`, `FOO`, `??`, `BTC-`) is a `SymbolError`, as any other spelling is."""
    return normalize(pair)
