"""`polystream config`: the settings in effect, each with where it came from (a flag, the
environment, a `.env` line or the default), and what `--check` finds when it tries what they
point at: the database, the filters, the state directory, the Telegram settings and the API key,
one line each with what to do. Neither Telegram nor the market-data API is contacted.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import msgspec

from .config import (
    DEFAULTS,
    ENV_VARS,
    SECRET_VARS,
    Settings,
    default_state_dir,
    display_url,
    show_setting,
)
from .errors import ConfigError, PolystreamError

UNSET = "—"
# How long the database may take to answer (libpq's minimum is 2 seconds).
DB_TIMEOUT = 3
# Less free space than this may not hold the journal and the outbox through an outage.
LOW_SPACE = 100 * 2**20
# A bot token as @BotFather hands it out: the bot's id, a colon, then the secret part.
BOT_TOKEN = re.compile(r"\d+:[A-Za-z0-9_-]{20,}")
# What needs the API key.
KEY_USERS = "watch on the Polygon feed, backfill, and warm-up and gap repair over REST"

Status = Literal["ok", "off", "problem"]

# The settings `config` shows, in order (the API key's row is named by the variable that set it).
ROWS = tuple(v for v in ENV_VARS if v != "MASSIVE_API_KEY")
# Settings whose value is or holds a secret, shown redacted.
SECRET_ROWS = (*SECRET_VARS, "DATABASE_URL")


class Row(msgspec.Struct, frozen=True):
    """One setting as `config` shows it; `value` is None when it is unset."""

    name: str
    value: str | None
    origin: str
    secret: bool


class Check(msgspec.Struct, frozen=True):
    """One line of `config --check`: what was checked, how it went (`off`: not configured, which
    is no problem) and, when it is not ok, what to do."""

    name: str
    status: Status
    detail: str


def settings_rows(settings: Settings) -> list[Row]:
    """Every setting with the value in effect, safe to print, and where it came from."""
    rows = []
    for name in ROWS:
        if name == "POLYGON_API_KEY" and "MASSIVE_API_KEY" in settings.given:
            name = "MASSIVE_API_KEY"
        given = settings.given.get(name)
        value = show_setting(name, given) if given else _default(name, settings)
        origin = settings.origins.get(name, "default")
        rows.append(Row(name, value, origin, name in SECRET_ROWS))
    return rows


def _default(name: str, settings: Settings) -> str | None:
    if name == "POLYSTREAM_STATE_DIR":
        return str(default_state_dir())
    if name == "TELEGRAM_ALLOWED_IDS":  # the chats of TELEGRAM_CHAT_ID
        try:
            return ",".join(settings.telegram_allowed_ids) or None
        except ConfigError:
            return None
    return DEFAULTS.get(name)


def _columns(cells: list[tuple[str, ...]]) -> list[str]:
    """Rows of text cells, every column but the last padded to its widest cell."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in cells
    ]


def settings_lines(rows: list[Row]) -> list[str]:
    return _columns([(r.name, r.value or UNSET, r.origin) for r in rows])


def check_lines(checks: list[Check]) -> list[str]:
    return _columns([(c.status, c.name, c.detail) for c in checks])


def records(items: Sequence[Row] | Sequence[Check]) -> list[dict[str, object]]:
    """Rows or checks as the objects `--json` prints."""
    return [msgspec.structs.asdict(item) for item in items]


def run_checks(settings: Settings) -> list[Check]:
    """Every check, in the order `config --check` prints them."""
    return [
        _api_key(settings),
        *_feed(settings),
        _database(settings),
        _filters(settings),
        _state(settings),
        _telegram(settings),
    ]


def _api_key(settings: Settings) -> Check:
    if not settings.api_key:
        return Check(
            "api key",
            "off",
            f"No API key is set, which {KEY_USERS} need: set POLYGON_API_KEY in the environment "
            "or .env (demo, simulate, analyze and replays need none).",
        )
    name = "MASSIVE_API_KEY" if "MASSIVE_API_KEY" in settings.given else "POLYGON_API_KEY"
    origin = settings.origins.get(name, "default")
    return Check("api key", "ok", f"{name} is set, from {origin}, for {KEY_USERS}.")


def _feed(settings: Settings) -> list[Check]:
    """The feed's and the REST API's URLs: a problem line for each bad one (neither is
    contacted)."""
    shown, problems = [], []
    for attribute in ("ws_url", "rest_url"):
        try:
            shown.append(display_url(getattr(settings, attribute)))
        except ConfigError as exc:
            problems.append(Check("feed", "problem", str(exc)))
    if problems:
        return problems
    return [Check("feed", "ok", f"{' and '.join(shown)} are well-formed (not contacted).")]


