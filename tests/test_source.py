"""The feed client against the loopback demo feed: handshake, reconnects, statuses, gaps."""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable

import pytest

from conftest import API_KEY, collect
from polystream.decode import Decoder
from polystream.errors import AuthFailed
from polystream.events import Trade
from polystream.simulator import DemoFeed
from polystream.source import EndOfStream, FeedClient, Frame, Item, Notice, chunk_topics

MakeClient = Callable[..., FeedClient]


def notices(items: list[Item], event: str | None = None) -> list[Notice]:
    return [i for i in items if isinstance(i, Notice) and (event is None or i.event == event)]


def trades(items: list[Item]) -> list[Trade]:
    d = Decoder()
    return [
        e for i in items if isinstance(i, Frame) for e in d.decode(i.data) if isinstance(e, Trade)
    ]


def count(event: str, n: int = 1) -> Callable[[list[Item]], bool]:
    return lambda items: len(notices(items, event)) >= n


def test_handshake_and_stream(demo_feed: DemoFeed, make_client: MakeClient) -> None:
    client = make_client(demo_feed.url, ["BTC-USD", "ETH-USD"])
    items = collect(client, lambda it: len(trades(it)) >= 20)
    events = [n.event for n in notices(items)]
    assert events[:3] == ["connected", "authenticated", "subscribed"]
    assert client.state == "streaming"
    assert {t.pair for t in trades(items)} == {"BTC-USD", "ETH-USD"}
    deadline = time.monotonic() + 5
    while len(client.acked_topics) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.acked_topics == {"XT.BTC-USD", "XQ.BTC-USD", "XT.ETH-USD", "XQ.ETH-USD"}
    assert demo_feed.subscribe_messages == [
        ["XT.BTC-USD", "XQ.BTC-USD", "XT.ETH-USD", "XQ.ETH-USD"]
    ]


def test_topics_are_sent_in_chunks(demo_feed: DemoFeed, make_client: MakeClient) -> None:
    assert chunk_topics(["a", "b", "c"], 2) == ["a,b", "c"]
    client = make_client(demo_feed.url, ["BTC-USD", "ETH-USD", "SOL-USD"], topics_per_message=2)
    collect(client, lambda it: len(trades(it)) >= 5)
    sent = demo_feed.subscribe_messages
    assert [len(m) for m in sent] == [2, 2, 2]
    assert sorted(t for m in sent for t in m) == sorted(client.topics)


@pytest.mark.parametrize("how", ["drop", "close-1000", "close-1001"])
def test_any_close_reconnects_and_resubscribes(
    demo_feed: DemoFeed, make_client: MakeClient, how: str
) -> None:
    client = make_client(demo_feed.url, ["BTC-USD"])
    collect(client, lambda it: len(trades(it)) >= 5)
    if how == "drop":
        demo_feed.drop_connections()
    else:
        demo_feed.close_connections(int(how.split("-")[1]))
    items = collect(client, lambda it: count("subscribed")(it) and len(trades(it)) >= 5)
    kinds = [n.event for n in notices(items)]
    assert kinds.index("disconnected") < kinds.index("reconnecting") < kinds.index("connected")
    assert demo_feed.connections == 2
    assert demo_feed.subscribe_messages == [["XT.BTC-USD", "XQ.BTC-USD"]] * 2
    assert client.reconnects == 1
    gap_notes = notices(items, "gap")
    assert len(gap_notes) == 1
    (gap,) = client.gaps
    assert gap.symbol == "X:BTCUSD" and gap.start < gap.end


def test_backoff_grows_capped_with_jitter(make_client: MakeClient) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = make_client(f"ws://127.0.0.1:{port}", backoff_initial=0.02, backoff_max=0.16)
    items = collect(client, count("reconnecting", 6))
    delays = [
        float(re.search(r"in ([\d.]+) s", n.detail).group(1))  # type: ignore[union-attr]
        for n in notices(items, "reconnecting")
    ]
    for attempt, delay in enumerate(delays):
        ceiling = min(0.16, 0.02 * 2**attempt)
        assert 0.5 * ceiling - 0.05 <= delay <= ceiling + 0.05
    assert max(delays) <= 0.21
    assert client.connections == 0


def test_max_connections_backs_off_hard_and_says_why(
    demo_feed: DemoFeed, make_client: MakeClient
) -> None:
    client = make_client(demo_feed.url, max_connections_backoff=1.5)
    collect(client, lambda it: len(trades(it)) >= 3)
    demo_feed.send_status("max_connections", "Maximum number of connections exceeded.", close=True)
    started = time.monotonic()
    items = collect(client, count("subscribed"))
    waited = time.monotonic() - started
    (down,) = notices(items, "disconnected")
    assert "another client is using this API key" in down.detail
    assert waited >= 0.7  # hard backoff (1.5 s × jitter 0.5–1), not the 0.05 s of a plain drop
    assert demo_feed.connections == 2


@pytest.mark.parametrize("status", ["slow_consumer", "force_disconnect"])
def test_disconnect_statuses_reconnect(
    demo_feed: DemoFeed, make_client: MakeClient, status: str
) -> None:
    client = make_client(demo_feed.url)
    collect(client, lambda it: len(trades(it)) >= 3)
    demo_feed.send_status(status, "you are too slow")
    items = collect(client, count("subscribed"))
    assert notices(items, status)
    assert demo_feed.connections == 2


def test_auth_failed_is_fatal_without_retry(demo_feed: DemoFeed, make_client: MakeClient) -> None:
    client = make_client(demo_feed.url, key="wrong-key-000000000")
    items = collect(client, lambda it: bool(it) and isinstance(it[-1], EndOfStream))
    end = items[-1]
    assert isinstance(end, EndOfStream) and end.error is not None
    assert "refused the API key" in end.error
    assert isinstance(client.fatal, AuthFailed)
    assert client.join(2)
    assert demo_feed.connections == 1 and client.reconnects == 0


def test_silence_triggers_watchdog_reconnect(demo_feed: DemoFeed, make_client: MakeClient) -> None:
    client = make_client(demo_feed.url, silence_timeout=0.6)
    collect(client, lambda it: len(trades(it)) >= 3)
    demo_feed.stall(3.0)
    items = collect(client, count("connected", 2))
    assert any("no data for 0.6 s" in n.detail for n in notices(items, "disconnected"))
    assert demo_feed.connections >= 2


def test_full_queue_blocks_the_reader_and_loses_nothing(
    demo_feed: DemoFeed, make_client: MakeClient
) -> None:
    client = make_client(demo_feed.url, queue_size=8)
    deadline = time.monotonic() + 5
    while not client.queue.full() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.queue.full()
    time.sleep(0.5)  # the reader is now blocked, not dropping
    assert client.queue.qsize() == 8
    items = collect(client, lambda it: len(trades(it)) >= 50)
    ids = [int(t.trade_id or 0) for t in trades(items) if t.pair == "BTC-USD"]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "a trade went missing"


def test_stop_ends_the_reader_promptly(demo_feed: DemoFeed, make_client: MakeClient) -> None:
    client = make_client(demo_feed.url)
    collect(client, lambda it: len(trades(it)) >= 3)
    started = time.monotonic()
    client.stop()
    assert client.join(3)
    assert time.monotonic() - started < 2
    assert client.state == "stopped"


def test_api_key_never_logged(
    demo_feed: DemoFeed, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        client = make_client(demo_feed.url)
        items = collect(client, lambda it: len(trades(it)) >= 3)
        demo_feed.drop_connections()
        items += collect(client, count("subscribed"))
    assert API_KEY not in caplog.text
    assert all(API_KEY not in n.detail for n in notices(items))
