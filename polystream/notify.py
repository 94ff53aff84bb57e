"""Alerts → Telegram: `offer` (pipeline thread) stores one outbox row per (chat, alert); the
worker `polystream-telegram` sends them, deleting a row only once Telegram accepted it.

The outbox is a SQLite file in the state directory, so what is undelivered at `stop` goes out
with the next run, once per chat. Sending keeps within Telegram's rate limits; a backlog for one
chat is coalesced into a digest, sent in parts of at most `PART_ALERTS` alerts; texts over 4096
characters are split at line boundaries. One request is in flight at a time and each accepted
part (a photo is one) is recorded before the next is sent, so a crash can deliver at most one
part twice; a clean stop none (only a request answered after its timeout is sent again).
Refusals (bad token, blocked bot, unknown chat) are reported once each in `problems`, naming the
chat entry as written. The bot token never appears in a log line, an error or a repr.

A chat entry `CHAT:THREAD` is a forum topic: its messages carry `message_thread_id`, and it is
paced as part of its chat. An alert whose filter asks for `attach: chart` is stored with its bars
and sent on its own (never in a digest) as a photo drawn on the worker thread, captioned with its
text; a text too long for a caption (1024 characters) gets its first line as the caption and
follows the photo in full as messages. If the chart cannot be drawn, the text goes out with a
line saying why.
"""

from __future__ import annotations

import collections
import hashlib
import html
import io
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import msgspec
import polars as pl
import requests

from .config import DEFAULT_TELEGRAM_API_URL, RedactingFilter, Redactor
from .errors import PolystreamError
from .schema import Alert
from .worker import Backoff, Worker

log = logging.getLogger(__name__)

MAX_TEXT = 4096
MAX_CAPTION = 1024
# A chart sent with an alert: readable on a phone, a few hundred kilobytes at most.
CHART_SIZE = (960, 640)
OUTBOX_FILE = "telegram-outbox.sqlite3"
# One digest covers at most this many alerts, sent PART_ALERTS to a message.
DIGEST_MAX = 100
# One message carries at most this many alerts. What a crash, or an answer that never came, can
# deliver twice is one message, so it is kept small: ten lines fit one phone screen, and at one
# message a second per chat a backlog still moves at 10 alerts a second (200 a minute in a group).
PART_ALERTS = 10
# urllib3 logs request lines (which carry the token in the path) at DEBUG from these loggers.
_URLLIB3_LOGGERS = ("urllib3.connectionpool", "urllib3.util.retry")
# 2: a digest's parts hold at most PART_ALERTS alerts (1 cut it only at MAX_TEXT).
# 3: a row may hold the bars of its chart (Arrow IPC), in the nullable column `bars`.
_SCHEMA_VERSION = 3
_DRAWN_KEPT = 8
_ATOM = re.compile(r"<[^<>]*>|&(?:#\d+|#[xX][0-9a-fA-F]+|\w+);|.", re.S)
_LINE = re.compile(r"[^\n]*\n|[^\n]+")


class NotifyError(PolystreamError):
    """The Telegram notifier cannot be set up or cannot keep its outbox."""


class NotifyStats(msgspec.Struct):
    """Counters of one notifier: `sent` messages Telegram accepted (each part of a split text
    counts), `retried` requests repeated after a 429, 5xx or network error, `pending` (chat,
    alert) rows in the outbox, `failed` (chat, alert) pairs given up on after a refusal, and
    `digests` digest messages completed, `throttled` 429 answers (each also counts as retried)."""

    sent: int = 0
    retried: int = 0
    pending: int = 0
    failed: int = 0
    digests: int = 0
    throttled: int = 0


def escape(text: str) -> str:
    """User text made safe for Telegram's HTML parse mode."""
    return html.escape(text, quote=False)


def _where(alert: Alert) -> str:
    where = f"{escape(alert.filter)} · {escape(alert.symbol)}"
    return f"{where} {escape(alert.timeframe)}" if alert.timeframe else where


def format_alert(alert: Alert) -> str:
    """The HTML text of one alert: a bold severity, where it fired, then the message."""
    return f"<b>{escape(alert.severity.upper())}</b> {_where(alert)}\n{escape(alert.message)}"


