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
from itertools import repeat

import msgspec
import polars as pl

from ..config import timeframe_name
from ..indicators import IndicatorParams, IndicatorState, compute, update_many
from ..schema import BAR, BAR_FEATURES, PRICES, Alert, bar_columns
from . import lang
from .spec import Filter, Template

# Bars kept per symbol and timeframe beyond what the filters look back over, so that a filter
# added mid-run starts with warmed-up indicators.
SEED_BARS = 300
_SIDES = {code: name for name, code in lang.SIDES.items()}
_NOT_VALUES = {"start", "end", "received", "side", "exchange", "time"}


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
        self.rows = frame.group_by("symbol", maintain_order=True).tail(n).select(frame.columns)


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
        # indicator states for parameters no filter asks for any more are dropped
        needed = {
            (tf, params)
            for tf in self.timeframes
            for params, _ in _merge(
                [d for lf in self._of("bar", tf) for d in lf.compiled.derived], self.params
            )
        }
        self._states = {k: v for k, v in self._states.items() if (k[1], k[2]) in needed}

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
                alerts += self._evaluate(frame, frame.height - final.height, loaded, "start", name)
            _remember(tail, final, keep)
        return alerts

    def seed(self, records: pl.DataFrame) -> None:
        """Earlier final bars (a warm-up) become the kept history, without being evaluated."""
        for tf, tail in self._bars.items():
            final = records.filter(pl.col("timeframe") == _timeframe_label(tf))
            if final.height:
                lookback = max((lf.compiled.lookback for lf in self._of("bar", tf)), default=0)
                _remember(tail, final, max(lookback, SEED_BARS))

    def _bar_frame(
        self,
        tf: int,
        tail: _Tail,
        final: pl.DataFrame,
        loaded: list[_Loaded],
        lookback: int,
    ) -> pl.DataFrame:
        """Kept bars, then the new ones, with any derived indicator columns (parameters other
        than the run's) from streaming states of their own."""
        if tail.rows is None:
            frame = final
        else:
            frame = pl.concat([tail.rows, final.select(tail.rows.columns)], how="vertical_relaxed")
        groups = _merge([d for lf in loaded for d in lf.compiled.derived], self.params)
        if not groups:
            return frame
        raw = ["symbol", "start", *PRICES]
        work: list[tuple[IndicatorState, pl.DataFrame, bool]] = []
        keys: list[tuple[str, int]] = []
        per_symbol = final.select(raw).partition_by("symbol", as_dict=True, maintain_order=True)
        for (symbol,), bars in per_symbol.items():
            for g, (params, _) in enumerate(groups):
                key = (str(symbol), tf, params)
                state = self._states.get(key)
                if state is None:
                    state = self._states[key] = IndicatorState(params, revision_bars=lookback)
                    if tail.rows is not None:
                        seed = tail.rows.filter(pl.col("symbol") == symbol).select(raw)
                        if seed.height:
                            state.append(seed)
                work.append((state, bars, False))
                keys.append((str(symbol), g))
        # earlier rows come from each state's history as it was before this batch (a big batch
        # pushes them out of it), new rows from the update
        before = [st.history for st, _, _ in work]
        results = update_many(work)
        for g, (_, wanted) in enumerate(groups):
            cols = [pl.col(d.column).alias(d.name) for d in wanted]
            parts = []
            for (symbol, group), prior, new_rows in zip(keys, before, results, strict=True):
                if group != g:
                    continue
                rows = [new_rows.select("start", *cols)]
                if prior is not None:
                    rows.insert(0, prior.select("start", *cols))
                parts.append(pl.concat(rows).with_columns(pl.lit(symbol).alias("symbol")))
            if parts:
                piece = pl.concat(parts)
                frame = frame.join(piece, on=["symbol", "start"], how="left", maintain_order="left")
        return frame

    # -- trades and quotes ---------------------------------------------------------------------

    def on_trades(self, trades: pl.DataFrame) -> list[Alert]:
        return self._events("trade", trades, self._trades)

    def on_quotes(self, quotes: pl.DataFrame) -> list[Alert]:
        return self._events("quote", quotes, self._quotes)

    def _events(self, kind: str, rows: pl.DataFrame, tail: _Tail) -> list[Alert]:
        loaded = self._of(kind)
        if not loaded:
            tail.rows = None
            return []
        if rows.height == 0:
            return []
        lookback = max(lf.compiled.lookback for lf in loaded)
        # windows group by symbol, which is several times faster on a categorical
        frame = rows.with_columns(pl.col("symbol").cast(pl.Categorical))
        old = 0
        if lookback and tail.rows is not None:
            old = tail.rows.height
            frame = pl.concat([tail.rows, frame])
        alerts = self._evaluate(frame, old, loaded, "time", None)
        tail.keep(frame, lookback)
        return alerts

    # -- evaluation ----------------------------------------------------------------------------

    def _evaluate(
        self,
        frame: pl.DataFrame,
        old: int,
        loaded: list[_Loaded],
        time_column: str,
        timeframe: str | None,
    ) -> list[Alert]:
        """Alerts of `loaded` over the rows of `frame` after the first `old` (earlier rows,
        there for look-backs only). Everything is one polars pass; Python sees only the rows
        that fire."""
        # Columns made from a literal stay scalars inside polars, and an expression such as
        # `0 < vwap` over one comes out one row long instead of broadcast: make them real.
        frame = pl.DataFrame(frame.get_columns())
        lengths = sorted({n for lf in loaded for n in lf.compiled.divisors})
        if lengths:
            frame = frame.with_columns(
                pl.repeat(float(n), frame.height, eager=True).alias(lang.divisor_column(n))
                for n in lengths
            )
        edges = [i for i, lf in enumerate(loaded) if lf.filter.trigger == "edge"]
        columns = []
        for i, lf in enumerate(loaded):
            cond = lf.compiled.condition
            if lf.filter.symbols:
                cond = cond & _any_of(lf.filter.symbols)
            columns.append(cond.alias(f"_c{i}"))
        evaluated = frame.select(*columns).slice(old)
        if evaluated.height == 0:
            return []
        symbols = frame["symbol"].slice(old)
        times = frame[time_column].slice(old)
        if edges:
            # each symbol's first and last row here, and each row's previous one of its symbol
            marks = pl.DataFrame([symbols, *(evaluated[f"_c{i}"] for i in edges)]).select(
                pl.col("symbol").is_first_distinct().alias("_first"),
                pl.col("symbol").is_last_distinct().alias("_last"),
                *(pl.col(f"_c{i}").shift(1).over("symbol").alias(f"_p{i}") for i in edges),
            )
        fired: list[tuple[int, list[int]]] = []
        for i, lf in enumerate(loaded):
            now = evaluated[f"_c{i}"]
            edge = i in edges
            # an edge: true now, and not on the symbol's previous row (its last row of the
            # previous batch, for its first row here)
            fires = now & ~marks[f"_p{i}"].fill_null(False) if edge else now
            before = lf.edge
            if edge:
                last = marks["_last"]
                ends = zip(symbols.filter(last).to_list(), now.filter(last).to_list(), strict=True)
                lf.edge = {**before, **{str(sym): bool(v) for sym, v in ends}}
            if not fires.any():
                continue
            rows = fires.arg_true()
            hits = zip(
                rows.to_list(),
                symbols.gather(rows).cast(pl.String).to_list(),
                times.gather(rows).to_list(),
                marks["_first"].gather(rows).to_list() if edge else repeat(False),
                strict=False,
            )
            chosen = self._cool(
                lf.filter,
                ((old + r, sym, t) for r, sym, t, head in hits if not (head and before.get(sym))),
            )
            if chosen:
                fired.append((i, chosen))
        if not fired:
            return []
        alerts = self._alerts(frame, loaded, fired, time_column, timeframe)
        alerts.sort(key=lambda a: a.time)
        return alerts

    def _cool(self, f: Filter, hits: Iterable[tuple[int, str, int]]) -> list[int]:
        """The rows that fire after the filter's cooldown (per symbol, in event time)."""
        chosen: list[int] = []
        cooldown = f.cooldown
        for row, symbol, t in hits:
            key = (f.name, symbol)
            last = self._cooldown.get(key)
            if cooldown and last is not None and t - last < cooldown:
                continue
            self._cooldown[key] = t
            chosen.append(row)
        return chosen

    def _alerts(
        self,
        frame: pl.DataFrame,
        loaded: list[_Loaded],
        fired: list[tuple[int, list[int]]],
        time_column: str,
        timeframe: str | None,
    ) -> list[Alert]:
        """The alerts of every filter that fired, with their values: one polars pass over the
        rows that fired for all of them, and one over the whole frame for values that look
        back over rows."""
        everywhere: list[pl.Expr] = []
        at_rows: list[pl.Expr] = []
        plans = []
        for i, rows in fired:
            lf = loaded[i]
            names = [n for n, _, _ in lf.compiled.values]
            for n, expr, window in lf.compiled.values:
                (everywhere if window else at_rows).append(expr.alias(f"_{i}_v_{n}"))
            fields = lang.FIELDS[lf.filter.on]
            # a message may show any field of the row, computed ones (spread, mid) included
            extra = [
                n
                for n in dict.fromkeys(lf.template.names)
                if n not in names and (n in fields or n in frame.columns)
            ]
            at_rows += [
                (fields[n] if n in fields else pl.col(n)).alias(f"_{i}_x_{n}") for n in extra
            ]
            plans.append((i, rows, names, extra))
        union = sorted({r for _, rows in fired for r in rows})
        index = pl.Series("_row", union, dtype=pl.UInt32)
        picked = frame[index].select(
            pl.col(time_column).alias("_time"), pl.col("symbol").alias("_symbol"), *at_rows
        )
        if everywhere:
            picked = picked.hstack(frame.select(everywhere)[index])
        columns = picked.to_dict(as_series=False)
        position = {row: k for k, row in enumerate(union)}
        out: list[Alert] = []
        for i, rows, names, extra in plans:
            f = loaded[i].filter
            template = loaded[i].template
            for row in rows:
                k = position[row]
                t, symbol = columns["_time"][k], columns["_symbol"][k]
                shown = {n: _number(columns[f"_{i}_v_{n}"][k]) for n in names}
                context: dict[str, object] = {n: columns[f"_{i}_x_{n}"][k] for n in extra}
                for n in extra:  # numbers the message shows are part of the alert's values too
                    if n not in _NOT_VALUES and _number(context[n]) is not None:
                        shown[n] = _number(context[n])
                context.update(shown)
                if "side" in context:
                    context["side"] = _SIDES.get(context["side"], "unknown")  # type: ignore[call-overload]
                context.update(
                    filter=f.name,
                    symbol=symbol,
                    timeframe=timeframe or "",
                    time=_iso(t),
                    severity=f.severity,
                )
                message = template.render(context)
                out.append(
                    Alert(
                        f.name, symbol, timeframe, t, f.severity, message, shown, f.notify, f.attach
                    )
                )
            self.fired[f.name] = self.fired.get(f.name, 0) + len(rows)
            latest = max(columns["_time"][position[r]] for r in rows)
            self.last_fired[f.name] = max(self.last_fired.get(f.name, 0), latest)
        return out


