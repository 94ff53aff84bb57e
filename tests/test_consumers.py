"""`store --from` and `notify --from` against a real nats-server, PostgreSQL and a local Bot API:
every published row stored exactly once across reruns, redeliveries, SIGKILL and Ctrl-C, and
every alert sent to Telegram once across restarts."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from nats_server import NatsServer
from postgres import free_port

from polystream import wire
from polystream.batch import Batcher
from polystream.bus import Bus
from polystream.consumers import NOTIFY_DURABLE, STORE_DURABLE, store_feeds
from polystream.ingest import prepare_streams
from polystream.schema import Alert, alert_rows
from polystream.source import Frame
from polystream.store import Store
from test_cli import assert_one_sentence_error, env, run
from test_notify import TOKEN, BotApi, api  # noqa: F401  (the fixture is used by name)

SYMBOLS = ("X:BTCUSD", "X:ETHUSD")
PAIRS = {"X:BTCUSD": "BTC-USD", "X:ETHUSD": "ETH-USD"}
RUN = wire.Run(SYMBOLS, 16, False, 1_700_000_000_000)
T0 = 1_700_000_000_000
MINUTE = 60_000
TABLES = ("trades", "quotes", "book_snapshots", "bars", "alerts")
_JSON = msgspec.json.Encoder()


@pytest.fixture
def nats(nats_server: Callable[[], NatsServer]) -> str:
    """A server of the test's own: the streams' names are fixed, and the consumers durable."""
    return nats_server().url


@pytest.fixture
def bus(nats: str) -> Iterator[Bus]:
    with Bus(nats) as b:
        prepare_streams(b)
        b.publish(wire.RUN, _JSON.encode(RUN))
        yield b


def frame(batch: int, trades: int, quotes: int) -> Frame:
    """One frame of each symbol's `trades` trades, `quotes` quotes and a book snapshot, all
    distinct by their natural keys across batches."""
    events: list[dict[str, Any]] = []
    t = T0 + batch * 1000
    for pair in PAIRS.values():
        events += [
            {"ev": "XT", "pair": pair, "p": 100.0 + i, "t": t + i, "s": 0.5, "c": [2],
             "i": f"{batch}-{i}", "x": 1}
            for i in range(trades)
        ]  # fmt: skip
        events += [
            {"ev": "XQ", "pair": pair, "bp": 99.0, "bs": 1.0, "ap": 101.0, "as": 2.0, "t": t + i,
             "x": 1}
            for i in range(quotes)
        ]  # fmt: skip
        events.append({"ev": "XL2", "pair": pair, "t": t, "b": [[99.0, 1.0]], "a": [[101.0, 1.0]]})
    return Frame(t + 999, _JSON.encode(events))


def publish_market_data(bus: Bus, batches: int, trades: int = 5, quotes: int = 3) -> None:
    """What ingest publishes for `batches` batches: each partition's message, then the clock."""
    batcher = Batcher(SYMBOLS)
    items: list[tuple[str, bytes, dict[str, str] | None, str | None]] = []
    for b in range(1, batches + 1):
        bodies, clock = wire.split(batcher.build([frame(b, trades, quotes)]), RUN.partitions)
        headers = {wire.SEQ: str(b)}
        items += [(wire.md_subject(p), body, headers, f"{b}.{p}") for p, body in bodies.items()]
        items.append((wire.CLOCK, wire.clock_body(clock), headers, f"{b}.clock"))
        if len(items) >= 1000:
            bus.publish_many(items)
            items = []
    bus.publish_many(items)


def bar(symbol: str, start: int, close: float, state: str) -> dict[str, Any]:
    """A bar record as `watch --json` and the shards write it."""
    return {
        "type": "bar", "symbol": symbol, "timeframe": "1m", "start": start,
        "end": start + MINUTE, "open": 100, "high": 102.5, "low": 99.5, "close": close,
        "volume": 1.5, "vwap": 100.5, "trades": 3, "buy_volume": 1.0, "sell_volume": 0.5,
        "state": state, "rsi_14": 55.5, "stoch_k": None, "stoch_d": None, "macd": None,
        "macd_signal": None, "macd_hist": None, "ao": None, "cci_20": -12.0, "bb_upper": None,
        "bb_middle": None, "bb_lower": None, "flow_imbalance": 0.33,
    }  # fmt: skip


def alert(filter: str, symbol: str, minute: int) -> Alert:
    return Alert(
        filter, symbol, "1m", T0 + minute * MINUTE, "warning", f"{filter} fired", {"close": 1.0}
    )


def publish_results(bus: Bus) -> None:
    """Three final bars, a revision of the second, a partial one; three alerts, one of them
    published twice (a shard restarted), and one message that is not JSON."""
    bars = [bar("X:BTCUSD", T0 + i * MINUTE, 100.0 + i, "final") for i in range(3)]
    bars += [bar("X:BTCUSD", T0 + MINUTE, 111.0, "revised")]
    bars += [bar("X:BTCUSD", T0 + 3 * MINUTE, 120.0, "partial")]
    for record in bars:
        bus.publish(f"polystream.bar.1m.{record['symbol']}", _JSON.encode(record))
    alerts = [alert("rsi-low", "X:BTCUSD", 0), alert("rsi-low", "X:ETHUSD", 0)]
    alerts += [alert("macd-cross", "X:BTCUSD", 2), alert("macd-cross", "X:BTCUSD", 2)]
    for a in alerts:
        bus.publish(f"polystream.alert.{a.filter}.{a.symbol}", _JSON.encode(a.record()))
    bus.publish("polystream.alert.broken.X:BTCUSD", b"{not json")


