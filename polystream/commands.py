"""Telegram commands for a running `watch`: `/status`, `/alerts`, `/filters`, `/mute`, `/unmute`,
`/chart` and `/help`, read by long-polling `getUpdates` (no webhook) on the worker thread
`polystream-commands`.

Only messages whose chat or sender is in the allowlist are answered; anyone else gets nothing,
and is logged once. The pipeline thread only hands its outputs to `RunState` (references and a
few counters, under a lock); everything a command needs, rendering a chart too, is worked out on
the commands thread. Mutes and the getUpdates offset live in the state directory, so a mute
outlasts a restart and a restart answers no command twice. The bot token never appears in a log
line, an error or a repr.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Self
from urllib.parse import quote

import polars as pl
import requests

from .config import (
    DEFAULT_TELEGRAM_API_URL,
    RedactingFilter,
    Redactor,
    parse_duration,
    parse_timeframe,
    timeframe_name,
)
from .display import clock_text
from .errors import PolystreamError
from .feedalerts import FILTER as FEED_ALERTS
from .filters.directory import read_last_fired, write_atomically
from .filters.spec import NAME
from .notify import MAX_CAPTION, escape, split_message
from .schema import Alert
from .sinks import Output, View, feed_down
from .symbols import QUOTE_CURRENCIES, normalize, to_pair
from .worker import Backoff, Worker

if TYPE_CHECKING:
    from .filters import FilterEngine
    from .notify import TelegramNotifier
    from .store import Store

log = logging.getLogger(__name__)

MUTES_FILE = "telegram-mutes.json"
OFFSET_FILE = "telegram-updates.json"
# Seconds a stored getUpdates offset is used for: as long as Telegram keeps an update.
OFFSET_KEPT = 86_400
# What `RunState` keeps for the commands: the latest alerts, and final bars per series.
RECENT_ALERTS = 100
RECENT_BARS = 150
# How long an ended mute is kept: alerts of the longest timeframe (a day) come that much later.
KEPT_AFTER = 86_400_000 + 60_000
# Bar frames the pipeline thread may leave unfolded before it folds them itself.
_UNFOLDED = 256
# urllib3 logs request lines (which carry the token in the path) at DEBUG from these loggers.
_URLLIB3_LOGGERS = ("urllib3.connectionpool", "urllib3.util.retry")
# How long `stop` waits for a long poll under way; the thread ends when it is answered.
_STOP_WAIT = 1.0

HELP = (
    "<b>Commands</b>\n"
    "/status — the feed, lag, events/s, symbols, warm-up, journal and outbox\n"
    "/alerts [N] — the last N alerts (10)\n"
    "/filters — the filters, and when each last fired\n"
    "/mute FILTER|SYMBOL|all DURATION — no Telegram alerts from it for 30m, 2h, 1d…\n"
    "/unmute [FILTER|SYMBOL|all] — lift a mute (all of them)\n"
    "/chart SYMBOL [TIMEFRAME] — a candlestick chart of the recent bars\n"
    "/help — this list"
)


class CommandError(PolystreamError):
    """A command that cannot be carried out; its sentence is the reply."""


# -- mutes ---------------------------------------------------------------------------------------


class Mutes:
    """Filters and symbols whose alerts are kept from Telegram until a time (epoch ms), kept in
    `state_dir` so that they outlast a restart. `all` mutes everything."""

    def __init__(self, state_dir: Path | str) -> None:
        self.path = Path(state_dir) / MUTES_FILE
        self._lock = threading.Lock()
        self._until: dict[str, int] = self._load()
        self._unsaved = False  # a write failed: the mutes hold for this run only

    def __repr__(self) -> str:
        return f"Mutes({self.active()!r})"

    @staticmethod
    def target(text: str, filters: Collection[str] = ()) -> str:
        """What `text` names: `all`, one of `filters`, else a symbol in its X:BTCUSD form (any
        spelling `symbols.normalize` reads; `btc-usd`, but not `every-bar`), else `text` as a
        filter name."""
        text = text.strip()
        if text.lower() == "all":
            return "all"
        if text in filters:
            return text
        try:
            symbol, quote_currency = normalize(text), to_pair(text).split("-")[1]
        except PolystreamError:
            return text
        # `every-bar` reads as a pair too: a filter name is a symbol only with a quote currency
        if NAME.fullmatch(text) and quote_currency not in QUOTE_CURRENCIES:
            return text
        return symbol

    def mute(self, target: str, until_ms: int, filters: Collection[str] = ()) -> str:
        """Keep `target`'s alerts from Telegram while their time is before `until_ms`; returns
        the target as stored."""
        key = self.target(target, filters)
        with self._lock:
            self._until[key] = int(until_ms)
            self._save()
        return key

    def unmute(self, target: str = "all", filters: Collection[str] = ()) -> list[str]:
        """Lift the mute of `target` (`all`: every mute); returns what was lifted."""
        key = self.target(target, filters)
        with self._lock:
            lifted = (
                sorted(self._until) if key == "all" else [k for k in (key,) if k in self._until]
            )
            for k in lifted:
                del self._until[k]
            if lifted:
                self._save()
        return lifted

    def muted(self, alert: Alert) -> bool:
        """Whether `alert` is muted: its time is before the mute of its filter, its symbol or
        `all`."""
        if not self._until:
            return False
        with self._lock:
            until = self._until
            return any(
                alert.time < until.get(key, alert.time)
                for key in (alert.filter, alert.symbol, "all")
            )

    def expire(self, now_ms: int) -> list[str]:
        """Drop the mutes that ended `KEPT_AFTER` ms or longer before `now_ms` (an alert's time
        is its bar's start, so an alert of a day bar comes up to a day after it); returns their
        targets."""
        with self._lock:
            ended = [k for k, until in self._until.items() if until + KEPT_AFTER <= now_ms]
            for k in ended:
                del self._until[k]
            if ended:
                self._save()
        return ended

    def active(self, now_ms: int | None = None) -> dict[str, int]:
        """Each mute's target and end (epoch ms): those still in effect at `now_ms`, or all."""
        with self._lock:
            return {k: v for k, v in self._until.items() if now_ms is None or v > now_ms}

    def _load(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning(
                "Cannot read the Telegram mutes in %s (%s); none are in effect.", self.path, exc
            )
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): int(v) for k, v in data.items() if isinstance(v, int | float)}

    def _save(self) -> None:
        try:
            write_atomically(self.path, json.dumps(self._until, sort_keys=True))
        except OSError as exc:
            if not self._unsaved:
                log.warning(
                    "Cannot write the Telegram mutes to %s (%s); they hold until the run ends.",
                    self.path,
                    exc.strerror or exc,
                )
            self._unsaved = True


