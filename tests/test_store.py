"""The store against a real PostgreSQL: migrations, error sentences, every table written and read
back, idempotent replays, upserts, and no row lost or doubled across an outage of the server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pytest
from postgres import Cluster, free_port

from polystream import store
from polystream.errors import ConfigError
from polystream.filters.engine import Alert
from polystream.indicators import IndicatorParams
from polystream.schema import QUOTE as QUOTE_SCHEMA
from polystream.schema import TRADE as TRADE_SCHEMA
from polystream.store import Store, StoreError
from polystream.window import BarEngine, BarOptions

SECRET = "Sup3r-S3cret-pw"
T0 = 1_717_000_000_000  # 2024-05-29T16:26:40Z
FAST = {"flush_every": 0.05, "backoff_initial": 0.05, "backoff_max": 0.2}
MIGRATIONS = ["0001_tables", "0002_timescale", "0003_bars_1h"]


# --- helpers ------------------------------------------------------------------------------------


def ts(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql.encode()).fetchall()


def count(url: str, table: str) -> int:
    return int(query(url, f"SELECT count(*) FROM {table}")[0][0])


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def trades(n: int, first: int = 0, symbol: str = "X:BTCUSD") -> pl.DataFrame:
    """`n` trades with ids `first`…; every fifth has no id and must be keyed by its content."""
    ids = range(first, first + n)
    return pl.DataFrame(
        {
            "symbol": [symbol] * n,
            "time": [T0 + i * 7 for i in ids],
            "price": [67_250.0 + (i % 97) * 0.01 for i in ids],
            "size": [0.001 * (1 + i % 13) for i in ids],
            "side": [1 + i % 2 for i in ids],
            "exchange": [1 + i % 3 for i in ids],
            "trade_id": [None if i % 5 == 4 else f"t{i}" for i in ids],
            "received": [T0 + i * 7 + 25 for i in ids],
        },
        schema=TRADE_SCHEMA,
    )


def trade_keys(url: str) -> list[str]:
    return [r[0] for r in query(url, "SELECT trade_id FROM trades ORDER BY trade_id, time")]


def content_key(price: float, size: float, side: int) -> str:
    """The id a trade without one is stored under: PostgreSQL's shortest float text."""
    p, s = (repr(x).removesuffix(".0") for x in (price, size))
    return f"~{p}:{s}:{side}"


def expected_keys(frame: pl.DataFrame) -> list[str]:
    rows = frame.select("trade_id", "price", "size", "side").rows()
    return sorted(tid or content_key(price, size, side) for tid, price, size, side in rows)


def quotes(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "symbol": ["X:ETHUSD"] * n,
            "time": [T0 + i for i in range(n)],
            "bid": [3480.1 + i for i in range(n)],
            "bid_size": [1.5] * n,
            "ask": [3480.2 + i for i in range(n)],
            "ask_size": [0.25] * n,
            "exchange": [2] * n,
            "received": [T0 + i + 3 for i in range(n)],
        },
        schema=QUOTE_SCHEMA,
    )


PARAMS = IndicatorParams(
    rsi=3,
    stoch_k=3,
    stoch_slow_k=2,
    stoch_d=2,
    macd_fast=2,
    macd_slow=3,
    macd_signal=2,
    ao_fast=2,
    ao_slow=3,
    cci=3,
    bb=3,
    sma=(2,),
    ema=(2,),
)


def bars() -> tuple[pl.DataFrame, pl.DataFrame]:
    """Real bar records (final, with every indicator warmed up) and a partial one."""
    engine = BarEngine(BarOptions(timeframes=(60_000,), params=PARAMS))
    minutes = 12
    frame = pl.DataFrame(
        {
            "symbol": ["X:BTCUSD"] * minutes * 3,
            "time": [T0 + m * 60_000 + k * 10_000 for m in range(minutes) for k in range(3)],
            "price": [67_000.0 + (m * 37 + k * 11) % 50 for m in range(minutes) for k in range(3)],
            "size": [0.5 + k for _ in range(minutes) for k in range(3)],
            "side": [1 + k % 2 for _ in range(minutes) for k in range(3)],
            "exchange": [1] * minutes * 3,
            "trade_id": [None] * minutes * 3,
            "received": [T0 + m * 60_000 + k * 10_000 for m in range(minutes) for k in range(3)],
        },
        schema=TRADE_SCHEMA,
    )
    emitted = engine.add_trades(frame)
    partial = engine.partial()
    final = pl.concat([emitted, engine.finish()])
    return final, partial


