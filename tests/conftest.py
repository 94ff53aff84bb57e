"""Shared fixtures: a loopback demo feed, helpers to read a feed client's queue, a real
PostgreSQL cluster started once per session with a fresh database per test, and real
nats-server processes (one per session, or started by a test)."""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import time
from collections.abc import Callable, Iterator

import pytest
from nats_server import NatsCluster, NatsNotFound, NatsServer, find_binary
from postgres import Cluster, PostgresNotFound

from polystream.simulator import DemoFeed
from polystream.source import EndOfStream, FeedClient, FeedOptions, Frame, Item

API_KEY = "pk_test_SECRET_0123456789"

FAST = FeedOptions(
    connect_timeout=2.0,
    handshake_timeout=2.0,
    ping_interval=0.5,
    silence_timeout=5.0,
    backoff_initial=0.05,
    backoff_max=0.2,
    max_connections_backoff=1.0,
    healthy_after=0.5,
    poll_interval=0.05,
)


@pytest.fixture
def demo_feed() -> Iterator[DemoFeed]:
    """A demo feed on a free loopback port that accepts only `API_KEY`."""
    with DemoFeed(api_key=API_KEY, bar_seconds=0.05, seed=7) as feed:
        yield feed


@pytest.fixture
def make_client() -> Iterator[Callable[..., FeedClient]]:
    """Build feed clients with fast timings; every one is stopped at the end of the test."""
    clients: list[FeedClient] = []

    def make(
        url: str,
        pairs: list[str] | None = None,
        key: str = API_KEY,
        channels: tuple[str, ...] = ("XT", "XQ"),
        **overrides: float,
    ) -> FeedClient:
        opts = FeedOptions(**{**{f: getattr(FAST, f) for f in FAST.__struct_fields__}, **overrides})
        client = FeedClient(url, key, pairs or ["BTC-USD"], channels, options=opts)
        clients.append(client)
        return client.start()

    yield make
    for c in clients:
        c.stop()
    for c in clients:
        deadline = time.monotonic() + 5
        while not c.join(0.05) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):  # a consumer always drains at shutdown
                while True:
                    c.queue.get_nowait()
        assert c.join(0), "feed client did not stop"


def collect(
    client: FeedClient, until: Callable[[list[Item]], bool], timeout: float = 10.0
) -> list[Item]:
    """Read the client's queue until `until(items)` holds; fail after `timeout` seconds."""
    items: list[Item] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            items.append(client.queue.get(timeout=0.05))
        if until(items):
            return items
        if items and isinstance(items[-1], EndOfStream):
            break
    seen = [getattr(i, "event", type(i).__name__) for i in items if not isinstance(i, Frame)]
    raise AssertionError(f"condition not met after {timeout} s; saw {seen}")


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster for the whole session (skipped when PostgreSQL is not
    installed, except under CI, where its absence fails the run)."""
    try:
        cluster = Cluster()
    except PostgresNotFound as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required under CI=true: {exc}")
        pytest.skip(f"PostgreSQL is not installed: {exc}")
    try:
        yield cluster
    finally:
        cluster.close()


_databases = itertools.count()


@pytest.fixture
def database_url(postgres: Cluster) -> Iterator[str]:
    """The URL of a new, empty database (no migrations applied)."""
    if not postgres.running:  # an outage test that failed half-way
        postgres.start()
    name = f"test_{os.getpid()}_{next(_databases)}"
    url = postgres.create_database(name)
    yield url
    if postgres.running:
        with contextlib.suppress(Exception):
            postgres.drop_database(name)


@pytest.fixture
def migrated(database_url: str) -> str:
    """The URL of a new database with every migration applied."""
    from polystream import store

    store.migrate(database_url)
    return database_url


def _nats_binary() -> str:
    """nats-server's path; skips the test when it is not installed, except under CI, where its
    absence fails the run."""
    try:
        return find_binary()
    except NatsNotFound as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"nats-server is required under CI=true: {exc}")
        pytest.skip(f"nats-server is not installed: {exc}")


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """The URL of a JetStream server shared by the session: tests use their own stream names."""
    with NatsServer(binary=_nats_binary()) as server:
        yield server.url


@pytest.fixture
def nats_server() -> Iterator[Callable[[], NatsServer]]:
    """Start servers of the test's own, to stop, kill or pause; all are removed at the end."""
    binary = _nats_binary()
    servers: list[NatsServer] = []

    def start() -> NatsServer:
        servers.append(NatsServer(binary=binary))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    """Three JetStream servers clustered on loopback (n1, n2, n3)."""
    with NatsCluster(3, binary=_nats_binary()) as cluster:
        yield cluster
