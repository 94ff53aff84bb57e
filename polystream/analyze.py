"""`polystream analyze`: an OHLCV bar file (CSV or Parquet) → validated bars → indicator columns.

`read_bars` returns time (epoch ms, bar start), open, high, low, close, volume in time order (with
a `symbol` column first, per symbol, when the file has one), or raises `AnalyzeError` naming the
file and the first row at fault; `analyze` adds the indicators, each symbol's on its own bars.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from .errors import PolystreamError, SymbolError
from .indicators import IndicatorParams, compute
from .schema import OHLCV, PRICES
from .symbols import normalize

BAR_COLUMNS = ("time", *OHLCV)
PRICE_COLUMNS = PRICES

# Header spellings per column, compared after lower-casing and turning spaces and dashes into
# underscores. `window_start` is the name in Polygon's flat files.
ALIASES: dict[str, tuple[str, ...]] = {
    "time": (
        "time",
        "timestamp",
        "date",
        "datetime",
        "t",
        "start",
        "open_time",
        "ts",
        "window_start",
    ),
    "open": ("open", "o"),
    "high": ("high", "h"),
    "low": ("low", "l"),
    "close": ("close", "c"),
    "volume": ("volume", "v", "vol", "base_volume"),
    "symbol": ("symbol", "ticker", "pair"),
}
# Columns a file may leave out.
OPTIONAL = ("volume", "symbol")

SUFFIXES = ".csv, .csv.gz, .parquet or .pq"

# A number's unit is decided by its magnitude: below 1e11 it is seconds, below 1e14
# milliseconds, below 1e17 microseconds, otherwise nanoseconds. Each unit is then unambiguous
# from 1973-03-03 to 5138-11-16; earlier millisecond times would be read as seconds.
_UNIT_BOUNDS = (1e11, 1e14, 1e17)
_UNIT_TO_MS = (1000.0, 1.0, 1e-3, 1e-6)
_ISO = len(_UNIT_TO_MS)
_FORMS = (
    "epoch seconds",
    "epoch milliseconds",
    "epoch microseconds",
    "epoch nanoseconds",
    "ISO 8601 text",
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_SEPARATORS = ",;\t|"


class AnalyzeError(PolystreamError):
    """A bar file cannot be read or written, or one of its rows is not a valid bar.

    Rows are data rows counted from 1 after the header, so row N of a CSV file is on line N + 1
    unless a quoted field spans lines.
    """


def read_bars(path: Path, symbol: str | None = None) -> pl.DataFrame:
    """The bars in `path` (.csv, .csv.gz, .parquet or .pq), checked, in time order.

    Columns: `time` (Int64 epoch milliseconds, bar start) and `open high low close volume`
    (Float64). Headers are matched case-insensitively against `ALIASES`; other columns are
    ignored; without a volume column `volume` is null. A file with a symbol column holds
    several symbols: `symbol` (String, `X:BTCUSD` form) comes first, rows are in symbol then
    time order, a time may repeat only for another symbol, and `symbol` (any accepted spelling)
    keeps only that symbol's bars (`AnalyzeError` naming the file's symbols if it has none);
    without a symbol column `symbol` is ignored. Times may be epoch seconds,
    milliseconds, microseconds or nanoseconds (told apart by magnitude, see `_UNIT_BOUNDS`),
    ISO 8601 text (without an offset it is UTC), or Parquet Date/Datetime values (naive is UTC).
    Blank lines are skipped. Raises `AnalyzeError` for the earliest row with a missing or
    non-numeric value, an unreadable time, a non-finite or non-positive price, a negative
    volume, high below low, open or close outside low..high, or a time already seen.
    """
    raw, numbers = _read_table(path)
    if raw.height == 0:
        raise AnalyzeError(f"{path} has no data rows.")
    names = _match_columns(raw.columns, path)

    columns: dict[str, pl.Series] = {}
    problems: list[_Problem] = []
    if "symbol" in names:
        columns["symbol"], problems = _symbols(raw[names["symbol"]], names["symbol"], path)
    time, found = _times(raw[names["time"]], names["time"], path)
    problems += found
    columns["time"] = time
    for role in BAR_COLUMNS[1:]:
        if role in names:
            values, found = _numbers(raw[names[role]], names[role], role, path)
            problems += found
        else:
            values = pl.Series(role, [None] * raw.height, dtype=pl.Float64)
        columns[role] = values
    bars = pl.DataFrame({role: series.alias(role) for role, series in columns.items()})
    problems += _inconsistent(bars)
    problems.append(_duplicates(bars))
    _raise_first(path, problems, numbers)
    if "symbol" not in bars.columns:
        return bars.sort("time", maintain_order=True)
    bars = bars.sort("symbol", "time", maintain_order=True)
    return bars if symbol is None else _pick(bars, symbol, path)


def analyze(
    path: Path, params: IndicatorParams | None = None, symbol: str | None = None
) -> pl.DataFrame:
    """The bars in `path` with every indicator column: `BAR_COLUMNS`, then `params.columns`.

    A file with a symbol column keeps it first, and each symbol's indicators come from its own
    bars; `symbol` keeps one of them (see `read_bars`), and is an error for a file without one.
    """
    p = params or IndicatorParams()
    bars = read_bars(path, symbol)
    if "symbol" not in bars.columns:
        if symbol is not None:
            raise AnalyzeError(
                f"{path} has no symbol column to pick {normalize(symbol)} from: "
                "all of its bars are of one symbol."
            )
        return compute(bars, p).select([*BAR_COLUMNS, *p.columns])
    parts = [compute(part, p) for part in bars.partition_by("symbol", maintain_order=True)]
    return pl.concat(parts).select(["symbol", *BAR_COLUMNS, *p.columns])


def file_symbols(bars: pl.DataFrame) -> list[str]:
    """The symbols of bars from `read_bars`, in their order there ([] without a symbol column)."""
    if "symbol" not in bars.columns:
        return []
    return [str(s) for s in bars["symbol"].unique(maintain_order=True).to_list()]


def _listed(items: list[str], limit: int = 20) -> str:
    if len(items) > limit:
        return ", ".join(items[:limit]) + f" and {len(items) - limit} more"
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]


def _pick(bars: pl.DataFrame, symbol: str, path: Path) -> pl.DataFrame:
    wanted = normalize(symbol)
    picked = bars.filter(pl.col("symbol") == wanted)
    if picked.height == 0:
        held = file_symbols(bars)
        raise AnalyzeError(f"{path} has no bars of {wanted}; it holds {_listed(held)}.")
    return picked


def write_output(frame: pl.DataFrame, out: Path) -> None:
    """Write `frame` as CSV (.csv, .csv.gz) or Parquet (.parquet, .pq), chosen by `out`'s suffix.

    Columns are written as they are, so `time` stays an integer of epoch milliseconds.
    """
    kind = _file_kind(out)
    if kind is None:
        raise AnalyzeError(f"Cannot write {out}: give it one of the suffixes {SUFFIXES}.")
    try:
        if kind == "parquet":
            frame.write_parquet(out)
        elif out.name.lower().endswith(".gz"):
            frame.write_csv(out, compression="gzip")
        else:
            frame.write_csv(out)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise AnalyzeError(f"Cannot write {out}: {_reason(exc)}.") from exc


# -- reading -----------------------------------------------------------------------------------


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    return None


def _read_table(path: Path) -> tuple[pl.DataFrame, pl.Series]:
    """Every cell of `path` as read (CSV as text) without blank lines, and each row's number."""
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError as exc:
        raise AnalyzeError(f"There is no file {path}.") from exc
    except IsADirectoryError as exc:
        raise AnalyzeError(f"{path} is a directory, not a file of bars.") from exc
    except OSError as exc:
        raise AnalyzeError(f"Cannot read {path}: {_reason(exc)}.") from exc
    kind = _file_kind(path)
    if kind is None:
        raise AnalyzeError(f"Cannot read {path}: its name must end in {SUFFIXES}.")
    table = _read_csv(path) if kind == "csv" else _read_parquet(path)
    rows = pl.Series("row", range(1, table.height + 1), dtype=pl.Int64)
    if kind == "parquet" or not table.columns:
        return table, rows
    # Polars turns a blank line into a row of nulls; it is dropped but still counted, so that
    # row N stays on line N + 1.
    empty = [pl.col(c).str.strip_chars().fill_null("") == "" for c in table.columns]
    keep = table.select(~functools.reduce(operator.and_, empty)).to_series()
    return table.filter(keep), rows.filter(keep)


