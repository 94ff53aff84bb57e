"""The demo feed against a raw WebSocket client: protocol, data fidelity, faults and lifecycle."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any

import msgspec
import pytest
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK
from websockets.sync.client import ClientConnection, connect

from polystream import simulator
from polystream.events import Event
from polystream.simulator import DemoFeed

Frame = list[dict[str, Any]]
CONNECTED = {"ev": "status", "status": "connected", "message": "Connected Successfully"}


@pytest.fixture
def make_feed() -> Iterator[Callable[..., DemoFeed]]:
    feeds: list[DemoFeed] = []

    def make(**kwargs: Any) -> DemoFeed:
        kwargs.setdefault("bar_seconds", 0.05)
        feed = DemoFeed(**kwargs).start()
        feeds.append(feed)
        return feed

    yield make
    for feed in feeds:
        feed.stop()


def recv_frame(ws: ClientConnection, timeout: float = 3.0) -> Frame:
    frame = json.loads(ws.recv(timeout=timeout))
    assert isinstance(frame, list)
    return frame


def next_status(ws: ClientConnection, timeout: float = 3.0) -> dict[str, Any]:
    """The next status event, skipping data frames."""
    deadline = time.monotonic() + timeout
    while True:
        for event in recv_frame(ws, max(0.01, deadline - time.monotonic())):
            if event["ev"] == "status":
                return event


@contextlib.contextmanager
def open_client(
    feed: DemoFeed, key: str = "demo-key", topics: str | None = None
) -> Iterator[ClientConnection]:
    """An authenticated client, subscribed to `topics` with every ack read."""
    with connect(feed.url, open_timeout=3, close_timeout=1) as ws:
        assert recv_frame(ws) == [CONNECTED]
        ws.send(json.dumps({"action": "auth", "params": key}))
        assert next_status(ws)["status"] == "auth_success"
        if topics:
            subscribe(ws, topics)
        yield ws


def subscribe(ws: ClientConnection, topics: str, action: str = "subscribe") -> None:
    ws.send(json.dumps({"action": action, "params": topics}))
    verb = "subscribed" if action == "subscribe" else "unsubscribed"
    for topic in topics.split(","):
        assert next_status(ws) == {
            "ev": "status",
            "status": "success",
            "message": f"{verb} to: {topic}",
        }


def collect(
    ws: ClientConnection, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 5.0
) -> tuple[list[Frame], list[dict[str, Any]]]:
    """Read frames until `until(events)` holds; returns the frames and their events in order."""
    frames: list[Frame] = []
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not until(events):
        left = deadline - time.monotonic()
        assert left > 0, f"condition not met after {timeout} s with {len(events)} events"
        frame = recv_frame(ws, left)
        frames.append(frame)
        events.extend(frame)
    return frames, events


def of(events: list[dict[str, Any]], ev: str, pair: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["ev"] == ev and (pair is None or e["pair"] == pair)]


def at_least(n: int, ev: str, pair: str | None = None) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: len(of(events, ev, pair)) >= n


def units(size: float) -> int:
    return round(size * 100_000_000)


# handshake and subscriptions


def test_connected_then_auth_success(make_feed: Callable[..., DemoFeed]) -> None:
    feed = make_feed(api_key="secret")
    with connect(feed.url) as ws:
        assert ws.recv(timeout=2) == json.dumps([CONNECTED], separators=(",", ":"))
        ws.send(json.dumps({"action": "auth", "params": "secret"}))
        assert recv_frame(ws) == [
            {"ev": "status", "status": "auth_success", "message": "authenticated"}
        ]
        assert feed.active_clients == 1
    assert feed.connections == 1 and feed.auth_attempts == 1


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"api_key": "secret"}, "wrong"),
        ({"api_key": "secret", "auth_failed": True}, "secret"),
        ({}, ""),
    ],
)
def test_auth_failed_then_closed(
    make_feed: Callable[..., DemoFeed], options: dict[str, Any], key: str
) -> None:
    feed = make_feed(**options)
    with connect(feed.url) as ws:
        recv_frame(ws)
        ws.send(json.dumps({"action": "auth", "params": key}))
        assert recv_frame(ws) == [
            {"ev": "status", "status": "auth_failed", "message": "authentication failed"}
        ]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=2)
    assert feed.active_clients == 0 and feed.auth_attempts == 1


def test_subscribe_before_auth_is_refused(make_feed: Callable[..., DemoFeed]) -> None:
    feed = make_feed()
    with connect(feed.url) as ws:
        recv_frame(ws)
        ws.send(json.dumps({"action": "subscribe", "params": "XT.BTC-USD"}))
        assert recv_frame(ws)[0]["status"] == "auth_required"
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.3)
    assert feed.subscribe_messages == [["XT.BTC-USD"]]


def test_one_ack_per_topic_and_silence_for_unknown_channels(
    make_feed: Callable[..., DemoFeed],
) -> None:
    feed = make_feed()
    with open_client(feed) as ws:
        ws.send(
            json.dumps(
                {"action": "subscribe", "params": "XT.BTC-USD,FMV.BTC-USD,XQ.BTC-USD,XL2.DOGE-EUR"}
            )
        )
        acks = [recv_frame(ws) for _ in range(3)]
        assert acks == [
            [{"ev": "status", "status": "success", "message": f"subscribed to: {t}"}]
            for t in ("XT.BTC-USD", "XQ.BTC-USD", "XL2.DOGE-EUR")
        ]
        subscribe(ws, "XT.BTC-USD", "unsubscribe")
    assert feed.subscribe_messages == [["XT.BTC-USD", "FMV.BTC-USD", "XQ.BTC-USD", "XL2.DOGE-EUR"]]


def test_bad_json_gets_an_error_and_the_connection_stays(
    make_feed: Callable[..., DemoFeed],
) -> None:
    feed = make_feed()
    with connect(feed.url) as ws:
        recv_frame(ws)
        ws.send("{not json")
        (error,) = recv_frame(ws)
        assert error["ev"] == "status" and error["status"] == "error" and error["message"]
        ws.send(json.dumps({"action": "auth", "params": "k"}))
        assert recv_frame(ws)[0]["status"] == "auth_success"


def test_only_subscribed_topics_arrive(make_feed: Callable[..., DemoFeed]) -> None:
    feed = make_feed()
    with open_client(feed, topics="XT.ETH-USD") as ws:
        frames, events = collect(ws, at_least(150, "XT"))
        assert {(e["ev"], e["pair"]) for e in events} == {("XT", "ETH-USD")}
        sizes = [len(f) for f in frames]
        assert max(sizes) >= 3 and sum(sizes) / len(sizes) >= 2, "several events per frame"

        subscribe(ws, "XQ.*")
        subscribe(ws, "XT.ETH-USD", "unsubscribe")
        _, events = collect(
            ws, lambda ev: {e["pair"] for e in of(ev, "XQ")} >= set(simulator.DEMO_PAIRS)
        )
        assert {e["ev"] for e in events} == {"XQ"}


# data


def test_trade_fields(make_feed: Callable[..., DemoFeed]) -> None:
    feed = make_feed()
    with open_client(feed, topics="XT.BTC-USD,XT.SOL-USD") as ws:
        _, events = collect(
            ws, lambda ev: at_least(30, "XT", "BTC-USD")(ev) and at_least(30, "XT", "SOL-USD")(ev)
        )
    now = time.time() * 1000
    for trade in events:
        assert set(trade) == {"ev", "pair", "p", "s", "t", "c", "i", "x", "r"}
        assert isinstance(trade["i"], str) and trade["i"].isdigit()
        assert trade["c"] in ([1], [2])
        assert isinstance(trade["x"], int) and isinstance(trade["t"], int)
        assert isinstance(trade["p"], float) and isinstance(trade["s"], float)
        assert math.isfinite(trade["p"]) and trade["p"] > 0
        assert math.isfinite(trade["s"]) and trade["s"] > 0
        assert round(trade["s"], 8) == trade["s"] and round(trade["p"], 2) == trade["p"]
        assert now - 5000 < trade["t"] <= now + 1
        assert 0 < trade["r"] - trade["t"] < 100
    for pair in ("BTC-USD", "SOL-USD"):
        ids = [int(t["i"]) for t in of(events, "XT", pair)]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert 100 < of(events, "XT", "SOL-USD")[-1]["p"] < 200
    assert 3000 < of(events, "XT", "BTC-USD")[-1]["p"] < 6000


def test_btc_trades_reproduce_the_csv_bars(make_feed: Callable[..., DemoFeed]) -> None:
    text = (
        resources.files("polystream.data")
        .joinpath("btcusd_1m_2019-03-29.csv")
        .read_text(encoding="utf-8")
    )
    bars = list(csv.DictReader(text.splitlines()))[:4]
    targets = [round(float(b["volume"]) * 100_000_000) for b in bars]
    feed = make_feed(seed=3)
    with open_client(feed, topics="XT.BTC-USD") as ws:
        _, trades = collect(ws, lambda ev: sum(units(t["s"]) for t in ev) >= sum(targets))
    for bar, target in zip(bars, targets, strict=True):
        group: list[dict[str, Any]] = []
        while sum(units(t["s"]) for t in group) < target:
            group.append(trades.pop(0))
        assert sum(units(t["s"]) for t in group) == target
        prices = [t["p"] for t in group]
        for got, want in (
            (prices[0], "open"),
            (prices[-1], "close"),
            (max(prices), "high"),
            (min(prices), "low"),
        ):
            assert got == pytest.approx(float(bar[want]), abs=0.005 + 1e-9), want


def test_quotes_hold_the_last_trade_inside_the_spread(make_feed: Callable[..., DemoFeed]) -> None:
    feed = make_feed()
    with open_client(feed, topics="XT.ETH-USD,XQ.ETH-USD,XT.BTC-USD,XQ.BTC-USD") as ws:
        frames, events = collect(
            ws, lambda ev: at_least(40, "XQ", "ETH-USD")(ev) and at_least(20, "XQ", "BTC-USD")(ev)
        )
    last: dict[str, float] = {}
    for event in events:
        if event["ev"] == "XT":
            last[event["pair"]] = event["p"]
            continue
        assert set(event) == {"ev", "pair", "bp", "bs", "ap", "as", "t", "x", "r"}
        assert 0 < event["bp"] < event["ap"]
        assert event["bs"] > 0 and event["as"] > 0
        assert event["bp"] <= last[event["pair"]] <= event["ap"]
        assert event["ap"] - event["bp"] < 0.001 * event["ap"]
    assert len(of(events, "XQ")) < len(of(events, "XT"))
    assert all(f[-1]["ev"] == "XQ" for f in frames if any(e["ev"] == "XT" for e in f))


def check_aggregate(agg: dict[str, Any], trades: list[dict[str, Any]], width: int) -> None:
    assert agg["e"] - agg["s"] == width and agg["s"] % width == 0
    inside = [t for t in trades if agg["s"] <= t["t"] < agg["e"]]
    assert inside, "an aggregate for a window without trades"
    prices = [t["p"] for t in inside]
    volume = sum(units(t["s"]) for t in inside)
    assert (agg["o"], agg["c"], agg["h"], agg["l"]) == (
        prices[0],
        prices[-1],
        max(prices),
        min(prices),
    )
    assert units(agg["v"]) == volume
    vwap = sum(t["p"] * units(t["s"]) for t in inside) / volume
    assert agg["vw"] == pytest.approx(vwap, abs=1e-3)
    assert agg["z"] == pytest.approx(volume / len(inside) / 1e8, abs=1e-8)


def test_aggregates_are_the_feeds_own_trades(
    make_feed: Callable[..., DemoFeed], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(simulator, "_MINUTE_MS", 2000)
    feed = make_feed(events_per_second=4)
    with open_client(feed, topics="XT.SOL-USD,XAS.SOL-USD,XA.SOL-USD") as ws:
        _, events = collect(
            ws, lambda ev: at_least(2, "XA")(ev) and at_least(3, "XAS")(ev), timeout=6
        )
    trades = of(events, "XT")
    seconds, minutes = of(events, "XAS"), of(events, "XA")
    for agg in seconds:
        check_aggregate(agg, trades, 1000)
    for agg in minutes:
        check_aggregate(agg, trades, 2000)
    # No window with trades is skipped, and none without trades is sent.
    last = seconds[-1]["s"]
    assert [a["s"] for a in seconds] == sorted(
        {t["t"] // 1000 * 1000 for t in trades if t["t"] < last + 1000}
    )
    for agg in minutes:
        parts = [a for a in seconds if agg["s"] <= a["s"] < agg["e"]]
        assert sum(units(a["v"]) for a in parts) == units(agg["v"])


def test_book_snapshots(make_feed: Callable[..., DemoFeed]) -> None:
    feed = make_feed()
    with open_client(feed, topics="XQ.ETH-USD,XL2.ETH-USD") as ws:
        _, events = collect(ws, at_least(2, "XL2"), timeout=4)
    books = of(events, "XL2")
    assert books[1]["t"] - books[0]["t"] >= 900
    for book in books:
        bids, asks = book["b"], book["a"]
        assert len(bids) == len(asks) == 20
        assert [p for p, _ in bids] == sorted({p for p, _ in bids}, reverse=True)
        assert [p for p, _ in asks] == sorted({p for p, _ in asks})
        assert bids[0][0] < asks[0][0]
        assert all(s > 0 and math.isfinite(s) for _, s in bids + asks)
        quote = [e for e in events[: events.index(book)] if e["ev"] == "XQ"][-1]
        assert (bids[0][0], asks[0][0]) == (quote["bp"], quote["ap"])


def trade_path(feed: DemoFeed, pair: str, n: int) -> list[tuple[float, float, list[int], str]]:
    with open_client(feed, topics=f"XT.{pair}") as ws:
        _, trades = collect(ws, at_least(n, "XT"))
    return [(t["p"], t["s"], t["c"], t["i"]) for t in trades[:n]]


def test_same_seed_same_market(make_feed: Callable[..., DemoFeed]) -> None:
    a, b, c = make_feed(seed=11), make_feed(seed=11), make_feed(seed=12)
    for pair in ("ETH-USD", "BTC-USD"):
        first = trade_path(a, pair, 80)
        assert trade_path(b, pair, 80) == first
        assert trade_path(c, pair, 80) != first
        assert len({p for p, *_ in first}) > 5


def test_a_reconnecting_client_sees_the_market_continue(make_feed: Callable[..., DemoFeed]) -> None:
    feed = make_feed(seed=5)
    before = trade_path(feed, "ETH-USD", 20)
    time.sleep(0.2)
    after = trade_path(feed, "ETH-USD", 20)
    assert int(after[0][3]) > int(before[-1][3]) + 10
    assert feed.connections == 2


# faults


def test_drop_connections_sends_no_close_frame(make_feed: Callable[..., DemoFeed]) -> None:
    feed = make_feed()
    with open_client(feed, topics="XT.BTC-USD") as ws:
        collect(ws, at_least(3, "XT"))
        feed.drop_connections()
        with pytest.raises(ConnectionClosedError) as caught:
            while True:
                ws.recv(timeout=2)
        assert caught.value.rcvd is None
    deadline = time.monotonic() + 2
    while feed.active_clients and time.monotonic() < deadline:
        time.sleep(0.02)
    assert feed.active_clients == 0
    with open_client(feed, topics="XT.BTC-USD") as ws:
        collect(ws, at_least(3, "XT"))
    assert feed.connections == 2


@pytest.mark.parametrize("code", [None, 1000, 4000])
def test_close_connections_with_a_code(
    make_feed: Callable[..., DemoFeed], code: int | None
) -> None:
    feed = make_feed()
    with open_client(feed, topics="XT.BTC-USD") as ws:
        collect(ws, at_least(3, "XT"))
        if code is None:
            feed.close_connections()
        else:
            feed.close_connections(code)
        expected = ConnectionClosedError if code == 4000 else ConnectionClosedOK
        with pytest.raises(expected) as caught:
            while True:
                ws.recv(timeout=2)
        assert caught.value.rcvd is not None
        assert caught.value.rcvd.code == (code or 1001)


@pytest.mark.parametrize("close", [False, True])
def test_send_status(make_feed: Callable[..., DemoFeed], close: bool) -> None:
    feed = make_feed()
    with open_client(feed, topics="XT.BTC-USD") as ws:
        feed.send_status("max_connections", "Maximum number of connections exceeded.", close=close)
        assert next_status(ws) == {
            "ev": "status",
            "status": "max_connections",
            "message": "Maximum number of connections exceeded.",
        }
        if close:
            with pytest.raises(ConnectionClosed) as caught:
                while True:
                    ws.recv(timeout=2)
            assert caught.value.rcvd is not None
        else:
            collect(ws, at_least(3, "XT"))


def test_stall_sends_nothing_but_answers_pings(make_feed: Callable[..., DemoFeed]) -> None:
    feed = make_feed()
    with open_client(feed, topics="XT.ETH-USD") as ws:
        collect(ws, at_least(3, "XT"))
        feed.stall(1.0)
        stalled = time.monotonic()
        with pytest.raises(TimeoutError):
            while True:  # frames already on the wire when the stall began
                ws.recv(timeout=0.15)
        with pytest.raises(TimeoutError):
            ws.recv(timeout=max(0.0, stalled + 0.85 - time.monotonic()))
        assert ws.ping().wait(0.5)
        _, events = collect(ws, at_least(3, "XT"), timeout=2)
        assert time.monotonic() - stalled >= 0.95
        assert events[0]["t"] >= (time.time() - (time.monotonic() - stalled) + 0.9) * 1000


def test_send_raw_reaches_authenticated_clients(make_feed: Callable[..., DemoFeed]) -> None:
    feed = make_feed()
    text = '[{"ev":"XT","pair":"BTC-USD","p":"oops"}'
    with open_client(feed, topics="XT.BTC-USD") as ws, connect(feed.url) as stranger:
        assert recv_frame(stranger) == [CONNECTED]
        feed.send_raw(text)
        deadline = time.monotonic() + 2
        while ws.recv(timeout=max(0.01, deadline - time.monotonic())) != text:
            pass
        with pytest.raises(TimeoutError):
            stranger.recv(timeout=0.3)


def test_malformed_every_nth_frame(make_feed: Callable[..., DemoFeed]) -> None:
    feed = make_feed(malformed_every=3)
    with open_client(feed, topics="XT.ETH-USD,XQ.ETH-USD") as ws:
        texts = [str(ws.recv(timeout=2)) for _ in range(12)]
    for number, text in enumerate(texts, 1):
        if number % 3:
            for element in json.loads(text):
                msgspec.convert(element, Event)
        elif number % 6:
            with pytest.raises(json.JSONDecodeError):
                json.loads(text)
        else:
            elements = json.loads(text)
            bad = 0
            for element in elements:
                try:
                    msgspec.convert(element, Event)
                except msgspec.ValidationError:
                    bad += 1
            assert bad == 1 and len(elements) >= 2


# lifecycle


def wait_for_threads(baseline: set[threading.Thread], timeout: float = 2.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while True:
        extra = {t.name for t in threading.enumerate() if t not in baseline and t.is_alive()}
        if not extra or time.monotonic() > deadline:
            return extra


def test_stop_is_quick_even_with_clients_that_do_not_read() -> None:
    baseline = set(threading.enumerate())
    feed = DemoFeed(bar_seconds=0.05).start()
    with contextlib.ExitStack() as stack:
        for _ in range(3):
            stack.enter_context(open_client(feed, topics="XT.*,XQ.*,XL2.*"))
        time.sleep(0.6)
        started = time.monotonic()
        feed.stop()
        assert time.monotonic() - started < 1.0
        feed.stop()
    assert wait_for_threads(baseline) == set()


def test_many_start_stop_cycles() -> None:
    baseline = set(threading.enumerate())
    started = time.monotonic()
    for seed in range(8):
        with (
            DemoFeed(seed=seed, bar_seconds=0.05) as feed,
            open_client(feed, topics="XT.BTC-USD") as ws,
        ):
            collect(ws, at_least(1, "XT"))
    assert time.monotonic() - started < 8
    assert wait_for_threads(baseline) == set()


def test_url_needs_a_started_feed() -> None:
    feed = DemoFeed()
    with pytest.raises(RuntimeError):
        _ = feed.url
    with feed:
        assert feed.url.startswith("ws://127.0.0.1:")
        with pytest.raises(RuntimeError):
            feed.start()
    with pytest.raises(ValueError):
        DemoFeed(bar_seconds=0)


def test_a_stopped_feed_can_start_again(make_feed: Callable[..., DemoFeed]) -> None:
    feed = make_feed()
    with open_client(feed, topics="XT.ETH-USD") as ws:
        _, before = collect(ws, at_least(3, "XT"))
    feed.stop()
    feed.start()
    with open_client(feed, topics="XT.ETH-USD") as ws:
        _, after = collect(ws, at_least(3, "XT"))
    assert int(after[0]["i"]) > int(before[-1]["i"])


def test_abrupt_clients_leave_no_traceback_and_no_key_in_logs(
    make_feed: Callable[..., DemoFeed],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    key = "pk_SECRET_KEY_42"
    with caplog.at_level(logging.DEBUG):
        feed = make_feed(api_key=key)
        with socket.create_connection(("127.0.0.1", int(feed.url.rsplit(":", 1)[1]))) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\n")
        with open_client(feed, key=key, topics="XT.*,XQ.*") as ws:
            collect(ws, at_least(3, "XT"))
            ws.socket.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 2
        while feed.active_clients and time.monotonic() < deadline:
            time.sleep(0.02)
        feed.stop()
    server_side = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    assert server_side == [] or all(
        key not in r.getMessage() and not r.exc_info for r in server_side
    )
    assert "Traceback" not in capfd.readouterr().err
