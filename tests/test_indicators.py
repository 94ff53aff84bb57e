"""Indicators against TA-Lib 0.8 on real and constructed bar series, and streamed in pieces."""

from __future__ import annotations

from importlib import resources

import numpy as np
import polars as pl
import pytest
import talib
from hypothesis import given, settings
from hypothesis import strategies as st

from polystream.indicators import IndicatorParams, IndicatorState, compute

TOLERANCE = 1e-9
CCI_TOLERANCE = 1e-7


@pytest.fixture(scope="module")
def btc_bars() -> pl.DataFrame:
    """The real BTC/USD minute bars shipped with polystream."""
    path = resources.files("polystream.data") / "btcusd_1m_2019-03-29.csv"
    return pl.read_csv(path.read_bytes()).rename({"time": "start"})


@pytest.fixture(scope="module")
def flat_bars(btc_bars: pl.DataFrame) -> pl.DataFrame:
    """BTC bars with stretches where nothing moves at all (high = low = close), longer than
    every window, so RSI, Stochastic and CCI meet fully flat windows."""
    close = btc_bars["close"].to_numpy().copy()
    high = btc_bars["high"].to_numpy().copy()
    low = btc_bars["low"].to_numpy().copy()
    for begin in (100, 400, 900):
        level = close[begin]
        close[begin : begin + 60] = level
        high[begin : begin + 60] = level
        low[begin : begin + 60] = level
    return btc_bars.with_columns(
        pl.Series("close", close), pl.Series("high", high), pl.Series("low", low)
    )


@pytest.fixture(scope="module")
def tiny_bars(btc_bars: pl.DataFrame) -> pl.DataFrame:
    """The same path scaled to about 1e-4, where absolute thresholds would break."""
    scale = 2.5e-8
    return btc_bars.with_columns(pl.col(c) * scale for c in ("open", "high", "low", "close"))


def reference(bars: pl.DataFrame, p: IndicatorParams) -> dict[str, np.ndarray]:
    c, h, lo = (bars[x].to_numpy().astype(float) for x in ("close", "high", "low"))
    slow_k, slow_d = talib.STOCH(h, lo, c, p.stoch_k, p.stoch_slow_k, 0, p.stoch_d, 0)
    macd, signal, hist = talib.MACD(c, p.macd_fast, p.macd_slow, p.macd_signal)
    upper, middle, lower = talib.BBANDS(c, p.bb, p.bb_k, p.bb_k, 0)
    median = talib.MEDPRICE(h, lo)
    out = {
        f"rsi_{p.rsi}": talib.RSI(c, p.rsi),
        "stoch_k": slow_k,
        "stoch_d": slow_d,
        "macd": macd,
        "macd_signal": signal,
        "macd_hist": hist,
        "ao": talib.SMA(median, p.ao_fast) - talib.SMA(median, p.ao_slow),
        f"cci_{p.cci}": talib.CCI(h, lo, c, p.cci),
        "bb_upper": upper,
        "bb_middle": middle,
        "bb_lower": lower,
    }
    out.update({f"sma_{n}": talib.SMA(c, n) for n in p.sma})
    out.update({f"ema_{n}": talib.EMA(c, n) for n in p.ema})
    return out


def assert_matches_talib(bars: pl.DataFrame, p: IndicatorParams) -> None:
    ours = compute(bars, p)
    for name, expected in reference(bars, p).items():
        got = ours[name].to_numpy().astype(float)
        nan_ref, nan_ours = np.isnan(expected), np.isnan(got)
        first_ref = int(np.argmax(~nan_ref))
        first_ours = int(np.argmax(~nan_ours))
        assert first_ours == first_ref, f"{name}: first valid row {first_ours} != {first_ref}"
        assert (nan_ref == nan_ours).all(), f"{name}: null rows differ"
        tol = CCI_TOLERANCE if name.startswith("cci") else TOLERANCE
        err = np.abs(got[~nan_ref] - expected[~nan_ref])
        bound = tol * np.maximum(1.0, np.abs(expected[~nan_ref]))
        worst = int(np.argmax(err - bound))
        assert (err <= bound).all(), f"{name}: row {worst} off by {err[worst]:.3e}"


def test_defaults_equal_talib_on_real_bars(btc_bars: pl.DataFrame) -> None:
    assert_matches_talib(btc_bars, IndicatorParams(sma=(10, 50), ema=(9, 21)))


