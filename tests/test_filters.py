"""Filter files, the `when` language and the filter engine, against DESIGN §5 and TA-Lib."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import msgspec
import numpy as np
import polars as pl
import pytest
import talib
from hypothesis import given, settings
from hypothesis import strategies as st

import polystream
from polystream.analyze import read_bars
from polystream.errors import ConfigError
from polystream.filters import (
    Alert,
    Filter,
    FilterEngine,
    FilterError,
    FilterWatcher,
    add_filter,
    filter_from_options,
    find_filter,
    lang,
    load_directory,
    parse_filter,
    read_filter,
)
from polystream.filters.engine import bar_records, infer_timeframe, run_on_bars
from polystream.filters.lang import (
    MAX_DEPTH,
    MAX_LENGTH,
    MAX_TOKENS,
    Binary,
    Compare,
    Name,
    Unary,
    compile_expression,
    parse,
)
from polystream.filters.spec import MAX_FILE_BYTES, parse_template
from polystream.schema import QUOTE, SIDE_BUY, SIDE_SELL, SIDE_UNKNOWN, TRADE

DATA = Path(polystream.__file__).parent / "data" / "btcusd_1m_2019-03-29.csv"
MINUTE = 60_000
T0 = 1_553_817_600_000
TOLERANCE = 1e-9
MARK = "§"


# -- helpers -----------------------------------------------------------------------------------


def unmark(text: str) -> tuple[str, int]:
    """`text` without its `§` marker, and the offset the marker stood at."""
    at = text.index(MARK)
    return text.replace(MARK, "", 1), at


def line_col(text: str, at: int) -> tuple[int, int]:
    """1-based line and column of offset `at`."""
    return text.count("\n", 0, at) + 1, at - (text.rfind("\n", 0, at) + 1) + 1


def compiled_ok(text: str, kind: str = "bar") -> lang.Compiled:
    compiled, problems = compile_expression(text, kind)
    assert problems == [], [p.message for p in problems]
    assert compiled is not None
    return compiled


def problems_of(text: str, kind: str = "bar") -> list[tuple[int, str]]:
    compiled, problems = compile_expression(text, kind)
    assert compiled is None
    assert problems, "expected at least one problem"
    for p in problems:
        assert isinstance(p.at, int) and 0 <= p.at <= len(text)
        assert p.message and "\n" not in p.message
    return [(p.at, p.message) for p in problems]


def evaluate(text: str, frame: pl.DataFrame, kind: str = "bar") -> list[bool]:
    """The condition row by row, with the divisor columns the engine adds for window means."""
    compiled = compiled_ok(text, kind)
    assert not compiled.derived, "evaluate() reads only engine columns"
    divisors = [
        pl.Series(lang.divisor_column(n), [float(n)] * frame.height) for n in compiled.divisors
    ]
    result = frame.with_columns(divisors).select(compiled.condition.alias("c"))["c"]
    assert result.dtype == pl.Boolean and result.len() == frame.height
    assert result.null_count() == 0, "a condition is never null"
    return result.to_list()


def bar_rows(symbol: str = "X:BTCUSD", **columns: list[float]) -> pl.DataFrame:
    """A bar-shaped frame with only the columns a test needs (plus `symbol`)."""
    n = len(next(iter(columns.values())))
    return pl.DataFrame({"symbol": [symbol] * n, **columns})


def ohlcv(closes: list[float], start: int = T0) -> pl.DataFrame:
    """Flat minute bars (open = high = low = close) with the given closes."""
    n = len(closes)
    prices = [float(c) for c in closes]
    return pl.DataFrame(
        {
            "time": [start + i * MINUTE for i in range(n)],
            "open": prices,
            "high": prices,
            "low": prices,
            "close": prices,
            "volume": [1.0] * n,
        }
    )


def records(closes: list[float], symbol: str = "X:BTCUSD", start: int = T0) -> pl.DataFrame:
    """Final 1m bar records, as the bar engine emits them, for a series of closes."""
    return bar_records(ohlcv(closes, start), symbol, MINUTE)


def interleave(*frames: pl.DataFrame) -> pl.DataFrame:
    return pl.concat(frames).sort("start", "symbol", maintain_order=True)


def trades(rows: list[tuple[str, int, float, float, int]]) -> pl.DataFrame:
    """Trades (symbol, time, price, size, side) as the batcher builds them."""
    data = [
        {"symbol": s, "time": t, "price": p, "size": z, "side": d, "exchange": 1, "received": t}
        for s, t, p, z, d in rows
    ]
    return pl.DataFrame(data, schema=TRADE)


def quotes(rows: list[tuple[str, int, float, float, float, float]]) -> pl.DataFrame:
    """Quotes (symbol, time, bid, bid_size, ask, ask_size) as the batcher builds them."""
    data = [
        {
            "symbol": s,
            "time": t,
            "bid": b,
            "bid_size": bs,
            "ask": a,
            "ask_size": az,
            "received": t,
        }
        for s, t, b, bs, a, az in rows
    ]
    return pl.DataFrame(data, schema=QUOTE)


def make(when: str, name: str = "f", **options: object) -> Filter:
    return filter_from_options(name, when, **options)  # type: ignore[arg-type]


def fired(alerts: list[Alert]) -> list[tuple[str, str, int]]:
    return [(a.filter, a.symbol, a.time) for a in alerts]


def close_enough(ours: float | None, theirs: float) -> bool:
    return ours is not None and abs(ours - theirs) <= TOLERANCE * max(1.0, abs(theirs))


def rejected(text: str, path: str = "f.yaml") -> FilterError:
    with pytest.raises(FilterError) as info:
        parse_filter(text, path)
    err = info.value
    assert err.problems, "a FilterError lists its problems"
    return err


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def btc_bars() -> pl.DataFrame:
    """The real BTC/USD minute bars shipped with polystream."""
    return read_bars(DATA)


@pytest.fixture(scope="module")
def btc_records(btc_bars: pl.DataFrame) -> pl.DataFrame:
    """The real bars as final 1m bar records with the default indicators."""
    return bar_records(btc_bars, "X:BTCUSD", MINUTE)


@pytest.fixture(scope="module")
def three_symbols(btc_bars: pl.DataFrame) -> pl.DataFrame:
    """Three symbols' bar records interleaved by start: real BTC prices, and two other stretches
    of the same day rescaled, so each symbol crosses its thresholds at different bars."""
    times = btc_bars["time"]
    prices = ("open", "high", "low", "close")

    def stretch(first: int, n: int, scale: float, symbol: str, offset: int = 0) -> pl.DataFrame:
        part = btc_bars.slice(first, n).with_columns(pl.col(c) * scale for c in prices)
        part = part.with_columns(times.slice(offset, n).alias("time"))
        return bar_records(part, symbol, MINUTE)

    return interleave(
        stretch(0, 240, 1.0, "X:BTCUSD"),
        stretch(600, 240, 0.03, "X:ETHUSD"),
        stretch(1100, 150, 0.001, "X:SOLUSD", offset=90),
    )


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A file that must never come to exist."""
    return tmp_path / "pwned"


# -- the language: precedence and evaluation ---------------------------------------------------


def test_multiplication_binds_tighter_than_addition() -> None:
    tree = parse("open + high * low")
    assert isinstance(tree, Binary) and tree.op == "+"
    assert isinstance(tree.left, Name) and tree.left.name == "open"
    assert isinstance(tree.right, Binary) and tree.right.op == "*"
    frame = bar_rows(open=[1.0], high=[2.0], low=[3.0])
    assert evaluate("open + high * low == 7", frame) == [True]
    assert evaluate("(open + high) * low == 9", frame) == [True]
    assert evaluate("open - high - low == -4", frame) == [True]  # left-associative
    assert evaluate("low / high / open == 1.5", frame) == [True]


def test_not_binds_looser_than_comparison_and_tighter_than_and() -> None:
    tree = parse("not close > 1 and open > 1")
    assert isinstance(tree, Binary) and tree.op == "and"
    assert isinstance(tree.left, Unary) and tree.left.op == "not"
    assert isinstance(tree.left.operand, Compare)
    # not(true) and false → false; not(true and false) would be true
    frame = bar_rows(close=[5.0, 0.0], open=[0.0, 5.0])
    assert evaluate("not close > 1 and open > 1", frame) == [False, True]
    assert evaluate("not (close > 1 and open > 1)", frame) == [True, True]