def format_digest(alerts: Sequence[Alert]) -> str:
    """The HTML text of several alerts in one message: a count, then one line per alert."""
    lines = [f"<b>{len(alerts)} alerts</b>"]
    for a in alerts:
        message = " ".join(escape(a.message).splitlines())
        lines.append(f"<b>{escape(a.severity.upper())}</b> {_where(a)}: {message}")
    return "\n".join(lines)


def split_digest(
    alerts: Sequence[Alert], per_part: int = PART_ALERTS, limit: int = MAX_TEXT
) -> list[str]:
    """`format_digest(alerts)` cut into parts that hold at most `per_part` alerts (the first one
    also the count) and `limit` characters; their concatenation is the digest's text."""
    lines = _LINE.findall(format_digest(alerts))  # one alert at most per line
    first = 1 + per_part
    chunks = [lines[:first]] + [lines[i : i + per_part] for i in range(first, len(lines), per_part)]
    return [part for chunk in chunks for part in split_message("".join(chunk), limit)]


def message_parts(alerts: Sequence[Alert], digest: bool) -> list[str]:
    """The messages that deliver `alerts`: one alert's text, or a digest, in parts."""
    parts = split_digest(alerts) if digest else split_message(format_alert(alerts[0]))
    return [p for p in parts if p.strip()]


def photo_parts(alert: Alert, limit: int = MAX_CAPTION) -> list[str]:
    """The caption of an alert's chart, then the messages that follow the photo: the alert's
    text when it fits a caption; else its first line (severity, filter, symbol), with the whole
    text following in messages."""
    text = format_alert(alert)
    if _units(text) <= limit:
        return [text]
    header = text.split("\n", 1)[0]
    if _units(header) > limit:
        header = split_message(header, limit)[0]
    return [header, *message_parts([alert], False)]


def chartless_parts(alert: Alert, reason: str) -> list[str]:
    """The messages of an alert whose chart cannot be drawn: its text and a line saying why."""
    reason = reason or "It could not be drawn."
    why = reason[0].lower() + reason[1:] if reason[1:2].islower() else reason
    text = f"{format_alert(alert)}\n<i>No chart: {escape(why)}</i>"
    return [p for p in split_message(text) if p.strip()]


def split_entry(entry: str) -> tuple[str, int | None]:
    """A TELEGRAM_CHAT_ID entry as (chat, topic): `-100123:45` is topic 45 of chat -100123."""
    chat, colon, thread = entry.partition(":")
    if colon and thread.isdigit() and int(thread) > 0:
        return chat, int(thread)
    return entry, None


def _units(text: str) -> int:
    """Length as Telegram counts it (UTF-16 code units), never less than `len(text)`."""
    return len(text.encode("utf-16-le")) // 2


def split_message(text: str, limit: int = MAX_TEXT) -> list[str]:
    """Cut `text` into parts of at most `limit` characters whose concatenation is `text`.

    Parts end at line ends where possible; a longer line is cut after a space (else anywhere),
    never inside an HTML tag or entity, and between an opening and its closing tag only when
    no other place is left.
    """
    if _units(text) <= limit:
        return [text]
    parts: list[str] = []
    current: list[str] = []
    size = 0
    for line in _LINE.findall(text):
        n = _units(line)
        if size + n <= limit:
            current.append(line)
            size += n
            continue
        if current:
            parts.append("".join(current))
        current, size = [], 0
        pieces = [line] if n <= limit else _split_line(line, limit)
        parts.extend(pieces[:-1])
        current, size = [pieces[-1]], _units(pieces[-1])
    if current:
        parts.append("".join(current))
    return parts


def _split_line(line: str, limit: int) -> list[str]:
    atoms = _ATOM.findall(line)
    depths: list[int] = []  # tag nesting after each atom
    depth = 0
    for atom in atoms:
        if atom.startswith("</"):
            depth -= 1
        elif atom.startswith("<") and len(atom) > 1 and not atom.endswith("/>"):
            depth += 1
        depths.append(depth)
    pieces: list[str] = []
    start = size = 0
    for i, atom in enumerate(atoms):
        n = _units(atom)
        while size + n > limit and i > start:
            cut = _cut(atoms, depths, start, i)
            pieces.append("".join(atoms[start:cut]))
            size = sum(_units(a) for a in atoms[cut:i])
            start = cut
        size += n
    pieces.append("".join(atoms[start:]))
    return pieces