def _read_csv(path: Path) -> pl.DataFrame:
    try:
        header = _first_line(path)
    except (OSError, EOFError) as exc:
        raise AnalyzeError(f"Cannot read {path}: {_reason(exc)}.") from exc
    if not header.strip():
        raise AnalyzeError(f"{path} is empty.")
    # A header names its columns with letters, so the most frequent candidate is the separator.
    separator = max(_SEPARATORS, key=header.count)
    try:
        return pl.read_csv(path, infer_schema=False, separator=separator, encoding="utf8-lossy")
    except pl.exceptions.NoDataError as exc:
        raise AnalyzeError(f"{path} is empty.") from exc
    except (OSError, EOFError, pl.exceptions.PolarsError) as exc:
        row = _ragged_row(path, separator)
        if row is not None:
            raise AnalyzeError(f"Row {row} of {path} has more fields than the header.") from exc
        raise AnalyzeError(f"Cannot read {path} as CSV: {_reason(exc)}.") from exc


def _read_parquet(path: Path) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise AnalyzeError(f"Cannot read {path} as Parquet: {_reason(exc)}.") from exc


@contextlib.contextmanager
def _lines(path: Path) -> Iterator[Iterator[str]]:
    """The lines of `path` (decompressed when it ends in .gz) as text, bad UTF-8 replaced."""
    with contextlib.ExitStack() as stack:
        raw: Iterable[bytes]
        if path.name.lower().endswith(".gz"):
            raw = stack.enter_context(gzip.GzipFile(path, "rb"))
        else:
            raw = stack.enter_context(path.open("rb"))
        yield (line.decode("utf-8", errors="replace") for line in raw)


