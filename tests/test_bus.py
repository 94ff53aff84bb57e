"""The NATS JetStream bus against real nats-server processes: publishing (deduplicated retries,
exactly-once subjects, pipelining), pull consumers, last-message look-ups, KeyValue, outages
and a cluster losing its stream leader."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from nats_server import NatsCluster, NatsServer, stream_leader
from postgres import free_port

from polystream.bus import Bus, BusError, Duplicate, Message

_names = itertools.count()


@pytest.fixture
def names() -> tuple[str, str]:
    """A stream name and a subject prefix of this test's own on the shared server."""
    n = next(_names)
    return f"T{n}", f"t{n}"


@pytest.fixture
def bus(nats_url: str) -> Iterator[Bus]:
    with Bus(nats_url) as b:
        yield b


def drain(
    bus: Bus, stream: str, subject: str, *, expect: int, timeout: float = 10.0
) -> list[Message]:
    """Pull (ephemeral consumer, acking) until `expect` messages came or `timeout` passed, then
    make sure no more are there."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < expect and time.monotonic() < deadline:
        got += bus.pull(stream, None, subject, batch=500, timeout=0.5)
    got += bus.pull(stream, None, subject, batch=500, timeout=0.3)
    for m in got:
        m.ack()
    return got


def test_round_trip_with_headers_and_acks(bus: Bus, names: tuple[str, str]) -> None:
    stream, p = names
    bus.ensure_stream(stream, [f"{p}.>"])
    first = bus.publish(f"{p}.x", b"one", headers={"Receipt-Ms": "1700000000000"})
    second = bus.publish(f"{p}.x", b"two")
    assert second == first + 1

    msgs = bus.pull(stream, "reader", f"{p}.x", batch=10, timeout=1.0, ack_wait_s=1.0)
    assert [(m.subject, m.data, m.seq) for m in msgs] == [
        (f"{p}.x", b"one", first),
        (f"{p}.x", b"two", second),
    ]
    assert msgs[0].headers["Receipt-Ms"] == "1700000000000"
    msgs[0].ack_sync()  # the second one is left unacknowledged: it must come back

    time.sleep(1.3)
    again = bus.pull(stream, "reader", f"{p}.x", batch=10, timeout=1.0, ack_wait_s=1.0)
    assert [m.seq for m in again] == [second]
    again[0].ack_sync()
    assert bus.pull(stream, "reader", f"{p}.x", timeout=0.3) == []


def test_the_same_msg_id_is_stored_once(bus: Bus, names: tuple[str, str]) -> None:
    stream, p = names
    bus.ensure_stream(stream, [f"{p}.>"])
    seq = bus.publish(f"{p}.x", b"frame 1", msg_id="feed-1")
    assert bus.publish(f"{p}.x", b"frame 1", msg_id="feed-1") == seq
    assert [m.seq for m in drain(bus, stream, f"{p}.x", expect=1)] == [seq]


def test_a_publish_whose_ack_is_lost_is_retried_and_stored_once(
    nats_server: Callable[[], NatsServer], names: tuple[str, str]
) -> None:
    stream, p = names
    server = nats_server()
    with Bus(server.url) as bus:
        bus.ensure_stream(stream, [f"{p}.>"])
        server.pause()  # the request arrives but its ack cannot come before the timeout
        threading.Timer(1.0, server.resume).start()
        started = time.monotonic()
        seq = bus.publish(f"{p}.x", b"once", timeout=0.3, retries=8)
        assert time.monotonic() - started >= 1.0, "the ack came although the server was frozen"
        assert [(m.seq, m.data) for m in drain(bus, stream, f"{p}.x", expect=1)] == [(seq, b"once")]


def test_a_publish_during_a_restart_is_stored_once(
    nats_server: Callable[[], NatsServer], names: tuple[str, str]
) -> None:
    stream, p = names
    server = nats_server()
    with Bus(server.url) as bus:
        bus.ensure_stream(stream, [f"{p}.>"])
        server.stop()
        threading.Timer(1.0, server.start).start()
        seq = bus.publish(f"{p}.x", b"once", timeout=0.5, retries=10)
        assert [(m.seq, m.data) for m in drain(bus, stream, f"{p}.x", expect=1)] == [(seq, b"once")]


def test_a_subject_of_one_message_refuses_a_second(bus: Bus, names: tuple[str, str]) -> None:
    stream, p = names
    bus.ensure_stream(stream, [f"{p}.>"], max_msgs_per_subject=1, discard_new_per_subject=True)
    seq = bus.publish(f"{p}.alert.a1", b"fired", msg_id="a1")
    assert bus.publish(f"{p}.alert.a1", b"fired", msg_id="a1") == seq  # a retry is no duplicate

    with pytest.raises(Duplicate, match=rf"already holds the message on {p}\.alert\.a1") as err:
        bus.publish(f"{p}.alert.a1", b"fired again", msg_id="another process")
    assert isinstance(err.value, BusError)
    assert "\n" not in str(err.value)

    with pytest.raises(Duplicate):
        bus.publish_many(
            [(f"{p}.alert.a1", b"x", None, None), (f"{p}.alert.a2", b"new", None, None)]
        )
    stored = drain(bus, stream, f"{p}.alert.>", expect=2)
    assert [(m.subject, m.data) for m in stored] == [
        (f"{p}.alert.a1", b"fired"),
        (f"{p}.alert.a2", b"new"),
    ]


def test_a_durable_consumer_resumes_where_it_was_acked(
    nats_server: Callable[[], NatsServer], names: tuple[str, str]
) -> None:
    stream, p = names
    server = nats_server()
    with Bus(server.url) as bus:
        bus.ensure_stream(stream, [f"{p}.>"])
        seqs = bus.publish_many([(f"{p}.x", b"%d" % i, None, None) for i in range(10)])
        for m in bus.pull(stream, "writer", f"{p}.x", batch=4):
            m.ack_sync()

        server.stop()
        server.start()
        got: list[Message] = []
        deadline = time.monotonic() + 10
        while len(got) < 6 and time.monotonic() < deadline:
            got += bus.pull(stream, "writer", f"{p}.x", batch=10, timeout=0.5)
        assert bus.connected
        assert [m.seq for m in got] == seqs[4:]
        for m in got:
            m.ack_sync()

    with Bus(server.url) as other:  # another process taking over the same durable consumer
        assert other.pull(stream, "writer", f"{p}.x", timeout=0.3) == []
        other.delete_consumer(stream, "writer")
        other.delete_consumer(stream, "writer")  # already gone: fine
        restarted = other.pull(stream, "writer", f"{p}.x", batch=20, deliver_from_seq=seqs[8])
        assert [m.seq for m in restarted] == seqs[8:]


def test_publish_many_pipelines_a_thousand_messages(bus: Bus, names: tuple[str, str]) -> None:
    stream, p = names
    bus.ensure_stream(stream, [f"{p}.>"], storage="memory")
    payload = bytes(range(256)) * 40  # 10 KB
    items = [(f"{p}.part.{i % 8}", payload, {"Batch": str(i)}, f"m{i}") for i in range(1000)]
    started = time.monotonic()
    seqs = bus.publish_many(items, timeout=10.0)
    elapsed = time.monotonic() - started
    print(f"publish_many: 1000 x 10 KB in {elapsed:.2f} s, {1000 / elapsed:.0f} msg/s")
    assert sorted(seqs) == list(range(min(seqs), min(seqs) + 1000))
    assert bus.publish_many(items[:10]) == seqs[:10]  # same ids: deduplicated, same sequences


def test_last_returns_the_last_message_of_a_subject(bus: Bus, names: tuple[str, str]) -> None:
    stream, p = names
    bus.ensure_stream(stream, [f"{p}.>"])
    assert bus.last(stream, f"{p}.seq") is None
    for i in range(3):
        seq = bus.publish(f"{p}.seq", b"%d" % i, headers={"Global-Seq": str(100 + i)})
    bus.publish(f"{p}.other", b"not this one")
    last = bus.last(stream, f"{p}.seq")
    assert last is not None
    assert (last.subject, last.data, last.seq) == (f"{p}.seq", b"2", seq)
    assert last.headers["Global-Seq"] == "102"
    with pytest.raises(BusError, match=r"refused reading the last message .* stream not found"):
        bus.last("NO_SUCH_STREAM", f"{p}.seq")


def test_key_value_put_and_get(bus: Bus, names: tuple[str, str]) -> None:
    _, p = names
    kv = bus.kv(f"offsets-{p}")
    assert kv.get("ingest") is None
    first = kv.put("ingest", b"41")
    assert kv.put("ingest", b"42") > first
    assert bus.kv(f"offsets-{p}").get("ingest") == b"42"


def test_stream_and_publish_errors_are_one_sentence(bus: Bus, names: tuple[str, str]) -> None:
    stream, p = names
    bus.ensure_stream(stream, [f"{p}.>"])
    with pytest.raises(
        BusError,
        match=r"^NATS at nats://127\.0\.0\.1:\d+ refused the configuration of stream XT\d+: "
        r"subjects overlap with an existing stream\.$",
    ):
        bus.ensure_stream(f"X{stream}", [f"{p}.>"])
    with pytest.raises(
        BusError, match=r"has no JetStream stream answering publishing to nowhere\.x"
    ):
        bus.publish("nowhere.x", b"", retries=0)
    bus.ensure_stream(stream, [f"{p}.>"], max_age_s=60)  # an update is fine


def test_an_unreachable_server_is_one_sentence(nats_server: Callable[[], NatsServer]) -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(BusError) as err:
        Bus(f"nats://alice:s3cret@127.0.0.1:{port}")
    assert str(err.value) == (
        f"NATS at nats://alice:…@127.0.0.1:{port} cannot be reached: connection refused."
    )
    assert time.monotonic() - started < 3

    server = nats_server()
    bus = Bus(server.url)
    bus.close()
    bus.close()
    with pytest.raises(BusError, match="is closed"):
        bus.publish("x", b"")


@pytest.mark.timeout(30)
def test_a_cluster_keeps_publishing_when_the_stream_leader_dies(nats_cluster: NatsCluster) -> None:
    with Bus(nats_cluster.url, connect_timeout=2.0) as bus:  # short API timeouts: retry sooner
        bus.ensure_stream("R3", ["r3.>"], replicas=3)
        before = bus.publish("r3.x", b"before")
        leader = stream_leader(nats_cluster.url, "R3")
        nats_cluster.server(leader).kill()

        killed = time.monotonic()
        after = bus.publish("r3.x", b"after", timeout=1.0, retries=30)
        took = time.monotonic() - killed
        print(f"publishing went on {took:.1f} s after the stream leader {leader} was killed")
        assert took < 15
        assert after > before
        assert stream_leader(nats_cluster.url, "R3") != leader
        stored = drain(bus, "R3", "r3.x", expect=2, timeout=12)
        assert [m.data for m in stored] == [b"before", b"after"]
