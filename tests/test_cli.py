"""The command line as users run it: a real process, the loopback demo feed, exit codes, output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import API_KEY
from polystream.simulator import DemoFeed


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POLYGON_", "MASSIVE_", "TELEGRAM_", "DATABASE_URL"))
    }
    clean.update({"POLYSTREAM_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "120", **extra})
    return clean


def run(
    tmp_path: Path, *args: str, timeout: float = 60, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polystream", *args],
        cwd=tmp_path,
        env=env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


BAR_KEYS = [
    "type",
    "symbol",
    "timeframe",
    "start",
    "end",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "vwap",
    "trades",
    "buy_volume",
    "sell_volume",
    "state",
    "rsi_14",
    "stoch_k",
    "stoch_d",
    "macd",
    "macd_signal",
    "macd_hist",
    "ao",
    "cci_20",
    "bb_upper",
    "bb_middle",
    "bb_lower",
    "flow_imbalance",
]


ALERT_KEYS = ["type", "filter", "symbol", "timeframe", "time", "severity", "message", "values"]


def records(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def assert_one_sentence_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("polystream: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in lines[-1]


def test_demo_json_runs_the_whole_pipeline(tmp_path: Path) -> None:
    result = run(tmp_path, "demo", "--no-ui", "--json", "--duration", "6")
    assert result.returncode == 0, result.stderr
    recs = records(result.stdout)
    statuses = [r for r in recs if r["type"] == "status"]
    bars = [r for r in recs if r["type"] == "bar"]
    # the demo runs the shipped filters
    alerts = [r for r in recs if r["type"] == "alert"]
    assert len(statuses) + len(bars) + len(alerts) == len(recs)
    assert all(list(a) == ALERT_KEYS for a in alerts)
    assert [r["event"] for r in statuses][:3] == ["connected", "authenticated", "subscribed"]
    assert all(isinstance(r["time"], int) and r["time"] > 1_600_000_000_000 for r in statuses)
    assert list(bars[0]) == BAR_KEYS
    final = [b for b in bars if b["timeframe"] == "1s" and b["state"] == "final"]
    assert final, bars
    assert all(b["end"] - b["start"] == 1000 for b in final)
    assert {b["symbol"] for b in final} == {"X:BTCUSD", "X:ETHUSD"}
    # a live stop emits the open bars as partial
    assert any(b["state"] == "partial" for b in bars)
    summary = result.stderr.strip().splitlines()[-1]
    assert int(summary.split()[0].replace(",", "")) > 100, summary


def test_dashboard_renders_symbols_and_footer(tmp_path: Path) -> None:
    result = run(tmp_path, "demo", "--duration", "2")
    assert result.returncode == 0, result.stderr
    screen = result.stderr
    for text in ("X:BTCUSD", "X:ETHUSD", "last", "spread", "events/s", "reconnects", "queue"):
        assert text in screen


def test_auth_failed_exits_1_with_one_sentence_and_no_key(tmp_path: Path) -> None:
    with DemoFeed(auth_failed=True) as feed:
        result = run(
            tmp_path,
            "watch",
            "X:BTCUSD",
            "--feed",
            feed.url,
            "--no-ui",
            "--json",
            POLYGON_API_KEY=API_KEY,
        )
        assert feed.connections == 1
    assert_one_sentence_error(result, "refused the API key")
    assert API_KEY not in result.stdout + result.stderr


def test_debug_adds_the_traceback_but_never_the_key(tmp_path: Path) -> None:
    with DemoFeed(auth_failed=True) as feed:
        result = run(
            tmp_path,
            "--debug",
            "watch",
            "X:BTCUSD",
            "--feed",
            feed.url,
            "--no-ui",
            POLYGON_API_KEY=API_KEY,
        )
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("polystream: error: ")
    assert API_KEY not in result.stdout + result.stderr


def test_key_is_redacted_in_debug_logs(tmp_path: Path) -> None:
    with DemoFeed(api_key=API_KEY) as feed:
        result = run(
            tmp_path,
            "--debug",
            "watch",
            "btc-usd",
            "--feed",
            feed.url,
            "--no-ui",
            "--json",
            "--duration",
            "1.5",
            POLYGON_API_KEY=API_KEY,
        )
    assert result.returncode == 0, result.stderr
    assert API_KEY not in result.stdout + result.stderr
    assert "authenticated" in result.stdout


def test_malformed_frames_are_counted_and_the_run_goes_on(tmp_path: Path) -> None:
    with DemoFeed(malformed_every=2, bar_seconds=0.05) as feed:
        result = run(
            tmp_path,
            "watch",
            "X:BTCUSD",
            "--feed",
            feed.url,
            "--no-ui",
            "--duration",
            "2",
            POLYGON_API_KEY=API_KEY,
        )
    assert result.returncode == 0, result.stderr
    summary = result.stderr.strip().splitlines()[-1]
    malformed = int(summary.split("rejected, ")[1].split()[0])
    rejected = int(summary.split(" frames; ")[1].split()[0])
    assert malformed + rejected > 0, summary
    assert int(summary.split()[0].replace(",", "")) > 0


def test_ctrl_c_drains_and_exits_130(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "polystream", "demo", "--no-ui", "--json"],
        cwd=tmp_path,
        env=env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen.append(line)
        if '"subscribed"' in line:
            break
    time.sleep(1.0)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 8
    assert "Traceback" not in err
    assert "events in" in err  # the orderly-stop summary
    for line in out.splitlines():
        json.loads(line)  # nothing half-written


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["watch", "BTC", "--feed", "demo"], ["Unknown symbol form"]),
        (["watch", "X:BTCUSD"], ["POLYGON_API_KEY"]),
        (["watch", "X:BTCUSD", "--feed", "nothing-here.rec"], ["--feed"]),
        (["watch", "X:BTCUSD", "--feed", "ws://"], ["--feed"]),
    ],
)
def test_user_errors_are_one_sentence(tmp_path: Path, args: list[str], words: list[str]) -> None:
    assert_one_sentence_error(run(tmp_path, *args), *words)


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    result = run(tmp_path, "watch", "X:BTCUSD", POLYGON_WS_URL="http://nope")
    assert_one_sentence_error(result, "POLYGON_WS_URL")


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    assert run(tmp_path, "watch", "X:BTCUSD", "--no-such-option").returncode == 2
    assert run(tmp_path, "watch").returncode == 2


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["watch", "X:BTCUSD", "--feed", "demo", "-t", "7m"], ["--timeframe", "7m"]),
        (["watch", "X:BTCUSD", "--feed", "demo", "-t", "1M"], ["--timeframe", "1m for a minute"]),
        (["watch", "X:BTCUSD", "--feed", "demo", "--channels", "XT,XZ"], ["--channels", "XZ"]),
        (["watch", "X:BTCUSD", "--feed", "demo", "--bars", "candles"], ["--bars", "candles"]),
        (["watch", "X:BTCUSD", "--feed", "demo", "--lateness", "soon"], ["--lateness"]),
        (["backfill", "X:BTCUSD", "--from", "yesterday", "-o", "x.csv"], ["--from"]),
        (["backfill", "X:BTCUSD", "--from", "2024-05-01", "-t", "1M", "-o", "x.csv"], ["1m"]),
    ],
)
def test_a_bad_option_value_is_bad_usage(tmp_path: Path, args: list[str], words: list[str]) -> None:
    # Before: exit 1, as if the user's setup were wrong; and -t 1M quietly meant a minute.
    result = run(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("polystream: error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_record_then_replay(tmp_path: Path) -> None:
    rec = tmp_path / "session.rec.gz"
    first = run(
        tmp_path,
        "watch",
        "X:BTCUSD",
        "--feed",
        "demo",
        "--record",
        str(rec),
        "--duration",
        "2",
        "--no-ui",
    )
    assert first.returncode == 0, first.stderr
    recorded_events = int(first.stderr.strip().splitlines()[-1].split()[0].replace(",", ""))
    assert recorded_events > 0
    replay = run(tmp_path, "watch", "X:BTCUSD", "--feed", str(rec), "--no-ui", "--json")
    assert replay.returncode == 0, replay.stderr
    replayed_events = int(replay.stderr.strip().splitlines()[-1].split()[0].replace(",", ""))
    assert replayed_events == recorded_events
    recs = records(replay.stdout)
    assert [r["event"] for r in recs if r["type"] == "status"][:1] == ["connected"]
    # the end of a replay makes every bar final: no partial bars
    bars = [r for r in recs if r["type"] == "bar"]
    assert bars and all(b["state"] == "final" for b in bars)


# --- URL settings: every malformed form is one sentence naming the setting, never its password --

URL_PASSWORD = "s3cr3t-pw-XYZ"

# The command that reads each URL setting first; its own flags keep it on loopback.
URL_COMMANDS = {
    "DATABASE_URL": ["migrate"],
    "POLYGON_WS_URL": ["watch", "X:BTCUSD", "--no-ui", "--duration", "1"],
    "POLYGON_REST_URL": [
        "backfill",
        "X:BTCUSD",
        "--from",
        "2024-05-29",
        "--to",
        "2024-05-30",
        "--per-minute",
        "0",
        "--output",
        "bars.csv",
    ],
    "TELEGRAM_API_URL": [
        "watch",
        "X:BTCUSD",
        "--feed",
        "demo",
        "--no-ui",
        "--duration",
        "1",
        "--notify",
    ],
}
URL_SCHEMES = {
    "DATABASE_URL": ("postgresql", "mysql"),
    "POLYGON_WS_URL": ("wss", "http"),
    "POLYGON_REST_URL": ("https", "ftp"),
    "TELEGRAM_API_URL": ("https", "ftp"),
}
URL_PEERS = {
    "POLYGON_API_KEY": API_KEY,
    "TELEGRAM_BOT_TOKEN": "123456:ABCdefGhIJKlmNoPQRsTUVwxyZ",
    "TELEGRAM_CHAT_ID": "1",
}


def malformed_urls(setting: str, password_allowed: bool) -> dict[str, str]:
    scheme, wrong = URL_SCHEMES[setting]
    auth = f"u:{URL_PASSWORD}@" if password_allowed else ""
    forms = {
        "port 99999": f"{scheme}://{auth}127.0.0.1:99999/x",
        "port 0": f"{scheme}://{auth}127.0.0.1:0/x",
        "port abc": f"{scheme}://{auth}127.0.0.1:abc/x",
        "empty host": f"{scheme}://{auth}:5432/x",
        "wrong scheme": f"{wrong}://{auth}127.0.0.1:5432/x",
        "garbage": f"::{URL_PASSWORD}::not a url",
        "ipv6 [ unbalanced": f"{scheme}://{auth}[::1:5432/x",
        "ipv6 ] unbalanced": f"{scheme}://{auth}::1]:5432/x",
    }
    if not password_allowed:
        forms["credentials"] = f"{scheme}://u:{URL_PASSWORD}@127.0.0.1:9/x"
    return forms


MALFORMED_URLS = [
    pytest.param(setting, value, id=f"{setting}-{form}")
    for setting in URL_COMMANDS
    for form, value in malformed_urls(setting, setting == "DATABASE_URL").items()
]


def assert_one_sentence_naming(result: subprocess.CompletedProcess[str], name: str) -> None:
    """Exit 1, and stderr is exactly one sentence naming `name`, without the password."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert URL_PASSWORD not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    sentence = lines[0].removeprefix("polystream: error: ")
    assert sentence != lines[0], result.stderr
    assert name in sentence
    assert sentence.endswith(".") and ". " not in sentence, sentence