def test_and_binds_tighter_than_or() -> None:
    tree = parse("close > 1 or open > 1 and high > 1")
    assert isinstance(tree, Binary) and tree.op == "or"
    assert isinstance(tree.right, Binary) and tree.right.op == "and"
    # true or (false and false) → true; (true or false) and false would be false
    frame = bar_rows(close=[2.0], open=[0.0], high=[0.0])
    assert evaluate("close > 1 or open > 1 and high > 1", frame) == [True]
    assert evaluate("(close > 1 or open > 1) and high > 1", frame) == [False]


def test_crossings_against_a_series_and_a_constant() -> None:
    frame = bar_rows(close=[1.0, 5.0, 1.0, 5.0, 5.0], open=[3.0, 3.0, 3.0, 3.0, 6.0])
    assert evaluate("crosses_above(close, open)", frame) == [False, True, False, True, False]
    assert evaluate("crosses_below(close, open)", frame) == [False, False, True, False, True]
    assert evaluate("crosses_above(close, 3)", frame) == [False, True, False, True, False]
    assert evaluate("crosses_below(close, 3)", frame) == [False, False, True, False, False]
    assert evaluate("crosses_above(3, close)", frame) == [False, False, True, False, False]


def test_comparison_chain_means_both_comparisons() -> None:
    frame = bar_rows(close=[0.0, 2.0, 4.0, 3.0, 1.0])
    assert evaluate("1 < close < 3", frame) == [False, True, False, False, False]
    assert evaluate("1 <= close <= 3", frame) == [False, True, False, True, True]
    assert evaluate("0 < close < 5 != 4", frame) == [False, True, True, True, True]


def test_rsi_band_chain_on_real_bars(btc_records: pl.DataFrame) -> None:
    got = evaluate("30 < rsi(14) < 70", btc_records)
    rsi = btc_records["rsi_14"].to_list()
    want = [r is not None and 30 < r < 70 for r in rsi]
    assert got == want
    assert any(got) and not all(got)


def test_warming_indicator_compares_false_and_its_negation_true(
    btc_records: pl.DataFrame,
) -> None:
    warming = btc_records.head(14)
    assert warming["rsi_14"].null_count() == 14
    assert evaluate("rsi(14) > 70", warming) == [False] * 14
    assert evaluate("rsi(14) <= 70", warming) == [False] * 14
    assert evaluate("rsi(14) == rsi(14)", warming) == [False] * 14
    assert evaluate("not (rsi(14) > 70)", warming) == [True] * 14
    assert evaluate("rsi(14) > 70 or close > 0", warming) == [True] * 14


def test_division_by_zero_gives_null_which_compares_false() -> None:
    frame = bar_rows(close=[4.0, 4.0], high=[2.0, 3.0], low=[2.0, 1.0])
    assert evaluate("close / (high - low) > 0", frame) == [False, True]
    assert evaluate("close / (high - low) <= 0", frame) == [False, False]
    assert evaluate("not (close / (high - low) > 0)", frame) == [True, False]
    assert evaluate("pct_change(high) > -1000", bar_rows(high=[0.0, 5.0])) == [False, False]


def test_min_and_max_with_a_null_are_null(btc_records: pl.DataFrame) -> None:
    warm = btc_records["rsi_14"].is_not_null().to_list()
    assert not all(warm) and any(warm)
    assert evaluate("min(close, rsi(14)) > -1", btc_records) == warm
    assert evaluate("max(close, rsi(14)) > -1", btc_records) == warm
    assert evaluate("max(close, rsi(14), 1e9) > -1", btc_records) == warm
    frame = bar_rows(close=[3.0], open=[5.0], low=[1.0])
    assert evaluate("min(close, open, low) == 1 and max(close, open, low) == 5", frame) == [True]


def test_side_compares_with_buy_sell_unknown_on_trades() -> None:
    frame = pl.DataFrame(
        {"symbol": ["X:BTCUSD"] * 3, "side": [SIDE_BUY, SIDE_SELL, SIDE_UNKNOWN]},
        schema={"symbol": pl.String, "side": pl.Int8},
    )
    assert evaluate('side == "buy"', frame, "trade") == [True, False, False]
    assert evaluate("side == 'sell'", frame, "trade") == [False, True, False]
    assert evaluate('side == "unknown"', frame, "trade") == [False, False, True]
    assert evaluate('side != "buy"', frame, "trade") == [False, True, True]
    assert evaluate('"buy" == side', frame, "trade") == [True, False, False]


@pytest.mark.parametrize("spelling", ["BTC-USD", "btcusd", "X:BTCUSD", "btc-usd"])
def test_symbol_literal_is_normalised(spelling: str) -> None:
    frame = pl.DataFrame({"symbol": ["X:BTCUSD", "X:ETHUSD"], "close": [1.0, 1.0]})
    assert evaluate(f'symbol == "{spelling}"', frame) == [True, False]
    assert evaluate(f'symbol != "{spelling}"', frame) == [False, True]


# -- the language: what it rejects, and where --------------------------------------------------

REJECTED = [
    # syntax
    ("bar", "close §= 1", "'=='"),
    ("bar", "close > 1 §&& open > 1", "'and'"),
    ("bar", "close > 1 §|| open > 1", "'or'"),
    ("bar", "close§[0] > 1", "indexing"),
    ("bar", "close§.__class__ > 1", "attribute access"),
    ("bar", "(close)§.real > 1", "attribute access"),
    ("bar", "§__import__('os') > 1", "double underscores"),
    ("bar", "close > §__builtins__", "double underscores"),
    ("bar", "close > 1 and §__class__ > 2", "double underscores"),
    ("bar", 'symbol == §"BTC-USD', "not closed"),
    ("bar", "symbol == §'BTC-USD", "not closed"),
    ("bar", 'symbol == §"BTC\n-USD"', "not closed"),
    ("bar", "close §% 2 > 1", "+ - * /"),
    ("bar", "close *§* 2 > 1", "expected a number, a name or '('"),
    ("bar", "close §^ 2 > 1", "power"),
    ("bar", "close > 1 §close < 2", "expected an operator or the end"),
    ("bar", "(close > 1§", "')'"),
    ("bar", "rsi(14 < 30§", "')'"),
    ("bar", "close > §", "the end of the expression"),
    ("bar", "close > 1 and §and open > 1", "expected a value before 'and'"),
    ("bar", "close > 1 §; open > 1", "unexpected ';'"),
    ("bar", "close §if close > 1 else 0", "expected an operator or the end"),
    ("bar", "close > §1e999", "too large"),
    # names and kinds
    ("bar", "close > 1 and §foo > 2", "unknown field 'foo'"),
    ("bar", "§bogus(3) > 1", "unknown function 'bogus'"),
    ("bar", "§eval('1') > 0", "unknown function 'eval'"),
    ("bar", "rsi(14) < 30 and §rsi > 1", "rsi is a function"),
    ("bar", "§close + 1", "gives a number"),
    ("bar", "§1", "expected a comparison"),
    ("bar", "§close and open > 1", "expected a true/false"),
    ("bar", "not §close", "after 'not'"),
    ("bar", "-(§close > 1) < 0", "after '-'"),
    ("bar", "close + (§open > 1) > 2", "on each side of '+'"),
    ("bar", "§close == 'x'", "text field"),
    ("bar", "§symbol < 'X:BTCUSD'", "only be compared with == or !="),
    ("bar", "symbol == §'no such thing!'", "write it as X:BTCUSD"),
    ("bar", "§side == 'buy'", "unknown field 'side'"),
    ("trade", "side == §'long'", "unknown side 'long'"),
    ("trade", "§side < 'buy'", "only be compared with == or !="),
    ("trade", "§side > 1", "only be compared with == or !="),
    ("trade", "§close > 1", "unknown field 'close'"),
    ("quote", "§price > 1", "unknown field 'price'"),
    # functions on the wrong kind of row
    ("trade", "§rsi(14) > 70", "works on bars"),
    ("trade", "price > 1 and §macd_hist() > 0", "works on bars"),
    ("quote", "§bb_upper(20, 2) > mid", "works on bars"),
    ("quote", "§stoch_k() < 20", "works on bars"),
    ("trade", "§imbalance() > 0.5", "works on bars and quotes"),
    # argument counts and kinds
    ("bar", "§highest(close) > 1", "takes 2 arguments, found 1"),
    ("bar", "§crosses_above(close)", "takes 2 arguments, found 1"),
    ("bar", "§abs(close, open) > 1", "abs() takes 1"),
    ("bar", "§min(close) > 1", "min() takes 2 to 8"),
    ("bar", "§imbalance(close) > 0", "imbalance() takes 0"),
    ("bar", "rsi(14, §3) > 1", "at most 1 argument"),
    ("bar", "macd(5, 35, 5, §7) > 1", "at most 3 arguments"),
    ("bar", "sma(close, §close) > 1", "window length"),
    ("bar", "prev(close, §open) > 1", "rows back"),
    ("bar", "crosses_above(close, §close > 1)", "expected a number in crosses_above()"),
    ("bar", "abs(§close > 1) > 0", "expected a number in abs()"),
    ("bar", "max(close, §symbol) > 0", "expected a number in max(), found text"),
    ("bar", "sma(§close > 1, 3) > 0", "as the series of sma()"),
    ("bar", 'rsi(§"14") > 1', "the rsi period"),
    ("bar", "rsi(§1) > 1", "from 2 to 1000"),
    ("bar", "rsi(§1001) > 1", "from 2 to 1000"),
    ("bar", "sma(close, §0) > 1", "from 1 to 1000"),
    ("bar", "bb_upper(20, §0) > close", "band width"),
    ("bar", "prev(close, §-1) > 1", "rows back"),
    ("bar", "close / §0 > 1", "division by zero"),
    ("bar", "close / §0.0 > 1", "division by zero"),
    # periods that are not whole numbers
    ("bar", "rsi(§14.5) < 30", "whole number"),
    ("bar", "rsi(§14.0) < 30", "whole number"),
    ("bar", "sma(close, §2.5) > 1", "whole number"),
    ("bar", "highest(high, §3.0) <= close", "whole number"),
    ("bar", "macd(§12.5) > 0", "whole number"),
    ("bar", "prev(close, §1.5) > 1", "whole number"),
    # empty
    ("bar", "§", "empty"),
    ("bar", "§   ", "empty"),
]


