from pathlib import Path

import pytest

from polystream.config import (
    Redactor,
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