@pytest.mark.parametrize(("setting", "value"), MALFORMED_URLS)
def test_malformed_url_setting_is_one_sentence_without_the_password(
    tmp_path: Path, setting: str, value: str
) -> None:
    result = run(tmp_path, *URL_COMMANDS[setting], **URL_PEERS, **{setting: value})
    assert_one_sentence_naming(result, setting)


@pytest.mark.parametrize(
    "args",
    [
        ["watch", "X:BTCUSD", "--feed", "demo", "--no-ui", "--duration", "1"],
        ["backfill", "X:BTCUSD", "--from", "2024-05-29", "--to", "2024-05-30"],
        ["migrate", "--list"],
        ["migrate", "--rollback"],
    ],
)
@pytest.mark.parametrize("port", ["99999", "abc"])
def test_a_bad_database_port_is_one_sentence_for_every_command(
    tmp_path: Path, args: list[str], port: str
) -> None:
    url = f"postgresql://u:{URL_PASSWORD}@127.0.0.1:{port}/x"
    result = run(tmp_path, *args, **URL_PEERS, DATABASE_URL=url)
    assert_one_sentence_naming(result, "DATABASE_URL")


@pytest.mark.parametrize(
    "url",
    [
        "wss://127.0.0.1:99999/x",
        "wss://127.0.0.1:0/x",
        "wss://127.0.0.1:abc/x",
        "wss://:5432/x",
        f"wss://u:{URL_PASSWORD}@127.0.0.1:9/x",
        "wss://[::1:5432/x",
    ],
)
def test_a_malformed_feed_url_is_one_sentence_naming_the_flag(tmp_path: Path, url: str) -> None:
    result = run(tmp_path, "watch", "X:BTCUSD", "--feed", url, "--no-ui", "--duration", "1")
    assert_one_sentence_naming(result, "--feed")