@pytest.mark.parametrize(("kind", "marked", "fragment"), REJECTED)
def test_rejected_at_the_right_offset(kind: str, marked: str, fragment: str) -> None:
    text, at = unmark(marked)
    got = problems_of(text, kind)
    assert len(got) == 1, got
    assert got[0][0] == at, f"problem at {got[0][0]}, expected {at}: {got[0][1]}"
    assert fragment in got[0][1]


def test_several_problems_in_one_expression_are_all_reported() -> None:
    marked = "§foo > 1 and rsi(§1.5) > 2 or §side == 'buy' and §bar(1) > 0"
    places = []
    while MARK in marked:
        marked, at = unmark(marked)
        places.append(at)
    got = problems_of(marked)
    assert [at for at, _ in got] == places
    assert "foo" in got[0][1] and "rsi period" in got[1][1]
    assert "side" in got[2][1] and "unknown function 'bar'" in got[3][1]


def test_an_expression_longer_than_the_limit_is_rejected() -> None:
    fits = "close > 1".ljust(MAX_LENGTH)
    compiled_ok(fits)
    got = problems_of(fits + " ")
    assert got[0][0] == MAX_LENGTH
    assert str(MAX_LENGTH) in got[0][1]
    assert problems_of("x" * 100_000)[0][0] == MAX_LENGTH


@pytest.mark.parametrize(
    ("opening", "closing", "core"),
    [
        ("(", ")", "close > 1"),
        ("not ", "", "close > 1"),
        ("-", "", "close < 1"),
        ("abs(", ")", "close"),
    ],
)
def test_nesting_deeper_than_the_limit_is_rejected(opening: str, closing: str, core: str) -> None:
    def nested(depth: int) -> str:
        text = opening * depth + core + closing * depth
        return text + " > 1" if core == "close" else text

    compiled_ok(nested(MAX_DEPTH))
    text = nested(MAX_DEPTH + 1)
    got = problems_of(text)
    assert len(got) == 1 and f"deeper than {MAX_DEPTH}" in got[0][1]
    # the caret is at the opening that goes too deep, or the token right after it
    assert MAX_DEPTH * len(opening) <= got[0][0] <= (MAX_DEPTH + 1) * len(opening)
    assert problems_of(opening * 10_000)[0][1]  # no RecursionError, one problem


def test_more_tokens_than_the_limit_are_rejected() -> None:
    clause = " or close > 1"
    fits = "close > 1" + clause * ((MAX_TOKENS - 3) // 4)
    assert len(lang.tokenize(fits)) - 1 <= MAX_TOKENS  # the end token is not counted
    compiled_ok(fits)
    text = fits + clause * 2
    assert len(text) < MAX_LENGTH
    got = problems_of(text)
    assert len(got) == 1 and f"more than {MAX_TOKENS} tokens" in got[0][1]
    starts = [tok.at for tok in lang.tokenize(fits)][:-1]
    assert got[0][0] > starts[-1]


def test_nested_windows_evaluate_in_bounded_time() -> None:
    # MAX_DEPTH bounds the text, not the work: three nested 30-bar means must stay cheap
    frame = records([float(1 + i % 7) for i in range(100)])
    text = "sma(sma(sma(close, 30), 30), 30) > 0"
    compiled, problems = compile_expression(text, "bar")
    if compiled is None:  # refusing it is as good as evaluating it quickly
        assert problems
        return
    began = time.perf_counter()
    result = evaluate(text, frame)
    elapsed = time.perf_counter() - began
    assert result[-1] is True
    assert elapsed < 0.5, f"{text} took {elapsed:.1f} s on {frame.height} rows"


@pytest.mark.parametrize("when", ["0 < vwap", "0 < buy_volume", "1 <= trades", "0 < vwap + 1"])
def test_a_constant_compared_with_a_column_bar_files_lack(
    btc_records: pl.DataFrame, when: str
) -> None:
    # bar files have no vwap, trades or buy/sell volume: those columns are all null
    engine = FilterEngine([make(when, trigger="level")])
    assert engine.on_bars(btc_records) == []


# -- filter files ------------------------------------------------------------------------------


def test_a_minimal_file_gets_the_defaults() -> None:
    f = parse_filter("name: rsi-low\nwhen: rsi(14) < 30\n", "rsi-low.yaml")
    assert (f.name, f.when, f.on, f.trigger, f.severity) == (
        "rsi-low",
        "rsi(14) < 30",
        "bar",
        "edge",
        "warning",
    )
    assert f.symbols == () and f.timeframe is None and f.cooldown == 0
    assert f.notify == ("console",)


def test_every_key_is_read() -> None:
    f = parse_filter(
        "name: btc-rsi-oversold\n"
        "description: RSI under 30 with buyers stepping in\n"
        'symbols: ["BTC-USD", btcusd, "X:ETHUSD"]\n'
        "on: bar\n"
        "timeframe: 5m\n"
        "when: rsi(14) < 30 and buy_volume > sell_volume\n"
        "trigger: level\n"
        "cooldown: 90s\n"
        "severity: critical\n"
        'message: "{symbol} RSI {rsi_14:.1f} at {close}"\n'
        "notify: [console, telegram]\n",
        "f.yaml",
    )
    assert f.symbols == ("X:BTCUSD", "X:ETHUSD")
    assert f.timeframe == 5 * MINUTE and f.timeframe_name == "5m"
    assert f.cooldown == 90_000 and f.trigger == "level" and f.severity == "critical"
    assert f.notify == ("console", "telegram")
    assert f.message == "{symbol} RSI {rsi_14:.1f} at {close}"


def test_yaml_syntax_error_is_located() -> None:
    err = rejected("name: a\ntrigger: edge: level\nwhen: close > 1\n")
    p = err.problems[0]
    assert (p.path, p.line, p.column) == ("f.yaml", 2, 14)
    assert "not valid YAML" in p.message
    assert p.text == "trigger: edge: level"


def test_unknown_key_is_reported_with_a_suggestion() -> None:
    err = rejected("name: a\nwhen: close > 1\ntrigerr: edge\n")
    p = err.problems[0]
    assert (p.line, p.column) == (3, 1)
    assert "'trigerr'" in p.message and "did you mean trigger" in p.message


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [
        ("name: a\nwhen: clsoe > 1\n", "unknown field 'clsoe' (did you mean close?)"),
        ("name: a\nwhen: vlume > 1\n", "unknown field 'vlume' (did you mean volume?)"),
        ("name: a\nwhen: mcad() > 1\n", "unknown function 'mcad' (did you mean macd?)"),
        ("name: a\nwehn: close > 1\n", "unknown key 'wehn' (did you mean when?)"),
    ],
)
def test_a_transposed_name_gets_a_suggestion(text: str, suggestion: str) -> None:
    # Before: `severty` got a suggestion but `clsoe`, `mcad` and `wehn` did not.
    err = rejected(text)
    assert any(suggestion in p.message for p in err.problems), [p.message for p in err.problems]