def test_flat_windows(flat_bars: pl.DataFrame) -> None:
    p = IndicatorParams()
    assert_matches_talib(flat_bars, p)
    out = compute(flat_bars, p)
    # deep inside a flat stretch every window is flat: TA-Lib's conventions give 0
    row = out.row(150, named=True)
    assert row["stoch_k"] == 0.0 and row["stoch_d"] == 0.0 and row["cci_20"] == 0.0
    assert row["bb_upper"] - row["bb_lower"] <= 1e-9 * row["bb_middle"]


def test_fully_flat_series_gives_zero_rsi() -> None:
    bars = pl.DataFrame(
        {"start": range(80), **{c: [5.0] * 80 for c in ("open", "high", "low", "close")}}
    )
    out = compute(bars)
    assert out["rsi_14"].drop_nulls().to_list() == [0.0] * 66
    assert_matches_talib(bars, IndicatorParams())


def test_prices_around_1e_minus_4(tiny_bars: pl.DataFrame) -> None:
    assert_matches_talib(tiny_bars, IndicatorParams(sma=(20,), ema=(12,)))


def test_prices_of_very_different_magnitude(btc_bars: pl.DataFrame) -> None:
    # BTC at about 100,000: AO subtracts two means of prices that large
    huge = btc_bars.with_columns(pl.col(c) * 25 for c in ("open", "high", "low", "close"))
    assert_matches_talib(huge, IndicatorParams())


@pytest.mark.parametrize(
    "params",
    [
        IndicatorParams(
            rsi=7,
            stoch_k=5,
            stoch_slow_k=2,
            stoch_d=4,
            macd_fast=5,
            macd_slow=35,
            macd_signal=5,
            ao_fast=3,
            ao_slow=10,
            cci=14,
            bb=10,
            bb_k=1.5,
        ),
        IndicatorParams(macd_fast=26, macd_slow=12),  # TA-Lib swaps fast and slow
        IndicatorParams(
            rsi=2,
            stoch_k=1,
            stoch_slow_k=1,
            stoch_d=1,
            cci=2,
            bb=2,
            ao_fast=1,
            ao_slow=2,
            macd_fast=2,
            macd_slow=3,
            macd_signal=1,
        ),
    ],
)
def test_selectable_parameters(btc_bars: pl.DataFrame, params: IndicatorParams) -> None:
    assert_matches_talib(btc_bars, params)


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        IndicatorParams(bb=0)


def test_short_series_is_all_null(btc_bars: pl.DataFrame) -> None:
    p = IndicatorParams()
    out = compute(btc_bars.head(10), p)
    assert out.select(p.columns).null_count().row(0) == (10,) * len(p.columns)
    assert compute(btc_bars.head(0), p).height == 0


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=30))
def test_streaming_in_any_pieces_equals_the_whole(btc_bars: pl.DataFrame, cuts: list[int]) -> None:
    p = IndicatorParams(ema=(9,))
    whole = compute(btc_bars, p).select(p.columns)
    state = IndicatorState(p)
    parts, i = [], 0
    for k in [*cuts, btc_bars.height]:
        if i >= btc_bars.height:
            break
        parts.append(state.append(btc_bars.slice(i, k)))
        i += k
    streamed = pl.concat(parts).select(p.columns)
    assert streamed.equals(whole)  # identical, not merely close
    assert state.history is not None and state.history.height <= state.keep


def test_revision_recomputes_that_bar_and_later_state(btc_bars: pl.DataFrame) -> None:
    p = IndicatorParams()
    state = IndicatorState(p, revision_bars=60)
    state.append(btc_bars.head(1000))
    target = int(btc_bars["start"][980])
    changed = btc_bars.with_columns(
        pl.when(pl.col("start") == target)
        .then(pl.col("close") + 7.5)
        .otherwise(pl.col("close"))
        .alias("close")
    )
    revised = state.revise(changed.filter(pl.col("start") == target))
    rest = state.append(btc_bars.slice(1000, 200))
    expected = compute(changed.head(1200), p)
    assert revised.select(p.columns).equals(expected.slice(980, 1).select(p.columns))
    assert rest.select(p.columns).equals(expected.slice(1000, 200).select(p.columns))
