"""`polystream analyze`: bar files in every accepted shape, each fault as one sentence, TA-Lib."""

from __future__ import annotations

import gzip
import io
import math
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import talib
from hypothesis import given, settings
from hypothesis import strategies as st

from polystream.analyze import (
    ALIASES,
    BAR_COLUMNS,
    AnalyzeError,
    analyze,
    read_bars,
    write_output,
)
from polystream.indicators import IndicatorParams

T0 = 1553817600000  # 2019-03-29T00:00:00Z, the first bar of the shipped file
MINUTE = 60_000
BAR = "1,2,0.5,1.5,10"  # open, high, low, close, volume of a valid bar


@pytest.fixture
def btc_csv() -> Path:
    return Path(str(resources.files("polystream.data") / "btcusd_1m_2019-03-29.csv"))


def write(tmp_path: Path, text: str, name: str = "bars.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def bars_csv(tmp_path: Path, times: list[str], name: str = "bars.csv") -> Path:
    rows = "".join(f"{t},{BAR}\n" for t in times)
    return write(tmp_path, "time,open,high,low,close,volume\n" + rows, name)


def error_of(path: Path) -> str:
    with pytest.raises(AnalyzeError) as info:
        read_bars(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith(".")
    assert str(path) in message
    return message


# -- headers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "spelling"),
    [(role, spelling) for role, spellings in ALIASES.items() for spelling in spellings],
)
@pytest.mark.parametrize("case", [str.lower, str.upper, str.title])
def test_every_header_spelling_in_any_case(
    tmp_path: Path, role: str, spelling: str, case: Callable[[str], str]
) -> None:
    header = [spelling if r == role else r for r in BAR_COLUMNS]
    path = write(tmp_path, ",".join(case(h) for h in header) + f"\n{T0},{BAR}\n")
    bars = read_bars(path)
    assert bars.columns == list(BAR_COLUMNS)
    assert bars.row(0) == (T0, 1.0, 2.0, 0.5, 1.5, 10.0)


def test_headers_with_spaces_dashes_and_a_byte_order_mark(tmp_path: Path) -> None:
    path = write(tmp_path, f"\ufeff Open Time ,Open,High,Low,Close,Base-Volume\n{T0},{BAR}\n")
    assert read_bars(path).row(0) == (T0, 1.0, 2.0, 0.5, 1.5, 10.0)


def test_polygon_flat_file_columns(tmp_path: Path) -> None:
    text = (
        "ticker,volume,open,close,high,low,window_start,transactions\n"
        f"X:BTCUSD,10,1,1.5,2,0.5,{T0 * 1_000_000},7\n"
    )
    # the ticker is the symbol column: a flat file holds every symbol of its day
    assert read_bars(write(tmp_path, text)).row(0) == ("X:BTCUSD", T0, 1.0, 2.0, 0.5, 1.5, 10.0)


def test_extra_columns_are_ignored_and_volume_is_optional(tmp_path: Path) -> None:
    path = write(tmp_path, f"exchange,t,o,h,l,c,vwap\nBTC,{T0},1,2,0.5,1.5,1.2\n")
    bars = read_bars(path)
    assert bars.columns == list(BAR_COLUMNS)
    assert bars.schema["volume"] == pl.Float64
    assert bars["volume"].to_list() == [None]


def test_output_types(tmp_path: Path) -> None:
    bars = read_bars(bars_csv(tmp_path, [str(T0)]))
    assert dict(bars.schema) == {
        "time": pl.Int64,
        **{c: pl.Float64 for c in BAR_COLUMNS[1:]},
    }


@pytest.mark.parametrize("separator", [";", "\t", "|"])
def test_other_separators(tmp_path: Path, separator: str) -> None:
    text = f"time,open,high,low,close,volume\n{T0},{BAR}\n".replace(",", separator)
    assert read_bars(write(tmp_path, text)).row(0) == (T0, 1.0, 2.0, 0.5, 1.5, 10.0)


def test_gzipped_csv(tmp_path: Path) -> None:
    path = tmp_path / "bars.csv.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(f"time,open,high,low,close,volume\n{T0},{BAR}\n")
    assert read_bars(path).row(0) == (T0, 1.0, 2.0, 0.5, 1.5, 10.0)


def test_spaces_around_values_and_quotes(tmp_path: Path) -> None:
    path = write(tmp_path, f'time,open,high,low,close,volume\n"{T0}", 1 ,"2", 0.5,1.5 ,10\n')
    assert read_bars(path).row(0) == (T0, 1.0, 2.0, 0.5, 1.5, 10.0)


# -- times -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2019-03-29T00:00:00Z", T0),
        ("2019-03-29T00:00:00", T0),
        ("2019-03-29 00:00:00", T0),
        ("2019-03-29T01:00:00+01:00", T0),
        ("2019-03-28T19:00:00-05:00", T0),
        ("2019-03-29T05:30:00+05:30", T0),
        ("2019-03-29T00:00:00.250Z", T0 + 250),
        ("2019-03-29T00:00:00.250999+00:00", T0 + 250),
        ("2019-03-29", T0),
        ("2019-03-29T00:01Z", T0 + MINUTE),
    ],
)
def test_iso_times(tmp_path: Path, text: str, expected: int) -> None:
    assert read_bars(bars_csv(tmp_path, [text]))["time"].to_list() == [expected]


