"""Write throughput of `polystream.store.Store` for trades, against a plain COPY of the same rows.

One run, one seeded and realistic trade stream (`--rows`, default 1 M) over X:BTCUSD, X:ETHUSD and
X:SOLUSD on five exchanges: prices on each venue's tick, fractional sizes, side 1 or 2, string ids
(one trade in a hundred without one, so it is keyed by its content), event times advancing about
300 trades/s with receipt times a few ms later. The benchmark starts its own throwaway PostgreSQL
cluster (``tests/postgres.py``) with the server's default durability settings (fsync and
synchronous commit on), and a fresh database for each timed run.

It measures, best of `--repeat` rounds, each round timing every path once:

1. the writer: ``Store(url, state_dir).start()``, the stream offered as frames of `--frame-rows`
   rows (``schema.TRADE``, as the pipeline hands them over), then ``stop()``; timed from the first
   offer until ``stop`` returns with every row committed (the count is checked, and the journal
   must be empty). The schema comes from ``migrate``, so the table has its unique key
   (symbol, exchange, trade_id, time);
2. ``psql``'s ``\\copy`` of the same rows from a CSV file (timestamps as ISO text, written
   beforehand and not timed) into a bare table with the same columns and no index;
3. the same ``\\copy`` into a table with the same columns and the same unique index as `trades`;
4. the writer again on the database of (1): the same frames offered a second time, every row a
   duplicate (what replaying a journal after an unclean outage costs at worst).

A CHECKPOINT precedes every timed run, so that each starts with the same WAL state. Then the
ratios, and a summary against the targets: >= 100,000 rows/s, and >= 50% of a plain COPY (given
against both COPY variants).

Run from the project root:

    . .venv/bin/activate
    python benchmarks/bench_store.py [--rows N] [--frame-rows K] [--repeat R]

The defaults take about a minute. The exit code is always 0: this reports numbers, it
does not gate anything.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import polars as pl
import psycopg
from common import cpu_model, version

from polystream import store
from polystream.schema import TRADE

TARGET_ROWS_PER_S = 100_000
TARGET_VS_COPY = 0.50
ROOT = Path(__file__).resolve().parent.parent
T0_MS = 1_717_000_000_000  # 2024-05-29T16:26:40Z; only relative times matter
COLUMNS = ("symbol", "time", "exchange", "trade_id", "price", "size", "side", "received")


def _load_postgres() -> ModuleType:
    """`tests/postgres.py`, imported by path: the tests directory is not a package."""
    spec = importlib.util.spec_from_file_location("postgres", ROOT / "tests" / "postgres.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


postgres = _load_postgres()


@dataclass(frozen=True)
class PairSpec:
    symbol: str
    price: float
    tick: float
    weight: float
    size: float  # median size, base currency
    size_dp: int


PAIRS = (
    PairSpec("X:BTCUSD", 67_250.0, 0.01, 0.45, 0.012, 8),
    PairSpec("X:ETHUSD", 3_480.0, 0.01, 0.35, 0.15, 8),
    PairSpec("X:SOLUSD", 148.0, 0.001, 0.20, 3.0, 6),
)
EXCHANGES = (1, 2, 6, 10, 23)  # Coinbase, Bitfinex, Bitstamp, Binance, Kraken
NO_ID_SHARE = 0.01


def make_trades(n: int, seed: int) -> pl.DataFrame:
    rng = random.Random(seed)
    prices = {p.symbol: p.price for p in PAIRS}
    next_id = {(p.symbol, x): rng.randrange(10**8, 10**9) for p in PAIRS for x in EXCHANGES}
    cols: dict[str, list[object]] = {c: [] for c in TRADE}
    t = T0_MS
    for _ in range(n):
        pair = rng.choices(PAIRS, weights=[p.weight for p in PAIRS])[0]
        exchange = rng.choice(EXCHANGES)
        t += int(rng.expovariate(1 / 3.3))  # about 300 trades/s
        price = prices[pair.symbol] * (1 + rng.gauss(0, 0.00004))
        prices[pair.symbol] = price
        key = (pair.symbol, exchange)
        next_id[key] += rng.randint(1, 3)
        cols["symbol"].append(pair.symbol)
        cols["time"].append(t)
        cols["price"].append(round(round(price / pair.tick) * pair.tick, 6))
        cols["size"].append(round(pair.size * rng.lognormvariate(0, 1.2), pair.size_dp))
        cols["side"].append(rng.choice((1, 2)))
        cols["exchange"].append(exchange)
        cols["trade_id"].append(None if rng.random() < NO_ID_SHARE else str(next_id[key]))
        cols["received"].append(t + rng.randint(2, 40))
    return pl.DataFrame(cols, schema=TRADE)


def write_csv(frame: pl.DataFrame, path: Path) -> None:
    """The rows as `COPY … (FORMAT csv)` reads them into the table's own column types."""
    as_time = {c: pl.from_epoch(c, "ms").dt.replace_time_zone("UTC") for c in ("time", "received")}
    # What the writer stores for a trade without an id (the float text differs in form only).
    content = pl.format("~{}:{}:{}", "price", "size", "side")
    trade_id = pl.col("trade_id").fill_null(content)
    frame.with_columns(trade_id=trade_id, **as_time).select(COLUMNS).write_csv(
        path, include_header=False, datetime_format="%Y-%m-%dT%H:%M:%S%.3f%:z"
    )


