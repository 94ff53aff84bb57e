"""`--json` of `analyze` and `migrate --list`: JSON lines on stdout and nothing else, the same
values as the other outputs, usage errors as one sentence."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import polars as pl

from test_cli import env, run

BTC_BARS = Path(str(resources.files("polystream.data") / "btcusd_1m_2019-03-29.csv"))
MIGRATIONS = ["0001_tables", "0002_timescale", "0003_bars_1h"]


def json_lines(stdout: str) -> list[dict[str, object]]:
    lines = stdout.splitlines()
    assert lines and all(line.startswith("{") and line.endswith("}") for line in lines), stdout
    return [json.loads(line) for line in lines]


def test_analyze_json_has_the_values_of_the_csv(tmp_path: Path) -> None:
    as_json = run(tmp_path, "analyze", str(BTC_BARS), "--json")
    assert as_json.returncode == 0, as_json.stderr
    rows = json_lines(as_json.stdout)
    as_csv = run(tmp_path, "analyze", str(BTC_BARS), "-o", "-")
    assert as_csv.returncode == 0, as_csv.stderr
    csv_rows = pl.read_csv(io.StringIO(as_csv.stdout)).to_dicts()
    assert len(rows) == len(csv_rows) == len(BTC_BARS.read_text().splitlines()) - 1
    assert rows == csv_rows
    assert list(rows[0]) == ["time", "open", "high", "low", "close", "volume", "rsi_14",
                             "stoch_k", "stoch_d", "macd", "macd_signal", "macd_hist", "ao",
                             "cci_20", "bb_upper", "bb_middle", "bb_lower"]  # fmt: skip
    assert rows[0]["time"] == 1553817600000 and isinstance(rows[-1]["time"], int)
    assert rows[0]["rsi_14"] is None and isinstance(rows[-1]["rsi_14"], float)


def test_analyze_json_keeps_the_symbol_column(tmp_path: Path) -> None:
    both = tmp_path / "both.csv"
    btc = pl.read_csv(BTC_BARS).head(40)
    pl.concat(
        [btc.with_columns(symbol=pl.lit("btcusd")), btc.with_columns(symbol=pl.lit("ETH-USD"))]
    ).write_csv(both)
    result = run(tmp_path, "analyze", str(both), "--json", "--symbol", "X:ETHUSD")
    assert result.returncode == 0, result.stderr
    rows = json_lines(result.stdout)
    assert len(rows) == 40 and {r["symbol"] for r in rows} == {"X:ETHUSD"}


def test_analyze_json_with_an_output_file_is_bad_usage(tmp_path: Path) -> None:
    for out in ("out.csv", "-"):
        result = run(tmp_path, "analyze", str(BTC_BARS), "--json", "-o", out)
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        assert result.stderr.splitlines() == [
            "polystream: error: Give --json or --output, not both: --json writes the rows to "
            "stdout."
        ]
    assert not (tmp_path / "out.csv").exists()


def test_analyze_json_into_a_reader_that_goes_away_ends_quietly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "polystream", "analyze", str(BTC_BARS), "--json"],
        cwd=tmp_path, env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["time"] == 1553817600000  # like `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 0, err
    assert err == ""


def test_migrate_list_json(tmp_path: Path, database_url: str) -> None:
    def listed() -> list[dict[str, object]]:
        result = run(tmp_path, "migrate", "--list", "--json", DATABASE_URL=database_url)
        assert result.returncode == 0, result.stderr
        return json_lines(result.stdout)

    assert listed() == [{"id": m, "applied": False} for m in MIGRATIONS]
    assert run(tmp_path, "migrate", DATABASE_URL=database_url).returncode == 0
    assert listed() == [{"id": m, "applied": True} for m in MIGRATIONS]
    rolled = run(tmp_path, "migrate", "--rollback", DATABASE_URL=database_url)
    assert rolled.returncode == 0, rolled.stderr
    assert [r["applied"] for r in listed()] == [True] * (len(MIGRATIONS) - 1) + [False]


def test_migrate_json_without_list_is_bad_usage(tmp_path: Path) -> None:
    result = run(tmp_path, "migrate", "--json", DATABASE_URL="postgresql://u@127.0.0.1:9/db")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "polystream: error: --json goes with --list, the one form of migrate that prints data."
    ]
