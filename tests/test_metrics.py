"""`watch --metrics`: /metrics and /healthz served by real runs on loopback (a replayed recording,
the demo feed, a `polystream` process), read over HTTP and parsed with prometheus_client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from polystream.app import RunOptions, open_run
from polystream.batch import Batcher
from polystream.config import Settings, load_settings
from polystream.pipeline import RunResult
from polystream.schema import Notice
from polystream.simulator import DemoFeed
from polystream.sinks import BaseSink, Output, View
from polystream.source import Frame
from test_cli import env, run
from test_notify import (  # noqa: F401  (the fixture is used by name)
    TOKEN,
    WRONG_TOKEN,
    BotApi,
    api,
)

T0 = 1_700_000_000_000
SECONDS = 6
PER_SECOND = 20
FILTERS = {
    "every-trade.yaml": """\
name: every-trade
on: trade
symbols: [X:BTCUSD]
when: price > 0
trigger: level
severity: info
message: "{symbol} traded at {price}"
""",
    "first-trade.yaml": """\
name: first-trade
on: trade
when: price > 0
cooldown: 1h
message: "{symbol} trades"
notify: [telegram]
""",
    "every-bar.yaml": """\
name: every-bar
on: bar
timeframe: 1s
when: close > 0
trigger: level
severity: critical
message: "{symbol} closed at {close}"
""",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def write_recording(path: Path) -> dict[str, int]:
    """`SECONDS` of event time, `PER_SECOND` frames a second: a trade of BTC-USD, ETH-USD and
    SOL-USD (not watched) each, a quote of BTC-USD every other frame, a book of BTC-USD every
    second; one trade out of range (rejected) and one frame that is not JSON. The events per
    channel the decoder keeps."""
    lines, counts = [], {"XT": 0, "XQ": 0, "XL2": 0}
    step = 1000 // PER_SECOND
    for k in range(SECONDS * PER_SECOND):
        t = T0 + k * step
        frame: list[dict[str, object]] = [
            {
                "ev": "XT",
                "pair": pair,
                "p": 100 + k % 7 + j,
                "t": t,
                "s": 0.5,
                "c": [1],
                "i": f"{j}-{k}",
                "x": 1,
                "r": t + 3,
            }
            for j, pair in enumerate(("BTC-USD", "ETH-USD", "SOL-USD"))
        ]
        counts["XT"] += 3
        if k % 2 == 0:
            frame.append(
                {
                    "ev": "XQ",
                    "pair": "BTC-USD",
                    "bp": 99.5,
                    "bs": 1,
                    "ap": 100.5,
                    "as": 2,
                    "x": 1,
                    "t": t,
                    "r": t + 3,
                }
            )
            counts["XQ"] += 1
        if k % PER_SECOND == 0:
            frame.append(
                {
                    "ev": "XL2",
                    "pair": "BTC-USD",
                    "t": t,
                    "x": 1,
                    "b": [[99.0, 1.0]],
                    "a": [[101.0, 1.0]],
                }
            )
            counts["XL2"] += 1
        if k == 10:
            frame.append(
                {
                    "ev": "XT",
                    "pair": "BTC-USD",
                    "p": -1,
                    "t": t,
                    "s": 1,
                    "c": [1],
                    "i": "bad",
                    "x": 1,
                    "r": t,
                }
            )
        lines.append(f"{t + 5}\t{json.dumps(frame)}\n")
        if k == 20:
            lines.append(f"{t + 6}\tthis is not json\n")
    path.write_text("".join(lines))
    return counts


@pytest.fixture
def filters(tmp_path: Path) -> Path:
    path = tmp_path / "filters"
    path.mkdir()
    for name, text in FILTERS.items():
        (path / name).write_text(text)
    return path


def settings(tmp_path: Path, **extra: str) -> Settings:
    environ = {"POLYSTREAM_STATE_DIR": str(tmp_path / "state"), **extra}
    return load_settings(environ=environ, env_file=None)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(url: str) -> Samples:
    status, text = get(url + "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all((k, w) in ls for k, w in labels.items())
    )


def health(url: str) -> tuple[int, dict[str, object]]:
    status, text = get(url + "/healthz")
    return status, json.loads(text)


class Probe(BaseSink):
    """Learns the metrics address from its status record and, on the pipeline thread, scrapes
    /metrics and /healthz once on the tick after it (the run is under way)."""

    name = "probe"

    def __init__(self) -> None:
        self.url: str | None = None
        self.during: tuple[Samples, int, dict[str, object], View] | None = None
        self.raw = ""  # what /metrics and /healthz answered then

    def write(self, out: Output) -> None:
        for notice in out.notices:
            if notice.event == "metrics":
                self.url = notice.detail.split()[-1]

    def tick(self, view: View) -> Sequence[Notice]:
        if self.url is not None and self.during is None:
            self.during = (scrape(self.url), *health(self.url), view)
            self.raw = get(self.url + "/metrics")[1] + get(self.url + "/healthz")[1]
        return ()


def replay(
    tmp_path: Path, filters: Path, speed: float | None = 20.0, **extra: str
) -> tuple[RunResult, Probe, Samples, tuple[int, dict[str, object]], dict[str, int]]:
    """A replay with --metrics; the probe, and the metrics and health read after `run` returned
    (the server is still up), and the filters' alert counts."""
    recording = tmp_path / "run.rec"
    write_recording(recording)
    options = RunOptions(
        ("X:BTCUSD", "X:ETHUSD"),
        feed=str(recording),
        timeframes=(1000,),
        channels=("XT", "XQ", "XL2"),
        ui="none",
        speed=speed,
        filters_dir=filters,
        metrics="127.0.0.1:0",
        warmup=False,
    )
    probe = Probe()
    with open_run(options, settings(tmp_path, **extra)) as pipeline:
        pipeline.add(probe)
        result = pipeline.run()
        assert probe.url is not None
        after = scrape(probe.url), health(probe.url)
        probe.raw += get(probe.url + "/metrics")[1] + get(probe.url + "/healthz")[1]
        assert pipeline.stages.filters is not None
        fired = dict(pipeline.stages.filters.fired)
    with pytest.raises(OSError):  # the context's exit stopped the server
        get(probe.url + "/healthz")
    return result, probe, *after, fired


