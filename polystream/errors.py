"""Library errors carry one sentence the user can act on; only the CLI maps them to exit codes."""

from __future__ import annotations


class PolystreamError(Exception):
    """Base class: `str(err)` is a complete sentence meant for the user."""

    exit_code = 1

    @property
    def details(self) -> list[str]:
        """Lines shown before the sentence, such as every problem found in a file."""
        return []


class ConfigError(PolystreamError):
    """A setting, flag or environment variable has a value polystream cannot use."""


class UsageError(ConfigError):
    """A command-line option has a value polystream cannot use: bad usage, like an unknown
    option."""

    exit_code = 2


class SymbolError(ConfigError):
    """A symbol is written in a form polystream does not recognise."""


class FeedError(PolystreamError):
    """The market-data feed cannot be used (fatal, not a passing outage)."""


class AuthFailed(FeedError):
    """The feed refused the API key."""


class RecordingError(PolystreamError):
    """A recording file cannot be read or written."""


class OutputClosed(PolystreamError):
    """The reader of the output went away (`| head`): the run ends quietly, as a success."""

    exit_code = 0