def test_duplicate_key_is_reported_at_the_second_one() -> None:
    err = rejected("name: a\nwhen: close > 1\nname: b\n")
    assert [(p.line, p.column) for p in err.problems] == [(3, 1)]
    assert "'name' appears twice" in err.problems[0].message


@pytest.mark.parametrize("missing", ["name", "when"])
def test_a_missing_required_key_is_reported(missing: str) -> None:
    doc = {"name": "name: a\n", "when": "when: close > 1\n"}
    del doc[missing]
    err = rejected("description: x\n" + "".join(doc.values()))
    assert [p.message for p in err.problems] == [f"the key {missing!r} is missing"]


@pytest.mark.parametrize(
    ("marked", "fragment"),
    [
        ("name: §[a]\nwhen: close > 1\n", "expected a name, found a list"),
        ("name: a\nwhen: §[close > 1]\n", "expected an expression, found a list"),
        ("name: a\nwhen: §{close: 1}\n", "expected an expression, found a mapping"),
        ("name: a\nwhen: close > 1\nseverity: §[info]\n", "found a list"),
        ("name: a\nwhen: close > 1\ntrigger: §{edge: 1}\n", "found a mapping"),
        ("name: a\nwhen: close > 1\ncooldown: §[5m]\n", "found a list"),
        ("name: a\nwhen: close > 1\nsymbols: §{a: b}\n", "found a mapping"),
        ("name: a\nwhen: close > 1\nsymbols: [§[X:BTCUSD]]\n", "found a list"),
        ("name: a\nwhen: close > 1\nnotify: [§{a: 1}]\n", "found a mapping"),
        ("§[a, b]\n", "expected a mapping"),
        ("name: a\nwhen: close > 1\ncooldown: §soon\n", "invalid cooldown"),
        ("name: a\nwhen: close > 1\ntimeframe: §7m\n", "unknown timeframe"),
        ("name: a\nwhen: close > 1\non: §book\n", "unknown row kind"),
        ("name: §Bad_Name\nwhen: close > 1\n", "invalid name"),
        ("name: a\nwhen: close > 1\nsymbols: [§'not a symbol!']\n", "write it as X:BTCUSD"),
        ("name: a\nwhen: close > 1\nsymbols: §[]\n", "at least one symbol"),
        ("name: a\nwhen: close > 1\nnotify: [§email]\n", "unknown notifier"),
    ],
)
def test_wrong_values_are_reported_where_they_are(marked: str, fragment: str) -> None:
    text, at = unmark(marked)
    err = rejected(text)
    assert len(err.problems) == 1, err.details
    p = err.problems[0]
    assert (p.line, p.column) == line_col(text, at), p.render()
    assert fragment in p.message


def test_timeframe_on_a_trade_filter_is_an_error() -> None:
    err = rejected("name: a\non: trade\ntimeframe: 1m\nwhen: price > 1\n")
    p = err.problems[0]
    assert (p.line, p.column) == (3, 1)
    assert "applies to bars" in p.message


@pytest.mark.parametrize(
    "marked",
    [
        "name: a\nwhen: close > 1\ndescription: &d x\nmessage: §*d\n",
        "base: &b {name: a}\n<<: §*b\nwhen: close > 1\n",
        "name: §&n a\nwhen: close > 1\n",
    ],
    ids=["alias", "merge-key", "anchor"],
)
def test_anchors_and_aliases_are_refused(marked: str) -> None:
    text, at = unmark(marked)
    err = rejected(text)
    ours = [p for p in err.problems if "anchors and aliases" in p.message]
    assert ours, err.details
    # at the anchor or at the alias, whichever is met first
    assert text.splitlines()[ours[0].line - 1][ours[0].column - 1] in "&*"
    assert (ours[0].line, ours[0].column) <= line_col(text, at)


def test_alias_bombs_are_refused_without_expanding_them() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    err = rejected("\n".join([*lines, "name: a", "when: close > 1"]) + "\n")
    assert "anchors and aliases" in err.problems[0].message


@pytest.mark.parametrize(
    "payload",
    [
        "name: a\nwhen: !!python/object/apply:os.system ['touch {marker}']\n",
        "name: a\nwhen: !!python/object/apply:os.system\n  args: ['touch {marker}']\n",
        "name: a\nwhen: close > 1\n"
        "description: !!python/object/apply:os.system ['touch {marker}']\n",
        "name: a\nwhen: !!python/object/apply:os.system close > 1\n",
        "name: !!python/object/apply:os.system a\nwhen: close > 1\n",
        "!!python/object/apply:os.system\nname: a\nwhen: close > 1\n",
    ],
    ids=["sequence", "mapping", "other-key", "scalar-when", "scalar-name", "document"],
)
def test_python_tags_execute_nothing_and_are_reported(payload: str, marker: Path) -> None:
    text = payload.replace("{marker}", str(marker))
    with pytest.raises(FilterError) as info:
        parse_filter(text, "evil.yaml")
    assert not marker.exists()
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "!!python" in s)
    assert any(p.line == line for p in info.value.problems), info.value.details


def test_a_file_over_64_kib_is_refused(tmp_path: Path) -> None:
    text = "name: a\nwhen: close > 1\ndescription: " + "x" * MAX_FILE_BYTES + "\n"
    err = rejected(text)
    assert "64 KiB" in err.problems[0].message
    path = tmp_path / "big.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(FilterError) as info:
        read_filter(path)
    assert "64 KiB" in str(info.value)
    assert info.value.problems[0].path == str(path)


@pytest.mark.parametrize("char", ["\x07", "\x1f", "\x7f", "\ufffe"])
def test_a_control_character_is_located_and_the_error_is_one_line(char: str) -> None:
    text = f"name: a\nwhen: close > 1\ndescription: x{char}y\n"
    err = rejected(text)
    assert "\n" not in str(err), str(err)
    assert [(p.line, p.column) for p in err.problems] == [(3, 15)]


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: a\nwhen: close > 1\ndescription: café\n".encode("latin-1"))
    with pytest.raises(FilterError) as info:
        read_filter(path)
    assert "UTF-8" in str(info.value)


