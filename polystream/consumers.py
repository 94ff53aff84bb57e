"""`polystream store --from` and `polystream notify --from`: what a run spread over processes
publishes on NATS JetStream (see `wire`), into the database and to Telegram.

Both read through durable consumers, so that a restarted one goes on after the last message it
acknowledged, and acknowledge a message only once what it carried is safe: committed to the
database (`Store.committed`), or in the notifier's outbox. A message delivered again after a
crash stores nothing twice: every table has a natural key, so its rows change nothing.

The market-data stream also holds each batch's clock and the run's description, which the
store does not want, and nats-server 2.9 gives a consumer one filter subject: so the store has
one consumer per partition subject that holds a symbol of the run.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import polars as pl

from . import wire
from .bus import Bus, Message
from .errors import ConfigError
from .events import Book
from .schema import BAR, Alert, Notice
from .sinks import BaseSink, FeedState, Output, StoreSink, TelegramSink, View

if TYPE_CHECKING:
    from .config import Settings

STORE_DURABLE = "polystream-store"
NOTIFY_DURABLE = "polystream-notify"
BARS = "polystream.bar.>"
ALERTS = "polystream.alert.>"
PULL = 256  # messages per pull
ROUNDS = 4  # rounds of messages waiting for their commit before the store pulls more
IDLE = 0.05  # seconds a store's pull waits on a consumer with nothing new
TICK = 0.25  # seconds between looks at the writer's or notifier's health
STORED_STATES = ("final", "revised")  # partial bars are a stopping shard's, never stored
_NO_CLOCK = wire.read_clock(b"")
_UNREADABLE = (msgspec.DecodeError, pl.exceptions.PolarsError, OSError, ValueError, KeyError)

Say = Callable[[Notice], None]


class Feed(NamedTuple):
    """One durable consumer: its stream, its name and its one filter subject."""

    stream: str
    durable: str
    subject: str

    def pull(self, bus: Bus, timeout: float) -> list[Message]:
        return bus.pull(self.stream, self.durable, self.subject, batch=PULL, timeout=timeout)


def store_feeds(run: wire.Run) -> list[Feed]:
    """The store's consumers: the partitions that hold the run's symbols (every partition
    for a run of every symbol), bars and alerts."""
    held = {wire.partition(s, run.partitions) for s in run.symbols}
    parts = sorted(held) if run.symbols else list(range(run.partitions))
    md = [Feed(wire.MD_STREAM, f"{STORE_DURABLE}-md-{p}", wire.md_subject(p)) for p in parts]
    return [
        *md,
        Feed(wire.OUT_STREAM, f"{STORE_DURABLE}-bars", BARS),
        Feed(wire.OUT_STREAM, f"{STORE_DURABLE}-alerts", ALERTS),
    ]


def _view(hurry: bool = False) -> View:
    return View(int(time.time() * 1000), (), (), 0, FeedState(), hurry=hurry)


@contextlib.contextmanager
def _stop_signals(stop: threading.Event) -> Iterator[list[int]]:
    """While inside, the first stop signal sets `stop` (and is put in the list yielded) so
    that the consumer drains; a second one interrupts at once."""
    from .pipeline import STOP_SIGNALS

    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def first(signum: int, frame: object) -> None:
        caught.append(signum)
        stop.set()
        for sig in STOP_SIGNALS:
            signal.signal(sig, again)

    def again(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, first) for sig in STOP_SIGNALS}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Consumer:
    """Pulls and hands over until `stop`, a stop signal or the duration, then closes its sink
    (the worker drains) and acknowledges what is safe. `messages` counts the messages read,
    `signal` is the stop signal, if any."""

    def __init__(self, bus: Bus, sink: BaseSink, say: Say) -> None:
        self.bus = bus
        self.sink = sink
        self.say = say
        self.messages = 0
        self.signal: int | None = None
        self._stop = threading.Event()

    def run(self, duration: float | None = None) -> None:
        stop_at = float("inf") if duration is None else time.monotonic() + duration
        next_tick = 0.0
        hurry = False
        with _stop_signals(self._stop) as caught:
            try:
                while not self._stop.is_set() and time.monotonic() < stop_at:
                    self._step()
                    if time.monotonic() >= next_tick:
                        self._report(self.sink.tick(_view()))
                        next_tick = time.monotonic() + TICK
            except KeyboardInterrupt:  # a second stop signal: what is not done stays on disk
                hurry = True
            finally:
                self._close(hurry)
            self.signal = caught[0] if caught else None

    def _step(self) -> None:
        raise NotImplementedError

    def _close(self, hurry: bool) -> None:
        try:
            notices = self.sink.close(_view(hurry))
        except KeyboardInterrupt:  # a second stop signal: close again, now in a hurry
            notices = self.sink.close(_view(hurry=True))
        self._report(notices)
        self._closed()

    def _closed(self) -> None:
        """After the sink's worker has stopped."""

    def _report(self, notices: Sequence[Notice]) -> None:
        for notice in notices:
            self.say(notice)

    def _records(self, messages: Sequence[Message]) -> Iterator[tuple[Message, Any]]:
        """Each message's JSON record; one that cannot be read is reported and skipped."""
        for message in messages:
            try:
                record = msgspec.json.decode(message.data)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except _UNREADABLE as exc:
                self._rejected(message, exc)
                continue
            yield message, record

    def _rejected(self, message: Message, exc: Exception) -> None:
        detail = f"message {message.seq} on {message.subject} could not be read ({exc}); skipped"
        self.say(Notice("error", int(time.time() * 1000), detail))