def _database(settings: Settings) -> Check:
    from .store import Unreachable, require_migrated, where

    try:
        url = settings.database_url
        if url is None:
            return Check(
                "database",
                "off",
                "DATABASE_URL is not set, so storage is off: set it to store rows, then run "
                "`polystream migrate`.",
            )
        _reach(url)
        require_migrated(url)
    except Unreachable as exc:
        return Check(
            "database", "problem", f"{str(exc).rstrip('.')}; start it, or correct DATABASE_URL."
        )
    except PolystreamError as exc:
        return Check("database", "problem", str(exc))
    return Check("database", "ok", f"PostgreSQL at {where(url)} has every migration applied.")


def _reach(url: str) -> None:
    """Connect once, giving up after `DB_TIMEOUT` seconds, so that a database that does not
    answer makes a problem line rather than a long wait."""
    import psycopg

    from .store import connect_error

    try:
        psycopg.connect(url, connect_timeout=DB_TIMEOUT).close()
    except psycopg.Error as exc:
        raise connect_error(url, exc) from None


def _filters(settings: Settings) -> Check:
    from .filters import load_directory

    directory = settings.filters_dir
    if not directory.exists():
        origin = settings.origins.get("POLYSTREAM_FILTERS_DIR")
        if origin is not None:
            return Check(
                "filters",
                "problem",
                f"POLYSTREAM_FILTERS_DIR {directory} ({origin}) does not exist: create it, or "
                "correct the setting.",
            )
        return Check(
            "filters",
            "off",
            f"{directory} does not exist, so watch raises no alerts: `polystream filter add` "
            "creates it with a filter (the demo runs the shipped ones).",
        )
    try:
        loaded = load_directory(directory)
    except PolystreamError as exc:
        return Check("filters", "problem", str(exc))
    files = len(loaded.filters) + len(loaded.errors)
    if loaded.errors:
        return Check(
            "filters",
            "problem",
            f"{len(loaded.errors)} of {files} filter files in {directory} are not valid: "
            "`polystream filter validate` shows every problem.",
        )
    if not files:
        return Check(
            "filters",
            "off",
            f"{directory} holds no filter files, so watch raises no alerts: "
            "`polystream filter add` writes one.",
        )
    return Check("filters", "ok", f"{directory} holds {_count(files, 'valid filter file')}.")


def _state(settings: Settings) -> Check:
    try:
        directory = settings.state_dir
    except ConfigError as exc:
        return Check("state", "problem", str(exc))
    existing = next((p for p in (directory, *directory.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    if free < LOW_SPACE:
        return Check(
            "state",
            "problem",
            f"Only {_size(free)} is free for the state directory {directory}: free some space, "
            "or point POLYSTREAM_STATE_DIR at another disk.",
        )
    found = "exists" if existing == directory else "will be created when first used"
    return Check("state", "ok", f"{directory} {found} and can be written; {_size(free)} free.")


def _telegram(settings: Settings) -> Check:
    token = settings.telegram_bot_token
    try:
        chats = settings.telegram_chat_ids
        settings.telegram_allowed_ids  # noqa: B018  (checks its form)
        settings.journal_alert_bytes  # noqa: B018
    except ConfigError as exc:
        return Check("telegram", "problem", str(exc))
    if not token and not chats:
        return Check(
            "telegram",
            "off",
            "TELEGRAM_BOT_TOKEN and TELEGRAM_CHAT_ID are not set, so alerts stay on this "
            "machine: set both to send them to Telegram.",
        )
    if not token or not chats:
        have, lack = (
            ("TELEGRAM_BOT_TOKEN", "TELEGRAM_CHAT_ID")
            if token
            else ("TELEGRAM_CHAT_ID", "TELEGRAM_BOT_TOKEN")
        )
        return Check(
            "telegram", "problem", f"{have} is set but {lack} is not: set both, or neither."
        )
    if not BOT_TOKEN.fullmatch(token):
        return Check(
            "telegram",
            "problem",
            "TELEGRAM_BOT_TOKEN does not look like a bot token (digits, a colon, then the secret "
            "part): copy it again from @BotFather.",
        )
    try:
        api = display_url(settings.telegram_api_url)
    except ConfigError as exc:
        return Check("telegram", "problem", str(exc))
    return Check(
        "telegram",
        "ok",
        f"A bot token and {_count(len(chats), 'chat id')} are set, for the Bot API at {api} "
        "(not contacted).",
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _size(n: int) -> str:
    """A number of bytes in binary units: `512 bytes`, `3.2 GB`."""
    units = ("bytes", "KB", "MB", "GB", "TB")
    value, unit = float(n), 0
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{n} bytes" if unit == 0 else f"{value:,.1f} {units[unit]}"


def require_ok(checks: list[Check]) -> None:
    """Raise `ConfigError` (exit 1) when any check found a problem."""
    problems = sum(c.status == "problem" for c in checks)
    if problems:
        raise ConfigError(
            f"{problems} of {len(checks)} checks found a problem; each problem line says what "
            "to do."
        )
