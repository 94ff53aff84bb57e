"""Settings from flags, the environment, `.env` and defaults (in that order of precedence).

`load_settings` merges them and remembers where each value came from; each value is checked
when it is used and a bad one raises `ConfigError` naming the setting at fault.
Secrets are never shown whole: `redact` and `Redactor` turn them into `abc…xyz`.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple
from urllib.parse import urlsplit

import msgspec
from dotenv import dotenv_values
from dotenv.parser import parse_stream

from .errors import ConfigError, UsageError

DEFAULT_WS_URL = "wss://socket.massive.com/crypto"
DEFAULT_REST_URL = "https://api.massive.com"
DEFAULT_TELEGRAM_API_URL = "https://api.telegram.org"

TIMEFRAMES: dict[str, int] = {
    "1s": 1_000,
    "5s": 5_000,
    "15s": 15_000,
    "30s": 30_000,
    "1m": 60_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "4h": 14_400_000,
    "1d": 86_400_000,
}
CHANNELS = ("XT", "XQ", "XA", "XAS", "XL2")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _bad(setting: str, sentence: str) -> ConfigError:
    """An option's bad value is bad usage (exit 2); a setting's, a configuration error."""
    return UsageError(sentence) if setting.startswith("-") else ConfigError(sentence)


def parse_timeframe(text: str, setting: str = "--timeframe") -> int:
    """Return the timeframe's length in milliseconds."""
    value = text.strip()
    if value.endswith("M"):  # a month to some, a minute to others: neither is guessed
        raise _bad(setting, f"Unknown timeframe {text!r} for {setting}: write 1m for a minute.")
    value = value.lower()
    if value not in TIMEFRAMES:
        raise _bad(
            setting, f"Unknown timeframe {text!r} for {setting}: use one of {' '.join(TIMEFRAMES)}."
        )
    return TIMEFRAMES[value]


def timeframe_name(ms: int) -> str:
    """The name (`1m`) of a timeframe given in milliseconds."""
    for name, length in TIMEFRAMES.items():
        if length == ms:
            return name
    raise ValueError(ms)


def parse_duration(text: str, setting: str) -> float:
    """Seconds from `90`, `30s`, `5m`, `1h`, `1d` or `250ms`."""
    m = _DURATION.match(text)
    if not m:
        sentence = f"Invalid duration {text!r} for {setting}: write it like 30s, 5m or 1h."
        raise _bad(setting, sentence)
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_channels(text: str) -> tuple[str, ...]:
    """Validate a comma-separated channel list such as `XT,XQ`."""
    items = tuple(dict.fromkeys(c.strip().upper() for c in text.split(",") if c.strip()))
    bad = [c for c in items if c not in CHANNELS]
    if bad or not items:
        raise UsageError(
            f"Unknown channel {', '.join(bad) or repr(text)} for --channels: "
            f"use a comma-separated list of {','.join(CHANNELS)}."
        )
    return items


def redact(secret: str) -> str:
    """Show a secret as `abc…xyz` (or `…` when it is too short to show any of it)."""
    if len(secret) < 12:
        return "…"
    return f"{secret[:3]}…{secret[-3:]}"


class Redactor:
    """Replaces every known secret in a text by its redacted form."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, redact(secret))
        return text


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs secrets from every record that passes it."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._redactor(record.getMessage())
        record.args = None
        return True


def _netloc(url: str) -> tuple[str, str]:
    """`(scheme, netloc)` of `scheme://netloc/…`, the netloc ending where `urlsplit` ends it, but
    without ever raising (empty strings when there is no `://`)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", ""
    return scheme, re.split(r"[/?#]", rest, maxsplit=1)[0]


def display_url(url: str) -> str:
    """A URL safe to print: any password it carries is replaced by `…` (malformed URLs too)."""
    scheme, netloc = _netloc(url)
    userinfo, _, hostport = netloc.rpartition("@")
    if ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:…@{hostport}{url[len(scheme) + 3 + len(netloc) :]}"


