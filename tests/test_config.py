import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import API_KEY
from polystream.config import (
    DEFAULT_REST_URL,
    DEFAULT_TELEGRAM_API_URL,
    DEFAULT_WS_URL,
    ENV_VARS,
    Redactor,
    check_url,
    display_url,
    load_settings,
    parse_channels,
    parse_duration,
    parse_timeframe,
    redact,
    show_setting,
)
from polystream.errors import ConfigError
from polystream.simulator import DemoFeed

KEY = "pk_live_0123456789abcdef"

# The attribute of `Settings` that reads (and checks) each variable.
ATTRIBUTES = {
    "DATABASE_URL": "database_url",
    "POLYGON_WS_URL": "ws_url",
    "POLYGON_REST_URL": "rest_url",
    "TELEGRAM_API_URL": "telegram_api_url",
    "TELEGRAM_CHAT_ID": "telegram_chat_ids",
}


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    path = tmp_path / ".env"
    path.write_text(
        "# comment\n"
        "POLYGON_API_KEY=from-dotenv-000000\n"
        "POLYGON_WS_URL=wss://dotenv.example/crypto\n"
        "TELEGRAM_CHAT_ID='1, -1002, @alerts_channel'\n"
    )
    return path


def test_precedence_flag_env_dotenv_default(env_file: Path) -> None:
    s = load_settings({}, environ={}, env_file=env_file)
    assert s.api_key == "from-dotenv-000000"
    assert s.ws_url == "wss://dotenv.example/crypto"
    assert s.rest_url == "https://api.massive.com"
    assert s.telegram_chat_ids == ("1", "-1002", "@alerts_channel")

    s = load_settings({}, environ={"POLYGON_API_KEY": KEY}, env_file=env_file)
    assert s.api_key == KEY

    s = load_settings(
        {"POLYGON_API_KEY": "from-flag-1111111"},
        environ={"POLYGON_API_KEY": KEY},
        env_file=env_file,
    )
    assert s.api_key == "from-flag-1111111"


def test_massive_key_is_accepted() -> None:
    s = load_settings({}, environ={"MASSIVE_API_KEY": KEY}, env_file=None)
    assert s.api_key == KEY


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("POLYGON_WS_URL", "http://socket.example/crypto"),
        ("POLYGON_WS_URL", "socket.massive.com"),
        ("POLYGON_REST_URL", "ftp://api.example"),
        ("DATABASE_URL", "mysql://u:secretpw@db/x"),
        ("TELEGRAM_API_URL", "https://"),
        ("TELEGRAM_CHAT_ID", "12,abc"),
        ("POLYGON_WS_URL", "wss://host:99999/crypto"),
    ],
)
def test_invalid_values_name_the_setting(name: str, value: str) -> None:
    settings = load_settings({}, environ={name: value}, env_file=None)  # checked on use
    with pytest.raises(ConfigError) as info:
        getattr(settings, ATTRIBUTES[name])
    message = str(info.value)
    assert name in message
    assert "secretpw" not in message
    assert message.endswith(".") and "\n" not in message


def test_timeframes_and_durations() -> None:
    assert parse_timeframe("1m") == 60_000
    assert parse_timeframe("4H") == 14_400_000
    with pytest.raises(ConfigError, match="Unknown timeframe '7m' for --timeframe"):
        parse_timeframe("7m")
    assert parse_duration("5m", "cooldown") == 300
    assert parse_duration("90", "cooldown") == 90
    with pytest.raises(ConfigError, match="cooldown"):
        parse_duration("soon", "cooldown")


def test_channels() -> None:
    assert parse_channels("xt, XQ,XT") == ("XT", "XQ")
    with pytest.raises(ConfigError, match="XZ"):
        parse_channels("XT,XZ")


def test_secrets_are_redacted_everywhere() -> None:
    s = load_settings(
        {},
        environ={
            "POLYGON_API_KEY": KEY,
            "TELEGRAM_BOT_TOKEN": "123456:ABCdefGhIJKlmNoPQRsTUVwxyZ",
            "DATABASE_URL": "postgresql://me:hunter2hunter2@db.local:5432/market",
        },
        env_file=None,
    )
    text = repr(s)
    assert KEY not in text and "ABCdefGhIJKlmNoPQRsTUVwxyZ" not in text
    assert "hunter2hunter2" not in text
    assert redact(KEY) in text
    assert redact(KEY) == "pk_…def"
    assert redact("short") == "…"
    scrub = Redactor(s.secrets)
    assert scrub(f"auth {KEY} failed") == "auth pk_…def failed"
    assert display_url(s.database_url or "") == "postgresql://me:…@db.local:5432/market"


