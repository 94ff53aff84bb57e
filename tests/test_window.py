"""Event-time bars: OHLCV from trades, watermark and lateness, zero-volume bars, revisions,
the feed's own aggregates, and independence from how the stream is cut into batches."""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polystream.indicators import IndicatorParams
from polystream.schema import AGGREGATE, TRADE
from polystream.window import BarEngine, BarOptions

T0 = 1_700_000_100_000  # a five-minute boundary
SEC, MIN = 1_000, 60_000


def trades(rows: list[tuple[str, int, float, float, int, int]]) -> pl.DataFrame:
    """(symbol, event time, price, size, side, receipt time) rows as a batch of trades."""
    given = ("symbol", "time", "price", "size", "side", "received")
    frame = pl.DataFrame(rows, schema=[(k, TRADE[k]) for k in given], orient="row")
    return frame.with_columns(
        pl.lit(1, pl.Int16).alias("exchange"),
        pl.int_range(pl.len()).cast(pl.String).alias("trade_id"),
    ).select(list(TRADE))


def t(
    offset_ms: int,
    price: float,
    size: float = 1.0,
    side: int = 2,
    delay: int = 5,
    symbol: str = "X:BTCUSD",
) -> tuple[str, int, float, float, int, int]:
    return (symbol, T0 + offset_ms, price, size, side, T0 + offset_ms + delay)


def engine(*timeframes: int, lateness: int = 2 * SEC, horizon: int = 60 * SEC) -> BarEngine:
    return BarEngine(
        BarOptions(timeframes=timeframes or (MIN,), lateness=lateness, horizon=horizon)
    )


def test_ohlcv_vwap_and_sides_from_trades() -> None:
    e = engine(MIN)
    out = e.add_trades(
        trades(
            [
                t(1_000, 100.0, 1.0, side=2),
                t(30_000, 110.0, 2.0, side=1),
                t(20_000, 90.0, 1.0, side=0),  # arrives late inside its own bar: still on time
                t(59_999, 105.0, 4.0, side=2),
            ]
        )
    )
    assert out.height == 0  # nothing is final yet
    # the watermark passes end + lateness; the bar is final once that frame is complete,
    # that is when the next one arrives
    out = e.add_trades(trades([t(MIN + 2 * SEC, 106.0), t(MIN + 2 * SEC + 1, 106.5)]))
    bar = out.row(0, named=True)
    assert (bar["open"], bar["high"], bar["low"], bar["close"]) == (100.0, 110.0, 90.0, 105.0)
    assert bar["volume"] == 8.0 and bar["trades"] == 4
    assert bar["vwap"] == pytest.approx((100 + 220 + 90 + 420) / 8)
    assert (bar["buy_volume"], bar["sell_volume"]) == (5.0, 2.0)
    assert (bar["start"], bar["end"], bar["state"], bar["timeframe"]) == (
        T0,
        T0 + MIN,
        "final",
        "1m",
    )


def test_open_and_close_follow_event_time_not_arrival() -> None:
    e = engine(MIN)
    e.add_trades(trades([t(50_000, 5.0), t(10_000, 1.0)]))
    e.add_trades(trades([t(5_000, 9.0), t(55_000, 7.0)]))
    bar = e.finish().row(0, named=True)
    assert (bar["open"], bar["close"]) == (9.0, 7.0)


def test_quiet_interval_gives_zero_volume_bars() -> None:
    e = engine(MIN)
    out = pl.concat(
        [e.add_trades(trades([t(1_000, 100.0), t(3 * MIN + 1_000, 120.0)])), e.finish()]
    )
    assert out["start"].to_list() == [T0 + k * MIN for k in range(4)]
    gap = out.filter(pl.col("trades") == 0)
    assert gap.height == 2
    assert gap["vwap"].null_count() == 2 and gap["volume"].to_list() == [0.0, 0.0]
    assert set(gap["open"]) == set(gap["close"]) == set(gap["high"]) == {100.0}
    assert e.stats.zero_volume == 2


def test_wall_clock_closes_quiet_bars_live_only() -> None:
    e = engine(SEC, lateness=500)
    e.add_trades(trades([t(100, 10.0)]))
    assert e.offset is None  # one trade does not tell the feed's clock
    e.add_trades(trades([t(150, 10.0)]))
    assert e.add_trades(trades([])).height == 0
    # ten quiet seconds later the wall clock has closed the bar and nine empty ones
    out = e.advance(T0 + 10_600)
    assert out["start"].to_list() == [T0 + k * SEC for k in range(10)]
    assert out["trades"].to_list() == [2] + [0] * 9


