"""`polystream config`: the settings in effect with their origins, and `--check` against a real
PostgreSQL, real filter files and real directories."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
from postgres import free_port
from test_config import polystream

KEY = "pk_live_doctor_0123456789abcdef"
TOKEN = "123456789:AAHdoctorSecretPart_abcdefghijklmno"
PASSWORD = "d0ct0r-pw-XYZ"

VALID_FILTER = (
    "name: btc-rsi-low\non: bar\ntimeframe: 1m\nwhen: rsi(14) < 30\nmessage: '{symbol} RSI low'\n"
)


def settings_table(stdout: str) -> dict[str, tuple[str, str]]:
    """name -> (value, origin) from the plain listing (columns are separated by 2+ spaces)."""
    table = {}
    for line in stdout.splitlines():
        name, value, origin = (cell for cell in line.split("  ") if cell)
        table[name] = (value.strip(), origin.strip())
    return table


def checks(stdout: str) -> dict[str, list[tuple[str, str]]]:
    """check name -> [(status, detail)] from `config --check --json`."""
    found: dict[str, list[tuple[str, str]]] = {}
    for line in stdout.splitlines():
        record = json.loads(line)
        assert set(record) == {"name", "status", "detail"}
        found.setdefault(record["name"], []).append((record["status"], record["detail"]))
    return found


def test_each_origin_is_shown(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# local settings\n"
        f"POLYGON_API_KEY={KEY}\n"
        "POLYGON_REST_URL=https://dotenv.example\n"
        "POLYGON_WS_URL=wss://dotenv.example/crypto\n"
    )
    result = polystream(
        tmp_path,
        "config",
        "--ws-url",
        "wss://flag.example/crypto",
        POLYGON_REST_URL="https://env.example",
    )
    assert result.returncode == 0, result.stderr
    table = settings_table(result.stdout)
    env_file = (tmp_path / ".env").resolve()
    assert table["POLYGON_API_KEY"] == ("pk_…def", f".env ({env_file}:2)")
    assert table["POLYGON_REST_URL"] == ("https://env.example", "env")
    assert table["POLYGON_WS_URL"] == ("wss://flag.example/crypto", "flag")
    assert table["TELEGRAM_API_URL"] == ("https://api.telegram.org", "default")
    assert table["DATABASE_URL"] == ("—", "default")
    assert table["POLYSTREAM_STATE_DIR"] == (str(tmp_path / "xdg" / "polystream"), "default")
    assert len(table) == 11


def test_secrets_never_appear_and_json_parses(tmp_path: Path) -> None:
    secrets = {
        "MASSIVE_API_KEY": KEY,
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "TELEGRAM_CHAT_ID": "-1001,@alerts_channel",
        "DATABASE_URL": f"postgresql://me:{PASSWORD}@127.0.0.1:9/market",
    }
    plain = polystream(tmp_path, "config", **secrets)
    as_json = polystream(tmp_path, "config", "--json", **secrets)
    checked = polystream(tmp_path, "config", "--check", "--api-key", KEY, **secrets)
    for result in (plain, as_json, checked):
        everything = result.stdout + result.stderr
        assert KEY not in everything and TOKEN not in everything and PASSWORD not in everything
    assert plain.returncode == 0 and as_json.returncode == 0, plain.stderr + as_json.stderr
    rows = {r["name"]: r for r in map(json.loads, as_json.stdout.splitlines())}
    assert all(set(r) == {"name", "value", "origin", "secret"} for r in rows.values())
    assert rows["MASSIVE_API_KEY"] == {
        "name": "MASSIVE_API_KEY",
        "value": "pk_…def",
        "origin": "env",
        "secret": True,
    }
    assert rows["DATABASE_URL"]["value"] == "postgresql://me:…@127.0.0.1:9/market"
    assert rows["DATABASE_URL"]["secret"] and rows["TELEGRAM_BOT_TOKEN"]["secret"]
    assert rows["TELEGRAM_CHAT_ID"] == {
        "name": "TELEGRAM_CHAT_ID",
        "value": "-1001,@alerts_channel",
        "origin": "env",
        "secret": False,
    }
    assert rows["TELEGRAM_BOT_TOKEN"]["value"] == f"{TOKEN[:3]}…{TOKEN[-3:]}"
    assert "POLYGON_API_KEY is set, from flag," in checked.stdout  # the flag beat the env


# --- --check -------------------------------------------------------------------------------


@pytest.fixture
def healthy(tmp_path: Path) -> dict[str, str]:
    """Settings under which every check but the database's passes: a valid filter, a state
    directory that can be made, Telegram and the API key unset."""
    (tmp_path / "filters").mkdir()
    (tmp_path / "filters" / "btc-rsi-low.yaml").write_text(VALID_FILTER)
    return {"POLYSTREAM_STATE_DIR": str(tmp_path / "state" / "new")}


def check(tmp_path: Path, *args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    return polystream(tmp_path, "config", "--check", *args, **variables)


def test_check_passes_against_a_migrated_database(
    tmp_path: Path, database_url: str, healthy: dict[str, str]
) -> None:
    migrate = polystream(tmp_path, "migrate", "--database-url", database_url, DATABASE_URL="x")
    assert migrate.returncode == 0, migrate.stderr  # the flag beat the unusable DATABASE_URL
    result = check(tmp_path, "--json", DATABASE_URL=database_url, **healthy)
    assert result.returncode == 0, result.stdout + result.stderr
    found = checks(result.stdout)
    assert [status for status, _ in found["database"]] == ["ok"]
    assert found["filters"] == [("ok", "filters holds 1 valid filter file.")]
    assert found["state"][0][0] == "ok" and "will be created" in found["state"][0][1]
    assert found["telegram"][0][0] == "off" and found["api key"][0][0] == "off"
    assert "backfill" in found["api key"][0][1]
    plain = check(tmp_path, DATABASE_URL=database_url, **healthy)
    assert plain.returncode == 0
    assert [line.split()[:2] for line in plain.stdout.splitlines()] == [
        ["off", "api"],
        ["ok", "feed"],
        ["ok", "database"],
        ["ok", "filters"],
        ["ok", "state"],
        ["off", "telegram"],
    ]


def assert_problem(result: subprocess.CompletedProcess[str], name: str, *words: str) -> str:
    """Exit 1, a problem line for check `name` holding `words`, and the closing sentence."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.split()[1] == name.split()[0]]
    assert lines and lines[0].startswith("problem"), result.stdout
    assert all(w in lines[0] for w in words), lines[0]
    assert result.stderr.strip().startswith("polystream: error: "), result.stderr
    assert "found a problem" in result.stderr
    return lines[0]