PASSWORD = "s3cr3t-pw-XYZ"

# Every URL setting, its scheme, a scheme it must refuse, and whether it may carry a password.
URL_SETTINGS = {
    "DATABASE_URL": ("postgresql", "mysql", True),
    "POLYGON_WS_URL": ("wss", "http", False),
    "POLYGON_REST_URL": ("https", "ftp", False),
    "TELEGRAM_API_URL": ("https", "ftp", False),
}


def bad_url_forms(setting: str) -> dict[str, tuple[str, str]]:
    """Form name -> (malformed value, words its error must contain)."""
    scheme, wrong, credentials = URL_SETTINGS[setting]
    auth = f"u:{PASSWORD}@" if credentials else ""
    forms = {
        "port 99999": (f"{scheme}://{auth}127.0.0.1:99999/x", "port outside 1 to 65535"),
        "port 0": (f"{scheme}://{auth}127.0.0.1:0/x", "port outside 1 to 65535"),
        "port abc": (f"{scheme}://{auth}127.0.0.1:abc/x", "port that is not a number"),
        "empty host": (f"{scheme}://{auth}:5432/x", "has no host"),
        "no host at all": (f"{scheme}://", "has no host"),
        "wrong scheme": (f"{wrong}://{auth}127.0.0.1:5432/x", f"not {wrong}://"),
        "garbage": (f"::{PASSWORD}::not a url", "is not a URL"),
        "no scheme": (f"127.0.0.1:5432/{PASSWORD}", "is not a URL"),
        "ipv6 [ unbalanced": (f"{scheme}://{auth}[::1:5432/x", "unbalanced [ or ]"),
        "ipv6 ] unbalanced": (f"{scheme}://{auth}::1]:5432/x", "unbalanced [ or ]"),
        "ipv6 without brackets": (f"{scheme}://{auth}::1:5432/x", "without brackets"),
        "ipv6 not an address": (f"{scheme}://{auth}[zz]:5432/x", "no valid IPv6 address"),
    }
    if credentials:
        # the password where the port belongs (host forgotten): never echoed as a port
        forms["password as port"] = (f"{scheme}://u:{PASSWORD}/x", "port that is not a number")
        forms["bracket in password"] = (
            f"{scheme}://u:{PASSWORD}[x@127.0.0.1/x",
            "percent-encode",
        )
    else:
        forms["credentials"] = (f"{scheme}://u:{PASSWORD}@127.0.0.1:9/x", "is not allowed")
        forms["user name only"] = (f"{scheme}://{PASSWORD}@127.0.0.1:9/x", "is not allowed")
    return forms


BAD_URLS = [
    pytest.param(setting, value, words, id=f"{setting}-{form}")
    for setting in URL_SETTINGS
    for form, (value, words) in bad_url_forms(setting).items()
]


@pytest.mark.parametrize(("setting", "value", "words"), BAD_URLS)
def test_every_malformed_url_is_one_sentence_naming_the_setting(
    setting: str, value: str, words: str
) -> None:
    settings = load_settings({}, environ={setting: value}, env_file=None)
    with pytest.raises(ConfigError) as info:
        getattr(settings, ATTRIBUTES[setting])
    message = str(info.value)
    assert setting in message and words in message, message
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in message
    assert message.endswith(".") and ". " not in message and "\n" not in message