def books() -> pl.DataFrame:
    levels = [([[67_250.5, 0.4], [67_250.0, 1.25]], [[67_251.0, 0.3]]), ([], [[1.0, 2.0]])]
    return pl.DataFrame(
        {
            "symbol": ["X:BTCUSD", "X:BTCUSD"],
            "time": [T0, T0 + 100],
            "exchange": [1, 1],
            "bids": [json.dumps(b) for b, _ in levels],
            "asks": [json.dumps(a) for _, a in levels],
        },
        schema_overrides={"exchange": pl.Int16},
    )


def alerts() -> pl.DataFrame:
    message = 'RSI 27.3, "low"\nat 4091.2'  # a comma, quotes and a newline for the CSV
    fired = [
        Alert("rsi-low", "X:BTCUSD", "1m", T0, "warning", message, {"rsi_14": 27.3, "close": 1.5}),
        Alert("whale", "X:ETHUSD", None, T0 + 5, "critical", "whale", {"size": 150.0, "x": None}),
    ]
    return pl.DataFrame([{**a.record(), "values": json.dumps(a.values)} for a in fired])


def gaps() -> pl.DataFrame:
    return pl.DataFrame(
        {"symbol": ["X:BTCUSD", "X:ETHUSD"], "start": [T0, T0], "end": [T0 + 5_000, T0 + 9_000]}
    )


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    return {
        t: sorted(query(url, f"SELECT * FROM {t}"), key=repr)
        for t in ("trades", "quotes", "bars", "book_snapshots", "alerts", "gaps")
    }


@pytest.fixture
def migrated(database_url: str) -> str:
    store.migrate(database_url)
    return database_url


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[Callable[..., Store]]:
    """Build stores (fast timings, journal under tmp_path unless given); all stopped at the end."""
    made: list[Store] = []

    def make(url: str, state_dir: Path | None = None, start: bool = True, **kw: Any) -> Store:
        s = Store(url, state_dir or tmp_path / "state", **{**FAST, **kw})
        made.append(s)
        return s.start() if start else s

    yield make
    for s in made:
        s.stop(timeout=5)


def offer_all(s: Store) -> None:
    final, partial = bars()
    s.offer("trades", trades(50))
    s.offer("quotes", quotes(20))
    s.offer("bars", final)
    s.offer("bars", partial)
    s.offer("books", books())
    s.offer("alerts", alerts())
    s.offer("gaps", gaps())


# --- migrations ---------------------------------------------------------------------------------


def test_migrate_applies_all_then_nothing(database_url: str) -> None:
    assert store.migration_status(database_url) == [(m, False) for m in MIGRATIONS]
    assert store.migrate(database_url) == MIGRATIONS
    assert store.migrate(database_url) == []
    assert store.migration_status(database_url) == [(m, True) for m in MIGRATIONS]
    tables = {r[0] for r in query(database_url, "SELECT tablename FROM pg_tables")}
    assert {"trades", "quotes", "bars", "book_snapshots", "alerts", "gaps"} <= tables


def test_rollback_undoes_the_last_migration(database_url: str) -> None:
    assert store.rollback(database_url) is None
    store.migrate(database_url)
    assert store.rollback(database_url) == "0003_bars_1h"
    assert store.migration_status(database_url) == [
        ("0001_tables", True),
        ("0002_timescale", True),
        ("0003_bars_1h", False),
    ]
    assert store.rollback(database_url) == "0002_timescale"
    assert store.rollback(database_url) == "0001_tables"
    assert store.rollback(database_url) is None
    tables = {r[0] for r in query(database_url, "SELECT tablename FROM pg_tables")}
    assert not {"trades", "bars", "gaps"} & tables
    assert store.migrate(database_url) == MIGRATIONS  # the rollbacks left a clean slate


def test_require_migrated_names_the_command(database_url: str) -> None:
    with pytest.raises(ConfigError) as err:
        store.require_migrated(database_url)
    assert "`polystream migrate`" in str(err.value)
    assert "lacks 3 migrations" in str(err.value)
    store.migrate(database_url)
    store.require_migrated(database_url)