def _any_of(symbols: Sequence[str]) -> pl.Expr:
    """`symbol` is one of `symbols` (equalities: `is_in` costs more on a small batch)."""
    expr = pl.col("symbol") == symbols[0]
    for s in symbols[1:]:
        expr = expr | (pl.col("symbol") == s)
    return expr


def _remember(tail: _Tail, final: pl.DataFrame, keep: int) -> None:
    before = tail.rows
    joined = final if before is None else pl.concat([before, final], how="diagonal")
    tail.keep(joined.select(final.columns), keep)


def _merge(
    derived: list[lang.Derived], base: IndicatorParams
) -> list[tuple[IndicatorParams, list[lang.Derived]]]:
    """Indicator parameter sets covering every derived column, as few as possible: requirements
    that do not disagree on a parameter share one streaming state (each state computes every
    indicator, so one state with rsi 7 and MACD 5/35/5 costs what one with either does)."""
    groups: list[tuple[dict[str, int | float], set[int], list[lang.Derived]]] = []
    for d in dict.fromkeys(derived):
        fixed = {k: v for k, v in d.needs if k != "ema"}
        emas = {int(v) for k, v in d.needs if k == "ema"}
        for g_fixed, g_emas, members in groups:
            if all(g_fixed.get(k, v) == v for k, v in fixed.items()):
                g_fixed.update(fixed)
                g_emas |= emas
                members.append(d)
                break
        else:
            groups.append((fixed, emas, [d]))
    return [
        (
            msgspec.structs.replace(base, **fixed, ema=tuple(sorted(set(base.ema) | emas))),
            members,
        )
        for fixed, emas, members in groups
    ]


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
    n = bars.height

    def filled(name: str, value: object) -> pl.Series:
        # real columns: polars keeps a literal column as a scalar, which `0 < vwap` would not
        # broadcast over
        dtype = {**BAR, **BAR_FEATURES}[name]
        return pl.Series(name, [value] * n, dtype=dtype)

    known = {"symbol": symbol, "timeframe": _timeframe_label(timeframe), "state": "final"}
    frame = bars.rename({"time": "start"})
    frame = frame.with_columns(
        (pl.col("start") + timeframe).alias("end"),
        *(
            filled(c, known.get(c))
            for c in [*BAR, *BAR_FEATURES]
            if c not in {*frame.columns, "end"}
        ),
    )
    return compute(frame.select([*BAR, *BAR_FEATURES]), p).select(bar_columns(p.columns))


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
    file has, and the bar records it was evaluated on. The bars are `symbol`'s, unless they
    have a `symbol` column (as `analyze.read_bars` gives it): then each symbol is run on its
    own bars, as if it were the only one, and the alerts are merged in time order."""
    if "symbol" in bars.columns:
        parts = bars.partition_by("symbol", as_dict=True, maintain_order=True)
        if not parts:
            return run_on_bars(f, bars.drop("symbol"), symbol, params)
        alerts: list[Alert] = []
        evaluated: list[pl.DataFrame] = []
        for (name,), part in parts.items():
            fired, rows = run_on_bars(f, part.drop("symbol"), str(name), params)
            alerts += fired
            evaluated.append(rows)
        alerts.sort(key=lambda a: a.time)
        return alerts, pl.concat(evaluated)
    tf = infer_timeframe(bars["time"])
    records = bar_records(bars, symbol, tf, params)
    engine = FilterEngine(
        [msgspec.structs.replace(f, timeframe=None)], params=params, timeframes=(tf,)
    )
    return engine.on_bars(records), records
