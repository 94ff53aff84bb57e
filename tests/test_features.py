"""Order-flow and book features against hand-computed values."""

from __future__ import annotations

import math
from typing import Any

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from polystream.events import Book
from polystream.features import (
    book_features,
    book_frame,
    flow_imbalance_expr,
    latest_quote_features,
    quote_features,
    trade_flow,
)

BTC = "X:BTCUSD"
ETH = "X:ETHUSD"
SOL = "X:SOLUSD"


def quotes(*rows: tuple[str, int, float, float, float, float]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={
            "symbol": pl.String,
            "time": pl.Int64,
            "bid": pl.Float64,
            "bid_size": pl.Float64,
            "ask": pl.Float64,
            "ask_size": pl.Float64,
        },
        orient="row",
    )


def column(frame: pl.DataFrame, name: str) -> list[Any]:
    return frame.get_column(name).to_list()


# Quotes


def test_spread_mid_and_imbalance() -> None:
    out = quote_features(
        quotes(
            (BTC, 1, 100.0, 3.0, 101.0, 1.0),
            (BTC, 2, 100.0, 0.0, 100.5, 2.0),
            (BTC, 3, 100.0, 2.0, 100.5, 0.0),
        )
    )
    assert column(out, "spread") == [1.0, 0.5, 0.5]
    assert column(out, "mid") == [100.5, 100.25, 100.25]
    # (3 − 1) / (3 + 1), then a side with no size is fully one-sided.
    assert column(out, "imbalance") == [0.5, -1.0, 1.0]
    assert out.columns[:6] == ["symbol", "time", "bid", "bid_size", "ask", "ask_size"]


def test_zero_sizes_leave_imbalance_null_but_keep_prices() -> None:
    out = quote_features(quotes((BTC, 1, 50.0, 0.0, 52.0, 0.0)))
    assert column(out, "spread") == [2.0]
    assert column(out, "mid") == [51.0]
    assert column(out, "imbalance") == [None]


def test_unquoted_side_nulls_every_feature() -> None:
    out = quote_features(
        quotes(
            (BTC, 1, 0.0, 0.0, 10.0, 2.0),
            (BTC, 2, 9.0, 1.0, 0.0, 0.0),
            (BTC, 3, -1.0, 1.0, 10.0, 1.0),
            (BTC, 4, math.nan, 1.0, 10.0, 1.0),
        )
    )
    for name in ("spread", "mid", "imbalance"):
        assert column(out, name) == [None, None, None, None], name


def test_crossed_quote_keeps_its_negative_spread() -> None:
    out = quote_features(quotes((BTC, 1, 101.0, 1.0, 100.0, 3.0)))
    assert column(out, "spread") == [-1.0]
    assert column(out, "mid") == [100.5]
    assert column(out, "imbalance") == [-0.5]


def test_integer_columns_are_accepted() -> None:
    frame = pl.DataFrame(
        {"symbol": [BTC], "time": [1], "bid": [10], "bid_size": [1], "ask": [12], "ask_size": [3]}
    )
    out = quote_features(frame)
    assert column(out, "spread") == [2.0]
    assert column(out, "mid") == [11.0]
    assert column(out, "imbalance") == [-0.5]


def test_empty_quotes() -> None:
    out = latest_quote_features(quotes())
    assert out.height == 0
    assert {"spread", "mid", "imbalance"} <= set(out.columns)


def test_latest_quote_per_symbol_by_time_then_input_order() -> None:
    out = latest_quote_features(
        quotes(
            (BTC, 1, 10.0, 1.0, 11.0, 1.0),
            (ETH, 5, 20.0, 3.0, 22.0, 1.0),
            (BTC, 3, 12.0, 1.0, 13.0, 1.0),
            (BTC, 2, 14.0, 1.0, 15.0, 1.0),
            (BTC, 3, 16.0, 1.0, 17.0, 3.0),
        )
    )
    assert column(out, "symbol") == [BTC, ETH]
    assert column(out, "time") == [3, 5]
    assert column(out, "bid") == [16.0, 20.0]
    assert column(out, "mid") == [16.5, 21.0]
    assert column(out, "spread") == [1.0, 2.0]
    assert column(out, "imbalance") == [-0.5, 0.5]


@given(
    st.floats(min_value=0, max_value=1e12, allow_nan=False),
    st.floats(min_value=0, max_value=1e12, allow_nan=False),
)
def test_imbalance_stays_in_range(bid_size: float, ask_size: float) -> None:
    value = column(quote_features(quotes((BTC, 1, 1.0, bid_size, 2.0, ask_size))), "imbalance")[0]
    if bid_size + ask_size == 0:
        assert value is None
    else:
        assert value is not None
        assert -1.0 <= value <= 1.0


# Book depth

DEEP_BIDS = [(100.0, 1.0), (99.0, 2.0), (98.0, 3.0), (97.0, 100.0)]
DEEP_ASKS = [(101.0, 2.0), (102.0, 2.0), (103.0, 1.0), (104.0, 50.0)]