# --- error sentences ----------------------------------------------------------------------------


def one_sentence(text: str) -> None:
    assert "\n" not in text and text.endswith(".") and text[0].isupper(), text
    assert SECRET not in text, text


def test_unreachable_server_is_one_sentence_without_the_password() -> None:
    port = free_port()
    url = f"postgresql://trader:{SECRET}@127.0.0.1:{port}/polystream"
    with pytest.raises(StoreError) as err:
        store.migrate(url)
    one_sentence(str(err.value))
    assert str(err.value) == (
        f"Cannot connect to PostgreSQL at 127.0.0.1:{port}/polystream: connection refused."
    )


def test_bad_urls_are_one_sentence_without_the_password(postgres: Cluster) -> None:
    missing = postgres.url("no_such_db", password=SECRET)
    with pytest.raises(StoreError) as err:
        store.migration_status(missing)
    one_sentence(str(err.value))
    assert f"127.0.0.1:{postgres.port}/no_such_db" in str(err.value)
    assert 'database "no_such_db" does not exist' in str(err.value)

    for bad in (
        f"postgresql://trader:{SECRET}@127.0.0.1:54x/polystream",
        f"mysql://trader:{SECRET}@127.0.0.1/polystream",
    ):
        with pytest.raises(StoreError) as err:
            store.migrate(bad)
        one_sentence(str(err.value))
        assert "trader:…@127.0.0.1" in str(err.value)


def test_a_refused_login_is_fatal(postgres: Cluster, make_store: Callable[..., Store]) -> None:
    url = f"postgresql://nobody:{SECRET}@127.0.0.1:{postgres.port}/postgres"
    s = make_store(url)
    s.offer("trades", trades(3))
    wait_for(lambda: s.fatal is not None, "the fatal error")
    one_sentence(str(s.fatal))
    assert 'role "nobody" does not exist' in str(s.fatal)
    s.stop()
    assert s.stats.journal_files == 1  # kept for a run with a corrected URL


def test_missing_tables_are_fatal_and_name_migrate(
    database_url: str, make_store: Callable[..., Store]
) -> None:
    s = make_store(database_url)
    s.offer("trades", trades(3))
    wait_for(lambda: s.fatal is not None, "the fatal error")
    assert isinstance(s.fatal, ConfigError)
    assert "run `polystream migrate`" in str(s.fatal)
    s.stop()
    assert s.stats.journal_files == 1
    store.migrate(database_url)
    again = make_store(database_url)
    wait_for(lambda: count(database_url, "trades") == 3, "the journal to be replayed")
    again.stop()
    assert again.stats.journal_files == 0


def test_offer_rejects_unknown_tables_and_columns(tmp_path: Path) -> None:
    s = Store("postgresql://u@127.0.0.1:1/x", tmp_path)
    with pytest.raises(ValueError, match="unknown table"):
        s.offer("candles", trades(1))
    with pytest.raises(ValueError, match="lacks the column"):
        s.offer("quotes", trades(1))
    with pytest.raises(ValueError, match="JSON text"):
        s.offer("books", books().with_columns(pl.lit(1).alias("bids")))
    with pytest.raises(ValueError, match="column time of a frame for trades has type String"):
        s.offer("trades", trades(1).with_columns(pl.col("time").cast(pl.String)))
    assert s.stats.journal_files == 0


# --- writing ------------------------------------------------------------------------------------


