"""Oscillators over bar series as polars expressions, equal to TA-Lib 0.8 (pipeline thread).

`compute(bars)` adds the indicator columns to a whole series (open, high, low, close...).
`IndicatorState` does the same for a stream of final bars: it keeps a short tail of history with
the recursive states (EMAs, Wilder averages) and computes only new or revised rows.

Every value depends only on its window and on the previous recursive state, in a fixed order of
arithmetic: rolling sums are written as explicit sums of shifted columns rather than sliding
sums, so results do not depend on how the stream was cut into batches.
"""

from __future__ import annotations

import functools

import msgspec
import polars as pl

# TA-Lib's TA_EPSILON: a difference this small relative to the prices counts as zero.
_EPSILON = 1e-14


class IndicatorParams(msgspec.Struct, frozen=True):
    """Indicator parameters; the defaults are DESIGN §4's."""

    rsi: int = 14
    stoch_k: int = 14
    stoch_slow_k: int = 3
    stoch_d: int = 3
    macd_fast: int = 12
    macd_slow: int = 26
    macd_signal: int = 9
    ao_fast: int = 5
    ao_slow: int = 34
    cci: int = 20
    cci_constant: float = 0.015
    bb: int = 20
    bb_k: float = 2.0
    sma: tuple[int, ...] = ()
    ema: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        periods = [
            self.rsi,
            self.stoch_k,
            self.stoch_slow_k,
            self.stoch_d,
            self.macd_fast,
            self.macd_slow,
            self.macd_signal,
            self.ao_fast,
            self.ao_slow,
            self.cci,
            self.bb,
            *self.sma,
            *self.ema,
        ]
        if any(p < 1 for p in periods) or self.rsi < 2 or self.macd_fast < 2:
            raise ValueError("indicator periods must be positive (RSI and MACD at least 2)")

    @property
    def columns(self) -> list[str]:
        """Output columns, in the order of the JSON contract."""
        return [
            f"rsi_{self.rsi}",
            "stoch_k",
            "stoch_d",
            "macd",
            "macd_signal",
            "macd_hist",
            "ao",
            f"cci_{self.cci}",
            "bb_upper",
            "bb_middle",
            "bb_lower",
            *(f"sma_{n}" for n in self.sma),
            *(f"ema_{n}" for n in self.ema),
        ]

    @property
    def warmup(self) -> int:
        """Bars needed before every indicator has a value (index of the first full row + 1)."""
        slow = max(self.macd_fast, self.macd_slow)
        return 1 + max(
            self.rsi,
            self.stoch_k + self.stoch_slow_k + self.stoch_d - 3,
            slow + self.macd_signal - 2,
            max(self.ao_fast, self.ao_slow) - 1,
            self.cci - 1,
            self.bb - 1,
            *(n - 1 for n in self.sma),
            *(n - 1 for n in self.ema),
        )

    @property
    def window(self) -> int:
        """The longest finite window any indicator looks back over."""
        return max(
            self.stoch_k + self.stoch_slow_k + self.stoch_d,
            self.ao_fast,
            self.ao_slow,
            self.cci,
            self.bb,
            self.rsi + 1,
            *self.sma,
            1,
        )


# -- building blocks ---------------------------------------------------------------------------


def _window_sum(x: pl.Expr, n: int) -> pl.Expr:
    """Σ of the last n values, added oldest first: null until the window is full."""
    total = x.shift(n - 1)
    for k in range(n - 2, -1, -1):
        total = total + x.shift(k)
    return total


def _divisor(n: float) -> str:
    return f"_div_{float(n)!r}"


def _div(x: pl.Expr, n: float) -> pl.Expr:
    """x / n, correctly rounded like TA-Lib's C division. Polars turns a division by a literal
    into a multiplication by its reciprocal, which can differ in the last bit, so the divisor
    is a column of the frame (see `_divisors`)."""
    return x / pl.col(_divisor(n))