def test_depth_imbalance_over_best_levels_only() -> None:
    features = book_features(BTC, 7, DEEP_BIDS, DEEP_ASKS, levels=3)
    assert features.symbol == BTC
    assert features.time == 7
    assert features.mid == 100.5
    # 1 + 2 + 3 against 2 + 2 + 1: the walls at 97 and 104 are beyond the third level.
    assert features.bid_depth == 6.0
    assert features.ask_depth == 5.0
    assert features.depth_imbalance == pytest.approx(1 / 11)


def test_depth_with_every_level() -> None:
    features = book_features(BTC, 7, DEEP_BIDS, DEEP_ASKS, levels=10)
    assert features.bid_depth == 106.0
    assert features.ask_depth == 55.0
    assert features.depth_imbalance == pytest.approx(51 / 161)


def test_unsorted_book_with_junk_levels_is_cleaned() -> None:
    bids = [(98.0, 3.0), (0.0, 5.0), (100.0, 1.0), (96.0, 0.0), (99.0, 2.0), (math.nan, 9.0)]
    asks = [(103.0, 1.0), (101.0, -4.0), (102.0, 2.0), (101.0, 2.0), (105.0, math.inf)]
    features = book_features(BTC, 1, bids, asks, levels=2)
    # Best two bids 100 and 99; best two asks 101 and 102 once the junk is gone.
    assert features.bid_depth == 3.0
    assert features.ask_depth == 4.0
    assert features.depth_imbalance == pytest.approx(-1 / 7)
    assert features.mid == 100.5


def test_repeated_price_levels_are_merged() -> None:
    features = book_features(BTC, 1, [(99.0, 1.0), (100.0, 2.0), (99.0, 3.0)], [], levels=2)
    assert features.bid_depth == 6.0
    assert features.ask_depth == 0.0
    assert features.depth_imbalance == 1.0


def test_empty_book() -> None:
    features = book_features(BTC, 1, [], [])
    assert features.mid is None
    assert features.bid_depth == 0.0
    assert features.ask_depth == 0.0
    assert isinstance(features.bid_depth, float)
    assert features.depth_imbalance is None
    assert features.supports == features.resistances == []
    assert features.support_sizes == features.resistance_sizes == []


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        book_features(BTC, 1, [], [], levels=0)
    with pytest.raises(ValueError):
        book_features(BTC, 1, [], [], clusters=-1)
    with pytest.raises(ValueError):
        book_frame([], levels=0)


# Support and resistance

# Mid 1000, so clusters are 0.5 wide (1000 × 0.0005 beats the 0.1 tick).
WALL_BIDS = [
    (999.9, 1.0),
    (999.8, 1.0),
    (999.0, 1.0),
    (995.0, 10.0),
    (994.9, 20.0),
    (994.8, 10.0),
    (990.0, 5.0),
    (989.9, 5.0),
]
WALL_ASKS = [
    (1000.1, 1.0),
    (1000.2, 1.0),
    (1005.0, 15.0),
    (1005.2, 15.0),
    (1010.0, 3.0),
    (1010.4, 3.0),
]


def test_clusters_find_the_big_walls() -> None:
    features = book_features(BTC, 1, WALL_BIDS, WALL_ASKS, clusters=3)
    assert features.mid == pytest.approx(1000.0)
    # (995×10 + 994.9×20 + 994.8×10) / 40, then (990×5 + 989.9×5) / 10, then (999.9 + 999.8) / 2.
    assert features.supports == pytest.approx([994.9, 989.95, 999.85])
    assert features.support_sizes == pytest.approx([40.0, 10.0, 2.0])
    # (1005×15 + 1005.2×15) / 30, (1010 + 1010.4) / 2, then (1000.1 + 1000.2) / 2.
    assert features.resistances == pytest.approx([1005.1, 1010.2, 1000.15])
    assert features.resistance_sizes == pytest.approx([30.0, 6.0, 2.0])


def test_cluster_count_is_respected() -> None:
    features = book_features(BTC, 1, WALL_BIDS, WALL_ASKS, clusters=1)
    assert features.supports == pytest.approx([994.9])
    assert features.resistances == pytest.approx([1005.1])
    assert book_features(BTC, 1, WALL_BIDS, WALL_ASKS, clusters=0).supports == []


def test_clusters_do_not_depend_on_level_order() -> None:
    shuffled = book_features(BTC, 1, WALL_BIDS[::-1], WALL_ASKS[3:] + WALL_ASKS[:3])
    assert shuffled.supports == pytest.approx([994.9, 989.95, 999.85])
    assert shuffled.resistances == pytest.approx([1005.1, 1010.2, 1000.15])


def test_wall_across_a_round_price_stays_whole() -> None:
    # 995.2 and 994.9 are 0.3 apart, inside one 0.5 cluster even though 995.0 lies between them.
    bids = [(999.9, 1.0), (995.2, 10.0), (994.9, 10.0), (994.4, 15.0)]
    features = book_features(BTC, 1, bids, [(1000.1, 1.0)], clusters=2)
    assert features.supports == pytest.approx([995.05, 994.4])
    assert features.support_sizes == pytest.approx([20.0, 15.0])