def test_every_table_round_trips(migrated: str, make_store: Callable[..., Store]) -> None:
    s = make_store(migrated)
    offer_all(s)
    s.stop()
    assert s.fatal is None and s.stats.journal_files == 0

    t = trades(50)
    rows = query(
        migrated,
        "SELECT symbol, time, exchange, trade_id, price, size, side, received FROM trades",
    )
    expected = [
        (sym, ts(tm), ex, tid or content_key(p, sz, sd), p, sz, sd, ts(rc))
        for sym, tm, p, sz, sd, ex, tid, rc in t.rows()
    ]
    assert sorted(rows) == sorted(expected)

    q = quotes(20)
    rows = query(
        migrated,
        "SELECT symbol, time, bid, bid_size, ask, ask_size, exchange, received FROM quotes",
    )
    assert sorted(rows) == sorted(
        (sym, ts(tm), b, bs, a, az, ex, ts(rc)) for sym, tm, b, bs, a, az, ex, rc in q.rows()
    )

    final, _ = bars()
    assert final.height > 10 and final["rsi_3"].null_count() < final.height
    got = pl.DataFrame(
        query(migrated, "SELECT * FROM bars ORDER BY start"),
        schema=[
            "symbol", "timeframe", "start", "end", "open", "high", "low", "close", "volume",
            "vwap", "trades", "buy_volume", "sell_volume", "state", "rsi", "stoch_k", "stoch_d",
            "macd", "macd_signal", "macd_hist", "ao", "cci", "bb_upper", "bb_middle", "bb_lower",
            "flow_imbalance",
        ],
        orient="row",
    )  # fmt: skip
    want = final.rename({"rsi_3": "rsi", "cci_3": "cci"}).drop("sma_2", "ema_2")
    assert got.height == want.height  # the partial bar is not stored
    for column in want.columns:
        if column in ("start", "end"):
            assert got[column].to_list() == [ts(v) for v in want[column]], column
        else:
            assert got[column].to_list() == want[column].to_list(), column

    rows = query(migrated, "SELECT symbol, time, exchange, bids, asks FROM book_snapshots")
    assert sorted(rows) == sorted(
        (sym, ts(tm), ex, json.loads(b), json.loads(a)) for sym, tm, ex, b, a in books().rows()
    )

    rows = query(
        migrated,
        'SELECT filter, symbol, timeframe, time, severity, message, "values" FROM alerts',
    )
    want_alerts = []
    for r in alerts().iter_rows(named=True):
        head = (r["filter"], r["symbol"], r["timeframe"], ts(r["time"]))
        want_alerts.append((*head, r["severity"], r["message"], json.loads(r["values"])))
    assert sorted(rows, key=repr) == sorted(want_alerts, key=repr)

    rows = query(migrated, 'SELECT symbol, start, "end" FROM gaps')
    assert sorted(rows) == sorted((s, ts(a), ts(b)) for s, a, b in gaps().rows())


def test_the_same_batch_twice_changes_nothing(
    migrated: str, make_store: Callable[..., Store]
) -> None:
    first = make_store(migrated)
    offer_all(first)
    first.stop()
    before = snapshot(migrated)
    assert all(before.values())

    second = make_store(migrated)
    offer_all(second)
    offer_all(second)  # and twice within one transaction
    second.stop()
    assert snapshot(migrated) == before
    assert second.stats.rows_written == 0
    assert second.fatal is None


def test_a_revised_bar_replaces_the_final_one(
    migrated: str, make_store: Callable[..., Store]
) -> None:
    final, _ = bars()
    last = final.tail(1)
    revised = last.with_columns(
        pl.lit("revised").alias("state"),
        pl.lit(99_999.0).alias("close"),
        pl.lit(9.0).alias("rsi_3"),
    )
    s = make_store(migrated)
    s.offer("bars", final)
    wait_for(lambda: count(migrated, "bars") == final.height, "the final bars")
    s.offer("bars", revised)
    s.stop()
    start = ts(last["start"][0])
    assert query(migrated, f"SELECT state, close, rsi FROM bars WHERE start = '{start}'") == [
        ("revised", 99_999.0, 9.0)
    ]
    assert count(migrated, "bars") == final.height

    # Within one batch too: the later version wins.
    again = make_store(migrated, start=False)
    again.offer("bars", last)
    again.offer("bars", revised.with_columns(pl.lit(77.0).alias("close")))
    again.start().stop()
    assert query(migrated, f"SELECT close FROM bars WHERE start = '{start}'") == [(77.0,)]


def test_a_gap_keeps_its_greatest_end(migrated: str, make_store: Callable[..., Store]) -> None:
    s = make_store(migrated)
    s.offer("gaps", pl.DataFrame({"symbol": ["X:BTCUSD"], "start": [T0], "end": [T0 + 5_000]}))
    s.offer("gaps", pl.DataFrame({"symbol": ["X:BTCUSD"], "start": [T0], "end": [T0 + 2_000]}))
    s.stop()
    later = make_store(migrated)
    later.offer("gaps", pl.DataFrame({"symbol": ["X:BTCUSD"], "start": [T0], "end": [T0 + 1_000]}))
    later.offer("gaps", pl.DataFrame({"symbol": ["X:BTCUSD"], "start": [T0], "end": [T0 + 8_000]}))
    later.stop()
    assert query(migrated, 'SELECT "end" FROM gaps') == [(ts(T0 + 8_000),)]