# -- what the commands read ----------------------------------------------------------------------


class Status(NamedTuple):
    """A snapshot of the run for `/status`."""

    view: View | None
    rate: float  # events per second between the last two views a second or more apart
    now_ms: int
    warming: list[tuple[str, str, int]]  # (symbol, timeframe, final bars seen) under the warm-up


class RunState:
    """What the commands read, written on the pipeline thread (`update`, `tick`) and read on the
    commands thread: the latest view, events per second, the last `RECENT_ALERTS` alerts, the
    last `RECENT_BARS` final bars of every (symbol, timeframe) and the run's clock.

    `live` False (a replay): the clock is the latest event time seen, so that a mute is
    measured on the replay's time. `store` and `notifier` give the journal and outbox sizes.
    """

    def __init__(
        self,
        *,
        live: bool = True,
        clock: Callable[[], float] = time.time,
        store: Store | None = None,
        notifier: TelegramNotifier | None = None,
    ) -> None:
        self.live = live
        self.store = store
        self.notifier = notifier
        self._clock = clock
        self._lock = threading.Lock()  # what the pipeline thread writes
        self._fold_lock = threading.Lock()  # the folded bars and counts
        self._view: View | None = None
        self._sample: tuple[int, int] | None = None  # (now_ms, events) of the rate's last view
        self._rate = 0.0
        self._event_ms = 0
        self._alerts: collections.deque[Alert] = collections.deque(maxlen=RECENT_ALERTS)
        self._pending: list[pl.DataFrame] = []
        self._bars: pl.DataFrame | None = None
        self._counts: dict[tuple[str, str], int] = {}

    # -- the pipeline thread -------------------------------------------------------------------

    def update(self, out: Output) -> None:
        """Take in one output: only references and the latest event time, so it costs little."""
        latest = 0 if self.live else _latest_event(out)
        with self._lock:
            if out.alerts:
                self._alerts.extend(out.alerts)
            for frame in (out.history, out.bars):
                if frame is not None and frame.height:
                    self._pending.append(frame)
            self._event_ms = max(self._event_ms, latest)
            crowded = len(self._pending) > _UNFOLDED
        if crowded and self._fold_lock.acquire(blocking=False):
            try:
                self._fold()
            finally:
                self._fold_lock.release()

    def tick(self, view: View) -> None:
        """Take in the pipeline's view; events per second are measured over a second or more."""
        with self._lock:
            self._view = view
            events = view.feed.events
            if self._sample is None:
                self._sample = (view.now_ms, events)
            elif view.now_ms - self._sample[0] >= 1000:
                then, before = self._sample
                self._rate = (events - before) * 1000 / (view.now_ms - then)
                self._sample = (view.now_ms, events)

    # -- any thread ----------------------------------------------------------------------------

    def now_ms(self) -> int:
        """The run's clock: the wall clock live, the latest event time in a replay (the wall
        clock before the first event)."""
        if self.live:
            return int(self._clock() * 1000)
        with self._lock:
            return self._event_ms or int(self._clock() * 1000)

    def alerts(self, n: int = RECENT_ALERTS, symbol: str | None = None) -> list[Alert]:
        """The last `n` alerts (of `symbol`), oldest first."""
        with self._lock:
            kept = [a for a in self._alerts if symbol in (None, a.symbol)]
        return kept[-n:] if n > 0 else []

    def bars(self, symbol: str, timeframe: str) -> pl.DataFrame | None:
        """The last final bars of `symbol` and `timeframe` (bar records with their indicator
        columns), oldest first; None when there are none."""
        with self._fold_lock:
            self._fold()
            folded = self._bars
        if folded is None:
            return None
        bars = folded.filter((pl.col("symbol") == symbol) & (pl.col("timeframe") == timeframe))
        return bars if bars.height else None

    def status(self) -> Status:
        with self._fold_lock:
            self._fold()
            counts = dict(self._counts)
        with self._lock:
            view, rate = self._view, self._rate
        warming: list[tuple[str, str, int]] = []
        if view is not None and view.warmup > 0:
            for symbol in view.symbols:
                for tf in view.timeframes:
                    n = counts.get((symbol, tf), 0)
                    if n < view.warmup:
                        warming.append((symbol, tf, n))
        return Status(view, rate, self.now_ms(), warming)

    def _fold(self) -> None:
        """Fold the bars handed in since the last call into the kept ones (`_fold_lock` held)."""
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        frames = [f for f in pending if "state" in f.columns and "start" in f.columns]
        if not frames:
            return
        new = pl.concat(frames, how="diagonal_relaxed").filter(
            pl.col("state").is_in(["final", "revised"])
        )
        keys = ["symbol", "timeframe"]
        finals = new.filter(pl.col("state") == "final").group_by(keys).len()
        for symbol, tf, n in finals.iter_rows():
            self._counts[(symbol, tf)] = self._counts.get((symbol, tf), 0) + n
        merged = new if self._bars is None else pl.concat([self._bars, new], how="diagonal_relaxed")
        self._bars = (
            merged.unique([*keys, "start"], keep="last", maintain_order=True)
            .sort("start")
            .group_by(keys, maintain_order=True)
            .tail(RECENT_BARS)
        )