def _divisors(p: IndicatorParams, height: int) -> list[pl.Series]:
    # Real columns: a broadcast literal is kept as a scalar and divided by its reciprocal.
    values = {2, 3, 100, p.cci, p.bb, p.ao_fast, p.ao_slow, p.stoch_slow_k, p.stoch_d, *p.sma}
    return [pl.Series(_divisor(v), [float(v)] * height, dtype=pl.Float64) for v in sorted(values)]


def _sma(x: pl.Expr, n: int) -> pl.Expr:
    return _div(_window_sum(x, n), n)


def _population_std(x: pl.Expr, n: int, mean: pl.Expr) -> pl.Expr:
    # Two passes (deviations from the window's mean), never E[x²] − mean².
    sq = (x.shift(n - 1) - mean) ** 2
    for k in range(n - 2, -1, -1):
        sq = sq + (x.shift(k) - mean) ** 2
    return _div(sq, n).sqrt()


def _mean_deviation(x: pl.Expr, n: int, mean: pl.Expr) -> pl.Expr:
    dev = (x.shift(n - 1) - mean).abs()
    for k in range(n - 2, -1, -1):
        dev = dev + (x.shift(k) - mean).abs()
    return _div(dev, n)


def _recursive(x: pl.Series, alpha: float, seed_at: int) -> pl.Series:
    """y[t] = y[t-1] + alpha·(x[t] − y[t-1]) from the seed at `seed_at` (x[seed_at] itself);
    null before it."""
    out = x.slice(seed_at).ewm_mean(alpha=alpha, adjust=False)
    return pl.concat([pl.Series([None] * seed_at, dtype=pl.Float64), out])


def _seeded(x: pl.Series, n: int, seed_at: int) -> pl.Series:
    """`x` with the value at `seed_at` replaced by the mean of the n values ending there."""
    total = 0.0
    for value in x.slice(seed_at - n + 1, n).to_list():  # in order, as TA-Lib adds them
        total += value
    mean = total / n
    values = x.to_list()
    values[seed_at] = mean
    return pl.Series(values, dtype=pl.Float64)


@functools.lru_cache(maxsize=16)
def _finite_stages(p: IndicatorParams) -> tuple[list[pl.Expr], ...]:
    """The finite-window indicators as stages of expressions, built once per parameter set.

    Each stage refers to columns the previous one materialised, so no window sum repeats a
    whole expression tree; the last stage selects the output columns.
    """
    c, h, lo = pl.col("close"), pl.col("high"), pl.col("low")
    k = p.stoch_k
    return (
        [
            lo.rolling_min(k).alias("_lowest"),
            h.rolling_max(k).alias("_highest"),
            _div(h + lo, 2.0).alias("_median"),
            _div(h + lo + c, 3.0).alias("_tp"),
        ],
        [
            _sma(pl.col("_tp"), p.cci).alias("_tp_mean"),
            _sma(c, p.bb).alias("bb_middle"),
            (_sma(pl.col("_median"), p.ao_fast) - _sma(pl.col("_median"), p.ao_slow)).alias("ao"),
            pl.when(pl.col("_highest").is_null())
            .then(None)
            .when(
                # TA-Lib 0.8 calls a range flat within 1e-14 of its own price level
                (pl.col("_highest") - pl.col("_lowest")).abs()
                > _EPSILON * (pl.col("_highest").abs() + pl.col("_lowest").abs())
            )
            .then((c - pl.col("_lowest")) / _div(pl.col("_highest") - pl.col("_lowest"), 100.0))
            .otherwise(0.0)
            .alias("_fast_k"),
            *(_sma(c, m).alias(f"sma_{m}") for m in p.sma),
        ],
        [
            _mean_deviation(pl.col("_tp"), p.cci, pl.col("_tp_mean")).alias("_md"),
            _population_std(c, p.bb, pl.col("bb_middle")).alias("_bb_std"),
            _sma(pl.col("_fast_k"), p.stoch_slow_k).alias("_slow_k"),
        ],
        [
            (pl.col("_tp") - pl.col("_tp_mean")).alias("_dev"),
            _sma(pl.col("_slow_k"), p.stoch_d).alias("stoch_d"),
        ],
        [
            # TA-Lib starts %K on the same bar as %D.
            pl.when(pl.col("stoch_d").is_null())
            .then(None)
            .otherwise(pl.col("_slow_k"))
            .alias("stoch_k"),
            pl.col("stoch_d"),
            pl.col("ao"),
            pl.when(pl.col("_tp_mean").is_null())
            .then(None)
            .when(
                # a flat window, judged relative to its own price level as TA-Lib 0.8 does
                (pl.col("_dev").abs() > _EPSILON * pl.col("_tp_mean").abs())
                & (pl.col("_md").abs() > _EPSILON * pl.col("_tp_mean").abs())
            )
            .then(pl.col("_dev") / (p.cci_constant * pl.col("_md")))
            .otherwise(0.0)
            .alias(f"cci_{p.cci}"),
            (pl.col("bb_middle") + p.bb_k * pl.col("_bb_std")).alias("bb_upper"),
            pl.col("bb_middle"),
            (pl.col("bb_middle") - p.bb_k * pl.col("_bb_std")).alias("bb_lower"),
            *(pl.col(f"sma_{m}") for m in p.sma),
        ],
    )