class StoreConsumer(_Consumer):
    """Market data, bars and alerts into the database through `StoreSink`, the path `watch
    --store` takes. Messages are acknowledged once the writer has committed the rows of every
    offer made up to their round. While the database is behind, no more than `ROUNDS` rounds
    wait for their commit; while it is away, one: the rest waits in the stream."""

    def __init__(self, bus: Bus, sink: StoreSink, feeds: Sequence[Feed], say: Say) -> None:
        super().__init__(bus, sink, say)
        self.store = sink.store
        self.feeds = tuple(feeds)
        self._waiting: collections.deque[tuple[int, list[Message]]] = collections.deque()

    def _step(self) -> None:
        self._acknowledge()
        if self._waiting and (len(self._waiting) >= ROUNDS or not self.store.stats.connected):
            time.sleep(0.05)
            return
        messages: list[Message] = []
        for feed in self.feeds:
            messages += feed.pull(self.bus, IDLE)
        if messages:
            self.sink.write(self._output(messages))
            self._waiting.append((self.store.offered, messages))
            self.messages += len(messages)

    def _acknowledge(self) -> None:
        """Acknowledge the rounds whose rows are committed, oldest first. Acks go out in order
        on one connection, so one lost with the connection loses the later ones too: what is
        delivered again is a suffix, in order, and a revised bar still lands after its final
        version."""
        committed = self.store.committed
        while self._waiting and self._waiting[0][0] <= committed:
            for message in self._waiting.popleft()[1]:
                message.ack()

    def _closed(self) -> None:
        self._acknowledge()

    def _output(self, messages: Sequence[Message]) -> Output:
        """The rows of a round's messages, as the pipeline would hand them to `StoreSink`."""
        trades: list[pl.DataFrame] = []
        quotes: list[pl.DataFrame] = []
        books: list[tuple[str, Book]] = []
        results: list[Message] = []
        for message in messages:
            if not message.subject.startswith("polystream.md."):
                results.append(message)
                continue
            try:
                batch, _ = wire.join([message.data], _NO_CLOCK, set(), 0)
            except _UNREADABLE as exc:
                self._rejected(message, exc)
                continue
            trades.append(batch.trades)
            quotes.append(batch.quotes)
            books += batch.books
        bars: list[dict[str, Any]] = []
        alerts: list[Alert] = []
        for message, record in self._records(results):
            if message.subject.startswith("polystream.bar."):
                bars.append(record)
                continue
            try:
                alerts.append(msgspec.convert(record, Alert))
            except msgspec.ValidationError as exc:
                self._rejected(message, exc)
        return Output(
            trades=pl.concat(trades) if trades else None,
            quotes=pl.concat(quotes) if quotes else None,
            books=books,
            bars=bar_frame(bars),
            alerts=alerts,
        )


def bar_frame(records: Sequence[dict[str, Any]]) -> pl.DataFrame | None:
    """Bar records as a frame of bar rows, final and revised ones only (as `ResultSink` leaves
    them: indicator columns named with their periods, which the writer maps)."""
    kept = [r for r in records if r.get("state") in STORED_STATES]
    if not kept:
        return None
    columns = dict.fromkeys(c for r in kept for c in r if c != "type")
    return pl.DataFrame(kept, schema={c: BAR.get(c, pl.Float64) for c in columns})