def test_counters_equal_the_runs_summary_during_and_after_a_replay(
    tmp_path: Path, filters: Path
) -> None:
    counts = write_recording(tmp_path / "expected.rec")
    result, probe, samples, (status, body), fired = replay(tmp_path, filters)
    feed = result.view.feed

    # during the run: healthy, and counters that are the run's own at that tick
    assert probe.during is not None
    early, early_status, early_body, early_view = probe.during
    assert early_status == 200 and early_body["status"] == "ok", early_body
    assert early_body["reasons"] == [] and early_body["feed"] == "replaying"
    assert 0 < total(early, "polystream_events_total") <= feed.events
    assert total(early, "polystream_frames_total") <= early_view.feed.frames

    # after it: exactly the summary, per channel as the recording holds them
    assert total(samples, "polystream_events_total") == feed.events
    expected = {**counts, "XT": counts["XT"]}  # the bad trade is rejected, not counted
    for channel, n in expected.items():
        assert total(samples, "polystream_events_total", channel=channel) == n, channel
    assert total(samples, "polystream_frames_total") == feed.frames == SECONDS * PER_SECOND + 1
    assert total(samples, "polystream_rejected_events_total") == feed.rejected == 1
    assert total(samples, "polystream_malformed_frames_total") == feed.malformed_frames == 1
    other = total(samples, "polystream_other_symbol_events_total")
    assert other == feed.other_symbols == SECONDS * PER_SECOND
    assert total(samples, "polystream_bars_total", state="final") == feed.bars > 0
    assert total(samples, "polystream_bars_total", state="revised") == feed.revised
    assert total(samples, "polystream_bars_total", timeframe="1s") == feed.bars + feed.revised
    assert total(samples, "polystream_alerts_total") == feed.alerts == sum(fired.values())
    for name, n in fired.items():
        assert total(samples, "polystream_alerts_total", filter=name) == n > 0, name
    assert total(samples, "polystream_alerts_total", severity="critical") == fired["every-bar"]
    # every pass is observed: the events per pass add up to the run's
    assert total(samples, "polystream_pass_events_sum") == feed.events
    assert total(samples, "polystream_pass_duration_seconds_count") > 0
    # a replay is not live: no trade-to-alert latency
    assert total(samples, "polystream_alert_latency_seconds_count") == 0
    assert total(samples, "polystream_healthy") == 0
    assert status == 503 and body["status"] == "unhealthy"
    assert body["reasons"] == ["the run has ended"], body


