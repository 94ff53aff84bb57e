"""`watch --serve`: real `polystream` processes serving a replay on loopback, read by real
WebSocket clients the way code written for the feed reads it."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from polystream import __version__
from polystream.errors import UsageError
from polystream.serve import TOKEN_VAR, TopicError, parse_address, parse_topic
from test_cli import env, records, run

T0 = 1_700_000_000_000
# An empty frame this long (event time) before the data: with --speed 10 the clients have two
# seconds to connect and subscribe before the first record is made.
LEAD_MS = 20_000
PAIRS = ("BTC-USD", "ETH-USD")
FILTERS = {
    "every-bar.yaml": """\
name: every-bar
description: fires on every final 1s bar
on: bar
timeframe: 1s
when: close > 0
trigger: level
message: "{symbol} closed at {close}"
""",
    "every-trade.yaml": """\
name: every-trade
description: fires on every trade
on: trade
when: price > 0
trigger: level
message: "{symbol} traded at {price}"
""",
}

Record = dict[str, Any]
SERVE = ("--serve", "127.0.0.1:0")
START = ("connected", "serving")  # status records a run makes as it starts


def write_recording(path: Path, seconds: int, per_second: int = 10) -> None:
    """A frame of one trade per pair `per_second` times a second of event time, a book snapshot
    of BTC-USD every second, after an empty frame `LEAD_MS` earlier."""
    lines = [f"{T0 - LEAD_MS}\t[]\n"]
    step = 1000 // per_second
    for k in range(seconds * per_second):
        t = T0 + k * step
        frame: list[dict[str, object]] = [
            {
                "ev": "XT",
                "pair": pair,
                "p": (30_000 if j == 0 else 2_000) + (k * (j + 3)) % 17,
                "t": t,
                "s": 0.5,
                "c": [2 if k % 3 else 1],
                "i": f"{j}-{k}",
                "x": 1,
                "r": t + 5,
            }
            for j, pair in enumerate(PAIRS)
        ]
        if k % per_second == 0:
            bids = [[29_990 - i, 1.0 + i] for i in range(5)]
            asks = [[30_010 + i, 2.0] for i in range(5)]
            frame.append({"ev": "XL2", "pair": PAIRS[0], "t": t, "x": 1, "b": bids, "a": asks})
        lines.append(f"{t + 5}\t{json.dumps(frame)}\n")
    path.write_text("".join(lines))


@pytest.fixture
def filters(tmp_path: Path) -> Path:
    path = tmp_path / "filters"
    path.mkdir()
    for name, text in FILTERS.items():
        (path / name).write_text(text)
    return path


class Served:
    """A `polystream … --json --no-ui --serve 127.0.0.1:0` process: its stdout records, its
    stderr, and the URL it serves on (from its `serving` status record)."""

    def __init__(self, tmp_path: Path, *args: str, **extra: str) -> None:
        environment = env(tmp_path, **extra)
        if TOKEN_VAR not in extra:
            environment.pop(TOKEN_VAR, None)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "polystream", *args, "--json", "--no-ui", *SERVE],
            cwd=tmp_path,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: queue.Queue[str | None] = queue.Queue()
        self.lines: list[str] = []
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._lines, args=(self.proc.stdout,)),
            threading.Thread(target=self.stderr.extend, args=(self.proc.stderr,)),
        ]
        for thread in self._threads:
            thread.start()
        self.url = self._serving()

    def _lines(self, stream: Any) -> None:
        for line in stream:
            self.stdout.put(line)
        self.stdout.put(None)

    def _serving(self) -> str:
        while (line := self.stdout.get(timeout=30)) is not None:
            self.lines.append(line)
            record = json.loads(line)
            if record.get("event") == "serving":
                detail = str(record["detail"])
                assert detail.startswith("records on ws://127.0.0.1:"), detail
                return detail.split()[-1]
        raise AssertionError(f"no serving record; stderr: {''.join(self.stderr)}")

    def finish(self, timeout: float = 60) -> list[Record]:
        """Wait for the process to end; its stdout records. `self.wall`: its run time."""
        assert self.proc.wait(timeout) == 0, "".join(self.stderr)
        self.wall = time.monotonic() - self.started
        for thread in self._threads:
            thread.join(10)
        while (line := self.stdout.get(timeout=10)) is not None:
            self.lines.append(line)
        return records("".join(self.lines))


@pytest.fixture
def served() -> Iterator[list[Served]]:
    """Processes started by a test; killed if the test leaves them running."""
    started: list[Served] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


def serve(started: list[Served], tmp_path: Path, *args: str, **extra: str) -> Served:
    s = Served(tmp_path, *args, **extra)
    started.append(s)
    return s


class Reader:
    """A client that reads in a thread from the start: every array it gets, and how the server
    closed the connection."""

    def __init__(self, url: str, *requests: dict[str, str]) -> None:
        self.greeting: list[Record] = []
        self.arrays: list[list[Record]] = []
        self.closed: tuple[int, str] | None = None
        self._sent = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, requests))
        self._thread.start()
        assert self._sent.wait(15), "the client could not connect"

    def _read(self, url: str, requests: tuple[dict[str, str], ...]) -> None:
        with connect(url, open_timeout=10) as ws:
            self.greeting = json.loads(ws.recv(timeout=10))
            for request in requests:
                ws.send(json.dumps(request))
            self._sent.set()
            try:
                while True:
                    self.arrays.append(json.loads(ws.recv()))
            except ConnectionClosed as exc:
                self.closed = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")

    def join(self) -> None:
        self._thread.join(30)
        assert self.closed is not None, "the server did not close the connection"

    @property
    def replies(self) -> list[Record]:
        """The server's answers to requests: status records without a time."""
        return [r for a in self.arrays for r in a if r["type"] == "status" and "time" not in r]

    @property
    def records(self) -> list[Record]:
        """The run's records, as `--json` prints them."""
        return [
            r for a in self.arrays for r in a if not (r["type"] == "status" and "time" not in r)
        ]