@pytest.mark.parametrize(("setting", "value", "words"), BAD_URLS[:3])
def test_malformed_urls_in_dotenv_are_refused_too(
    tmp_path: Path, setting: str, value: str, words: str
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(f"{setting}='{value}'\n")
    settings = load_settings({}, environ={}, env_file=env_file)
    with pytest.raises(ConfigError, match=words) as info:
        getattr(settings, ATTRIBUTES[setting])
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    ("setting", "value", "stored"),
    [
        ("DATABASE_URL", "postgresql://u:pw@127.0.0.1:5432/x", None),
        ("DATABASE_URL", "postgres://u:pw@127.0.0.1:5432/x", None),
        ("DATABASE_URL", "postgresql://u@db.local/market", None),
        ("DATABASE_URL", "postgresql://db.local", None),
        ("DATABASE_URL", "POSTGRESQL://db.local:5432/x", None),
        ("DATABASE_URL", "postgresql://u:p@ss@db.local:5432/x", None),
        ("DATABASE_URL", "postgresql://u:pw@[::1]:5432/x", None),
        ("DATABASE_URL", "postgresql://u:pw@[fe80::1%25eth0]:5432/x", None),
        ("DATABASE_URL", "postgresql://%2Fvar%2Frun%2Fpostgresql/x", None),
        ("DATABASE_URL", "postgresql://h1,h2:5433/x?sslmode=require", None),
        ("DATABASE_URL", "postgresql://db.local:/x", None),
        ("POLYGON_WS_URL", "ws://127.0.0.1:8765", None),
        ("POLYGON_WS_URL", "wss://socket.example/crypto", None),
        ("POLYGON_WS_URL", "wss://socket.example:443/crypto/", None),
        ("POLYGON_WS_URL", "ws://[::1]:65535/", "ws://[::1]:65535"),
        ("POLYGON_REST_URL", "http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
        ("POLYGON_REST_URL", "https://api.example", None),
        ("TELEGRAM_API_URL", "http://[::1]:8081", None),
        ("TELEGRAM_API_URL", "https://bots.example/", "https://bots.example"),
    ],
)
def test_valid_url_forms_are_accepted(setting: str, value: str, stored: str | None) -> None:
    s = load_settings({}, environ={setting: value}, env_file=None)
    assert getattr(s, ATTRIBUTES[setting]) == (stored or value)
    repr(s)  # the redactor parses the database URL again: it must not raise


def test_defaults_pass_their_own_check() -> None:
    s = load_settings({}, environ={}, env_file=None)
    assert (s.ws_url, s.rest_url, s.telegram_api_url) == (
        DEFAULT_WS_URL,
        DEFAULT_REST_URL,
        DEFAULT_TELEGRAM_API_URL,
    )


def test_a_password_with_an_at_sign_is_still_redacted() -> None:
    s = load_settings(
        {}, environ={"DATABASE_URL": f"postgresql://me:{PASSWORD}@x@db.local/m"}, env_file=None
    )
    assert s.secrets == [f"{PASSWORD}@x"]
    assert PASSWORD not in repr(s)


def test_check_url_names_a_flag_as_it_names_a_setting() -> None:
    with pytest.raises(ConfigError, match=r"^A user name or password is not allowed in --feed"):
        check_url("--feed", f"wss://u:{PASSWORD}@127.0.0.1:9/x", ("ws", "wss"))
    with pytest.raises(ConfigError, match=r"^--feed has a port outside 1 to 65535\.$"):
        check_url("--feed", "ws://127.0.0.1:70000", ("ws", "wss"))
    assert check_url("--feed", "ws://127.0.0.1:8765/", ("ws", "wss")) == "ws://127.0.0.1:8765"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{PASSWORD}@127.0.0.1:99999/x",
        f"postgresql://u:{PASSWORD}@127.0.0.1:abc/x",
        f"postgresql://u:{PASSWORD}@[::1:5432/x",
        f"wss://u:{PASSWORD}@::1]/x?q=1#f",
    ],
)
def test_display_url_hides_the_password_of_malformed_urls_without_raising(url: str) -> None:
    shown = display_url(url)
    assert PASSWORD not in shown
    assert shown.split(":…@", 1)[1] == url.split("@", 1)[1]


def test_a_bad_dotenv_line_is_reported_once_with_its_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: python-dotenv's own warning, twice, without the file's name.
    env_file = tmp_path / ".env"
    env_file.write_text("POLYGON_API_KEY=pk_test_abcdefghijklmnop\nthis is not a setting\n")
    with caplog.at_level("WARNING"):
        first = load_settings(environ={}, env_file=env_file)
        load_settings(environ={}, env_file=env_file)
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"{env_file} line 2 is not NAME=value and was ignored"]
    assert first.api_key == "pk_test_abcdefghijklmnop"  # the good lines still count