class NotifyConsumer(_Consumer):
    """Alerts to the Telegram notifier through `TelegramSink`, the path `watch --notify` takes.

    A message is acknowledged once its alert is in the notifier's outbox, not once Telegram
    has answered. The outbox is durable (fsynced before `offer` returns) and delivers each of
    its rows once, across restarts, deleting a row only once Telegram accepted it: from then on
    the alert is the notifier's, and the stream's copy is no longer needed. Waiting for
    Telegram instead would hold messages unacknowledged through rate limits, 429 waits and
    digests, for minutes: past the consumer's ack wait, so NATS would deliver them again, and
    each would reach the outbox, and Telegram, twice. A kill between the outbox's commit and
    the acknowledgement delivers the pull again, but the outbox stored the stream position
    with its alerts, in the same transaction, and what it has is skipped: exactly once."""

    def __init__(self, bus: Bus, sink: TelegramSink, say: Say) -> None:
        super().__init__(bus, sink, say)
        self.notifier = sink.notifier
        self.feed = Feed(wire.OUT_STREAM, NOTIFY_DURABLE, ALERTS)

    def _step(self) -> None:
        messages = self.feed.pull(self.bus, 0.5)
        if not messages:
            return
        # What the outbox took before a crash that came before the acknowledgement: the
        # outbox stored the stream position with those alerts, in the same transaction.
        done = self.notifier.mark(NOTIFY_DURABLE) or 0
        fresh = [m for m in messages if m.seq > done]
        alerts: list[Alert] = []
        for message, record in self._records(fresh):
            # The sink sends alerts routed to telegram; a record without a notify list (as
            # shards publish them) is sent.
            record.setdefault("notify", ["telegram"])
            try:
                alerts.append(msgspec.convert(record, Alert))
            except msgspec.ValidationError as exc:
                self._rejected(message, exc)
        if fresh:
            self.notifier.start()  # as TelegramSink does on first use
            self.notifier.offer(
                [a for a in alerts if "telegram" in a.notify],
                mark=(NOTIFY_DURABLE, max(m.seq for m in fresh)),
            )
        for message in messages:
            message.ack()
        self.messages += len(messages)


def _unreachable(store_url: str) -> str | None:
    """Why the database cannot be reached now (the writer then waits for it), or None; a
    database with pending migrations, or one that refuses the login, is refused here."""
    from .store import Unreachable, require_migrated

    try:
        require_migrated(store_url)
    except Unreachable as exc:
        return str(exc).rstrip(".")
    return None


def store_from(
    settings: Settings, url: str, *, duration: float | None = None, say: Say = lambda n: None
) -> StoreConsumer:
    """`polystream store --from URL`: the consumer, after it stopped."""
    from .app import database_url
    from .ingest import prepare_streams
    from .shard import wait_for_run
    from .store import Store

    db_url = database_url(settings)
    down = _unreachable(db_url)
    with Bus(url, name=STORE_DURABLE) as bus:
        run = wait_for_run(bus)
        prepare_streams(bus)
        # A journal of its own: a `watch --store` on the same state directory has one too.
        store = Store(db_url, settings.state_dir / "store-from")
        consumer = StoreConsumer(bus, StoreSink(store, down=down), store_feeds(run), say)
        consumer.run(duration)
        return consumer


def notify_from(
    settings: Settings, url: str, *, duration: float | None = None, say: Say = lambda n: None
) -> NotifyConsumer:
    """`polystream notify --from URL`: the consumer, after it stopped."""
    from .ingest import prepare_streams
    from .notify import TelegramNotifier

    token, chats = settings.telegram_bot_token, settings.telegram_chat_ids
    if not (token and chats):
        raise ConfigError(
            "notify --from needs TELEGRAM_BOT_TOKEN and TELEGRAM_CHAT_ID in the environment or "
            ".env."
        )
    with Bus(url, name=NOTIFY_DURABLE) as bus:
        prepare_streams(bus)
        # An outbox of its own: a `watch --notify` on the same state directory sends from its
        # own, and two senders of one outbox would each send its rows.
        outbox = settings.state_dir / "notify-from"
        notifier = TelegramNotifier(token, chats, outbox, api_url=settings.telegram_api_url)
        consumer = NotifyConsumer(bus, TelegramSink(notifier), say)
        consumer.run(duration)
        return consumer