def subscribe(topics: str) -> dict[str, str]:
    return {"action": "subscribe", "params": topics}


def recv(ws: ClientConnection) -> list[Record]:
    array = json.loads(ws.recv(timeout=10))
    assert isinstance(array, list)
    return array


def status(event: str, detail: str | None = None) -> Record:
    return {"type": "status", "event": event, **({} if detail is None else {"detail": detail})}


def of(rs: list[Record], kind: str, symbol: str | None = None) -> list[Record]:
    return [r for r in rs if r["type"] == kind and (symbol is None or r.get("symbol") == symbol)]


def watch_args(recording: Path, filters: Path, speed: str | None) -> list[str]:
    """`watch` of both pairs' 1s bars and books over `recording`, at `speed` x real time."""
    args = ["watch", "X:BTCUSD", "X:ETHUSD", "--feed", str(recording), "-t", "1s"]
    args += ["--channels", "XT,XL2", "--filters", str(filters)]
    return args + (["--speed", speed] if speed else [])


# -- the records --------------------------------------------------------------------------------


def test_each_client_gets_exactly_the_json_records_of_its_topics(
    tmp_path: Path, filters: Path, served: list[Served]
) -> None:
    recording = tmp_path / "two.rec"
    write_recording(recording, seconds=30)
    s = serve(served, tmp_path, *watch_args(recording, filters, "10"))
    bars = Reader(s.url, subscribe("bar.BTC-USD,book.btcusd"))
    alerts = Reader(s.url, subscribe("alert.*, status.*"))
    stdout = s.finish()
    bars.join()
    alerts.join()

    connected = [status("connected", f"polystream {__version__}")]
    assert bars.greeting == alerts.greeting == connected
    assert bars.replies == [
        status("subscribed", "bar.X:BTCUSD"),
        status("subscribed", "book.X:BTCUSD"),
    ]
    assert alerts.replies == [status("subscribed", "alert.*"), status("subscribed", "status.*")]
    # the same records as stdout, in the same order: every one after the clients subscribed
    assert len(of(stdout, "bar", "X:BTCUSD")) == 30 and len(of(stdout, "book")) >= 25
    assert bars.records == [
        r for r in stdout if r["type"] in ("bar", "book") and r["symbol"] == "X:BTCUSD"
    ]

    # the status records made as the run starts may come before a client could subscribe
    def late(rs: list[Record]) -> list[Record]:
        return [r for r in rs if r["type"] == "alert" or r.get("event") not in (None, *START)]

    assert len(late(stdout)) == 2 * 300 + 2 * 30 and late(alerts.records) == late(stdout)
    assert bars.closed == alerts.closed == (1001, "polystream stopped")
    assert any("serving records on ws://127.0.0.1:" in line for line in s.stderr)

    # and those of a plain --json run of the recording, without --serve or --speed
    plain = records(
        run(tmp_path, *watch_args(recording, filters, None), "--json", "--no-ui").stdout
    )
    assert of(plain, "bar", "X:BTCUSD") == of(bars.records, "bar")  # to the last bit
    assert sorted(map(json.dumps, of(plain, "alert"))) == sorted(
        map(json.dumps, of(alerts.records, "alert"))
    )