def test_a_state_dir_that_can_never_be_one_is_refused(tmp_path: Path) -> None:
    # Before: accepted silently, failing later wherever state was first written.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    blocked = load_settings(environ={"POLYSTREAM_STATE_DIR": str(blocker / "state")}, env_file=None)
    with pytest.raises(ConfigError, match=r"POLYSTREAM_STATE_DIR .* is a file: point it"):
        blocked.state_dir  # noqa: B018
    fine = load_settings(environ={"POLYSTREAM_STATE_DIR": str(tmp_path / "new" / "state")})
    assert fine.state_dir == tmp_path / "new" / "state"


# --- where each value came from ----------------------------------------------------------------


def test_origins_flag_env_dotenv_default(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# settings\n"
        "POLYGON_WS_URL=wss://dotenv.example/crypto\n"
        "POLYGON_REST_URL=https://dotenv.example\n"
        "DATABASE_URL=postgresql://dotenv.example/x\n"
        "UNRELATED=kept out\n"
    )
    s = load_settings(
        {"DATABASE_URL": "postgresql://flag.example/x", "POLYGON_API_KEY": None},
        environ={"POLYGON_REST_URL": "https://env.example", "DATABASE_URL": "postgresql://e/x"},
        env_file=env_file,
    )
    assert (s.ws_url, s.rest_url, s.database_url, s.telegram_api_url) == (
        "wss://dotenv.example/crypto",
        "https://env.example",
        "postgresql://flag.example/x",
        DEFAULT_TELEGRAM_API_URL,
    )
    assert dict(s.origins) == {
        "POLYGON_WS_URL": f".env ({env_file.resolve()}:2)",
        "POLYGON_REST_URL": "env",
        "DATABASE_URL": "flag",
    }
    assert set(s.given) == set(s.origins)  # unset ones (and foreign .env lines) are absent