# -- the computation ---------------------------------------------------------------------------

_STATE_COLUMNS = ("_ema_fast", "_ema_slow", "_macd_raw", "_gain", "_loss")


def _state_names(p: IndicatorParams) -> list[str]:
    return [*_STATE_COLUMNS, *(f"_ema_{n}" for n in p.ema)]


def _finite_many(frames: list[pl.DataFrame], p: IndicatorParams) -> list[pl.DataFrame]:
    """The finite-window columns of several bar series in one polars pass.

    Polars' cost here is per expression, not per row, so the series are stacked with a gap of
    null rows longer than any look-back between them: no window reaches across two series, and
    each gets exactly what it would get alone.
    """
    gap = p.window + p.warmup
    blank = pl.DataFrame(
        {c: pl.Series([None] * gap, dtype=pl.Float64) for c in ("close", "high", "low")}
    )
    parts: list[pl.DataFrame] = []
    for frame in frames:
        parts.append(frame.select(pl.col("close", "high", "low").cast(pl.Float64)))
        parts.append(blank)
    stacked = pl.concat(parts, how="vertical")
    *stages, last = _finite_stages(p)
    finite = stacked.with_columns(_divisors(p, stacked.height))
    for stage in stages:
        finite = finite.with_columns(stage)
    finite = finite.select(last)
    out, at = [], 0
    for frame in frames:
        out.append(finite.slice(at, frame.height))
        at += frame.height + gap
    return out