def test_requests_are_answered_and_unsubscribe_stops_delivery(
    tmp_path: Path, filters: Path, served: list[Served]
) -> None:
    recording = tmp_path / "two.rec"
    write_recording(recording, seconds=30)
    s = serve(served, tmp_path, *watch_args(recording, filters, "10"))
    with connect(s.url, open_timeout=10) as ws:
        assert recv(ws)[0]["event"] == "connected"
        for request in ("not json", '["subscribe"]', '{"action":"dance"}'):
            ws.send(request)
            [reply] = recv(ws)
            assert reply["event"] == "error" and reply["detail"].endswith("."), reply
        ws.send(json.dumps(subscribe("bar.X:NOPE,trade.*,bar.ETH-USD")))
        replies = recv(ws) + recv(ws) + recv(ws)
        assert [r["event"] for r in replies] == ["error", "error", "subscribed"]
        assert "'bar.X:NOPE'" in replies[0]["detail"] and "'trade.*'" in replies[1]["detail"]
        assert replies[2]["detail"] == "bar.X:ETHUSD"
        while not of(got := recv(ws), "bar"):
            pass
        assert of(got, "bar", "X:ETHUSD") == of(got, "bar")
        ws.send(json.dumps({"action": "unsubscribe", "params": "bar.ETH-USD"}))
        after: list[Record] = []
        while status("unsubscribed", "bar.X:ETHUSD") not in after:
            after += recv(ws)
        after = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                after += recv(ws)
        assert after == [] and closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    stdout = s.finish()
    assert len(of(stdout, "bar", "X:ETHUSD")) == 30


def test_with_a_token_a_client_must_authenticate_first(
    tmp_path: Path, served: list[Served]
) -> None:
    token = "s3rve-T0KEN-0123456789"
    s = serve(served, tmp_path, "demo", "-t", "1s", "--duration", "6", **{TOKEN_VAR: token})
    with connect(s.url, open_timeout=10) as stranger:
        recv(stranger)
        stranger.send(json.dumps(subscribe("bar.*")))
        [refused] = recv(stranger)
        assert refused["event"] == "error" and "auth" in refused["detail"]
        stranger.send(json.dumps({"action": "auth", "params": token[:-1] + "X"}))
        assert recv(stranger) == [status("auth_failed")]
        with pytest.raises(ConnectionClosed) as closed:
            recv(stranger)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    with connect(s.url, open_timeout=10) as friend:
        recv(friend)
        friend.send(json.dumps({"action": "auth", "params": token}))
        assert recv(friend) == [status("auth_success")]
        friend.send(json.dumps(subscribe("bar.BTC-USD")))
        assert recv(friend) == [status("subscribed", "bar.X:BTCUSD")]
        bars = recv(friend)
        assert bars and of(bars, "bar", "X:BTCUSD") == bars
    s.finish()
    assert token not in "".join(s.lines) + "".join(s.stderr)