def test_a_later_dotenv_line_wins_and_is_the_one_named(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("POLYGON_API_KEY=first-000000000\nPOLYGON_API_KEY=second-00000000\n")
    s = load_settings(environ={}, env_file=env_file)
    assert s.api_key == "second-00000000"
    assert s.origins["POLYGON_API_KEY"] == f".env ({env_file.resolve()}:2)"


def test_the_api_key_from_the_highest_layer_wins_whatever_its_name(tmp_path: Path) -> None:
    # Before: POLYGON_API_KEY in .env beat MASSIVE_API_KEY in the environment.
    env_file = tmp_path / ".env"
    env_file.write_text("POLYGON_API_KEY=from-dotenv-000000\n")
    s = load_settings({}, environ={"MASSIVE_API_KEY": KEY}, env_file=env_file)
    assert s.api_key == KEY
    assert dict(s.origins) == {"MASSIVE_API_KEY": "env"}
    s = load_settings({"POLYGON_API_KEY": "from-flag-111111"}, {"MASSIVE_API_KEY": KEY}, None)
    assert (s.api_key, dict(s.origins)) == ("from-flag-111111", {"POLYGON_API_KEY": "flag"})
    both = {"MASSIVE_API_KEY": "massive-0000000", "POLYGON_API_KEY": KEY}
    s = load_settings({}, environ=both, env_file=None)
    assert (s.api_key, dict(s.origins)) == (KEY, {"POLYGON_API_KEY": "env"})


def test_a_bad_value_stops_only_what_reads_it() -> None:
    bad = {
        "POLYGON_WS_URL": "http://socket.example",
        "POLYGON_REST_URL": "ftp://api.example",
        "DATABASE_URL": f"mysql://u:{PASSWORD}@db/x",
        "TELEGRAM_API_URL": f"https://u:{PASSWORD}@bots.example",
        "TELEGRAM_CHAT_ID": "12,abc",
        "POLYGON_API_KEY": KEY,
    }
    s = load_settings({}, environ=bad, env_file=None)  # loads: nothing read it yet
    assert s.api_key == KEY and s.filters_dir == Path("filters")
    for name, attribute in ATTRIBUTES.items():
        with pytest.raises(ConfigError, match=name):
            getattr(s, attribute)
    shown = repr(s)
    assert PASSWORD not in shown and KEY not in shown
    assert "POLYGON_WS_URL='(not a valid URL)'" in shown


def test_show_setting_never_shows_a_secret() -> None:
    assert show_setting("POLYGON_API_KEY", KEY) == redact(KEY)
    assert show_setting("TELEGRAM_BOT_TOKEN", "123456:ABCdefGhIJKlmNoPQRsTUVwxyZ") == "123…xyZ"
    url = f"postgresql://me:{PASSWORD}@db.local:5432/m"
    assert show_setting("DATABASE_URL", url) == "postgresql://me:…@db.local:5432/m"
    # a malformed URL may hold the password anywhere: none of it is shown
    assert show_setting("DATABASE_URL", f"postgresql://me:{PASSWORD}/m") == "(not a valid URL)"
    assert show_setting("POLYSTREAM_FILTERS_DIR", "my/filters") == "my/filters"


# --- the command: a URL is checked only by what uses it ----------------------------------------


def polystream(
    cwd: Path, *args: str, timeout: float = 60, **variables: str
) -> subprocess.CompletedProcess[str]:
    """The command as users run it, in `cwd` (whose .env it reads), with none of polystream's
    variables in the environment but `variables`, and its state under `cwd`."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update({"XDG_STATE_HOME": str(cwd / "xdg"), "COLUMNS": "120", **variables})
    return subprocess.run(
        [sys.executable, "-m", "polystream", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_sentence(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The single error line of a run that exited 1, checked to hold `words`."""
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("polystream: error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


BAD_FEED_URLS = {
    "POLYGON_WS_URL": f"http://u:{PASSWORD}@socket.example/crypto",
    "POLYGON_REST_URL": "ftp://api.example",
}


def place(cwd: Path, where: str, variables: dict[str, str]) -> dict[str, str]:
    """Put `variables` in `cwd`'s .env (returning no environment), or return them as one."""
    if where == "env":
        return variables
    (cwd / ".env").write_text("".join(f"{k}='{v}'\n" for k, v in variables.items()))
    return {}


@pytest.mark.parametrize("where", ["env", ".env"])
def test_demo_and_replay_run_despite_bad_feed_urls(tmp_path: Path, where: str) -> None:
    # Before: `polystream demo` stopped at a bad POLYGON_WS_URL it never uses.
    variables = place(tmp_path, where, BAD_FEED_URLS)
    rec = tmp_path / "demo.rec"
    demo = polystream(
        tmp_path, "demo", "--no-ui", "--json", "--duration", "1", "--record", str(rec), **variables
    )
    assert demo.returncode == 0, demo.stderr
    assert any(json.loads(line)["type"] == "bar" for line in demo.stdout.splitlines())
    replay = polystream(tmp_path, "watch", "X:BTCUSD", "--feed", str(rec), "--no-ui", **variables)
    assert replay.returncode == 0, replay.stderr
    assert PASSWORD not in demo.stderr + replay.stderr


@pytest.mark.parametrize("where", ["env", ".env"])
def test_what_uses_a_bad_feed_url_stops_with_one_sentence(tmp_path: Path, where: str) -> None:
    variables = place(tmp_path, where, {**BAD_FEED_URLS, "POLYGON_API_KEY": KEY})
    watch = polystream(tmp_path, "watch", "X:BTCUSD", "--no-ui", "--duration", "1", **variables)
    assert PASSWORD not in one_sentence(watch, "POLYGON_WS_URL", "ws:// or wss://")
    backfill = polystream(
        tmp_path, "backfill", "X:BTCUSD", "--from", "2024-05-01", "-o", "b.csv", **variables
    )
    one_sentence(backfill, "POLYGON_REST_URL")


def test_flags_beat_bad_settings_and_the_key_stays_hidden(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("POLYGON_WS_URL=http://dotenv.example\n")
    with DemoFeed(api_key=API_KEY, bar_seconds=0.05) as feed:
        result = polystream(
            tmp_path,
            "watch",
            "X:BTCUSD",
            "--no-ui",
            "--json",
            "--duration",
            "1",
            "--no-warmup",
            "--ws-url",
            feed.url,
            "--api-key",
            API_KEY,
            "--no-store",
            POLYGON_API_KEY="pk_refused_by_the_feed_000",
            DATABASE_URL="mysql://not-used-with-no-store",
        )
    assert result.returncode == 0, result.stderr
    assert "subscribed" in result.stdout
    assert API_KEY not in result.stdout + result.stderr
