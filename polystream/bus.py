"""A blocking client for NATS JetStream (nats-server 2.9 features only): streams, publishing
with deduplicated retries, pull consumers, last-message look-ups and KeyValue buckets.

nats-py is asyncio and polystream's pipeline is threads, so a `Bus` runs the client on one
background thread with its own event loop; every public method blocks the calling thread (any
thread) until the loop answers, and every nats-py failure becomes a one-sentence `BusError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import socket
import threading
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from polystream.config import display_url
from polystream.errors import PolystreamError

T = TypeVar("T")

MSG_ID_HEADER = "Nats-Msg-Id"
# The server's err_code when discard-new-per-subject refuses a message: the subject is full.
_SUBJECT_FULL = 10077
# How long a caller waits past an operation's own timeouts before giving up on the loop.
_GRACE_S = 2.0
_DRAIN_S = 5.0
# Requests to configure a stream before giving up: a server just started, or one whose disk is
# busy, can leave a few unanswered (a test run once saw three in a row).
_ENSURE_TRIES = 5


def _ensure_pause(attempt: int) -> float:
    """Seconds between the stream configuration requests `attempt` and `attempt + 1`."""
    return 0.5 * (attempt + 1)


# Publish requests awaiting their ack at once: enough to fill the pipe, bounded in memory.
_IN_FLIGHT = 512
# Failures after which the same request may succeed: a lost reply, no stream leader yet
# (restart, election), or a connection that is being re-established.
_RETRYABLE: tuple[type[BaseException], ...] = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
)


class BusError(PolystreamError):
    """NATS cannot be reached, did not answer, or refused an operation."""


class Duplicate(BusError):
    """The subject already holds its one message (a stream with `discard_new_per_subject`):
    what is published there is published once, and this copy was not stored."""


class Message(NamedTuple):
    """One stored message. `ack` only schedules the acknowledgement; `ack_sync` waits for the
    server to confirm it, for consumers that acknowledge only after their own commit."""

    subject: str
    data: bytes
    headers: dict[str, str]
    seq: int
    ack: Callable[[], None]
    ack_sync: Callable[[], None]


def _nothing() -> None:
    """The acknowledgement of a message read directly, not through a consumer."""


def _retryable(exc: BaseException) -> bool:
    """Whether the same request may succeed later: JetStream's 503s are passing (no stream
    leader yet) except the one refusing a message to a full subject."""
    if isinstance(exc, nats.js.errors.APIError):
        return exc.code == 503 and exc.err_code != _SUBJECT_FULL
    return isinstance(exc, _RETRYABLE)


def _backoff(attempt: int) -> float:
    return float(min(0.25 * 2**attempt, 2.0))


def _reason(exc: BaseException | None) -> str:
    """Why a connection attempt failed, in a few words."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, TimeoutError | nats.errors.TimeoutError):
        return "no answer"
    if isinstance(exc, nats.errors.AuthorizationError):
        return "the credentials were refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def shown_url(url: str) -> str:
    """A server list safe to print: passwords and tokens never appear."""
    shown = []
    for server in url.split(","):
        server = display_url(server.strip())
        scheme, sep, rest = server.partition("://")
        userinfo, at, hostport = rest.partition("@")
        if sep and at and ":" not in userinfo:  # nats://TOKEN@host
            server = f"{scheme}://…@{hostport}"
        shown.append(server)
    return ",".join(shown)


@dataclass
class _Pull:
    """A pull subscription and where it was, to re-create an ephemeral consumer the server
    dropped (a restart) without replaying what was already delivered."""

    sub: JetStreamContext.PullSubscription
    config: api.ConsumerConfig
    last_seq: int = 0