def _host_and_port(name: str, item: str, example: str) -> None:
    """Raise `ConfigError` unless `item` is `host`, `host:port` or `[IPv6]:port`."""
    if "[" in item or "]" in item:
        if item.count("[") != item.count("]"):
            raise ConfigError(
                f"{name} has an unbalanced [ or ] around its IPv6 address: "
                "write the address like [::1]."
            )
        bracketed = re.fullmatch(r"\[([^\[\]]*)\](?::(.*))?", item)
        if bracketed is None:
            raise ConfigError(
                f"{name} has a [ ] that does not enclose just an IPv6 address: "
                "write the address like [::1]."
            )
        host, port = bracketed.group(1), bracketed.group(2) or ""
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ConfigError(f"{name} has no valid IPv6 address between its brackets.") from None
    elif item.count(":") > 1:
        raise ConfigError(
            f"{name} has an IPv6 address without brackets: write the address like [::1]."
        )
    else:
        host, _, port = item.partition(":")
    if not host:
        raise ConfigError(f"{name} has no host: write it like {example}.")
    if port and not re.fullmatch(r"[0-9]+", port):
        raise ConfigError(f"{name} has a port that is not a number: use one from 1 to 65535.")
    if port and not 1 <= int(port) <= 65535:
        raise ConfigError(f"{name} has a port outside 1 to 65535.")


def check_url(
    name: str,
    value: str,
    schemes: tuple[str, ...],
    *,
    credentials: bool = False,
    example: str | None = None,
) -> str:
    """`value` (without a trailing `/`) when it is a URL with one of `schemes`, a host and a port
    in 1–65535, and user name and password only where `credentials` allows them; otherwise a
    `ConfigError` naming `name`. The value is never echoed: in a malformed URL a password can sit
    in any part, so no part of it is known to be safe to show."""
    example = example or f"{schemes[-1]}://host:port/path"
    scheme, netloc = _netloc(value)
    _, at, hostport = netloc.rpartition("@")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise ConfigError(f"{name} is not a URL: write it like {example}.")
    if scheme.lower() not in schemes:
        raise ConfigError(
            f"{name} must start with {' or '.join(s + '://' for s in schemes)}, "
            f"not {scheme.lower()}://: write it like {example}."
        )
    if at and not credentials:
        raise ConfigError(
            f"A user name or password is not allowed in {name}: remove the part up to the @."
        )
    for item in hostport.split(","):  # libpq's host1,host2:port lists
        _host_and_port(name, item, example)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (what later code does with the URL must not raise either)
    except ValueError:
        if "," in hostport:
            raise ConfigError(
                f"{name} gives a port to a host other than the last, which polystream cannot "
                "read: give a port to the last host only."
            ) from None
        raise ConfigError(
            f"{name} cannot be read as a URL: percent-encode any [ ] @ / ? # or : "
            "in its user name or password."
        ) from None
    return value.rstrip("/") if parts.path in ("", "/") else value


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "polystream"


ENV_VARS = (
    "POLYGON_API_KEY",
    "MASSIVE_API_KEY",
    "POLYGON_WS_URL",
    "POLYGON_REST_URL",
    "DATABASE_URL",
    "TELEGRAM_BOT_TOKEN",
    "TELEGRAM_CHAT_ID",
    "TELEGRAM_ALLOWED_IDS",
    "TELEGRAM_API_URL",
    "POLYSTREAM_FILTERS_DIR",
    "POLYSTREAM_STATE_DIR",
    "POLYSTREAM_JOURNAL_ALERT_MIB",
)
_API_KEY_VARS = ("POLYGON_API_KEY", "MASSIVE_API_KEY")
SECRET_VARS = (*_API_KEY_VARS, "TELEGRAM_BOT_TOKEN")
# Values of the settings that have one when unset (the state directory's depends on the user).
DEFAULTS = {
    "POLYGON_WS_URL": DEFAULT_WS_URL,
    "POLYGON_REST_URL": DEFAULT_REST_URL,
    "TELEGRAM_API_URL": DEFAULT_TELEGRAM_API_URL,
    "POLYSTREAM_FILTERS_DIR": "filters",
    "POLYSTREAM_JOURNAL_ALERT_MIB": "256",
}
# Where a value can come from, the first beating the others.
_LAYERS = ("flag", "env", ".env")


class _Url(NamedTuple):
    """How a URL setting is checked: its schemes, an example for the error, and whether it may
    carry a user name and password."""

    schemes: tuple[str, ...]
    example: str
    credentials: bool = False


_URLS = {
    "POLYGON_WS_URL": _Url(("ws", "wss"), DEFAULT_WS_URL),
    "POLYGON_REST_URL": _Url(("http", "https"), DEFAULT_REST_URL),
    "DATABASE_URL": _Url(
        ("postgresql", "postgres"), "postgresql://user:password@host:5432/database", True
    ),
    "TELEGRAM_API_URL": _Url(("http", "https"), DEFAULT_TELEGRAM_API_URL),
}


def _checked_url(name: str, value: str) -> str:
    spec = _URLS[name]
    return check_url(name, value, spec.schemes, credentials=spec.credentials, example=spec.example)