@pytest.mark.parametrize(
    "marked",
    [
        "name: a\nwhen: close > 1 and §foo > 2\n",
        'name: a\nwhen: "close > 1 and §foo > 2"\n',
        "name: a\nwhen: 'close > 1 and §foo > 2'\n",
        "name: a\nwhen: 'symbol == ''BTC-USD'' and §foo > 2'\n",
        'name: a\nwhen: "symbol == \\"BTC-USD\\" and §foo > 2"\n',
        "name: a\nwhen:   close > 1   and   §foo > 2   # a comment\n",
        "name: a\nwhen: |\n  close > 1 and\n  §foo > 2\n",
        "name: a\nwhen: |-\n    close > 1\n    and §foo > 2\nseverity: info\n",
        "name: a\nwhen: >\n  close > 1\n  and §foo > 2\n",
        "name: a\nwhen: close > 1\n  and §foo > 2\n",
        "when: close > 1 and §foo > 2\nname: a\n",
        "name: a\nwhen: close > 1 and rsi(§14.5) < 2\n",
        "name: a\nwhen: \"close > 1 and symbol == §'nope!'\"\n",
    ],
)
def test_when_problems_map_to_the_file_line_and_column(marked: str) -> None:
    text, at = unmark(marked)
    err = rejected(text)
    assert len(err.problems) == 1, err.details
    p = err.problems[0]
    assert (p.line, p.column) == line_col(text, at), p.render()
    assert p.text == text.splitlines()[p.line - 1]


def test_every_problem_of_a_file_is_reported_in_order() -> None:
    text = (
        "severity: loud\n"
        "name: A\n"
        "when: foo > 1 and bar\n"
        "trigger: sometimes\n"
        "colour: red\n"
        "notify: [pigeon]\n"
    )
    err = rejected(text)
    where = [(p.line, p.column) for p in err.problems]
    assert where == [(1, 11), (2, 7), (3, 7), (3, 19), (4, 10), (5, 1), (6, 10)]
    assert where == sorted(where)
    message = str(err)
    assert message.startswith("f.yaml is not a valid filter: unknown severity 'loud'")
    assert message.endswith("(and 6 more problems).")
    assert "\n" not in message


def test_details_put_a_caret_under_the_spot() -> None:
    err = rejected("name: a\nwhen: close > 1 and foo > 2\n")
    (rendered,) = err.details
    head, source, caret = rendered.split("\n")
    assert head.startswith("f.yaml:2:21: unknown field 'foo'")
    assert source == "    when: close > 1 and foo > 2"
    assert caret == "    " + " " * 20 + "^"
    assert source[caret.index("^")] == "f"


@pytest.mark.parametrize(
    ("marked", "fragment"),
    [
        ("§{close.__class__}", "not a plain value name"),
        ("RSI §{close[0]}", "not a plain value name"),
        ("§{close!r}", "conversions"),
        ("§{close!s:>10}", "conversions"),
        ("§{}", "not a plain value name"),
        ("§{0}", "not a plain value name"),
        ("§{close:>{width}}", "nested fields"),
        ("at §{nope}", "'nope'"),
        ("{symbol} §{rsi_7}", "'rsi_7'"),
        ("{close§:zz}", "invalid format 'zz'"),
        ("{symbol§:.2f}", "invalid format '.2f'"),
        ("{{literal}} §{close.real}", "not a plain value name"),
        ("{{}} and {{ §{close[1]}", "not a plain value name"),
    ],
)
def test_message_templates_name_only_plain_values(marked: str, fragment: str) -> None:
    message, at = unmark(marked)
    prefix = "name: a\nwhen: rsi(14) < 30\nmessage: '"
    text = prefix + message.replace("'", "''") + "'\n"
    err = rejected(text)
    assert len(err.problems) == 1, err.details
    p = err.problems[0]
    assert fragment in p.message
    assert (p.line, p.column) == line_col(text, len(prefix) + at), p.render()


def test_an_unclosed_template_brace_is_reported() -> None:
    err = rejected("name: a\nwhen: close > 1\nmessage: 'RSI {close'\n")
    assert "not a valid template" in err.problems[0].message
    assert err.problems[0].line == 3


def test_a_valid_template_renders_values_and_na() -> None:
    template, problems = parse_template("{symbol} RSI {rsi_14:.1f} at {close} ({vwap:.2f}) {{x}}")
    assert problems == [] and template is not None
    assert template.names == ["symbol", "rsi_14", "close", "vwap"]
    text = template.render({"symbol": "X:BTCUSD", "rsi_14": 27.34, "close": 4091.2, "vwap": None})
    assert text == "X:BTCUSD RSI 27.3 at 4091.2 (n/a) {x}"
    assert template.render({"symbol": "X", "rsi_14": math.nan, "close": 1}) == (
        "X RSI n/a at 1 (n/a) {x}"
    )


ROUND_TRIP = Filter(
    name="btc-rsi-oversold",
    when='rsi(14) < 30 and symbol == "BTC-USD" or close > 1',
    description="RSI under 30: buyers # stepping in, 'quoted' \"too\"",
    symbols=("X:BTCUSD", "X:ETHUSD"),
    timeframe=5 * MINUTE,
    trigger="level",
    cooldown=90_000,
    severity="critical",
    message="{symbol} RSI {rsi_14:.1f} at {close} {{literal}}: yes",
    notify=("console", "telegram"),
)


def _same(a: Filter, b: Filter) -> bool:
    return msgspec.structs.replace(a, path="", source="") == msgspec.structs.replace(
        b, path="", source=""
    )


@pytest.mark.parametrize(
    "f",
    [
        ROUND_TRIP,
        Filter(name="whale", when="size * price > 1e6 and side == 'buy'", on="trade"),
        Filter(name="spread", when="spread > 5", on="quote", cooldown=1500, trigger="edge"),
        Filter(name="yaml-ish", when="close > 1", description="- [a]: {b} & *c ! % @ `"),
        Filter(name="bools", when="close > 1", description="yes"),
        Filter(name="nums", when="close > 1", description="1e3"),
        Filter(name="nul", when="close > 1", description="null"),
        Filter(name="tab", when="close > 1", description="a\tb"),
    ],
    ids=lambda f: f.name,
)
def test_to_yaml_round_trips(f: Filter) -> None:
    text = f.to_yaml()
    assert _same(parse_filter(text, "x.yaml"), f), text


@pytest.mark.parametrize(
    "escaped",
    ["bell \\a", "del \\x7f", "next line \\x85", "line sep \\u2028", "nul \\0", "bom \\ufeff"],
)
def test_to_yaml_round_trips_what_a_file_can_hold(escaped: str) -> None:
    f = parse_filter(f'name: a\nwhen: close > 1\ndescription: "{escaped} end"\n', "x.yaml")
    text = f.to_yaml()
    try:
        again = parse_filter(text, "x.yaml")
    except FilterError as exc:
        pytest.fail(f"to_yaml() wrote a file parse_filter rejects: {exc}\n{text!r}")
    assert again.description == f.description, text


def test_filter_from_options_reads_options_like_a_file() -> None:
    f = filter_from_options(
        "rsi-low",
        "rsi(14) < 30",
        timeframe="5m",
        symbols=["btcusd", "ETH-USD"],
        cooldown="90s",
        trigger="level",
        severity="critical",
        message="{symbol} {rsi_14:.1f}",
        description="a: b # c",
        notify=["console", "telegram"],
    )
    assert f.symbols == ("X:BTCUSD", "X:ETHUSD") and f.timeframe == 5 * MINUTE
    assert f.cooldown == 90_000 and f.description == "a: b # c"
    assert _same(parse_filter(f.to_yaml()), f)


def test_filter_from_options_reports_every_bad_option() -> None:
    with pytest.raises(FilterError) as info:
        filter_from_options(
            "Bad Name",
            "close >",
            on="quote",
            timeframe="1m",
            cooldown="soon",
            trigger="sometimes",
            severity="loud",
            notify=["email"],
        )
    messages = " | ".join(p.message for p in info.value.problems)
    for fragment in (
        "invalid name",
        "applies to bars",
        "found the end of the expression",
        "unknown trigger",
        "invalid cooldown",
        "unknown severity",
        "unknown notifier",
    ):
        assert fragment in messages
    assert len(info.value.problems) == 7


def test_filter_from_options_checks_the_message_against_the_row_kind() -> None:
    with pytest.raises(FilterError, match="'rsi_14'"):
        filter_from_options("t", "price > 1", on="trade", message="{rsi_14}")
    assert filter_from_options("t", "price > 1", on="trade", message="{price} {side}").message


# -- the engine --------------------------------------------------------------------------------


