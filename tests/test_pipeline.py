"""The pipeline end to end: a replayed recording gives the bars computed directly from its trades,
whatever the replay speed or batch size; the feed's aggregates can be the bar source."""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path

import msgspec
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import API_KEY
from polystream.features import BookFeatures
from polystream.indicators import IndicatorParams, compute
from polystream.pipeline import Pipeline
from polystream.record import Recorder, ReplaySource
from polystream.schema import Alert, Notice
from polystream.simulator import DemoFeed
from polystream.sinks import BaseSink, FeedState, Output
from polystream.source import FeedClient, FeedOptions, Frame
from polystream.stages import Stages
from polystream.window import BarOptions

T0 = 1_700_000_100_000
SYMBOLS = {"BTC-USD": "X:BTCUSD", "ETH-USD": "X:ETHUSD"}
TIMEFRAMES = (1_000, 60_000)
LATENESS = 2_000


class Capture(BaseSink):
    """A sink that keeps everything the pipeline hands it."""

    name = "capture"

    def __init__(self) -> None:
        self.notices: list[Notice] = []
        self.frames: list[pl.DataFrame] = []
        self.books: list[BookFeatures] = []
        self.alerts_seen: list[Alert] = []

    def write(self, out: Output) -> None:
        self.notices += out.notices
        if out.bars is not None and out.bars.height:
            self.frames.append(out.bars)
        self.books += out.book_features
        self.alerts_seen += out.alerts

    @property
    def records(self) -> pl.DataFrame:
        return pl.concat(self.frames)


def make_trades(seed: int = 1, n: int = 6_000) -> list[dict[str, object]]:
    """Trades for two pairs over about 4 minutes of event time, with quiet stretches (so there
    are zero-volume bars) and receipt jitter that stays within the allowed lateness."""
    rng = random.Random(seed)
    clock = T0
    prices = {"BTC-USD": 4000.0, "ETH-USD": 150.0}
    out: list[dict[str, object]] = []
    for ident, k in enumerate(range(n), 1):
        clock += rng.choice([0, 5, 20, 40, 60])
        if k in (1_500, 4_000):
            clock += 7_500  # seconds without any trade
        pair = rng.choice(list(SYMBOLS))
        prices[pair] *= 1 + rng.gauss(0, 2e-4)
        out.append(
            {
                "ev": "XT",
                "pair": pair,
                "p": round(prices[pair], 2),
                "t": clock - rng.choice([0, 0, 0, 150, 900]),
                "s": round(rng.uniform(0.001, 2.0), 8),
                "c": [rng.choice([1, 2])],
                "i": str(ident),
                "x": 1,
            }
        )
    return out


def write_recording(path: Path, trades: list[dict[str, object]], seed: int = 2) -> None:
    rng = random.Random(seed)
    rec = Recorder(path)
    rec.write(Frame(T0, b'[{"ev":"status","status":"connected","message":"hi"}]'))
    i = 0
    while i < len(trades):
        size = rng.randint(1, 12)
        chunk = trades[i : i + size]
        i += size
        # "_t": when a trade with a wrong timestamp really happened, and so was received
        received = max(int(t.get("_t", t["t"])) for t in chunk) + rng.randint(1, 30)  # type: ignore[call-overload]
        chunk = [{k: v for k, v in t.items() if k != "_t"} for t in chunk]
        quote = {
            "ev": "XQ",
            "pair": chunk[0]["pair"],
            "bp": 1.0,
            "bs": 1.0,
            "ap": 1.1,
            "as": 2.0,
            "t": received - 1,
        }
        rec.write(Frame(received, msgspec.json.encode([*chunk, quote])))
    rec.close()


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]]]:
    trades = make_trades()
    path = tmp_path_factory.mktemp("rec") / "session.rec.zst"
    write_recording(path, trades)
    return path, trades


def replay(path: Path, *, speed: float | None = None, batch: int = 50_000) -> Capture:
    """Replay with passes of about `batch` events, and at most that many trades waiting for the
    bar engine."""
    return replay_with_view(path, speed=speed, batch=batch)[0]


def replay_with_view(
    path: Path, *, speed: float | None = None, batch: int = 50_000
) -> tuple[Capture, FeedState]:
    """`replay`, and the run's counters at its end."""
    out = Capture()
    pipeline = Pipeline(
        ReplaySource(path, speed=speed),
        Stages(
            list(SYMBOLS.values()),
            BarOptions(timeframes=TIMEFRAMES, lateness=LATENESS),
            max_pending=batch,
        ),
        [out],
        live=False,
        max_bytes=batch * 100,
    )
    assert not pipeline.run().interrupted
    return out, pipeline.view().feed