def test_skewed_local_clock_drops_nothing() -> None:
    # the local clock runs 5 s behind the feed: receipt times are earlier than event times
    e = engine(SEC, lateness=500)
    rows = [t(k * 200, 100.0 + k, delay=-5_000) for k in range(30)]
    out = pl.concat([e.add_trades(trades([r])) for r in rows] + [e.finish()])
    assert e.stats.too_late == 0 and e.stats.revised == 0
    assert out["trades"].sum() == 30
    # and the wall clock, corrected by the observed offset, still closes bars
    e2 = engine(SEC, lateness=500)
    e2.add_trades(trades([t(100, 1.0, delay=-5_000), t(120, 1.0, delay=-5_000)]))
    assert e2.advance(T0 + 100 - 5_000 + 1_600).height == 1


def test_late_trade_within_horizon_revises_the_bar() -> None:
    e = engine(MIN, lateness=2 * SEC, horizon=60 * SEC)
    e.add_trades(trades([t(1_000, 100.0), t(30_000, 101.0)]))
    final = e.add_trades(trades([t(MIN + 5_000, 102.0), t(MIN + 5_001, 102.0)]))
    assert final.row(0, named=True)["close"] == 101.0
    # a trade for the first minute arrives 10 s after that bar was final
    late = t(40_000, 150.0, 3.0, delay=35_000)
    revised = e.add_trades(trades([late]))
    row = revised.row(0, named=True)
    assert (row["state"], row["start"], row["high"], row["close"]) == ("revised", T0, 150.0, 150.0)
    assert row["volume"] == 5.0 and row["trades"] == 3
    assert e.stats.revised == 1 and e.stats.too_late == 0


def test_trade_older_than_the_horizon_is_counted_not_mixed_in() -> None:
    e = engine(MIN, lateness=2 * SEC, horizon=10 * SEC)
    e.add_trades(trades([t(1_000, 100.0)]))
    e.add_trades(trades([t(3 * MIN, 100.0)]))
    out = e.add_trades(trades([t(2_000, 999.0, delay=3 * MIN)]))
    assert out.filter(pl.col("state") == "revised").height == 0
    assert e.stats.too_late == 1
    assert 999.0 not in e.finish()["high"].to_list()


def test_partial_leaves_state_alone() -> None:
    e = engine(MIN)
    e.add_trades(trades([t(1_000, 100.0), t(2_000, 101.0)]))
    partial = e.partial()
    assert partial["state"].to_list() == ["partial"]
    e.add_trades(trades([t(3_000, 102.0)]))
    assert e.finish().row(0, named=True)["close"] == 102.0


def test_several_symbols_and_timeframes() -> None:
    e = engine(SEC, MIN, 5 * MIN)
    rows = [t(k * 700, 100.0 + k % 7, symbol=s) for k in range(600) for s in ("X:A", "X:B")]
    rows.sort(key=lambda r: r[5])
    out = pl.concat([e.add_trades(trades(rows)), e.finish()])
    counts = out.group_by("symbol", "timeframe").len().sort("symbol", "timeframe")
    per = {(s, tf): n for s, tf, n in counts.iter_rows()}
    assert per[("X:A", "1s")] == per[("X:B", "1s")] == 420
    assert per[("X:A", "1m")] == 7 and per[("X:A", "5m")] == 2
    totals = out.group_by("symbol", "timeframe").agg(pl.col("trades").sum())
    assert set(totals["trades"]) == {600}


def test_indicator_columns_come_with_every_bar() -> None:
    e = engine(SEC)
    rows = [t(k * 250, 100.0 + (k % 13) - (k % 5)) for k in range(400)]
    out = pl.concat([e.add_trades(trades(rows)), e.finish()])
    cols = IndicatorParams().columns
    assert out.columns[-len(cols) - 1 :] == [*cols, "flow_imbalance"]
    first_rsi = out["rsi_14"].is_not_null().arg_max()
    assert first_rsi == 14