class Bus:
    """A connection to NATS JetStream. It reconnects by itself after the first connect, which
    must succeed; use it as a context manager or call `close()`."""

    def __init__(
        self,
        url: str,
        *,
        name: str = "polystream",
        connect_timeout: float = 5.0,
        reconnect_wait_s: float = 0.5,
    ) -> None:
        self.url = url
        self.shown = shown_url(url)
        self._timeout = connect_timeout
        self._pulls: dict[tuple[str, str, str], _Pull] = {}
        self._closed = False
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"nats-{name}", daemon=True
        )
        self._thread.start()
        try:
            self._nc = self._call(
                self._connect(name, reconnect_wait_s), connect_timeout + _GRACE_S, "connecting"
            )
        except BaseException:
            self._stop_loop()
            raise
        self._js = self._nc.jetstream(timeout=connect_timeout)

    async def _connect(self, name: str, reconnect_wait_s: float) -> Client:
        """Connect, failing once every server has refused once: nats-py alone would retry the
        first connection for ever."""
        servers = [s.strip() for s in self.url.split(",")]
        failures: list[BaseException] = []
        all_failed = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            if not connecting.done():  # later ones are passing outages nats-py recovers from
                failures.append(exc)
                if len(failures) >= len(servers):
                    all_failed.set()

        options: dict[str, Any] = {
            "name": name,
            "error_cb": on_error,
            "connect_timeout": self._timeout,
            "reconnect_time_wait": reconnect_wait_s,
            "max_reconnect_attempts": -1,
        }
        nc = Client()
        connecting = asyncio.ensure_future(nc.connect(servers, **options))
        failed = asyncio.ensure_future(all_failed.wait())
        await asyncio.wait({connecting, failed}, return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        if connecting.done():
            if connecting.exception() is None:
                return nc
            failures.append(connecting.exception())  # type: ignore[arg-type]
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        with contextlib.suppress(Exception):
            await nc.close()
        last = failures[-1] if failures else None
        raise BusError(f"NATS at {self.shown} cannot be reached: {_reason(last)}.")

    # -- running coroutines on the loop ------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], budget: float, doing: str) -> T:
        """Run `coro` on the loop and wait for it; its nats-py errors become `BusError`s."""
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:
            coro.close()
            raise BusError(f"the connection to NATS at {self.shown} is closed.") from None
        try:
            return future.result(budget)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise BusError(f"NATS at {self.shown} did not answer {doing} in time.") from None
        except BusError:
            raise
        except (nats.errors.Error, OSError, TimeoutError, ValueError) as exc:
            raise self._error(exc, doing) from None

    def _error(self, exc: BaseException, doing: str) -> BusError:
        where = f"NATS at {self.shown}"
        if isinstance(exc, TimeoutError | nats.errors.TimeoutError):
            return BusError(f"{where} did not answer {doing} in time.")
        if isinstance(
            exc,
            nats.js.errors.NoStreamResponseError
            | nats.errors.NoRespondersError
            | nats.js.errors.ServiceUnavailableError,
        ) and not getattr(exc, "description", None):
            return BusError(
                f"{where} has no JetStream stream answering {doing}: create the stream, "
                "and start the server with -js."
            )
        if isinstance(exc, nats.js.errors.APIError):
            return BusError(f"{where} refused {doing}: {exc.description or exc.code}.")
        if isinstance(exc, nats.errors.ConnectionClosedError):
            return BusError(f"the connection to {where} is closed.")
        return BusError(f"{where} failed {doing}: {_reason(exc)}.")

    # -- streams and publishing -------------------------------------------------------------

    def ensure_stream(
        self,
        name: str,
        subjects: list[str],
        *,
        max_age_s: float | None = None,
        duplicate_window_s: float = 120.0,
        max_msgs_per_subject: int = -1,
        discard_new_per_subject: bool = False,
        storage: str = "file",
        replicas: int = 1,
    ) -> None:
        """Create the stream, or update it to this configuration. `discard_new_per_subject`
        with `max_msgs_per_subject=1` makes each subject take one message: a second one raises
        `Duplicate`."""
        if max_age_s:  # the server refuses a duplicate window longer than the stream's memory
            duplicate_window_s = min(duplicate_window_s, max_age_s)
        config = api.StreamConfig(
            name=name,
            subjects=subjects,
            max_age=max_age_s,
            duplicate_window=duplicate_window_s,
            max_msgs_per_subject=max_msgs_per_subject,
            discard=api.DiscardPolicy.NEW if discard_new_per_subject else api.DiscardPolicy.OLD,
            discard_new_per_subject=discard_new_per_subject,
            storage=api.StorageType(storage),
            num_replicas=replicas,
        )
        doing = f"the configuration of stream {name}"
        pauses = sum(_ensure_pause(a) for a in range(_ENSURE_TRIES - 1))
        budget = self._timeout * 2 * _ENSURE_TRIES + pauses + _GRACE_S
        self._call(self._ensure_stream(config), budget, doing)

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        assert config.name is not None
        for attempt in range(_ENSURE_TRIES):
            # A server that has just started, or is busy, may let one request go unanswered.
            try:
                try:
                    await self._js.stream_info(config.name)
                except nats.js.errors.NotFoundError:
                    await self._js.add_stream(config)
                else:
                    await self._js.update_stream(config)
                return
            except _RETRYABLE:
                if attempt == _ENSURE_TRIES - 1:
                    raise
                await asyncio.sleep(_ensure_pause(attempt))

    def publish(
        self,
        subject: str,
        data: bytes,
        *,
        headers: dict[str, str] | None = None,
        msg_id: str | None = None,
        timeout: float = 5.0,
        retries: int = 5,
    ) -> int:
        """Store one message and return its stream sequence. Every attempt carries the same
        Nats-Msg-Id (`msg_id`, or a fresh one), so a retry after a lost ack is not stored twice
        within the stream's duplicate window."""
        item = (subject, data, headers, msg_id)
        return self.publish_many([item], timeout=timeout, retries=retries)[0]

    def publish_many(
        self,
        items: list[tuple[str, bytes, dict[str, str] | None, str | None]],
        *,
        timeout: float = 5.0,
        retries: int = 5,
    ) -> list[int]:
        """Store `(subject, data, headers, msg_id)` items, pipelined (all sent, then all acks
        awaited), and return their stream sequences in order. Failed items are retried as
        `publish` does. `Duplicate` is raised after the others are stored when a subject
        already held its one message."""
        if not items:
            return []
        prepared = [
            (subject, data, {**(headers or {}), MSG_ID_HEADER: msg_id or uuid.uuid4().hex})
            for subject, data, headers, msg_id in items
        ]
        budget = sum(timeout + _backoff(a) for a in range(retries + 1)) + _GRACE_S
        doing = f"publishing to {items[0][0]}"
        return self._call(self._publish_many(prepared, timeout, retries), budget, doing)

    async def _publish_many(
        self, items: list[tuple[str, bytes, dict[str, str]]], timeout: float, retries: int
    ) -> list[int]:
        seqs: dict[int, int] = {}
        full: list[str] = []
        todo = list(range(len(items)))
        last: BaseException | None = None
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(_backoff(attempt - 1))
            failed, error = await self._publish_round(items, todo, timeout, seqs, full)
            last = error or last
            if not failed:
                break
            todo = failed
        else:
            raise self._error(last or TimeoutError(), f"publishing to {items[todo[0]][0]}")
        if full:
            raise Duplicate(
                f"NATS at {self.shown} already holds the message on {full[0]}"
                + (f" (and {len(full) - 1} more subjects)" if len(full) > 1 else "")
                + ", so it was not stored again."
            )
        return [seqs[i] for i in range(len(items))]

    async def _publish_round(
        self,
        items: list[tuple[str, bytes, dict[str, str]]],
        todo: list[int],
        timeout: float,
        seqs: dict[int, int],
        full: list[str],
    ) -> tuple[list[int], BaseException | None]:
        """Send the `todo` items, await their acks; return those to retry and the last error.

        Concurrent requests rather than nats-py's `publish_async`, whose futures never resolve
        when the server answers with an error (they would only time out)."""
        window = asyncio.Semaphore(_IN_FLIGHT)

        async def one(i: int) -> int:
            subject, data, headers = items[i]
            async with window:
                ack = await self._js.publish(subject, data, timeout=timeout, headers=headers)
            return ack.seq

        results = await asyncio.gather(*(one(i) for i in todo), return_exceptions=True)
        failed: list[int] = []
        error: BaseException | None = None
        for i, result in zip(todo, results, strict=True):
            if isinstance(result, int):
                seqs[i] = result
            elif _retryable(result):
                failed.append(i)
                error = result
            elif isinstance(result, nats.js.errors.APIError) and result.err_code == _SUBJECT_FULL:
                full.append(items[i][0])
                seqs[i] = 0
            else:
                raise result
        return failed, error

    # -- reading ----------------------------------------------------------------------------

    def pull(
        self,
        stream: str,
        durable: str | None,
        subject: str,
        *,
        batch: int = 100,
        timeout: float = 1.0,
        deliver_from_seq: int | None = None,
        ack_wait_s: float = 30.0,
    ) -> list[Message]:
        """Up to `batch` messages on `subject` (one filter subject) from a pull consumer:
        durable when named (created if missing; an existing one keeps its own position and
        settings), ephemeral otherwise. Returns [] when none came within `timeout`, or while the
        server cannot answer (a reconnect, a leader election: pulling again waits it out). Each
        message is redelivered after `ack_wait_s` unless acknowledged."""
        config = api.ConsumerConfig(
            durable_name=durable,
            filter_subject=subject,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            deliver_policy=(
                api.DeliverPolicy.BY_START_SEQUENCE if deliver_from_seq else api.DeliverPolicy.ALL
            ),
            opt_start_seq=deliver_from_seq,
            # An ephemeral consumer outlives pauses between pulls (the server's default is 5 s),
            # and has one replica: created at once even while a cluster peer is down (a replicated
            # one waits for its own leader election), and re-created here should its server die.
            inactive_threshold=None if durable else max(60.0, 2 * ack_wait_s),
            num_replicas=None if durable else 1,
        )
        doing = f"pulling {subject} from stream {stream}"
        coro = self._pull(stream, (stream, durable or "", subject), config, batch, timeout)
        return self._call(coro, timeout + self._timeout * 2 + _GRACE_S, doing)

    async def _pull(
        self,
        stream: str,
        key: tuple[str, str, str],
        config: api.ConsumerConfig,
        batch: int,
        timeout: float,
    ) -> list[Message]:
        pull = self._pulls.get(key)
        if pull is None:
            try:
                pull = self._pulls[key] = await self._subscribe(stream, config)
            except _RETRYABLE:  # no answer yet (reconnecting, electing a leader): nothing yet
                return []
        try:
            msgs = await pull.sub.fetch(batch, timeout=timeout)
        except _RETRYABLE:
            return []
        except (nats.js.errors.ServiceUnavailableError, nats.js.errors.NotFoundError):
            # The consumer is gone (a server restart drops ephemeral ones): the next pull
            # re-creates it after what was delivered.
            del self._pulls[key]
            with contextlib.suppress(Exception):
                await pull.sub.unsubscribe()
            if pull.last_seq and not config.durable_name:
                config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
                config.opt_start_seq = pull.last_seq + 1
            return []
        messages = [self._message(m, m.metadata.sequence.stream) for m in msgs]
        pull.last_seq = max([pull.last_seq, *(m.seq for m in messages)])
        return messages

    async def _subscribe(self, stream: str, config: api.ConsumerConfig) -> _Pull:
        assert config.filter_subject is not None
        sub = await self._js.pull_subscribe(
            config.filter_subject, durable=config.durable_name, stream=stream, config=config
        )
        return _Pull(sub, config)

    def _message(self, msg: Msg, seq: int) -> Message:
        def ack() -> None:
            if not self._closed:  # after close the server redelivers it
                asyncio.run_coroutine_threadsafe(msg.ack(), self._loop)

        def ack_sync() -> None:
            self._call(msg.ack_sync(self._timeout), self._timeout + _GRACE_S, f"the ack of {seq}")

        headers = {str(k): str(v) for k, v in (msg.headers or {}).items()}
        return Message(msg.subject, msg.data or b"", headers, seq, ack, ack_sync)

    def reader(self, stream: str, subject: str) -> Reader:
        """Every message on `subject` from the stream's start, in order, pushed as it is stored
        (an ordered consumer: no acknowledgements, no request per batch, re-created by the
        client after a lost connection where it was): for reading a stream as it is written."""
        doing = f"reading {subject} from stream {stream}"
        reader = Reader(self)

        async def subscribe() -> None:
            async def arrived(msg: Msg) -> None:
                message = self._message(msg, msg.metadata.sequence.stream)
                # A full queue holds this subscription's deliveries back (the server's flow
                # control then pauses it) without holding up the rest of the loop.
                while not self._closed:
                    try:
                        reader.queue.put_nowait(message)
                        return
                    except queue.Full:
                        await asyncio.sleep(0.005)

            await self._js.subscribe(
                subject,
                stream=stream,
                cb=arrived,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.ALL,
                pending_msgs_limit=-1,
                pending_bytes_limit=-1,
            )

        self._call(subscribe(), self._timeout + _GRACE_S, doing)
        return reader

    def last(self, stream: str, subject: str) -> Message | None:
        """The last message stored on `subject` (no wildcards), or None: where to resume a
        sequence after a restart."""
        doing = f"reading the last message on {subject} in stream {stream}"
        return self._call(self._last(stream, subject), self._timeout + _GRACE_S, doing)

    async def _last(self, stream: str, subject: str) -> Message | None:
        try:
            raw = await self._js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code in (None, 10037):  # 10037: no message found, as opposed to no stream
                return None
            raise
        headers = {str(k): str(v) for k, v in (raw.headers or {}).items()}
        return Message(
            raw.subject or subject, raw.data or b"", headers, raw.seq or 0, _nothing, _nothing
        )

    def kv(self, bucket: str) -> KV:
        """The KeyValue bucket `bucket` (letters, digits, - and _), created if missing."""
        doing = f"opening KeyValue bucket {bucket}"
        return KV(self, bucket, self._call(self._kv(bucket), self._timeout * 2 + _GRACE_S, doing))

    async def _kv(self, bucket: str) -> KeyValue:
        try:
            return await self._js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            return await self._js.create_key_value(bucket=bucket)

    def delete_stream(self, name: str) -> None:
        """Delete a stream and everything in it; one that does not exist is already deleted."""
        self._call(self._delete_stream(name), self._timeout + _GRACE_S, f"deleting stream {name}")

    async def _delete_stream(self, name: str) -> None:
        for key in [k for k in self._pulls if k[0] == name]:
            with contextlib.suppress(Exception):
                await self._pulls.pop(key).sub.unsubscribe()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._js.delete_stream(name)

    def delete_consumer(self, stream: str, durable: str) -> None:
        """Delete a durable consumer; one that does not exist is already deleted."""
        doing = f"deleting consumer {durable} of stream {stream}"
        self._call(self._delete_consumer(stream, durable), self._timeout + _GRACE_S, doing)

    async def _delete_consumer(self, stream: str, durable: str) -> None:
        for key in [k for k in self._pulls if k[:2] == (stream, durable)]:
            with contextlib.suppress(Exception):
                await self._pulls.pop(key).sub.unsubscribe()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._js.delete_consumer(stream, durable)

    # -- lifetime ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the connection is up now (it reconnects by itself when it is not)."""
        return bool(self._nc.is_connected)

    def close(self) -> None:
        """Deliver what is buffered, close the connection and stop the loop thread; closing
        twice is fine."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(BusError):
            self._call(self._drain(), _DRAIN_S + _GRACE_S, "closing")
        self._stop_loop()

    async def _drain(self) -> None:
        """Flush what is buffered (acks, publishes) and close. Not nats-py's `drain`, which
        waits out its whole timeout on a pull subscription holding a stray status message."""
        for pull in self._pulls.values():
            with contextlib.suppress(Exception):
                await pull.sub.unsubscribe()
        self._pulls.clear()
        if self._nc.is_connected:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._nc.flush(int(_DRAIN_S))
        await self._nc.close()

    def _stop_loop(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_the_rest(), self._loop).result(_GRACE_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_GRACE_S)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Bus:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Reader:
    """What `Bus.reader` delivers, for a thread to take: `take` waits for the first message,
    then takes every other one already there."""

    def __init__(self, bus: Bus, size: int = 4_096) -> None:
        self.bus = bus
        self.queue: queue.Queue[Message] = queue.Queue(size)

    def take(self, timeout: float) -> list[Message]:
        try:
            found = [self.queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        with contextlib.suppress(queue.Empty):
            while True:
                found.append(self.queue.get_nowait())
        return found


class KV:
    """A KeyValue bucket on the bus: blocking `get` and `put`."""

    def __init__(self, bus: Bus, bucket: str, kv: KeyValue) -> None:
        self._bus = bus
        self._kv = kv
        self.bucket = bucket

    def get(self, key: str) -> bytes | None:
        """The key's value, or None when it has none (never set, or deleted)."""
        doing = f"reading {key} in KeyValue bucket {self.bucket}"
        return self._bus._call(self._get(key), self._bus._timeout + _GRACE_S, doing)

    async def _get(self, key: str) -> bytes | None:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value or b""

    def put(self, key: str, value: bytes) -> int:
        """Set the key's value; returns its revision (the bucket stream's sequence)."""
        doing = f"writing {key} in KeyValue bucket {self.bucket}"
        return self._bus._call(self._kv.put(key, value), self._bus._timeout + _GRACE_S, doing)