def test_valid_url_settings_still_run(tmp_path: Path) -> None:
    with DemoFeed(api_key=API_KEY, bar_seconds=0.05) as feed:
        assert feed.url.startswith("ws://127.0.0.1:")
        result = run(
            tmp_path,
            "watch",
            "X:BTCUSD",
            "--no-ui",
            "--json",
            "--duration",
            "1",
            "--no-notify",
            POLYGON_API_KEY=API_KEY,
            POLYGON_WS_URL=feed.url + "/",
            POLYGON_REST_URL="http://127.0.0.1:9/",
            TELEGRAM_API_URL="http://[::1]:9",
            TELEGRAM_BOT_TOKEN="123456:ABCdefGhIJKlmNoPQRsTUVwxyZ",
            TELEGRAM_CHAT_ID="1",
        )
    assert result.returncode == 0, result.stderr
    assert "subscribed" in [r.get("event") for r in records(result.stdout)]


def test_migrate_accepts_postgres_and_postgresql_urls(tmp_path: Path, database_url: str) -> None:
    assert database_url.startswith("postgresql://")
    short = "postgres://" + database_url.removeprefix("postgresql://")
    applied = run(tmp_path, "migrate", DATABASE_URL=short)
    assert applied.returncode == 0, applied.stderr
    listed = run(tmp_path, "migrate", "--list", DATABASE_URL=database_url)
    assert listed.returncode == 0, listed.stderr