def test_edge_fires_when_the_condition_becomes_true_level_every_time() -> None:
    recs = records([1, 5, 5, 1, 5, 5, 5])
    times = recs["start"].to_list()
    edge = FilterEngine([make("close > 2")]).on_bars(recs)
    level = FilterEngine([make("close > 2", trigger="level")]).on_bars(recs)
    assert [a.time for a in edge] == [times[1], times[4]]
    assert [a.time for a in level] == [times[i] for i in (1, 2, 4, 5, 6)]


def test_edge_state_carries_across_batches() -> None:
    recs = records([1, 5, 5, 1, 5, 5, 5])
    engine = FilterEngine([make("close > 2")])
    got = []
    for i in range(recs.height):
        got += engine.on_bars(recs.slice(i, 1))
    assert [a.time for a in got] == [recs["start"][1], recs["start"][4]]


def test_the_first_valid_evaluation_fires() -> None:
    recs = records([5, 5, 1])
    assert [a.time for a in FilterEngine([make("close > 2")]).on_bars(recs)] == [T0]
    warming = records([5.0] * 6)
    got = FilterEngine([make("sma(close, 3) > 2")]).on_bars(warming)
    assert [a.time for a in got] == [T0 + 2 * MINUTE]


def test_cooldown_is_per_filter_and_symbol_in_event_time() -> None:
    n = 10
    recs = interleave(records([5.0] * n, "X:BTCUSD"), records([5.0] * n, "X:ETHUSD"))
    f = make("close > 2", trigger="level", cooldown="3m")
    engine = FilterEngine([f, make("close > 2", name="g", trigger="level")])
    got = []
    for i in range(0, recs.height, 3):  # batch cuts do not matter: cooldown is in event time
        got += engine.on_bars(recs.slice(i, 3))
    for symbol in ("X:BTCUSD", "X:ETHUSD"):
        times = [a.time for a in got if a.filter == "f" and a.symbol == symbol]
        assert times == [T0 + k * MINUTE for k in (0, 3, 6, 9)]
        assert len([a for a in got if a.filter == "g" and a.symbol == symbol]) == n
    assert engine.fired == {"f": 8, "g": 2 * n}
    assert engine.last_fired == {"f": T0 + 9 * MINUTE, "g": T0 + 9 * MINUTE}


def test_symbols_restrict_a_filter() -> None:
    recs = interleave(records([1, 5], "X:BTCUSD"), records([1, 5], "X:ETHUSD"))
    got = FilterEngine([make("close > 2", symbols=["eth-usd"])]).on_bars(recs)
    assert fired(got) == [("f", "X:ETHUSD", T0 + MINUTE)]


@pytest.mark.parametrize("state", ["revised", "partial"])
def test_only_final_bars_are_evaluated(state: str) -> None:
    recs = records([5, 5, 5])
    engine = FilterEngine([make("close > 2", trigger="level")])
    assert engine.on_bars(recs.with_columns(pl.lit(state).alias("state"))) == []
    assert engine.fired == {}
    edge = FilterEngine([make("close > 2")])
    edge.on_bars(records([5], start=T0).with_columns(pl.lit(state).alias("state")))
    # a bar that was not evaluated does not count as "already true" for the edge
    later = T0 + MINUTE
    assert [a.time for a in edge.on_bars(records([5], start=later))] == [later]


def test_a_revised_bar_corrects_the_history_filters_look_back_on() -> None:
    engine = FilterEngine([make("close > prev(close)", trigger="level")])
    assert [a.time for a in engine.on_bars(records([10, 11]))] == [T0 + MINUTE]
    revised = records([20], start=T0 + MINUTE).with_columns(pl.lit("revised").alias("state"))
    assert engine.on_bars(revised) == []
    # 15 is below the revised 20: no alert (against the stale 11 it would fire)
    assert engine.on_bars(records([15], start=T0 + 2 * MINUTE)) == []


def test_alert_time_is_the_bar_start_and_the_record_is_the_json_contract() -> None:
    f = make("close > 2", message="{symbol} closed at {close} ({timeframe}, {time})")
    (alert,) = FilterEngine([f]).on_bars(records([5], start=T0))
    assert alert.time == T0 and alert.timeframe == "1m"
    assert alert.message == "X:BTCUSD closed at 5.0 (1m, 2019-03-29 00:00:00 UTC)"
    record = alert.record()
    assert list(record) == [
        "type",
        "filter",
        "symbol",
        "timeframe",
        "time",
        "severity",
        "message",
        "values",
    ]
    assert record["type"] == "alert" and record["values"] == {"close": 5.0}
    assert json.loads(json.dumps(record)) == record


def test_message_and_values_come_from_the_row(btc_records: pl.DataFrame) -> None:
    f = make("rsi(14) < 30", message="{symbol} RSI {rsi_14:.1f} at {close} vol {volume:.3f}")
    alerts = FilterEngine([f]).on_bars(btc_records)
    assert alerts
    rows = {r["start"]: r for r in btc_records.iter_rows(named=True)}
    for a in alerts:
        row = rows[a.time]
        assert a.values == {"rsi_14": row["rsi_14"], "close": row["close"], "volume": row["volume"]}
        assert a.message == (
            f"X:BTCUSD RSI {row['rsi_14']:.1f} at {row['close']} vol {row['volume']:.3f}"
        )
        assert a.severity == "warning" and a.notify == ("console",)


def test_a_null_value_renders_as_na(btc_records: pl.DataFrame) -> None:
    f = make("close > 0 or vwap > 0", message="vwap {vwap:.2f} rsi {rsi_14:.1f}", trigger="level")
    alerts = FilterEngine([f]).on_bars(btc_records.head(3))
    assert [a.message for a in alerts] == ["vwap n/a rsi n/a"] * 3
    assert all(a.values["vwap"] is None for a in alerts)
    assert all(a.values.get("rsi_14") is None for a in alerts)


def test_trade_filters_run_per_event_at_the_event_time() -> None:
    batch = trades(
        [
            ("X:BTCUSD", 1_000, 100.0, 1.0, SIDE_BUY),
            ("X:ETHUSD", 1_001, 10.0, 500.0, SIDE_BUY),
            ("X:BTCUSD", 1_002, 100.0, 20.0, SIDE_SELL),
            ("X:BTCUSD", 1_003, 100.0, 30.0, SIDE_BUY),
            ("X:BTCUSD", 1_004, 100.0, 40.0, SIDE_BUY),
        ]
    )
    f = make(
        "size * price >= 1000 and side == 'buy'",
        on="trade",
        message="{side} {size} @ {price}",
    )
    got = FilterEngine([f]).on_trades(batch)
    assert fired(got) == [("f", "X:ETHUSD", 1_001), ("f", "X:BTCUSD", 1_003)]
    assert got[0].timeframe is None
    assert got[1].message == "buy 30.0 @ 100.0"
    assert got[1].values == {"size": 30.0, "price": 100.0}


JUMPS = [
    ("X:BTCUSD", 1_000, 100.0),
    ("X:ETHUSD", 1_001, 10.0),
    ("X:BTCUSD", 1_002, 100.0),
    ("X:BTCUSD", 1_003, 102.0),
    ("X:ETHUSD", 1_004, 10.5),
    ("X:BTCUSD", 1_005, 102.0),
    ("X:BTCUSD", 1_006, 104.0),
    ("X:ETHUSD", 1_007, 10.6),
]


def jump_trades(rows: list[tuple[str, int, float]]) -> pl.DataFrame:
    return trades([(s, t, p, 1.0, SIDE_BUY) for s, t, p in rows])


def test_prev_price_across_two_batches_equals_one_batch() -> None:
    f = make("price > prev(price) * 1.01", on="trade", trigger="level")
    whole = FilterEngine([f]).on_trades(jump_trades(JUMPS))
    assert [a.time for a in whole] == [1_003, 1_004, 1_006]
    assert whole[0].values == {"price": 102.0, "prev_price": 100.0}
    for cut in range(1, len(JUMPS)):
        engine = FilterEngine([f])
        got = engine.on_trades(jump_trades(JUMPS[:cut]))
        got += engine.on_trades(jump_trades(JUMPS[cut:]))
        assert got == whole, cut


