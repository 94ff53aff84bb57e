"""Event-time bars per symbol and timeframe, with indicators, on the pipeline thread.

Input: columnar trades (or the feed's own aggregates) of one micro-batch. Output: bar records as
a polars DataFrame in the JSON contract's columns, `state` final, revised or partial.

The watermark is the receipt clock corrected by the feed's clock offset: W = received + the median
of (event time − received) over the last `LEAD_WINDOW` events, never moving back. A median is
robust: a few events with a wild timestamp cannot move it, and a real step of the clock is taken
up after half a window. A trade whose time is more than `max_ahead` past that corrected clock is
counted (`ahead`) and builds no bar (for the first two events, more than `horizon` past the
local clock). A bar is final once W passes its end plus the allowed lateness; a trade that
arrives after that, within the revision horizon, revises the bar; older ones are counted.
Whether a trade is late is judged against the watermark of the events before it, so results do
not depend on how the stream was cut into batches. Live, `advance(now)` moves W with the wall
clock so quiet bars close; a replay uses the recorded receipt times only.

A shard of a run spread over processes (`watch --from … --shard K/N`) gets, besides its own
trades, every other trade of the run as a clock row: no symbol, its event and receipt times only.
Clock rows move the offset and the watermark exactly as in one process and build no bar, so the
shard's bars are those one process would make.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import msgspec
import polars as pl

from .config import timeframe_name
from .indicators import IndicatorParams, IndicatorState, update_many
from .schema import PRICES, BarState, bar_columns

_NEVER = -(2**62)
# The clock offset is the median lead of this many events (odd: the median is one of them). Of the
# first LEAD_MIN events it is the smallest lead, and it is unknown after only one: a lone event
# with a wild timestamp then moves nothing.
LEAD_WINDOW = 1001
LEAD_MIN = 5

STATE_SCHEMA: dict[str, pl.DataType | type[pl.DataType]] = {
    "symbol": pl.String,
    "tf": pl.Int64,
    "start": pl.Int64,
    "open": pl.Float64,
    "high": pl.Float64,
    "low": pl.Float64,
    "close": pl.Float64,
    "volume": pl.Int128,
    "pv": pl.Int128,
    "trades": pl.Int64,
    "buy_volume": pl.Int128,
    "sell_volume": pl.Int128,
    "first_t": pl.Int64,
    "last_t": pl.Int64,
}


class BarOptions(msgspec.Struct, frozen=True):
    """Timeframes (ms), allowed lateness and revision horizon (ms), indicator parameters."""

    timeframes: tuple[int, ...] = (60_000,)
    lateness: int = 2_000
    horizon: int = 60_000
    max_ahead: int = 5_000
    max_fill: int = 100_000
    params: IndicatorParams = IndicatorParams()


class BarStats(msgspec.Struct):
    final: int = 0
    revised: int = 0
    zero_volume: int = 0
    too_late: int = 0
    ahead: int = 0  # trades stamped more than `max_ahead` past the feed's corrected clock


# Rows reach the merge in arrival order (stored or open bars first), so a stable sort by event
# time puts "earliest event time, then earliest arrival" first and "latest event time, then
# latest arrival" last.
_MERGE = [
    pl.col("open").sort_by("first_t", maintain_order=True, nulls_last=True).first(),
    pl.col("high").max(),
    pl.col("low").min(),
    pl.col("close").sort_by("last_t", maintain_order=True, nulls_last=False).last(),
    # Exact integer sums: the same whatever the order or the batch cuts.
    pl.col("volume").sum(),
    pl.col("pv").sum(),
    pl.col("trades").sum(),
    pl.col("buy_volume").sum(),
    pl.col("sell_volume").sum(),
    pl.col("first_t").min(),
    pl.col("last_t").max(),
]
_KEYS = ["symbol", "tf", "start"]
# Volumes and notionals are kept as exact integers of 1e-12 units: sums do not depend on the
# order of the additions, so bars can be summed from partial sums and any batch cut gives the
# same bar to the last bit. Twelve decimals are more than any venue quotes sizes with.
UNITS = 1e12
_UNITS = 10**12  # the same, as an integer: a quotient of integers is rounded once


def _units(x: pl.Expr) -> pl.Expr:
    return (x * UNITS).round().cast(pl.Int128)


def _trade_partials(trades: pl.DataFrame) -> pl.DataFrame:
    """One partial bar per trade (symbol, time, received, OHLC, exact volumes)."""
    price, size, side = pl.col("price"), pl.col("size"), pl.col("side")
    return trades.select(
        "symbol",
        "time",
        "received",
        price.alias("open"),
        price.alias("high"),
        price.alias("low"),
        price.alias("close"),
        _units(size).alias("volume"),
        _units(price * size).alias("pv"),
        pl.lit(1, pl.Int64).alias("trades"),
        _units(pl.when(side == 2).then(size).otherwise(0.0)).alias("buy_volume"),
        _units(pl.when(side == 1).then(size).otherwise(0.0)).alias("sell_volume"),
    )


def _merge(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """Combine partial bars with the same key; open and close by event time, then arrival."""
    # Casting to the schema is free when the dtypes already match, and lets a plain vertical
    # concat append chunks instead of copying them.
    both = pl.concat(
        [f.select(pl.col(k).cast(v) for k, v in STATE_SCHEMA.items()) for f in frames],
        how="vertical",
    )
    return both.group_by(_KEYS, maintain_order=True).agg(_MERGE).select(STATE_SCHEMA.keys())


class BarEngine:
    """Builds bars for any number of symbols and timeframes; see the module docstring."""

    def __init__(self, options: BarOptions | None = None) -> None:
        self.options = options or BarOptions()
        self.open = pl.DataFrame(schema=STATE_SCHEMA)
        self.watermark = _NEVER
        self.offset: int | None = None  # the feed's clock offset: the median lead
        self._leads = pl.Series("lead", [], pl.Int64)  # the last LEAD_WINDOW - 1 leads
        self.stats = BarStats()
        # receipt time of the last frame seen, and the watermark before it
        self._frame = (_NEVER, _NEVER)
        self._indicators: dict[tuple[str, int], IndicatorState] = {}
        self._last: dict[tuple[str, int], tuple[int, float]] = {}
        # the last bar seeded by `warm` per key: live bars up to it are history already
        self._floor: dict[tuple[str, int], int] = {}
        self._revision_bars = {
            tf: (self.options.horizon + self.options.lateness) // tf + 2
            for tf in self.options.timeframes
        }

    # -- input -------------------------------------------------------------------------------

    def add_trades(self, trades: pl.DataFrame) -> pl.DataFrame:
        """Trades (symbol, time, price, size, side, received) in arrival order → emitted bars."""
        if trades.height == 0:
            return self._empty()
        return self._ingest(_trade_partials(trades))

    def add_aggregates(self, aggs: pl.DataFrame) -> pl.DataFrame:
        """The feed's XA/XAS aggregates as the bar source (`--bars polygon`) → emitted bars.

        Minute aggregates build timeframes of a minute and more, second aggregates the shorter
        ones; buy and sell volume are unknown (0) and the trade count is volume / average size.
        """
        if aggs.height == 0:
            return self._empty()
        partials = aggs.select(
            "symbol",
            (pl.col("end") - 1).alias("time"),
            "received",
            "open",
            "high",
            "low",
            "close",
            _units(pl.col("volume")).alias("volume"),
            _units(pl.col("vwap").fill_null(pl.col("close")) * pl.col("volume")).alias("pv"),
            pl.when(pl.col("avg_size") > 0)
            .then((pl.col("volume") / pl.col("avg_size")).round(0))
            .otherwise(1)
            .cast(pl.Int64)
            .alias("trades"),
            pl.lit(0, pl.Int128).alias("buy_volume"),
            pl.lit(0, pl.Int128).alias("sell_volume"),
            pl.col("ev"),
        )
        # One pass in arrival order, so that the watermark sees both kinds as they came.
        return self._ingest(partials, lambda tf: pl.col("ev") == ("XA" if tf >= 60_000 else "XAS"))

    def advance(self, now_ms: int) -> pl.DataFrame:
        """Live only: move the watermark with the wall clock so that quiet bars close."""
        if self.offset is None:
            return self._empty()
        self.watermark = max(self.watermark, now_ms + self.offset)
        return self._finalize(eof=False)

    def lead_bound(self) -> int:
        """An upper bound of the clock offset the next events can bring: the median of a window
        is never above its largest lead."""
        top = self._leads.max()
        return _NEVER if top is None else int(top)  # type: ignore[arg-type]

    def due_at(self) -> int:
        """The lowest watermark at which some bar (a zero-volume one included) becomes final:
        until the watermark reaches it, neither new trades nor `advance` can emit anything but
        revisions of late trades."""
        lateness = self.options.lateness
        due = -_NEVER
        if self.open.height:
            due = int((self.open["start"] + self.open["tf"]).min()) + lateness  # type: ignore[arg-type]
        for (_, tf), (start, _) in self._last.items():
            due = min(due, start + 2 * tf + lateness)
        return due

    def finish(self) -> pl.DataFrame:
        """End of a replay: every open bar is final."""
        return self._finalize(eof=True)

    def partial(self) -> pl.DataFrame:
        """End of a live run: the open bars, as `partial`, without changing any state."""
        ghost = copy.copy(self)
        ghost._indicators = {k: copy.copy(v) for k, v in self._indicators.items()}
        ghost._last = dict(self._last)
        ghost.stats = BarStats()
        return ghost._finalize(eof=True, state="partial")

    def warm(self, history: pl.DataFrame) -> pl.DataFrame:
        """Seed the indicators with earlier final bars (records: symbol, timeframe, start,
        open, high, low, close, volume, vwap, trades, buy_volume, sell_volume), oldest first per
        symbol and timeframe, so that they are valid from the first live bar. Returns those
        bars as records with their indicators; nothing is emitted. The interval between the
        history and the first live trade is not filled with zero-volume bars: nothing is known
        about it."""
        names = {timeframe_name(tf): tf for tf in self.options.timeframes}
        rows = history.filter(pl.col("timeframe").is_in(list(names)))
        if rows.height == 0:
            return self._empty()
        vwap = pl.col("vwap").fill_null(pl.col("close"))
        bars = rows.select(
            "symbol",
            pl.col("timeframe").replace_strict(names, return_dtype=pl.Int64).alias("tf"),
            "start",
            "open",
            "high",
            "low",
            "close",
            _units(pl.col("volume").fill_null(0.0)).alias("volume"),
            _units(vwap * pl.col("volume").fill_null(0.0)).alias("pv"),
            pl.col("trades").fill_null(0).cast(pl.Int64),
            _units(pl.col("buy_volume").fill_null(0.0)).alias("buy_volume"),
            _units(pl.col("sell_volume").fill_null(0.0)).alias("sell_volume"),
            pl.col("start").alias("first_t"),
            pl.col("start").alias("last_t"),
        ).sort("symbol", "tf", "start", maintain_order=True)
        work = []
        for key, frame in bars.group_by(["symbol", "tf"], maintain_order=True):
            k = (str(key[0]), int(key[1]))
            if k in self._indicators:
                continue  # already has history of its own: live bars are not rewritten
            frame = frame.unique("start", keep="last", maintain_order=True)
            work.append((self._state(k), frame, False))
            self._floor[k] = int(frame["start"][-1])
        if not work:
            return self._empty()
        return self._records(pl.concat(update_many(work), how="vertical_relaxed"), "final")

    def rebuild(self, symbol: str, tf: int, lo: int, hi: int, trades: pl.DataFrame) -> pl.DataFrame:
        """Gap repair: the bars of `symbol` at timeframe `tf` starting in [lo, hi), made again
        from `trades` (every trade of that window, as the REST API has them), replace the ones
        built while the feed was down. Only bars the indicators still hold can be rebuilt; they
        come back as `revised` records (empty when there was nothing to rebuild)."""
        key = (symbol, tf)
        held = self._held(key, lo, hi)
        if held is None:
            return self._empty()
        start = (pl.col("time") // tf * tf).alias("start")
        rows = (
            _trade_partials(trades.filter(pl.col("symbol") == symbol))
            .with_columns(
                start,
                pl.lit(tf, pl.Int64).alias("tf"),
                pl.col("time").alias("first_t"),
                pl.col("time").alias("last_t"),
            )
            .filter(pl.col("start").is_between(int(held["start"][0]), hi, closed="left"))
        )
        built = _merge([rows]).drop("symbol", "tf")
        return self._replace(key, held, built)

    def rebuild_from_aggregates(
        self, symbol: str, tf: int, lo: int, hi: int, aggs: pl.DataFrame
    ) -> pl.DataFrame:
        """Gap repair without trades (the plan does not include them): like `rebuild`, from the
        REST API's aggregates of this timeframe (time, open, high, low, close, volume, vwap,
        trades); buy and sell volume are unknown (0)."""
        key = (symbol, tf)
        held = self._held(key, lo, hi)
        if held is None:
            return self._empty()
        vwap = pl.col("vwap").fill_null(pl.col("close"))
        built = aggs.select(
            pl.col("time").alias("start"),
            "open",
            "high",
            "low",
            "close",
            _units(pl.col("volume")).alias("volume"),
            _units(vwap * pl.col("volume")).alias("pv"),
            pl.col("trades").cast(pl.Int64),
            pl.lit(0, pl.Int128).alias("buy_volume"),
            pl.lit(0, pl.Int128).alias("sell_volume"),
            pl.col("time").alias("first_t"),
            (pl.col("time") + tf - 1).alias("last_t"),
        )
        return self._replace(key, held, built)

    def _held(self, key: tuple[str, int], lo: int, hi: int) -> pl.DataFrame | None:
        """The bars of `key` starting in [lo, hi) that the indicators still hold, or None."""
        st = self._indicators.get(key)
        if st is None or st.history is None:
            return None
        held = st.history.filter(pl.col("start").is_between(lo, hi, closed="left"))
        return held if held.height else None

    def _replace(
        self, key: tuple[str, int], held: pl.DataFrame, built: pl.DataFrame
    ) -> pl.DataFrame:
        """Put `built` bars in place of the `held` ones (empty buckets become zero-volume bars
        at the previous close) and emit them as `revised`."""
        symbol, tf = key
        st = self._indicators[key]
        assert st.history is not None
        lo = int(held["start"][0])
        grid = held.select("start").join(built, on="start", how="left")
        before = st.history.filter(pl.col("start") < lo)
        carry = float(before["close"][-1]) if before.height else None
        empty = pl.col("trades").is_null()
        closes = pl.col("close").forward_fill()
        if carry is not None:
            closes = closes.fill_null(carry)
        bars = (
            grid.with_columns(
                pl.lit(symbol).alias("symbol"), pl.lit(tf, pl.Int64).alias("tf"), closes.alias("_c")
            )
            .with_columns(
                *(pl.when(empty).then(pl.col("_c")).otherwise(pl.col(c)).alias(c) for c in PRICES),
                *(pl.col(c).fill_null(0) for c in ("volume", "pv", "buy_volume", "sell_volume")),
                pl.col("trades").fill_null(0),
            )
            .filter(pl.col("close").is_not_null())
            .select(STATE_SCHEMA.keys())
        )
        if bars.height == 0:
            return self._empty()
        computed = st.revise(bars.select(pl.col(k).cast(v) for k, v in STATE_SCHEMA.items()))
        last = self._last.get(key)
        if last is not None and last[0] == int(computed["start"][-1]):
            self._last[key] = (last[0], float(computed["close"][-1]))
        self.stats.revised += computed.height
        return self._records(computed, "revised")

    # -- core --------------------------------------------------------------------------------

    def _ingest(
        self, partials: pl.DataFrame, source: Callable[[int], pl.Expr] | None = None
    ) -> pl.DataFrame:
        """Merge partial bars (one per trade or aggregate) in arrival order; `source` picks,
        per timeframe, which rows build it."""
        o = self.options
        received = partials["received"]
        known = self._leads.len()
        leads = pl.concat([self._leads, partials["time"] - received])
        self._leads = leads.tail(LEAD_WINDOW - 1)
        offset = leads.rolling_median(LEAD_WINDOW, min_samples=LEAD_MIN)
        if known < LEAD_MIN:  # the first events: the smallest lead, which holds bars open longest
            offset = offset.fill_null(leads.rolling_min(LEAD_WINDOW, min_samples=2))
        offset = offset.floor().cast(pl.Int64)
        after, before_it = offset[known:], offset.shift(1)[known:]
        # Until the offset is known, the local clock stands in for it, with room for a skew.
        limit = (before_it + o.max_ahead).fill_null(max(o.max_ahead, o.horizon))
        ahead = leads[known:] > limit
        if after.null_count() < after.len():
            self.offset = int(after[-1])
        wm = (received + after).fill_null(_NEVER).cum_max().clip(lower_bound=self.watermark)
        # The events of one frame arrive together: each is judged against the watermark as it
        # stood before its frame (rows of one frame share their receipt time).
        same_frame = received[0] == self._frame[0]  # a frame may straddle two calls
        first_before = self._frame[1] if same_frame else self.watermark
        new_frame = (received != received.shift(1)).fill_null(not same_frame)
        before = (
            pl.select(
                pl.when(pl.lit(new_frame))
                .then(pl.lit(wm.shift(1, fill_value=self.watermark)))
                .otherwise(None)
                .forward_fill()
            )
            .to_series()
            .fill_null(first_before)
            .rename("w_before")
        )
        self._frame = (int(received[-1]), int(before[-1]))
        self.watermark = int(wm[-1])
        rows = partials.with_columns(
            before,
            pl.col("time").alias("first_t"),
            pl.col("time").alias("last_t"),
        )
        if ahead.any():
            rows = rows.filter(~ahead)
        if rows["symbol"].null_count():
            # A shard's clock rows: the trades of other shards, without a symbol. They move
            # the clock offset and the watermark exactly as in one process, and build no bar.
            ahead = ahead & partials["symbol"].is_not_null()
            rows = rows.filter(pl.col("symbol").is_not_null())
        self.stats.ahead += int(ahead.sum())
        merged: list[pl.DataFrame] = [self.open]
        if source is None:
            # Trades on time for the shortest timeframe are on time for every longer one: sum
            # them up once per shortest bucket, then roll those partial bars up. Only the few
            # others go through each timeframe one by one.
            tf0 = min(o.timeframes)
            start0 = pl.col("time") // tf0 * tf0
            fast = (start0 + tf0 + o.lateness) > pl.col("w_before")
            base = _merge(
                [
                    rows.filter(fast).with_columns(
                        pl.lit(tf0, pl.Int64).alias("tf"), start0.alias("start")
                    )
                ]
            )
            merged += [
                base.with_columns(
                    pl.lit(tf, pl.Int64).alias("tf"), (pl.col("start") // tf * tf).alias("start")
                )
                for tf in o.timeframes
            ]
            rows = rows.filter(~fast)
        stacked = pl.concat(
            [
                (rows if source is None else rows.filter(source(tf))).with_columns(
                    pl.lit(tf, pl.Int64).alias("tf"),
                    (pl.col("time") // tf * tf).alias("start"),
                )
                for tf in o.timeframes
            ],
            how="diagonal_relaxed",
        ).with_columns(
            ((pl.col("start") + pl.col("tf") + o.lateness) <= pl.col("w_before")).alias("late")
        )
        merged.append(stacked.filter(~pl.col("late")))
        if sum(f.height for f in merged[1:]):
            self.open = _merge(merged)
        emitted = []
        watermark = self.watermark
        late = stacked.filter(pl.col("late"))
        if late.height:
            # Replay history in order: bars due when a late trade arrived are final before it
            # revises one of them; bars that became due after it are built with it applied.
            # One revision per frame: frames, unlike passes, are the same however the stream
            # is cut (late trades of two frames under one watermark are two revisions).
            for _, group in late.group_by("received", maintain_order=True):
                self.watermark = int(group["w_before"][0])
                emitted.append(self._finalize(eof=False))
                emitted.append(self._revise(group))
            self.watermark = watermark
        # The last frame may go on in the next call, so only what was due before it is final.
        self.watermark = self._frame[1]
        emitted.append(self._finalize(eof=False))
        self.watermark = watermark
        return pl.concat(emitted, how="vertical_relaxed")

    def _finalize(self, eof: bool, state: BarState = "final") -> pl.DataFrame:
        o = self.options
        if eof:
            due = self.open
            self.open = self.open.head(0)
        else:
            is_due = (pl.col("start") + pl.col("tf") + o.lateness) <= self.watermark
            due = self.open.filter(is_due)
            if due.height:
                self.open = self.open.filter(~is_due)
        groups: dict[tuple[str, int], pl.DataFrame] = {}
        if due.height:
            for key, frame in due.sort(_KEYS).group_by(["symbol", "tf"], maintain_order=True):
                groups[(str(key[0]), int(key[1]))] = frame
        keys = list(groups)
        if not eof:
            keys += [k for k in self._last if k not in groups]
        work = []
        for key in keys:
            bars = self._fill(key, groups.get(key), eof)
            if bars is not None and bars.height:
                work.append((self._state(key), bars, False))
        if not work:
            return self._empty()
        computed = pl.concat(update_many(work), how="vertical_relaxed")
        if state == "final":
            self.stats.final += computed.height
        return self._records(computed, state)

    def _fill(
        self, key: tuple[str, int], real: pl.DataFrame | None, eof: bool
    ) -> pl.DataFrame | None:
        """Real bars of one group plus zero-volume bars for every empty bucket up to the due one."""
        tf = key[1]
        floor = self._floor.get(key)
        if real is not None and floor is not None:
            kept = real.filter(pl.col("start") > floor)
            self.stats.too_late += int(real["trades"].sum()) - int(kept["trades"].sum())
            real = kept if kept.height else None
        last = self._last.get(key)
        if real is None and last is None:
            return None
        if eof:
            assert real is not None
            upto = int(real["start"][-1])
        else:
            upto = (self.watermark - self.options.lateness - tf) // tf * tf
            if real is not None:
                upto = max(upto, int(real["start"][-1]))
        begin = last[0] + tf if last is not None else int(real["start"][0])  # type: ignore[index]
        if upto < begin:
            return None
        if (upto - begin) // tf > self.options.max_fill:
            begin = upto - self.options.max_fill * tf
        if (
            real is not None
            and real.height == (upto - begin) // tf + 1
            and int(real["start"][0]) == begin
        ):
            # every bucket has trades (the usual case): nothing to fill
            self._last[key] = (upto, float(real["close"][-1]))
            return real.select(STATE_SCHEMA.keys())
        grid = pl.DataFrame(
            {"start": pl.int_range(begin, upto + tf, tf, dtype=pl.Int64, eager=True)}
        )
        frame = (
            grid.join(real.drop("symbol", "tf"), on="start", how="left")
            if real is not None
            else grid.with_columns(
                pl.lit(None, dtype=v).alias(k)
                for k, v in STATE_SCHEMA.items()
                if k not in ("symbol", "tf", "start")
            )
        )
        prev_close = last[1] if last is not None else None
        empty = pl.col("trades").is_null()
        carried = pl.col("close").forward_fill()
        if prev_close is not None:
            carried = carried.fill_null(prev_close)
        frame = (
            frame.with_columns(
                pl.lit(key[0]).alias("symbol"),
                pl.lit(tf, pl.Int64).alias("tf"),
                carried.alias("_carry"),
            )
            .with_columns(
                *(
                    pl.when(empty).then(pl.col("_carry")).otherwise(pl.col(c)).alias(c)
                    for c in PRICES
                ),
                *(pl.col(c).fill_null(0) for c in ("volume", "pv", "buy_volume", "sell_volume")),
                pl.col("trades").fill_null(0),
            )
            .drop("_carry")
            .filter(pl.col("close").is_not_null())
        )
        self.stats.zero_volume += int(frame["trades"].eq(0).sum())
        if frame.height:
            self._last[key] = (int(frame["start"][-1]), float(frame["close"][-1]))
        return frame.select(STATE_SCHEMA.keys())

    def _state(self, key: tuple[str, int]) -> IndicatorState:
        st = self._indicators.get(key)
        if st is None:
            st = IndicatorState(self.options.params, self._revision_bars.get(key[1], 0))
            self._indicators[key] = st
        return st

    def _revise(self, late: pl.DataFrame) -> pl.DataFrame:
        o = self.options
        old = (pl.col("w_before") - (pl.col("start") + pl.col("tf"))) > o.horizon + o.lateness
        self.stats.too_late += late.filter(old).select(pl.col("trades").sum()).item() or 0
        late = late.filter(~old)
        out = []
        for key, frame in late.group_by(["symbol", "tf"], maintain_order=True):
            k = (str(key[0]), int(key[1]))
            st = self._indicators.get(k)
            history = st.history if st is not None else None
            if st is None or history is None:
                self.stats.too_late += frame.height
                continue
            stored = history.filter(pl.col("start").is_in(frame["start"].unique().implode()))
            known = frame.filter(pl.col("start").is_in(stored["start"].implode()))
            self.stats.too_late += frame.height - known.height
            if known.height == 0:
                continue
            # A zero-volume bar's prices are the previous close, not trades: they give way.
            stored = stored.with_columns(
                pl.when(pl.col("trades") == 0).then(None).otherwise(pl.col(c)).alias(c)
                for c in PRICES
            )
            merged = _merge(
                [
                    stored.with_columns(
                        pl.lit(k[0]).alias("symbol"), pl.lit(k[1], pl.Int64).alias("tf")
                    ),
                    known,
                ]
            )
            computed = st.revise(merged)
            if self._last.get(k, (None,))[0] == int(computed["start"][-1]):
                self._last[k] = (int(computed["start"][-1]), float(computed["close"][-1]))
            self.stats.revised += computed.height
            out.append(self._records(computed, "revised"))
        return pl.concat(out, how="vertical_relaxed") if out else self._empty()

    # -- output ------------------------------------------------------------------------------

    def _records(self, bars: pl.DataFrame, state: BarState) -> pl.DataFrame:
        """Bar state rows with their indicators as bar records (`schema.BAR` columns, then the
        indicators, then `schema.BAR_FEATURES`)."""
        cols = self.options.params.columns
        volume = bars["volume"].to_list()
        # Quotients of the exact integers, each correctly rounded: polars' float division
        # can differ in the last bit with the layout of its input, and bars must not depend
        # on how the stream was cut. A bar is a few divisions; Python's are exact-rounded.
        amounts = {
            c: pl.Series(c, [q / _UNITS for q in bars[c].to_list()], pl.Float64)
            for c in ("buy_volume", "sell_volume")
        }
        amounts["volume"] = pl.Series("volume", [q / _UNITS for q in volume], pl.Float64)
        pv = bars["pv"].to_list()
        vwaps = [p / q if q > 0 else None for p, q in zip(pv, volume, strict=True)]
        amounts["vwap"] = pl.Series("vwap", vwaps, pl.Float64)
        flows = zip(bars["buy_volume"].to_list(), bars["sell_volume"].to_list(), strict=True)
        imbalance = [(b - s) / (b + s) if b + s else None for b, s in flows]
        amounts["flow_imbalance"] = pl.Series("flow_imbalance", imbalance, pl.Float64)
        bars = bars.with_columns(*amounts.values())
        names = {tf: timeframe_name(tf) for tf in self.options.timeframes}
        made = {
            "timeframe": pl.col("tf").replace_strict(names, return_dtype=pl.String),
            "end": pl.col("start") + pl.col("tf"),
            "state": pl.lit(state),
        }
        return bars.select(made.get(c, pl.col(c)).alias(c) for c in bar_columns(cols))

    def _empty(self) -> pl.DataFrame:
        columns = {**STATE_SCHEMA, **{c: pl.Float64 for c in self.options.params.columns}}
        return self._records(pl.DataFrame(schema=columns), "final")
