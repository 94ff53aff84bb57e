"""Feed-state alerts: what the person running `watch` must hear about without looking, sent to
the Telegram chats of the filters' alerts.

- the feed down (no data for longer than the watchdog) as `critical`, and back as `info`;
- gaps repaired over REST, as `info` (those of one tick in one message);
- the database unreachable for longer than a minute, as `critical`, and back, as `info`;
- the journal grown past a size, as `critical` (again only once it has fallen below the size).

Each kind is sent once per occurrence and has its own cooldown: a feed that drops again within
the cooldown of the last `down` message is not announced again (nor its return), so a flapping
connection cannot flood a phone. They are alerts of the filter `polystream`, their symbol the
kind (`feed`, `database`, `journal`, `gaps`): `/mute polystream 1h` silences them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .config import DEFAULTS
from .schema import Alert, Notice
from .sinks import BaseSink, Output, View, feed_down

if TYPE_CHECKING:
    from .notify import TelegramNotifier
    from .store import Store

FILTER = "polystream"
# How long the database may be unreachable before it is worth a message.
DATABASE_GRACE_MS = 60_000
# The journal size that is worth a message (rows wait there while the database is away), unless
# POLYSTREAM_JOURNAL_ALERT_MIB says otherwise.
JOURNAL_LIMIT = int(DEFAULTS["POLYSTREAM_JOURNAL_ALERT_MIB"]) * 1024 * 1024
# The quiet time after a message of each kind during which another of the same kind is held.
COOLDOWNS_MS = {"feed": 300_000, "database": 300_000, "journal": 1_800_000, "gaps": 60_000}


class FeedAlertSink(BaseSink):
    """Watches the run's view and status records, and offers feed-state alerts to `notifier`
    (see the module docstring); `muted` may hold some back, as it does filter alerts."""

    name = "feed alerts"

    def __init__(
        self,
        notifier: TelegramNotifier,
        *,
        store: Store | None = None,
        muted: Callable[[Alert], bool] | None = None,
        journal_limit: int = JOURNAL_LIMIT,
        database_grace_ms: int = DATABASE_GRACE_MS,
        cooldowns_ms: dict[str, int] | None = None,
    ) -> None:
        self.notifier = notifier
        self.store = store
        self.muted = muted
        self.journal_limit = journal_limit
        self.database_grace_ms = database_grace_ms
        self.cooldowns_ms = COOLDOWNS_MS | (cooldowns_ms or {})
        self.sent: dict[str, int] = {}  # alerts offered, by kind
        self._last: dict[str, int] = {}  # when each kind was last announced (pipeline ms)
        self._feed_down: int | None = None  # since when, while down
        self._feed_told = False  # its `down` was sent, so its return is too
        self._db_down: int | None = None
        self._db_told = False
        self._journal_told = False
        self._repaired: list[str] = []

    def write(self, out: Output) -> None:
        self._repaired += [n.detail for n in out.notices if n.event == "gap_repaired"]

    def tick(self, view: View) -> Sequence[Notice]:
        now = view.now_ms
        alerts = [
            *self._feed(view, now),
            *self._database(now),
            *self._journal(now),
            *self._gaps(now),
        ]
        self._offer(alerts)
        return ()

    # -- the kinds ------------------------------------------------------------------------------

    def _feed(self, view: View, now: int) -> list[Alert]:
        why = feed_down(view.feed)
        if why is not None and self._feed_down is None:
            self._feed_down = now - view.feed.quiet_ms
            self._feed_told = self._due("feed", now)
            if self._feed_told:
                return [self._alert("feed", "critical", now, f"feed down: {why}")]
        elif why is None and self._feed_down is not None:
            silent = (now - self._feed_down) / 1000
            self._feed_down = None
            if self._feed_told:
                self._feed_told = False
                reconnects = view.feed.reconnects
                return [
                    self._alert(
                        "feed",
                        "info",
                        now,
                        f"feed back after {silent:.0f} s without data "
                        f"({reconnects} reconnect{'s' if reconnects != 1 else ''} so far)",
                    )
                ]
        return []

    def _database(self, now: int) -> list[Alert]:
        if self.store is None:
            return []
        stats = self.store.stats
        down = not stats.connected and stats.last_error is not None
        if down and self._db_down is None:
            self._db_down = now
        if (
            down
            and self._db_down is not None
            and not self._db_told
            and now - self._db_down >= self.database_grace_ms
            and self._due("database", now)
        ):
            self._db_told = True
            waiting = f"; {stats.journal_rows:,} rows wait in the journal"
            reason = (stats.last_error or "").rstrip(".")
            text = f"database unreachable for {_duration(now - self._db_down)}: {reason}{waiting}"
            return [self._alert("database", "critical", now, text)]
        if not down and stats.connected and self._db_down is not None:
            away = now - self._db_down
            self._db_down = None
            if self._db_told:
                self._db_told = False
                text = f"database back after {_duration(away)}; the journal goes in first"
                return [self._alert("database", "info", now, text)]
        return []

    def _journal(self, now: int) -> list[Alert]:
        if self.store is None:
            return []
        size = self.store.stats.journal_bytes
        if size < self.journal_limit:
            self._journal_told = False
            return []
        if self._journal_told or not self._due("journal", now):
            return []
        self._journal_told = True
        text = (
            f"the journal holds {_mib(size)} in {self.store.journal.dir}, over "
            f"{_mib(self.journal_limit)}: rows are not reaching the database"
        )
        return [self._alert("journal", "critical", now, text)]

    def _gaps(self, now: int) -> list[Alert]:
        if not self._repaired or not self._due("gaps", now):
            return []
        lines, self._repaired = self._repaired, []
        text = "gap repaired: " + "; ".join(lines)
        return [self._alert("gaps", "info", now, text)]

    # -- sending --------------------------------------------------------------------------------

    def _due(self, kind: str, now: int) -> bool:
        """Whether the cooldown of `kind` has passed; if so, it starts again now."""
        last = self._last.get(kind)
        if last is not None and now - last < self.cooldowns_ms[kind]:
            return False
        self._last[kind] = now
        return True

    def _alert(self, kind: str, severity: str, now: int, message: str) -> Alert:
        return Alert(FILTER, kind, None, now, severity, message, {}, ("telegram",))

    def _offer(self, alerts: list[Alert]) -> None:
        if self.muted is not None:
            alerts = [a for a in alerts if not self.muted(a)]
        if not alerts:
            return
        for a in alerts:
            self.sent[a.symbol] = self.sent.get(a.symbol, 0) + 1
        self.notifier.offer(alerts)


def _duration(ms: int) -> str:
    return f"{ms / 60_000:.0f} min" if ms >= 120_000 else f"{ms / 1000:.0f} s"


def _mib(size: int) -> str:
    return f"{size / 1024 / 1024:,.0f} MiB"