def test_the_closing_summary_counts_in_words(tmp_path: Path) -> None:
    # Before: "1 alerts from 1 filters".
    filters = tmp_path / "filters"
    filters.mkdir()
    (filters / "first-trade.yaml").write_text(
        'name: first-trade\nsymbols: ["*"]\non: trade\nwhen: price > 0\ntrigger: edge\n'
        "message: '{symbol} traded'\n"
    )
    recording = tmp_path / "one.tsv"
    trade = '[{"ev":"XT","pair":"BTC-USD","p":1.5,"t":1700000000000,"s":1,"c":[2],"i":"1","x":1}]'
    recording.write_text(f"1700000000005\t{trade}\n")
    result = run(tmp_path, "watch", "X:BTCUSD", "--feed", str(recording), "--no-ui")
    assert result.returncode == 0, result.stderr
    assert "0 reconnects; 0 gaps;" in result.stderr
    assert "1 alert from 1 filter" in result.stderr.splitlines()[-1], result.stderr


def test_a_reader_that_goes_away_ends_the_run_quietly(tmp_path: Path) -> None:
    # Before: "error The JSON output failed (BrokenPipeError …)" and the run went on.
    from test_filter_cli import write_recording

    recording = tmp_path / "long.tsv"
    write_recording(recording, seconds=3_000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "polystream", "watch", "X:BTCUSD", "--feed", str(recording),
         "--speed", "50", "--no-ui", "--json", "-t", "1s"],
        cwd=tmp_path, env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()  # like `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 0, err
    assert "Traceback" not in err and "error" not in err.lower(), err
    assert "events in" in err  # the summary, after an orderly stop


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_a_run_without_filters_says_so(tmp_path: Path, where: str) -> None:
    # Before: it ran silently with `filters 0`.
    from test_filter_cli import write_recording

    recording = tmp_path / "short.tsv"
    write_recording(recording, seconds=3)
    directory = tmp_path / "filterz"
    if where == "empty":
        directory.mkdir()
    result = run(tmp_path, "watch", "X:BTCUSD", "--feed", str(recording), "--no-ui", "--json",
                 "--filters", str(directory))  # fmt: skip
    assert result.returncode == 0, result.stderr
    said = [
        r for r in records(result.stdout) if r["type"] == "status" and r["event"] == "no_filters"
    ]
    assert len(said) == 1
    detail = str(said[0]["detail"])
    assert str(directory) in detail and "polystream filter add" in detail
    assert ("does not exist" if where == "missing" else "holds no filter files") in detail


