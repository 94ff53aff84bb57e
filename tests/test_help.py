"""Help on every command: `-h` as well as `--help`, placeholders instead of Python types,
examples, the timeframes listed, env var markers, shell completion, and a command list that
is not cut at 100 columns."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest
import typer.main

from polystream.cli import _name_values, app


def _commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path] if path else []
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        found += _commands(sub, (*path, name))
    return found


COMMANDS = _commands(_name_values(typer.main.get_command(app)))
LEAF = [c for c in COMMANDS if c != ("filter",)]
PYTHON_TYPE = re.compile(r"<(list|str|int|float|path|bool|Path)\b")


def help_text(*args: str, width: int = 100) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "polystream", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": str(width), "TERM": "dumb"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_command_is_listed() -> None:
    names = {c[0] for c in COMMANDS}
    assert {"watch", "demo", "backfill", "migrate", "analyze", "chart", "config", "filter"} <= names
    assert len(LEAF) >= 14


@pytest.mark.parametrize("command", LEAF, ids=" ".join)
def test_each_command_has_short_help_examples_and_no_python_types(command: tuple[str, ...]) -> None:
    text = help_text(*command, "-h")
    assert text == help_text(*command, "--help")
    usage = text.splitlines()[0]
    assert usage.startswith(f"Usage: polystream {' '.join(command)} ") and "{" not in usage
    assert not PYTHON_TYPE.search(text), PYTHON_TYPE.search(text)
    assert "Example" in text
    assert "-h, --help" in text


def test_the_command_list_is_whole_at_100_columns() -> None:
    text = help_text("-h")
    listed = text[text.index("Commands:") :].splitlines()[1:]
    assert listed and all(not line.rstrip().endswith("...") for line in listed), listed
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "--install-completion" in text and "--show-completion" in text


def test_timeframes_and_environment_variables_are_named() -> None:
    watch = " ".join(help_text("watch", "-h", width=200).split())
    assert "1s 5s 15s 30s 1m 5m 15m 30m 1h 4h 1d" in watch
    for variable in ("POLYGON_API_KEY", "DATABASE_URL", "POLYSTREAM_FILTERS_DIR"):
        assert f"[env: {variable}]" in watch
    assert "Usage: polystream watch [OPTIONS] [SYMBOL...]" in watch
    assert "1s 5s 15s" in help_text("filter", "add", "-h", width=200)


def test_completion_script_names_the_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "polystream", "--show-completion", "bash"],
        capture_output=True,
        text=True,
        env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout and "polystream" in result.stdout
