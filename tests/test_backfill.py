"""`polystream backfill` as users run it: a local REST API, a real PostgreSQL, files."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import psycopg
import pytest

from polystream.analyze import analyze, read_bars
from test_cli import assert_one_sentence_error, records, run
from test_rest import KEY, MINUTE, T0, FakeMassive, api  # noqa: F401  (the fixture is used by name)


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def backfill(tmp_path: Path, api: FakeMassive, *args: str, **extra: str):  # type: ignore[no-untyped-def]  # noqa: F811
    return run(
        tmp_path,
        "backfill",
        *args,
        "--per-minute",
        "0",
        POLYGON_API_KEY=KEY,
        POLYGON_REST_URL=api.url,
        **extra,
    )


def stored(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def test_backfill_stores_every_page_once_and_a_second_run_nothing(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
    database_url: str,
) -> None:
    assert run(tmp_path, "migrate", DATABASE_URL=database_url).returncode == 0
    api.add_bars("X:BTCUSD", 10)
    api.add_trades("X:BTCUSD", 7)
    window = ("--from", iso(T0), "--to", iso(T0 + 10 * MINUTE))
    first = backfill(tmp_path, api, "X:BTCUSD", *window, "--trades", DATABASE_URL=database_url)
    assert first.returncode == 0, first.stderr
    assert stored(database_url, "bars") == 10 and stored(database_url, "trades") == 7
    assert "17 new rows stored" in first.stderr
    requests = len(api.seen)
    again = backfill(tmp_path, api, "X:BTCUSD", *window, "--trades", DATABASE_URL=database_url)
    assert again.returncode == 0, again.stderr
    assert "0 new rows stored" in again.stderr
    assert stored(database_url, "bars") == 10 and stored(database_url, "trades") == 7
    assert len(api.seen) == 2 * requests  # every page fetched once per run
    assert KEY not in first.stdout + first.stderr + again.stdout + again.stderr
    assert all(s.auth == f"Bearer {KEY}" and KEY not in s.path for s in api.seen)


def test_without_from_it_resumes_after_the_last_stored_bar(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
    database_url: str,
) -> None:
    assert run(tmp_path, "migrate", DATABASE_URL=database_url).returncode == 0
    api.add_bars("X:BTCUSD", 12)
    first = backfill(
        tmp_path, api, "X:BTCUSD", "--from", iso(T0), "--to", iso(T0 + 6 * MINUTE),
        DATABASE_URL=database_url,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    api.seen.clear()
    resumed = backfill(
        tmp_path, api, "X:BTCUSD", "--to", iso(T0 + 12 * MINUTE), DATABASE_URL=database_url
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "6 new rows stored" in resumed.stderr
    assert stored(database_url, "bars") == 12
    # the first request starts right after the last stored bar
    assert f"/{T0 + 6 * MINUTE}/" in api.seen[0].path


def test_output_file_is_what_analyze_and_filter_test_read(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
) -> None:
    api.add_bars("X:BTCUSD", 40)
    out = tmp_path / "bars.csv"
    result = backfill(
        tmp_path, api, "X:BTCUSD", "--from", iso(T0), "--to", iso(T0 + 40 * MINUTE),
        "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote 40 bars" in result.stderr
    analyzed = run(tmp_path, "analyze", str(out), "-o", str(tmp_path / "out.csv"))
    assert analyzed.returncode == 0, analyzed.stderr
    lines = (tmp_path / "out.csv").read_text().splitlines()
    header = "symbol,time,open,high,low,close,volume,rsi_14"
    assert len(lines) == 41 and lines[0].startswith(header)
    assert lines[1].startswith(f"X:BTCUSD,{T0},")
    (tmp_path / "up.yaml").write_text("name: up\nwhen: close > open\ntrigger: level\n")
    tested = run(tmp_path, "filter", "test", str(tmp_path / "up.yaml"), "--bars", str(out))
    assert tested.returncode == 0, tested.stderr


def test_mistakes_are_one_sentence_before_any_request(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
) -> None:
    api.add_bars("X:BTCUSD", 3)
    out = str(tmp_path / "b.csv")
    wrong_order = backfill(
        tmp_path, api, "X:BTCUSD", "--from", iso(T0 + MINUTE), "--to", iso(T0), "--output", out
    )
    assert_one_sentence_error(wrong_order)
    assert not api.seen
    nowhere = backfill(tmp_path, api, "X:BTCUSD", "--from", iso(T0))
    assert_one_sentence_error(nowhere, "DATABASE_URL", "--output")
    bad_date = backfill(tmp_path, api, "X:BTCUSD", "--from", "yesterday", "--output", out)
    assert bad_date.returncode == 2 and "--from" in bad_date.stderr  # bad usage
    no_key = run(tmp_path, "backfill", "X:BTCUSD", "--from", iso(T0), "--output", out)
    assert_one_sentence_error(no_key, "POLYGON_API_KEY")
    assert not api.seen
    api.not_entitled.add("X:BTCUSD")
    refused = backfill(
        tmp_path, api, "X:BTCUSD", "--from", iso(T0), "--to", iso(T0 + 3 * MINUTE), "--output", out
    )
    assert_one_sentence_error(refused)
    assert KEY not in refused.stderr


def zigzag(api: FakeMassive, ticker: str, count: int, base: float, start: int = T0) -> None:  # noqa: F811
    """`count` minute bars of `ticker` that rise and fall, so that oscillators swing."""
    rows = {}
    for i in range(count):
        p = base * (1 + 0.02 * ((i * 7) % 11 - 5) / 5 + 0.001 * i)
        rows[start + i * MINUTE] = {
            "o": p,
            "h": p * 1.01,
            "l": p * 0.98,
            "c": p * (1.005 if i % 3 else 0.985),
            "v": 1.0 + i % 5,
            "vw": p,
            "n": 3,
            "t": start + i * MINUTE,
        }
    api.bars[ticker] = rows


def two_symbol_file(tmp_path: Path, api: FakeMassive, name: str) -> Path:  # noqa: F811
    zigzag(api, "X:BTCUSD", 60, 30_000.0)
    zigzag(api, "X:ETHUSD", 50, 2_000.0, start=T0 + 10 * MINUTE)
    out = tmp_path / name
    result = backfill(
        tmp_path, api, "X:BTCUSD", "ETH-USD", "--from", iso(T0), "--to", iso(T0 + 60 * MINUTE),
        "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote 110 bars" in result.stderr
    return out


@pytest.mark.parametrize("name", ["bars.csv", "bars.parquet"])
def test_output_file_has_a_symbol_column_sorted_by_symbol_then_time(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
    name: str,
) -> None:
    out = two_symbol_file(tmp_path, api, name)
    frame = pl.read_csv(out) if name.endswith(".csv") else pl.read_parquet(out)
    assert frame.columns == ["symbol", "time", "open", "high", "low", "close", "volume"]
    assert frame["symbol"].to_list() == ["X:BTCUSD"] * 60 + ["X:ETHUSD"] * 50
    assert frame["time"].to_list() == [T0 + i * MINUTE for i in range(60)] + [
        T0 + (10 + i) * MINUTE for i in range(50)
    ]
    assert frame.row(60)[2:] == pytest.approx(
        [api.bars["X:ETHUSD"][T0 + 10 * MINUTE][k] for k in "ohlcv"]
    )


def test_a_two_symbol_file_is_what_analyze_and_filter_test_read(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
) -> None:
    out = two_symbol_file(tmp_path, api, "bars.csv")
    # each symbol's rows alone, as a file of one symbol without a symbol column
    alone = {}
    for symbol in ("X:BTCUSD", "X:ETHUSD"):
        alone[symbol] = tmp_path / f"{symbol[2:]}.csv"
        read_bars(out, symbol).drop("symbol").write_csv(alone[symbol])

    analyzed = run(tmp_path, "analyze", str(out), "-o", str(tmp_path / "out.parquet"))
    assert analyzed.returncode == 0, analyzed.stderr
    result = pl.read_parquet(tmp_path / "out.parquet")
    assert result.columns[:2] == ["symbol", "time"]
    for symbol, path in alone.items():
        assert result.filter(pl.col("symbol") == symbol).drop("symbol").equals(analyze(path))

    (tmp_path / "up.yaml").write_text("name: up\nwhen: close > open\ntrigger: edge\n")
    tested = run(
        tmp_path, "filter", "test", str(tmp_path / "up.yaml"), "--bars", str(out), "--json"
    )
    assert tested.returncode == 0, tested.stderr
    fired = [a["symbol"] for a in records(tested.stdout)]
    for symbol, path in alone.items():
        single = run(
            tmp_path, "filter", "test", str(tmp_path / "up.yaml"), "--bars", str(path),
            "--symbol", symbol, "--json",
        )  # fmt: skip
        assert single.returncode == 0, single.stderr
        assert fired.count(symbol) == len(records(single.stdout)) > 0, symbol