def until(
    condition: Callable[[], tuple[int, dict[str, object]] | None], timeout: float
) -> tuple[int, dict[str, object]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_healthz_says_503_and_why_while_the_feed_is_stalled(tmp_path: Path) -> None:
    with DemoFeed(seed=3) as demo:
        options = RunOptions(
            ("X:BTCUSD",),
            feed=demo.url,
            ui="none",
            metrics="127.0.0.1:0",
            watchdog=1.0,
            warmup=False,
            duration=30,
        )
        probe = Probe()
        with open_run(options, settings(tmp_path)) as pipeline:
            pipeline.add(probe)
            runner = threading.Thread(target=pipeline.run)
            runner.start()
            try:

                def answer(ok: bool) -> tuple[int, dict[str, object]] | None:
                    """/healthz once it says `ok` (and data flows) or not."""
                    if probe.url is None:
                        return None
                    status, body = health(probe.url)
                    if ok:
                        flowing = body["feed"] == "streaming" and float(body["quiet_seconds"]) < 0.5
                        return (status, body) if status == 200 and flowing else None
                    return (status, body) if status != 200 else None

                status, body = until(lambda: answer(True), 10)
                assert body == {**body, "status": "ok", "reasons": [], "feed": "streaming"}
                demo.stall(3.0)
                status, body = until(lambda: answer(False), 3)
                assert status == 503 and body["status"] == "unhealthy", body
                reasons = body["reasons"]
                assert isinstance(reasons, list) and len(reasons) == 1, body
                assert reasons[0].startswith("the feed is down: no data for "), body
                assert body["watchdog_seconds"] == 1.0
                samples = scrape(probe.url or "")
                assert total(samples, "polystream_healthy") == 0
                assert total(samples, "polystream_feed_quiet_seconds") > 1.0
                # data flows again: healthy again
                status, body = until(lambda: answer(True), 8)
                assert body["reasons"] == [] and body["feed"] == "streaming", body
            finally:
                pipeline._interrupted = True  # ask the run to stop, as Ctrl-C does
                runner.join(20)
            assert not runner.is_alive()


def test_the_cli_announces_the_address_and_serves_metrics(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "polystream", "watch", "X:BTCUSD", "--feed", "demo"),
            *("--metrics", "127.0.0.1:0", "--no-ui", "--duration", "3", "--no-warmup"),
        ],
        cwd=tmp_path,
        env=env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        url = None
        for line in proc.stderr:
            if " metrics serving /metrics and /healthz on http://127.0.0.1:" in line:
                url = line.split()[-1]
                break
        assert url is not None, "no metrics status line"
        samples = until(lambda: _streaming(url), 10)[1]
        assert total(samples, "polystream_events_total", channel="XT") > 0
        assert total(samples, "polystream_feed_state", state="streaming") == 1
        rest = proc.stderr.read()
        assert proc.wait(30) == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _streaming(url: str) -> tuple[int, Samples] | None:
    status, body = health(url)
    if status != 200 or body["events"] == 0:
        return None
    return status, scrape(url)


@pytest.mark.parametrize("value", ["nonsense", "127.0.0.1:99999", "host:port"])
def test_a_bad_metrics_value_exits_2_in_one_sentence(tmp_path: Path, value: str) -> None:
    result = run(tmp_path, "watch", "X:BTCUSD", "--feed", "demo", "--metrics", value)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("polystream: error: Invalid --metrics"), lines


def test_a_port_in_use_is_an_error_before_the_run(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run(tmp_path, "watch", "X:BTCUSD", "--feed", "demo", "--metrics", str(port))
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"polystream: error: Cannot serve metrics on http://127.0.0.1:{port}"
    )
    assert "--metrics" in lines[0]