def _first_line(path: Path) -> str:
    with _lines(path) as lines:
        return next(lines, "")


def _ragged_row(path: Path, separator: str) -> int | None:
    """The first data row with more fields than the header, counted as polars counts rows."""
    with contextlib.suppress(OSError, EOFError, csv.Error), _lines(path) as lines:
        rows = csv.reader(lines, delimiter=separator)
        width = len(next(rows, []))
        for number, row in enumerate(rows, start=1):
            if len(row) > width:
                return number
    return None


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message, as the end of a sentence."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    lines = text.strip().splitlines()
    reason = lines[0].strip().rstrip(".") if lines else type(exc).__name__
    return reason[:1].lower() + reason[1:]


def _normalize(name: str) -> str:
    return name.strip().lstrip("\ufeff").strip().lower().replace(" ", "_").replace("-", "_")


def _match_columns(names: list[str], path: Path) -> dict[str, str]:
    """For each bar column, the header that spells it; every one but volume must be present."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for role, spellings in ALIASES.items():
        matches = [n for n in names if _normalize(n) in spellings]
        if len(matches) > 1:
            both = " and ".join(repr(m) for m in matches)
            raise AnalyzeError(f"{path} has {both} as {role} columns; keep only one of them.")
        if matches:
            found[role] = matches[0]
        elif role not in OPTIONAL:
            missing.append(role)
    if missing:
        lacks = ", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0]
        plural = "s" if len(missing) > 1 else ""
        accepted = ", ".join("|".join(ALIASES[role]) for role in missing)
        present = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
        raise AnalyzeError(
            f"{path} lacks the {lacks} column{plural} (it has {present}; "
            f"accepted names in any case: {accepted})."
        )
    return found


# -- checking ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    """Rows with one kind of fault, and how to describe it for row i (0-based) after `Row N`."""

    rows: pl.Series
    describe: Callable[[int, pl.Series], str]


def _raise_first(path: Path, problems: list[_Problem], numbers: pl.Series) -> None:
    """Raise for the earliest faulty row; a tie goes to the problem listed first."""
    first: tuple[int, _Problem] | None = None
    for problem in problems:
        hits = problem.rows.fill_null(False).arg_true()
        if len(hits) and (first is None or hits[0] < first[0]):
            first = (int(hits[0]), problem)
    if first is None:
        return
    index, problem = first
    faulty = functools.reduce(operator.or_, (p.rows.fill_null(False) for p in problems))
    others = int(faulty.sum()) - 1
    more = ""
    if others == 1:
        more = " (1 more row has problems too)"
    elif others > 1:
        more = f" ({others} more rows have problems too)"
    raise AnalyzeError(f"Row {numbers[index]} of {path} {problem.describe(index, numbers)}{more}.")


def _show(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _num(value: float) -> str:
    # The shortest round-trip form, so two different values never print alike.
    return repr(float(value))


def _blank(series: pl.Series) -> pl.Series:
    if series.dtype == pl.String:
        return series.is_null() | (series == "")
    return series.is_null()


def _numbers(raw: pl.Series, name: str, role: str, path: Path) -> tuple[pl.Series, list[_Problem]]:
    """Float64 values of a price or volume column, and the rows at fault."""
    if raw.dtype == pl.String:
        text = raw.str.strip_chars()
        values = text.cast(pl.Float64, strict=False)
    elif raw.dtype.is_numeric() or raw.dtype == pl.Null:
        text = raw.cast(pl.String)
        values = raw.cast(pl.Float64, strict=False)
    else:
        raise AnalyzeError(f"Column {name!r} of {path} holds {raw.dtype} values, not numbers.")
    blank = _blank(text)
    problems = [
        _Problem(
            ~blank & values.is_null(),
            lambda i, _: f"has {_show(text[i])} in column {name!r}, which is not a number",
        ),
        _Problem(
            values.is_nan() | values.is_infinite(),
            lambda i, _: f"has {_num(values[i])} in column {name!r}, which is not a finite number",
        ),
    ]
    if role == "volume":
        problems.append(
            _Problem(values < 0, lambda i, _: f"has the negative volume {_num(values[i])}")
        )
        return values, problems
    return values, [
        _Problem(blank, lambda i, _: f"has no value in column {name!r}"),
        *problems,
        _Problem(
            values <= 0,
            lambda i, _: f"has {_num(values[i])} in column {name!r}, but prices must be above zero",
        ),
    ]


def _times(raw: pl.Series, name: str, path: Path) -> tuple[pl.Series, list[_Problem]]:
    """Epoch milliseconds of a time column, and the rows at fault."""
    n = len(raw)
    if raw.dtype == pl.Date:
        raw = raw.cast(pl.Datetime("ms"))
    if isinstance(raw.dtype, pl.Datetime):
        ms = raw.dt.epoch("ms").cast(pl.Int64)
        return ms, [_Problem(ms.is_null(), lambda i, _: f"has no time in column {name!r}")]
    if raw.dtype == pl.String:
        text = raw.str.strip_chars()
        ints = text.cast(pl.Int64, strict=False)
        floats = text.cast(pl.Float64, strict=False)
    elif raw.dtype.is_integer():
        text = raw.cast(pl.String)
        ints = raw.cast(pl.Int64, strict=False)
        floats = raw.cast(pl.Float64)
    elif raw.dtype.is_float() or raw.dtype == pl.Null:
        text = raw.cast(pl.String)
        ints = pl.Series([None] * n, dtype=pl.Int64)
        floats = raw.cast(pl.Float64)
    else:
        raise AnalyzeError(f"Column {name!r} of {path} holds {raw.dtype} values, not times.")
    blank = _blank(text)

    magnitude = pl.col("f").abs()
    unit = (
        pl.when(magnitude < _UNIT_BOUNDS[0])
        .then(0)
        .when(magnitude < _UNIT_BOUNDS[1])
        .then(1)
        .when(magnitude < _UNIT_BOUNDS[2])
        .then(2)
        .otherwise(3)
    )
    # Integers convert exactly (finer units floor to the millisecond that holds them); only
    # values written with a fraction or an exponent go through floating point.
    exact = (
        pl.when(pl.col("unit") == 0)
        .then(pl.col("i") * 1000)
        .when(pl.col("unit") == 1)
        .then(pl.col("i"))
        .when(pl.col("unit") == 2)
        .then(pl.col("i") // 1000)
        .otherwise(pl.col("i") // 1_000_000)
    )
    factor = pl.col("unit").replace_strict(list(range(len(_UNIT_TO_MS))), list(_UNIT_TO_MS))
    inexact = (pl.col("f") * factor).round().cast(pl.Int64, strict=False)
    parsed = (
        pl.DataFrame({"i": ints, "f": floats})
        .with_columns(unit.alias("unit"))
        .with_columns(pl.coalesce(exact, inexact).alias("ms"))
    )
    ms = parsed["ms"]
    form = parsed["unit"]
    iso = ~blank & floats.is_null()
    if iso.any():
        candidates = zip(text.to_list(), iso.to_list(), strict=True)
        from_text = pl.Series([iso_ms(t) if c else None for t, c in candidates], dtype=pl.Int64)
        ms = ms.fill_null(from_text)
        form = form.zip_with(~iso, pl.Series([_ISO] * n, dtype=form.dtype))

    valid = ms.is_not_null()
    hits = valid.arg_true()
    reference = int(hits[0]) if len(hits) else 0
    expected = form[reference]
    return ms, [
        _Problem(blank, lambda i, _: f"has no time in column {name!r}"),
        _Problem(
            ~blank & ~valid,
            lambda i, _: (
                f"has {_show(text[i])} in column {name!r}, which is neither an epoch time "
                "nor an ISO 8601 date and time"
            ),
        ),
        _Problem(
            valid & (form != expected),
            lambda i, rows: (
                f"gives its time in {_FORMS[form[i]]} but row {rows[reference]} in "
                f"{_FORMS[expected]}; use one form for the whole column"
            ),
        ),
    ]


def iso_ms(text: str) -> int | None:
    """Epoch milliseconds of ISO 8601 text (UTC when it has no offset), None if it is not."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MS