def test_tick_wider_than_the_relative_width_keeps_levels_apart() -> None:
    # Mid 1.5: 1.5 × 0.0005 is far below the 1.0 tick, so every level is its own cluster.
    features = book_features(BTC, 1, [(1.0, 2.0)], [(2.0, 1.0), (3.0, 5.0), (4.0, 4.0)])
    assert features.resistances == [3.0, 4.0, 2.0]
    assert features.resistance_sizes == [5.0, 4.0, 1.0]
    assert features.supports == [1.0]


def test_crossed_book_supports_only_from_below_the_mid() -> None:
    features = book_features(BTC, 1, [(101.0, 5.0), (99.0, 1.0)], [(100.0, 2.0), (102.0, 3.0)])
    assert features.mid == 100.5
    assert features.supports == [99.0]
    assert features.support_sizes == [1.0]
    assert features.resistances == [102.0]
    assert features.resistance_sizes == [3.0]
    assert features.depth_imbalance == pytest.approx(1 / 11)


def test_one_sided_book_uses_the_whole_side() -> None:
    features = book_features(BTC, 1, [(100.0, 1.0), (90.0, 5.0)], [])
    assert features.mid is None
    # Width is the 10.0 tick, so the two bids 10 apart stay separate.
    assert features.supports == [90.0, 100.0]
    assert features.support_sizes == [5.0, 1.0]
    assert features.resistances == []
    assert features.depth_imbalance == 1.0


# Many snapshots at once


def test_book_frame_matches_the_definitions() -> None:
    books = [
        Book(pair="BTC-USD", time=10, bids=DEEP_BIDS, asks=DEEP_ASKS),
        Book(pair="ETH-USD", time=11),
        Book(
            pair="BTC-USD",
            time=12,
            bids=[(98.0, 3.0), (0.0, 5.0), (100.0, 1.0), (99.0, 2.0), (math.nan, 9.0)],
            asks=[(103.0, 1.0), (101.0, -4.0), (102.0, 2.0), (101.0, 2.0), (101.0, 1.0)],
        ),
        Book(pair="SOL-USD", time=13, bids=[(5.0, 2.0)]),
    ]
    out = book_frame(books, levels=3)
    assert out.columns == ["symbol", "time", "depth_imbalance", "bid_depth", "ask_depth"]
    assert column(out, "symbol") == [BTC, ETH, BTC, SOL]
    assert column(out, "time") == [10, 11, 12, 13]
    assert column(out, "bid_depth") == [6.0, 0.0, 6.0, 2.0]
    # Third book: 101 merges to 3, then 102 and 103.
    assert column(out, "ask_depth") == [5.0, 0.0, 6.0, 0.0]
    assert column(out, "depth_imbalance") == pytest.approx([1 / 11, None, 0.0, 1.0])


def test_book_frame_of_nothing() -> None:
    out = book_frame([])
    assert out.height == 0
    assert out.columns == ["symbol", "time", "depth_imbalance", "bid_depth", "ask_depth"]


# Trade flow


def test_flow_imbalance_expression() -> None:
    bars = pl.DataFrame(
        {"buy_volume": [3.0, 0.0, 0.0, 1.0], "sell_volume": [1.0, 0.0, 2.0, None]},
        schema={"buy_volume": pl.Float64, "sell_volume": pl.Float64},
    )
    out = bars.select(flow_imbalance_expr())
    assert out.columns == ["flow_imbalance"]
    assert column(out, "flow_imbalance") == [0.5, None, -1.0, None]


def test_trade_flow_over_the_recent_window() -> None:
    trades = pl.DataFrame(
        [
            (BTC, 2000, 1.0, 1),
            (ETH, 100, 4.0, 1),
            (BTC, 1000, 5.0, 2),
            (BTC, 1500, 7.0, 1),
            (SOL, 50, 3.0, 0),
            (BTC, 1600, 2.0, 2),
            (BTC, 2500, 1.0, 2),
            (BTC, 2200, 10.0, 0),
        ],
        schema={"symbol": pl.String, "time": pl.Int64, "size": pl.Float64, "side": pl.Int64},
        orient="row",
    )
    out = trade_flow(trades, window_ms=1000)
    assert out.columns == ["symbol", "time", "buy_volume", "sell_volume", "flow_imbalance"]
    assert column(out, "symbol") == [BTC, ETH, SOL]
    assert column(out, "time") == [2500, 100, 50]
    # BTC window is (1500, 2500]: buys 2 + 1, sell 1; the trades at 1000 and 1500 are out.
    assert column(out, "buy_volume") == [3.0, 0.0, 0.0]
    assert column(out, "sell_volume") == [1.0, 4.0, 0.0]
    assert column(out, "flow_imbalance") == [0.5, -1.0, None]


def test_trade_flow_window_must_be_positive() -> None:
    empty = pl.DataFrame(
        schema={"symbol": pl.String, "time": pl.Int64, "size": pl.Float64, "side": pl.Int64}
    )
    assert trade_flow(empty, window_ms=1).height == 0
    with pytest.raises(ValueError):
        trade_flow(empty, window_ms=0)
