"""The read-only viewer (`watch --from nats://… [SYMBOL…]` without `--shard`) on a real NATS
JetStream server: result records published on the results stream come out as the shards'
`--json` printed them, filtered by symbol, as alert lines with `--no-ui`, and on the
dashboard; it waits for a stream that does not exist yet, and an unreachable server is one
sentence."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import polars as pl
import pytest
from nats_server import NatsServer
from postgres import free_port
from rich.console import Console

from polystream import wire
from polystream.bus import Bus
from polystream.display import JsonRecord, ResultsDashboard, alert_text, json_records
from polystream.features import BookFeatures
from polystream.schema import BAR, Alert, Notice
from polystream.sinks import FeedState, Output, View
from polystream.viewer import read_records

T0 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
INDICATORS = ("rsi_14", "macd_hist", "cci_20", "flow_imbalance")


def bars(symbol: str, timeframe: str, step: int, closes: list[float]) -> pl.DataFrame:
    """Final bar records of one series; the indicators are null on the first bar, as while
    they warm up."""
    rows = [
        {
            "symbol": symbol,
            "timeframe": timeframe,
            "start": T0 + k * step,
            "end": T0 + (k + 1) * step,
            "open": c - 0.5,
            "high": c + 1.0,
            "low": c - 1.0,
            "close": c,
            "volume": 0.83548859,
            "vwap": c,
            "trades": 12,
            "buy_volume": 0.5,
            "sell_volume": 0.33548859,
            "state": "final",
            **{name: None if k == 0 else 27.25 + k for name in INDICATORS},
        }
        for k, c in enumerate(closes)
    ]
    return pl.DataFrame(rows, schema={**BAR, **dict.fromkeys(INDICATORS, pl.Float64)})


def run_output() -> Output:
    """What two symbols' shards publish: bars of two timeframes, an alert each, a book, a
    status record."""
    frames = [
        bars(s, tf, step, [4108.1 + k for k in range(3)])
        for s in ("X:BTCUSD", "X:ETHUSD")
        for tf, step in (("1m", 60_000), ("5m", 300_000))
    ]
    alerts = [
        Alert("rsi-oversold", s, "1m", T0, "warning", f"{s} RSI 27.3", {"rsi_14": 27.3})
        for s in ("X:BTCUSD", "X:ETHUSD")
    ]
    book = BookFeatures("X:BTCUSD", T0, 4108.2, 3.5, 1.5, 0.4, [4100.0], [2.0], [4120.0], [1.0])
    return Output(
        bars=pl.concat(frames),
        alerts=alerts,
        book_features=[book],
        notices=[Notice("connected", T0, "shard 0/1 of nats://127.0.0.1")],
    )


def subject(record: JsonRecord) -> str:
    """Where a shard publishes the record (see `shard.ResultSink`)."""
    fields = msgspec.json.decode(record.data)
    if record.type == "bar":
        return f"polystream.bar.{fields['timeframe']}.{record.symbol}"
    if record.type == "alert":
        return f"polystream.alert.{fields['filter']}.{record.symbol}"
    if record.type == "book":
        return f"polystream.book.{record.symbol}"
    return "polystream.status.shard-0"


RECORDS = json_records(run_output(), msgspec.json.encode)  # as `watch --json` prints them


def publish(url: str) -> None:
    with Bus(url) as bus:
        bus.ensure_stream(wire.OUT_STREAM, wire.OUT_SUBJECTS)
        for record in RECORDS:
            bus.publish(subject(record), record.data)


@pytest.fixture
def server(nats_server: Callable[[], NatsServer]) -> Iterator[NatsServer]:
    """A server of the test's own: the results stream has a fixed name."""
    yield nats_server()


