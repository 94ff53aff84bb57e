"""Evaluating filters over micro-batches (pipeline thread): bar records, trades and quotes in,
`Alert`s out.

Each kind of row keeps a short tail of earlier rows per symbol (as long as the loaded filters
look back), so a batch is evaluated as tail + new rows with every filter's condition in one
polars pass. Bar filters see each final bar once; trade and quote filters see every event.
Edge triggers carry the last condition per (filter, symbol) across batches; cooldowns are per
(filter, symbol) in event time and survive edits of the file.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec
import polars as pl

from ..config import timeframe_name
from ..events import SIDE_BUY, SIDE_SELL
from ..indicators import IndicatorParams, IndicatorState, compute, update_many
from . import lang
from .spec import Filter, Template

# Bars kept per symbol and timeframe beyond what the filters look back over, so that a filter
# added mid-run starts with warmed-up indicators.
SEED_BARS = 300
_SIDES = {SIDE_BUY: "buy", SIDE_SELL: "sell"}
_NOT_VALUES = {"start", "end", "received", "side", "exchange", "time"}


class Alert(msgspec.Struct):
    """One firing of a filter; `record()` is its JSON line (DESIGN §1)."""

    filter: str
    symbol: str
    timeframe: str | None
    time: int
    severity: str
    message: str
    values: dict[str, float | None]
    notify: tuple[str, ...] = ()

    def record(self) -> dict[str, object]:
        return {
            "type": "alert",
            "filter": self.filter,
            "symbol": self.symbol,
            "timeframe": self.timeframe,
            "time": self.time,
            "severity": self.severity,
            "message": self.message,
            "values": self.values,
        }


@dataclass
class _Loaded:
    filter: Filter
    compiled: lang.Compiled
    template: Template
    timeframe: int | None  # resolved for bar filters
    edge: dict[str, bool] = field(default_factory=dict)  # last condition per symbol


@dataclass
class _Tail:
    """Earlier rows of one kind (or one bar timeframe), a bounded number per symbol."""

    rows: pl.DataFrame | None = None

    def keep(self, frame: pl.DataFrame, n: int) -> None:
        if n <= 0 or frame.height == 0:
            self.rows = None if n <= 0 else self.rows
            return
        # signed: pl.len() is unsigned, and fewer rows than n must not wrap around
        count = pl.len().cast(pl.Int64).over("symbol")
        self.rows = frame.filter(pl.int_range(pl.len(), dtype=pl.Int64).over("symbol") >= count - n)


class FilterEngine:
    """Runs a set of filters over a run's rows. `timeframes` are the bar timeframes the run
    builds (the first is the default for filters that name none)."""

    def __init__(
        self,
        filters: Iterable[Filter] = (),
        *,
        params: IndicatorParams | None = None,
        timeframes: Sequence[int] = (60_000,),
    ) -> None:
        self.params = params or IndicatorParams()
        self.timeframes = tuple(timeframes)
        self._loaded: dict[str, _Loaded] = {}
        self._cooldown: dict[tuple[str, str], int] = {}
        self._bars: dict[int, _Tail] = {tf: _Tail() for tf in self.timeframes}
        self._trades = _Tail()
        self._quotes = _Tail()
        self._states: dict[tuple[str, int, IndicatorParams], IndicatorState] = {}
        self.fired: dict[str, int] = {}
        self.last_fired: dict[str, int] = {}
        self.set_filters(filters)

    # -- the set of filters --------------------------------------------------------------------

    @property
    def filters(self) -> list[Filter]:
        return [lf.filter for lf in self._loaded.values()]

    @property
    def waiting(self) -> list[Filter]:
        """Bar filters whose timeframe this run does not build."""
        return [
            lf.filter
            for lf in self._loaded.values()
            if lf.filter.on == "bar" and lf.timeframe not in self.timeframes
        ]

    def set_filters(self, filters: Iterable[Filter]) -> None:
        """Replace the loaded set. An unchanged filter keeps its edge state; every filter keeps
        its cooldowns by name."""
        loaded: dict[str, _Loaded] = {}
        for f in filters:
            old = self._loaded.get(f.name)
            if old is not None and old.filter == f:
                loaded[f.name] = old
                continue
            compiled = f.compile(self.params)
            tf = (f.timeframe or self.timeframes[0]) if f.on == "bar" else None
            loaded[f.name] = _Loaded(f, compiled, f.template(), tf)
        self._loaded = loaded
        for key in [k for k in self._cooldown if k[0] not in loaded]:
            del self._cooldown[key]

    def _of(self, kind: str, timeframe: int | None = None) -> list[_Loaded]:
        return [
            lf
            for lf in self._loaded.values()
            if lf.filter.on == kind and (timeframe is None or lf.timeframe == timeframe)
        ]

    # -- bars ----------------------------------------------------------------------------------

    def on_bars(self, records: pl.DataFrame) -> list[Alert]:
        """Bar records from the engine: final bars are evaluated once, revised ones correct the
        kept history, partial ones are ignored."""
        if records.height == 0:
            return []
        alerts: list[Alert] = []
        for tf, tail in self._bars.items():
            name = _timeframe_label(tf)
            mine = records.filter(pl.col("timeframe") == name)
            if mine.height == 0:
                continue
            revised = mine.filter(pl.col("state") == "revised")
            if revised.height and tail.rows is not None:
                tail.rows = tail.rows.update(
                    revised.select(tail.rows.columns), on=["symbol", "start"]
                )
            final = mine.filter(pl.col("state") == "final")
            if final.height == 0:
                continue
            loaded = self._of("bar", tf)
            lookback = max((lf.compiled.lookback for lf in loaded), default=0)
            keep = max(lookback, SEED_BARS)
            if loaded:
                frame = self._bar_frame(tf, tail, final, loaded, lookback)
                alerts += self._evaluate(frame, loaded, "start", name)
            before = tail.rows
            joined = final if before is None else pl.concat([before, final], how="diagonal")
            tail.keep(joined.select(final.columns), keep)
        return alerts

    def _bar_frame(
        self,
        tf: int,
        tail: _Tail,
        final: pl.DataFrame,
        loaded: list[_Loaded],
        lookback: int,
    ) -> pl.DataFrame:
        """Kept bars + new ones, with `_new` marking the new and any derived indicator columns
        (parameters other than the run's) from streaming states of their own."""
        new = final.with_columns(pl.lit(True).alias("_new"))
        if tail.rows is None:
            frame = new
        else:
            old = tail.rows.with_columns(pl.lit(False).alias("_new"))
            frame = pl.concat([old, new.select(old.columns)], how="vertical_relaxed")
        derived: dict[IndicatorParams, list[lang.Derived]] = {}
        for lf in loaded:
            for d in lf.compiled.derived:
                if d not in derived.setdefault(d.params, []):
                    derived[d.params].append(d)
        if not derived:
            return frame
        raw = ["symbol", "start", "open", "high", "low", "close"]
        work: list[tuple[IndicatorState, pl.DataFrame, bool]] = []
        keys: list[tuple[str, IndicatorParams]] = []
        per_symbol = final.select(raw).partition_by("symbol", as_dict=True, maintain_order=True)
        for (symbol,), bars in per_symbol.items():
            for params in derived:
                key = (str(symbol), tf, params)
                state = self._states.get(key)
                if state is None:
                    state = self._states[key] = IndicatorState(params, revision_bars=lookback)
                    if tail.rows is not None:
                        seed = tail.rows.filter(pl.col("symbol") == symbol).select(raw)
                        if seed.height:
                            state.append(seed)
                work.append((state, bars, False))
                keys.append((str(symbol), params))
        # rows before this batch come from each state's kept history, new rows from the update
        results = update_many(work)
        pieces = []
        for params, wanted in derived.items():
            parts = []
            for (symbol, p), (state, _, _), new_rows in zip(keys, work, results, strict=True):
                if p is not params:
                    continue
                cols = [pl.col(d.column).alias(d.name) for d in wanted]
                rows = [new_rows.select("start", *cols)]
                if state.history is not None and new_rows.height:
                    kept = state.history.filter(pl.col("start") < new_rows["start"].min())
                    rows.insert(0, kept.select("start", *cols))
                parts.append(pl.concat(rows).with_columns(pl.lit(symbol).alias("symbol")))
            if parts:
                pieces.append(pl.concat(parts))
        for piece in pieces:
            frame = frame.join(piece, on=["symbol", "start"], how="left", maintain_order="left")
        return frame

    # -- trades and quotes ---------------------------------------------------------------------

    def on_trades(self, trades: pl.DataFrame) -> list[Alert]:
        return self._events("trade", trades, self._trades)

    def on_quotes(self, quotes: pl.DataFrame) -> list[Alert]:
        return self._events("quote", quotes, self._quotes)

    def _events(self, kind: str, rows: pl.DataFrame, tail: _Tail) -> list[Alert]:
        loaded = self._of(kind)
        if not loaded or rows.height == 0:
            tail.rows = None
            return []
        lookback = max(lf.compiled.lookback for lf in loaded)
        new = rows.with_columns(pl.lit(True).alias("_new"))
        if lookback and tail.rows is not None:
            frame = pl.concat([tail.rows.with_columns(pl.lit(False).alias("_new")), new])
        else:
            frame = new
        alerts = self._evaluate(frame, loaded, "time", None)
        if lookback:
            tail.keep(frame.drop("_new"), lookback)
        return alerts

    # -- evaluation ----------------------------------------------------------------------------

    def _evaluate(
        self, frame: pl.DataFrame, loaded: list[_Loaded], time_column: str, timeframe: str | None
    ) -> list[Alert]:
        lengths = sorted({n for lf in loaded for n in lf.compiled.divisors})
        if lengths:
            frame = frame.with_columns(
                pl.Series(lang.divisor_column(n), [float(n)] * frame.height) for n in lengths
            )
        conditions = []
        for i, lf in enumerate(loaded):
            cond = lf.compiled.condition
            if lf.filter.symbols:
                cond = cond & pl.col("symbol").is_in(list(lf.filter.symbols))
            conditions.append(cond.alias(f"_c{i}"))
        evaluated = (
            frame.select(pl.col("symbol"), pl.col("_new"), *conditions)
            .with_row_index("_row")
            .filter(pl.col("_new"))
        )
        if evaluated.height == 0:
            return []
        fires = []
        for i, lf in enumerate(loaded):
            c = pl.col(f"_c{i}")
            if lf.filter.trigger == "level":
                fires.append(c.alias(f"_f{i}"))
                continue
            carried = {s: v for s, v in lf.edge.items()}
            before = c.shift(1).over("symbol")
            if carried:
                first = pl.col("symbol").replace_strict(
                    carried, default=False, return_dtype=pl.Boolean
                )
                before = before.fill_null(first)
            fires.append((c & ~before.fill_null(False)).alias(f"_f{i}"))
        flags = evaluated.select("_row", "symbol", *fires)
        last = evaluated.group_by("symbol", maintain_order=True).agg(
            pl.col(f"_c{i}").last() for i in range(len(loaded))
        )
        for row in last.iter_rows():
            symbol = row[0]
            for i, lf in enumerate(loaded):
                lf.edge[symbol] = bool(row[i + 1])
        alerts: list[Alert] = []
        for i, lf in enumerate(loaded):
            hits = flags.filter(pl.col(f"_f{i}")).select("_row", "symbol")
            if hits.height == 0:
                continue
            alerts += self._fire(lf, frame, hits, time_column, timeframe)
        alerts.sort(key=lambda a: a.time)
        return alerts

    def _fire(
        self,
        lf: _Loaded,
        frame: pl.DataFrame,
        hits: pl.DataFrame,
        time_column: str,
        timeframe: str | None,
    ) -> list[Alert]:
        """Alerts for the rows where a filter fired, after its cooldown."""
        f = lf.filter
        times = frame[time_column].gather(hits["_row"]).to_list()
        chosen: list[int] = []
        for row, symbol, t in zip(
            hits["_row"].to_list(), hits["symbol"].to_list(), times, strict=True
        ):
            key = (f.name, symbol)
            last = self._cooldown.get(key)
            if f.cooldown and last is not None and t - last < f.cooldown:
                continue
            self._cooldown[key] = t
            chosen.append(row)
        if not chosen:
            return []
        rows = pl.Series("_row", chosen, dtype=pl.UInt32)
        names = [n for n, _ in lf.compiled.values]
        wanted = set(lf.template.names) - set(names)
        extra = [c for c in frame.columns if c in wanted]
        values = frame.select(
            *(expr.alias(f"_v_{n}") for n, expr in lf.compiled.values),
            *extra,
            pl.col(time_column).alias("_time"),
            pl.col("symbol").alias("_symbol"),
        )[rows]
        out = []
        for row in values.iter_rows(named=True):
            shown = {n: _number(row[f"_v_{n}"]) for n in names}
            for c in extra:  # numbers the message shows are part of the alert's values too
                if c not in _NOT_VALUES and _number(row[c]) is not None:
                    shown[c] = _number(row[c])
            context: dict[str, object] = {**{c: row[c] for c in extra}, **shown}
            if "side" in context:
                context["side"] = _SIDES.get(context["side"], "unknown")  # type: ignore[call-overload]
            context.update(
                filter=f.name,
                symbol=row["_symbol"],
                timeframe=timeframe or "",
                time=_iso(row["_time"]),
                severity=f.severity,
            )
            alert = Alert(
                f.name,
                row["_symbol"],
                timeframe,
                row["_time"],
                f.severity,
                lf.template.render(context),
                shown,
                f.notify,
            )
            out.append(alert)
            self.fired[f.name] = self.fired.get(f.name, 0) + 1
            self.last_fired[f.name] = max(self.last_fired.get(f.name, 0), row["_time"])
        return out


def _number(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        v = float(value)
        return v if v == v else None
    return None


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def bar_records(
    bars: pl.DataFrame, symbol: str, timeframe: int, params: IndicatorParams | None = None
) -> pl.DataFrame:
    """OHLCV bars (`time`, open … volume, as `analyze.read_bars` gives them) as final bar
    records with indicator columns, the way the engine emits them. Columns a bar file does not
    have (vwap, trades, buy and sell volume) are null, so conditions on them are false."""

    p = params or IndicatorParams()
    frame = bars.rename({"time": "start"}).with_columns(
        pl.lit(symbol).alias("symbol"),
        pl.lit(_timeframe_label(timeframe)).alias("timeframe"),
        (pl.col("start") + timeframe).alias("end"),
        pl.lit(None, pl.Float64).alias("vwap"),
        pl.lit(None, pl.Int64).alias("trades"),
        pl.lit(None, pl.Float64).alias("buy_volume"),
        pl.lit(None, pl.Float64).alias("sell_volume"),
        pl.lit("final").alias("state"),
        pl.lit(None, pl.Float64).alias("flow_imbalance"),
    )
    return compute(frame, p)


def infer_timeframe(times: pl.Series) -> int:
    """The usual spacing of bar start times (ms), or 60 000 when there is no second bar."""
    steps = times.diff().drop_nulls()
    steps = steps.filter(steps > 0)
    return int(steps.mode().min()) if steps.len() else 60_000  # type: ignore[arg-type]


def _timeframe_label(ms: int) -> str:
    try:
        return timeframe_name(ms)
    except ValueError:
        return f"{ms}ms"


def run_on_bars(
    f: Filter, bars: pl.DataFrame, symbol: str, params: IndicatorParams | None = None
) -> tuple[list[Alert], pl.DataFrame]:
    """When bar filter `f` would have fired on a series of OHLCV bars, whatever timeframe the
    file has, and the bar records it was evaluated on."""
    tf = infer_timeframe(bars["time"])
    records = bar_records(bars, symbol, tf, params)
    engine = FilterEngine(
        [msgspec.structs.replace(f, timeframe=None)], params=params, timeframes=(tf,)
    )
    return engine.on_bars(records), records