# --- outages and the journal --------------------------------------------------------------------


def test_the_database_stopped_mid_stream(
    postgres: Cluster, migrated: str, make_store: Callable[..., Store]
) -> None:
    s = make_store(migrated)
    offered: list[pl.DataFrame] = []
    done = threading.Event()

    def produce() -> None:
        n = 0
        while not done.is_set():
            batch = trades(200, first=n * 200)
            s.offer("trades", batch)
            offered.append(batch)
            n += 1
            time.sleep(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_for(lambda: s.stats.rows_written >= 2_000, "rows before the outage")
        postgres.stop()
        wait_for(lambda: not s.stats.connected, "the writer to notice the outage")
        wait_for(lambda: s.stats.journal_files >= 3, "journal files during the outage")
        assert s.stats.last_error is not None and "127.0.0.1" in s.stats.last_error
        postgres.start()
        wait_for(lambda: s.stats.connected, "the writer to reconnect")
        time.sleep(0.3)
    finally:
        done.set()
        producer.join()
        if not postgres.running:
            postgres.start()
    s.stop()
    every = pl.concat(offered)
    assert s.fatal is None
    assert s.stats.journal_files == 0
    assert not list((s.journal.dir).iterdir())
    assert s.stats.reconnects >= 1
    assert count(migrated, "trades") == every.height
    assert trade_keys(migrated) == expected_keys(every)


def test_a_journal_left_by_a_stopped_writer_is_replayed(
    migrated: str, make_store: Callable[..., Store], tmp_path: Path
) -> None:
    state = tmp_path / "shared-state"
    nowhere = f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/polystream"
    down = make_store(nowhere, state)
    batches = [trades(100, first=i * 100) for i in range(5)]
    for b in batches:
        down.offer("trades", b)
    down.offer("bars", bars()[0])
    down.stop()
    assert down.stats.journal_files >= 2 and down.stats.journal_bytes > 0
    assert SECRET not in (down.stats.last_error or "")

    up = make_store(migrated, state)
    wait_for(lambda: up.stats.journal_files == 0, "the old journal to be replayed")
    up.stop()
    assert trade_keys(migrated) == expected_keys(pl.concat(batches))
    assert count(migrated, "bars") == bars()[0].height


def test_a_full_inbox_spills_to_the_journal(
    migrated: str, make_store: Callable[..., Store]
) -> None:
    final, _ = bars()
    last = final.tail(1)
    s = make_store(migrated, inbox_size=2, start=False)
    batches = [trades(50, first=i * 50) for i in range(8)]
    s.offer("bars", last)  # inbox
    for b in batches:
        s.offer("trades", b)  # one to the inbox, the rest to the journal
    s.offer("bars", last.with_columns(pl.lit("revised").alias("state"), pl.lit(1.5).alias("close")))
    assert s.stats.journal_files == 8
    s.start()
    wait_for(lambda: s.stats.journal_files == 0, "the spilled frames to be written")
    s.stop()
    assert trade_keys(migrated) == expected_keys(pl.concat(batches))
    # The revision was offered last, so it is what stays, though it waited on disk.
    assert query(migrated, "SELECT state, close FROM bars") == [("revised", 1.5)]


def test_an_unreadable_journal_file_is_set_aside(
    migrated: str, make_store: Callable[..., Store], tmp_path: Path
) -> None:
    journal = tmp_path / "state" / "journal"
    journal.mkdir(parents=True)
    (journal / f"{0:016d}-trades.arrow").write_bytes(b"not arrow at all")
    s = make_store(migrated, start=False)
    s.offer("trades", trades(10))
    s.start().stop()
    assert count(migrated, "trades") == 10
    assert "could not be read" in (s.stats.last_error or "")
    assert sorted(p.name for p in journal.iterdir()) == [f"{0:016d}-trades.arrow.unreadable"]
