"""The feed client against the loopback demo feed: handshake, reconnects, statuses, gaps."""

from __future__ import annotations

import logging
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from postgres import free_port

from conftest import API_KEY, FAST, collect
from polystream.decode import Decoder
from polystream.errors import AuthFailed, RecordingError
from polystream.events import Trade
from polystream.record import ReplaySource
from polystream.simulator import DemoFeed
from polystream.source import (
    EndOfStream,
    FeedClient,
    FeedOptions,
    Frame,
    Item,
    Notice,
    chunk_topics,
)

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
    port = free_port()  # nobody listens on it
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


def reconnect_plan(notice: Notice) -> tuple[float, int]:
    """The delay and attempt number a `reconnecting` notice announces."""
    found = re.search(r"in ([\d.]+) s \(attempt (\d+)\)", notice.detail)
    assert found, notice.detail
    return float(found.group(1)), int(found.group(2))


def stream_for(client: FeedClient, seconds: float) -> list[Item]:
    """Read the client's queue until it has delivered trades for `seconds` on this connection."""
    first: list[float] = []

    def long_enough(items: list[Item]) -> bool:
        if not first and trades(items):
            first.append(time.monotonic())
        return bool(first) and time.monotonic() - first[0] >= seconds

    return collect(client, long_enough)


def drain(client: FeedClient) -> list[Item]:
    items: list[Item] = []
    while not client.queue.empty():
        items.append(client.queue.get_nowait())
    return items


def restart(feed: DemoFeed) -> None:
    """Stop the server (its connections are closed) and start it again on the same port."""
    feed.stop()
    feed.start()


def test_the_healthy_period_is_seconds_not_a_minute() -> None:
    assert 1.0 <= FeedOptions().healthy_after <= 5.0


def test_a_flapping_feed_is_used_again_at_once_after_each_healthy_connection(
    demo_feed: DemoFeed, make_client: MakeClient
) -> None:
    client = make_client(demo_feed.url, backoff_initial=0.2, backoff_max=3.2, healthy_after=0.5)
    collect(client, count("subscribed"))
    plans: list[tuple[float, int]] = []
    waits: list[float] = []
    for _ in range(4):
        stream_for(client, 0.7)  # data for longer than the healthy period, then the server goes
        restart(demo_feed)
        items = collect(client, count("connected"))
        down = notices(items, "disconnected")[0]
        plans.append(reconnect_plan(notices(items, "reconnecting")[0]))
        waits.append((notices(items, "connected")[0].time - down.time) / 1000)
    assert [attempt for _, attempt in plans] == [1, 1, 1, 1]
    assert all(delay <= 0.2 + 0.05 for delay, _ in plans)
    assert max(waits) < 1.0, waits
    assert demo_feed.connections == 5


def test_connections_that_deliver_no_data_keep_growing_the_backoff(
    demo_feed: DemoFeed, make_client: MakeClient
) -> None:
    client = make_client(demo_feed.url, backoff_initial=0.2, backoff_max=3.2, healthy_after=0.3)
    collect(client, count("subscribed"))
    demo_feed.stall(30.0)  # accepted, authenticated and subscribed, but no market data
    plans: list[tuple[float, int]] = []
    for _ in range(3):
        restart(demo_feed)
        items = collect(client, count("subscribed"))
        time.sleep(0.6)  # up well past the healthy period, without data
        plans.extend(reconnect_plan(n) for n in notices(items, "reconnecting"))
    attempts = [attempt for _, attempt in plans]
    assert attempts == sorted(attempts) and attempts[-1] >= 3, plans
    assert plans[-1][0] >= 0.5 * min(3.2, 0.2 * 2 ** (attempts[-1] - 1)) - 0.05
    assert not trades(drain(client))


