"""`watch` with both sinks: Ctrl-C mid-replay leaves every received trade stored and every
accepted alert delivered; `migrate` and the refusals around storage, as users run them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from polystream.record import read_recording
from test_cli import assert_one_sentence_error, env, records, run
from test_filter_cli import EVERY_BAR, write_recording
from test_notify import TOKEN, BotApi, api  # noqa: F401  (the fixture is used by name)

# each message names its bar, so that every alert's text is unique
TELEGRAM_BAR = EVERY_BAR.replace(
    "trigger: level", "trigger: level\nnotify: [console, telegram]"
).replace("closed at {close}", "bar {start} closed at {close}")


def polystream(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return run(tmp_path, *args, **extra)


def received_trade_ids(path: Path) -> set[str]:
    """The ids of the trades in a recording of what a run received."""
    ids: set[str] = set()
    for frame in read_recording(path):
        for event in json.loads(frame.data):
            if event.get("ev") == "XT":
                ids.add(str(event["i"]))
    return ids


def test_migrate_list_rollback_from_the_command_line(tmp_path: Path, database_url: str) -> None:
    first = polystream(tmp_path, "migrate", DATABASE_URL=database_url)
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stderr
    again = polystream(tmp_path, "migrate", DATABASE_URL=database_url)
    assert again.returncode == 0 and "up to date" in again.stderr
    listed = polystream(tmp_path, "migrate", "--list", DATABASE_URL=database_url)
    assert listed.returncode == 0 and "pending" not in listed.stdout and "applied" in listed.stdout
    back = polystream(tmp_path, "migrate", "--rollback", DATABASE_URL=database_url)
    assert back.returncode == 0 and "rolled back" in back.stderr
    listed = polystream(tmp_path, "migrate", "--list", DATABASE_URL=database_url)
    assert listed.stdout.count("pending") == 1


def test_watch_store_refuses_pending_migrations(tmp_path: Path, database_url: str) -> None:
    recording = tmp_path / "trades.tsv"
    write_recording(recording, seconds=3)
    result = polystream(
        tmp_path, "watch", "X:BTCUSD", "--feed", str(recording), "--store",
        DATABASE_URL=database_url,
    )  # fmt: skip
    assert_one_sentence_error(result, "polystream migrate")


def test_a_bad_database_url_is_one_sentence_without_the_password(tmp_path: Path) -> None:
    url = "postgresql://someone:sekret-pw@127.0.0.1:1/nowhere"
    result = polystream(tmp_path, "migrate", DATABASE_URL=url)
    assert_one_sentence_error(result, "127.0.0.1", "nowhere")
    assert "sekret-pw" not in result.stderr + result.stdout


def test_store_without_a_database_url_is_one_sentence(tmp_path: Path) -> None:
    result = polystream(tmp_path, "watch", "X:BTCUSD", "--feed", "demo", "--store")
    assert_one_sentence_error(result, "DATABASE_URL")
    result = polystream(tmp_path, "watch", "X:BTCUSD", "--feed", "demo", "--notify")
    assert_one_sentence_error(result, "TELEGRAM_BOT_TOKEN")


def test_ctrl_c_mid_replay_stores_and_delivers_everything_received(
    tmp_path: Path,
    database_url: str,
    api: BotApi,  # noqa: F811
) -> None:
    assert polystream(tmp_path, "migrate", DATABASE_URL=database_url).returncode == 0
    filters = tmp_path / "filters"
    filters.mkdir()
    (filters / "every-bar.yaml").write_text(TELEGRAM_BAR)
    recording = tmp_path / "trades.tsv"
    write_recording(recording, seconds=120)
    received = tmp_path / "received.tsv"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "polystream", "watch", "X:BTCUSD", "--feed", str(recording),
            "--speed", "10", "-t", "1s", "--json", "--no-ui", "--filters", str(filters),
            "--record", str(received),
        ],
        cwd=tmp_path,
        env=env(
            tmp_path,
            DATABASE_URL=database_url,
            TELEGRAM_BOT_TOKEN=TOKEN,
            TELEGRAM_CHAT_ID="1001",
            TELEGRAM_API_URL=api.url,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while len(api.delivered()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert api.delivered(), "no alert reached the Bot API"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    alerts = [r for r in records(out) if r["type"] == "alert"]
    got_ids = received_trade_ids(received)
    assert 0 < len(got_ids) < 1200, "the run should have been cut mid-replay"
    with psycopg.connect(database_url) as conn:
        stored = [row[0] for row in conn.execute("SELECT trade_id FROM trades").fetchall()]
        stored_alerts = conn.execute("SELECT count(*) FROM alerts").fetchone()
    assert sorted(stored) == sorted(got_ids)  # each received trade exactly once
    assert stored_alerts is not None and stored_alerts[0] == len(alerts)
    # every accepted alert delivered, alone or in a digest of a burst (that nothing is sent
    # twice, across restarts too, is test_notify's business)
    delivered = "\n".join(c.text for c in api.delivered("1001"))
    missing = [a["message"] for a in alerts if str(a["message"]) not in delivered]
    assert missing == []


def store_history(url: str, symbol: str, seconds: int) -> int:
    """`seconds` stored final 1s bars of a gentle walk, ending at the current second; returns
    the start of the last one (epoch ms)."""
    last = (int(time.time()) - 1) * 1000
    rows = []
    price = 4_090.0
    for k in range(seconds):
        start = last - (seconds - 1 - k) * 1000
        price += 0.7 if k % 3 else -1.1
        rows.append((symbol, "1s", start / 1000, (start + 1000) / 1000, price, price + 0.5,
                     price - 0.5, price, 1.5, price, 7, 0.9, 0.6, "final"))  # fmt: skip
    with psycopg.connect(url) as conn:
        conn.cursor().executemany(
            """INSERT INTO bars (symbol, timeframe, start, "end", open, high, low, close, volume,
                   vwap, trades, buy_volume, sell_volume, state)
               VALUES (%s, %s, to_timestamp(%s), to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s,
                   %s, %s, %s)""",
            rows,
        )
    return last


@pytest.mark.parametrize("warm", [True, False])
def test_indicators_are_valid_on_the_first_live_bar_after_a_warm_up(
    tmp_path: Path, database_url: str, warm: bool
) -> None:
    assert polystream(tmp_path, "migrate", DATABASE_URL=database_url).returncode == 0
    last_stored = store_history(database_url, "X:BTCUSD", 120)
    result = polystream(
        tmp_path, "watch", "X:BTCUSD", "--feed", "demo", "-t", "1s", "--json", "--no-ui",
        "--duration", "4", "--filters", str(tmp_path / "none"),
        "--warmup" if warm else "--no-warmup",
        DATABASE_URL=database_url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    recs = records(result.stdout)
    final = [r for r in recs if r["type"] == "bar" and r["state"] == "final"]
    assert final, result.stderr
    first = final[0]
    assert first["start"] > last_stored  # a live bar, not the stored history
    indicators = [k for k in list(first)[list(first).index("state") + 1 :] if k != "flow_imbalance"]
    warmed = [r for r in recs if r["type"] == "status" and r["event"] == "warmed"]
    if warm:
        assert warmed and warmed[0]["detail"].startswith("120 ")
        assert all(first[k] is not None for k in indicators), first
    else:
        assert not warmed
        assert all(first[k] is None for k in indicators), first