def test_iso_times_with_different_offsets_in_one_column(tmp_path: Path) -> None:
    times = ["2019-03-29T00:00:00Z", "2019-03-29T01:01:00+01:00", "2019-03-29 00:02:00"]
    bars = read_bars(bars_csv(tmp_path, times))
    assert bars["time"].to_list() == [T0, T0 + MINUTE, T0 + 2 * MINUTE]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (str(T0 // 1000), T0),
        (str(T0), T0),
        (str(T0 * 1000), T0),
        (str(T0 * 1_000_000), T0),
        (str(T0 * 1000 + 999), T0),
        (str(T0 * 1_000_000 + 999_999), T0),
        (f"{T0 // 1000}.25", T0 + 250),
        ("1.5538176e9", T0),
        ("1.5538176e12", T0),
        ("1e11", 10**11),
        ("99999999999", 99999999999000),
        ("0", 0),
    ],
)
def test_epoch_units_by_magnitude(tmp_path: Path, text: str, expected: int) -> None:
    assert read_bars(bars_csv(tmp_path, [text]))["time"].to_list() == [expected]


@given(
    minutes=st.integers(min_value=0, max_value=60 * 24 * 365 * 100),
    unit=st.sampled_from(["s", "ms", "us", "ns", "iso", "iso+02:00"]),
)
@settings(max_examples=60, deadline=None)
def test_every_time_form_gives_the_same_millisecond(
    tmp_path_factory: pytest.TempPathFactory, minutes: int, unit: str
) -> None:
    ms = T0 + minutes * MINUTE
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    text = {
        "s": str(ms // 1000),
        "ms": str(ms),
        "us": str(ms * 1000),
        "ns": str(ms * 1_000_000),
        "iso": moment.replace(tzinfo=None).isoformat(),
        "iso+02:00": moment.astimezone(timezone(timedelta(hours=2))).isoformat(),
    }[unit]
    path = bars_csv(tmp_path_factory.mktemp("forms"), [text])
    assert read_bars(path)["time"].to_list() == [ms]


# -- Parquet -----------------------------------------------------------------------------------


def parquet_bars(time: pl.Series) -> pl.DataFrame:
    n = len(time)
    return pl.DataFrame(
        {
            "Timestamp": time,
            "Open": [1.0] * n,
            "High": [2] * n,
            "Low": [0.5] * n,
            "Close": [1.5] * n,
            "Volume": [10.0] * n,
        }
    )


@pytest.mark.parametrize("suffix", [".parquet", ".pq"])
def test_parquet_round_trip_of_read_bars(tmp_path: Path, suffix: str) -> None:
    source = bars_csv(tmp_path, [str(T0 + MINUTE), str(T0)])
    bars = read_bars(source)
    path = tmp_path / f"bars{suffix}"
    bars.write_parquet(path)
    assert read_bars(path).equals(bars)


@pytest.mark.parametrize(
    "time",
    [
        pl.Series([T0, T0 + MINUTE]),
        pl.Series([T0 // 1000, T0 // 1000 + 60]),
        pl.Series([T0 * 1_000_000, (T0 + MINUTE) * 1_000_000], dtype=pl.UInt64),
        pl.Series([T0 / 1000, T0 / 1000 + 60.0]),
        pl.Series([T0, T0 + MINUTE]).cast(pl.Datetime("ms")),
        pl.Series([T0, T0 + MINUTE]).cast(pl.Datetime("ms")).cast(pl.Datetime("ns")),
        pl.Series([T0, T0 + MINUTE])
        .cast(pl.Datetime("ms"))
        .dt.replace_time_zone("UTC")
        .dt.convert_time_zone("America/New_York"),
        pl.Series(["2019-03-29T00:00:00Z", "2019-03-29T01:01:00+01:00"]),
    ],
    ids=["ms", "s", "ns-uint", "float-s", "naive", "naive-ns", "new-york", "iso"],
)
def test_parquet_time_types(tmp_path: Path, time: pl.Series) -> None:
    path = tmp_path / "bars.parquet"
    parquet_bars(time).write_parquet(path)
    bars = read_bars(path)
    assert bars["time"].to_list() == [T0, T0 + MINUTE]
    assert bars.row(0)[1:] == (1.0, 2.0, 0.5, 1.5, 10.0)


def test_parquet_dates(tmp_path: Path) -> None:
    path = tmp_path / "bars.parquet"
    parquet_bars(pl.Series([date(2019, 3, 29), date(2019, 3, 30)])).write_parquet(path)
    assert read_bars(path)["time"].to_list() == [T0, T0 + 24 * 60 * MINUTE]


def test_parquet_checks_values_too(tmp_path: Path) -> None:
    frame = parquet_bars(pl.Series([T0, T0 + MINUTE])).with_columns(
        pl.Series("Close", [1.5, math.nan])
    )
    path = tmp_path / "bars.parquet"
    frame.write_parquet(path)
    message = error_of(path)
    assert message.startswith(f"Row 2 of {path} has nan in column 'Close'")


def test_parquet_column_of_the_wrong_type(tmp_path: Path) -> None:
    frame = parquet_bars(pl.Series([T0])).with_columns(pl.Series("Open", [True]))
    path = tmp_path / "bars.parquet"
    frame.write_parquet(path)
    message = error_of(path)
    assert "'Open'" in message
    assert "not numbers" in message


# -- order -------------------------------------------------------------------------------------


def test_unsorted_rows_are_sorted(tmp_path: Path) -> None:
    times = [T0 + 2 * MINUTE, T0, T0 + 3 * MINUTE, T0 + MINUTE]
    text = "time,open,high,low,close,volume\n" + "".join(
        f"{t},{i + 1},10,0.5,{i + 1},{i}\n" for i, t in enumerate(times)
    )
    bars = read_bars(write(tmp_path, text))
    assert bars["time"].to_list() == sorted(times)
    assert bars["open"].to_list() == [2.0, 4.0, 1.0, 3.0]
    assert bars["volume"].to_list() == [1.0, 3.0, 0.0, 2.0]


def test_error_rows_count_in_file_order_not_time_order(tmp_path: Path) -> None:
    path = bars_csv(tmp_path, [str(T0 + 2 * MINUTE), str(T0), "x", str(T0 + MINUTE)])
    assert error_of(path).startswith(f"Row 3 of {path} has 'x' in column 'time'")


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    text = f"time,open,high,low,close,volume\n{T0},{BAR}\n\n  \n{T0 + MINUTE},1,2,0.5,oops,1\n\n"
    path = write(tmp_path, text)
    assert error_of(path).startswith(f"Row 4 of {path} has 'oops' in column 'close'")
    fixed = write(tmp_path, text.replace("oops", "1"), "fixed.csv")
    assert read_bars(fixed).height == 2


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (["time,o,h,l,c", f"{T0},1,2,0.5,abc"], "Row 1 of {path} has 'abc' in column 'c', which"),
        (["time,o,h,l,c", f"{T0},1,2,0.5,"], "Row 1 of {path} has no value in column 'c'"),
        (["time,Open,h,l,c", f"{T0},,2,0.5,1"], "Row 1 of {path} has no value in column 'Open'"),
        (["time,o,h,l,c", f"{T0},1,2,0.5,1", f"{T0 + 1},1,nan,0.5,1"], "Row 2 of {path} has nan"),
        (["time,o,h,l,c", f"{T0},inf,2,0.5,1"], "Row 1 of {path} has inf in column 'o'"),
        (["time,o,h,l,c", f"{T0},1,2,-inf,1"], "Row 1 of {path} has -inf in column 'l'"),
        (
            ["time,o,h,l,c", f"{T0},0,2,0,1"],
            "Row 1 of {path} has 0.0 in column 'o', but prices must be above zero",
        ),
        (["time,o,h,l,c", f"{T0},-1,2,-2,1"], "Row 1 of {path} has -1.0 in column 'o', but prices"),
        (["time,o,h,l,c,v", f"{T0},1,2,0.5,1,-3"], "Row 1 of {path} has the negative volume -3.0"),
        (["time,o,h,l,c,v", f"{T0},1,2,0.5,1,lots"], "Row 1 of {path} has 'lots' in column 'v'"),
        (["time,o,h,l,c", f"{T0},1,1,2,1"], "Row 1 of {path} has high 1.0 below low 2.0"),
        (
            ["time,o,h,l,c", f"{T0},1,2,0.5,1", f"{T0 + 1},3,2,0.5,1"],
            "Row 2 of {path} has open 3.0 outside its range from low 0.5 to high 2.0",
        ),
        (
            ["time,o,h,l,c", f"{T0},1,2,0.5,0.25"],
            "Row 1 of {path} has close 0.25 outside its range from low 0.5 to high 2.0",
        ),
        (
            ["time,o,h,l,c", f"{T0},1,2,0.5,1", f"{T0 + 1},1,2,0.5,1", f"{T0},1,2,0.5,1"],
            "Row 3 of {path} repeats the time 2019-03-29T00:00:00Z of row 1",
        ),
        (
            [
                "Date,o,h,l,c",
                "2019-03-29T00:00:00.5Z,1,2,0.5,1",
                "2019-03-29 00:00:00.500,1,2,0.5,1",
            ],
            "Row 2 of {path} repeats the time 2019-03-29T00:00:00.500Z of row 1",
        ),
        (["time,o,h,l,c", "29/03/2019,1,2,0.5,1"], "Row 1 of {path} has '29/03/2019' in column"),
        (["time,o,h,l,c", "2019-02-30T00:00Z,1,2,0.5,1"], "Row 1 of {path} has '2019-02-30T00"),
        (["time,o,h,l,c", "nan,1,2,0.5,1"], "Row 1 of {path} has 'nan' in column 'time'"),
        (["time,o,h,l,c", f"{T0},1,2,0.5,1", ",1,2,0.5,1"], "Row 2 of {path} has no time"),
        (
            ["time,o,h,l,c", f"{T0},1,2,0.5,1", f"{T0 // 1000 + 60},1,2,0.5,1"],
            "Row 2 of {path} gives its time in epoch seconds but row 1 in epoch milliseconds",
        ),
        (
            ["time,o,h,l,c", "2019-03-29T00:00Z,1,2,0.5,1", f"{T0 + MINUTE},1,2,0.5,1"],
            "Row 2 of {path} gives its time in epoch milliseconds but row 1 in ISO 8601 text",
        ),
        (
            ["time,o,h,l,c", f"{T0},1,2,0.5,1", f"{T0 + 1},1,2,0.5,1,7"],
            "Row 2 of {path} has more fields than the header",
        ),
    ],
)
def test_row_errors(tmp_path: Path, rows: list[str], expected: str) -> None:
    path = write(tmp_path, "\n".join(rows) + "\n")
    message = error_of(path)
    assert message.startswith(expected.format(path=path)), message


def test_the_earliest_faulty_row_is_reported_with_a_count_of_the_others(tmp_path: Path) -> None:
    rows = [
        f"{T0},1,2,0.5,1,1",
        f"{T0 + MINUTE},1,2,0.5,1,bad",
        f"{T0 + 2 * MINUTE},x,2,0.5,1,1",
        f"{T0 + 3 * MINUTE},1,2,3,1,1",
        "yesterday,1,2,0.5,1,1",
    ]
    path = write(tmp_path, "time,open,high,low,close,volume\n" + "\n".join(rows) + "\n")
    message = error_of(path)
    assert message == (
        f"Row 2 of {path} has 'bad' in column 'volume', which is not a number "
        "(3 more rows have problems too)."
    )


def test_one_more_faulty_row(tmp_path: Path) -> None:
    path = bars_csv(tmp_path, ["x", "y"])
    assert error_of(path).endswith("(1 more row has problems too).")


def test_missing_columns_are_listed_with_what_was_found(tmp_path: Path) -> None:
    path = write(tmp_path, f"when,Open,Hi,Low,Last\n{T0},1,2,0.5,1\n")
    message = error_of(path)
    assert message.startswith(f"{path} lacks the time, high and close columns")
    assert "'when', 'Open', 'Hi', 'Low', 'Last'" in message
    assert "close|c" in message


def test_one_missing_column(tmp_path: Path) -> None:
    path = write(tmp_path, f"time,open,high,low\n{T0},1,2,0.5\n")
    assert error_of(path).startswith(f"{path} lacks the close column (")


def test_two_columns_for_one_role(tmp_path: Path) -> None:
    path = write(tmp_path, f"time,timestamp,o,h,l,c\n{T0},{T0},1,2,0.5,1\n")
    assert error_of(path) == (
        f"{path} has 'time' and 'timestamp' as time columns; keep only one of them."
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "{path} is empty."),
        ("\n\n", "{path} is empty."),
        ("time,open,high,low,close\n", "{path} has no data rows."),
        ("time,open,high,low,close\n\n\n", "{path} has no data rows."),
    ],
)
def test_empty_files(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    assert error_of(path) == expected.format(path=path)


def test_empty_parquet(tmp_path: Path) -> None:
    path = tmp_path / "bars.parquet"
    parquet_bars(pl.Series([], dtype=pl.Int64)).write_parquet(path)
    assert error_of(path) == f"{path} has no data rows."


def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.csv"
    assert error_of(missing) == f"There is no file {missing}."
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    assert error_of(folder) == f"{folder} is a directory, not a file of bars."
    other = write(tmp_path, "time,open\n", "bars.txt")
    assert error_of(other) == (
        f"Cannot read {other}: its name must end in .csv, .csv.gz, .parquet or .pq."
    )
    fake = write(tmp_path, "time,open,high,low,close\n", "fake.parquet")
    assert error_of(fake).startswith(f"Cannot read {fake} as Parquet: ")
    not_gzip = write(tmp_path, f"time,open,high,low,close\n{T0},{BAR}\n", "plain.csv.gz")
    assert error_of(not_gzip).startswith(f"Cannot read {not_gzip}: ")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = bars_csv(tmp_path, [str(T0)])
    path.chmod(0)
    assert error_of(path) == f"Cannot read {path}: permission denied."


def test_invalid_utf8_is_a_row_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "bars.csv"
    path.write_bytes(b"time,open,high,low,close\n" + f"{T0},1,2,0.5,".encode() + b"\xff1\n")
    assert error_of(path).startswith(f"Row 1 of {path} has '\ufffd1' in column 'close'")


def test_long_values_are_shortened_in_messages(tmp_path: Path) -> None:
    path = bars_csv(tmp_path, ["x" * 500])
    message = error_of(path)
    assert "x" * 37 + "..." in message
    assert len(message) < 200 + len(str(path))


# -- output ------------------------------------------------------------------------------------


@pytest.fixture
def result(btc_csv: Path) -> pl.DataFrame:
    return analyze(btc_csv)


@pytest.mark.parametrize("name", ["out.csv", "out.CSV", "out.csv.gz", "out.parquet", "out.pq"])
def test_output_round_trip(tmp_path: Path, result: pl.DataFrame, name: str) -> None:
    out = tmp_path / name
    write_output(result, out)
    if name.lower().endswith((".parquet", ".pq")):
        back = pl.read_parquet(out)
    else:
        back = pl.read_csv(out, schema=result.schema)
    assert back.equals(result)


def test_csv_output_keeps_times_as_epoch_milliseconds(tmp_path: Path, result: pl.DataFrame) -> None:
    out = tmp_path / "out.csv"
    write_output(result, out)
    lines = out.read_text().splitlines()
    assert lines[0].split(",") == result.columns
    assert lines[1].split(",")[0] == str(T0)
    assert lines[1].split(",")[-1] == ""


def test_output_errors(tmp_path: Path, result: pl.DataFrame) -> None:
    out = tmp_path / "out.json"
    with pytest.raises(AnalyzeError) as info:
        write_output(result, out)
    assert str(info.value) == (
        f"Cannot write {out}: give it one of the suffixes .csv, .csv.gz, .parquet or .pq."
    )
    out = tmp_path / "missing" / "out.csv"
    with pytest.raises(AnalyzeError) as info:
        write_output(result, out)
    message = str(info.value)
    assert message.startswith(f"Cannot write {out}: ")
    assert message.endswith(".")
    assert "\n" not in message


# -- indicators --------------------------------------------------------------------------------


def test_analyze_columns(result: pl.DataFrame) -> None:
    assert result.columns == [*BAR_COLUMNS, *IndicatorParams().columns]
    assert result.height == 1382


def test_analyze_with_parameters(btc_csv: Path) -> None:
    params = IndicatorParams(rsi=7, cci=10, sma=(5,), ema=(9,))
    assert analyze(btc_csv, params).columns == [*BAR_COLUMNS, *params.columns]


def test_analyze_rsi_equals_talib(btc_csv: Path, result: pl.DataFrame) -> None:
    source = pl.read_csv(btc_csv).sort("time")
    expected = talib.RSI(source["close"].to_numpy().astype(np.float64), timeperiod=14)
    ours = result["rsi_14"].to_numpy()
    assert result["time"].to_list() == source["time"].to_list()
    assert np.array_equal(np.isnan(expected), result["rsi_14"].is_null().to_numpy())
    valid = ~np.isnan(expected)
    assert valid.sum() == len(expected) - 14
    error = np.abs(ours[valid] - expected[valid]) / np.maximum(1.0, np.abs(expected[valid]))
    assert error.max() <= 1e-9


def test_analyze_does_not_depend_on_row_order_or_format(
    tmp_path: Path, btc_csv: Path, result: pl.DataFrame
) -> None:
    shuffled = pl.read_csv(btc_csv).sample(fraction=1.0, shuffle=True, seed=3)
    shuffled = shuffled.with_columns(
        pl.from_epoch("time", time_unit="ms").dt.replace_time_zone("UTC")
    )
    path = tmp_path / "shuffled.parquet"
    shuffled.write_parquet(path)
    assert analyze(path).equals(result)


# -- command line ------------------------------------------------------------------------------


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POLYGON_", "MASSIVE_", "TELEGRAM_", "DATABASE_URL"))
    }
    env["POLYSTREAM_STATE_DIR"] = str(tmp_path / "state")
    return subprocess.run(
        [sys.executable, "-m", "polystream", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )


def test_cli_analyze_writes_the_output(tmp_path: Path, btc_csv: Path) -> None:
    out = tmp_path / "out.parquet"
    done = run_cli(tmp_path, "analyze", str(btc_csv), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert pl.read_parquet(out).equals(analyze(btc_csv))


@pytest.mark.parametrize("args", [[], ["-o", "-"]])
def test_cli_analyze_into_a_pipe_is_every_row_as_csv(
    tmp_path: Path, btc_csv: Path, args: list[str]
) -> None:
    # Before: a 40-row table cut to the pipe's width (`417…`), and `-o -` was refused.
    done = run_cli(tmp_path, "analyze", str(btc_csv), *args)
    assert done.returncode == 0, done.stderr
    got = pl.read_csv(io.StringIO(done.stdout))
    expected = analyze(btc_csv)
    assert got.height == expected.height > 1000 and got.columns == expected.columns
    assert got.equals(pl.read_csv(io.StringIO(expected.write_csv())))


def test_cli_analyze_bad_file_is_one_sentence(tmp_path: Path) -> None:
    path = bars_csv(tmp_path, [str(T0), "soon"])
    done = run_cli(tmp_path, "analyze", str(path), "-o", str(tmp_path / "out.csv"))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"polystream: error: Row 2 of {path} has 'soon' in column 'time', which is neither "
        "an epoch time nor an ISO 8601 date and time."
    )
    assert not (tmp_path / "out.csv").exists()


# -- several symbols ---------------------------------------------------------------------------


def two_symbols(btc_csv: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The shipped BTC bars, and an ETH series over the same times with a path of its own."""
    btc = pl.read_csv(btc_csv)
    scale = 1 + 0.01 * ((pl.int_range(pl.len()) % 7) - 3)
    eth = btc.with_columns((pl.col(c) * 0.05 * scale) for c in ("open", "high", "low", "close"))
    return btc, eth


def multi_csv(tmp_path: Path, btc_csv: Path, header: str = "symbol") -> Path:
    """Both series in one file, rows interleaved and in no order, symbols in several spellings."""
    btc, eth = two_symbols(btc_csv)
    rows = pl.concat(
        [
            btc.with_columns(pl.lit("X:BTCUSD").alias(header)),
            eth.with_columns(
                pl.when(pl.int_range(pl.len()) % 2 == 0)
                .then(pl.lit("ETH-USD"))
                .otherwise(pl.lit("ethusd"))
                .alias(header)
            ),
        ]
    ).sample(fraction=1.0, shuffle=True, seed=5)
    path = tmp_path / "multi.csv"
    rows.select(header, *BAR_COLUMNS).write_csv(path)
    return path


def one_symbol_files(tmp_path: Path, btc_csv: Path) -> dict[str, Path]:
    btc, eth = two_symbols(btc_csv)
    files = {"X:BTCUSD": tmp_path / "btc.csv", "X:ETHUSD": tmp_path / "eth.csv"}
    btc.write_csv(files["X:BTCUSD"])
    eth.write_csv(files["X:ETHUSD"])
    return files


@pytest.mark.parametrize("header", ["symbol", "Symbol", "TICKER", "pair"])
def test_a_symbol_column_gives_each_symbol_its_own_indicators(
    tmp_path: Path, btc_csv: Path, header: str
) -> None:
    path = multi_csv(tmp_path, btc_csv, header)
    result = analyze(path)
    assert result.columns == ["symbol", *BAR_COLUMNS, *IndicatorParams().columns]
    assert result["symbol"].unique(maintain_order=True).to_list() == ["X:BTCUSD", "X:ETHUSD"]
    for symbol, alone in one_symbol_files(tmp_path, btc_csv).items():
        mine = result.filter(pl.col("symbol") == symbol).drop("symbol")
        assert mine.equals(analyze(alone)), symbol


def test_symbol_picks_one_in_any_spelling(tmp_path: Path, btc_csv: Path) -> None:
    path = multi_csv(tmp_path, btc_csv)
    alone = one_symbol_files(tmp_path, btc_csv)
    for spelling in ("X:ETHUSD", "ETH-USD", "ethusd"):
        picked = analyze(path, symbol=spelling)
        assert picked["symbol"].unique().to_list() == ["X:ETHUSD"]
        assert picked.drop("symbol").equals(analyze(alone["X:ETHUSD"]))
    assert read_bars(path, "btcusd").drop("symbol").equals(read_bars(alone["X:BTCUSD"]))


def test_an_unknown_symbol_names_the_ones_the_file_has(tmp_path: Path, btc_csv: Path) -> None:
    path = multi_csv(tmp_path, btc_csv)
    with pytest.raises(AnalyzeError) as info:
        analyze(path, symbol="SOL-USD")
    assert str(info.value) == f"{path} has no bars of X:SOLUSD; it holds X:BTCUSD and X:ETHUSD."
    with pytest.raises(AnalyzeError) as info:
        analyze(btc_csv, symbol="BTC-USD")
    assert str(info.value).startswith(f"{btc_csv} has no symbol column to pick X:BTCUSD from")


def test_a_file_without_a_symbol_column_is_read_as_before(tmp_path: Path, btc_csv: Path) -> None:
    assert read_bars(btc_csv).columns == list(BAR_COLUMNS)
    assert read_bars(btc_csv, "X:ETHUSD").equals(read_bars(btc_csv))
    assert analyze(btc_csv).columns == [*BAR_COLUMNS, *IndicatorParams().columns]


def test_a_time_may_repeat_for_another_symbol_only(tmp_path: Path) -> None:
    ok = write(
        tmp_path, f"symbol,{','.join(BAR_COLUMNS)}\nX:BTCUSD,{T0},{BAR}\nETH-USD,{T0},{BAR}\n"
    )
    assert read_bars(ok)["symbol"].to_list() == ["X:BTCUSD", "X:ETHUSD"]
    path = write(
        tmp_path,
        f"symbol,{','.join(BAR_COLUMNS)}\nX:BTCUSD,{T0},{BAR}\nETH-USD,{T0},{BAR}\n"
        f"btc-usd,{T0},{BAR}\n",
    )
    assert error_of(path) == (
        f"Row 3 of {path} repeats the time 2019-03-29T00:00:00Z of X:BTCUSD in row 1."
    )


@pytest.mark.parametrize(
    ("symbol", "expected"),
    [
        ("", "has no symbol in column 'symbol'"),
        ("BTC??", "has 'BTC??' in column 'symbol', which is not a symbol such as X:BTCUSD"),
    ],
)
def test_symbol_row_errors(tmp_path: Path, symbol: str, expected: str) -> None:
    path = write(
        tmp_path, f"symbol,{','.join(BAR_COLUMNS)}\nX:BTCUSD,{T0},{BAR}\n{symbol},{T0},{BAR}\n"
    )
    assert error_of(path).startswith(f"Row 2 of {path} {expected}")


def test_parquet_with_a_categorical_symbol_column(tmp_path: Path, btc_csv: Path) -> None:
    frame = pl.read_csv(multi_csv(tmp_path, btc_csv)).with_columns(
        pl.col("symbol").cast(pl.Categorical)
    )
    path = tmp_path / "multi.parquet"
    frame.write_parquet(path)
    assert analyze(path).equals(analyze(tmp_path / "multi.csv"))


def test_cli_analyze_keeps_the_symbol_column_and_picks_one(tmp_path: Path, btc_csv: Path) -> None:
    path = multi_csv(tmp_path, btc_csv)
    out = tmp_path / "out.csv"
    done = run_cli(tmp_path, "analyze", str(path), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_text().splitlines()[0].startswith("symbol,time,open,high,low,close,volume,")
    assert pl.read_csv(out)["symbol"].unique().sort().to_list() == ["X:BTCUSD", "X:ETHUSD"]
    picked = run_cli(tmp_path, "analyze", str(path), "--symbol", "btcusd", "-o", str(out))
    assert picked.returncode == 0, picked.stderr
    expected = analyze(btc_csv)
    back = pl.read_csv(out, schema={"symbol": pl.String, **expected.schema})
    assert back["symbol"].unique().to_list() == ["X:BTCUSD"]
    assert back.drop("symbol").equals(expected)
    unknown = run_cli(tmp_path, "analyze", str(path), "--symbol", "SOL-USD")
    assert unknown.returncode == 1
    assert "Traceback" not in unknown.stderr
    lines = unknown.stderr.strip().splitlines()
    assert lines[-1] == (
        f"polystream: error: {path} has no bars of X:SOLUSD; it holds X:BTCUSD and X:ETHUSD."
    )
