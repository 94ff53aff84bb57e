"""Filters as users drive them: the `filter` commands, and `watch` picking up files mid-run."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from rich.console import Console

from polystream.display import Dashboard
from polystream.filters import (
    Alert,
    FilterError,
    load_directory,
    parse_filter,
    read_filter,
    shipped_dir,
    write_last_fired,
)
from polystream.sinks import FeedState, Output, View
from test_cli import assert_one_sentence_error, env, records, run

BTC_BARS = Path(__file__).parent.parent / "polystream" / "data" / "btcusd_1m_2019-03-29.csv"
T0 = 1_700_000_000_000
EVERY_BAR = """\
name: every-bar
description: fires on every final bar, to see exactly when a filter starts and stops
on: bar
timeframe: 1s
when: close > 0
trigger: level
message: "{symbol} closed at {close}"
"""


def write_recording(path: Path, seconds: int, per_second: int = 10) -> None:
    """Trades of X:BTCUSD, `per_second` per second of event time, received 5 ms later."""
    lines = []
    step = 1000 // per_second
    for k in range(seconds * per_second):
        t = T0 + k * step
        trade = {
            "ev": "XT",
            "pair": "BTC-USD",
            "p": 30_000 + (k % 17),
            "t": t,
            "s": 0.5,
            "c": [2 if k % 3 else 1],
            "i": str(k),
            "x": 1,
            "r": t + 5,
        }
        lines.append(f"{t + 5}\t{json.dumps([trade])}\n")
    path.write_text("".join(lines))


class Lines:
    """The stdout of a running process, line by line, with the wall time each arrived."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.seen: list[tuple[float, dict[str, object]]] = []
        self._queue: queue.Queue[tuple[float, dict[str, object]] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self._queue.put((time.monotonic(), json.loads(line)))
        self._queue.put(None)

    def wait_for(self, match: dict[str, object], timeout: float = 15) -> float:
        """Read until a record has every key/value of `match`; return when it arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None:
                break
            self.seen.append(item)
            if all(item[1].get(k) == v for k, v in match.items()):
                return item[0]
        seen = [r.get("event") or r.get("type") for _, r in self.seen[-20:]]
        raise AssertionError(f"no record like {match} within {timeout} s; last: {seen}")

    def rest(self) -> list[dict[str, object]]:
        while (item := self._queue.get(timeout=30)) is not None:
            self.seen.append(item)
        return [r for _, r in self.seen]


@pytest.fixture
def filters_dir(tmp_path: Path) -> Path:
    path = tmp_path / "filters"
    path.mkdir()
    return path


@pytest.fixture
def watch_process(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Processes started by a test; killed if the test leaves them running."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def start(tmp_path: Path, procs: list[subprocess.Popen[str]], *args: str) -> Lines:
    proc = subprocess.Popen(
        [sys.executable, "-m", "polystream", *args],
        cwd=tmp_path,
        env=env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    return Lines(proc)


# -- watch ------------------------------------------------------------------------------------


def test_filter_added_mid_replay_fires_from_then_on(
    tmp_path: Path, filters_dir: Path, watch_process: list[subprocess.Popen[str]]
) -> None:
    recording = tmp_path / "trades.tsv"
    write_recording(recording, seconds=80)
    out = start(
        tmp_path,
        watch_process,
        "watch",
        "X:BTCUSD",
        "--feed",
        str(recording),
        "--speed",
        "10",
        "-t",
        "1s",
        "--json",
        "--no-ui",
        "--filters",
        str(filters_dir),
    )
    out.wait_for({"type": "bar", "state": "final"})
    time.sleep(1.5)
    (filters_dir / "every-bar.yaml").write_text(EVERY_BAR)
    out.wait_for({"type": "status", "event": "filter_added"})
    recs = out.rest()
    assert watch_process[0].wait(30) == 0
    added = next(i for i, r in enumerate(recs) if r.get("event") == "filter_added")
    before, after = recs[:added], recs[added + 1 :]
    assert not [r for r in before if r["type"] == "alert"]
    assert len([r for r in before if r["type"] == "bar"]) >= 10  # it really was mid-run
    alerts = {r["time"]: r for r in after if r["type"] == "alert"}
    final_after = [r for r in after if r["type"] == "bar" and r["state"] == "final"]
    assert len(final_after) >= 20
    # a level trigger fires on every final bar from the first one evaluated after the file
    # appeared, to the end of the replay
    assert sorted(alerts) == [r["start"] for r in final_after]
    last = alerts[final_after[-1]["start"]]
    assert last["filter"] == "every-bar" and last["timeframe"] == "1s"
    assert last["message"] == f"X:BTCUSD closed at {final_after[-1]['close']}"
    assert last["values"] == {"close": final_after[-1]["close"]}


def test_live_watch_reloads_within_a_second(
    tmp_path: Path, filters_dir: Path, watch_process: list[subprocess.Popen[str]]
) -> None:
    out = start(
        tmp_path,
        watch_process,
        "watch",
        "X:BTCUSD",
        "--feed",
        "demo",
        "-t",
        "1s",
        "--json",
        "--no-ui",
        "--filters",
        str(filters_dir),
        "--duration",
        "40",
    )
    out.wait_for({"type": "status", "event": "subscribed"})
    path = filters_dir / "every-bar.yaml"

    t0 = time.monotonic()
    path.write_text(EVERY_BAR)
    assert out.wait_for({"type": "status", "event": "filter_added"}) - t0 < 1.0
    out.wait_for({"type": "alert", "filter": "every-bar"})

    t0 = time.monotonic()
    path.write_text(EVERY_BAR.replace("closed at {close}", "now {close:.0f}"))
    assert out.wait_for({"type": "status", "event": "filter_changed"}) - t0 < 1.0
    changed = out.wait_for({"type": "alert", "filter": "every-bar"})
    assert "now" in str(out.seen[-1][1]["message"]), changed

    t0 = time.monotonic()
    path.write_text(EVERY_BAR.replace("close > 0", "close > > 0"))
    assert out.wait_for({"type": "status", "event": "filter_error"}) - t0 < 1.0
    error = out.seen[-1][1]
    assert "every-bar.yaml:5:15" in str(error["detail"])
    assert "previous version keeps running" in str(error["detail"])
    out.wait_for({"type": "alert", "filter": "every-bar"})  # the previous version still runs
    assert "now" in str(out.seen[-1][1]["message"])

    t0 = time.monotonic()
    path.unlink()
    assert out.wait_for({"type": "status", "event": "filter_removed"}) - t0 < 1.0
    removed_at = len(out.seen)
    watch_process[0].terminate()
    later = out.rest()[removed_at:]
    assert not [r for r in later if r["type"] == "alert"]


def test_watch_refuses_to_start_with_an_invalid_filter(tmp_path: Path, filters_dir: Path) -> None:
    (filters_dir / "broken.yaml").write_text("name: broken\nwhen: rsi(14) <\n")
    result = run(tmp_path, "watch", "X:BTCUSD", "--feed", "demo", "--filters", str(filters_dir))
    assert_one_sentence_error(result, "not valid", "filter validate")
    assert "broken.yaml:2:16: expected a number, a name or '(', found the end" in result.stderr
    assert "    when: rsi(14) <\n" + " " * 19 + "^\n" in result.stderr


def test_watch_builds_the_timeframes_filters_need(tmp_path: Path, filters_dir: Path) -> None:
    recording = tmp_path / "trades.tsv"
    write_recording(recording, seconds=20)
    (filters_dir / "every-bar.yaml").write_text(EVERY_BAR.replace("1s", "5s"))
    result = run(
        tmp_path,
        *("watch", "X:BTCUSD", "--feed", str(recording), "-t", "1s", "--json", "--no-ui"),
        *("--filters", str(filters_dir)),
    )
    assert result.returncode == 0, result.stderr
    recs = records(result.stdout)
    five = [r for r in recs if r["type"] == "bar" and r["timeframe"] == "5s"]
    alerts = [r for r in recs if r["type"] == "alert"]
    assert len(five) == 4 and [a["time"] for a in alerts] == [b["start"] for b in five]
    assert {a["timeframe"] for a in alerts} == {"5s"}


# -- the filter commands ----------------------------------------------------------------------


def test_add_copies_a_valid_file_and_refuses_a_duplicate(tmp_path: Path) -> None:
    source = tmp_path / "mine.yaml"
    source.write_text(EVERY_BAR)
    first = run(tmp_path, "filter", "add", str(source))
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "filters" / "every-bar.yaml").read_text() == EVERY_BAR

    again = run(tmp_path, "filter", "add", str(source))
    assert_one_sentence_error(again, "already exists", "--force")

    source.write_text(EVERY_BAR.replace("close > 0", "close > 1"))
    forced = run(tmp_path, "filter", "add", str(source), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "close > 1" in (tmp_path / "filters" / "every-bar.yaml").read_text()
    assert len(list((tmp_path / "filters").iterdir())) == 1


def test_add_writes_nothing_when_the_file_is_invalid(tmp_path: Path) -> None:
    source = tmp_path / "bad.yaml"
    source.write_text("name: bad\nwhen: rsi(14) < 30 and clsoe > 1\nseverity: loud\n")
    result = run(tmp_path, "filter", "add", str(source))
    assert_one_sentence_error(result, "bad.yaml", "not a valid filter")
    assert "bad.yaml:2:24: unknown field 'clsoe'" in result.stderr
    assert "bad.yaml:3:11: unknown severity 'loud'" in result.stderr
    assert not (tmp_path / "filters").exists()


def test_add_from_options_writes_the_yaml(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        *("filter", "add", "--name", "btc-dip", "--when", "rsi(14) < 30 and close < ema(50)"),
        *("--symbols", "btcusd,ETH-USD", "--cooldown", "5m", "--severity", "critical"),
        *("--message", '{symbol}: RSI {rsi_14:.1f} "low"', "--timeframe", "5m"),
    )
    assert result.returncode == 0, result.stderr
    f = read_filter(tmp_path / "filters" / "btc-dip.yaml")
    assert f.symbols == ("X:BTCUSD", "X:ETHUSD")
    assert (f.cooldown, f.severity, f.timeframe) == (300_000, "critical", 300_000)
    assert f.message == '{symbol}: RSI {rsi_14:.1f} "low"'

    bad = run(tmp_path, "filter", "add", "--name", "oops", "--when", "rsi(14) < and 3")
    assert_one_sentence_error(bad, "nothing was written")
    assert "expected a value before 'and'" in bad.stderr
    assert not (tmp_path / "filters" / "oops.yaml").exists()

    usage = run(tmp_path, "filter", "add")
    assert usage.returncode == 2


def test_add_a_shipped_filter_by_name(tmp_path: Path) -> None:
    name = sorted(load_directory(shipped_dir()).filters)[0]
    listed = run(tmp_path, "filter", "list", "--shipped")
    assert listed.returncode == 0, listed.stderr
    assert f"│ {name} " in listed.stdout
    added = run(tmp_path, "filter", "add", name)
    assert added.returncode == 0, added.stderr
    assert (tmp_path / "filters" / f"{name}.yaml").is_file()


def test_list_show_remove(tmp_path: Path, filters_dir: Path) -> None:
    (filters_dir / "every-bar.yaml").write_text(EVERY_BAR)
    (filters_dir / "broken.yaml").write_text("name: broken\nwhen: 1 +\n")
    recording = tmp_path / "trades.tsv"
    write_recording(recording, seconds=5)
    (filters_dir / "broken.yaml").rename(tmp_path / "broken.yaml")
    watched = run(tmp_path, "watch", "X:BTCUSD", "--feed", str(recording), "-t", "1s", "--no-ui")
    assert watched.returncode == 0, watched.stderr
    assert "alerts from 1 filter" in watched.stderr and "1 filters" not in watched.stderr
    (tmp_path / "broken.yaml").rename(filters_dir / "broken.yaml")

    listed = run(tmp_path, "filter", "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "every-bar" in line)
    cells = [c.strip() for c in row.split("│")[1:-1]]
    # the replay's end makes its last bar (the fifth second) final, and it fires on that too
    last = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime((T0 + 4000) / 1000))
    assert cells == ["every-bar", "bar", "1s", "*", "close > 0", last]
    assert "broken" in listed.stdout and "invalid" in listed.stdout

    shown = run(tmp_path, "filter", "show", "every-bar")
    assert shown.returncode == 0 and "when: close > 0" in shown.stdout

    removed = run(tmp_path, "filter", "remove", "every-bar")
    assert removed.returncode == 0, removed.stderr
    assert not (filters_dir / "every-bar.yaml").exists()
    missing = run(tmp_path, "filter", "remove", "every-bar")
    assert_one_sentence_error(missing, "No filter named")


def test_validate_reports_every_problem(tmp_path: Path, filters_dir: Path) -> None:
    (filters_dir / "good.yaml").write_text(EVERY_BAR)
    (filters_dir / "bad.yaml").write_text(
        "name: bad\non: trade\ntimeframe: 1m\nwhen: rsi(14) < 30\nnotify: [pager]\n"
    )
    (filters_dir / "twin.yaml").write_text(EVERY_BAR)
    result = run(tmp_path, "filter", "validate")
    assert_one_sentence_error(result, "2 of 3")
    assert "ok filters/good.yaml (every-bar)" in result.stderr
    for expected in (
        "bad.yaml:3:1: timeframe: applies to bars",
        "bad.yaml:4:7: rsi() works on bars",
        "bad.yaml:5:10: unknown notifier 'pager'",
        "twin.yaml: the name 'every-bar' is already used",
    ):
        assert expected in result.stderr
    only_good = run(tmp_path, "filter", "validate", str(filters_dir / "good.yaml"))
    assert only_good.returncode == 0, only_good.stderr


def test_test_on_a_replay(tmp_path: Path, filters_dir: Path) -> None:
    recording = tmp_path / "trades.tsv"
    write_recording(recording, seconds=12)
    (filters_dir / "every-bar.yaml").write_text(EVERY_BAR)
    result = run(tmp_path, "filter", "test", "every-bar", "--replay", str(recording), "--json")
    assert result.returncode == 0, result.stderr
    alerts = records(result.stdout)
    assert [a["time"] for a in alerts] == [T0 + 1000 * k for k in range(12)]
    assert {a["type"] for a in alerts} == {"alert"}  # the summary is not on stdout
    assert "fired 12 times replaying" in result.stderr


def test_test_on_a_replay_takes_a_timeframe(tmp_path: Path, filters_dir: Path) -> None:
    # Before: no -t, so a filter without a timeframe was always tested on 1m bars.
    recording = tmp_path / "trades.tsv"
    write_recording(recording, seconds=125)
    (filters_dir / "any-bar.yaml").write_text(
        EVERY_BAR.replace("timeframe: 1s\n", "").replace("every-bar", "any-bar")
    )
    default = run(tmp_path, "filter", "test", "any-bar", "--replay", str(recording), "--json")
    assert default.returncode == 0, default.stderr
    minutes = records(default.stdout)
    assert {a["timeframe"] for a in minutes} == {"1m"} and " 1m bars)" in default.stderr
    seconds = run(
        tmp_path, "filter", "test", "any-bar", "--replay", str(recording), "-t", "5s", "--json"
    )
    assert seconds.returncode == 0, seconds.stderr
    fives = records(seconds.stdout)
    assert {a["timeframe"] for a in fives} == {"5s"} and " 5s bars)" in seconds.stderr
    assert len(fives) >= 24 > len(minutes)


def test_test_needs_exactly_one_history(tmp_path: Path) -> None:
    source = tmp_path / "x.yaml"
    source.write_text(EVERY_BAR)
    assert run(tmp_path, "filter", "test", str(source)).returncode == 2
    trade = tmp_path / "t.yaml"
    trade.write_text("name: t\non: trade\nwhen: size > 1\n")
    bars = run(tmp_path, "filter", "test", str(trade), "--bars", str(BTC_BARS))
    assert_one_sentence_error(bars, "--replay")
    unknown = run(tmp_path, "filter", "test", "nope", "--bars", str(BTC_BARS))
    assert_one_sentence_error(unknown, "neither a filter file")


RSI_LOW = "name: rsi-low\nwhen: rsi(14) < 35\nmessage: '{symbol} RSI {rsi_14:.1f}'\n"


def two_symbol_bars(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """The shipped BTC bars and an ETH series of their own over the same minutes: in one file
    with a symbol column (rows interleaved), and each alone in a file without one."""
    btc = pl.read_csv(BTC_BARS)
    # BTC's path run backwards in time, at another price
    prices = ("open", "high", "low", "close", "volume")
    eth = btc.select(
        "time", *(pl.col(c).reverse() * (0.05 if c != "volume" else 1) for c in prices)
    )
    alone = {"X:BTCUSD": tmp_path / "btc.csv", "X:ETHUSD": tmp_path / "eth.csv"}
    btc.write_csv(alone["X:BTCUSD"])
    eth.write_csv(alone["X:ETHUSD"])
    both = tmp_path / "both.csv"
    pl.concat(
        [btc.with_columns(symbol=pl.lit("X:BTCUSD")), eth.with_columns(symbol=pl.lit("ETH-USD"))]
    ).sort("time").select("symbol", *btc.columns).write_csv(both)
    return both, alone


def test_test_on_a_bar_file_of_several_symbols(tmp_path: Path) -> None:
    both, alone = two_symbol_bars(tmp_path)
    source = tmp_path / "rsi-low.yaml"
    source.write_text(RSI_LOW)
    result = run(tmp_path, "filter", "test", str(source), "--bars", str(both), "--json")
    assert result.returncode == 0, result.stderr
    alerts = records(result.stdout)
    times = [a["time"] for a in alerts]
    assert times == sorted(times)
    for symbol, path in alone.items():
        single = run(
            tmp_path, "filter", "test", str(source), "--bars", str(path), "--symbol", symbol,
            "--json",
        )  # fmt: skip
        assert single.returncode == 0, single.stderr
        expected = records(single.stdout)
        mine = [a for a in alerts if a["symbol"] == symbol]
        assert mine == expected and expected, symbol
        assert all(str(a["message"]).startswith(symbol) for a in mine)
    counts = {s: sum(a["symbol"] == s for a in alerts) for s in alone}
    assert f"(X:BTCUSD {counts['X:BTCUSD']}, X:ETHUSD {counts['X:ETHUSD']})" in result.stderr

    picked = run(
        tmp_path, "filter", "test", str(source), "--bars", str(both), "--symbol", "eth-usd",
        "--json",
    )  # fmt: skip
    assert picked.returncode == 0, picked.stderr
    assert records(picked.stdout) == [a for a in alerts if a["symbol"] == "X:ETHUSD"]

    unknown = run(
        tmp_path, "filter", "test", str(source), "--bars", str(both), "--symbol", "SOL-USD"
    )
    assert_one_sentence_error(unknown, "X:SOLUSD", "X:BTCUSD and X:ETHUSD")


def test_a_filter_for_one_symbol_fires_only_for_it_in_a_file_of_several(tmp_path: Path) -> None:
    both, _ = two_symbol_bars(tmp_path)
    source = tmp_path / "rsi-low.yaml"
    source.write_text(RSI_LOW + "symbols: [ETH-USD]\n")
    result = run(tmp_path, "filter", "test", str(source), "--bars", str(both), "--json")
    assert result.returncode == 0, result.stderr
    alerts = records(result.stdout)
    assert alerts and {a["symbol"] for a in alerts} == {"X:ETHUSD"}
    assert "rsi-low watches only X:ETHUSD" in result.stderr


# -- --json ------------------------------------------------------------------------------------

DIP = """\
name: btc-dip
description: a dip on BTC and ETH
symbols: [btcusd, ETH-USD]
timeframe: 5m
when: rsi(14) < 30
trigger: level
cooldown: 90s
severity: critical
message: "{symbol} RSI {rsi_14:.1f}"
notify: [console, telegram]
"""
QUOTE_WIDE = "name: wide\non: quote\nwhen: spread > 5\ncooldown: 1500ms\n"


def json_lines(stdout: str) -> list[dict[str, object]]:
    """Every line of stdout, each of which must be one JSON object."""
    lines = stdout.splitlines()
    assert lines and all(line.startswith("{") and line.endswith("}") for line in lines), stdout
    return [json.loads(line) for line in lines]


def test_list_json_has_every_setting_and_the_invalid_files(
    tmp_path: Path, filters_dir: Path
) -> None:
    (filters_dir / "every-bar.yaml").write_text(EVERY_BAR)
    (filters_dir / "dip.yaml").write_text(DIP)
    (filters_dir / "wide.yaml").write_text(QUOTE_WIDE)
    (filters_dir / "broken.yaml").write_text("name: broken\nwhen: 1 +\n")
    write_last_fired(tmp_path / "state", [("btc-dip", T0)])
    result = run(tmp_path, "filter", "list", "--json")
    assert result.returncode == 0, result.stderr
    by_name = {r["name"]: r for r in json_lines(result.stdout)}
    assert sorted(by_name) == ["broken", "btc-dip", "every-bar", "wide"]
    assert by_name["btc-dip"] == {
        "name": "btc-dip",
        "file": "filters/dip.yaml",
        "valid": True,
        "description": "a dip on BTC and ETH",
        "on": "bar",
        "timeframe": "5m",
        "symbols": ["X:BTCUSD", "X:ETHUSD"],
        "when": "rsi(14) < 30",
        "trigger": "level",
        "cooldown": 90,
        "severity": "critical",
        "message": "{symbol} RSI {rsi_14:.1f}",
        "notify": ["console", "telegram"],
        "attach": None,
        "last_fired": T0,
    }
    every = by_name["every-bar"]
    assert (every["timeframe"], every["symbols"], every["cooldown"]) == ("1s", [], None)
    assert (every["message"], every["last_fired"], every["notify"]) == (
        "{symbol} closed at {close}", None, ["console"],
    )  # fmt: skip
    wide = by_name["wide"]
    assert (wide["on"], wide["timeframe"], wide["cooldown"], wide["trigger"]) == (
        "quote", None, 1.5, "edge",
    )  # fmt: skip
    broken = by_name["broken"]
    assert broken["valid"] is False and broken["file"] == "filters/broken.yaml"
    assert "broken.yaml is not a valid filter" in str(broken["error"])
    message = "expected a number, a name or '(', found the end of the expression"
    assert broken["problems"] == [{"line": 2, "column": 10, "message": message}]


def test_list_shipped_json_matches_the_shipped_files(tmp_path: Path) -> None:
    shipped = load_directory(shipped_dir()).filters
    result = run(tmp_path, "filter", "list", "--shipped", "--json")
    assert result.returncode == 0, result.stderr
    listed = json_lines(result.stdout)
    assert [r["name"] for r in listed] == list(shipped)
    for r in listed:
        f = read_filter(Path(str(r["file"])))
        assert (r["name"], r["when"], r["on"], r["severity"]) == (f.name, f.when, f.on, f.severity)
        assert r["valid"] is True and r["last_fired"] is None


def test_empty_list_json_prints_nothing_on_stdout(tmp_path: Path, filters_dir: Path) -> None:
    result = run(tmp_path, "filter", "list", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and "no filters in filters" in result.stderr


def test_show_json_is_the_list_record(tmp_path: Path, filters_dir: Path) -> None:
    (filters_dir / "dip.yaml").write_text(DIP)
    (filters_dir / "broken.yaml").write_text("name: broken\nwhen: 1 +\n")
    listed = {r["name"]: r for r in json_lines(run(tmp_path, "filter", "list", "--json").stdout)}
    for name in ("btc-dip", "broken"):
        shown = run(tmp_path, "filter", "show", name, "--json")
        assert shown.returncode == 0, shown.stderr
        assert json_lines(shown.stdout) == [listed[name]]
    missing = run(tmp_path, "filter", "show", "nope", "--json")
    assert_one_sentence_error(missing, "not the name of a filter")
    assert missing.stdout == ""


def test_validate_json_has_one_object_per_file(tmp_path: Path, filters_dir: Path) -> None:
    (filters_dir / "good.yaml").write_text(EVERY_BAR)
    (filters_dir / "bad.yaml").write_text(
        "name: bad\non: trade\ntimeframe: 1m\nwhen: rsi(14) < 30\nnotify: [pager]\n"
    )
    (filters_dir / "quote.yaml").write_text('name: quote\nwhen: "close > 1\n')
    (filters_dir / "twin.yaml").write_text(EVERY_BAR)
    result = run(tmp_path, "filter", "validate", "--json")
    assert_one_sentence_error(result, "3 of 4")
    assert "ok filters" not in result.stderr and "bad.yaml:" not in result.stderr
    checked = {r["file"]: r for r in json_lines(result.stdout)}
    assert checked["filters/good.yaml"] == {
        "file": "filters/good.yaml", "valid": True, "name": "every-bar", "problems": [],
    }  # fmt: skip
    bad = checked["filters/bad.yaml"]
    assert bad["valid"] is False and "name" not in bad
    assert [(p["line"], p["column"]) for p in bad["problems"]] == [(3, 1), (4, 7), (5, 10)]
    assert str(bad["problems"][2]["message"]).startswith("unknown notifier 'pager'")
    quote = checked["filters/quote.yaml"]["problems"]
    assert [(p["line"], p["column"]) for p in quote] == [(2, 17)]
    twin = checked["filters/twin.yaml"]
    assert twin["valid"] is False and twin["name"] == "every-bar"
    assert twin["problems"] == [
        {
            "line": None,
            "column": None,
            "message": "the name 'every-bar' is already used by filters/good.yaml",
        }
    ]
    good = run(tmp_path, "filter", "validate", "--json", str(filters_dir / "good.yaml"))
    assert good.returncode == 0, good.stderr
    assert [r["valid"] for r in json_lines(good.stdout)] == [True]


# -- YAML syntax errors ---------------------------------------------------------------------------

BROKEN_YAML = {
    "unclosed quote": (
        'name: q\nwhen: "close > 1\nseverity: info\n\n',
        (3, 15),
        ["quoted string that starts at line 2, column 7", "expected the closing quote"],
    ),
    "unclosed single quote": (
        "name: q\nwhen: 'close > 1",
        (2, 17),
        ["quoted string that starts at line 2, column 7", "expected the closing quote"],
    ),
    "unclosed [ at the end": (
        "name: q\nwhen: close > 1\nsymbols: [X:BTCUSD, X:ETHUSD\n",
        (3, 29),
        ["expected ',' or ']', but got the end of the file", "[ list that starts at line 3"],
    ),
    "unclosed [ before a key": (
        "name: q\nsymbols: [X:BTCUSD\nwhen: close > 1\n",
        (3, 5),
        ["expected ',' or ']', but got ':'", "[ list that starts at line 2, column 10"],
    ),
    "unclosed {": ("name: q\nwhen: {a: 1\n", (2, 12), ["expected ',' or '}'"]),
    "tab indentation": ("name: q\nwhen: close > 1\n\tseverity: info\n", (3, 1), ["a tab"]),
    "mapping value": (
        "name: q\nwhen: a: b\n",
        (2, 8),
        ["mapping values are not allowed here", "quote a value that holds ': '"],
    ),
    "repeated key": ("name: q\nwhen: close > 1\nname: r\n", (3, 1), ["'name' appears twice"]),
    "second document": ("name: q\nwhen: x\n---\nname: r\n", (3, 1), ["another document"]),
}


@pytest.mark.parametrize("case", list(BROKEN_YAML))
def test_yaml_syntax_errors_point_at_a_line_of_the_file(case: str) -> None:
    text, (line, column), words = BROKEN_YAML[case]
    with pytest.raises(FilterError) as err:
        parse_filter(text, "f.yaml")
    first = err.value.problems[0]
    assert (first.line, first.column) == (line, column)
    assert first.line <= len(text.splitlines())
    for w in words:
        assert w in first.message
    where, source, caret = err.value.details[0].split("\n")
    assert where == f"f.yaml:{line}:{column}: {first.message}"
    assert source == "    " + text.splitlines()[line - 1]
    assert caret.strip() == "^" and len(caret) == 4 + column


def test_a_yaml_syntax_error_on_the_command_line(tmp_path: Path, filters_dir: Path) -> None:
    # Before: "quote.yaml:5:1: not valid YAML: found unexpected end of stream", with no source
    # line, in a file of 4 lines.
    (filters_dir / "quote.yaml").write_text('name: q\nwhen: "close > 1\nseverity: info\non: bar\n')
    result = run(tmp_path, "filter", "validate")
    assert_one_sentence_error(result, "1 of 1")
    assert (
        "filters/quote.yaml:4:8: not valid YAML: the file ends while scanning the quoted string "
        "that starts at line 2, column 7; expected the closing quote\n"
        "    on: bar\n"
        "           ^\n"
    ) in result.stderr


# -- the dashboard ------------------------------------------------------------------------------


def test_dashboard_shows_the_latest_console_alerts() -> None:
    console = Console(record=True, width=140, file=open("/dev/null", "w"))  # noqa: SIM115
    alerts = [
        Alert("rsi-low", "X:BTCUSD", "1m", T0 + k * 60_000, "warning", f"dip {k}", {}, ("console",))
        for k in range(12)
    ]
    alerts.append(Alert("quiet", "X:BTCUSD", "1m", T0, "info", "not shown", {}, ("telegram",)))
    dashboard = Dashboard(["X:BTCUSD"], "1m", console)
    dashboard.write(Output(alerts=alerts))
    view = View(T0, ("X:BTCUSD",), ("1m",), 34, FeedState(filters=2, alerts=13))
    console.print(dashboard.render(view))
    text = console.export_text()
    assert "alerts" in text and "dip 11" in text and "rsi-low X:BTCUSD 1m" in text
    assert "dip 3" not in text  # only the latest few
    assert "not shown" not in text  # routed to telegram only
    assert "filters 2  alerts 13" in text
