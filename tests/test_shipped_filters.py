"""The filter files shipped in `filters/`: each is valid and fires where its strategy says."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import pytest
import talib

from polystream.filters import Alert, Filter, FilterEngine, filter_files, read_filter, shipped_dir
from polystream.filters.engine import bar_records
from polystream.schema import QUOTE, SIDE_BUY, SIDE_SELL, TRADE

SYMBOL = "X:BTCUSD"
MINUTE = 60_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
OHLCV = ("open", "high", "low", "close", "volume")

# Every shipped file must have its cases below; a new file without them fails here.
COVERED = {
    "rsi-oversold",
    "rsi-overbought",
    "macd-bullish-cross",
    "macd-bearish-cross",
    "stoch-oversold-cross",
    "ao-bullish-zero-cross",
    "ao-bearish-zero-cross",
    "cci-overbought",
    "cci-oversold",
    "bollinger-breakout-up",
    "bollinger-breakout-down",
    "whale-trade",
    "price-spike",
    "book-imbalance",
    "scalp-long-entry",
}


# -- helpers -----------------------------------------------------------------------------------


def shipped(name: str) -> Filter:
    return read_filter(shipped_dir() / f"{name}.yaml")


def closes_from(start: float, steps: Sequence[float]) -> np.ndarray:
    """Closes beginning at `start`, each next one moved by a step."""
    return start + np.concatenate([[0.0], np.cumsum(steps)])


def ohlc(closes: np.ndarray, spread: float = 0.5) -> pl.DataFrame:
    """One-minute bars opening at the previous close, with wicks `spread` beyond the body."""
    opens = np.r_[closes[0], closes[:-1]]
    return pl.DataFrame(
        {
            "time": T0 + MINUTE * np.arange(len(closes), dtype=np.int64),
            "open": opens,
            "high": np.maximum(opens, closes) + spread,
            "low": np.minimum(opens, closes) - spread,
            "close": closes,
            "volume": np.ones(len(closes)),
        },
        schema={c: pl.Int64 if c == "time" else pl.Float64 for c in ("time", *OHLCV)},
    )


def columns(bars: pl.DataFrame, *names: str) -> list[np.ndarray]:
    return [bars[n].to_numpy() for n in names]


def run_bars(
    name: str,
    bars: pl.DataFrame,
    buy: Sequence[float] | None = None,
    sell: Sequence[float] | None = None,
) -> list[Alert]:
    records = bar_records(bars, SYMBOL, MINUTE)
    if buy is not None and sell is not None:
        # bar files carry no trade sides; the engine's own records would
        records = records.with_columns(
            pl.Series("buy_volume", buy, pl.Float64), pl.Series("sell_volume", sell, pl.Float64)
        )
    return FilterEngine([shipped(name)], timeframes=(MINUTE,)).on_bars(records)


def bar_of(alert: Alert) -> int:
    return (alert.time - T0) // MINUTE


def edges(condition: np.ndarray) -> list[int]:
    """Rows where an edge trigger fires: the condition true and false (or absent) just before."""
    before = np.r_[False, condition[:-1]]
    return np.flatnonzero(condition & ~before).tolist()


def crossed_above(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    before_a, before_b = np.r_[np.nan, a[:-1]], np.r_[np.nan, b[:-1]]
    return (a > b) & (before_a <= before_b)


def approx(x: float) -> object:
    return pytest.approx(float(x), rel=1e-9, abs=1e-9)


def ranging_then_jump(jump: float) -> np.ndarray:
    """30 bars swinging between 100 and 101, ending on the side away from the jump, then the
    jump, held for 3 bars (so the band or CCI window holds one outlier, at bar 31)."""
    up = jump > 0
    swing = [1.0, -1.0] * 15 if up else [-1.0, 1.0] * 15
    return closes_from(100.0 if up else 101.0, [*swing, jump, 0.0, 0.0, 0.0])


JUMP_BAR = 31
V_SHAPE = closes_from(200.0, [-1.0] * 45 + [1.0] * 20)
PEAK = closes_from(100.0, [1.0] * 45 + [-1.0] * 20)


# -- the files ---------------------------------------------------------------------------------


def test_shipped_files_are_valid_and_described() -> None:
    paths = filter_files(shipped_dir())
    assert len(paths) >= 10
    names = set()
    for path in paths:
        f = read_filter(path)
        assert f.name == path.stem
        assert f.description.endswith(".") and ". " not in f.description, f.name
        assert f.symbols == ()  # every watched symbol
        assert f.timeframe is None  # bar filters follow the run's first timeframe
        assert f.message, f.name
        names.add(f.name)
    assert names == COVERED


# -- RSI extremes ------------------------------------------------------------------------------


def rsi_oversold_case(fall: float) -> tuple[np.ndarray, list[Alert]]:
    closes = closes_from(100.0, [1.0] * 30 + [fall] * 10)
    return closes, run_bars("rsi-oversold", ohlc(closes))


def test_rsi_oversold_fires_once_when_a_sharp_fall_takes_rsi_under_30() -> None:
    closes, alerts = rsi_oversold_case(-2.5)
    rsi = talib.RSI(closes, 14)
    expected = edges(rsi < 30)
    assert len(expected) == 1 and expected[0] > 30  # during the fall, and it stays under 30
    i = expected[0]
    assert [bar_of(a) for a in alerts] == expected
    a = alerts[0]
    assert a.values["rsi_14"] == approx(rsi[i])
    assert a.values["close"] == closes[i]
    assert a.message == f"{SYMBOL} RSI {rsi[i]:.1f} oversold at {float(closes[i])}"
    assert (a.filter, a.symbol, a.timeframe, a.severity) == (
        "rsi-oversold",
        SYMBOL,
        "1m",
        "warning",
    )


def test_rsi_oversold_stays_quiet_on_a_milder_fall() -> None:
    closes, alerts = rsi_oversold_case(-2.0)
    assert 30 < np.nanmin(talib.RSI(closes, 14)) < 32
    assert alerts == []


def rsi_overbought_case(rise: float) -> tuple[np.ndarray, list[Alert]]:
    closes = closes_from(200.0, [-1.0] * 30 + [rise] * 10)
    return closes, run_bars("rsi-overbought", ohlc(closes))


def test_rsi_overbought_fires_once_when_a_sharp_rise_takes_rsi_over_70() -> None:
    closes, alerts = rsi_overbought_case(2.5)
    rsi = talib.RSI(closes, 14)
    expected = edges(rsi > 70)
    assert len(expected) == 1 and expected[0] > 30
    i = expected[0]
    assert [bar_of(a) for a in alerts] == expected
    assert alerts[0].values["rsi_14"] == approx(rsi[i])
    assert alerts[0].message == f"{SYMBOL} RSI {rsi[i]:.1f} overbought at {float(closes[i])}"


def test_rsi_overbought_stays_quiet_on_a_milder_rise() -> None:
    closes, alerts = rsi_overbought_case(2.0)
    assert 68 < np.nanmax(talib.RSI(closes, 14)) < 70
    assert alerts == []


# -- MACD crossovers ---------------------------------------------------------------------------


def macd_crosses(closes: np.ndarray) -> tuple[list[int], list[int], np.ndarray, np.ndarray]:
    macd, signal, _ = talib.MACD(closes, 12, 26, 9)
    return edges(crossed_above(macd, signal)), edges(crossed_above(signal, macd)), macd, signal


def test_macd_bullish_cross_fires_on_the_bar_macd_overtakes_its_signal() -> None:
    up, down, macd, signal = macd_crosses(V_SHAPE)
    assert len(up) == 1 and up[0] > 45 and down == []  # one cross, after the turn
    i = up[0]
    alerts = run_bars("macd-bullish-cross", ohlc(V_SHAPE))
    assert [bar_of(a) for a in alerts] == up
    assert alerts[0].values["macd"] == approx(macd[i])
    assert alerts[0].values["macd_signal"] == approx(signal[i])
    assert alerts[0].message == (
        f"{SYMBOL} MACD {macd[i]:.4g} crossed above signal {signal[i]:.4g} at {float(V_SHAPE[i])}"
    )


def test_macd_bullish_cross_stays_quiet_when_macd_crosses_downwards() -> None:
    up, down, _, _ = macd_crosses(PEAK)
    assert up == [] and len(down) == 1
    assert run_bars("macd-bullish-cross", ohlc(PEAK)) == []


def test_macd_bearish_cross_fires_on_the_bar_macd_drops_under_its_signal() -> None:
    up, down, macd, signal = macd_crosses(PEAK)
    assert len(down) == 1 and down[0] > 45 and up == []
    i = down[0]
    alerts = run_bars("macd-bearish-cross", ohlc(PEAK))
    assert [bar_of(a) for a in alerts] == down
    assert alerts[0].values["macd"] == approx(macd[i])
    assert alerts[0].values["macd_signal"] == approx(signal[i])
    assert alerts[0].message == (
        f"{SYMBOL} MACD {macd[i]:.4g} crossed below signal {signal[i]:.4g} at {float(PEAK[i])}"
    )


def test_macd_bearish_cross_stays_quiet_when_macd_crosses_upwards() -> None:
    assert macd_crosses(V_SHAPE)[1] == []
    assert run_bars("macd-bearish-cross", ohlc(V_SHAPE)) == []


# -- Stochastic crossover ----------------------------------------------------------------------


def stochastic(bars: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    high, low, close = columns(bars, "high", "low", "close")
    # TA-Lib smooths %K and %D with an SMA of 3 by default, as DESIGN §4 asks
    return talib.STOCH(high, low, close, fastk_period=14)


def test_stoch_oversold_cross_fires_when_k_turns_up_through_d_near_the_lows() -> None:
    # an accelerating fall keeps %K strictly under %D (a steady one would make them tie)
    falling = [-1.0 - 0.1 * k for k in range(15)]
    bars = ohlc(closes_from(100.0, [1.0] * 20 + falling + [1.5] * 5))
    k, d = stochastic(bars)
    crosses = edges(crossed_above(k, d))
    assert crosses == [36]  # the first bar up after the low at bar 35
    alerts = run_bars("stoch-oversold-cross", bars)
    assert [bar_of(a) for a in alerts] == crosses
    assert d[36] < 20
    assert alerts[0].values["stoch_k"] == approx(k[36])
    assert alerts[0].values["stoch_d"] == approx(d[36])
    assert alerts[0].message == (
        f"{SYMBOL} stochastic %K {k[36]:.1f} crossed above %D {d[36]:.1f} at {bars['close'][36]}"
    )


def test_stoch_oversold_cross_stays_quiet_when_k_crosses_d_high_up() -> None:
    # a short dip in a rally: %K does cross %D, but far from the oversold zone
    bars = ohlc(closes_from(100.0, [1.0] * 25 + [-1.0] * 3 + [1.5] * 5))
    k, d = stochastic(bars)
    crosses = edges(crossed_above(k, d))
    assert len(crosses) == 1 and d[crosses[0]] > 20
    assert run_bars("stoch-oversold-cross", bars) == []


# -- Awesome Oscillator ------------------------------------------------------------------------


def awesome(bars: pl.DataFrame) -> np.ndarray:
    high, low = columns(bars, "high", "low")
    median = talib.MEDPRICE(high, low)
    return talib.SMA(median, 5) - talib.SMA(median, 34)


def test_ao_bullish_zero_cross_fires_on_the_bar_ao_turns_positive() -> None:
    bars = ohlc(V_SHAPE)
    ao = awesome(bars)
    zero = np.zeros_like(ao)
    expected = edges(crossed_above(ao, zero))
    assert len(expected) == 1 and expected[0] > 45
    i = expected[0]
    alerts = run_bars("ao-bullish-zero-cross", bars)
    assert [bar_of(a) for a in alerts] == expected
    assert alerts[0].values["ao"] == approx(ao[i])
    assert alerts[0].values["prev_ao"] == approx(ao[i - 1])
    assert alerts[0].message == f"{SYMBOL} AO crossed above zero ({ao[i]:.4g}) at {V_SHAPE[i]}"


def test_ao_bullish_zero_cross_stays_quiet_when_ao_turns_negative() -> None:
    bars = ohlc(PEAK)
    ao = awesome(bars)
    assert edges(crossed_above(np.zeros_like(ao), ao)) != []  # it does cross zero, downwards
    assert run_bars("ao-bullish-zero-cross", bars) == []


def test_ao_bearish_zero_cross_fires_on_the_bar_ao_turns_negative() -> None:
    bars = ohlc(PEAK)
    ao = awesome(bars)
    expected = edges(crossed_above(np.zeros_like(ao), ao))
    assert len(expected) == 1 and expected[0] > 45
    i = expected[0]
    alerts = run_bars("ao-bearish-zero-cross", bars)
    assert [bar_of(a) for a in alerts] == expected
    assert alerts[0].values["ao"] == approx(ao[i])
    assert alerts[0].message == f"{SYMBOL} AO crossed below zero ({ao[i]:.4g}) at {PEAK[i]}"


def test_ao_bearish_zero_cross_stays_quiet_when_ao_turns_positive() -> None:
    assert run_bars("ao-bearish-zero-cross", ohlc(V_SHAPE)) == []


# -- CCI beyond ±100 ---------------------------------------------------------------------------


def cci(bars: pl.DataFrame) -> np.ndarray:
    high, low, close = columns(bars, "high", "low", "close")
    return talib.CCI(high, low, close, 20)


def test_cci_overbought_fires_on_a_jump_out_of_a_range() -> None:
    bars = ohlc(ranging_then_jump(1.5))
    values = cci(bars)
    assert edges(values > 100) == [JUMP_BAR]
    alerts = run_bars("cci-overbought", bars)
    assert [bar_of(a) for a in alerts] == [JUMP_BAR]
    assert alerts[0].values["cci_20"] == pytest.approx(values[JUMP_BAR], rel=1e-7)
    assert alerts[0].message == f"{SYMBOL} CCI {values[JUMP_BAR]:.0f} above +100 at 101.5"


def test_cci_overbought_stays_quiet_on_a_smaller_jump() -> None:
    bars = ohlc(ranging_then_jump(0.7))
    assert 0 < np.nanmax(cci(bars)[JUMP_BAR:]) < 100
    assert run_bars("cci-overbought", bars) == []


def test_cci_oversold_fires_on_a_drop_out_of_a_range() -> None:
    bars = ohlc(ranging_then_jump(-1.5))
    values = cci(bars)
    assert edges(values < -100) == [JUMP_BAR]
    alerts = run_bars("cci-oversold", bars)
    assert [bar_of(a) for a in alerts] == [JUMP_BAR]
    assert alerts[0].values["cci_20"] == pytest.approx(values[JUMP_BAR], rel=1e-7)
    assert alerts[0].message == f"{SYMBOL} CCI {values[JUMP_BAR]:.0f} below -100 at 99.5"


def test_cci_oversold_stays_quiet_on_a_smaller_drop() -> None:
    bars = ohlc(ranging_then_jump(-0.7))
    assert -100 < np.nanmin(cci(bars)[JUMP_BAR:]) < 0
    assert run_bars("cci-oversold", bars) == []


# -- Bollinger breakouts -----------------------------------------------------------------------


def bands(closes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    upper, _, lower = talib.BBANDS(closes, timeperiod=20)  # 2 deviations, SMA
    return upper, lower


def test_bollinger_breakout_up_fires_when_a_close_clears_the_upper_band() -> None:
    closes = ranging_then_jump(2.0)
    upper, _ = bands(closes)
    assert edges(closes > upper) == [JUMP_BAR]
    alerts = run_bars("bollinger-breakout-up", ohlc(closes))
    assert [bar_of(a) for a in alerts] == [JUMP_BAR]
    assert alerts[0].values["bb_upper"] == approx(upper[JUMP_BAR])
    assert alerts[0].values["close"] == 102.0
    assert alerts[0].message == (
        f"{SYMBOL} closed at 102.0 above the upper band {upper[JUMP_BAR]:.2f}"
    )


def test_bollinger_breakout_up_stays_quiet_when_the_close_stays_inside() -> None:
    closes = ranging_then_jump(1.6)
    upper, _ = bands(closes)
    assert -0.05 < closes[JUMP_BAR] - upper[JUMP_BAR] < 0  # just inside: the band widened too
    assert run_bars("bollinger-breakout-up", ohlc(closes)) == []


def test_bollinger_breakout_down_fires_when_a_close_breaks_the_lower_band() -> None:
    closes = ranging_then_jump(-2.0)
    _, lower = bands(closes)
    assert edges(closes < lower) == [JUMP_BAR]
    alerts = run_bars("bollinger-breakout-down", ohlc(closes))
    assert [bar_of(a) for a in alerts] == [JUMP_BAR]
    assert alerts[0].values["bb_lower"] == approx(lower[JUMP_BAR])
    assert alerts[0].message == (
        f"{SYMBOL} closed at 99.0 below the lower band {lower[JUMP_BAR]:.2f}"
    )


def test_bollinger_breakout_down_stays_quiet_when_the_close_stays_inside() -> None:
    closes = ranging_then_jump(-1.6)
    _, lower = bands(closes)
    assert 0 < closes[JUMP_BAR] - lower[JUMP_BAR] < 0.05
    assert run_bars("bollinger-breakout-down", ohlc(closes)) == []


# -- price spikes ------------------------------------------------------------------------------


def spike_case(level: float) -> tuple[np.ndarray, list[Alert]]:
    """Flat at 100, a jump to `level` at bar 5, held, and back to 100 at bar 12."""
    closes = np.array([100.0] * 5 + [level] * 7 + [100.0] * 3)
    return closes, run_bars("price-spike", ohlc(closes))


def test_price_spike_fires_on_a_jump_and_on_the_fall_back() -> None:
    closes, alerts = spike_case(102.5)
    moves = np.r_[np.nan, np.diff(closes) / closes[:-1] * 100]
    assert edges(np.abs(moves) > 2) == [5, 12]  # 7 minutes apart, past the cooldown
    assert [bar_of(a) for a in alerts] == [5, 12]
    up, down = alerts
    assert up.values["pct_change_close"] == approx(2.5)
    assert down.values["pct_change_close"] == approx((100 - 102.5) / 102.5 * 100)
    assert up.message == f"{SYMBOL} moved +2.50% in one bar to 102.5"
    assert down.message == f"{SYMBOL} moved -2.44% in one bar to 100.0"
    assert up.severity == "critical"


def test_price_spike_stays_quiet_on_moves_under_2_percent() -> None:
    closes, alerts = spike_case(101.9)
    assert 1.8 < np.nanmax(np.abs(np.diff(closes) / closes[:-1] * 100)) < 2
    assert alerts == []


# -- combined scalping entry -------------------------------------------------------------------


def scalp_case(buy_at_dip: float) -> tuple[np.ndarray, list[Alert], list[float], list[float]]:
    """A 60-bar climb (price far above its EMA 50), a two-bar pullback of 10, then a recovery.
    Buyers dominate bar 55 (above the EMA, but RSI 100) and take `buy_at_dip` of bar 64's 10."""
    closes = closes_from(100.0, [1.0] * 60 + [-10.0] * 2 + [1.0] * 3)
    buy, sell = [5.0] * len(closes), [5.0] * len(closes)
    buy[55], sell[55] = 8.0, 2.0
    buy[64], sell[64] = buy_at_dip, 10.0 - buy_at_dip
    return closes, run_bars("scalp-long-entry", ohlc(closes), buy, sell), buy, sell