def short_ack_wait(bus: Bus, seconds: float) -> None:
    """Create the store's durable consumers with this ack wait (they keep it), so that what a
    stopped store read unacknowledged comes again within the test's time."""
    for feed in store_feeds(RUN):
        assert not bus.pull(
            feed.stream, feed.durable, feed.subject, timeout=0.05, ack_wait_s=seconds
        )


def partitions() -> int:
    """How many partitions hold the run's symbols: each batch has a message in each."""
    return len({wire.partition(s, RUN.partitions) for s in SYMBOLS})


def counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return {
            t: conn.execute(f"SELECT count(*) FROM {t}".encode()).fetchall()[0][0] for t in TABLES
        }


def run_store(tmp_path: Path, nats: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = run(tmp_path, "store", "--from", nats, *args, DATABASE_URL=url)
    assert result.returncode == 0, result.stderr
    return result


def test_store_from_stores_every_row_once(
    tmp_path: Path, bus: Bus, nats: str, migrated: str
) -> None:
    publish_market_data(bus, 20)
    publish_results(bus)
    expected = {"trades": 20 * 2 * 5, "quotes": 20 * 2 * 3, "book_snapshots": 20 * 2,
                "bars": 3, "alerts": 3}  # fmt: skip

    first = run_store(tmp_path, nats, migrated, "--duration", "3")
    assert counts(migrated) == expected
    with psycopg.connect(migrated) as conn:
        rows = conn.execute("SELECT close, rsi, cci FROM bars ORDER BY start").fetchall()
    assert rows == [(100.0, 55.5, -12.0), (111.0, 55.5, -12.0), (102.0, 55.5, -12.0)]
    assert "polystream.alert.broken.X:BTCUSD could not be read" in first.stderr
    assert "polystream.md" not in first.stderr
    # the partitions' messages, not the clocks or the run's; 5 bars; 5 alert messages
    messages = 20 * partitions() + 5 + 5
    assert f"from {messages} messages" in first.stderr

    # everything was acknowledged: a second run reads nothing
    again = run_store(tmp_path, nats, migrated, "--duration", "2")
    assert "stored 0 new rows from 0 messages" in again.stderr
    assert counts(migrated) == expected

    # the same messages delivered again (new consumers) change nothing
    for feed in store_feeds(RUN):
        bus.delete_consumer(feed.stream, feed.durable)
    redelivered = run_store(tmp_path, nats, migrated, "--duration", "2")
    assert f"stored 0 new rows from {messages} messages" in redelivered.stderr
    assert counts(migrated) == expected


def test_nothing_is_acknowledged_while_the_database_is_away(
    tmp_path: Path, bus: Bus, nats: str, migrated: str
) -> None:
    short_ack_wait(bus, 1.0)
    publish_market_data(bus, 5)
    publish_results(bus)
    away = f"postgresql://polystream@127.0.0.1:{free_port()}/polystream"
    down = run_store(tmp_path, nats, away, "--duration", "2")
    assert "store_down" in down.stderr and "store_pending" in down.stderr
    assert "stored 0 new rows" in down.stderr

    # the journal goes in first; the messages, unacknowledged, come again and change nothing
    up = run_store(tmp_path, nats, migrated, "--duration", "2")
    assert messages_read(up.stderr) == messages_read(down.stderr) == 5 * partitions() + 10
    assert counts(migrated) == {"trades": 50, "quotes": 30, "book_snapshots": 10, "bars": 3,
                                "alerts": 3}  # fmt: skip


def test_an_offer_counts_as_committed_only_once_the_database_has_it(
    tmp_path: Path, migrated: str
) -> None:
    rows = alert_rows([alert("rsi-low", "X:BTCUSD", 0)])
    away = Store(f"postgresql://polystream@127.0.0.1:{free_port()}/x", tmp_path / "away")
    away.start().offer("alerts", rows)
    time.sleep(1.0)
    assert away.committed < away.offered == 1
    away.stop(2.0)
    assert away.committed == 0 and away.stats.journal_rows == 1

    here = Store(migrated, tmp_path / "here", flush_every=0.05)
    here.start().offer("alerts", rows)
    deadline = time.monotonic() + 10
    while here.committed < here.offered:
        assert time.monotonic() < deadline, "never committed"
        time.sleep(0.01)
    assert counts(migrated)["alerts"] == 1
    here.stop(2.0)


def start_store(tmp_path: Path, nats: str, url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "polystream", "store", "--from", nats],
        cwd=tmp_path,
        env=env(tmp_path, DATABASE_URL=url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(process: subprocess.Popen[str], sig: signal.Signals, when: Callable[[], bool]) -> str:
    """Send `sig` once `when()` holds; the process's stderr."""
    try:
        deadline = time.monotonic() + 90
        while not when():
            assert time.monotonic() < deadline and process.poll() is None, "it never happened"
            time.sleep(0.05)
        process.send_signal(sig)
        return process.communicate(timeout=60)[1]
    finally:
        process.kill()


def messages_read(stderr: str) -> int:
    found = re.search(r"from ([\d,]+) messages", stderr)
    assert found, stderr
    return int(found.group(1).replace(",", ""))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_store_stopped_midway_goes_on_where_it_was_acknowledged(
    tmp_path: Path, bus: Bus, nats: str, migrated: str, sig: signal.Signals
) -> None:
    batches, trades = 1500, 40
    if sig == signal.SIGKILL:  # what it had read unacknowledged comes again after this
        short_ack_wait(bus, 2.0)
    publish_market_data(bus, batches, trades=trades, quotes=2)
    messages = batches * partitions()
    expected = {"trades": batches * 2 * trades, "quotes": batches * 2 * 2,
                "book_snapshots": batches * 2, "bars": 0, "alerts": 0}  # fmt: skip

    process = start_store(tmp_path, nats, migrated)
    first = stop(process, sig, lambda: counts(migrated)["trades"] > 0)
    assert process.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), first
    assert 0 < counts(migrated)["trades"] < expected["trades"], "stopped too late to prove it"

    process = start_store(tmp_path, nats, migrated)
    second = stop(process, signal.SIGINT, lambda: counts(migrated) == expected)
    assert process.returncode == 130, second
    assert counts(migrated) == expected
    if sig == signal.SIGINT:  # a clean stop acknowledged all it read: nothing is read twice
        assert messages_read(first) + messages_read(second) == messages


def test_store_from_needs_a_migrated_database(tmp_path: Path, database_url: str) -> None:
    result = run(tmp_path, "store", "--from", "nats://127.0.0.1:1", DATABASE_URL=database_url)
    assert_one_sentence_error(result, "polystream migrate")


def test_notify_from_sends_each_alert_once_across_restarts(
    tmp_path: Path,
    bus: Bus,
    nats: str,
    api: BotApi,  # noqa: F811
) -> None:
    publish_results(bus)
    quiet = alert("console-only", "X:BTCUSD", 5).record() | {"notify": ["console"]}
    bus.publish("polystream.alert.console-only.X:BTCUSD", _JSON.encode(quiet))
    telegram = {"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_CHAT_ID": "1001",
                "TELEGRAM_API_URL": api.url}  # fmt: skip

    first = run(tmp_path, "notify", "--from", nats, "--duration", "2", **telegram)
    assert first.returncode == 0, first.stderr
    texts = [c.text for c in api.delivered("1001")]
    # four alert messages, the one published twice included; not the console-only one
    assert len(texts) == 4, texts
    assert sorted(t.split("\n")[0] for t in texts) == [
        "<b>WARNING</b> macd-cross · X:BTCUSD 1m",
        "<b>WARNING</b> macd-cross · X:BTCUSD 1m",
        "<b>WARNING</b> rsi-low · X:BTCUSD 1m",
        "<b>WARNING</b> rsi-low · X:ETHUSD 1m",
    ]
    assert "read 6 alerts; Telegram accepted 4 messages, 0 wait" in first.stderr
    assert TOKEN not in first.stderr

    again = run(tmp_path, "notify", "--from", nats, "--duration", "1", **telegram)
    assert again.returncode == 0, again.stderr
    assert "read 0 alerts" in again.stderr
    assert len(api.calls) == 4

    # A kill after the outbox took the alerts but before the acknowledgement: every message
    # comes again. The outbox stored how far it got with them, so none is sent twice.
    bus.delete_consumer(wire.OUT_STREAM, NOTIFY_DURABLE)
    redelivered = run(tmp_path, "notify", "--from", nats, "--duration", "1", **telegram)
    assert redelivered.returncode == 0, redelivered.stderr
    assert "read 6 alerts" in redelivered.stderr
    assert len(api.calls) == 4


def test_notify_from_needs_telegram_settings(tmp_path: Path) -> None:
    result = run(tmp_path, "notify", "--from", "nats://127.0.0.1:1")
    assert_one_sentence_error(result, "TELEGRAM_BOT_TOKEN")


def test_the_store_has_one_durable_consumer_per_partition_of_the_run() -> None:
    feeds = store_feeds(RUN)
    parts = sorted({wire.partition(s, RUN.partitions) for s in SYMBOLS})
    assert [f.subject for f in feeds] == [
        *(wire.md_subject(p) for p in parts),
        "polystream.bar.>",
        "polystream.alert.>",
    ]
    assert all(f.durable.startswith(STORE_DURABLE) for f in feeds)
    assert len({f.durable for f in feeds}) == len(feeds)
    # a run of every symbol (`ingest --all`): every partition
    every = store_feeds(msgspec.structs.replace(RUN, symbols=()))
    assert [f.subject for f in every][: RUN.partitions] == [
        wire.md_subject(p) for p in range(RUN.partitions)
    ]