def test_json_in_a_terminal_leaves_out_the_dashboard(tmp_path: Path) -> None:
    # Before: JSON lines and the dashboard were drawn over each other on the same terminal.
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout and stderr are the terminal
        os.chdir(tmp_path)
        os.execve(
            sys.executable,
            [sys.executable, "-m", "polystream", "demo", "--json", "--duration", "3"],
            env(tmp_path),
        )
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert '{"type":"bar"' in text  # the JSON lines
    assert "┏" not in text and "╭" not in text  # no table, no panel
    assert "events in" in text  # the plain summary on stderr


def test_a_loopback_feed_needs_no_api_key(tmp_path: Path) -> None:
    # Before: "No API key" against `polystream simulate`, which takes any key.
    from polystream.simulator import DemoFeed

    with DemoFeed(seed=3) as feed:
        result = run(tmp_path, "watch", "X:BTCUSD", "--feed", feed.url, "--no-ui", "--json",
                     "--duration", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [r["event"] for r in records(result.stdout) if r["type"] == "status"]
    assert "authenticated" in events and "subscribed" in events
    far = run(tmp_path, "watch", "X:BTCUSD", "--feed", "wss://feed.example:443/crypto")
    assert_one_sentence_error(far, "No API key for the feed at wss://feed.example:443/crypto")


def test_a_live_run_that_never_reached_its_feed_is_an_error(tmp_path: Path) -> None:
    # Before: it ended with exit 0, as if all had gone well.
    import socket

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = run(tmp_path, "watch", "X:BTCUSD", "--feed", f"ws://127.0.0.1:{port}/crypto",
                 "--no-ui", "--duration", "2")  # fmt: skip
    assert_one_sentence_error(result, f"The feed at ws://127.0.0.1:{port}/crypto was never reached")


def test_a_dropped_connection_is_told_once(tmp_path: Path) -> None:
    # Before: with --no-ui each drop was a log line and a status line.
    from polystream.simulator import DemoFeed

    with DemoFeed(seed=5, bar_seconds=0.05) as feed:
        proc = subprocess.Popen(
            [sys.executable, "-m", "polystream", "watch", "X:BTCUSD", "--feed", feed.url,
             "--no-ui", "--duration", "4"],
            cwd=tmp_path, env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        time.sleep(2.0)
        feed.drop_connections()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    told = [line for line in err.splitlines() if "disconnected" in line]
    assert len(told) == 1, err


def test_a_replay_without_a_watched_symbol_says_so(tmp_path: Path) -> None:
    # Before: 0 bars of it and no word why.
    from test_filter_cli import write_recording

    recording = tmp_path / "btc.tsv"
    write_recording(recording, seconds=3)
    result = run(tmp_path, "watch", "X:BTCUSD", "X:SOLUSD", "--feed", str(recording), "--no-ui",
                 "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    said = [
        r for r in records(result.stdout) if r["type"] == "status" and r["event"] == "no_events"
    ]
    assert [r["detail"] for r in said] == [
        "no events of X:SOLUSD in this replay; it holds no other symbol either"
    ]
    whole = run(tmp_path, "watch", "X:BTCUSD", "--feed", str(recording), "--no-ui", "--json")
    assert "no_events" not in whole.stdout


def test_the_demo_feed_leaves_the_last_fired_times_alone(tmp_path: Path) -> None:
    # Before: a demo run's made-up alerts showed in `filter list` as when filters last fired.
    from test_filter_cli import EVERY_BAR, write_recording

    state = tmp_path / "state" / "last-fired.json"
    demo = run(tmp_path, "demo", "--no-ui", "--duration", "6")
    assert demo.returncode == 0, demo.stderr
    assert "0 alerts" not in demo.stderr.splitlines()[-1]  # the demo's filters did fire
    assert not state.exists()
    filters = tmp_path / "filters"
    filters.mkdir()
    (filters / "every-bar.yaml").write_text(EVERY_BAR)
    recording = tmp_path / "trades.tsv"
    write_recording(recording, seconds=5)
    replayed = run(tmp_path, "watch", "X:BTCUSD", "--feed", str(recording), "-t", "1s", "--no-ui")
    assert replayed.returncode == 0, replayed.stderr
    assert "every-bar" in json.loads(state.read_text())
