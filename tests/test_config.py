from pathlib import Path

import pytest

from polystream.config import (
    DEFAULT_REST_URL,
    DEFAULT_TELEGRAM_API_URL,
    DEFAULT_WS_URL,
    Redactor,
    check_url,
    display_url,
    load_settings,
    parse_channels,
    parse_duration,
    parse_timeframe,
    redact,
)
from polystream.errors import ConfigError

KEY = "pk_live_0123456789abcdef"


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
    with pytest.raises(ConfigError) as info:
        load_settings({}, environ={name: value}, env_file=None)
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
    with pytest.raises(ConfigError) as info:
        load_settings({}, environ={setting: value}, env_file=None)
    message = str(info.value)
    assert setting in message and words in message, message
    assert PASSWORD not in message
    assert message.endswith(".") and ". " not in message and "\n" not in message


@pytest.mark.parametrize(("setting", "value", "words"), BAD_URLS[:3])
def test_malformed_urls_in_dotenv_are_refused_too(
    tmp_path: Path, setting: str, value: str, words: str
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(f"{setting}='{value}'\n")
    with pytest.raises(ConfigError, match=words) as info:
        load_settings({}, environ={}, env_file=env_file)
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
    field = {
        "DATABASE_URL": "database_url",
        "POLYGON_WS_URL": "ws_url",
        "POLYGON_REST_URL": "rest_url",
        "TELEGRAM_API_URL": "telegram_api_url",
    }[setting]
    assert getattr(s, field) == (stored or value)
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
    with pytest.raises(ConfigError, match=r"POLYSTREAM_STATE_DIR .* is a file\."):
        load_settings(environ={"POLYSTREAM_STATE_DIR": str(blocker / "state")}, env_file=None)
    fine = load_settings(environ={"POLYSTREAM_STATE_DIR": str(tmp_path / "new" / "state")})
    assert fine.state_dir == tmp_path / "new" / "state"