def _cut(atoms: list[str], depths: list[int], start: int, end: int) -> int:
    """Where to end the piece `atoms[start:end]`: after a space in its second half if there is
    one, else after the last atom outside any tag pair, else at `end`."""
    outside: int | None = None
    for c in range(end, start, -1):
        if depths[c - 1] > 0:
            continue
        if atoms[c - 1].isspace() and c - start > (end - start) // 2:
            return c
        if outside is None:
            outside = c
    return end if outside is None else outside


@dataclass
class _Job:
    """The message being sent to one chat entry: the outbox rows it stands for and its parts;
    with a `photo`, the first part is that photo's caption."""

    chat: str
    ids: list[int]
    parts: list[str]
    sent: int
    digest: bool
    photo: bytes | None = None


class TelegramNotifier(Worker[Sequence[Alert]]):
    """Sends alerts to every chat in `chat_ids` (`CHAT` or `CHAT:THREAD` for a forum topic)
    through the Bot API at `api_url`.

    Its inbox is the outbox in `state_dir`, not memory: `offer` stores each alert there before it
    returns, so it never blocks on the network and never drops, however much is pending. `stop`
    delivers what is pending until the outbox is empty or the timeout passes; what is left is
    delivered by the next notifier on the same `state_dir`. A request is never cut short: one
    that times out may have been delivered, and is sent again.
    """

    def __init__(
        self,
        token: str,
        chat_ids: Iterable[str],
        state_dir: Path | str,
        *,
        api_url: str = DEFAULT_TELEGRAM_API_URL,
        per_chat_interval: float = 1.0,
        group_interval: float = 3.0,
        global_per_second: int = 30,
        digest_after: int = 5,
        timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        super().__init__("polystream-telegram")
        if not token:
            raise NotifyError("No Telegram bot token is set: set TELEGRAM_BOT_TOKEN.")
        if isinstance(chat_ids, str):
            chat_ids = chat_ids.split(",")
        self.chat_ids = tuple(dict.fromkeys(c.strip() for c in chat_ids if c.strip()))
        if not self.chat_ids:
            raise NotifyError("No Telegram chat to send alerts to: set TELEGRAM_CHAT_ID.")
        for entry in self.chat_ids:
            chat, colon, _ = entry.partition(":")
            if colon and (not chat or split_entry(entry)[1] is None):
                raise NotifyError(
                    f"The Telegram chat {entry!r} is not a chat id or CHAT:THREAD with a "
                    "positive thread number: correct TELEGRAM_CHAT_ID."
                )
        self.api_url = api_url.rstrip("/")
        self.per_chat_interval = per_chat_interval
        self.group_interval = group_interval
        self.global_per_second = max(1, global_per_second)
        self.digest_after = digest_after
        self.timeout = timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.problems: list[str] = []

        self._url = f"{self.api_url}/bot{token}/sendMessage"
        self._photo_url = f"{self.api_url}/bot{token}/sendPhoto"
        self._redact = Redactor([token, quote(token, safe="")])
        self._log_filter = RedactingFilter(self._redact)
        self._stats = NotifyStats()
        self._reported: set[tuple[str, str]] = set()
        self._dead: set[str] = set()  # chats that refused the bot: nothing more goes to them
        self._halted = False  # the token was refused: nothing more goes anywhere
        self._jobs: dict[str, _Job] = {}
        self._chat_next: dict[str, float] = {}  # by chat: its topics share Telegram's limits
        self._chart_warned: set[str] = set()
        # the last charts drawn: every chat entry gets the same picture, drawn once
        self._drawn: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._window: collections.deque[float] = collections.deque()
        self._hold_until = 0.0
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._failing = False
        self._latency = 0.0  # seconds the last request took
        self._out_of_time = False  # stopping: no request could be answered before the deadline

        self._lock = threading.Lock()
        self._abort = False
        self._session = requests.Session()
        self._closed = False

        self.path = Path(state_dir) / OUTBOX_FILE
        self._db = self._open(self.path)
        self._stats.pending = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def __repr__(self) -> str:
        return self._redact(
            f"TelegramNotifier(chats={list(self.chat_ids)!r}, api_url={self.api_url!r}, "
            f"outbox={str(self.path)!r}, pending={self._stats.pending})"
        )

    # -- the outbox ----------------------------------------------------------------------------

    def _open(self, path: Path) -> sqlite3.Connection:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # The worker and the pipeline thread share it, always under `_lock`.
            db = sqlite3.connect(path, timeout=10.0, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: an offered alert must survive a power cut, not only a crash of the process.
            db.execute("PRAGMA synchronous=FULL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise NotifyError(
                    f"The Telegram outbox {path} was written by a newer polystream: "
                    "upgrade polystream or move the file away."
                )
            db.executescript(
                """
                CREATE TABLE IF NOT EXISTS outbox (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    chat TEXT NOT NULL,
                    alert BLOB NOT NULL,
                    digest INTEGER,
                    parts_sent INTEGER NOT NULL DEFAULT 0,
                    bars BLOB
                );
                CREATE INDEX IF NOT EXISTS outbox_chat ON outbox (chat, id);
                CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
                """
            )
            if version < _SCHEMA_VERSION:
                db.execute("BEGIN IMMEDIATE")
                try:
                    if version == 1:
                        _recount_digest_parts(db)
                    columns = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
                    if "bars" not in columns:
                        db.execute("ALTER TABLE outbox ADD COLUMN bars BLOB")
                    db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except (OSError, sqlite3.Error, msgspec.DecodeError) as exc:
            raise NotifyError(
                f"Cannot open the Telegram outbox {path} ({exc}): "
                "check that POLYSTREAM_STATE_DIR is a writable directory."
            ) from None
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- the interface -------------------------------------------------------------------------

    @property
    def stats(self) -> NotifyStats:
        """A snapshot of the counters."""
        return msgspec.structs.replace(self._stats)

    @property
    def halted(self) -> bool:
        """Telegram refused the bot token: nothing more is sent anywhere."""
        return self._halted

    def counters(self) -> dict[str, int]:
        """The counters shown beside the pipeline's own."""
        s = self._stats
        shown = {"telegram sent": s.sent, "retried": s.retried, "pending": s.pending}
        if s.failed:
            shown["telegram failed"] = s.failed
        return shown

    def start(self) -> Self:
        # Adding the filter again is a no-op; once stopped, no thread is started that needs it.
        if not self._closed:
            for name in _URLLIB3_LOGGERS:
                logging.getLogger(name).addFilter(self._log_filter)
        return super().start()

    def mark(self, name: str) -> int | None:
        """The value last stored with `offer(…, mark=(name, value))`, or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM marks WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row[0])

    def offer(
        self,
        alerts: Sequence[Alert],
        *,
        mark: tuple[str, int] | None = None,
        charts: Sequence[pl.DataFrame | None] | None = None,
    ) -> None:
        """Store `alerts` for every chat (durably, before returning) and wake the worker;
        `mark` (a name and a number, such as a stream position) is stored in the same
        transaction, so that a consumer knows exactly what the outbox has, even after a crash.

        `charts`, parallel to `alerts`, holds the bars (bar records with indicator columns) to
        draw for each alert whose `attach` is "chart"; they are stored with it and drawn only
        when it is sent, keeping the rows of the alert's symbol and timeframe. Bars given for
        other alerts are ignored."""
        if not alerts and mark is None:
            return
        if charts is not None and len(charts) != len(alerts):
            raise ValueError(f"{len(charts)} charts were offered for {len(alerts)} alerts.")
        encoded = [
            (
                msgspec.json.encode(a),
                _encode_bars(charts[i]) if charts is not None and a.attach == "chart" else None,
            )
            for i, a in enumerate(alerts)
        ]
        with self._lock:
            if self._closed:
                raise NotifyError(
                    "Alerts were offered to the Telegram notifier after it stopped; "
                    "they are not stored."
                )
            live = [c for c in self.chat_ids if c not in self._dead]
            rows = [(chat, data, bars) for chat in live for data, bars in encoded]
            try:
                with self._transaction() as db:
                    db.executemany("INSERT INTO outbox (chat, alert, bars) VALUES (?, ?, ?)", rows)
                    if mark is not None:
                        db.execute("INSERT OR REPLACE INTO marks VALUES (?, ?)", mark)
            except sqlite3.Error as exc:
                raise NotifyError(
                    f"Cannot store alerts in the Telegram outbox {self.path} ({exc}): "
                    "check the free space and permissions of POLYSTREAM_STATE_DIR."
                ) from None
            self._stats.pending += len(rows)
            # A chat that refused the bot was reported once; its alerts count as failed.
            self._stats.failed += len(encoded) * (len(self.chat_ids) - len(live))
        self.wake()

    def stop(self, timeout: float | None = 10.0, *, in_flight: float | None = None) -> None:
        """Deliver what is pending for up to `timeout` seconds, then stop the worker; whatever is
        undelivered stays in the outbox. None: deliver everything, without waiting here (the
        outbox stays open).

        A request is started only while the last one's round trip fits in the time left, and one
        in flight at the deadline is given its full request timeout: Telegram may accept it to
        the last moment, and a row kept for a resend would then be delivered twice. So this can
        take up to `timeout` plus the request timeout (twice that if connecting is slow too),
        unless `in_flight` gives a shorter wait for that request (it may then be sent again)."""
        super().stop(None if timeout is None else max(0.0, timeout))
        if timeout is None and self.alive:
            return
        if self.alive:
            self._abort = True
            self.wake()
            # connecting and reading each have `timeout`
            self.join(2 * self.timeout + 1.0 if in_flight is None else in_flight)
        if self.alive:
            # Its request may still be logged by urllib3: the token filter stays on.
            log.warning("The Telegram notifier did not stop in time; its outbox stays open.")
            return
        for name in _URLLIB3_LOGGERS:
            logging.getLogger(name).removeFilter(self._log_filter)
        with self._lock:
            if not self._closed:
                self._closed = True
                self._session.close()
                self._db.close()

    # -- the worker ----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._done():
                delay = self._step()
                if self.stopping:
                    left = self.left()
                    if left <= 0:
                        break
                    delay = left if delay is None else min(delay, left)
                if delay is None or delay > 0:
                    self.pause(delay)
        except Exception as exc:
            sentence = self._redact(
                f"The Telegram notifier stopped after an unexpected error "
                f"({type(exc).__name__}: {exc}); undelivered alerts stay in the outbox."
            )
            self._problem(("worker", ""), sentence)
            self.fatal = NotifyError(sentence)

    def _done(self) -> bool:
        if self._abort or self._out_of_time:
            return True
        return self.stopping and (self._halted or self._stats.pending == 0)

    def _step(self) -> float | None:
        """Send the next part that is due; return how long to wait before trying again
        (`None`: until woken)."""
        if self._halted:
            return None
        with self._lock:
            heads = dict(
                self._db.execute("SELECT chat, MIN(id) FROM outbox GROUP BY chat").fetchall()
            )
        for chat in self._dead.intersection(heads):
            self._drop(chat)
            del heads[chat]
        if not heads:
            return None
        now = time.monotonic()
        while self._window and self._window[0] <= now - 1.0:
            self._window.popleft()
        ready = self._hold_until
        if len(self._window) >= self.global_per_second:
            ready = max(ready, self._window[0] + 1.0)
        nxt = self._chat_next
        chat = min(heads, key=lambda c: (max(nxt.get(split_entry(c)[0], 0.0), ready), heads[c]))
        due = max(nxt.get(split_entry(chat)[0], 0.0), ready)
        if self.stopping and max(due, now) + self._latency >= self.deadline:
            # Once started, a request is waited for to its full timeout (see `stop`).
            self._out_of_time = True
            return None
        if due > now:
            return due - now
        self._send(self._job(chat))
        return 0.0

    def _job(self, chat: str) -> _Job:
        job = self._jobs.get(chat)
        if job is not None:
            return job
        with self._lock:
            head = self._db.execute(
                "SELECT id, digest, parts_sent, alert FROM outbox WHERE chat = ? "
                "ORDER BY id LIMIT 1",
                (chat,),
            ).fetchone()
            first = msgspec.json.decode(head[3], type=Alert)
            if head[1] is not None:
                rows = self._db.execute(
                    "SELECT id, alert FROM outbox WHERE chat = ? AND digest = ? ORDER BY id",
                    (chat, head[1]),
                ).fetchall()
            elif head[2] > 0 or first.attach == "chart":
                rows = [(head[0], head[3])]
            else:
                rows = self._db.execute(
                    "SELECT id, alert FROM outbox WHERE chat = ? ORDER BY id LIMIT ?",
                    (chat, DIGEST_MAX),
                ).fetchall()
                backlog = len(rows)
                # An alert with a chart goes on its own: a digest takes the rows before it.
                kinds = [msgspec.json.decode(r[1], type=Alert).attach for r in rows]
                rows = rows[: next((i for i, k in enumerate(kinds) if k == "chart"), len(rows))]
                if backlog > self.digest_after and len(rows) > 1:
                    # The digest's members are fixed now, so that after a restart the same
                    # text is rebuilt and only its unsent parts go out.
                    with self._transaction() as db:
                        db.executemany(
                            "UPDATE outbox SET digest = ? WHERE id = ?",
                            [(rows[0][0], r[0]) for r in rows],
                        )
                else:
                    rows = rows[:1]
        digest = len(rows) > 1 or head[1] is not None
        if first.attach == "chart" and not digest:
            job = self._chart_job(chat, head[0], first, head[2])
        else:
            alerts = [msgspec.json.decode(r[1], type=Alert) for r in rows]
            parts = message_parts(alerts, digest)
            # Clamped in case an older version split the same text into more parts.
            job = _Job(chat, [r[0] for r in rows], parts, min(head[2], len(parts) - 1), digest)
        self._jobs[chat] = job
        return job

    def _chart_job(self, chat: str, row: int, alert: Alert, sent: int) -> _Job:
        """The photo and texts of one alert with a chart. The row's `bars` holds the bars
        (BLOB) until the chart is drawn; if it cannot be, the reason (TEXT) replaces them, so
        that a restart rebuilds the same texts. Once the first part is delivered the photo is
        not needed again."""
        with self._lock:
            (bars,) = self._db.execute("SELECT bars FROM outbox WHERE id = ?", (row,)).fetchone()
        if isinstance(bars, str):
            parts = chartless_parts(alert, bars)
            return _Job(chat, [row], parts, min(sent, len(parts) - 1), False)
        if sent > 0:
            parts = photo_parts(alert)
            return _Job(chat, [row], parts, min(sent, len(parts) - 1), False)
        key = hashlib.sha256(msgspec.json.encode(alert) + (bars or b"")).digest()
        photo = self._drawn.get(key)
        reason = ""
        if photo is None:
            photo, reason = self._draw(alert, bars)
        if photo is not None:
            self._drawn[key] = photo
            self._drawn.move_to_end(key)
            while len(self._drawn) > _DRAWN_KEPT:
                self._drawn.popitem(last=False)
            return _Job(chat, [row], photo_parts(alert), 0, False, photo)
        with self._lock, self._transaction() as db:
            db.execute("UPDATE outbox SET bars = ? WHERE id = ?", (reason, row))
        return _Job(chat, [row], chartless_parts(alert, reason), 0, False)

    def _draw(self, alert: Alert, bars: bytes | None) -> tuple[bytes | None, str]:
        """The PNG chart of `alert` from its stored bars, or None and why it cannot be drawn
        (logged once for each reason)."""
        photo: bytes | None = None
        try:
            frame = None if bars is None else pl.read_ipc(io.BytesIO(bars))
            if frame is not None and alert.timeframe and "timeframe" in frame.columns:
                frame = frame.filter(pl.col("timeframe") == alert.timeframe)
            if frame is None or frame.height == 0:
                reason = "There were no bars to draw."
            else:
                from .chart import render_png

                when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(alert.time / 1000))
                where = f"{alert.symbol} {alert.timeframe}" if alert.timeframe else alert.symbol
                width, height = CHART_SIZE
                photo = render_png(
                    frame,
                    symbol=alert.symbol,
                    title=f"{alert.filter} · {where} · {when}",
                    alerts=[alert],
                    width=width,
                    height=height,
                )
                reason = ""
        except PolystreamError as exc:
            reason = str(exc)
        except Exception as exc:  # bad bars must not stop the alert itself
            detail = " ".join(str(exc).split())
            detail = detail if len(detail) <= 200 else detail[:199] + "…"
            reason = f"The chart could not be drawn ({type(exc).__name__}: {detail})."
        if photo is None and reason not in self._chart_warned:
            self._chart_warned.add(reason)
            log.warning("%s", self._redact(f"Alerts are sent without a chart: {reason}"))
        return photo, self._redact(reason)

    def _interval(self, chat: str) -> float:
        """The pause after a message to `chat` (a chat id, not an entry)."""
        if chat.startswith("-"):
            return max(self.per_chat_interval, self.group_interval)
        return self.per_chat_interval

    def _post(self, job: _Job) -> requests.Response:
        """Send the job's next part: its photo (multipart upload) or a text."""
        chat_id, thread = split_entry(job.chat)
        where: dict[str, str | int] = {"chat_id": chat_id}
        if thread is not None:
            where["message_thread_id"] = thread
        if job.sent == 0 and job.photo is not None:
            fields = where | {"caption": job.parts[0], "parse_mode": "HTML"}
            return self._session.post(
                self._photo_url,
                data={k: str(v) for k, v in fields.items()},
                files={"photo": ("chart.png", job.photo, "image/png")},
                timeout=self.timeout,
            )
        payload = where | {
            "text": job.parts[job.sent],
            "parse_mode": "HTML",
            "disable_web_page_preview": True,
        }
        return self._session.post(self._url, json=payload, timeout=self.timeout)

    def _send(self, job: _Job) -> None:
        chat = job.chat
        started = time.monotonic()
        try:
            response = self._post(job)
        except requests.RequestException as exc:
            done = time.monotonic()
            self._latency = done - started
            self._window.append(done)
            if isinstance(exc, requests.ReadTimeout):
                # The only way a clean run delivers a message twice: its outcome is unknown.
                self._transient(
                    f"Telegram did not answer within {self.timeout:g} s (the message may have "
                    "been delivered, and is sent again)"
                )
            else:
                self._transient(f"could not reach Telegram ({type(exc).__name__}: {exc})")
            return
        done = time.monotonic()
        self._latency = done - started
        self._window.append(done)
        status = response.status_code
        body = _json(response)
        code = body.get("error_code", status) if body.get("ok") is not True else status
        code = code if isinstance(code, int) else status
        description = str(body.get("description") or response.reason or f"HTTP {status}")
        description = description.rstrip(". ")
        parameters = body.get("parameters")
        parameters = parameters if isinstance(parameters, dict) else {}

        if status == 200 and body.get("ok") is True:
            self._delivered(job, done)
        elif code == 429:
            self._stats.retried += 1
            self._stats.throttled += 1
            wait = _seconds(parameters.get("retry_after"), response.headers.get("Retry-After"))
            self._chat_next[split_entry(chat)[0]] = done + wait
            log.info("Telegram asked to slow down for chat %s: retrying in %g s.", chat, wait)
        elif code in (401, 404):
            self._halted = True
            what = (
                "Telegram refused the bot token"
                if code == 401
                else "Telegram does not know this bot (404 Not Found)"
            )
            hint = (
                "TELEGRAM_BOT_TOKEN" if code == 401 else "TELEGRAM_BOT_TOKEN and TELEGRAM_API_URL"
            )
            self._problem(
                ("token", ""),
                f"{what}, so no alerts are sent: check {hint} "
                f"(undelivered alerts are kept for the next run).",
            )
        elif code == 403:
            self._refused(
                chat,
                f"The Telegram bot was blocked or removed from chat {chat} ({description}), "
                f"so its alerts are dropped: add the bot to the chat again or remove {chat} "
                "from TELEGRAM_CHAT_ID.",
            )
        elif 400 <= code < 500:
            migrated = parameters.get("migrate_to_chat_id")
            if migrated is not None:
                thread = split_entry(chat)[1]
                migrated = migrated if thread is None else f"{migrated}:{thread}"
                sentence = (
                    f"Telegram chat {chat} became a supergroup with id {migrated}, so its "
                    f"alerts are dropped: use {migrated} in TELEGRAM_CHAT_ID."
                )
            else:
                sentence = (
                    f"Telegram refused the message for chat {chat}: {description}; its pending "
                    "alerts are dropped (check TELEGRAM_CHAT_ID)."
                )
            self._refused(chat, sentence)
        else:
            self._transient(f"Telegram answered HTTP {status} ({description})")

    def _delivered(self, job: _Job, done: float) -> None:
        job.sent += 1
        with self._lock:
            with self._transaction() as db:
                if job.sent < len(job.parts):
                    db.executemany(
                        "UPDATE outbox SET parts_sent = ? WHERE id = ?",
                        [(job.sent, i) for i in job.ids],
                    )
                else:
                    db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in job.ids])
            self._stats.sent += 1
            if job.sent >= len(job.parts):
                self._stats.pending -= len(job.ids)
                self._stats.digests += job.digest
                del self._jobs[job.chat]
        chat = split_entry(job.chat)[0]
        self._chat_next[chat] = done + self._interval(chat)
        self._backoff.reset()
        self._hold_until = 0.0
        if self._failing:
            self._failing = False
            log.info("Telegram is reachable again.")

    def _transient(self, what: str) -> None:
        """A server error or a network failure: retry everything later, backing off."""
        self._stats.retried += 1
        delay = self._backoff.next()
        self._hold_until = time.monotonic() + delay
        level = logging.DEBUG if self._failing else logging.WARNING
        log.log(level, "%s", self._redact(f"{what}; retrying in {delay:.2g} s."))
        self._failing = True

    def _refused(self, chat: str, sentence: str) -> None:
        self._dead.add(chat)
        self._problem(("chat", chat), sentence)
        self._drop(chat)

    def _drop(self, chat: str) -> None:
        self._jobs.pop(chat, None)
        with self._lock:
            with self._transaction() as db:
                dropped = db.execute("DELETE FROM outbox WHERE chat = ?", (chat,)).rowcount
            self._stats.pending -= dropped
            self._stats.failed += dropped

    def _problem(self, key: tuple[str, str], sentence: str) -> None:
        """Report a refusal once: in `problems` and in the log."""
        if key in self._reported:
            return
        self._reported.add(key)
        sentence = self._redact(sentence)
        self.problems.append(sentence)
        log.error("%s", sentence)


