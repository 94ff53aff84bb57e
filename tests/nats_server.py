"""Throwaway nats-server processes for tests: JetStream on, loopback only, a free port (never
4222) and a temporary store directory each; one server, or a cluster of them on loopback.

Named `nats_server`, not `nats`: the tests directory is on sys.path and would shadow nats-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import nats
import nats.errors
from nats.js import JetStreamContext
from postgres import free_port

DEBIAN_BINARY = "/usr/sbin/nats-server"


class NatsNotFound(RuntimeError):
    """No nats-server binary was found."""


def find_binary() -> str:
    """nats-server on PATH, else where Debian's package puts it (/usr/sbin is not on every
    user's PATH)."""
    found = shutil.which("nats-server")
    if found:
        return found
    if os.access(DEBIAN_BINARY, os.X_OK):
        return DEBIAN_BINARY
    raise NatsNotFound(f"no nats-server on PATH or at {DEBIAN_BINARY}")


class NatsServer:
    """One nats-server with JetStream; `start()` is called by the constructor. Stopping and
    starting again keeps the port and the store, as a restarted server would."""

    def __init__(
        self,
        *,
        name: str | None = None,
        port: int | None = None,
        cluster_args: list[str] | None = None,
        binary: str | None = None,
    ) -> None:
        self.binary = binary or find_binary()
        self.name = name
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="polystream-nats-"))
        self.log = self.dir / "server.log"
        self.cluster_args = cluster_args or []
        self.process: subprocess.Popen[bytes] | None = None
        try:
            self.start()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        name = ["-n", self.name] if self.name else []
        store = ["-sd", str(self.dir / "store")]
        return [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), *store, *name,
                *self.cluster_args]  # fmt: skip

    def start(self, wait: bool = True) -> None:
        """Start the server; with `wait`, return once it accepts connections."""
        if self.running:
            return
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        if wait:
            self.wait_accepting()

    def wait_accepting(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"nats-server exited:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            time.sleep(0.02)
        raise RuntimeError(
            f"nats-server did not accept connections in {timeout} s:\n{self.log_tail()}"
        )

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def stop(self) -> None:
        """Shut down as an administrator would (SIGTERM), keeping the store."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Die at once (SIGKILL), as on a crash."""
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open but nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Kill the server and delete its store."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class NatsCluster:
    """`size` servers named n1, n2, … routed to each other on loopback; the constructor
    returns once JetStream answers (a meta leader is elected)."""

    def __init__(self, size: int = 3, binary: str | None = None) -> None:
        cluster_ports = [free_port() for _ in range(size)]
        self.servers: list[NatsServer] = []
        try:
            for i, own in enumerate(cluster_ports):
                routes = ",".join(f"nats://127.0.0.1:{p}" for p in cluster_ports if p != own)
                args = ["--cluster", f"nats://127.0.0.1:{own}", "--routes", routes,
                        "--cluster_name", "polystream-test"]  # fmt: skip
                self.servers.append(NatsServer(name=f"n{i + 1}", cluster_args=args, binary=binary))
            wait_jetstream(self.url, replicas=size)
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """Every server, comma-separated, as clients are given a cluster."""
        return ",".join(s.url for s in self.servers)

    def server(self, name: str) -> NatsServer:
        return next(s for s in self.servers if s.name == name)

    def close(self) -> None:
        for s in self.servers:
            s.close()

    def __enter__(self) -> NatsCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def wait_jetstream(url: str, replicas: int = 1, timeout: float = 20.0) -> None:
    """Return once JetStream at `url` can place a stream of `replicas` copies: in a cluster,
    once a meta leader is elected and every server has joined."""

    async def probe(js: JetStreamContext) -> None:
        await js.add_stream(
            name="READY", subjects=["_ready"], storage="memory", num_replicas=replicas
        )
        await js.delete_stream("READY")

    async def ask() -> None:
        nc = await nats.connect(url.split(","), connect_timeout=2, max_reconnect_attempts=-1)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    return await probe(nc.jetstream(timeout=2))
                except nats.errors.Error:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
        finally:
            await nc.close()

    asyncio.run(asyncio.wait_for(ask(), timeout + 5))


def stream_leader(url: str, stream: str) -> str:
    """The name of the server that leads `stream` (its cluster info), as the server reports it."""

    async def ask() -> str:
        nc = await nats.connect(url.split(","), connect_timeout=2)
        try:
            info = await nc.jetstream().stream_info(stream)
        finally:
            await nc.close()
        assert info.cluster is not None and info.cluster.leader, f"{stream} has no leader"
        return info.cluster.leader

    return asyncio.run(asyncio.wait_for(ask(), 10))