def _latest_event(out: Output) -> int:
    """The latest event time an output carries (0 for none)."""
    latest = max((a.time for a in out.alerts), default=0)
    for frame, column in ((out.trades, "time"), (out.quotes, "time"), (out.bars, "end")):
        if frame is not None and frame.height and column in frame.columns:
            value = frame[column].max()
            if isinstance(value, int):
                latest = max(latest, value)
    return latest


# -- the commands worker -------------------------------------------------------------------------


class Photo(NamedTuple):
    """A reply that is a picture: PNG bytes and an HTML caption."""

    png: bytes
    caption: str


class _Refused(Exception):
    """Telegram refused the bot for good: the sentence says what to do."""


class _Unreachable(Exception):
    """A request that may work later: a network error, a server error, a 429 (with its wait)."""

    def __init__(self, what: str, wait: float | None = None) -> None:
        super().__init__(what)
        self.wait = wait


class TelegramCommands(Worker[None]):
    """Answers the commands of the chats and users in `allowed` with what `state`, `mutes` and
    `filters` hold, through the Bot API at `api_url`.

    `poll_timeout` is the long poll's length in seconds. `stop` does not wait for a long poll
    under way for more than a second: the thread is a daemon and ends when it is answered,
    answering nothing more. A refused token stops it with one sentence in `problems`.
    """

    def __init__(
        self,
        token: str,
        allowed: Iterable[str | int],
        state_dir: Path | str,
        *,
        state: RunState,
        mutes: Mutes,
        filters: FilterEngine | None = None,
        api_url: str = DEFAULT_TELEGRAM_API_URL,
        poll_timeout: float = 25.0,
        timeout: float = 10.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
    ) -> None:
        super().__init__("polystream-commands")
        if not token:
            raise CommandError("No Telegram bot token is set: set TELEGRAM_BOT_TOKEN.")
        self.allowed = frozenset(str(a).strip() for a in allowed if str(a).strip())
        self.state = state
        self.mutes = mutes
        self.filters = filters
        self.state_dir = Path(state_dir)
        self.api_url = api_url.rstrip("/")
        self.poll_timeout = max(0.0, poll_timeout)
        self.timeout = timeout
        self.problems: list[str] = []
        self.answered = 0  # commands answered
        self._base = f"{self.api_url}/bot{token}"
        self._bot = token.partition(":")[0]  # the bot's public id: offsets are per bot
        self._redact = Redactor([token, quote(token, safe="")])
        self._log_filter = RedactingFilter(self._redact)
        self._session = requests.Session()
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._failing = False
        self._ignored: set[str] = set()
        self._offset_path = self.state_dir / OFFSET_FILE
        self._offset_unsaved = False

    def __repr__(self) -> str:
        return self._redact(
            f"TelegramCommands(allowed={sorted(self.allowed)!r}, api_url={self.api_url!r})"
        )

    def start(self) -> Self:
        if not self.stopping:
            for name in _URLLIB3_LOGGERS:
                logging.getLogger(name).addFilter(self._log_filter)
        return super().start()

    def stop(self, timeout: float | None = _STOP_WAIT) -> None:
        """Stop polling; a long poll under way is waited for `timeout` seconds at most."""
        super().stop(timeout)
        if self.alive:
            return  # its request may still be logged by urllib3: the token filter stays on
        for name in _URLLIB3_LOGGERS:
            logging.getLogger(name).removeFilter(self._log_filter)
        self._session.close()

    # -- the thread ----------------------------------------------------------------------------

    def run(self) -> None:
        offset = self._load_offset()
        while not self.stopping:
            try:
                updates = self._call(
                    "getUpdates",
                    {
                        "offset": offset,
                        "timeout": int(self.poll_timeout),
                        "allowed_updates": ["message"],
                    },
                    read_timeout=self.poll_timeout + self.timeout,
                )
            except _Refused as exc:
                self._problem(str(exc))
                return
            except _Unreachable as exc:
                self._transient(str(exc), exc.wait)
                continue
            self._recovered()
            if self.stopping:
                return  # answered by the next run
            for update in updates if isinstance(updates, list) else []:
                if not isinstance(update, dict) or not isinstance(update.get("update_id"), int):
                    continue
                offset = max(offset or 0, update["update_id"] + 1)
                self._save_offset(offset)  # before answering: a crash skips it, never repeats it
                message = update.get("message")
                if isinstance(message, dict):
                    self._message(message)
                if self.stopping:
                    return

    def _message(self, message: dict[str, Any]) -> None:
        text = message.get("text")
        chat, sender = message.get("chat"), message.get("from")
        chat_id = chat.get("id") if isinstance(chat, dict) else None
        user_id = sender.get("id") if isinstance(sender, dict) else None
        if chat_id is None:
            return
        if str(chat_id) not in self.allowed and str(user_id) not in self.allowed:
            key = f"{chat_id}/{user_id}"
            if key not in self._ignored:
                self._ignored.add(key)
                log.warning(
                    "Ignored a Telegram message from chat %s (user %s), which "
                    "TELEGRAM_ALLOWED_IDS does not allow; further ones are ignored silently.",
                    chat_id,
                    user_id,
                )
            return
        if not isinstance(text, str) or not text.startswith("/"):
            return
        # a reply in a forum topic goes to that topic (elsewhere the id names a reply chain)
        thread = message.get("message_thread_id") if message.get("is_topic_message") else None
        where: dict[str, Any] = {"chat_id": chat_id}
        if isinstance(thread, int):
            where["message_thread_id"] = thread
        try:
            reply = self.answer(text)
        except PolystreamError as exc:
            reply = escape(str(exc))
        except Exception as exc:  # a command must not end the worker
            log.warning("The command %r failed", text.split()[0], exc_info=True)
            reply = escape(f"That command failed ({type(exc).__name__}: {exc}).")
        self.answered += 1
        if isinstance(reply, Photo):
            self._send_photo(where, reply)
        else:
            for part in split_message(reply):
                if part.strip():
                    self._send("sendMessage", where | {"text": part})

    # -- the commands --------------------------------------------------------------------------

    def answer(self, text: str) -> str | Photo:
        """The reply to a command's text: HTML text, or a photo."""
        words = text.split()
        command = words[0][1:].partition("@")[0].lower()
        args = words[1:]
        handlers: dict[str, Callable[[list[str]], str | Photo]] = {
            "status": self._status,
            "alerts": self._alerts,
            "filters": self._filters,
            "mute": self._mute,
            "unmute": self._unmute,
            "chart": self._chart,
            "help": self._help,
            "start": self._help,
        }
        handler = handlers.get(command)
        if handler is None:
            return f"Unknown command /{escape(command)}: /help lists the commands."
        return handler(args)

    def _help(self, args: list[str]) -> str:
        return HELP

    def _status(self, args: list[str]) -> str:
        st = self.state.status()
        if st.view is None:
            return "The run is starting: no status yet."
        view, f = st.view, st.view.feed
        lines = [f"<b>polystream</b> · feed <b>{escape(f.state)}</b>"]
        down = feed_down(f)
        if down:
            lines.append(f"⚠ feed down: {escape(down)}")
        lines.append(f"lag {f.lag_ms:,} ms · {st.rate:,.0f} events/s · {f.events:,} events")
        symbols = ", ".join(view.symbols) or "none"
        lines.append(f"symbols: {escape(symbols)} · bars {escape(' '.join(view.timeframes))}")
        if st.warming:
            shown = ", ".join(f"{s} {tf} {n}/{view.warmup}" for s, tf, n in st.warming[:8])
            more = f" and {len(st.warming) - 8} more" if len(st.warming) > 8 else ""
            lines.append(f"warming: {escape(shown)}{more}")
        else:
            lines.append("indicators warmed up")
        lines.append(f"{f.bars:,} bars · {f.alerts:,} alerts from {f.filters} filters")
        lines.append(self._sizes(view))
        mutes = self.mutes.active(self.state.now_ms())
        if mutes:
            muted = (f"{escape(k)} until {_moment(v)}" for k, v in sorted(mutes.items()))
            lines.append("muted: " + ", ".join(muted))
        return "\n".join(lines)

    def _sizes(self, view: View) -> str:
        """The journal's and the outbox's sizes."""
        sinks = view.feed.sinks
        store, notifier = self.state.store, self.state.notifier
        if store is not None:
            journal = f"journal {store.stats.journal_rows:,} rows"
        elif "journal KiB" in sinks:
            journal = f"journal {sinks['journal KiB']:,} KiB"
        else:
            journal = "no database"
        pending = notifier.stats.pending if notifier is not None else sinks.get("pending", 0)
        return f"{journal} · outbox {pending:,} pending"

    def _alerts(self, args: list[str]) -> str:
        n = 10
        if args:
            if not args[0].isdigit() or int(args[0]) < 1:
                raise CommandError(f"Invalid count {args[0]!r} for /alerts: give a number like 20.")
            n = min(int(args[0]), RECENT_ALERTS)
        alerts = self.state.alerts(n)
        if not alerts:
            return "No alerts yet in this run."
        lines = [f"<b>Last {len(alerts)} alert{'s' if len(alerts) != 1 else ''}</b>"]
        for a in alerts:
            where = f"{a.filter} · {a.symbol}" + (f" {a.timeframe}" if a.timeframe else "")
            message = " ".join(a.message.splitlines())
            lines.append(
                f"{clock_text(a.time)} <b>{escape(a.severity.upper())}</b> "
                f"{escape(where)}: {escape(message)}"
            )
        return "\n".join(lines)

    def _filters(self, args: list[str]) -> str:
        engine = self.filters
        loaded = list(engine.filters) if engine is not None else []
        if not loaded:
            return "No filters are loaded."
        fired = read_last_fired(self.state_dir)
        if engine is not None:
            for name, t in list(engine.last_fired.items()):
                fired[name] = max(t, fired.get(name, 0))
        mutes = self.mutes.active(self.state.now_ms())
        default_tf = timeframe_name(engine.timeframes[0]) if engine is not None else ""
        lines = [f"<b>{len(loaded)} filter{'s' if len(loaded) != 1 else ''}</b>"]
        for f in sorted(loaded, key=lambda f: f.name):
            on = (f.timeframe_name or default_tf) if f.on == "bar" else f"each {f.on}"
            last = fired.get(f.name)
            when = f"last fired {_moment(last)}" if last else "never fired"
            line = f"<b>{escape(f.name)}</b> · {escape(f.severity)} · {escape(on)} · {when}"
            if f.name in mutes:
                line += f" · muted until {_moment(mutes[f.name])}"
            lines.append(line)
        return "\n".join(lines)

    def _names(self) -> list[str]:
        """The filters' names, and that of the feed-state alerts."""
        loaded = [f.name for f in self.filters.filters] if self.filters is not None else []
        return [*loaded, FEED_ALERTS]

    def _mute(self, args: list[str]) -> str:
        if len(args) != 2:
            raise CommandError(
                "Write /mute FILTER|SYMBOL|all DURATION, such as /mute rsi-oversold 2h."
            )
        names = self._names()
        target = Mutes.target(args[0], names)
        view = self.state.status().view
        watched = view.symbols if view is not None else ()
        # a symbol is one the run watches (any symbol while the run starts)
        symbol = target.startswith("X:") and (not watched or target in watched)
        if target != "all" and target not in names and not symbol:
            raise CommandError(
                f"No filter or watched symbol is named {args[0]!r}: /filters lists the "
                "filters, /status the symbols."
            )
        seconds = parse_duration(args[1], "/mute")
        if seconds <= 0:
            raise CommandError(f"Invalid duration {args[1]!r} for /mute: give one like 30m or 2h.")
        until = self.state.now_ms() + int(seconds * 1000)
        self.mutes.mute(target, until, names)
        what = "every alert" if target == "all" else target
        return f"Muted {escape(what)} until {_moment(until)}."

    def _unmute(self, args: list[str]) -> str:
        if len(args) > 1:
            raise CommandError("Write /unmute, or /unmute FILTER|SYMBOL|all.")
        lifted = self.mutes.unmute(args[0] if args else "all", self._names())
        if not lifted:
            return "Nothing was muted." if not args else f"{escape(args[0])} was not muted."
        return f"Unmuted {escape(', '.join(lifted))}."

    def _chart(self, args: list[str]) -> str | Photo:
        if not 1 <= len(args) <= 2:
            raise CommandError("Write /chart SYMBOL [TIMEFRAME], such as /chart X:BTCUSD 1m.")
        symbol = normalize(args[0])
        view = self.state.status().view
        if len(args) == 2:
            tf = timeframe_name(parse_timeframe(args[1], "/chart"))
        elif view is not None and view.timeframes:
            tf = view.timeframes[0]
        else:
            tf = "1m"
        bars = self.state.bars(symbol, tf)
        if bars is None:
            return f"There are no final {escape(symbol)} {escape(tf)} bars yet to chart."
        try:
            from . import chart

            title = chart.title_for(bars, symbol)
            alerts = [a for a in self.state.alerts(symbol=symbol) if a.timeframe in (tf, None)]
            png = chart.render_png(
                bars, symbol=symbol, title=title, alerts=alerts, width=960, height=640
            )
        except PolystreamError as exc:  # the chart extra is not installed, say
            return escape(f"No chart: {exc}")
        marked = chart.visible_alerts(bars, alerts, symbol)
        caption = f"{escape(title)}\n{len(marked)} alert{'s' if len(marked) != 1 else ''} marked"
        return Photo(png, caption[:MAX_CAPTION])

    # -- the Bot API ---------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        payload: dict[str, Any],
        *,
        read_timeout: float | None = None,
        files: dict[str, tuple[str, bytes, str]] | None = None,
    ) -> Any:
        """One Bot API request; its `result`, else `_Refused` or `_Unreachable`."""
        url = f"{self._base}/{method}"
        timeout = (self.timeout, read_timeout or self.timeout)
        payload = {k: v for k, v in payload.items() if v is not None}  # absent, not null
        try:
            if files is None:
                response = self._session.post(url, json=payload, timeout=timeout)
            else:
                data = {k: str(v) for k, v in payload.items()}
                response = self._session.post(url, data=data, files=files, timeout=timeout)
        except requests.RequestException as exc:
            raise _Unreachable(
                self._redact(f"cannot reach Telegram ({type(exc).__name__}: {exc})")
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        if response.status_code == 200 and body.get("ok") is True:
            return body.get("result")
        code = body.get("error_code", response.status_code)
        description = str(body.get("description") or response.reason or "").rstrip(". ")
        if code == 401:
            raise _Refused(
                "Telegram refused the bot token, so commands are not answered: "
                "check TELEGRAM_BOT_TOKEN."
            )
        if code == 404:
            raise _Refused(
                "Telegram does not know this bot (404 Not Found), so commands are not answered: "
                "check TELEGRAM_BOT_TOKEN and TELEGRAM_API_URL."
            )
        if code == 409 and "webhook" in description.lower():
            raise _Refused(
                "Telegram refuses to hand out commands while a webhook is set for the bot: "
                "delete the webhook (deleteWebhook) or use another bot."
            )
        parameters = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
        if code == 429:
            wait = parameters.get("retry_after") if isinstance(parameters, dict) else None
            raise _Unreachable("Telegram asked to slow down", float(wait or 1))
        if code == 409:
            raise _Unreachable(
                f"Telegram answered 409 ({description}); another program may be reading this "
                "bot's updates"
            )
        if isinstance(code, int) and 400 <= code < 500:
            raise _Unreachable(f"Telegram refused {method}: {description}", float("inf"))
        raise _Unreachable(f"Telegram answered HTTP {response.status_code} ({description})")

    def _send(
        self,
        method: str,
        payload: dict[str, Any],
        files: dict[str, tuple[str, bytes, str]] | None = None,
    ) -> None:
        """Send a reply, trying a few times; a reply that cannot be sent is logged and dropped."""
        base: dict[str, Any] = {"parse_mode": "HTML"}
        if method == "sendMessage":
            base["disable_web_page_preview"] = True
        for attempt in range(3):
            try:
                self._call(method, base | payload, files=files)
                return
            except _Refused as exc:
                self._problem(str(exc))
                return
            except _Unreachable as exc:
                if exc.wait == float("inf") or attempt == 2 or self.stopping:
                    log.warning("%s", self._redact(f"A command's reply was dropped: {exc}."))
                    return
                self.sleep(exc.wait if exc.wait is not None else 0.5 * 2**attempt)

    def _send_photo(self, where: dict[str, Any], photo: Photo) -> None:
        self._send(
            "sendPhoto",
            where | {"caption": photo.caption},
            files={"photo": ("chart.png", photo.png, "image/png")},
        )

    def _transient(self, what: str, wait: float | None) -> None:
        delay = self._backoff.next() if wait is None or wait == float("inf") else wait
        level = logging.DEBUG if self._failing else logging.WARNING
        log.log(level, "%s", self._redact(f"Telegram commands: {what}; retrying in {delay:.2g} s."))
        self._failing = True
        self.sleep(delay)

    def _recovered(self) -> None:
        self._backoff.reset()
        if self._failing:
            self._failing = False
            log.info("Telegram commands are read again.")

    def _problem(self, sentence: str) -> None:
        sentence = self._redact(sentence)
        if sentence not in self.problems:
            self.problems.append(sentence)
            log.error("%s", sentence)
        self._stop.set()

    # -- the offset ----------------------------------------------------------------------------

    def _load_offset(self) -> int | None:
        try:
            data = json.loads(self._offset_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        kept = data.get(self._bot) if isinstance(data, dict) else None
        if not isinstance(kept, dict):
            return None
        offset, saved = kept.get("offset"), kept.get("saved")
        if not isinstance(offset, int) or not isinstance(saved, int | float):
            return None
        # Telegram keeps updates a day: an older offset guards against nothing, and after a
        # week without updates their ids start again at random, perhaps below it
        return offset if time.time() - saved < OFFSET_KEPT else None

    def _save_offset(self, offset: int) -> None:
        try:
            data = json.loads(self._offset_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        data = data if isinstance(data, dict) else {}
        data[self._bot] = {"offset": offset, "saved": int(time.time())}
        try:
            write_atomically(self._offset_path, json.dumps(data, sort_keys=True))
        except OSError as exc:
            if not self._offset_unsaved:
                log.warning(
                    "Cannot keep Telegram's update offset in %s (%s): after a restart, commands "
                    "Telegram still holds may be answered again.",
                    self._offset_path,
                    exc.strerror or exc,
                )
            self._offset_unsaved = True


def _moment(ms: int) -> str:
    """A time as `2024-05-01 14:30:00 UTC`."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))