def test_feed_aggregates_as_bar_source() -> None:
    def agg(ev: str, start: int, length: int, o: float, c: float, v: float) -> tuple:
        return (
            "X:BTCUSD",
            ev,
            start,
            start + length,
            o,
            max(o, c),
            min(o, c),
            c,
            v,
            (o + c) / 2,
            v / 4,
            start + length + 50,
        )

    rows = [agg("XA", T0 + k * MIN, MIN, 100.0 + k, 101.0 + k, 8.0) for k in range(10)]
    rows += [agg("XAS", T0 + k * SEC, SEC, 100.0, 100.5, 2.0) for k in range(5)]
    rows.sort(key=lambda r: r[-1])  # in the order they arrive
    e = engine(SEC, MIN, 5 * MIN)
    frame = pl.DataFrame(rows, schema=list(AGGREGATE.items()), orient="row")
    out = pl.concat([e.add_aggregates(frame), e.finish()])
    minute = out.filter(pl.col("timeframe") == "1m")
    assert minute.height == 10 and minute["trades"].to_list() == [4] * 10
    five = out.filter(pl.col("timeframe") == "5m").sort("start")
    assert five["open"].to_list() == [100.0, 105.0] and five["close"].to_list() == [105.0, 110.0]
    assert five["volume"].to_list() == [40.0, 40.0]
    seconds = out.filter(pl.col("timeframe") == "1s")
    # the feed sends no aggregate for a second without trades: those are zero-volume bars
    assert seconds.filter(pl.col("trades") > 0).height == 5
    assert seconds.filter(pl.col("trades") == 0)["close"].unique().to_list() == [100.5]


def _stream(data: st.DataObject) -> list[tuple[str, int, float, float, int, int]]:
    """A trade stream with jitter: receipt times mostly in order, some trades a little or a lot
    late, two symbols, quiet stretches."""
    n = data.draw(st.integers(min_value=1, max_value=120))
    rows = []
    clock = 0
    for _ in range(n):
        clock += data.draw(st.sampled_from([0, 37, 400, 1_500, 9_000]))
        lateness = data.draw(st.sampled_from([0, 0, 0, 300, 2_500, 40_000, 200_000]))
        price = data.draw(st.floats(min_value=1, max_value=2, allow_nan=False))
        size = data.draw(st.floats(min_value=0.001, max_value=5, allow_nan=False))
        sym = data.draw(st.sampled_from(["X:A", "X:B"]))
        event = clock - lateness
        rows.append((sym, T0 + event, price, size, data.draw(st.integers(0, 2)), T0 + clock + 3))
    return rows


def _latest(out: pl.DataFrame) -> pl.DataFrame:
    """The last version of every bar, whatever states it went through."""
    return (
        out.with_row_index("_order")
        .sort("_order")
        .unique(["symbol", "timeframe", "start"], keep="last")
        .drop("_order", "state")
        .sort("symbol", "timeframe", "start")
    )


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_batch_cuts_do_not_change_bars_or_indicators(data: st.DataObject) -> None:
    rows = _stream(data)
    frame = trades(rows)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(rows)), max_size=8))))
    opts = dict(lateness=1_000, horizon=30_000)

    def run(bounds: list[int]) -> tuple[pl.DataFrame, object]:
        e = engine(SEC, MIN, **opts)
        out, prev = [], 0
        for b in [*bounds, len(rows)]:
            out.append(e.add_trades(frame.slice(prev, b - prev)))
            prev = b
        out.append(e.finish())
        return pl.concat(out), e.stats

    whole, whole_stats = run([])
    pieces, piece_stats = run(cuts)
    assert _latest(pieces).equals(_latest(whole))
    # the first (final) version of each bar does not depend on the cuts either
    firsts = [
        o.filter(pl.col("state") == "final").sort("symbol", "timeframe", "start")
        for o in (whole, pieces)
    ]
    assert firsts[0].equals(firsts[1])
    assert whole_stats.too_late == piece_stats.too_late  # type: ignore[attr-defined]