def test_scalp_long_entry_fires_when_buyers_step_into_the_pullback() -> None:
    closes, alerts, buy, sell = scalp_case(8.0)
    rsi, ema = talib.RSI(closes, 14), talib.EMA(closes, 50)
    imbalance = (np.array(buy) - np.array(sell)) / (np.array(buy) + np.array(sell))
    pullback = (rsi < 45) & (closes > ema)
    assert np.flatnonzero(pullback).tolist() == [62, 63, 64, 65]
    assert edges(pullback & (imbalance > 0.3)) == [64]
    assert [bar_of(a) for a in alerts] == [64]
    a = alerts[0]
    assert a.values["rsi_14"] == approx(rsi[64])
    assert a.values["ema_50"] == approx(ema[64])
    assert a.values["imbalance"] == approx(0.6)
    assert a.message == (
        f"{SYMBOL} scalp long: RSI {rsi[64]:.1f}, close {closes[64]} > EMA50 {ema[64]:.2f}, "
        "imbalance 0.60"
    )


def test_scalp_long_entry_stays_quiet_without_enough_buy_dominance() -> None:
    _, alerts, _, _ = scalp_case(6.4)  # imbalance 0.28
    assert alerts == []


# -- whale trades ------------------------------------------------------------------------------


def trades(rows: list[tuple[float, float, float, int]]) -> pl.DataFrame:
    """(second, price, size, side) → a trade frame as the batcher builds it."""
    return pl.DataFrame(
        [
            (SYMBOL, T0 + round(s * 1000), price, size, side, 1, str(k), T0 + round(s * 1000) + 5)
            for k, (s, price, size, side) in enumerate(rows)
        ],
        schema=TRADE,
        orient="row",
    )