def test_max_connections_says_the_delay_it_really_waits(demo_feed: DemoFeed) -> None:
    options = FeedOptions(
        **{**{f: getattr(FAST, f) for f in FAST.__struct_fields__}, "max_connections_backoff": 1.6}
    )
    # this seed draws a jitter well below the ceiling, so a message that names the ceiling is wrong
    client = FeedClient(demo_feed.url, API_KEY, ["BTC-USD"], options=options, rng=random.Random(2))
    client.start()
    try:
        collect(client, lambda it: len(trades(it)) >= 3)
        demo_feed.send_status(
            "max_connections", "Maximum number of connections exceeded.", close=True
        )
        items = collect(client, count("connected"))
        (down,) = notices(items, "disconnected")
        said = re.search(r"backing off ([\d.]+) s", down.detail)
        assert said, down.detail
        stated = float(said.group(1))
        waited = (notices(items, "connected")[0].time - down.time) / 1000
        assert abs(waited - stated) <= 0.25, (down.detail, waited)
        assert reconnect_plan(notices(items, "reconnecting")[0])[0] == stated
        assert 0.8 - 0.05 <= stated <= 1.6
    finally:
        client.stop()
        drain(client)
        assert client.join(5)


@pytest.mark.parametrize(
    ("close", "shown"),
    [
        ("status", "closed by the server (code 1008 policy violation: maintenance)"),
        ("1001", "closed by the server (code 1001 going away)"),
        ("4000", "closed by the server (code 4000)"),
    ],
)
def test_a_server_close_shows_its_code_and_reason(
    demo_feed: DemoFeed,
    make_client: MakeClient,
    caplog: pytest.LogCaptureFixture,
    close: str,
    shown: str,
) -> None:
    client = make_client(demo_feed.url)
    collect(client, lambda it: len(trades(it)) >= 3)
    with caplog.at_level(logging.INFO, logger="polystream.source"):
        if close == "status":  # a status the client only reports, then a close frame
            demo_feed.send_status("maintenance", "planned restart", close=True)
        else:
            demo_feed.close_connections(int(close))
        items = collect(client, count("connected"))
    (down,) = notices(items, "disconnected")
    assert down.detail == shown
    assert shown in caplog.text


def test_each_outage_is_a_gap_of_its_own(demo_feed: DemoFeed, make_client: MakeClient) -> None:
    client = make_client(demo_feed.url)
    collect(client, lambda it: len(trades(it)) >= 3)
    demo_feed.drop_connections()
    collect(client, count("gap"))
    stream_for(client, 0.5)
    demo_feed.drop_connections()
    collect(client, count("gap"))
    first, second = client.gaps
    assert first.end <= second.start, "the second gap covers data that was received"
    assert second.end - second.start < 1000


def test_a_directory_is_not_a_recording(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="is a directory, not a recording"):
        ReplaySource(tmp_path)
    with pytest.raises(RecordingError, match="does not exist"):
        ReplaySource(tmp_path / "nope.rec")


def watch_feed(tmp_path: Path, feed: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POLYGON_", "MASSIVE_", "TELEGRAM_", "DATABASE_URL"))
    }
    env["POLYSTREAM_STATE_DIR"] = str(tmp_path / "state")
    return subprocess.run(
        [sys.executable, "-m", "polystream", "watch", "X:BTCUSD", "--feed", feed, "--no-ui"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_feed_directory_says_it_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "recordings").mkdir()
    not_a_recording = tmp_path / "notes.rec"
    not_a_recording.write_text("hello\n")
    directory = watch_feed(tmp_path, str(tmp_path / "recordings"))
    missing = watch_feed(tmp_path, str(tmp_path / "missing.rec"))
    damaged = watch_feed(tmp_path, str(not_a_recording))
    errors = [r.stderr.strip().splitlines()[-1] for r in (directory, missing, damaged)]
    assert "is a directory, not a recording" in errors[0]
    assert "does not exist" not in errors[0]
    assert "does not exist" in errors[1]
    assert "not a polystream recording" in errors[2]
    assert directory.returncode == damaged.returncode != 0
    assert len(directory.stderr.strip().splitlines()) == 1