def _recount_digest_parts(db: sqlite3.Connection) -> None:
    """Turn version 1's `parts_sent` of each digest under way (parts cut only at MAX_TEXT) into
    a count of today's parts that were delivered whole: nothing undelivered is skipped, and what
    goes out again is less than one part."""
    started = db.execute(
        "SELECT digest, MAX(parts_sent) FROM outbox "
        "WHERE digest IS NOT NULL AND parts_sent > 0 GROUP BY digest"
    ).fetchall()
    for digest, sent in started:
        rows = db.execute(
            "SELECT alert FROM outbox WHERE digest = ? ORDER BY id", (digest,)
        ).fetchall()
        alerts = [msgspec.json.decode(r[0], type=Alert) for r in rows]
        old = [p for p in split_message(format_digest(alerts)) if p.strip()]
        delivered = sum(len(p) for p in old[:sent])
        whole = end = 0
        for part in message_parts(alerts, True):
            end += len(part)
            if end > delivered:
                break
            whole += 1
        db.execute("UPDATE outbox SET parts_sent = ? WHERE digest = ?", (whole, digest))


def _encode_bars(bars: pl.DataFrame | None) -> bytes | None:
    """Bars as Arrow IPC bytes for the outbox; None for none, or for bars that cannot be
    stored (the alert then goes out without its chart, saying so)."""
    if bars is None:
        return None
    buffer = io.BytesIO()
    try:
        bars.write_ipc(buffer, compression="zstd")
    except Exception as exc:  # an unusual column type: the alert itself must not be lost
        log.warning("The bars of a chart cannot be stored (%s); it is sent without them.", exc)
        return None
    return buffer.getvalue()


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _seconds(*candidates: object) -> float:
    """The first usable number of seconds among `candidates` (Telegram's `retry_after`, then the
    Retry-After header), else one second."""
    for value in candidates:
        if not isinstance(value, int | float | str):
            continue
        try:
            seconds = float(value)
        except ValueError:
            continue
        if seconds >= 0:
            return seconds
    return 1.0