def test_an_empty_trade_batch_does_not_lose_history() -> None:
    f = make("price > prev(price) * 1.01", on="trade", trigger="level")
    whole = FilterEngine([f]).on_trades(jump_trades(JUMPS))
    engine = FilterEngine([f])
    got = engine.on_trades(jump_trades(JUMPS[:3]))
    got += engine.on_trades(jump_trades([]))
    got += engine.on_trades(jump_trades(JUMPS[3:]))
    assert got == whole


def test_quote_filters_see_spread_mid_and_imbalance() -> None:
    batch = quotes(
        [
            ("X:BTCUSD", 1_000, 100.0, 1.0, 101.0, 1.0),
            ("X:BTCUSD", 1_001, 100.0, 9.0, 110.0, 1.0),
            ("X:BTCUSD", 1_002, 100.0, 0.0, 100.0, 1.0),
        ]
    )
    wide = make("spread > 5 and mid == 105", on="quote", trigger="level")
    heavy = make("imbalance() > 0.5", name="heavy", on="quote", trigger="level")
    got = FilterEngine([wide, heavy]).on_quotes(batch)
    assert sorted(fired(got)) == [("f", "X:BTCUSD", 1_001), ("heavy", "X:BTCUSD", 1_001)]
    assert next(a for a in got if a.filter == "heavy").values == {"imbalance": 0.8}


CUT_FILTERS = [
    make("crosses_above(close, sma(close, 10))", name="cross-sma"),
    make("close >= highest(high, 20)", name="breakout", trigger="level", cooldown="5m"),
    make("crosses_below(rsi(7), sma(rsi(7), 5))", name="rsi7-down"),
    make("rsi(7) > 60 and prev(rsi(7)) <= 60", name="rsi7-up"),
    make("crosses_above(macd(5, 35, 5), macd_signal(5, 35, 5))", name="macd-fast"),
    make("close < lowest(low, 15) * 1.001 and pct_change(close, 3) < 0", name="dip"),
    make("close > ema(close, 12) and change(close) > 0", name="ema-up", trigger="level"),
]


def assert_same_alerts(got: list[Alert], want: list[Alert]) -> None:
    def key(a: Alert) -> tuple[int, str, str]:
        return (a.time, a.filter, a.symbol)

    got, want = sorted(got, key=key), sorted(want, key=key)
    assert [key(a) for a in got] == [key(a) for a in want]
    for a, b in zip(got, want, strict=True):
        assert a.values.keys() == b.values.keys()
        for name, theirs in b.values.items():
            assert (a.values[name] is None) == (theirs is None)
            assert theirs is None or close_enough(a.values[name], theirs), (a, b)


class Stream:
    """Bar records of several symbols and the alerts `CUT_FILTERS` raise on them in one batch."""

    def __init__(self, records: pl.DataFrame, alerts: list[Alert]) -> None:
        self.records = records
        self.alerts = alerts

    def __repr__(self) -> str:  # hypothesis prints it with every failing example
        return f"Stream({self.records.height} records, {len(self.alerts)} alerts)"


@pytest.fixture(scope="module")
def stream(three_symbols: pl.DataFrame) -> Stream:
    alerts = FilterEngine(CUT_FILTERS).on_bars(three_symbols)
    assert {a.filter for a in alerts} == {f.name for f in CUT_FILTERS}
    assert {a.symbol for a in alerts} == {"X:BTCUSD", "X:ETHUSD", "X:SOLUSD"}
    return Stream(three_symbols, alerts)


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_batch_cuts_do_not_change_the_alerts(stream: Stream, data: st.DataObject) -> None:
    n = stream.records.height
    cuts = data.draw(
        st.lists(st.integers(1, n - 1), max_size=8, unique=True).map(sorted), label="cuts"
    )
    engine = FilterEngine(CUT_FILTERS)
    got: list[Alert] = []
    for a, b in pairwise([0, *cuts, n]):
        got += engine.on_bars(stream.records[a:b])
    assert_same_alerts(got, stream.alerts)


def test_a_long_batch_after_a_cut_keeps_derived_indicator_history(
    btc_records: pl.DataFrame,
) -> None:
    f = make("crosses_above(macd(5, 35, 5), macd_signal(5, 35, 5))")
    whole = FilterEngine([f]).on_bars(btc_records)
    starts = btc_records["start"].to_list()
    # cut right before a crossing, with more bars after the cut than any state keeps
    index = next(i for i in (starts.index(a.time) for a in whole) if i > 60)
    engine = FilterEngine([f])
    got = engine.on_bars(btc_records[:index]) + engine.on_bars(btc_records[index:])
    assert fired(got) == fired(whole)


def test_set_filters_keeps_the_state_of_an_unchanged_filter() -> None:
    text = "name: f\nwhen: close > 2\n"
    engine = FilterEngine([parse_filter(text, "f.yaml")])
    assert len(engine.on_bars(records([5], start=T0))) == 1
    other = make("close > 100", name="other")
    engine.set_filters([parse_filter(text, "f.yaml"), other])
    assert engine.on_bars(records([5], start=T0 + MINUTE)) == []  # still true: no new edge
    assert [f.name for f in engine.filters] == ["f", "other"]
    engine.set_filters([parse_filter(text.replace("close > 2", "close > 3"), "f.yaml")])
    assert len(engine.on_bars(records([5], start=T0 + 2 * MINUTE))) == 1  # a new filter


def test_set_filters_keeps_cooldowns_by_name() -> None:
    first = make("close > 2", cooldown="10m", trigger="level")
    engine = FilterEngine([first])
    assert len(engine.on_bars(records([5], start=T0))) == 1
    engine.set_filters([make("close > 3", cooldown="10m", trigger="level")])
    assert engine.on_bars(records([5], start=T0 + MINUTE)) == []
    engine.set_filters([])
    engine.set_filters([first])  # removed and added again: a fresh start
    assert len(engine.on_bars(records([5], start=T0 + 2 * MINUTE))) == 1


@pytest.mark.parametrize(
    ("when", "reference"),
    [
        ("rsi(7) > -1", lambda c, h, lo: {"rsi_7": talib.RSI(c, 7)}),
        (
            "macd(5, 35, 5) > -1e9 and macd_signal(5, 35, 5) > -1e9 and macd_hist(5, 35, 5) > -1e9",
            lambda c, h, lo: dict(
                zip(
                    ("macd_5_35_5", "macd_signal_5_35_5", "macd_hist_5_35_5"),
                    talib.MACD(c, 5, 35, 5),
                    strict=True,
                )
            ),
        ),
        (
            "bb_upper(20, 2.5) >= bb_lower(20, 2.5)",
            lambda c, h, lo: dict(
                zip(
                    ("bb_upper_20_2p5", "bb_lower_20_2p5"),
                    talib.BBANDS(c, 20, 2.5, 2.5, 0)[::2],
                    strict=True,
                )
            ),
        ),
        ("ema(50) > 0", lambda c, h, lo: {"ema_50": talib.EMA(c, 50)}),
        ("ema(high, 10) > 0", lambda c, h, lo: {"ema_high_10": talib.EMA(h, 10)}),
        ("sma(close, 30) > 0", lambda c, h, lo: {"sma_30": talib.SMA(c, 30)}),
        ("sma(low, 100) > 0", lambda c, h, lo: {"sma_low_100": talib.SMA(lo, 100)}),
        (
            "stoch_k(5, 3, 3) > -1 and stoch_d(5, 3, 3) > -1",
            lambda c, h, lo: dict(
                zip(
                    ("stoch_k_5_3_3", "stoch_d_5_3_3"),
                    talib.STOCH(h, lo, c, 5, 3, 0, 3, 0),
                    strict=True,
                )
            ),
        ),
    ],
    ids=["rsi7", "macd-5-35-5", "bb-20-2.5", "ema50", "ema-high-10", "sma30", "sma100", "stoch"],
)
def test_non_default_parameters_equal_talib(
    btc_bars: pl.DataFrame, btc_records: pl.DataFrame, when: str, reference: object
) -> None:
    c, h, lo = (btc_bars[x].to_numpy().astype(float) for x in ("close", "high", "low"))
    want: dict[str, np.ndarray] = reference(c, h, lo)  # type: ignore[operator]
    alerts = FilterEngine([make(when, trigger="level")]).on_bars(btc_records)
    starts = btc_records["start"].to_list()
    valid = np.all([~np.isnan(v) for v in want.values()], axis=0)
    assert [a.time for a in alerts] == [starts[i] for i in np.flatnonzero(valid)]
    for a in alerts:
        i = starts.index(a.time)
        assert want.keys() <= a.values.keys()
        for name, series in want.items():
            assert close_enough(a.values[name], float(series[i])), (name, a.time)


