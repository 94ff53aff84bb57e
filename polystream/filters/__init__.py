"""User-written filters (DESIGN §5): YAML files whose `when` expression is compiled once into
polars and evaluated per micro-batch, producing alerts.

    f = read_filter(Path("filters/rsi-oversold.yaml"))
    engine = FilterEngine([f], timeframes=(60_000,))
    alerts = engine.on_bars(bar_records)
"""

from ..schema import Alert
from .directory import (
    Event,
    FilterWatcher,
    add_filter,
    filter_files,
    find_filter,
    load_directory,
    read_last_fired,
    shipped_dir,
    write_last_fired,
)
from .engine import FilterEngine, run_on_bars
from .lang import FUNCTIONS, Problem, compile_expression, parse
from .spec import Filter, FilterError, Located, filter_from_options, parse_filter, read_filter

__all__ = [
    "FUNCTIONS",
    "Alert",
    "Event",
    "Filter",
    "FilterEngine",
    "FilterError",
    "FilterWatcher",
    "Located",
    "Problem",
    "add_filter",
    "compile_expression",
    "filter_files",
    "filter_from_options",
    "find_filter",
    "load_directory",
    "parse",
    "parse_filter",
    "read_filter",
    "read_last_fired",
    "run_on_bars",
    "shipped_dir",
    "write_last_fired",
]