def _password(url: str) -> str | None:
    """The password of `scheme://user:password@host…`, found without reading the rest of the
    URL, which may be malformed."""
    userinfo = _netloc(url)[1].rpartition("@")[0]
    return userinfo.partition(":")[2] or None


def _chat_ids(text: str) -> tuple[str, ...]:
    """Chats to send to: numeric ids or @channelname, each optionally `:THREAD` (a forum topic,
    such as -100123:45)."""
    ids = tuple(c.strip() for c in text.split(",") if c.strip())
    bad = [c for c in ids if not re.fullmatch(r"(?:-?\d+|@\w{4,})(?::\d+)?", c)]
    if bad:
        raise ConfigError(
            f"Invalid chat id {bad[0]!r} in TELEGRAM_CHAT_ID: use numeric ids (or @channelname), "
            "each optionally with :THREAD for a forum topic, comma-separated."
        )
    return ids


def _allowed_ids(text: str) -> tuple[str, ...]:
    """Chats and users whose commands are answered: numeric ids, or `none` for no commands."""
    if text.strip().lower() == "none":
        return ()
    ids = tuple(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    bad = [c for c in ids if not re.fullmatch(r"-?\d+", c)]
    if bad or not ids:
        shown = f"id {bad[0]!r}" if bad else "value"
        raise ConfigError(
            f"Invalid {shown} in TELEGRAM_ALLOWED_IDS: use numeric chat or user ids, "
            "comma-separated, or none to answer no commands."
        )
    return ids


def show_setting(name: str, value: str) -> str:
    """A setting's value safe to print: a secret as `abc…xyz`, a URL without its password, and
    nothing of a URL that fails its check (a password can sit in any part of one)."""
    if name in SECRET_VARS:
        return redact(value)
    if name in _URLS:
        try:
            return display_url(_checked_url(name, value))
        except ConfigError:
            return "(not a valid URL)"
    return value


class Settings(msgspec.Struct, frozen=True):
    """Configuration: `given` holds each variable's value as given (unset ones are absent),
    `origins` where it came from (`flag`, `env` or `.env (path:line)`).

    Each property checks its value when it is read, not when the settings load: a bad value
    stops only a command that uses it (a bad POLYGON_WS_URL does not stop the demo feed), with
    one sentence naming the setting. `repr` redacts secrets.
    """

    given: Mapping[str, str] = msgspec.field(default_factory=dict)
    origins: Mapping[str, str] = msgspec.field(default_factory=dict)

    @property
    def api_key(self) -> str | None:
        return self.given.get("POLYGON_API_KEY") or self.given.get("MASSIVE_API_KEY")

    @property
    def ws_url(self) -> str:
        return _checked_url("POLYGON_WS_URL", self.given.get("POLYGON_WS_URL", DEFAULT_WS_URL))

    @property
    def rest_url(self) -> str:
        return _checked_url(
            "POLYGON_REST_URL", self.given.get("POLYGON_REST_URL", DEFAULT_REST_URL)
        )

    @property
    def database_url(self) -> str | None:
        url = self.given.get("DATABASE_URL")
        return _checked_url("DATABASE_URL", url) if url else None

    @property
    def telegram_bot_token(self) -> str | None:
        return self.given.get("TELEGRAM_BOT_TOKEN")

    @property
    def telegram_chat_ids(self) -> tuple[str, ...]:
        return _chat_ids(self.given.get("TELEGRAM_CHAT_ID", ""))

    @property
    def telegram_allowed_ids(self) -> tuple[str, ...]:
        """Who may send commands: TELEGRAM_ALLOWED_IDS, else the numeric chats of
        TELEGRAM_CHAT_ID (a topic entry allows its whole chat)."""
        given = self.given.get("TELEGRAM_ALLOWED_IDS")
        if given is not None:
            return _allowed_ids(given)
        chats = (c.partition(":")[0] for c in self.telegram_chat_ids)
        return tuple(dict.fromkeys(c for c in chats if not c.startswith("@")))

    @property
    def telegram_api_url(self) -> str:
        return _checked_url(
            "TELEGRAM_API_URL", self.given.get("TELEGRAM_API_URL", DEFAULT_TELEGRAM_API_URL)
        )

    @property
    def filters_dir(self) -> Path:
        return Path(self.given.get("POLYSTREAM_FILTERS_DIR", DEFAULTS["POLYSTREAM_FILTERS_DIR"]))

    @property
    def state_dir(self) -> Path:
        given = self.given.get("POLYSTREAM_STATE_DIR")
        return _state_dir(Path(given) if given else default_state_dir())

    @property
    def journal_alert_bytes(self) -> int:
        """The journal size that is worth a Telegram message (POLYSTREAM_JOURNAL_ALERT_MIB)."""
        name = "POLYSTREAM_JOURNAL_ALERT_MIB"
        given = self.given.get(name, DEFAULTS[name]).strip()
        if not given.isdigit() or int(given) < 1:
            raise ConfigError(f"Invalid {name} {given!r}: give a whole number of MiB, such as 256.")
        return int(given) * 1024 * 1024

    @property
    def secrets(self) -> list[str]:
        password = _password(self.given.get("DATABASE_URL", ""))
        return [s for s in (self.api_key, self.telegram_bot_token, password) if s]

    def redactor(self) -> Redactor:
        return Redactor(self.secrets)

    def __repr__(self) -> str:
        shown = (f"{name}={show_setting(name, value)!r}" for name, value in self.given.items())
        return self.redactor()(f"Settings({', '.join(shown)})")


def load_settings(
    overrides: Mapping[str, str | None] | None = None,
    environ: Mapping[str, str] | None = None,
    env_file: Path | None = Path(".env"),
) -> Settings:
    """Merge flags (`overrides`, keyed by variable name) > environment > `.env` > defaults,
    remembering where each value came from. Only an unreadable `.env` raises here: each value
    is checked where it is used (see `Settings`)."""
    chosen: dict[str, tuple[str, str]] = {}
    if env_file is not None and env_file.is_file():
        where = env_file.resolve()
        for name, (value, line) in _read_env_file(env_file).items():
            chosen[name] = (value, f".env ({where}:{line})")
    env = os.environ if environ is None else environ
    chosen.update({k: (env[k], "env") for k in ENV_VARS if env.get(k)})
    chosen.update({k: (v, "flag") for k, v in (overrides or {}).items() if v})
    # One API key: the one from the highest layer (POLYGON_API_KEY when a layer has both).
    keys = sorted(
        (k for k in _API_KEY_VARS if k in chosen),
        key=lambda k: _LAYERS.index(chosen[k][1].split(" ", 1)[0]),
    )
    for beaten in keys[1:]:
        del chosen[beaten]
    return Settings(
        given=MappingProxyType({k: value for k, (value, _) in chosen.items()}),
        origins=MappingProxyType({k: origin for k, (_, origin) in chosen.items()}),
    )


def _state_dir(path: Path) -> Path:
    """The state directory, refused at once when it can never be one (it is created on use)."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(
            f"POLYSTREAM_STATE_DIR {path} cannot be a directory, as {existing} is a file: "
            "point it elsewhere."
        )
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"POLYSTREAM_STATE_DIR {path} cannot be written, as {existing} does not allow it: "
            "point it elsewhere, or allow it."
        )
    return path


_warned: set[tuple[str, int, int]] = set()


def _read_env_file(path: Path) -> dict[str, tuple[str, int]]:
    """polystream's variables set in a `.env` file, each with the line that sets it; a line
    that is not NAME=value is reported (once per version of the file) with the file and line,
    and ignored."""
    try:
        text = path.read_text(encoding="utf-8")
        stamp = path.stat()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read {path}: {getattr(exc, 'strerror', None) or exc}.") from None
    key = (str(path.resolve()), stamp.st_mtime_ns, stamp.st_size)
    report = key not in _warned
    _warned.add(key)
    lines: dict[str, int] = {}
    for binding in parse_stream(io.StringIO(text)):
        if binding.error and report:
            logging.getLogger(__name__).warning(
                "%s line %d is not NAME=value and was ignored", path, binding.original.line
            )
        elif binding.key is not None:
            lines[binding.key] = binding.original.line  # a later line wins, as in dotenv
    logging.getLogger("dotenv.main").setLevel(logging.ERROR)  # reported above, once
    values = dotenv_values(stream=io.StringIO(text))
    return {k: (v, lines[k]) for k, v in values.items() if v and k in ENV_VARS and k in lines}


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` (`--shard`) → (K, N), with 0 <= K < N."""
    k, sep, n = text.partition("/")
    try:
        shard, shards = int(k), int(n)
    except ValueError:
        shard, shards = -1, 0
    if not sep or not 0 <= shard < shards:
        raise UsageError(
            f"Invalid --shard {text!r}: write K/N with 0 <= K < N, such as 0/2 and 1/2."
        )
    return shard, shards
