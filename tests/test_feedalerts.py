"""Feed-state alerts through the local Bot API: the feed down and back once per stall (and not
again within the cooldown), repaired gaps in one message, the database away for longer than its
grace and back, the journal over its size, and a mute holding them back."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from postgres import Cluster

from conftest import API_KEY
from polystream import app
from polystream.config import Settings, load_settings
from polystream.doctor import run_checks
from polystream.errors import ConfigError
from polystream.feedalerts import JOURNAL_LIMIT, FeedAlertSink
from polystream.notify import TelegramNotifier
from polystream.schema import Gap, Notice, gap_rows
from polystream.simulator import DemoFeed
from polystream.sinks import FeedState, Output, View
from polystream.store import Store
from test_notify import TOKEN, BotApi, api, wait_for  # noqa: F401  (the fixture is used by name)

CHAT = "1001"
GAP_ROWS = gap_rows([Gap("X:BTCUSD", 1_700_000_000_000, 1_700_000_060_000)])


def notifier(api: BotApi, state: Path) -> TelegramNotifier:  # noqa: F811
    made = TelegramNotifier(TOKEN, [CHAT], state, api_url=api.url, per_chat_interval=0.01)
    return made.start()


def view(now: int, quiet: int = 0, watchdog: int = 1_000, reconnects: int = 0) -> View:
    feed = FeedState(state="streaming", quiet_ms=quiet, watchdog_ms=watchdog, reconnects=reconnects)
    return View(now, ("X:BTCUSD",), ("1m",), 34, feed)


def texts(api: BotApi, kind: str) -> list[str]:  # noqa: F811
    return [t for t in api.texts(CHAT) if f"polystream · {kind}" in t]


def test_a_stalled_feed_is_announced_down_and_back_once_and_not_again_within_the_cooldown(
    api: BotApi,  # noqa: F811
    tmp_path: Path,
) -> None:
    (tmp_path / "none").mkdir()
    settings = load_settings(
        {
            "TELEGRAM_BOT_TOKEN": TOKEN,
            "TELEGRAM_CHAT_ID": CHAT,
            "TELEGRAM_API_URL": api.url,
            "POLYGON_API_KEY": API_KEY,
            "POLYSTREAM_STATE_DIR": str(tmp_path / "state"),
        },
        environ={},
        env_file=None,
    )
    with DemoFeed(api_key=API_KEY, seed=3, bar_seconds=0.2) as feed:
        options = app.RunOptions(
            ("X:BTCUSD",),
            feed=feed.url,
            timeframes=(1_000,),
            ui="none",
            filters_dir=tmp_path / "none",
            notify=True,
            warmup=False,
            watchdog=1.0,
            duration=9.0,
        )

        def stalls() -> None:
            time.sleep(1.5)
            feed.stall(2.5)  # down after 1 s of it, back when it ends
            time.sleep(4.0)
            feed.stall(2.0)  # again: within the cooldown, not announced

        thread = threading.Thread(target=stalls, daemon=True)
        with app.open_run(options, settings) as pipeline:
            thread.start()
            pipeline.run()
        thread.join()
    down = texts(api, "feed")
    assert len(down) == 2, api.texts(CHAT)
    assert down[0].startswith("<b>CRITICAL</b>") and "feed down: no data for" in down[0]
    assert down[1].startswith("<b>INFO</b>") and "feed back after" in down[1]
    assert TOKEN not in "".join(api.texts())


def test_repaired_gaps_of_one_tick_are_one_message_and_later_ones_wait_for_the_cooldown(
    api: BotApi,  # noqa: F811
    tmp_path: Path,
) -> None:
    sender = notifier(api, tmp_path)
    sink = FeedAlertSink(sender, cooldowns_ms={"gaps": 10_000})
    repaired = [
        Notice("gap_repaired", 0, "X:BTCUSD 1m: 3 bars rebuilt from 812 trades"),
        Notice("gap_repaired", 0, "X:ETHUSD 1m: 3 bars rebuilt from 95 trades"),
    ]
    sink.write(Output(notices=repaired))
    sink.tick(view(1_000))
    sink.write(Output(notices=[Notice("gap_repaired", 0, "X:BTCUSD 1s: 20 bars rebuilt")]))
    sink.tick(view(5_000))  # within the cooldown: held
    wait_for(lambda: len(texts(api, "gaps")) == 1)
    first = texts(api, "gaps")[0]
    assert "X:BTCUSD 1m: 3 bars" in first and "X:ETHUSD 1m: 3 bars" in first
    sink.tick(view(11_000))
    wait_for(lambda: len(texts(api, "gaps")) == 2)
    assert "X:BTCUSD 1s: 20 bars rebuilt" in texts(api, "gaps")[1]
    sender.stop(5)


def test_a_muted_kind_is_not_sent(api: BotApi, tmp_path: Path) -> None:  # noqa: F811
    sender = notifier(api, tmp_path)
    sink = FeedAlertSink(sender, muted=lambda alert: alert.filter == "polystream")
    sink.tick(view(10_000, quiet=5_000))
    sink.tick(view(11_000, quiet=0))
    sender.stop(5)
    assert sink.sent == {} and api.texts() == []


def test_the_journal_over_its_size_is_said_once_until_it_shrinks(
    api: BotApi,  # noqa: F811
    tmp_path: Path,
) -> None:
    sender = notifier(api, tmp_path)
    store = Store("postgresql://polystream@127.0.0.1:1/nowhere", tmp_path / "state")
    store.stop(0)  # stopped: every offer goes to the journal
    store.offer("gaps", GAP_ROWS)
    sink = FeedAlertSink(sender, store=store, journal_limit=16)
    for now in (1_000, 2_000, 3_000):
        sink.tick(view(now))
    wait_for(lambda: len(texts(api, "journal")) == 1)
    time.sleep(0.2)
    said = texts(api, "journal")
    assert len(said) == 1, said
    assert said[0].startswith("<b>CRITICAL</b>") and str(store.journal.dir) in said[0]
    sender.stop(5)


def test_the_database_away_past_its_grace_and_back_is_said_once_each(
    api: BotApi,  # noqa: F811
    tmp_path: Path,
    migrated: str,
    postgres: Cluster,
) -> None:
    sender = notifier(api, tmp_path)
    store = Store(migrated, tmp_path / "state").start()
    sink = FeedAlertSink(sender, store=store, database_grace_ms=500)
    now = 0

    def tick_until(condition: str, timeout: float = 30.0) -> None:
        nonlocal now
        deadline = time.monotonic() + timeout
        while condition not in " ".join(api.texts(CHAT)):
            assert time.monotonic() < deadline, api.texts(CHAT)
            store.offer("gaps", GAP_ROWS)  # the writer learns of an outage by writing
            now += 100
            sink.tick(view(now))
            time.sleep(0.1)

    wait_for(lambda: store.stats.connected, 10)
    postgres.stop()
    try:
        tick_until("database unreachable")
    finally:
        postgres.start()
    tick_until("database back")
    store.stop(10)
    sender.stop(5)
    said = texts(api, "database")
    assert len(said) == 2, said
    assert said[0].startswith("<b>CRITICAL</b>") and "rows wait in the journal" in said[0]
    assert said[1].startswith("<b>INFO</b>")


def test_the_journal_size_worth_a_message_is_a_setting(tmp_path: Path) -> None:
    def settings(value: str) -> Settings:
        given = {"POLYSTREAM_JOURNAL_ALERT_MIB": value, "POLYSTREAM_STATE_DIR": str(tmp_path)}
        return load_settings(given, environ={}, env_file=None)

    assert load_settings({}, environ={}, env_file=None).journal_alert_bytes == JOURNAL_LIMIT
    assert settings("8").journal_alert_bytes == 8 * 1024 * 1024
    for bad in ("0", "1.5", "lots"):
        with pytest.raises(ConfigError, match=r"^Invalid POLYSTREAM_JOURNAL_ALERT_MIB .*MiB"):
            settings(bad).journal_alert_bytes  # noqa: B018
    [telegram] = [c for c in run_checks(settings("lots")) if c.name == "telegram"]
    assert telegram.status == "problem" and "POLYSTREAM_JOURNAL_ALERT_MIB" in telegram.detail
