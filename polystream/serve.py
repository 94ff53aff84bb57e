"""`watch --serve [HOST:]PORT`: the run's records, exactly as `--json` prints them, to WebSocket
clients, in the feed's own style so that code written for the feed reads polystream too: JSON
arrays of records, `{"action":"auth"|"subscribe"|"unsubscribe","params":…}` requests, and
topics `TYPE.SYMBOL` (`bar.X:BTCUSD`, `alert.*`, `status.*`).

The pipeline thread never waits for a client: it only hands each output that carries records to
the server's thread through a bounded queue (when that is full the output is left out for the
clients, counted and told once). The server's thread, with an event loop of its own, encodes the
records once (`display.json_records`), builds one array per distinct set of subscriptions and
queues it for each client; a client whose queue is full is closed (1008, `too slow: …`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import logging
import queue
import re
import socket
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, NamedTuple

import msgspec
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from .display import JsonRecord, json_records
from .errors import ConfigError, SymbolError, UsageError
from .schema import Notice
from .sinks import HURRY, BaseSink, Output, View
from .symbols import normalize

TOKEN_VAR = "POLYSTREAM_SERVE_TOKEN"
DEFAULT_HOST = "127.0.0.1"
TOPIC_TYPES = ("bar", "alert", "book", "status")
# Outputs waiting for the server's thread: only a server starved of the CPU falls this far behind.
HANDOFF = 10_000
# Arrays, and bytes of them, waiting for one client: beyond either it is closed as too slow (an
# array bigger than the budget still goes to a client with nothing waiting).
BACKLOG = 1_000
BACKLOG_BYTES = 4 * 1024 * 1024
# A client closed as too slow has this long to read up to the close frame before it is cut off.
DROP_GRACE = 5.0
# At the end of the run, clients have this long to take the last records and the close.
STOP_GRACE = 2.0
POLICY_VIOLATION = 1008
GOING_AWAY = 1001
# A request is a line of JSON; nothing a client has to say is longer.
MAX_REQUEST = 64 * 1024

_ADDRESS = re.compile(
    r"(?:(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:\[\]/]+)):)?(?P<port>\d{1,5})"
)
_EXAMPLE = '{"action":"subscribe","params":"bar.X:BTCUSD,alert.*"}'

# The websockets library logs a traceback whenever a client vanishes mid-handshake, and at debug
# level every frame, tokens included: only critical records get through.
_WS_LOG = logging.getLogger("polystream.serve.websockets")
_WS_LOG.setLevel(logging.CRITICAL)

Topic = tuple[str, str]  # (record type, symbol or "*")


class TopicError(ValueError):
    """A topic a client asked for that names no records; `str` is the sentence it is sent."""


class _Request(msgspec.Struct):
    action: str
    params: str = ""


class _Close(NamedTuple):
    code: int
    reason: str


def parse_address(text: str) -> tuple[str, int]:
    """`8765`, `127.0.0.1:8765`, `[::1]:8765` → (host, port); the host defaults to loopback and
    port 0 picks a free one."""
    match = _ADDRESS.fullmatch(text.strip())
    if match is None or int(match["port"]) > 65535:
        raise UsageError(
            f"Invalid --serve {text!r}: give a port (8765), HOST:PORT (127.0.0.1:8765) or "
            "[IPv6]:PORT ([::1]:8765), the port from 0 (any free one) to 65535."
        )
    return match["v6"] or match["host"] or DEFAULT_HOST, int(match["port"])


def ws_url(host: str, port: int) -> str:
    return f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"


def parse_topic(text: str) -> Topic:
    """`bar.X:BTCUSD`, `bar.BTC-USD`, `alert.*`, `status.*` → (type, symbol or "*")."""
    kind, _, symbol = text.strip().partition(".")
    if kind not in TOPIC_TYPES or not symbol:
        raise TopicError(
            f"Invalid topic {text!r}: write TYPE.SYMBOL, TYPE one of {', '.join(TOPIC_TYPES)} "
            "and SYMBOL such as X:BTCUSD or *."
        )
    if symbol == "*":
        return kind, "*"
    try:
        return kind, normalize(symbol)
    except SymbolError:
        raise TopicError(
            f"Invalid topic {text!r}: {symbol!r} is neither * nor a symbol such as X:BTCUSD, "
            "BTC-USD or btcusd."
        ) from None


def selected(topics: frozenset[Topic], records: Sequence[JsonRecord]) -> list[bytes]:
    """The records a client with `topics` gets: status records have no symbol, so any status
    topic takes them all."""
    statuses = any(kind == "status" for kind, _ in topics)
    return [
        r.data
        for r in records
        if (r.type, r.symbol) in topics
        or (r.type, "*") in topics
        or (statuses and r.type == "status")
    ]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: an address in use is an error before the run starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).rstrip(".").lower()
        raise ConfigError(
            f"Cannot serve records on {ws_url(host, port)}: {reason}; give --serve another "
            "[HOST:]PORT."
        ) from None


class _Client:
    """One connection: what it asked for, and the arrays waiting for its writer task."""

    def __init__(self, ws: ServerConnection, authed: bool) -> None:
        self.ws = ws
        self.authed = authed
        self.topics: frozenset[Topic] = frozenset()
        self.queue: asyncio.Queue[bytes | _Close] = asyncio.Queue(BACKLOG)
        self.queued = 0  # bytes in the queue
        self.writer: asyncio.Task[None] | None = None
        self.closing = False

    @property
    def peer(self) -> str:
        host, port = self.ws.remote_address[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class RecordServer:
    """The WebSocket server: `offer` from the pipeline thread, everything else on a thread with
    its own event loop, started by `start` and ended by `stop`."""

    def __init__(self, address: str, token: str | None = None) -> None:
        from . import __version__  # the package is whole by the time a server is made

        host, port = parse_address(address)
        self._sock = _listen(host, port)
        self.url = ws_url(host, self._sock.getsockname()[1])
        # without a token, anyone who can reach a port beyond this machine reads the records
        self.open_to_all = not token and not _loopback(host)
        self._token = token.encode() if token else None
        self._inbox: queue.Queue[Output] = queue.Queue(HANDOFF)
        self._encode = msgspec.json.Encoder().encode  # used on the server's thread only
        self._greeting = self._status("connected", f"polystream {__version__}")
        self._decode = msgspec.json.Decoder(_Request).decode
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self._grace = STOP_GRACE
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # status records for the other sinks, as (event, detail), from the server's thread
        self.news: collections.deque[tuple[str, str]] = collections.deque()
        self.failure: Exception | None = None
        self.listeners = 0  # clients with a subscription: without any, nothing is handed over
        self.sent = 0
        self.dropped = 0  # clients closed as too slow
        self.skipped = 0  # outputs left out because the server's thread was behind

    # -- the pipeline thread -----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="serve", daemon=True)
        self._thread.start()

    def offer(self, out: Output) -> None:
        """Hand `out` to the server's thread, never waiting: when the hand-off is full the
        output is left out for the clients and counted."""
        loop = self._loop
        if loop is None or not self.listeners or self._stopping or not _has_records(out):
            return
        try:
            self._inbox.put_nowait(out)
        except queue.Full:
            self.skipped += 1
            return
        loop.call_soon_threadsafe(self._ready.set)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Send what was offered, close every client with 1001 (those that do not take it
        within `grace` seconds are cut off) and stop listening."""
        if self._thread is None or self._loop is None:
            self._sock.close()
            return
        self._grace = grace
        self._stopping = True
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._ready.set)
        self._thread.join(grace + DROP_GRACE)

    def counters(self) -> dict[str, int]:
        shown = {"ws clients": len(self._clients), "ws sent": self.sent}
        if self.dropped:
            shown["ws too slow"] = self.dropped
        if self.skipped:
            shown["ws skipped"] = self.skipped
        return shown

    # -- the server's thread -----------------------------------------------------------------

    def _run(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except Exception as exc:  # reported by the sink on its next tick
            self.failure = exc
        finally:
            self._loop.close()

    async def _main(self) -> None:
        async with serve(
            self._handle,
            sock=self._sock,
            logger=_WS_LOG,
            compression=None,  # arrays are encoded once, not once per client
            max_size=MAX_REQUEST,
            close_timeout=STOP_GRACE,
        ):
            await self._pump()
            await self._farewell()
        for task in list(self._tasks):  # nothing is left pending as the loop closes
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _pump(self) -> None:
        """Everything offered, in order, until `stop` (what was offered before it still goes)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            while True:
                try:
                    out = self._inbox.get_nowait()
                except queue.Empty:
                    break
                self._broadcast(out)
                await asyncio.sleep(0)  # the writers send while the next output waits
            if self._stopping:
                return

    def _broadcast(self, out: Output) -> None:
        records = json_records(out, self._encode)
        arrays: dict[frozenset[Topic], bytes] = {}
        for client in list(self._clients):
            if client.closing or not client.topics:
                continue
            array = arrays.get(client.topics)
            if array is None:
                chosen = selected(client.topics, records)
                array = arrays[client.topics] = b"[" + b",".join(chosen) + b"]" if chosen else b""
            if array:
                self._put(client, array)

    async def _farewell(self) -> None:
        """Every client gets what is queued for it, then 1001; what does not finish within the
        grace is cut off."""
        for client in self._clients:
            if not client.closing:
                client.closing = True
                # too slow to take even the close: cut off below
                with contextlib.suppress(asyncio.QueueFull):
                    client.queue.put_nowait(_Close(GOING_AWAY, "polystream stopped"))
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self._grace)
        for client in list(self._clients):
            client.ws.transport.abort()
        await asyncio.sleep(0)  # the aborted connections see their end

    async def _handle(self, ws: ServerConnection) -> None:
        client = _Client(ws, authed=self._token is None)
        self._clients.add(client)
        client.writer = self._task(self._write(client))
        self._put(client, self._greeting)
        try:
            async for message in ws:
                if not client.closing:
                    self._on_message(client, message)
        except ConnectionClosed:
            pass
        finally:
            self._clients.discard(client)
            self._count_listeners()
            client.writer.cancel()

    async def _write(self, client: _Client) -> None:
        """Send the client's queue in order; a close ends it."""
        try:
            while True:
                item = await client.queue.get()
                if isinstance(item, _Close):
                    await client.ws.close(item.code, item.reason)
                    return
                client.queued -= len(item)
                await client.ws.send(item, text=True)
                self.sent += 1
        except ConnectionClosed:
            pass

    def _put(self, client: _Client, message: bytes | _Close) -> None:
        if client.closing:
            return
        size = len(message) if isinstance(message, bytes) else 0
        if client.queue.full() or (client.queued and client.queued + size > BACKLOG_BYTES):
            self._too_slow(client)
            return
        client.queue.put_nowait(message)
        client.queued += size

    def _too_slow(self, client: _Client) -> None:
        """Close a client that does not keep up, dropping what waits for it: the run does not
        wait for one reader."""
        behind = client.queue.qsize()
        client.closing = True
        self.dropped += 1
        self._count_listeners()
        if client.writer is not None:
            client.writer.cancel()
        self._task(self._drop(client.ws, f"too slow: {behind:,} messages behind"))
        detail = f"closed the --serve client at {client.peer}: {behind:,} messages behind"
        self.news.append(("slow_client", detail))

    async def _drop(self, ws: ServerConnection, reason: str) -> None:
        """The close frame goes after what the client has not read yet: it sees the reason if
        it reads on within the grace, else the connection is cut."""
        try:
            await asyncio.wait_for(ws.close(POLICY_VIOLATION, reason), DROP_GRACE)
        except TimeoutError:
            ws.transport.abort()

    def _task(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- requests ----------------------------------------------------------------------------

    def _on_message(self, client: _Client, message: str | bytes) -> None:
        try:
            request = self._decode(message)
        except msgspec.DecodeError as exc:
            self._reply(client, "error", f"Cannot read that request ({exc}); send {_EXAMPLE}.")
            return
        if request.action == "auth":
            self._auth(client, request.params)
        elif request.action in ("subscribe", "unsubscribe"):
            self._subscribe(client, request.params, request.action == "subscribe")
        else:
            self._reply(
                client,
                "error",
                f"Unknown action {request.action!r}: use auth, subscribe or unsubscribe.",
            )

    def _auth(self, client: _Client, token: str) -> None:
        if self._token is None or hmac.compare_digest(token.encode(), self._token):
            client.authed = True
            self._put(client, self._status("auth_success"))
            return
        self._put(client, self._status("auth_failed"))
        self._put(client, _Close(POLICY_VIOLATION, "authentication failed"))
        client.closing = True

    def _subscribe(self, client: _Client, params: str, on: bool) -> None:
        if not client.authed:
            self._reply(
                client, "error", 'Not authenticated: send {"action":"auth","params":TOKEN} first.'
            )
            return
        names = [name.strip() for name in params.split(",") if name.strip()]
        if not names:
            self._reply(client, "error", f"No topics given: send {_EXAMPLE}.")
            return
        topics = set(client.topics)
        for name in names:
            try:
                topic = parse_topic(name)
            except TopicError as exc:
                self._reply(client, "error", str(exc))
                continue
            if on:
                topics.add(topic)
            else:
                topics.discard(topic)
            self._reply(client, "subscribed" if on else "unsubscribed", ".".join(topic))
        client.topics = frozenset(topics)
        self._count_listeners()

    def _reply(self, client: _Client, event: str, detail: str) -> None:
        self._put(client, self._status(event, detail))

    def _status(self, event: str, detail: str | None = None) -> bytes:
        record = {"type": "status", "event": event}
        if detail is not None:
            record["detail"] = detail
        return self._encode([record])

    def _count_listeners(self) -> None:
        self.listeners = sum(1 for c in self._clients if c.topics and not c.closing)


def _has_records(out: Output) -> bool:
    """Whether `out` carries anything `json_records` makes a record of."""
    bars = out.bars is not None and out.bars.height > 0
    return bool(out.notices or out.book_features or out.alerts or bars)


class ServeSink(BaseSink):
    """`--serve`: the run's records to WebSocket clients (see the module docstring). The
    listening socket is bound at once; the server's thread starts with the run."""

    name = "WebSocket server"

    def __init__(self, address: str, token: str | None = None) -> None:
        self.server = RecordServer(address, token)
        self._announced = False
        self._told_skipped = False

    def write(self, out: Output) -> None:
        self.server.start()
        self.server.offer(out)

    def tick(self, view: View) -> Sequence[Notice]:
        server = self.server
        server.start()
        if server.failure is not None:
            raise server.failure
        notices = []
        if not self._announced:
            self._announced = True
            detail = f"records on {server.url}"
            if server.open_to_all:
                detail += f"; {TOKEN_VAR} is not set, so anyone who can reach it reads them"
            notices.append(Notice("serving", view.now_ms, detail))
        while server.news:
            event, detail = server.news.popleft()
            notices.append(Notice(event, view.now_ms, detail))
        if server.skipped and not self._told_skipped:
            self._told_skipped = True
            notices.append(
                Notice(
                    "serve_behind",
                    view.now_ms,
                    "the --serve thread fell behind the pipeline: outputs are left out for its "
                    "clients (counted as ws skipped)",
                )
            )
        return notices

    def close(self, view: View) -> Sequence[Notice]:
        self.server.stop(HURRY if view.hurry else STOP_GRACE)
        return ()

    def counters(self) -> dict[str, int]:
        return self.server.counters()