def units(x: pl.Expr) -> pl.Expr:
    """Volumes are exact sums of 1e-12 units (see polystream.window)."""
    return (x * 1e12).round().cast(pl.Int128)


def direct_bars(trades: list[dict[str, object]]) -> pl.DataFrame:
    """Bars straight from the trades: no watermark, no batches, no streaming state."""
    frame = pl.DataFrame(
        {
            "symbol": [SYMBOLS[str(t["pair"])] for t in trades],
            "time": [t["t"] for t in trades],
            "price": [t["p"] for t in trades],
            "size": [t["s"] for t in trades],
            "side": [t["c"][0] for t in trades],  # type: ignore[index]
        }
    ).with_row_index("seq")
    out = []
    for tf in TIMEFRAMES:
        name = "1s" if tf == 1_000 else "1m"
        for symbol in SYMBOLS.values():
            rows = frame.filter(pl.col("symbol") == symbol).with_columns(
                (pl.col("time") // tf * tf).alias("start")
            )
            bars = rows.group_by("start", maintain_order=True).agg(
                pl.col("price").sort_by(["time", "seq"]).first().alias("open"),
                pl.col("price").max().alias("high"),
                pl.col("price").min().alias("low"),
                pl.col("price").sort_by(["time", "seq"]).last().alias("close"),
                units(pl.col("size")).sum().alias("volume"),
                units(pl.col("price") * pl.col("size")).sum().alias("pv"),
                pl.len().cast(pl.Int64).alias("trades"),
                units(pl.when(pl.col("side") == 2).then(pl.col("size")).otherwise(0.0))
                .sum()
                .alias("buy_volume"),
                units(pl.when(pl.col("side") == 1).then(pl.col("size")).otherwise(0.0))
                .sum()
                .alias("sell_volume"),
            )
            grid = pl.DataFrame(
                {
                    "start": pl.int_range(
                        bars["start"].min(), bars["start"].max() + tf, tf, eager=True
                    )
                }
            )
            full = (
                grid.join(bars, on="start", how="left")
                .sort("start")
                .with_columns(pl.col("close").forward_fill().alias("_carry"))
                .with_columns(
                    *(
                        pl.col(c).fill_null(pl.col("_carry"))
                        for c in ("open", "high", "low", "close")
                    ),
                    *(
                        pl.col(c).fill_null(0)
                        for c in ("volume", "pv", "buy_volume", "sell_volume")
                    ),
                    pl.col("trades").fill_null(0),
                )
            )
            # the exact integers' quotients, each rounded once (Python's int division)
            pv, volume = full["pv"].to_list(), full["volume"].to_list()
            vwap = [p / v if v else None for p, v in zip(pv, volume, strict=True)]
            full = compute(full, IndicatorParams()).with_columns(
                pl.lit(symbol).alias("symbol"),
                pl.lit(name).alias("timeframe"),
                pl.Series("vwap", vwap, pl.Float64),
                *(
                    pl.Series(c, [q / 10**12 for q in full[c].to_list()], pl.Float64)
                    for c in ("volume", "buy_volume", "sell_volume")
                ),
            )
            out.append(full)
    return pl.concat(out, how="diagonal")


def latest(records: pl.DataFrame) -> pl.DataFrame:
    return (
        records.with_row_index("_n")
        .unique(["symbol", "timeframe", "start"], keep="last")
        .drop("_n")
        .sort("symbol", "timeframe", "start")
    )


COMPARED = [
    "symbol",
    "timeframe",
    "start",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "vwap",
    "trades",
    "buy_volume",
    "sell_volume",
    *IndicatorParams().columns,
]


def test_replayed_bars_equal_bars_computed_from_the_trades(recording: tuple[Path, list]) -> None:
    path, trades = recording
    got = replay(path)
    records = got.records
    assert set(records["state"]) == {"final"}  # end of file: everything final, nothing revised
    mine = latest(records).select(COMPARED)
    expected = direct_bars(trades).sort("symbol", "timeframe", "start").select(COMPARED)
    assert mine.height == expected.height
    assert mine.filter(pl.col("trades") == 0).height >= 14  # the quiet stretches
    assert mine.equals(expected)
    assert mine.filter(pl.col("timeframe") == "1s")["rsi_14"].null_count() == 2 * 14


def test_replay_speed_and_batch_size_do_not_matter(recording: tuple[Path, list]) -> None:
    path, _ = recording
    fast = replay(path).records.sort("symbol", "timeframe", "start", "state")
    paced = replay(path, speed=40.0, batch=97).records.sort("symbol", "timeframe", "start", "state")
    assert paced.equals(fast)


@settings(max_examples=5, deadline=None)
@given(batch=st.integers(min_value=1, max_value=5_000))
def test_any_batch_size_gives_the_same_bars(recording: tuple[Path, list], batch: int) -> None:
    path, _ = recording
    base = replay(path).records.sort("symbol", "timeframe", "start", "state")
    assert (
        replay(path, batch=batch).records.sort("symbol", "timeframe", "start", "state").equals(base)
    )


@pytest.mark.parametrize(
    ("where", "ahead_ms"),
    [(3_000, 30_000), (3_000, 70_000), (3_000, 3_600_000), (0, 3_600_000), (5_999, 3_600_000)],
)
def test_one_trade_stamped_in_the_future_costs_only_itself(
    tmp_path: Path, where: int, ahead_ms: int
) -> None:
    # Before: one trade an hour ahead moved the watermark for good (every later trade too
    # late, future bars finalised); thirty seconds ahead caused thousands of revisions.
    trades = make_trades()
    clean, clean_feed = replay_with_view(write_to(tmp_path / "clean.rec", trades))
    bad = dict(trades[where], i="outlier", _t=trades[where]["t"])
    bad["t"] = int(bad["t"]) + ahead_ms  # type: ignore[call-overload]
    path = write_to(tmp_path / "bad.rec", [*trades[:where], bad, *trades[where:]])
    for batch in (50_000, 37):
        got, feed = replay_with_view(path, batch=batch)
        assert feed.ahead == 1 and feed.too_late == 0 and feed.revised == 0
        assert got.records.sort(KEYS).equals(clean.records.sort(KEYS))
        assert feed.bars == clean_feed.bars
        notices = [n for n in got.notices if n.event == "ahead"]
        assert len(notices) == 1 and notices[0].detail.startswith("1 trade stamped more than 5 s")


def test_a_steady_clock_offset_is_taken_up_not_rejected(tmp_path: Path) -> None:
    # every trade 20 s ahead of the receipt clock (a local clock 20 s slow) is not "ahead"
    trades = make_trades(n=3_000)
    skewed = [dict(t, t=int(t["t"]) + 20_000, _t=t["t"]) for t in trades]  # type: ignore[call-overload]
    got, feed = replay_with_view(write_to(tmp_path / "skewed.rec", skewed))
    plain, _ = replay_with_view(write_to(tmp_path / "plain.rec", trades))
    assert feed.ahead == 0 and feed.too_late == 0 and feed.revised == 0
    seconds = pl.col("timeframe") == "1s"
    assert (
        got.records.filter(seconds)
        .select(pl.col("start") - 20_000, "close")
        .equals(plain.records.filter(seconds).select("start", "close"))
    )


KEYS = ["symbol", "timeframe", "start", "state"]


def write_to(path: Path, trades: list[dict[str, object]]) -> Path:
    write_recording(path, trades)
    return path


def test_feed_aggregates_as_bar_source_and_their_drift() -> None:
    out = Capture()
    with DemoFeed(api_key=API_KEY, seed=3, bar_seconds=0.2) as feed:
        client = FeedClient(
            feed.url, API_KEY, ["BTC-USD"], ("XT", "XAS"), options=FeedOptions(poll_interval=0.05)
        )
        pipeline = Pipeline(
            client,
            Stages(
                ["X:BTCUSD"],
                BarOptions(timeframes=(1_000,), lateness=1_500),
                bar_source="polygon",
            ),
            [out],
        )
        pipeline.run(duration=8.0)  # a final bar needs its second and 1.5 s more
    final = out.records.filter(pl.col("state") == "final")
    assert final.height >= 2
    assert final["buy_volume"].sum() == 0  # the feed's aggregates do not split sides
    drift = [n for n in out.notices if n.event == "drift"]
    assert len(drift) == 1 and "bars compared" in drift[0].detail
    drift = pipeline.stages.drift
    assert drift is not None and drift.matched >= 2
    # the demo feed computes its aggregates from its own trades: no drift at all
    assert drift.close_max < 1e-12


def test_ctrl_c_is_a_request_to_stop_not_an_exception() -> None:
    """SIGINT may arrive while polars runs; it must end the run in order, never mid-call."""
    out = Capture()
    # what it was: Python's own handler, or SIG_IGN in a shell's background job
    before = signal.getsignal(signal.SIGINT)
    with DemoFeed(api_key=API_KEY, seed=4, bar_seconds=0.05) as feed:
        client = FeedClient(
            feed.url, API_KEY, ["BTC-USD"], ("XT", "XQ"), options=FeedOptions(poll_interval=0.05)
        )
        pipeline = Pipeline(
            client, Stages(["X:BTCUSD"], BarOptions(timeframes=(1_000,), lateness=200)), [out]
        )
        threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        result = pipeline.run(duration=20)
    assert result.interrupted
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    assert out.records.filter(pl.col("state") == "partial").height >= 1