def whale_case(size: float) -> list[Alert]:
    engine = FilterEngine([shipped("whale-trade")])
    return engine.on_trades(
        trades(
            [
                (0.0, 50_000.0, 0.1, SIDE_BUY),
                (1.0, 50_000.0, size, SIDE_BUY),
                (4.0, 50_000.0, 3.0, SIDE_SELL),  # within the 10 s cooldown of the one before
                (9.0, 50_000.0, 0.2, SIDE_SELL),
                (20.0, 40_000.0, size * 1.25, SIDE_SELL),  # the same notional at a lower price
            ]
        )
    )


def test_whale_trade_fires_on_each_trade_of_100k_notional_after_the_cooldown() -> None:
    alerts = whale_case(2.0)  # 2 × 50 000 = 100 000 exactly: the threshold is inclusive
    assert [a.time - T0 for a in alerts] == [1_000, 20_000]
    first, second = alerts
    assert first.message == f"{SYMBOL} whale buy of 2.0 at 50000.0"
    assert second.message == f"{SYMBOL} whale sell of 2.5 at 40000.0"
    assert first.values == {"price": 50_000.0, "size": 2.0}
    assert (first.timeframe, first.severity, first.notify) == (
        None,
        "warning",
        ("console", "telegram"),
    )


def test_whale_trade_stays_quiet_just_under_100k() -> None:
    alerts = whale_case(1.9998)
    # the 3.0 lot at 4 s is now the first whale; nothing else reaches 100 000
    assert [a.time - T0 for a in alerts] == [4_000]