def fmt_rate(per_s: float) -> str:
    return f"{per_s:>11,.0f} rows/s"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


class Bench:
    def __init__(self, cluster: Any, trades: pl.DataFrame, frame_rows: int, tmp: Path) -> None:
        self.cluster = cluster
        self.trades = trades
        self.frames = [trades.slice(i, frame_rows) for i in range(0, trades.height, frame_rows)]
        self.tmp = tmp
        self.csv = tmp / "trades.csv"
        self.psql = postgres.find_client("psql", cluster.bindir)
        self._dbs = 0

    def database(self) -> str:
        self._dbs += 1
        url: str = self.cluster.create_database(f"bench_{self._dbs}")
        store.migrate(url)
        return url

    def checkpoint(self, url: str) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")

    def count(self, url: str, table: str) -> int:
        with psycopg.connect(url) as conn:
            row = conn.execute(f"SELECT count(*) FROM {table}".encode()).fetchone()
        return int(row[0]) if row else -1

    def writer(self, url: str) -> tuple[float, store.StoreStats]:
        self.checkpoint(url)
        state = Path(tempfile.mkdtemp(dir=self.tmp))
        s = store.Store(url, state)
        s.start()
        t0 = time.perf_counter()
        for frame in self.frames:
            s.offer("trades", frame)
        s.stop(timeout=600)
        elapsed = time.perf_counter() - t0
        if s.fatal is not None:
            raise SystemExit(f"the writer failed: {s.fatal}")
        return elapsed, s.stats

    def copy(self, indexed: bool) -> float:
        url = self.database()
        table = "plain_indexed" if indexed else "plain_bare"
        like = "LIKE trades INCLUDING INDEXES" if indexed else "LIKE trades"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {table} ({like})".encode())
        self.checkpoint(url)
        command = f"\\copy {table} ({', '.join(COLUMNS)}) FROM '{self.csv}' WITH (FORMAT csv)"
        t0 = time.perf_counter()
        subprocess.run(
            [self.psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", command],
            check=True,
        )
        elapsed = time.perf_counter() - t0
        if self.count(url, table) != self.trades.height:
            raise SystemExit(f"COPY into {table} stored the wrong number of rows")
        return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rows", type=int, default=1_000_000, help="trade rows per timed run")
    ap.add_argument("--frame-rows", type=int, default=50_000, help="rows per offered frame")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the best of each path counts")
    ap.add_argument("--seed", type=int, default=20240529)
    ap.add_argument("--tmp", type=Path, default=None, help="directory for the CSV and journals")
    args = ap.parse_args(argv)

    print("== Environment ==")
    print(
        f"  python {platform.python_version()} ({platform.python_implementation()}), "
        f"polars {version('polars')}, psycopg {version('psycopg')}, "
        f"polystream {version('polystream')}"
    )
    print(f"  {platform.platform()}; CPU: {cpu_model()}; {os.cpu_count()} CPUs (not pinned)")

    # The server's defaults: durability as a user would run it, unlike the tests' cluster.
    with (
        postgres.Cluster(settings={}) as cluster,
        tempfile.TemporaryDirectory(prefix="bench_store-", dir=args.tmp) as tmp_name,
    ):
        tmp = Path(tmp_name)
        with psycopg.connect(cluster.url()) as conn:
            server = conn.execute("SHOW server_version").fetchone()
            settings = conn.execute(
                "SELECT name, setting, unit FROM pg_settings WHERE name IN ('fsync', "
                "'synchronous_commit', 'full_page_writes', 'shared_buffers', 'max_wal_size', "
                "'wal_level') ORDER BY name"
            ).fetchall()
        print(f"  PostgreSQL {server[0] if server else '?'} on 127.0.0.1:{cluster.port}, ", end="")
        print(", ".join(f"{n}={v}{'' if u is None else ' ' + u}" for n, v, u in settings))

        print(f"\n== Stream (seed {args.seed}) ==")
        t0 = time.perf_counter()
        trades = make_trades(args.rows, args.seed)
        bench = Bench(cluster, trades, args.frame_rows, tmp)
        write_csv(trades, bench.csv)
        built = time.perf_counter() - t0
        by_symbol = trades["symbol"].value_counts(sort=True).rows()
        span_ms = trades.select(pl.col("time").max() - pl.col("time").min()).item()
        print(
            f"  {trades.height:,} trades ("
            + ", ".join(f"{s} {n / trades.height:.0%}" for s, n in by_symbol)
            + f") on {trades['exchange'].n_unique()} exchanges, "
            f"{trades['trade_id'].null_count():,} without an id; spanning "
            f"{span_ms / 3_600_000:.1f} h of event time"
        )
        print(
            f"  offered as {len(bench.frames)} frames of {args.frame_rows:,} rows; "
            f"CSV for COPY {bench.csv.stat().st_size / 1e6:.1f} MB; built in {built:.1f} s "
            "(not timed)"
        )
        print(f"  sample CSV row: {bench.csv.open().readline().strip()}")

        print(f"\n== Throughput, best of {args.repeat} ==")
        paths = {
            "writer (Store, new rows)": "writer",
            "plain COPY, bare table": "bare",
            "plain COPY, same unique index": "indexed",
            "writer, every row a duplicate": "again",
        }
        best: dict[str, float] = {}
        last_stats: store.StoreStats | None = None
        for rnd in range(args.repeat):
            for label, key in paths.items():
                if key == "writer":
                    url = bench.database()
                    elapsed, last_stats = bench.writer(url)
                    stored = bench.count(url, "trades")
                    detail = f"{stored:,} rows stored, journal files {last_stats.journal_files}"
                    if stored != trades.height or last_stats.journal_files:
                        detail += "  MISMATCH"
                elif key == "again":
                    elapsed, stats = bench.writer(url)
                    stored = bench.count(url, "trades")
                    detail = f"{stats.rows_written:,} rows changed, {stored:,} rows stored"
                    if stored != trades.height or stats.rows_written:
                        detail += "  MISMATCH"
                else:
                    elapsed = bench.copy(indexed=key == "indexed")
                    detail = ""
                rate = trades.height / elapsed
                best[key] = max(best.get(key, 0.0), rate)
                print(
                    f"  round {rnd + 1}  {label:<32} {elapsed:7.3f} s  {fmt_rate(rate)}  {detail}"
                )
        print()
        for label, key in paths.items():
            print(
                f"  best     {label:<32} {trades.height / best[key]:7.3f} s  {fmt_rate(best[key])}"
            )
        vs_bare = best["writer"] / best["bare"]
        vs_indexed = best["writer"] / best["indexed"]
        print(f"  ratio writer / plain COPY into a bare table (no index)      {vs_bare:6.3f}")
        print(f"  ratio writer / plain COPY with the same unique index        {vs_indexed:6.3f}")
        print(
            f"  ratio writer on duplicates / writer on new rows             "
            f"{best['again'] / best['writer']:6.3f}"
        )

    print("\n== Summary ==")
    rows: list[tuple[str, str, bool]] = [
        (
            f"writer >= {TARGET_ROWS_PER_S:,} trade rows/s",
            f"{best['writer']:,.0f} /s",
            best["writer"] >= TARGET_ROWS_PER_S,
        ),
        (
            f"writer >= {TARGET_VS_COPY:.0%} of plain COPY, bare table",
            f"{vs_bare:.1%}",
            vs_bare >= TARGET_VS_COPY,
        ),
        (
            f"writer >= {TARGET_VS_COPY:.0%} of plain COPY, same unique index",
            f"{vs_indexed:.1%}",
            vs_indexed >= TARGET_VS_COPY,
        ),
    ]
    for target, measured, ok in rows:
        print(f"  {target:<52} {measured:>16}   {_verdict(ok)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
