"""polystream: a streaming analyzer for Polygon.io / Massive crypto market data."""

from .decode import Decoder
from .errors import PolystreamError
from .events import Aggregate, Book, Event, FairValue, Quote, SecondAggregate, Status, Trade
from .symbols import from_pair, normalize, to_pair

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "Book",
    "Decoder",
    "Event",
    "FairValue",
    "PolystreamError",
    "Quote",
    "SecondAggregate",
    "Status",
    "Trade",
    "__version__",
    "from_pair",
    "normalize",
    "to_pair",
]
