"""The feed client: a named reader thread owns the WebSocket and puts raw frames on a bounded queue.

Output: `Frame` (receipt time in ms + the frame's bytes) and `Notice` (status records) on `queue`,
which blocks the reader when full. The client reconnects after any close or silence, forever,
until `stop()` or a fatal `auth_failed`; each outage is recorded per symbol in `gaps`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

import msgspec
import websocket

from .errors import AuthFailed
from .events import Status
from .schema import Gap, Notice
from .symbols import from_pair
from .worker import Backoff, Worker

if TYPE_CHECKING:
    import polars as pl

    from .batch import Batch

log = logging.getLogger(__name__)


class Frame(NamedTuple):
    """One frame exactly as received, with its receipt time in epoch milliseconds."""

    received: int
    data: bytes


class EndOfStream(msgspec.Struct, frozen=True):
    """The source has nothing more to give (a replay reached its end, or the client stopped)."""

    error: str | None = None


class Frames(NamedTuple):
    """Several frames in one queue item: a replay hands them over in chunks, which costs one
    queue round trip instead of one per frame. `size` is their bytes."""

    frames: list[Frame]
    size: int


class Decoded(NamedTuple):
    """Events decoded elsewhere (a shard's share of a run, from the bus): the watched symbols'
    events, and `clock`, every trade of the run in arrival order for the watermark, other
    shards' without a symbol (see `window`)."""

    batch: Batch
    clock: pl.DataFrame
    frames: int  # how many frames of the feed they came from
    now: int = 0  # live: the wall clock of the process that received them (epoch ms)


Item: TypeAlias = Frame | Frames | Decoded | Notice | EndOfStream


class FeedOptions(msgspec.Struct, frozen=True):
    """Timing and sizing of the feed client (seconds unless named otherwise).

    A connection that kept delivering market data for `healthy_after` seconds resets the backoff,
    so a feed that flaps after serving data is used again at once; one that dies before that
    (or never delivers data) lets the backoff grow towards `backoff_max`.
    """

    queue_size: int = 10_000
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    ping_interval: float = 20.0
    silence_timeout: float = 30.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    max_connections_backoff: float = 60.0
    healthy_after: float = 2.0
    topics_per_message: int = 100
    poll_interval: float = 0.2


class _Reconnect(Exception):
    """Leave the current connection and reconnect after `delay` seconds (None: the backoff's)."""

    def __init__(self, reason: str, *, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


class _Stopped(Exception):
    """`stop()` was called while the reader was waiting."""


class _Element(msgspec.Struct):
    ev: str = ""
    status: str = ""
    message: str = ""


_element_decoder = msgspec.json.Decoder(list[_Element])
_STATUS_MARK = b'"status"'


def take_waiting(
    q: queue.Queue[Item], timeout: float, max_bytes: int, max_age: float
) -> list[Item]:
    """Natural batching over a queue: the first item (waiting up to `timeout` seconds for it),
    then whatever else is waiting now, up to `max_bytes` of frames or `max_age` seconds."""
    try:
        item = q.get(timeout=timeout) if timeout > 0 else q.get_nowait()
    except queue.Empty:
        return []
    items = [item]
    size = _size(item)
    started = time.monotonic()
    while size < max_bytes and type(item) is not EndOfStream:
        try:
            item = q.get_nowait()
        except queue.Empty:
            break
        items.append(item)
        size += _size(item)
        if time.monotonic() - started >= max_age:
            break
    return items


def _size(item: Item) -> int:
    if type(item) is Frame:
        return len(item.data)
    if type(item) is Frames:
        return item.size
    return 0


def topics_for(pairs: Iterable[str], channels: Iterable[str]) -> list[str]:
    """Subscription topics (`XT.BTC-USD`) for every pair and channel."""
    chans = list(channels)
    return [f"{ch}.{pair}" for pair in pairs for ch in chans]


def chunk_topics(topics: list[str], per_message: int) -> list[str]:
    """`params` strings for subscribe messages, at most `per_message` topics each."""
    return [",".join(topics[i : i + per_message]) for i in range(0, len(topics), per_message)]


class FeedClient(Worker[None]):
    """Reads the Polygon crypto WebSocket on its own thread; see the module docstring.

    `stop()` asks the reader to close the connection and end, and returns at once; `join` waits.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        pairs: list[str],
        channels: Iterable[str] = ("XT", "XQ"),
        *,
        options: FeedOptions | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__("polystream-feed")
        self.url = url
        self._api_key = api_key
        self.pairs = list(pairs)
        self.topics = topics_for(self.pairs, channels)
        self.options = o = options or FeedOptions()
        self.queue: queue.Queue[Item] = queue.Queue(maxsize=o.queue_size)
        self._clock = clock
        rng = rng or random.Random()
        self._backoff = Backoff(o.backoff_initial, o.backoff_max, rng=rng)
        self._hard_backoff = Backoff(o.max_connections_backoff, o.max_connections_backoff, rng=rng)
        self._ws: websocket.WebSocket | None = None
        self.state = "idle"
        self.connections = 0
        self.reconnects = 0
        self.streamed = False  # whether a connection ever got as far as streaming
        self.last_failure: str | None = None  # why the last connection ended
        self.acked_topics: set[str] = set()
        self.gaps: list[Gap] = []
        self._last_data_ms: int | None = None
        self._outage_start: int | None = None
        self._first_data: float | None = None  # monotonic time of this connection's first data
        self._attempt = 0

    def take(self, timeout: float, max_bytes: int, max_age: float) -> list[Item]:
        """What the reader has put on the queue (see `take_waiting`); pipeline thread."""
        return take_waiting(self.queue, timeout, max_bytes, max_age)

    def depth(self) -> tuple[int, int]:
        """Items waiting on the queue, and how many it holds."""
        return self.queue.qsize(), self.queue.maxsize

    # -- reader thread --------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _emit(self, item: Item) -> None:
        """Put on the queue, blocking while it is full (data is never dropped), unless stopping."""
        while True:
            try:
                self.queue.put(item, timeout=self.options.poll_interval)
                return
            except queue.Full:
                if self.stopping:
                    raise _Stopped() from None

    def _notice(self, event: str, detail: str = "") -> None:
        # The notice reaches the user through the outputs; the log has it for --debug only, so
        # that each event is shown once.
        log.info("%s: %s", event, detail)
        self._emit(Notice(event, self._now_ms(), detail))

    def run(self) -> None:
        try:
            while not self.stopping:
                retry_at: float | None = None
                try:
                    self._session()
                except _Reconnect as exc:
                    retry_at = self._disconnected(str(exc), exc.delay)
                except AuthFailed as exc:
                    self.fatal = exc
                    self.state = "failed"
                    self._notice("error", str(exc))
                    return
                except (websocket.WebSocketException, OSError) as exc:
                    retry_at = self._disconnected(_describe(exc))
                finally:
                    self._close()
                if retry_at is None or self.sleep(max(0.0, retry_at - time.monotonic())):
                    break
        except _Stopped:
            pass
        finally:
            self.state = "failed" if self.fatal else "stopped"
            self._close()
            error = str(self.fatal) if self.fatal else None
            try:
                self.queue.put(EndOfStream(error), timeout=5)
            except queue.Full:
                log.warning("feed queue stayed full at shutdown; end-of-stream not delivered")

    def _disconnected(self, reason: str, delay: float | None = None) -> float:
        """Announce a lost connection and the wait before the next one; returns when (monotonic)
        that wait ends, counted from now so that closing the socket is part of it."""
        now = time.monotonic()
        self.last_failure = reason
        self._notice("disconnected", reason)
        if self.stopping:
            return now
        if self._first_data is not None and now - self._first_data >= self.options.healthy_after:
            self._attempt = 0
            self._backoff.reset()
        if delay is None:
            delay = self._backoff.next()
        if self._outage_start is None:
            self._outage_start = self._last_data_ms or self._now_ms()
        self._attempt += 1
        self.reconnects += 1
        self.state = "backoff"
        self._notice("reconnecting", f"in {delay:.1f} s (attempt {self._attempt})")
        return now + delay

    def _close(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(websocket.WebSocketException, OSError):
                ws.close(timeout=1)
            ws.shutdown()  # type: ignore[no-untyped-call]

    def _session(self) -> None:
        """One connection from connect to close; returns only when stopping."""
        o = self.options
        self.state = "connecting"
        self._first_data = None
        ws = websocket.WebSocket(enable_multithread=False, skip_utf8_validation=True)
        self._ws = ws
        ws.settimeout(o.connect_timeout)
        ws.connect(self.url)  # type: ignore[no-untyped-call]
        self.connections += 1
        ws.settimeout(o.poll_interval)

        deadline = time.monotonic() + o.handshake_timeout
        first = self._handshake_status(ws, deadline, "the connected message")
        self._notice("connected", first.message or first.status)

        self.state = "authenticating"
        ws.send(msgspec.json.encode({"action": "auth", "params": self._api_key}))
        deadline = time.monotonic() + o.handshake_timeout
        while True:
            reply = self._handshake_status(ws, deadline, "the authentication reply")
            if reply.status == "auth_success" or reply.message == "authenticated":
                break
            if reply.status in ("auth_failed", "error") and "auth" in reply.message.lower():
                raise AuthFailed(
                    "The feed refused the API key (auth_failed): check POLYGON_API_KEY "
                    "and that your plan includes the crypto WebSocket feed."
                )
            if reply.status == "auth_failed":
                raise AuthFailed(f"The feed refused the API key: {reply.message}.")
            self._handle_status(reply)
        self._notice("authenticated")

        self.state = "subscribing"
        self.acked_topics = set()
        for params in chunk_topics(self.topics, o.topics_per_message):
            ws.send(msgspec.json.encode({"action": "subscribe", "params": params}))
        self._notice("subscribed", f"{len(self.topics)} topics")

        self.state = "streaming"
        self.streamed = True
        last_frame = last_ping = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            if now - last_ping >= o.ping_interval:
                ws.ping()
                last_ping = now
            if now - last_frame >= o.silence_timeout:
                raise _Reconnect(f"no data for {o.silence_timeout:g} s")
            try:
                opcode, data = ws.recv_data()
            except (TimeoutError, websocket.WebSocketTimeoutException):
                continue
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise _Reconnect(f"closed by the server{_close_reason(data)}")
            last_frame = time.monotonic()
            received = self._now_ms()
            has_data = True
            if _STATUS_MARK in data:
                has_data = self._scan_statuses(data)
            if has_data:
                # The gap is announced before the data that ends it, so consumers see it first.
                if self._outage_start is not None:
                    self._record_gap(self._outage_start, received)
                    self._outage_start = None
                if self._first_data is None:
                    self._first_data = last_frame
                self._last_data_ms = received
            self._emit(Frame(received, data))

    def _handshake_status(self, ws: websocket.WebSocket, deadline: float, what: str) -> Status:
        while time.monotonic() < deadline:
            if self.stopping:
                raise _Stopped()
            try:
                opcode, data = ws.recv_data()
            except (TimeoutError, websocket.WebSocketTimeoutException):
                continue
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise _Reconnect(
                    f"closed by the server{_close_reason(data)} while waiting for {what}"
                )
            statuses = _statuses(data)
            if statuses:
                for extra in statuses[1:]:
                    self._handle_status(extra)
                return statuses[0]
        raise _Reconnect(f"timed out waiting for {what}")

    def _scan_statuses(self, data: bytes) -> bool:
        """Act on the statuses in a frame; True when it also carries market data."""
        try:
            elements = _element_decoder.decode(data)
        except msgspec.DecodeError:
            return True
        for e in elements:
            if e.ev == "status":
                self._handle_status(Status(e.status, e.message))
        return any(e.ev != "status" for e in elements)

    def _handle_status(self, status: Status) -> None:
        kind, message = status.status, status.message
        if kind == "success" and message.startswith("subscribed to:"):
            self.acked_topics.add(message.partition(":")[2].strip())
        elif kind == "max_connections":
            delay = self._hard_backoff.next()
            raise _Reconnect(
                "max_connections: another client is using this API key; backing off "
                f"{delay:.1f} s so the two do not evict each other",
                delay=delay,
            )
        elif kind in ("slow_consumer", "force_disconnect"):
            self._notice(kind, message)
            raise _Reconnect(f"{kind}: {message}")
        elif kind == "auth_failed":
            raise AuthFailed(f"The feed refused the API key: {message}.")
        elif kind in ("error", "auth_required", "auth_timeout"):
            self._notice("error", f"{kind}: {message}")
        elif kind not in ("success", "connected", "auth_success"):
            self._notice("status", f"{kind}: {message}")

    def _record_gap(self, start: int, end: int) -> None:
        named = [p for p in self.pairs if p != "*"]  # every pair ("*"): no symbol to name
        for pair in named:
            gap = Gap(from_pair(pair), start, end)
            self.gaps.append(gap)
        seconds = (end - start) / 1000
        which = f"{len(named)} symbols" if len(named) == len(self.pairs) else "every symbol"
        self._notice("gap", f"{which} without data for {seconds:.1f} s")


def _statuses(data: bytes) -> list[Status]:
    try:
        elements = _element_decoder.decode(data)
    except msgspec.DecodeError:
        return []
    return [Status(e.status, e.message) for e in elements if e.ev == "status"]


_CLOSE_NAMES = {
    1000: "normal closure",
    1001: "going away",
    1002: "protocol error",
    1003: "unsupported data",
    1007: "invalid payload data",
    1008: "policy violation",
    1009: "message too big",
    1010: "mandatory extension",
    1011: "internal error",
    1012: "service restart",
    1013: "try again later",
    1014: "bad gateway",
}


def _close_reason(payload: bytes) -> str:
    """The code and reason of a close frame's payload (what `recv_data` returns for it), as
    ` (code 1008 policy violation: reason)`."""
    if len(payload) < 2:
        return " without a close code"
    code = int.from_bytes(payload[:2], "big")
    name = _CLOSE_NAMES.get(code)
    # the reason is the server's text: one line, and no longer than a close frame allows
    reason = " ".join(payload[2:125].decode("utf-8", "replace").split())
    return f" (code {code}{' ' + name if name else ''}{': ' + reason if reason else ''})"


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