# -- a client that does not keep up ---------------------------------------------------------------


@contextlib.contextmanager
def stalled(url: str) -> Iterator[ClientConnection]:
    """A client that takes everything and then reads nothing: a small receive buffer makes it
    stall at once instead of after the few megabytes the kernel would otherwise take in."""
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname, parts.port))
    with connect(url, sock=sock, open_timeout=10) as ws:
        recv(ws)
        ws.send(json.dumps(subscribe("bar.*,book.*,alert.*,status.*")))
        yield ws


def test_a_client_that_stops_reading_is_closed_and_holds_nobody_up(
    tmp_path: Path, filters: Path, served: list[Served]
) -> None:
    recording = tmp_path / "busy.rec"
    write_recording(recording, seconds=450, per_second=20)
    # long alerts: megabytes a second for the clients, at little cost to the pipeline
    loud = FILTERS["every-trade.yaml"].replace("{price}", "{price}" + " and so on" * 100)
    (filters / "every-trade.yaml").write_text(loud)
    args = watch_args(recording, filters, "75")

    alone = serve(served, tmp_path, *args)
    reader = Reader(alone.url, subscribe("alert.*,status.*"))
    alone.finish()
    reader.join()

    s = serve(served, tmp_path, *args)
    other = Reader(s.url, subscribe("alert.*,status.*"))
    with stalled(s.url) as slow:
        deadline = time.monotonic() + 30
        while not any(r["event"] == "slow_client" for r in of(other.records, "status")):
            assert time.monotonic() < deadline and s.proc.poll() is None, "it was not closed"
            time.sleep(0.05)
        with pytest.raises(ConnectionClosed) as closed:  # reading on, it finds why it was closed
            while True:
                slow.recv(timeout=10)
    stdout = s.finish()
    other.join()

    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert re.fullmatch(r"too slow: [\d,]+ messages behind", closed.value.rcvd.reason)
    assert of(other.records, "alert") == of(stdout, "alert")  # every record for the other one
    assert len(of(stdout, "alert")) == 2 * 9_000 + 2 * 450
    assert s.wall < 2 * alone.wall + 1, (s.wall, alone.wall)
    assert "ws too slow 1" in "".join(s.stderr)


# -- the address ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("8765", ("127.0.0.1", 8765)),
        ("0", ("127.0.0.1", 0)),
        ("127.0.0.1:8765", ("127.0.0.1", 8765)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:8765", ("::1", 8765)),
    ],
)
def test_an_address_is_a_port_with_an_optional_host(text: str, address: tuple[str, int]) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["", "http", "70000", "-1", "::1:8765", "[::1", "host:", ":80"])
def test_a_bad_address_is_bad_usage(text: str) -> None:
    with pytest.raises(UsageError, match="--serve"):
        parse_address(text)


def test_topics_name_a_record_type_and_a_symbol_or_star() -> None:
    assert parse_topic("bar.BTC-USD") == ("bar", "X:BTCUSD")
    assert parse_topic(" alert.* ") == ("alert", "*")
    for bad in ("bar", "bar.", "trade.X:BTCUSD", "bar.FOO"):
        with pytest.raises(TopicError, match=r"^Invalid topic .*\.$"):
            parse_topic(bad)


@pytest.mark.parametrize("value", ["port", "99999", "::1:80"])
def test_a_bad_serve_value_exits_2_in_one_sentence(tmp_path: Path, value: str) -> None:
    result = run(tmp_path, "watch", "X:BTCUSD", "--feed", "demo", "--serve", value)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("polystream: error: Invalid --serve"), lines


def test_a_port_in_use_is_one_sentence(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run(tmp_path, "watch", "X:BTCUSD", "--feed", "demo", "--serve", str(port))
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"ws://127.0.0.1:{port}" in lines[0], lines