def _iso(ms: int) -> str:
    moment = _EPOCH + ms * _MS
    spec = "seconds" if ms % 1000 == 0 else "milliseconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")


def _inconsistent(bars: pl.DataFrame) -> list[_Problem]:
    o, h, lo, c = (bars[col] for col in PRICE_COLUMNS)

    def outside(name: str, value: pl.Series) -> _Problem:
        return _Problem(
            (value < lo) | (value > h),
            lambda i, _: (
                f"has {name} {_num(value[i])} outside its range from low {_num(lo[i])} "
                f"to high {_num(h[i])}"
            ),
        )

    return [
        _Problem(h < lo, lambda i, _: f"has high {_num(h[i])} below low {_num(lo[i])}"),
        outside("open", o),
        outside("close", c),
    ]


def _duplicates(bars: pl.DataFrame) -> _Problem:
    """Rows whose time an earlier row has (an earlier row of the same symbol, with symbols)."""
    time = bars["time"]
    if "symbol" not in bars.columns:

        def describe(i: int, rows: pl.Series) -> str:
            earlier = int((time == time[i]).arg_true()[0])
            return f"repeats the time {_iso(time[i])} of row {rows[earlier]}"

        return _Problem(~time.is_first_distinct() & time.is_not_null(), describe)

    symbol = bars["symbol"]
    repeated = ~bars.select(pl.struct("symbol", "time").is_first_distinct()).to_series()

    def describe_of(i: int, rows: pl.Series) -> str:
        earlier = int(((time == time[i]) & (symbol == symbol[i])).arg_true()[0])
        return f"repeats the time {_iso(time[i])} of {symbol[i]} in row {rows[earlier]}"

    return _Problem(repeated & time.is_not_null() & symbol.is_not_null(), describe_of)


def _symbols(raw: pl.Series, name: str, path: Path) -> tuple[pl.Series, list[_Problem]]:
    """A symbol column in the `X:BTCUSD` form, and the rows at fault."""
    if raw.dtype == pl.String or raw.dtype == pl.Categorical or isinstance(raw.dtype, pl.Enum):
        text = raw.cast(pl.String).str.strip_chars()
    elif raw.dtype == pl.Null:
        text = raw.cast(pl.String)
    else:
        raise AnalyzeError(f"Column {name!r} of {path} holds {raw.dtype} values, not symbols.")
    forms: dict[str, str] = {}
    for value in text.drop_nulls().unique().to_list():
        with contextlib.suppress(SymbolError):
            forms[value] = normalize(value)
    symbols = text.replace_strict(forms, default=None, return_dtype=pl.String)
    blank = _blank(text)
    return symbols, [
        _Problem(blank, lambda i, _: f"has no symbol in column {name!r}"),
        _Problem(
            ~blank & symbols.is_null(),
            lambda i, _: (
                f"has {_show(text[i])} in column {name!r}, which is not a symbol such as "
                "X:BTCUSD, BTC-USD or btcusd"
            ),
        ),
    ]