# -- order-book imbalance ----------------------------------------------------------------------


def quotes(rows: list[tuple[float, float, float]]) -> pl.DataFrame:
    """(second, bid size, ask size) at 50 000 / 50 001 → a quote frame as the batcher builds it."""
    return pl.DataFrame(
        [
            (SYMBOL, T0 + round(s * 1000), 50_000.0, bid, 50_001.0, ask, 1, T0 + round(s * 1000))
            for s, bid, ask in rows
        ],
        schema=QUOTE,
        orient="row",
    )


def test_book_imbalance_fires_when_the_top_of_book_turns_one_sided() -> None:
    engine = FilterEngine([shipped("book-imbalance")])
    alerts = engine.on_quotes(
        quotes(
            [
                (0.0, 1.0, 1.0),
                (1.0, 9.5, 0.5),  # 0.9 bid-heavy: fires
                (2.0, 9.0, 0.5),  # still one-sided: an edge fires once
                (3.0, 1.0, 1.0),
                (45.0, 0.5, 9.5),  # ask-heavy, but within the minute's cooldown
                (46.0, 1.0, 1.0),
            ]
        )
    )
    assert [a.time - T0 for a in alerts] == [1_000]
    # the cooldown is per (filter, symbol) and lasts across batches
    later = engine.on_quotes(
        quotes([(50.0, 0.5, 9.5), (51.0, 1.0, 1.0), (65.0, 0.2, 3.8), (66.0, 1.0, 1.0)])
    )
    assert [a.time - T0 for a in later] == [65_000]
    assert alerts[0].values["imbalance"] == approx(0.9)
    assert later[0].values["imbalance"] == approx(-0.9)
    assert (
        alerts[0].message == f"{SYMBOL} book imbalance +0.90: bid 9.5 @ 50000.0, ask 0.5 @ 50001.0"
    )
    assert (
        later[0].message == f"{SYMBOL} book imbalance -0.90: bid 0.2 @ 50000.0, ask 3.8 @ 50001.0"
    )


def test_book_imbalance_stays_quiet_on_thin_or_balanced_books() -> None:
    engine = FilterEngine([shipped("book-imbalance")])
    alerts = engine.on_quotes(
        quotes(
            [
                (0.0, 0.18, 0.01),  # 0.89 one-sided but only about 9 500 resting
                (1.0, 1.0, 1.0),
                (2.0, 9.0, 1.0),  # plenty resting, 0.8 is not over 0.8
                (3.0, 1.0, 1.0),
            ]
        )
    )
    assert alerts == []