def test_the_bot_token_appears_nowhere_in_metrics_or_health(
    tmp_path: Path,
    filters: Path,
    api: BotApi,  # noqa: F811
) -> None:
    telegram = {"TELEGRAM_API_URL": api.url, "TELEGRAM_CHAT_ID": "111"}
    _, probe, samples, (status, body), _ = replay(
        tmp_path, filters, TELEGRAM_BOT_TOKEN=TOKEN, **telegram
    )
    assert probe.during is not None
    sent = total(samples, "polystream_telegram_sent_total")
    assert sent == len(api.delivered()) > 0
    assert total(samples, "polystream_telegram_outbox") == 0
    assert "polystream_telegram_sent_total" in probe.raw  # during and after the run
    assert TOKEN not in probe.raw and TOKEN.split(":")[1] not in probe.raw

    # a refused token halts the notifier: unhealthy, said without the token
    refused = tmp_path / "refused"
    refused.mkdir()
    _, probe, samples, (status, body), _ = replay(
        refused, filters, TELEGRAM_BOT_TOKEN=WRONG_TOKEN, **telegram
    )
    assert status == 503
    reasons = body["reasons"]
    assert isinstance(reasons, list)
    assert any(r.startswith("the Telegram notifier halted: ") for r in reasons), reasons
    assert "halted" in probe.raw
    assert WRONG_TOKEN not in probe.raw and WRONG_TOKEN.split(":")[1] not in probe.raw


def test_the_decoder_counts_events_per_channel_adding_up_to_its_total() -> None:
    t = T0
    agg = {"pair": "BTC-USD", "o": 1, "h": 2, "l": 1, "c": 2, "v": 3, "s": t, "e": t + 1000}
    frames = [
        [
            {"ev": "XT", "pair": "BTC-USD", "p": 1, "t": t, "s": 1, "c": [1], "i": "a", "x": 1},
            {"ev": "XT", "pair": "NOPE", "p": 1, "t": t, "s": 1, "c": [1], "i": "b", "x": 1},
            {"ev": "XQ", "pair": "ETH-USD", "bp": 1, "bs": 1, "ap": 2, "as": 1, "x": 1, "t": t},
        ],
        [{"ev": "XA", **agg}, {"ev": "XAS", **agg}, {"ev": "XAS", **agg}],
        [{"ev": "XL2", "pair": "BTC-USD", "t": t, "x": 1, "b": [], "a": []}],
        [{"ev": "FMV", "sym": "X:BTC-USD", "fmv": 1.5, "t": t}, {"ev": "status", "status": "x"}],
    ]
    batcher = Batcher(["X:BTCUSD"])
    batcher.build([Frame(t, json.dumps(f).encode()) for f in frames])
    stats = batcher.decoder.stats
    # the trade of a pair that names no symbol is rejected, and not counted as XT
    assert stats.rejected_events == 1
    expected = {"XT": 1, "XQ": 1, "XA": 1, "XAS": 2, "XL2": 1, "FMV": 1, "status": 1}
    assert stats.channels == expected
    assert sum(stats.channels.values()) == stats.events


def test_writer_rows_and_a_lost_database(tmp_path: Path, filters: Path, migrated: str) -> None:
    result, probe, samples, (status, body), _ = replay(tmp_path, filters, DATABASE_URL=migrated)
    rows = "polystream_store_rows_total"
    tables = {dict(labels)["table"] for name, labels in samples if name == rows}
    assert {"trades", "quotes", "bars"} <= tables
    with psycopg.connect(migrated) as db:
        for table in ("trades", "quotes", "bars", "alerts"):
            (stored,) = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone() or (0,)
            assert total(samples, rows, table=table) == stored
    assert total(samples, rows, table="trades") == 2 * SECONDS * PER_SECOND
    assert total(samples, "polystream_store_rows_total", table="bars") == result.view.feed.bars
    assert ("polystream_store_connected", ()) in samples  # 0 now: the writer has stopped
    assert total(samples, "polystream_store_journal_bytes") == 0
    assert body["reasons"] == ["the run has ended"], body
    assert "postgresql://" not in probe.raw

    # a database that cannot be reached: rows wait in the journal, and the run is unhealthy
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    lost = tmp_path / "lost"
    lost.mkdir()
    url = f"postgresql://polystream:hunter2@127.0.0.1:{port}/nowhere"
    _, probe, samples, (status, body), _ = replay(lost, filters, DATABASE_URL=url)
    assert status == 503
    reasons = body["reasons"]
    assert isinstance(reasons, list)
    assert any(r.startswith("the database writer is disconnected: ") for r in reasons), body
    assert total(samples, "polystream_store_connected") == 0
    assert total(samples, "polystream_store_journal_bytes") > 0
    assert "hunter2" not in probe.raw


def test_metrics_of_the_read_only_viewer_is_bad_usage(tmp_path: Path) -> None:
    result = run(tmp_path, "watch", "--from", "nats://127.0.0.1:1", "--metrics", "0")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "polystream: error: --metrics serves a run that computes: give --shard K/N with --from, "
        "or a feed."
    ]