def test_a_database_that_is_not_migrated_is_a_problem(
    tmp_path: Path, database_url: str, healthy: dict[str, str]
) -> None:
    result = check(tmp_path, DATABASE_URL=database_url, **healthy)
    assert_problem(result, "database", "`polystream migrate`")


def test_an_unreachable_database_is_a_problem(tmp_path: Path, healthy: dict[str, str]) -> None:
    url = f"postgresql://me:{PASSWORD}@127.0.0.1:{free_port()}/market"
    result = check(tmp_path, "--database-url", url, **healthy)
    line = assert_problem(result, "database", "Cannot connect", "correct DATABASE_URL")
    assert PASSWORD not in line


def test_a_malformed_database_url_is_a_problem(tmp_path: Path, healthy: dict[str, str]) -> None:
    result = check(tmp_path, DATABASE_URL=f"mysql://me:{PASSWORD}@db/x", **healthy)
    assert_problem(result, "database", "DATABASE_URL must start with postgresql://")
    assert PASSWORD not in result.stdout + result.stderr


def test_an_invalid_filter_file_is_a_problem(tmp_path: Path, healthy: dict[str, str]) -> None:
    (tmp_path / "filters" / "broken.yaml").write_text("name: broken\nwhen: rsi(14) <\n")
    result = check(tmp_path, **healthy)
    assert_problem(result, "filters", "1 of 2 filter files", "polystream filter validate")


def test_a_filters_dir_that_was_named_but_is_missing_is_a_problem(
    tmp_path: Path, healthy: dict[str, str]
) -> None:
    result = check(tmp_path, "--filters", "nowhere", **healthy)
    assert_problem(result, "filters", "POLYSTREAM_FILTERS_DIR nowhere (flag) does not exist")


def test_a_state_dir_under_a_regular_file_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    result = check(tmp_path, POLYSTREAM_STATE_DIR=str(tmp_path / "a-file" / "state"))
    assert_problem(result, "state", "is a file", "point it elsewhere")


@pytest.mark.parametrize(
    ("variables", "words"),
    [
        ({"TELEGRAM_BOT_TOKEN": TOKEN}, "TELEGRAM_CHAT_ID is not"),
        ({"TELEGRAM_CHAT_ID": "-1001"}, "TELEGRAM_BOT_TOKEN is not"),
        ({"TELEGRAM_BOT_TOKEN": "not-a-token", "TELEGRAM_CHAT_ID": "1"}, "@BotFather"),
        ({"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_CHAT_ID": "12,abc"}, "Invalid chat id 'abc'"),
    ],
)
def test_telegram_settings_that_cannot_work_are_a_problem(
    tmp_path: Path, variables: dict[str, str], words: str
) -> None:
    result = check(tmp_path, **variables)
    assert_problem(result, "telegram", words)
    assert TOKEN not in result.stdout + result.stderr


def test_telegram_is_not_contacted(tmp_path: Path, healthy: dict[str, str]) -> None:
    # A Bot API "server" that records whether anyone connected.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        api = f"http://127.0.0.1:{server.getsockname()[1]}"
        result = check(
            tmp_path,
            TELEGRAM_BOT_TOKEN=TOKEN,
            TELEGRAM_CHAT_ID="-1001,-1002",
            TELEGRAM_API_URL=api,
            **healthy,
        )
        with pytest.raises(TimeoutError):
            server.accept()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 chat ids" in result.stdout and "not contacted" in result.stdout


def test_bad_feed_urls_are_a_problem_each(tmp_path: Path, healthy: dict[str, str]) -> None:
    result = check(
        tmp_path, POLYGON_WS_URL="http://socket.example", POLYGON_REST_URL="ftp://x", **healthy
    )
    assert result.returncode == 1
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem")]
    assert len(problems) == 2
    assert "POLYGON_WS_URL" in problems[0] and "POLYGON_REST_URL" in problems[1]
