"""Gap repair as a user meets it: the loopback feed goes dark for seconds while its trades go
on, the local REST API holds them, and `watch` rebuilds the bars the outage touched."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import psycopg

from polystream.schema import TRADE
from polystream.simulator import DemoFeed
from polystream.window import BarEngine, BarOptions
from test_cli import env, records, run
from test_rest import KEY, FakeMassive, Reply, api  # noqa: F401  (the fixture is used by name)

FIELDS = ("open", "high", "low", "close", "volume", "trades", "buy_volume", "sell_volume")


def reference_bars(tape: list[dict[str, object]]) -> dict[int, dict[str, object]]:
    """1s bars made from every trade the feed generated, delivered or not."""
    ms = [int(t["participant_timestamp"]) // 1_000_000 for t in tape]  # type: ignore[call-overload]
    trades = pl.DataFrame(
        {
            "symbol": ["X:BTCUSD"] * len(tape),
            "time": ms,
            "price": [t["price"] for t in tape],
            "size": [t["size"] for t in tape],
            "side": [t["conditions"][0] for t in tape],  # type: ignore[index]
            "exchange": [t["exchange"] for t in tape],
            "trade_id": [t["id"] for t in tape],
            "received": ms,
        },
        schema=TRADE,
    )
    engine = BarEngine(BarOptions(timeframes=(1_000,)))
    bars = pl.concat([engine.add_trades(trades), engine.finish()])
    return {r["start"]: r for r in bars.iter_rows(named=True)}


def test_an_outage_is_repaired_to_the_bars_of_a_run_without_it(
    tmp_path: Path,
    database_url: str,
    api: FakeMassive,  # noqa: F811
) -> None:
    assert run(tmp_path, "migrate", DATABASE_URL=database_url).returncode == 0
    tape: list[dict[str, object]] = []
    api.trade_rows["X:BTCUSD"] = tape  # the REST API knows every trade the feed made
    api.page_size = 100_000
    (tmp_path / "filters").mkdir()
    with DemoFeed(api_key=KEY, tape=tape, seed=5, events_per_second=40) as feed:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "polystream", "watch", "X:BTCUSD", "--feed", feed.url,
                "-t", "1s", "--json", "--no-ui", "--no-warmup", "--duration", "26",
            ],
            cwd=tmp_path,
            env=env(
                tmp_path,
                POLYGON_API_KEY=KEY,
                POLYGON_REST_URL=api.url,
                DATABASE_URL=database_url,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            time.sleep(6)
            feed.blackout(4)
            out, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    recs = records(out)
    statuses = [r for r in recs if r["type"] == "status"]
    gaps = [r for r in statuses if r["event"] == "gap"]
    repaired = [r for r in statuses if r["event"] == "gap_repaired"]
    assert gaps, statuses
    assert repaired and "bars rebuilt from" in str(repaired[0]["detail"]), statuses
    latest: dict[int, dict[str, object]] = {}
    for r in recs:
        if r["type"] == "bar" and r["state"] in ("final", "revised"):
            latest[int(r["start"])] = r  # type: ignore[call-overload]
    revised = {int(r["start"]) for r in recs if r.get("state") == "revised"}  # type: ignore[call-overload]
    assert len(revised) >= 4  # the outage lasted seconds
    reference = reference_bars(tape)
    starts = sorted(latest)[1:]  # the first bar began before the run did
    assert min(revised) > starts[0] and max(revised) < starts[-1]
    for start in starts:
        got, want = latest[start], reference[start]
        assert {f: got[f] for f in FIELDS} == {f: want[f] for f in FIELDS}, start
    # every trade of the repaired window is stored once: those received live, and those the
    # outage withheld, from the repair
    lo, hi = min(revised), max(revised) + 1_000
    every = {str(t["id"]) for t in tape if lo <= int(t["participant_timestamp"]) // 10**6 < hi}  # type: ignore[call-overload]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT trade_id FROM trades"
            " WHERE time >= to_timestamp(%s) AND time < to_timestamp(%s)",
            (lo / 1000, hi / 1000),
        ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(every)


def test_without_trades_in_the_plan_the_aggregates_rebuild_the_bars() -> None:
    engine = BarEngine(BarOptions(timeframes=(1_000,), lateness=0))
    t0 = 1_700_000_000_000
    before = pl.DataFrame(
        [
            ("X:BTCUSD", t0 + 100, 100.0, 1.0, 2, 1, "a", t0 + 105),
            ("X:BTCUSD", t0 + 200, 100.0, 1.0, 2, 1, "b", t0 + 205),
        ],
        schema=list(TRADE.items()),
        orient="row",
    )
    engine.add_trades(before)
    # the feed is silent for four seconds: the clock closes them as zero-volume bars
    quiet = engine.advance(t0 + 5_000 - (engine.offset or 0))
    assert quiet.filter(pl.col("trades") == 0).height == 4
    aggs = pl.DataFrame(
        {
            "time": [t0 + 2_000, t0 + 3_000],
            "open": [101.0, 103.0],
            "high": [102.5, 104.0],
            "low": [100.5, 102.0],
            "close": [102.0, 103.5],
            "volume": [3.0, 0.5],
            "vwap": [101.5, 103.2],
            "trades": [9, 2],
        }
    )
    rebuilt = engine.rebuild_from_aggregates("X:BTCUSD", 1_000, t0 + 1_000, t0 + 5_000, aggs)
    got = {r["start"] - t0: r for r in rebuilt.iter_rows(named=True)}
    assert sorted(got) == [1_000, 2_000, 3_000, 4_000]
    assert {r["state"] for r in got.values()} == {"revised"}
    assert (got[2_000]["open"], got[2_000]["close"], got[2_000]["volume"]) == (101.0, 102.0, 3.0)
    assert got[2_000]["trades"] == 9 and got[3_000]["vwap"] == 103.2
    # buckets the API has no aggregate for stay empty, at the previous close
    assert got[1_000]["trades"] == 0 and got[1_000]["close"] == 100.0
    assert got[4_000]["trades"] == 0 and got[4_000]["open"] == 103.5


def test_without_a_database_the_warm_up_comes_over_rest(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
) -> None:
    now = int(time.time()) * 1000
    api.page_size = 50
    price = 4_090.0
    history: dict[int, dict[str, object]] = {}
    for k in range(120, 0, -1):
        start = now - k * 1000
        price += 0.6 if k % 3 else -0.9
        history[start] = {
            "t": start, "o": price, "h": price + 0.4, "l": price - 0.4, "c": price,
            "v": 1.2, "vw": price, "n": 5,
        }  # fmt: skip
    api.bars["X:BTCUSD"] = history
    (tmp_path / "filters").mkdir()
    with DemoFeed(api_key=KEY, seed=2, events_per_second=40) as feed:
        result = run(
            tmp_path, "watch", "X:BTCUSD", "--feed", feed.url, "-t", "1s", "--json", "--no-ui",
            "--duration", "4", POLYGON_API_KEY=KEY, POLYGON_REST_URL=api.url,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    recs = records(result.stdout)
    warmed = [r for r in recs if r["type"] == "status" and r["event"] == "warmed"]
    assert warmed and str(warmed[0]["detail"]).startswith("120 "), warmed
    first = next(r for r in recs if r["type"] == "bar" and r["state"] == "final")
    indicators = [k for k in list(first)[list(first).index("state") + 1 :] if k != "flow_imbalance"]
    assert all(first[k] is not None for k in indicators), first
    assert KEY not in result.stdout + result.stderr


def test_a_failing_rest_api_costs_the_warm_up_not_the_run(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
) -> None:
    api.always = Reply(503, {"status": "ERROR", "error": "down for maintenance"})
    (tmp_path / "filters").mkdir()
    began = time.monotonic()
    with DemoFeed(api_key=KEY, seed=2, events_per_second=40) as feed:
        result = run(
            tmp_path, "watch", "X:BTCUSD", "--feed", feed.url, "-t", "1s", "--json", "--no-ui",
            "--duration", "3", POLYGON_API_KEY=KEY, POLYGON_REST_URL=api.url,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "no warm-up over REST" in result.stderr and KEY not in result.stderr
    assert time.monotonic() - began < 30
    assert any(r["type"] == "bar" for r in records(result.stdout))
