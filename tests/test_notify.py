"""The Telegram notifier against a local Bot API server: texts, splitting, pacing, digests, error
handling, the persistent outbox across restarts, and the token kept out of every output."""

from __future__ import annotations

import email.policy
import itertools
import json
import logging
import re
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import msgspec
import polars as pl
import pytest
from postgres import free_port

from polystream.filters.engine import Alert, bar_records
from polystream.notify import (
    MAX_CAPTION,
    MAX_TEXT,
    OUTBOX_FILE,
    PART_ALERTS,
    NotifyError,
    TelegramNotifier,
    format_alert,
    format_digest,
    split_digest,
    split_message,
)

TOKEN = "123456789:AAH_test-SECRET_token_0123456789"
WRONG_TOKEN = "987654321:AAF_wrong-SECRET_token_9876543210"

Reply = tuple[int, dict[str, Any]]


def ok() -> Reply:
    return 200, {"ok": True, "result": {"message_id": 1, "date": 0, "chat": {"id": 1}}}


def refusal(code: int, description: str, **parameters: object) -> Reply:
    body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if parameters:
        body["parameters"] = parameters
    return code, body


@dataclass
class Call:
    """One sendMessage or sendPhoto as the server saw it, with the status it answered: `text` is
    the message's text or the photo's caption, `photo` the uploaded file, `thread` the
    message_thread_id."""

    token: str
    chat_id: str
    text: str
    parse_mode: str | None
    preview_off: bool | None
    at: float
    status: int = 0
    method: str = "sendMessage"
    thread: int | None = None
    photo: bytes | None = None


@dataclass
class BotApi:
    """The Bot API subset polystream uses. `sendMessage` and `sendPhoto` (JSON or multipart) are
    answered first from `script` (one reply per request), then by `answer`; `getUpdates` long-
    polls `updates` (see `say`); a token other than `TOKEN` gets 401."""

    url: str = ""
    calls: list[Call] = field(default_factory=list)
    script: list[Reply] = field(default_factory=list)
    answer: Callable[[Call], Reply] = lambda call: ok()
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    updates: list[dict[str, Any]] = field(default_factory=list)
    polls: list[dict[str, Any]] = field(default_factory=list)  # getUpdates parameters
    arrived: threading.Condition = field(default_factory=threading.Condition)
    tokens_seen: list[str] = field(default_factory=list)

    def respond(self, call: Call) -> Reply:
        with self.lock:
            if call.token != TOKEN:
                reply = refusal(401, "Unauthorized")
            elif self.script:
                reply = self.script.pop(0)
            else:
                reply = self.answer(call)
            call.status = reply[0]
            self.calls.append(call)
        return reply

    def delivered(self, chat: str | None = None) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.status == 200 and chat in (None, c.chat_id)]

    def requests_for(self, chat: str) -> int:
        with self.lock:
            return sum(c.chat_id == chat for c in self.calls)

    def say(
        self, text: str, *, chat: int = 111, user: int | None = None, thread: int | None = None
    ) -> int:
        """A message from `user` (default: the chat's id, as in a private chat) in `chat`, for
        the next getUpdates; its update_id."""
        with self.arrived:
            update_id = 1000 + len(self.updates)
            message: dict[str, Any] = {
                "message_id": update_id,
                "date": int(time.time()),
                "chat": {"id": chat, "type": "private" if chat > 0 else "supergroup"},
                "from": {"id": chat if user is None else user, "is_bot": False, "first_name": "u"},
                "text": text,
            }
            if thread is not None:
                message["message_thread_id"] = thread
                message["is_topic_message"] = True
            self.updates.append({"update_id": update_id, "message": message})
            self.arrived.notify_all()
        return update_id

    def get_updates(self, token: str, params: dict[str, Any]) -> Reply:
        if token != TOKEN:
            return refusal(401, "Unauthorized")
        offset = int(params.get("offset") or 0)
        wait = min(float(params.get("timeout") or 0), 5.0)
        with self.arrived:
            self.polls.append(params)
            deadline = time.monotonic() + wait
            while True:
                new = [u for u in self.updates if u["update_id"] >= offset]
                left = deadline - time.monotonic()
                if new or left <= 0:
                    break
                self.arrived.wait(left)
        return 200, {"ok": True, "result": new[: int(params.get("limit") or 100)]}

    def photos(self, chat: str | None = None) -> list[Call]:
        return [c for c in self.delivered(chat) if c.method == "sendPhoto"]

    def texts(self, chat: str | None = None) -> list[str]:
        return [c.text for c in self.delivered(chat)]