@pytest.mark.parametrize("ahead_ms", [30_000, 70_000, 3_600_000])
def test_live_a_trade_stamped_in_the_future_finalises_no_future_bar(ahead_ms: int) -> None:
    # Before: the outlier moved the clock offset for good, so the wall clock finalised empty
    # future bars and every later trade was too late.
    e = engine(SEC, lateness=500)
    out = []
    for k in range(600):  # a trade every 100 ms for a minute, the clock advancing with them
        row = t(k * 100, 100.0 + k % 7)
        if k == 300:
            row = (row[0], row[1] + ahead_ms, *row[2:])
        out.append(e.add_trades(trades([row])))
        out.append(e.advance(T0 + k * 100 + 50))
    bars = pl.concat(out)
    assert e.stats.ahead == 1 and e.stats.too_late == 0 and e.stats.revised == 0
    assert bars["start"].max() < T0 + 60 * SEC
    assert e.partial()["trades"].sum() + bars["trades"].sum() == 599


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_shard_with_clock_rows_makes_exactly_its_symbols_bars(data: st.DataObject) -> None:
    """A shard owning X:A gets X:B's trades as clock rows (no symbol): its records, revisions
    and late counts included, are X:A's records of one engine that saw everything, whatever
    the batch cuts."""
    rows = _stream(data)
    rows.append(("X:A", rows[-1][1] + 600_000, 1.5, 1.0, 2, rows[-1][5] + 1))  # one far ahead
    frame = trades(rows)
    # between frames (rows of one frame share their receipt time), as ingest cuts batches
    drawn = data.draw(st.lists(st.integers(1, len(rows) - 1), max_size=8))
    cuts = sorted({c for c in drawn if rows[c - 1][5] != rows[c][5]})
    opts = dict(lateness=1_000, horizon=30_000)

    def run(source: pl.DataFrame, bounds: list[int]) -> tuple[pl.DataFrame, BarEngine]:
        e = engine(SEC, MIN, **opts)
        out, prev = [], 0
        for b in [*bounds, len(rows)]:
            out.append(e.add_trades(source.slice(prev, b - prev)))
            prev = b
        out.append(e.finish())
        return pl.concat(out), e

    whole, one = run(frame, [])
    clock = frame.with_columns(
        pl.when(pl.col("symbol") == "X:A").then(pl.col("symbol")).alias("symbol")
    )
    shard, sharded = run(clock, cuts)
    mine = whole.filter(pl.col("symbol") == "X:A")
    assert shard.sort("symbol", "timeframe", "start", "state", maintain_order=True).equals(
        mine.sort("symbol", "timeframe", "start", "state", maintain_order=True)
    )
    assert sharded.watermark == one.watermark and sharded.offset == one.offset
    assert sharded.stats.ahead <= one.stats.ahead


def test_vwap_and_volumes_do_not_depend_on_the_cuts_to_the_last_bit() -> None:
    """Before: a 1s bar of ten trades at 30,000–30,016 had a VWAP of 30007.1 in one pass and
    30007.100000000002 when the trades came two by two (polars' float division depends on the
    layout of its input); quotients are now taken of the exact integers."""
    rows = [
        (symbol, T0 + k * 100, base + (k * (j + 3)) % 17, 0.5, 2 if k % 3 else 1, T0 + k * 100 + 5)
        for k in range(300)
        for j, (symbol, base) in enumerate((("X:BTCUSD", 30_000.0), ("X:ETHUSD", 2_000.0)))
    ]
    frame = trades(rows)

    def run(step: int) -> pl.DataFrame:
        e = engine(SEC)
        out = [e.add_trades(frame.slice(k, step)) for k in range(0, frame.height, step)]
        return pl.concat([*out, e.finish()]).sort("symbol", "start")

    whole, pairs = run(frame.height), run(2)
    assert whole.equals(pairs)
    assert 30007.1 in whole["vwap"].to_list()


def test_late_trades_of_two_frames_are_two_revisions_however_the_stream_is_cut() -> None:
    """Before: two late trades of one bar, in two frames under the same watermark, were one
    revision in one pass and two when a pass ended between the frames."""
    clock_and_lateness = [(0, 0)] * 4 + [(0, 300)] * 3 + [(0, 2500), (37, 2500), (37, 2500)]
    clock_and_lateness += [(0, 0)] * 3
    rows, clock = [], 0
    for step, late in clock_and_lateness:
        clock += step
        rows.append(("X:A", T0 + clock - late, 1.0, 1.0, 0, T0 + clock + 3))
    frame = trades(rows)

    def run(cuts: list[int]) -> pl.DataFrame:
        e = engine(SEC, MIN, lateness=1_000, horizon=30_000)
        out, prev = [], 0
        for b in [*cuts, len(rows)]:
            out.append(e.add_trades(frame.slice(prev, b - prev)))
            prev = b
        return pl.concat([*out, e.finish()])

    whole, cut = run([]), run([9])
    assert whole.equals(cut)
    assert whole.filter(pl.col("state") == "revised").height == 2