def test_run_on_bars_and_infer_timeframe(btc_bars: pl.DataFrame) -> None:
    assert infer_timeframe(btc_bars["time"]) == MINUTE
    assert infer_timeframe(pl.Series([5])) == MINUTE
    f = make("rsi(14) < 30", timeframe="1h")  # the file's timeframe gives way to the data's
    alerts, recs = run_on_bars(f, btc_bars, "X:BTCUSD")
    assert recs.height == btc_bars.height and alerts
    assert {a.timeframe for a in alerts} == {"1m"}


# -- the command the issue asked for -----------------------------------------------------------


def test_filter_test_prints_exactly_the_rsi_crossings_under_30(
    tmp_path: Path, btc_bars: pl.DataFrame
) -> None:
    (tmp_path / "rsi.yaml").write_text(
        "name: rsi-under-30\nwhen: rsi(14) < 30\ntrigger: edge\n", encoding="utf-8"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POLYGON_", "MASSIVE_", "TELEGRAM_", "DATABASE_URL", "POLYSTREAM_"))
    }
    env["POLYSTREAM_STATE_DIR"] = str(tmp_path / "state")
    command = ["filter", "test", "rsi.yaml", "--bars", str(DATA), "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "polystream", *command],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    alerts = [json.loads(line) for line in lines]

    rsi = talib.RSI(btc_bars["close"].to_numpy().astype(float), 14)
    below = np.nan_to_num(rsi, nan=100.0) < 30
    crossing = below & ~np.concatenate([[False], below[:-1]])
    times = btc_bars["time"].to_numpy()
    assert crossing.sum() > 5
    assert [a["time"] for a in alerts] == times[crossing].tolist()
    for a, i in zip(alerts, np.flatnonzero(crossing), strict=True):
        assert set(a) == {
            "type",
            "filter",
            "symbol",
            "timeframe",
            "time",
            "severity",
            "message",
            "values",
        }
        assert (a["type"], a["filter"], a["symbol"], a["timeframe"]) == (
            "alert",
            "rsi-under-30",
            "X:BTCUSD",
            "1m",
        )
        assert list(a["values"]) == ["rsi_14"]
        assert close_enough(a["values"]["rsi_14"], float(rsi[i]))
        assert a["values"]["rsi_14"] < 30


# -- the filters directory ---------------------------------------------------------------------


class Files:
    """Writes into a directory with strictly increasing modification times, so that every edit
    is visible to the watcher whatever the file system's timestamp granularity."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.clock = 1_700_000_000 * 10**9

    def write(self, name: str, text: str) -> Path:
        path = self.directory / name
        path.write_text(text, encoding="utf-8")
        self.clock += 10**9
        os.utime(path, ns=(self.clock, self.clock))
        return path


@pytest.fixture
def files(tmp_path: Path) -> Files:
    directory = tmp_path / "filters"
    directory.mkdir()
    return Files(directory)


def events(watcher: FilterWatcher) -> list[str]:
    return [e.event for e in watcher.poll()]


def test_watcher_picks_up_added_changed_and_removed_files(files: Files) -> None:
    watcher = FilterWatcher(files.directory)
    assert watcher.load() == [] and watcher.filters == []
    path = files.write("rsi.yaml", "name: rsi-low\nwhen: rsi(14) < 30\n")
    got = watcher.poll()
    assert [e.event for e in got] == ["filter_added"]
    assert "rsi-low" in got[0].detail and "rsi.yaml" in got[0].detail
    assert [f.when for f in watcher.filters] == ["rsi(14) < 30"]
    assert watcher.poll() == []
    files.write("rsi.yaml", "name: rsi-low\nwhen: rsi(14) < 25\n")
    assert events(watcher) == ["filter_changed"]
    assert [f.when for f in watcher.filters] == ["rsi(14) < 25"]
    files.write("rsi.yaml", "name: rsi-low\nwhen: rsi(14) < 25\n")  # touched, same content
    assert events(watcher) == []
    path.unlink()
    got = watcher.poll()
    assert [e.event for e in got] == ["filter_removed"] and "rsi-low" in got[0].detail
    assert watcher.filters == []


def test_a_broken_edit_is_reported_and_keeps_the_previous_version(files: Files) -> None:
    watcher = FilterWatcher(files.directory)
    path = files.write("rsi.yaml", "name: rsi-low\nwhen: rsi(14) < 30\n")
    assert events(watcher) == ["filter_added"]
    files.write("rsi.yaml", "name: rsi-low\nwhen: rsi(14) < < 30\n")
    (event,) = watcher.poll()
    assert event.event == "filter_error"
    assert event.detail.startswith(f"{path}:2:17: ")
    assert "previous version keeps running" in event.detail
    assert [f.when for f in watcher.filters] == ["rsi(14) < 30"]
    files.write("rsi.yaml", "name: rsi-low\nwhen: rsi(14) < 20\n")
    assert events(watcher) == ["filter_changed"]
    assert [f.when for f in watcher.filters] == ["rsi(14) < 20"]


def test_a_broken_file_at_start_is_an_error_of_load(files: Files) -> None:
    files.write("good.yaml", "name: good\nwhen: close > 1\n")
    files.write("bad.yaml", "name: bad\nwhen: close >\n")
    watcher = FilterWatcher(files.directory)
    errors = watcher.load()
    assert len(errors) == 1 and "bad.yaml" in str(errors[0])
    assert [f.name for f in watcher.filters] == ["good"]


def test_a_duplicate_name_in_a_second_file_is_an_error(files: Files) -> None:
    files.write("a.yaml", "name: same\nwhen: close > 1\n")
    watcher = FilterWatcher(files.directory)
    assert watcher.load() == []
    files.write("b.yaml", "name: same\nwhen: close > 2\n")
    (event,) = watcher.poll()
    assert event.event == "filter_error"
    assert "b.yaml" in event.detail and "already used" in event.detail
    assert [f.when for f in watcher.filters] == ["close > 1"]
    loaded = load_directory(files.directory)
    assert list(loaded.filters) == ["same"] and loaded.filters["same"].when == "close > 1"
    assert len(loaded.errors) == 1 and "already used" in str(loaded.errors[0])


def test_hidden_files_and_editor_backups_are_ignored(files: Files) -> None:
    watcher = FilterWatcher(files.directory)
    for name in (".hidden.yaml", "a.yaml~", "#a.yaml#", ".#a.yaml", "notes.txt", "a.yaml.swp"):
        files.write(name, "this: [is not: a filter\n")
    assert watcher.load() == []
    assert watcher.poll() == [] and watcher.filters == []
    assert load_directory(files.directory).errors == []
    files.write("a.yml", "name: a\nwhen: close > 1\n")
    assert events(watcher) == ["filter_added"]


def test_add_filter_and_find_filter(files: Files) -> None:
    f = make("close > 1", name="breakout")
    path = add_filter(files.directory, f, f.to_yaml())
    assert path == files.directory / "breakout.yaml"
    assert _same(read_filter(path), f)
    assert find_filter(files.directory, "breakout") == path
    with pytest.raises(ConfigError, match="already exists"):
        add_filter(files.directory, f, f.to_yaml())
    changed = make("close > 2", name="breakout")
    assert add_filter(files.directory, changed, changed.to_yaml(), force=True) == path
    assert read_filter(path).when == "close > 2"
    with pytest.raises(ConfigError, match="No filter named"):
        find_filter(files.directory, "nope")
    assert [p.name for p in files.directory.iterdir()] == ["breakout.yaml"]
