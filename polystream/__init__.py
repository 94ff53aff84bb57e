"""polystream: a streaming analyzer for Polygon.io / Massive crypto market data.

Run the whole pipeline from code with `run(RunOptions(...))`, or `open_run` to add sinks of your
own (anything with the `Sink` methods; `BaseSink` has them all) before it starts.
"""

from .app import RunOptions, open_run, run
from .config import Settings, load_settings
from .decode import Decoder
from .errors import PolystreamError
from .events import Aggregate, Book, Event, FairValue, Quote, SecondAggregate, Status, Trade
from .pipeline import Pipeline, RunResult
from .schema import Alert, Notice
from .sinks import BaseSink, Output, Sink, View
from .stages import Stages
from .symbols import from_pair, normalize, to_pair
from .window import BarOptions

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "Alert",
    "BarOptions",
    "BaseSink",
    "Book",
    "Decoder",
    "Event",
    "FairValue",
    "Notice",
    "Output",
    "Pipeline",
    "PolystreamError",
    "Quote",
    "RunOptions",
    "RunResult",
    "SecondAggregate",
    "Settings",
    "Sink",
    "Stages",
    "Status",
    "Trade",
    "View",
    "__version__",
    "from_pair",
    "load_settings",
    "normalize",
    "open_run",
    "run",
    "to_pair",
]
