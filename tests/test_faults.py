"""Faults as users meet them, against the real command: stop signals from a service manager, a
second signal, kills at random moments over a stored replay, and the database going away. Each
run's rows are counted against what it received (its own `--record`)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import psycopg
import pytest
from postgres import Cluster

from conftest import API_KEY
from polystream.notify import TelegramNotifier
from polystream.record import read_recording
from polystream.simulator import DemoFeed
from polystream.store import Store
from test_cli import env, records, run
from test_filter_cli import write_recording
from test_notify import TOKEN, BotApi, api  # noqa: F401  (the fixture is used by name)


class Watch:
    """`polystream watch …` as a process, its stdout read line by line as it comes."""

    def __init__(self, tmp_path: Path, *args: str, **extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "polystream", "watch", *args],
            cwd=tmp_path,
            env=env(tmp_path, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._err: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(stream, into), daemon=True)
            for stream, into in ((self.proc.stdout, self.lines), (self.proc.stderr, self._err))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: IO[str], into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def err(self) -> str:
        return "".join(self._err)

    def statuses(self) -> list[str]:
        return [str(r["event"]) for r in records("".join(self.lines)) if r["type"] == "status"]

    def wait_for(self, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(what in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {what!r} on stdout; the run said: {self.finish(5)[-2000:]}")

    def finish(self, timeout: float = 60.0) -> str:
        """Wait for the exit; its stderr."""
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for reader in self._readers:
                reader.join(5)
        return self.err


@pytest.fixture
def live_feed() -> Iterator[DemoFeed]:
    with DemoFeed(api_key=API_KEY, bar_seconds=0.05, seed=11) as feed:
        yield feed


def received_ids(path: Path) -> list[str]:
    """The trade ids of a recording of what a run received (or replayed), in order."""
    ids = []
    for frame in read_recording(path):
        ids += [str(e["i"]) for e in json.loads(frame.data) if e.get("ev") == "XT"]
    return ids


def stored_ids(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT trade_id FROM trades").fetchall()]


def stored_bars(url: str) -> list[tuple[str, str, int, float, int, str]]:
    """(symbol, timeframe, start ms, close, trades, state) of every stored bar, in order."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT symbol, timeframe, (extract(epoch FROM start) * 1000)::bigint, close, "
            "trades, state FROM bars ORDER BY 1, 2, 3"
        ).fetchall()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def live_args(feed: DemoFeed, record: Path) -> list[str]:
    return [
        "X:BTCUSD", "X:ETHUSD", "--feed", feed.url, "--no-ui", "--json", "-t", "1s",
        "--store", "--record", str(record), "--filters", "none",
    ]  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_drains_a_live_run_into_the_database(
    tmp_path: Path, migrated: str, live_feed: DemoFeed, signum: int
) -> None:
    # Before: SIGTERM and SIGHUP killed the process on the spot, leaving received trades and
    # emitted bars unstored.
    (tmp_path / "none").mkdir()
    record = tmp_path / "received.tsv"
    watch = Watch(
        tmp_path, *live_args(live_feed, record), DATABASE_URL=migrated, POLYGON_API_KEY=API_KEY
    )
    watch.wait_for('"type":"bar"')
    time.sleep(1.0)
    watch.proc.send_signal(signum)
    err = watch.finish()
    assert watch.proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    received = received_ids(record)
    assert len(received) > 100
    assert sorted(stored_ids(migrated)) == sorted(received)  # every received trade, once
    bars = [r for r in records("".join(watch.lines)) if r["type"] == "bar"]
    assert {r["state"] for r in bars} >= {"final", "partial"}
    done = [r for r in bars if r["state"] != "partial"]  # partial bars are never stored
    latest = {(r["symbol"], r["timeframe"], r["start"]): (r["close"], r["state"]) for r in done}
    in_db = {(s, tf, t): (close, state) for s, tf, t, close, _, state in stored_bars(migrated)}
    assert in_db == latest  # every final bar emitted, in its last state


def test_a_second_signal_cuts_the_drain_short_and_loses_nothing(
    tmp_path: Path,
    migrated: str,
    live_feed: DemoFeed,
    api: BotApi,  # noqa: F811
) -> None:
    # A Bot API that takes 8 s to answer holds an orderly stop up to the request's timeout;
    # a second SIGTERM ends the run at once, the outbox and the journal keeping the rest.
    filters = tmp_path / "none"
    filters.mkdir()
    (filters / "every-trade.yaml").write_text(
        'name: every-trade\nsymbols: ["*"]\non: trade\nwhen: price > 0\ntrigger: level\n'
        "notify: [telegram]\nmessage: '{symbol} traded at {price}'\n"
    )
    api.delay = 8.0
    record = tmp_path / "received.tsv"
    watch = Watch(
        tmp_path,
        *live_args(live_feed, record),
        DATABASE_URL=migrated,
        POLYGON_API_KEY=API_KEY,
        TELEGRAM_BOT_TOKEN=TOKEN,
        TELEGRAM_CHAT_ID="1001",
        TELEGRAM_API_URL=api.url,
    )
    watch.wait_for('"type":"alert"')
    deadline = time.monotonic() + 20
    while not api.calls and time.monotonic() < deadline:  # a request is in flight
        time.sleep(0.05)
    watch.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    second = time.monotonic()
    watch.proc.send_signal(signal.SIGTERM)
    err = watch.finish(30)
    took = time.monotonic() - second
    assert watch.proc.returncode == 143, err
    assert took < 5.0, f"the second signal took {took:.1f} s to end the run"
    # the journal replays into the database: every received trade, once
    writer = Store(migrated, tmp_path / "state").start()
    writer.stop(60)
    assert writer.fatal is None and writer.stats.journal_files == 0
    assert sorted(stored_ids(migrated)) == sorted(received_ids(record))
    # and the outbox opens and goes on delivering what waits in it
    api.delay = 0.0
    outbox = TelegramNotifier(TOKEN, ["1001"], tmp_path / "state", api_url=api.url)
    assert outbox.counters()["pending"] > 0
    sent = len(api.delivered("1001"))
    outbox.start().stop(3.0)
    assert len(api.delivered("1001")) > sent and outbox.problems == []