def _form(content_type: str, raw: bytes) -> dict[str, Any]:
    """The fields of a multipart/form-data body: text as str, files as bytes."""
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        fields[str(name)] = payload if part.get_filename() else payload.decode()
    return fields


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def _handle(self) -> None:
        at = time.monotonic()
        path, _, query = self.path.partition("?")
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        content_type = self.headers.get("Content-Type", "")
        body: dict[str, Any]
        if content_type.startswith("multipart/form-data"):
            body = _form(content_type, raw)
        elif content_type.startswith("application/x-www-form-urlencoded"):
            body = {k: v[-1] for k, v in parse_qs(raw.decode()).items()}
        else:
            body = json.loads(raw) if raw else {}
        body |= {k: v[-1] for k, v in parse_qs(query).items()}
        m = re.fullmatch(r"/bot([^/]+)/(\w+)", path)
        token = unquote(m.group(1)) if m else ""
        method = m.group(2) if m else ""
        self.server.api.tokens_seen.append(token)
        if method == "getUpdates":
            status, reply = self.server.api.get_updates(token, body)
        else:
            thread = body.get("message_thread_id")
            photo = body.get("photo")
            call = Call(
                token=token,
                chat_id=str(body.get("chat_id")),
                text=body.get("text", body.get("caption", "")),
                parse_mode=body.get("parse_mode"),
                preview_off=body.get("disable_web_page_preview"),
                at=at,
                method=method,
                thread=None if thread is None else int(thread),
                photo=photo if isinstance(photo, bytes) else None,
            )
            if self.server.api.delay:
                time.sleep(self.server.api.delay)
            if method in ("sendMessage", "sendPhoto"):
                status, reply = self.server.api.respond(call)
            else:
                status, reply = refusal(404, "Not Found")
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: BotApi


@pytest.fixture
def api() -> Iterator[BotApi]:
    """A local Bot API on a free loopback port."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.api = BotApi(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server.api
    server.shutdown()
    server.server_close()
    thread.join()


MakeNotifier = Callable[..., TelegramNotifier]


@pytest.fixture
def make(api: BotApi, tmp_path: Path) -> Iterator[MakeNotifier]:
    """Started notifiers with fast timings; every one is stopped at the end of the test."""
    made: list[TelegramNotifier] = []

    def make(
        chats: tuple[str, ...] = ("111",),
        token: str = TOKEN,
        state: Path | None = None,
        start: bool = True,
        **options: Any,
    ) -> TelegramNotifier:
        timings: dict[str, Any] = {
            "api_url": api.url,
            "per_chat_interval": 0.02,
            "group_interval": 0.05,
            "timeout": 2.0,
            "backoff_initial": 0.05,
            "backoff_max": 0.2,
        }
        notifier = TelegramNotifier(token, chats, state or tmp_path / "state", **timings | options)
        made.append(notifier)
        return notifier.start() if start else notifier

    yield make
    for notifier in made:
        notifier.stop(0)


def alert(
    message: str = "RSI 27.3 at 4091.2",
    *,
    filter: str = "rsi-oversold",
    symbol: str = "X:BTCUSD",
    timeframe: str | None = "1m",
    severity: str = "warning",
) -> Alert:
    return Alert(filter, symbol, timeframe, 1_700_000_000_000, severity, message, {"close": 1.0})


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)


def outbox_rows(state: Path) -> int:
    with sqlite3.connect(state / OUTBOX_FILE) as db:
        count: int = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    return count


# The outbox's table as versions 1 and 2 made it.
OUTBOX_V1 = """
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chat TEXT NOT NULL,
    alert BLOB NOT NULL,
    digest INTEGER,
    parts_sent INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX outbox_chat ON outbox (chat, id);