def polystream(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYGON_", "DATABASE"))}
    return subprocess.Popen(
        [sys.executable, "-m", "polystream", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**env, "POLYSTREAM_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "120"},
    )


def lines(records: list[JsonRecord]) -> list[str]:
    return [r.data.decode() for r in records]


def test_json_prints_every_record_as_published_and_lines_show_the_alerts(
    server: NatsServer, tmp_path: Path
) -> None:
    publish(server.url)
    proc = polystream(
        tmp_path, "watch", "--from", server.url, "--json", "--no-ui", "--duration", "3"
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert sorted(out.splitlines()) == sorted(lines(RECORDS))
    for kind in ("status", "book", "bar", "alert"):  # each subject's records in order
        shown = [line for line in out.splitlines() if f'"type":"{kind}"' in line]
        assert shown == lines([r for r in RECORDS if r.type == kind])
    run = run_output()
    for alert in run.alerts:
        assert alert_text(alert) in err
    assert "2 alerts" in err.splitlines()[-1]


def test_symbols_select_their_records_and_every_status(server: NatsServer, tmp_path: Path) -> None:
    publish(server.url)
    proc = polystream(
        tmp_path, "watch", "--from", server.url, "btc-usd", "--json", "--no-ui", "--duration", "3"
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    wanted = [r for r in RECORDS if r.symbol in ("X:BTCUSD", "")]
    assert sorted(out.splitlines()) == sorted(lines(wanted))
    assert "X:ETHUSD" not in out


def test_waits_for_the_stream_then_shows_it_until_a_stop_signal(
    server: NatsServer, tmp_path: Path
) -> None:
    proc = polystream(tmp_path, "watch", "--from", server.url, "--json", "--no-ui")
    guard = threading.Timer(60, proc.kill)  # a viewer that never prints fails, not hangs
    guard.start()
    try:
        assert proc.stderr is not None and proc.stdout is not None
        assert proc.stderr.readline().strip() == f"waiting for shards to publish on {server.url}"
        publish(server.url)
        shown = [proc.stdout.readline().strip() for _ in RECORDS]
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.stdout.read(), proc.stderr.read()
        proc.wait(30)
    finally:
        guard.cancel()
        proc.kill()
    assert sorted(shown) == sorted(lines(RECORDS))
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert rest == ""
    assert "waiting for shards" not in err  # said once


def test_an_unreachable_server_is_one_sentence(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    proc = polystream(tmp_path, "watch", "--from", url, "--json", "--duration", "3")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert out == ""
    assert err.splitlines() == [f"polystream: error: NATS at {url} cannot be reached: "
                                "connection refused."]  # fmt: skip


def test_records_become_the_outputs_a_watch_shows() -> None:
    bad = [b"{", b'{"type":"bar","symbol":"X:BTCUSD"}', b'{"type":"trade"}']
    read = read_records([r.data for r in RECORDS] + bad)
    assert read.rejected == len(bad)
    assert read.valid == [r.data for r in RECORDS]
    run = run_output()
    assert read.output.bars is not None and run.bars is not None
    assert read.output.bars.equals(run.bars)
    assert read.output.bars.schema == run.bars.schema
    assert [a.message for a in read.output.alerts] == [a.message for a in run.alerts]
    assert all(a.notify == ("console",) for a in read.output.alerts)
    assert list(read.output.book_features) == list(run.book_features)
    assert list(read.output.notices) == list(run.notices)


def test_the_dashboard_learns_the_symbols_and_timeframes_from_the_records() -> None:
    console = Console(record=True, width=120, height=40)
    dashboard = ResultsDashboard((), console, utc=True)
    dashboard.write(read_records([r.data for r in RECORDS]).output)
    feed = FeedState(state="streaming", bars=12, alerts=2)
    view = View(T0 + 600_000, ("X:BTCUSD", "X:ETHUSD"), ("1m", "5m"), 34, feed)
    console.print(dashboard.render(view))
    screen = console.export_text()
    assert "X:BTCUSD" in screen and "X:ETHUSD" in screen
    assert "1m bars (UTC)" in screen and "5m bars (UTC)" in screen
    assert "X:BTCUSD RSI 27.3" in screen and "rsi-oversold" in screen
    assert "streaming" in screen