@pytest.mark.parametrize("seed", [1, 2])
def test_kills_at_random_moments_over_a_stored_replay_then_a_rerun_is_exact(
    tmp_path: Path, migrated: str, seed: int
) -> None:
    rng = random.Random(seed)
    (tmp_path / "none").mkdir()
    recording = tmp_path / "day.tsv"
    write_recording(recording, seconds=900, per_second=10)
    trades = received_ids(recording)
    clean = run(tmp_path, "watch", "X:BTCUSD", "--feed", str(recording), "--no-ui", "--json",
                "-t", "1s", "-t", "1m", "--filters", "none", "--no-store")  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    expected = sorted(
        (r["symbol"], r["timeframe"], r["start"], r["close"], r["trades"], "final")
        for r in records(clean.stdout)
        if r["type"] == "bar"
    )
    args = ["X:BTCUSD", "--feed", str(recording), "--no-ui", "--json", "-t", "1s", "-t", "1m",
            "--filters", "none", "--store"]  # fmt: skip
    signals = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT]
    for round_ in range(3):
        signum = signals[(round_ + seed) % 3]
        killed = Watch(tmp_path, *args, "--speed", "150", DATABASE_URL=migrated)
        time.sleep(rng.uniform(0.8, 4.0))
        killed.proc.send_signal(signum)
        killed.finish()
        assert killed.proc.returncode in (-signal.SIGKILL, 128 + signum), killed.err
        rerun = run(tmp_path, "watch", *args, DATABASE_URL=migrated)
        assert rerun.returncode == 0, rerun.stderr
        stored = stored_ids(migrated)
        assert len(stored) == len(trades) and sorted(stored) == sorted(trades), signum
        assert stored_bars(migrated) == expected, signum


def test_a_database_outage_is_reported_and_what_waits_is_written_after(
    tmp_path: Path, migrated: str, live_feed: DemoFeed, postgres: Cluster
) -> None:
    # Before: a 15 s outage showed nothing in --no-ui or --json.
    (tmp_path / "none").mkdir()
    record = tmp_path / "received.tsv"
    watch = Watch(
        tmp_path, *live_args(live_feed, record), DATABASE_URL=migrated, POLYGON_API_KEY=API_KEY
    )
    try:
        watch.wait_for('"type":"bar"')
        postgres.stop()
        watch.wait_for('"event":"store_down"')
        time.sleep(1.0)
    finally:
        postgres.start()
    watch.wait_for('"event":"store_up"')
    watch.proc.send_signal(signal.SIGINT)
    err = watch.finish()
    assert watch.proc.returncode == 130, err
    statuses = watch.statuses()
    assert statuses.index("store_down") < statuses.index("store_up")
    assert "store_pending" not in statuses
    assert sorted(stored_ids(migrated)) == sorted(received_ids(record))


def test_a_run_that_ends_while_the_database_is_down_says_what_waits(
    tmp_path: Path, migrated: str, postgres: Cluster
) -> None:
    # Before: `watch --store` refused to start while the database was down, and a run that
    # ended during an outage exited 0 with no word of the rows in the journal.
    (tmp_path / "none").mkdir()
    first, second = tmp_path / "first.tsv", tmp_path / "second.tsv"
    write_recording(first, seconds=30)
    write_recording(second, seconds=60)
    lines = second.read_text().splitlines(keepends=True)
    second.write_text("".join(lines[300:]))  # no trade of the first
    args = ["X:BTCUSD", "--no-ui", "-t", "1s", "--filters", "none", "--store"]
    postgres.stop()
    try:
        down = run(tmp_path, "watch", "--feed", str(first), *args, DATABASE_URL=migrated)
    finally:
        postgres.start()
    assert down.returncode == 0, down.stderr
    assert "store_down" in down.stderr and "Cannot connect to PostgreSQL" in down.stderr
    said = [line for line in down.stderr.splitlines() if "store_pending" in line]
    assert len(said) == 1 and "rows wait in the journal" in said[0], down.stderr
    assert stored_ids(migrated) == []
    up = run(tmp_path, "watch", "--feed", str(second), *args, DATABASE_URL=migrated)
    assert up.returncode == 0, up.stderr
    assert "store_down" not in up.stderr and "store_pending" not in up.stderr
    assert sorted(stored_ids(migrated)) == sorted(received_ids(first) + received_ids(second))