"""


# -- texts -------------------------------------------------------------------------------------


def test_one_alert_is_delivered_with_the_exact_text(api: BotApi, make: MakeNotifier) -> None:
    notifier = make()
    notifier.offer([alert()])
    wait_for(lambda: notifier.stats.pending == 0 and len(api.calls) == 1)
    [call] = api.calls
    assert call.chat_id == "111"
    assert call.text == "<b>WARNING</b> rsi-oversold · X:BTCUSD 1m\nRSI 27.3 at 4091.2"
    assert call.parse_mode == "HTML"
    assert call.preview_off is True
    stats = notifier.stats
    assert (stats.sent, stats.pending, stats.retried, stats.failed) == (1, 0, 0, 0)


def test_a_trade_alert_has_no_timeframe_in_its_header() -> None:
    text = format_alert(alert("big buy", filter="whale", timeframe=None, severity="info"))
    assert text == "<b>INFO</b> whale · X:BTCUSD\nbig buy"


def test_user_text_is_escaped_for_telegram_html(api: BotApi, make: MakeNotifier) -> None:
    notifier = make()
    notifier.offer([alert("close < 5 & > 3 <b>not bold</b>", filter="a<b>&c", symbol="X:<BTC>")])
    wait_for(lambda: len(api.delivered()) == 1)
    assert api.calls[0].text == (
        "<b>WARNING</b> a&lt;b&gt;&amp;c · X:&lt;BTC&gt; 1m\n"
        "close &lt; 5 &amp; &gt; 3 &lt;b&gt;not bold&lt;/b&gt;"
    )


def test_a_long_message_is_split_at_line_ends(api: BotApi, make: MakeNotifier) -> None:
    lines = [f"line {i:04d} " + "x" * (i % 90) for i in range(400)]
    message = "\n".join(lines)[:10_000]
    assert len(message) == 10_000
    notifier = make()
    notifier.offer([alert(message)])
    wait_for(lambda: notifier.stats.pending == 0)
    texts = [c.text for c in api.delivered()]
    assert len(texts) >= 3
    assert all(len(t) <= MAX_TEXT for t in texts)
    assert all(t.endswith("\n") for t in texts[:-1])
    assert "".join(texts) == format_alert(alert(message))
    assert notifier.stats.sent == len(texts)


def test_a_long_line_is_never_cut_inside_an_entity_or_a_tag_pair() -> None:
    line = " ".join(["x&amp;y"] * 1500 + ["<b>WARNING</b>"] * 800 + ["&lt;" * 3000])
    parts = split_message(line)
    assert len(parts) > 3
    assert "".join(parts) == line
    for part in parts:
        assert len(part) <= MAX_TEXT
        assert re.sub(r"&(amp|lt|gt);", "", part).count("&") == 0, part[-20:]
        assert part.count("<b>") == part.count("</b>")
        assert not re.search(r"<[^>]*$", part)


def test_split_counts_characters_as_telegram_does() -> None:
    text = "🚀" * 3000  # two UTF-16 units each: 6000 units although len() is 3000
    parts = split_message(text)
    assert len(parts) == 2
    assert all(len(p.encode("utf-16-le")) // 2 <= MAX_TEXT for p in parts)
    assert "".join(parts) == text


# -- chats and pacing --------------------------------------------------------------------------


def test_every_chat_gets_every_alert(api: BotApi, make: MakeNotifier) -> None:
    chats = ("111", "222", "-1001234")
    notifier = make(chats)
    first, second = alert("first"), alert("second")
    notifier.offer([first, second])
    wait_for(lambda: len(api.delivered()) == 6)
    for chat in chats:
        assert [c.text for c in api.delivered(chat)] == [format_alert(first), format_alert(second)]


def test_a_comma_separated_chat_list_is_accepted(api: BotApi, make: MakeNotifier) -> None:
    notifier = make(" 111, 222 ,", start=False)
    assert notifier.chat_ids == ("111", "222")


def test_offer_stores_durably_and_does_not_wait_for_telegram(
    api: BotApi, make: MakeNotifier, tmp_path: Path
) -> None:
    api.delay = 1.0
    notifier = make()
    started = time.monotonic()
    notifier.offer([alert()])
    assert time.monotonic() - started < 0.5
    assert outbox_rows(tmp_path / "state") == 1
    assert notifier.stats.pending == 1


def test_two_alerts_to_one_chat_are_a_second_apart(api: BotApi, make: MakeNotifier) -> None:
    notifier = make(per_chat_interval=1.0)
    notifier.offer([alert("one")])
    notifier.offer([alert("two")])
    wait_for(lambda: len(api.delivered()) == 2)
    first, second = api.delivered()
    assert second.at - first.at >= 1.0


def test_groups_and_the_global_rate_are_paced(api: BotApi, make: MakeNotifier) -> None:
    group = make(("-100200",), state=None, group_interval=0.4)
    group.offer([alert("a")])
    group.offer([alert("b")])
    group.offer([alert("c")])
    wait_for(lambda: len(api.delivered("-100200")) == 3)
    times = [c.at for c in api.delivered("-100200")]
    assert all(b - a >= 0.4 for a, b in itertools.pairwise(times))

    chats = tuple(str(n) for n in range(500, 506))
    many = make(chats, state=group.path.parent / "many", global_per_second=2)
    many.offer([alert("x")])
    wait_for(lambda: sum(len(api.delivered(c)) for c in chats) == 6)
    times = sorted(c.at for c in api.delivered() if c.chat_id in chats)
    # at most two requests in any one second: every third one is a second later
    assert all(times[i + 2] - times[i] >= 1.0 for i in range(len(times) - 2))


def test_a_burst_becomes_a_digest(api: BotApi, make: MakeNotifier) -> None:
    notifier = make(digest_after=5)
    burst = [alert(f"alert number {i} & more", severity="critical") for i in range(40)]
    notifier.offer(burst)
    wait_for(lambda: notifier.stats.pending == 0)
    texts = [c.text for c in api.delivered()]
    assert 0 < len(texts) < len(burst)
    assert texts[0].startswith("<b>40 alerts</b>\n")
    whole = "".join(texts)
    for a in burst:
        assert (
            f"<b>CRITICAL</b> rsi-oversold · X:BTCUSD 1m: {a.message.replace('&', '&amp;')}\n"
            in (whole + "\n")
        )
    assert notifier.stats.digests == 1
    assert whole == format_digest(burst)


def test_a_digest_goes_out_in_parts_of_at_most_ten_alerts(api: BotApi, make: MakeNotifier) -> None:
    notifier = make(digest_after=5)
    burst = [alert(f"alert number {i}") for i in range(45)]
    notifier.offer(burst)
    wait_for(lambda: notifier.stats.pending == 0)
    texts = [c.text for c in api.delivered()]
    assert PART_ALERTS == 10
    assert [t.count("alert number") for t in texts] == [10, 10, 10, 10, 5]
    assert texts[0].startswith("<b>45 alerts</b>\n")
    assert "".join(texts) == format_digest(burst)
    assert (notifier.stats.sent, notifier.stats.digests) == (5, 1)


def test_a_digest_part_holds_ten_alerts_and_4096_characters_at_most() -> None:
    # short alerts, and every 17th one longer than a message
    burst = [alert(f"#{i}# " + "w " * (3000 if i % 17 == 0 else 20)) for i in range(70)]
    parts = split_digest(burst)
    assert "".join(parts) == format_digest(burst)
    assert all(len(p) <= MAX_TEXT for p in parts)
    alerts_per_part = [len(re.findall(r"#\d+#", p)) for p in parts]
    assert max(alerts_per_part) == PART_ALERTS
    assert sum(alerts_per_part) == len(burst)


# -- errors ------------------------------------------------------------------------------------


def test_429_waits_retry_after_and_delivers_once(api: BotApi, make: MakeNotifier) -> None:
    api.script = [refusal(429, "Too Many Requests: retry after 1", retry_after=1)]
    notifier = make()
    notifier.offer([alert()])
    wait_for(lambda: len(api.delivered()) == 1)
    refused, accepted = api.calls
    assert (refused.status, accepted.status) == (429, 200)
    assert accepted.at - refused.at >= 1.0
    time.sleep(0.1)
    assert len(api.calls) == 2
    assert (notifier.stats.retried, notifier.stats.sent, notifier.problems) == (1, 1, [])


def test_a_server_error_is_retried(api: BotApi, make: MakeNotifier) -> None:
    api.script = [refusal(500, "Internal Server Error"), refusal(502, "Bad Gateway")]
    notifier = make()
    notifier.offer([alert()])
    wait_for(lambda: len(api.delivered()) == 1)
    time.sleep(0.1)
    assert [c.status for c in api.calls] == [500, 502, 200]
    stats = notifier.stats
    assert (stats.retried, stats.sent, stats.pending, stats.failed) == (2, 1, 0, 0)
    assert notifier.problems == []


def test_a_blocked_bot_is_reported_once_and_that_chat_is_dropped(
    api: BotApi, make: MakeNotifier, caplog: pytest.LogCaptureFixture
) -> None:
    def answer(call: Call) -> Reply:
        if call.chat_id == "222":
            return refusal(403, "Forbidden: bot was blocked by the user")
        return ok()

    api.answer = answer
    notifier = make(("111", "222"))
    notifier.offer([alert("a"), alert("b"), alert("c")])
    wait_for(lambda: len(api.delivered("111")) == 3 and notifier.stats.pending == 0)
    notifier.offer([alert("d"), alert("e")])
    wait_for(lambda: len(api.delivered("111")) == 5)
    time.sleep(0.1)
    assert api.requests_for("222") == 1
    [problem] = notifier.problems
    assert "blocked or removed from chat 222" in problem
    assert problem.endswith(".")
    assert notifier.stats.failed == 5
    assert notifier.stats.pending == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [problem]


def test_a_refused_message_names_the_chat_and_telegrams_reason(
    api: BotApi, make: MakeNotifier
) -> None:
    api.script = [refusal(400, "Bad Request: chat not found")]
    notifier = make(("777",))
    notifier.offer([alert("a"), alert("b")])
    wait_for(lambda: notifier.stats.pending == 0)
    assert notifier.problems == [
        "Telegram refused the message for chat 777: Bad Request: chat not found; "
        "its pending alerts are dropped (check TELEGRAM_CHAT_ID)."
    ]
    assert notifier.stats.failed == 2
    assert len(api.calls) == 1


def test_a_refused_token_stops_sending_and_keeps_the_outbox(
    api: BotApi, make: MakeNotifier, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    notifier = make(("111", "222"), token=WRONG_TOKEN, state=state)
    notifier.offer([alert("a"), alert("b")])
    wait_for(lambda: bool(notifier.problems))
    notifier.offer([alert("c")])
    time.sleep(0.2)
    assert len(api.calls) == 1
    assert notifier.problems == [
        "Telegram refused the bot token, so no alerts are sent: check TELEGRAM_BOT_TOKEN "
        "(undelivered alerts are kept for the next run)."
    ]
    started = time.monotonic()
    notifier.stop(5.0)
    assert time.monotonic() - started < 1.0
    assert notifier.stats.pending == 6
    assert outbox_rows(state) == 6

    fixed = make(("111", "222"), state=state)
    wait_for(lambda: fixed.stats.pending == 0)
    for chat in ("111", "222"):
        assert [c.text for c in api.delivered(chat)] == [
            format_alert(alert(m)) for m in ("a", "b", "c")
        ]


# -- the outbox across restarts ----------------------------------------------------------------


def test_the_outbox_survives_a_restart(api: BotApi, make: MakeNotifier, tmp_path: Path) -> None:
    state = tmp_path / "state"
    api.answer = lambda call: refusal(500, "Internal Server Error")
    first = make(("111", "222"), state=state)
    sent = [alert("a"), alert("b"), alert("c")]
    first.offer(sent)
    wait_for(lambda: len(api.calls) >= 2)
    first.stop(0.3)
    assert first.stats.pending == 6
    assert outbox_rows(state) == 6
    with pytest.raises(NotifyError):
        first.offer([alert("too late")])

    api.answer = lambda call: ok()
    second = make(("111", "222"), state=state)
    assert second.stats.pending == 6
    wait_for(lambda: second.stats.pending == 0)
    time.sleep(0.1)
    delivered = Counter((c.chat_id, c.text) for c in api.delivered())
    assert delivered == Counter((chat, format_alert(a)) for chat in ("111", "222") for a in sent)
    assert outbox_rows(state) == 0


def test_nothing_is_sent_twice_after_a_clean_restart(
    api: BotApi, make: MakeNotifier, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = make(state=state)
    first.offer([alert("a"), alert("b"), alert("c")])
    first.stop(5.0)
    assert first.stats.pending == 0
    assert len(api.delivered()) == 3

    second = make(state=state)
    time.sleep(0.2)
    second.stop(1.0)
    assert len(api.calls) == 3
    assert second.stats.sent == 0


def test_a_split_message_resumes_after_its_last_delivered_part(
    api: BotApi, make: MakeNotifier, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    message = "\n".join(f"row {i:05d} " + "y" * 60 for i in range(150))
    api.script = [ok()]
    api.answer = lambda call: refusal(503, "Service Unavailable")
    first = make(state=state)
    first.offer([alert(message)])
    wait_for(lambda: len(api.calls) >= 2)
    first.stop(0.2)
    assert len(api.delivered()) == 1

    api.answer = lambda call: ok()
    second = make(state=state)
    wait_for(lambda: second.stats.pending == 0)
    texts = [c.text for c in api.delivered()]
    assert len(texts) == len(split_message(format_alert(alert(message))))
    assert "".join(texts) == format_alert(alert(message))


def test_a_digest_resumes_after_its_last_delivered_part(
    api: BotApi, make: MakeNotifier, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    burst = [alert(f"burst {i} " + "z" * 150) for i in range(60)]
    api.script = [ok()]
    api.answer = lambda call: refusal(500, "Internal Server Error")
    first = make(state=state)
    first.offer(burst)
    wait_for(lambda: len(api.calls) >= 2)
    first.stop(0.2)

    api.answer = lambda call: ok()
    second = make(state=state)
    second.offer([alert("after the restart")])
    wait_for(lambda: second.stats.pending == 0)
    texts = [c.text for c in api.delivered()]
    digest = split_digest(burst)
    assert len(digest) > 1
    assert texts == [*digest, format_alert(alert("after the restart"))]


# -- secrets -----------------------------------------------------------------------------------


def test_the_token_never_appears_in_logs_problems_or_repr(
    api: BotApi, make: MakeNotifier, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    unreachable = make(state=tmp_path / "a", api_url=f"http://127.0.0.1:{free_port()}")
    unreachable.offer([alert()])
    wait_for(lambda: unreachable.stats.retried >= 2)

    refused = make(token=WRONG_TOKEN, state=tmp_path / "b")
    refused.offer([alert()])
    wait_for(lambda: bool(refused.problems))

    working = make(state=tmp_path / "c")
    working.offer([alert()])
    wait_for(lambda: working.stats.sent == 1)

    assert any("could not reach Telegram" in r.getMessage() for r in caplog.records)
    assert any("sendMessage" in r.getMessage() for r in caplog.records)  # urllib3's request line
    shown = [r.getMessage() for r in caplog.records] + [caplog.text]
    shown += refused.problems + [repr(n) for n in (unreachable, refused, working)]
    for secret in (TOKEN, WRONG_TOKEN):
        for form in (secret, quote(secret, safe=""), secret.split(":")[1]):
            assert not any(form in text for text in shown), form


def test_an_unusable_state_dir_is_one_sentence(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(NotifyError) as info:
        TelegramNotifier(TOKEN, ["111"], blocker / "state")
    message = str(info.value)
    assert message.startswith("Cannot open the Telegram outbox") and message.endswith(".")
    assert TOKEN not in message


# -- stopping over a slow Bot API --------------------------------------------------------------


def test_a_request_in_flight_at_stop_gets_its_full_timeout(
    api: BotApi, make: MakeNotifier, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    api.delay = 1.5
    notifier = make(state=state, timeout=3.0)
    notifier.offer([alert()])
    time.sleep(0.2)  # the request is on its way
    started = time.monotonic()
    notifier.stop(0.3)
    took = time.monotonic() - started
    assert not notifier.alive
    assert 1.0 < took < 0.3 + 3.0
    assert (notifier.stats.sent, notifier.stats.pending) == (1, 0)
    assert outbox_rows(state) == 0

    again = make(state=state)
    time.sleep(0.2)
    again.stop(1.0)
    assert len(api.calls) == 1


def test_a_clean_stop_over_a_slow_bot_api_sends_nothing_twice(
    api: BotApi, make: MakeNotifier, tmp_path: Path
) -> None:
    # Telegram answers in about a second: stop's deadline falls while a backlog is delivered.
    state = tmp_path / "state"
    api.delay = 1.0
    sent = [alert(f"alert {i}") for i in range(3)]
    first = make(state=state, timeout=10.0)
    first.offer(sent)
    started = time.monotonic()
    first.stop(1.5)
    assert time.monotonic() - started < 1.5 + 10.0
    assert not first.alive
    assert first.stats.sent >= 1

    api.delay = 0.0
    second = make(state=state)
    wait_for(lambda: second.stats.pending == 0)
    second.stop(1.0)
    time.sleep(1.2)  # a request the first notifier gave up on would be answered by now
    delivered = Counter(c.text for c in api.delivered())
    assert delivered == Counter(format_alert(a) for a in sent)


def test_a_digest_under_way_in_an_older_outbox_resumes_without_loss(
    api: BotApi, make: MakeNotifier, tmp_path: Path
) -> None:
    # Version 1 cut a digest only at 4096 characters and counted those parts as sent.
    state = tmp_path / "state"
    state.mkdir()
    burst = [alert(f"old {i} " + "v" * 80) for i in range(100)]
    full = format_digest(burst)
    old_first = split_message(full)[0]
    with sqlite3.connect(state / OUTBOX_FILE) as db:
        db.executescript(OUTBOX_V1 + "PRAGMA user_version = 1;")
        db.executemany(
            "INSERT INTO outbox (id, chat, alert, digest, parts_sent) VALUES (?, '111', ?, 1, 1)",
            [(i + 1, msgspec.json.encode(a)) for i, a in enumerate(burst)],
        )
    notifier = make(state=state)
    wait_for(lambda: notifier.stats.pending == 0)
    rest = "".join(c.text for c in api.delivered())
    assert full.endswith(rest)
    skipped = len(full) - len(rest)
    assert 0 < skipped <= len(old_first)  # nothing that was not delivered is skipped
    assert old_first[skipped:].count("<b>WARNING</b>") < PART_ALERTS  # what is sent again


# -- charts ------------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n"
MINUTE = 60_000
T0 = 1_700_000_000_000 - 100 * MINUTE


@pytest.fixture(scope="module")
def bars() -> pl.DataFrame:
    """120 final 1m bar records of X:BTCUSD with indicator columns, as the pipeline emits them."""
    closes = [4000 + 30 * ((i * 7) % 11) - 2 * i for i in range(120)]
    ohlcv = pl.DataFrame(
        {
            "time": [T0 + i * MINUTE for i in range(120)],
            "open": [float(c - 5) for c in closes],
            "high": [float(c + 12) for c in closes],
            "low": [float(c - 15) for c in closes],
            "close": [float(c) for c in closes],
            "volume": [1.0 + i % 5 for i in range(120)],
        }
    )
    return bar_records(ohlcv, "X:BTCUSD", MINUTE)


def charted(message: str = "RSI 27.3 at 4091.2", **options: Any) -> Alert:
    return msgspec.structs.replace(alert(message, **options), attach="chart")


def no_chart(a: Alert, reason: str) -> str:
    return f"{format_alert(a)}\n<i>No chart: {reason}</i>"


def test_an_alert_with_a_chart_is_one_photo_captioned_with_its_text(
    api: BotApi, make: MakeNotifier, bars: pl.DataFrame
) -> None:
    notifier = make()
    a = charted()
    notifier.offer([a], charts=[bars])
    wait_for(lambda: notifier.stats.pending == 0)
    [call] = api.calls
    assert call.method == "sendPhoto"
    assert call.photo is not None and call.photo.startswith(PNG)
    assert call.text == format_alert(a)
    assert (call.chat_id, call.parse_mode, call.thread) == ("111", "HTML", None)
    assert notifier.stats.sent == 1


def test_a_chart_in_a_burst_goes_on_its_own_and_every_alert_once(
    api: BotApi, make: MakeNotifier, bars: pl.DataFrame
) -> None:
    notifier = make(digest_after=5)
    before = [alert(f"before {i}") for i in range(12)]
    after = [alert(f"after {i}") for i in range(12)]
    middle = charted("the charted one")
    notifier.offer([*before, middle, *after], charts=[None] * 12 + [bars] + [None] * 12)
    wait_for(lambda: notifier.stats.pending == 0)
    calls = api.delivered()
    [photo] = api.photos()
    assert photo.text == format_alert(middle)
    at = calls.index(photo)
    assert "".join(c.text for c in calls[:at]) == format_digest(before)
    assert "".join(c.text for c in calls[at + 1 :]) == format_digest(after)
    shown = Counter(m for c in calls for m in re.findall(r"(?:before|after) \d+|charted", c.text))
    assert shown == Counter([*(a.message for a in before + after), "charted"])
    assert notifier.stats.digests == 2


def test_a_chart_survives_a_restart(
    api: BotApi, make: MakeNotifier, tmp_path: Path, bars: pl.DataFrame
) -> None:
    state = tmp_path / "state"
    first = make(state=state, start=False)
    a = charted()
    first.offer([a], charts=[bars])
    first.stop(0)
    assert outbox_rows(state) == 1
    assert api.calls == []

    second = make(state=state)
    wait_for(lambda: second.stats.pending == 0)
    [call] = api.calls
    assert call.method == "sendPhoto" and call.photo is not None and call.photo.startswith(PNG)
    assert call.text == format_alert(a)


def test_a_version_2_outbox_is_migrated(
    api: BotApi, make: MakeNotifier, tmp_path: Path, bars: pl.DataFrame
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    old = alert("stored by version 2")
    with sqlite3.connect(state / OUTBOX_FILE) as db:
        db.executescript(
            OUTBOX_V1
            + "CREATE TABLE marks (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
            + "PRAGMA user_version = 2;"
        )
        db.execute(
            "INSERT INTO outbox (chat, alert) VALUES ('111', ?)", (msgspec.json.encode(old),)
        )
        db.execute("INSERT INTO marks VALUES ('position', 41)")
    notifier = make(state=state)
    assert notifier.mark("position") == 41
    new = charted("stored by version 3")
    notifier.offer([new], charts=[bars])
    wait_for(lambda: notifier.stats.pending == 0)
    assert [(c.method, c.text) for c in api.calls] == [
        ("sendMessage", format_alert(old)),
        ("sendPhoto", format_alert(new)),
    ]
    notifier.stop(1.0)
    with sqlite3.connect(state / OUTBOX_FILE) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        assert "bars" in [row[1] for row in db.execute("PRAGMA table_info(outbox)")]


def test_an_outbox_of_a_newer_version_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / OUTBOX_FILE) as db:
        db.execute("PRAGMA user_version = 4")
    with pytest.raises(NotifyError, match="newer polystream"):
        TelegramNotifier(TOKEN, ["111"], state)


def test_missing_bars_send_the_text_with_the_reason_and_warn_once(
    api: BotApi, make: MakeNotifier, caplog: pytest.LogCaptureFixture, bars: pl.DataFrame
) -> None:
    notifier = make()
    first, second, empty = charted("first"), charted("second"), charted("empty")
    notifier.offer([first, second])  # no bars at all
    notifier.offer([empty], charts=[bars.clear()])
    wait_for(lambda: notifier.stats.pending == 0)
    assert api.photos() == []
    reason = "there were no bars to draw."
    assert api.texts() == [no_chart(a, reason) for a in (first, second, empty)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["Alerts are sent without a chart: There were no bars to draw."]


def test_without_the_chart_extra_the_text_says_how_to_install_it(
    api: BotApi, make: MakeNotifier, monkeypatch: pytest.MonkeyPatch, bars: pl.DataFrame
) -> None:
    # None in sys.modules makes every import of matplotlib fail, on the worker thread too
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    notifier = make()
    a = charted()
    notifier.offer([a], charts=[bars])
    wait_for(lambda: notifier.stats.pending == 0)
    reason = "drawing a PNG or SVG chart needs matplotlib: pip install 'polystream[chart]'."
    assert api.texts() == [no_chart(a, reason)]


def test_bars_that_cannot_be_drawn_leave_the_text_and_say_why(
    api: BotApi, make: MakeNotifier, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    notifier = make(state=state)
    a = charted()
    notifier.offer([a, alert("next")], charts=[pl.DataFrame({"unrelated": [1, 2]}), None])
    wait_for(lambda: notifier.stats.pending == 0)
    first, second = api.texts()
    assert first.startswith(format_alert(a) + "\n<i>No chart: the chart could not be drawn (")
    assert first.endswith(").</i>") and first.count("\n") == 2
    assert second == format_alert(alert("next"))
    assert (notifier.stats.sent, notifier.stats.failed, notifier.problems) == (2, 0, [])


def test_a_caption_too_long_is_the_first_line_and_the_text_follows(
    api: BotApi, make: MakeNotifier, bars: pl.DataFrame
) -> None:
    notifier = make()
    a = charted("long " * 300)
    assert len(format_alert(a)) > MAX_CAPTION
    notifier.offer([a], charts=[bars])
    wait_for(lambda: notifier.stats.pending == 0)
    photo, text = api.delivered()
    assert (photo.method, text.method) == ("sendPhoto", "sendMessage")
    assert photo.text == "<b>WARNING</b> rsi-oversold · X:BTCUSD 1m"
    assert text.text == format_alert(a)
    assert notifier.stats.sent == 2


def test_the_text_after_a_delivered_photo_resumes_after_a_restart(
    api: BotApi, make: MakeNotifier, tmp_path: Path, bars: pl.DataFrame
) -> None:
    state = tmp_path / "state"
    a = charted("long " * 300)
    api.script = [ok()]
    api.answer = lambda call: refusal(500, "Internal Server Error")
    first = make(state=state)
    first.offer([a], charts=[bars])
    wait_for(lambda: len(api.calls) >= 2)
    first.stop(0.2)

    api.answer = lambda call: ok()
    second = make(state=state)
    wait_for(lambda: second.stats.pending == 0)
    assert [(c.method, c.text) for c in api.delivered()] == [
        ("sendPhoto", "<b>WARNING</b> rsi-oversold · X:BTCUSD 1m"),
        ("sendMessage", format_alert(a)),
    ]


def test_429_on_a_photo_is_retried(api: BotApi, make: MakeNotifier, bars: pl.DataFrame) -> None:
    api.script = [refusal(429, "Too Many Requests: retry after 1", retry_after=1)]
    notifier = make()
    notifier.offer([charted()], charts=[bars])
    wait_for(lambda: notifier.stats.pending == 0)
    refused, accepted = api.calls
    assert [c.method for c in api.calls] == ["sendPhoto", "sendPhoto"]
    assert (refused.status, accepted.status) == (429, 200)
    assert accepted.at - refused.at >= 1.0
    assert accepted.photo is not None and accepted.photo.startswith(PNG)
    assert (notifier.stats.throttled, notifier.stats.sent) == (1, 1)


# -- topics ------------------------------------------------------------------------------------


def test_a_topic_entry_sends_to_its_chat_and_thread(
    api: BotApi, make: MakeNotifier, bars: pl.DataFrame
) -> None:
    notifier = make(("-100123:45", "-100123:46", "111"), group_interval=0.3)
    text, photo = alert("text"), charted("photo")
    notifier.offer([text, photo], charts=[None, bars])
    wait_for(lambda: notifier.stats.pending == 0)
    seen = Counter((c.method, c.chat_id, c.thread, c.text) for c in api.delivered())
    assert seen == Counter(
        (method, chat, thread, format_alert(a))
        for chat, thread in (("-100123", 45), ("-100123", 46), ("111", None))
        for method, a in (("sendMessage", text), ("sendPhoto", photo))
    )
    assert len({c.photo for c in api.photos()}) == 1  # one picture for every entry
    # both topics are one group chat for pacing
    times = sorted(c.at for c in api.delivered("-100123"))
    assert len(times) == 4
    assert all(b - a >= 0.3 for a, b in itertools.pairwise(times))


def test_a_refused_topic_is_named_as_written_and_the_others_still_get_alerts(
    api: BotApi, make: MakeNotifier
) -> None:
    def answer(call: Call) -> Reply:
        if call.thread == 46:
            return refusal(400, "Bad Request: message thread not found")
        return ok()

    api.answer = answer
    notifier = make(("-100123:45", "-100123:46"))
    notifier.offer([alert("a"), alert("b")])
    wait_for(lambda: notifier.stats.pending == 0)
    assert notifier.problems == [
        "Telegram refused the message for chat -100123:46: Bad Request: message thread not "
        "found; its pending alerts are dropped (check TELEGRAM_CHAT_ID)."
    ]
    assert [c.text for c in api.delivered()] == [format_alert(alert(m)) for m in ("a", "b")]
    assert {c.thread for c in api.delivered()} == {45}


def test_a_bad_topic_entry_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(NotifyError) as info:
        TelegramNotifier(TOKEN, ["-100123:abc"], tmp_path)
    message = str(info.value)
    assert "'-100123:abc'" in message and message.endswith(".") and "\n" not in message


def test_the_token_stays_out_of_photo_requests_and_their_errors(
    api: BotApi,
    make: MakeNotifier,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    bars: pl.DataFrame,
) -> None:
    caplog.set_level(logging.DEBUG)
    unreachable = make(state=tmp_path / "a", api_url=f"http://127.0.0.1:{free_port()}")
    unreachable.offer([charted()], charts=[bars])
    wait_for(lambda: unreachable.stats.retried >= 2)
    working = make(("-100123:45",), state=tmp_path / "b")
    working.offer([charted()], charts=[bars])
    wait_for(lambda: working.stats.pending == 0)

    messages = [r.getMessage() for r in caplog.records]
    assert any("could not reach Telegram" in m and "sendPhoto" in m for m in messages)
    assert any("POST /bot" in m and "sendPhoto" in m for m in messages)  # urllib3's request line
    shown = [*messages, caplog.text, repr(unreachable), repr(working)]
    for form in (TOKEN, quote(TOKEN, safe=""), TOKEN.split(":")[1]):
        assert not any(form in text for text in shown), form
