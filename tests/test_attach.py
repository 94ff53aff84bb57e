"""A filter's `attach: chart`: parsed and checked like every other key, carried by the alerts the
engine makes (outside their JSON record), and accepted by `filter validate` and `filter show`."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from polystream.filters import Filter, FilterError, parse_filter
from polystream.filters.engine import run_on_bars
from test_cli import assert_one_sentence_error, run

MINUTE = 60_000
T0 = 1_700_000_000_000
CHARTED = "name: dip\nwhen: close < 100\nattach: chart\n"


def rejected(text: str) -> FilterError:
    with pytest.raises(FilterError) as info:
        parse_filter(text, "f.yaml")
    return info.value


def test_attach_chart_is_parsed_and_written_back() -> None:
    f = parse_filter(CHARTED, "f.yaml")
    assert f.attach == "chart"
    assert "attach: chart\n" in f.to_yaml()
    assert parse_filter(f.to_yaml()).attach == "chart"
    plain = parse_filter("name: dip\nwhen: close < 100\n")
    assert plain.attach is None
    assert "attach" not in plain.to_yaml()


def test_an_unknown_attachment_is_one_sentence_at_its_place() -> None:
    err = rejected("name: dip\nwhen: close < 100\nattach: picture\n")
    [problem] = err.problems
    assert (problem.line, problem.column) == (3, 9)
    assert problem.message == "unknown attachment 'picture' for attach:; expected chart"
    assert str(err) == (
        "f.yaml is not a valid filter: unknown attachment 'picture' for attach:; expected chart."
    )
    assert problem.render().startswith("f.yaml:3:9: unknown attachment")


def test_attach_takes_one_value_not_a_list() -> None:
    [problem] = rejected("name: dip\nwhen: close < 100\nattach: [chart]\n").problems
    assert (problem.line, problem.message) == (3, "expected chart, found a list")


def test_a_misspelled_attach_gets_a_suggestion() -> None:
    [problem] = rejected("name: dip\nwhen: close < 100\natach: chart\n").problems
    assert (problem.line, problem.column) == (3, 1)
    assert problem.message.startswith("unknown key 'atach' (did you mean attach?)")


def test_the_engine_marks_the_alerts_of_a_charted_filter() -> None:
    closes = [120.0, 110.0, 90.0, 95.0, 130.0, 80.0]
    ohlcv = pl.DataFrame(
        {
            "time": [T0 + i * MINUTE for i in range(len(closes))],
            **{c: closes for c in ("open", "high", "low", "close")},
            "volume": [1.0] * len(closes),
        }
    )

    def alerts(f: Filter) -> list[tuple[int, str | None]]:
        fired, _ = run_on_bars(f, ohlcv, "X:BTCUSD")
        return [(a.time, a.attach) for a in fired]

    charted = parse_filter(CHARTED)
    assert alerts(charted) == [(T0 + 2 * MINUTE, "chart"), (T0 + 5 * MINUTE, "chart")]
    plain = parse_filter("name: dip\nwhen: close < 100\n")
    assert alerts(plain) == [(T0 + 2 * MINUTE, None), (T0 + 5 * MINUTE, None)]
    fired, _ = run_on_bars(charted, ohlcv, "X:BTCUSD")
    assert "attach" not in fired[0].record()  # not part of the JSON alert record


def test_validate_and_show_accept_it(tmp_path: Path) -> None:
    filters = tmp_path / "filters"
    filters.mkdir()
    (filters / "dip.yaml").write_text(CHARTED)
    good = run(tmp_path, "filter", "validate", str(filters / "dip.yaml"))
    assert good.returncode == 0, good.stderr
    shown = run(tmp_path, "filter", "show", "dip", "--filters", str(filters))
    assert shown.returncode == 0, shown.stderr
    assert "attach: chart" in shown.stdout
    (filters / "bad.yaml").write_text("name: bad\nwhen: close < 100\nattach: picture\n")
    bad = run(tmp_path, "filter", "validate", str(filters / "bad.yaml"))
    assert_one_sentence_error(bad, "not valid")
    assert "bad.yaml:3:9: unknown attachment 'picture'" in bad.stderr