def _compute(
    frame: pl.DataFrame, p: IndicatorParams, finite: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Indicator and state columns for a whole series from its first bar, as TA-Lib computes
    them; `finite` may bring the finite-window columns already computed (`_finite_many`)."""
    close = frame["close"].cast(pl.Float64)
    n = len(frame)
    if finite is None:
        (finite,) = _finite_many([frame], p)
    nulls = pl.Series([None] * n, dtype=pl.Float64)

    def ema(x: pl.Series, period: int, seed_at: int, alpha: float | None = None) -> pl.Series:
        """TA-Lib's recursion: seeded at `seed_at` with the mean of the `period` values ending
        there, then y[t] = y[t-1] + alpha·(x[t] − y[t-1])."""
        if n <= seed_at:
            return nulls
        return _recursive(_seeded(x, period, seed_at), alpha or 2 / (period + 1), seed_at)

    # MACD: TA-Lib seeds the fast EMA so that it starts on the same bar as the slow one.
    slow_n, fast_n = max(p.macd_fast, p.macd_slow), min(p.macd_fast, p.macd_slow)
    seed_at = slow_n - 1
    ema_fast = ema(close, fast_n, seed_at)
    ema_slow = ema(close, slow_n, seed_at)
    macd_raw = ema_fast - ema_slow
    signal_at = slow_n - 1 + p.macd_signal - 1
    signal = ema(macd_raw, p.macd_signal, signal_at)
    valid = pl.Series([i >= signal_at for i in range(n)], dtype=pl.Boolean)
    macd_line = macd_raw.zip_with(valid, nulls)

    change = close.diff()
    avg_gain = ema(change.clip(lower_bound=0.0), p.rsi, p.rsi, 1 / p.rsi)
    avg_loss = ema((-change).clip(lower_bound=0.0), p.rsi, p.rsi, 1 / p.rsi)

    extra: dict[str, pl.Series] = {}
    for m in p.ema:
        extra[f"ema_{m}"] = extra[f"_ema_{m}"] = ema(close, m, m - 1)

    recursive = pl.DataFrame(
        {
            "_ema_fast": ema_fast,
            "_ema_slow": ema_slow,
            "_macd_raw": macd_raw,
            "_gain": avg_gain,
            "_loss": avg_loss,
            "macd": macd_line,
            "macd_signal": signal,
            **extra,
        }
    ).with_columns(
        (pl.col("macd") - pl.col("macd_signal")).alias("macd_hist"),
        pl.when((pl.col("_gain") + pl.col("_loss")) != 0)
        .then(100.0 * (pl.col("_gain") / (pl.col("_gain") + pl.col("_loss"))))
        .otherwise(pl.when(pl.col("_gain").is_null()).then(None).otherwise(0.0))
        .alias(f"rsi_{p.rsi}"),
    )
    out = pl.concat([finite, recursive], how="horizontal")
    return out.select([*p.columns, *_state_names(p)])


def _continue(
    frame: pl.DataFrame,
    p: IndicatorParams,
    start: int,
    finite: pl.DataFrame,
    state: dict[str, float | None],
) -> pl.DataFrame:
    """Rows from `start` of a long-running series, every recursion continuing from `state` (the
    values at row `start - 1`): one polars pass for all of them."""
    slow_n, fast_n = max(p.macd_fast, p.macd_slow), min(p.macd_fast, p.macd_slow)
    first = pl.int_range(pl.len()) == 0

    def carry(x: pl.Expr, name: str, alpha: float) -> pl.Expr:
        # the row before `start` holds the state; the recursion runs on from it
        return (
            pl.when(first)
            .then(pl.lit(state[name], pl.Float64))
            .otherwise(x)
            .ewm_mean(alpha=alpha, adjust=False)
            .alias(name)
        )

    close = pl.col("close")
    change = close.diff()
    step = (
        frame.slice(start - 1)
        .select(close.cast(pl.Float64))
        .select(
            carry(close, "_ema_fast", 2 / (fast_n + 1)),
            carry(close, "_ema_slow", 2 / (slow_n + 1)),
            carry(change.clip(lower_bound=0.0), "_gain", 1 / p.rsi),
            carry((-change).clip(lower_bound=0.0), "_loss", 1 / p.rsi),
            *(carry(close, f"_ema_{m}", 2 / (m + 1)) for m in p.ema),
        )
    )
    gain, loss = pl.col("_gain"), pl.col("_loss")
    out = (
        step.with_columns((pl.col("_ema_fast") - pl.col("_ema_slow")).alias("_macd_raw"))
        .with_columns(carry(pl.col("_macd_raw"), "macd_signal", 2 / (p.macd_signal + 1)))
        .slice(1)
        .with_columns(
            pl.col("_macd_raw").alias("macd"),
            (pl.col("_macd_raw") - pl.col("macd_signal")).alias("macd_hist"),
            pl.when((gain + loss) != 0)
            .then(100.0 * (gain / (gain + loss)))
            .otherwise(0.0)
            .alias(f"rsi_{p.rsi}"),
            *(pl.col(f"_ema_{m}").alias(f"ema_{m}") for m in p.ema),
        )
    )
    return pl.concat([finite.slice(start), out], how="horizontal").select(
        [*p.columns, *_state_names(p)]
    )


def compute(bars: pl.DataFrame, params: IndicatorParams | None = None) -> pl.DataFrame:
    """`bars` (with open, high, low, close in time order) plus every indicator column."""
    p = params or IndicatorParams()
    if bars.height == 0:
        return bars.with_columns(pl.lit(None, dtype=pl.Float64).alias(c) for c in p.columns)
    values = _compute(bars, p).select(p.columns)
    return pl.concat(
        [bars.drop([c for c in p.columns if c in bars.columns]), values], how="horizontal"
    )


class IndicatorState:
    """Streaming indicators for one symbol and timeframe: feed final or revised bars in order.

    Keeps the last `keep` bars with their indicator and state columns; that must cover the
    longest window plus the revision horizon (in bars).
    """

    def __init__(self, params: IndicatorParams | None = None, revision_bars: int = 0) -> None:
        self.params = params or IndicatorParams()
        self.keep = max(2 * self.params.warmup, self.params.window) + revision_bars + 8
        self.history: pl.DataFrame | None = None
        self.dropped = 0

    def append(self, bars: pl.DataFrame) -> pl.DataFrame:
        """Add bars later than every bar so far; return them with their indicator columns."""
        return update_many([(self, bars, False)])[0]

    def revise(self, bars: pl.DataFrame) -> pl.DataFrame:
        """Replace the stored bars with the same `start`; return them with recomputed values.

        Later bars' stored values are recomputed too, so what follows builds on the revision.
        """
        return update_many([(self, bars, True)])[0]

    def _plan(self, bars: pl.DataFrame, revising: bool) -> tuple[pl.DataFrame, int] | None:
        """The frame to compute over and the first row to compute (None: nothing to do)."""
        p = self.params
        own = bars.drop([c for c in [*p.columns, *_state_names(p)] if c in bars.columns])
        if self.history is None:
            return own, 0
        hist = self.history.drop([*p.columns, *_state_names(p)])
        if not revising:
            return pl.concat([hist, own], how="vertical_relaxed"), self.history.height
        positions = hist.with_row_index("_i").filter(pl.col("start").is_in(own["start"].implode()))
        if positions.height == 0:
            return None
        first = int(positions["_i"].min())  # type: ignore[arg-type]
        return hist.update(own, on="start"), first

    def _commit(
        self,
        frame: pl.DataFrame,
        first: int,
        finite: pl.DataFrame,
        bars: pl.DataFrame,
        revising: bool,
    ) -> pl.DataFrame:
        p = self.params
        if self.dropped == 0:
            computed = _compute(frame, p, finite)
        else:
            assert self.history is not None
            states = self.history.select([*p.columns, *_state_names(p)]).head(first)
            at = states.row(first - 1, named=True)
            pending = _continue(frame, p, first, finite, at)
            computed = pl.concat([states, pending], how="vertical_relaxed")
        full = pl.concat([frame, computed], how="horizontal")
        self.history = full
        if full.height > self.keep:
            cut = full.height - self.keep
            self.history = full.slice(cut)
            self.dropped += cut
        result = full.slice(first)
        if revising:
            result = result.filter(pl.col("start").is_in(bars["start"].implode()))
        return result.drop(_state_names(p))


def update_many(
    work: list[tuple[IndicatorState, pl.DataFrame, bool]],
) -> list[pl.DataFrame]:
    """Append (or, with True, revise) bars for several states at once: one polars pass computes
    the finite windows of all of them. Returns each one's bars with indicator columns."""
    plans = [st._plan(bars, revising) for st, bars, revising in work]
    pending = [i for i, plan in enumerate(plans) if plan is not None]
    by_params: dict[IndicatorParams, list[int]] = {}
    for i in pending:
        by_params.setdefault(work[i][0].params, []).append(i)
    finite: dict[int, pl.DataFrame] = {}
    for params, indexes in by_params.items():
        frames = [plans[i][0] for i in indexes]  # type: ignore[index]
        finite.update(zip(indexes, _finite_many(frames, params), strict=True))
    out = []
    for i, (st, bars, revising) in enumerate(work):
        plan = plans[i]
        if plan is None:
            out.append(bars.head(0))
        else:
            out.append(st._commit(plan[0], plan[1], finite[i], bars, revising))
    return out
