"""Charts of one symbol's bars (any thread): candlesticks with Bollinger Bands, a volume pane,
RSI and MACD panes, and a marker where each alert fired. plotext keeps one figure per process,
so terminal charts are drawn one at a time.

plotly draws interactive HTML, matplotlib PNG or SVG, plotext the terminal. They are the optional
`chart` extra, imported only when a chart is drawn, so polystream runs without them.
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import polars as pl

from .analyze import BAR_COLUMNS, read_bars
from .config import timeframe_name
from .errors import ConfigError, UsageError
from .filters import Alert, Filter, run_on_bars
from .filters.engine import SEED_BARS, infer_timeframe
from .indicators import IndicatorParams, compute
from .schema import PRICES

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Kind = Literal["terminal", "html", "png", "svg"]

INSTALL = "pip install 'polystream[chart]'"
SUFFIXES: dict[str, Kind] = {".html": "html", ".htm": "html", ".png": "png", ".svg": "svg"}

# The panes show the default indicators: RSI 14, MACD 12/26/9, Bollinger Bands 20/2.
PARAMS = IndicatorParams()
RSI = f"rsi_{PARAMS.rsi}"
MACD = f"MACD {PARAMS.macd_fast}/{PARAMS.macd_slow}/{PARAMS.macd_signal}"
BANDS = f"BB {PARAMS.bb}/{PARAMS.bb_k:g}"
_NEEDED = (RSI, "macd", "macd_signal", "macd_hist", "bb_upper", "bb_middle", "bb_lower")
RSI_LINES = (30.0, 70.0)

UP = "#26a69a"
DOWN = "#ef5350"
BAND = "#5c6bc0"
_PLOTLY_SYMBOLS = ("triangle-down", "triangle-up", "diamond", "circle", "square", "star")
_MPL_MARKERS = ("v", "^", "D", "o", "s", "*")


# -- what is drawn -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Marks:
    """Where one filter fired: bar start times (ms), the close of those bars, the messages."""

    filter: str
    times: list[int]
    closes: list[float]
    messages: list[str]


def output_kind(out: Path | None, option: str = "--output") -> Kind:
    """What `out` asks for (None: the terminal); `UsageError` for a suffix no library draws,
    naming the `option` that gave it."""
    if out is None:
        return "terminal"
    kind = SUFFIXES.get(out.suffix.lower())
    if kind is None:
        terminal = ", or no --output to draw it in the terminal" if option == "--output" else ""
        raise UsageError(
            f"Cannot draw a chart into {out} ({option}): give it the suffix .html, .png or "
            f".svg{terminal}."
        )
    return kind


def prepare(bars: pl.DataFrame, symbol: str) -> pl.DataFrame:
    """`symbol`'s bars in time order with a `time` column (epoch ms), the price, volume and the
    charted indicator columns. Takes `analyze` output and bar records (`start`) alike; a
    `symbol` column keeps only `symbol`'s rows; missing indicators are computed here."""
    frame = bars if "time" in bars.columns else bars.rename({"start": "time"})
    if "symbol" in frame.columns:
        frame = frame.filter(pl.col("symbol") == symbol)
    if frame.height == 0:
        raise ConfigError(f"There are no bars of {symbol} to chart.")
    frame = frame.sort("time")
    if "volume" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias("volume"))
    if not all(c in frame.columns for c in _NEEDED):
        frame = compute(frame.select(BAR_COLUMNS), PARAMS)
    return frame.select(*BAR_COLUMNS, *_NEEDED)


def visible_alerts(bars: pl.DataFrame, alerts: Sequence[Alert], symbol: str) -> list[Alert]:
    """The alerts of `symbol` whose time falls on one of the bars a chart of `bars` draws."""
    frame = prepare(bars, symbol)
    first = int(frame["time"][0])
    end = int(frame["time"][-1]) + infer_timeframe(frame["time"])
    return [a for a in alerts if a.symbol == symbol and first <= a.time < end]


def marks(bars: pl.DataFrame, alerts: Sequence[Alert], symbol: str) -> list[Marks]:
    """The visible alerts grouped by filter, in order of first firing, each placed at the close
    of the bar it fired on (the bar holding its time, for a trade or quote alert)."""
    frame = prepare(bars, symbol)
    shown = visible_alerts(frame, alerts, symbol)
    if not shown:
        return []
    fired = pl.DataFrame(
        {
            "filter": [a.filter for a in shown],
            "time": [a.time for a in shown],
            "message": [a.message for a in shown],
        },
        schema={"filter": pl.String, "time": pl.Int64, "message": pl.String},
    ).with_row_index("order")
    placed = (
        fired.sort("time")
        .join_asof(frame.select("time", "close"), on="time", strategy="backward")
        .sort("order")
    )
    return [
        Marks(str(name), part["time"].to_list(), part["close"].to_list(), part["message"].to_list())
        for (name,), part in placed.partition_by(
            "filter", as_dict=True, maintain_order=True
        ).items()
    ]


def title_for(bars: pl.DataFrame, symbol: str) -> str:
    """`X:BTCUSD 1m bars from 2019-03-29 00:00 to 2019-03-29 23:59 UTC`: the symbol, the
    timeframe the bars are spaced by, and the first and last bar's start."""
    frame = prepare(bars, symbol)
    times = frame["time"]
    tf = infer_timeframe(times)
    try:
        label = timeframe_name(tf)
    except ValueError:
        label = f"{tf / 1000:g}s"
    first, last = (_utc(int(t)).strftime("%Y-%m-%d %H:%M") for t in (times[0], times[-1]))
    return f"{symbol} {label} bars from {first} to {last} UTC"


def _utc(ms: int) -> datetime:
    # naive: plotly and plotext would shift an aware time to local time or drop its zone
    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)


def _datetimes(frame: pl.DataFrame) -> list[datetime]:
    return [_utc(int(t)) for t in frame["time"]]


# -- where the bars and alerts come from ---------------------------------------------------------


def file_bars(path: Path, symbol: str) -> pl.DataFrame:
    """The bars of `symbol` in a bar file (all of them in a file without a symbol column), with
    the indicator columns `analyze` gives them."""
    bars = read_bars(path, symbol)
    return compute(bars.select(BAR_COLUMNS), PARAMS)


def stored_bars(url: str, symbol: str, timeframe: int, last: int) -> pl.DataFrame:
    """The last `last` stored bars of `symbol` and `timeframe` (ms), after up to `SEED_BARS`
    earlier ones that warm up the indicators and filters; `ConfigError` when there are none."""
    from .store import recent_bars, require_migrated

    require_migrated(url)
    now = int(time.time() * 1000)
    records = recent_bars(url, [symbol], [timeframe], last + SEED_BARS, now)
    if records.height == 0:
        raise ConfigError(
            f"The database holds no {timeframe_name(timeframe)} bars of {symbol}; "
            f"store some with polystream backfill {symbol} --from DATE."
        )
    return compute(records.rename({"start": "time"}).select(BAR_COLUMNS), PARAMS)


def filter_alerts(filters: Sequence[Filter], bars: pl.DataFrame, symbol: str) -> list[Alert]:
    """When each bar filter would have fired on `symbol`'s bars, in time order; a filter on
    trades or quotes is a `ConfigError`, since bars cannot show what it watches."""
    for f in filters:
        if f.on != "bar":
            raise ConfigError(
                f"{f.name} runs on {f.on}s, which a chart of bars cannot show; "
                "chart bar filters only."
            )
    ohlcv = prepare(bars, symbol).select(BAR_COLUMNS)
    alerts = [a for f in filters for a in run_on_bars(f, ohlcv, symbol)[0]]
    return sorted(alerts, key=lambda a: a.time)


# -- drawing -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _needs(library: str, purpose: str) -> Iterator[None]:
    """Turn the failed import of an optional library into one sentence naming the extra."""
    try:
        yield
    except ImportError as exc:
        raise ConfigError(f"{purpose} needs {library}: {INSTALL}.") from exc


def write_chart(
    bars: pl.DataFrame,
    out: Path | None,
    *,
    symbol: str,
    title: str,
    alerts: Sequence[Alert] = (),
) -> None:
    """Draw `symbol`'s bars (analyze output or bar records, as `run_on_bars` returns them) with
    `alerts` marked: into `out` by its suffix (.html, .png, .svg), or in the terminal when
    `out` is None."""
    kind = output_kind(out)
    if out is None:
        text = render_terminal(
            bars, symbol=symbol, title=title, alerts=alerts, color=sys.stdout.isatty()
        )
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    if kind == "html":
        data = render_html(bars, symbol=symbol, title=title, alerts=alerts).encode()
    else:
        data = _render_image(kind, bars, symbol=symbol, title=title, alerts=alerts)
    try:
        out.write_bytes(data)
    except OSError as exc:
        raise ConfigError(f"Cannot write {out}: {exc.strerror or exc}.") from exc


# -- plotly --------------------------------------------------------------------------------------


def plotly_figure(
    bars: pl.DataFrame, *, symbol: str, title: str, alerts: Sequence[Alert] = ()
) -> Any:
    """The interactive chart as a plotly `Figure`: price with bands and alert markers, volume,
    RSI and MACD, on one shared time axis."""
    with _needs("plotly", "Drawing an HTML chart"):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

    frame = prepare(bars, symbol)
    x = _datetimes(frame)
    col = {c: frame[c].to_list() for c in frame.columns if c != "time"}
    rising = [c >= o for o, c in zip(col["open"], col["close"], strict=True)]
    fig = make_subplots(
        rows=4,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.02,
        row_heights=[0.55, 0.13, 0.16, 0.16],
    )
    fig.add_trace(
        go.Candlestick(
            x=x,
            open=col["open"],
            high=col["high"],
            low=col["low"],
            close=col["close"],
            name=symbol,
            increasing_line_color=UP,
            decreasing_line_color=DOWN,
        ),
        row=1,
        col=1,
    )
    band = {"color": BAND, "width": 1}
    for name, column, fill in (
        (f"{BANDS} upper", "bb_upper", None),
        (f"{BANDS} lower", "bb_lower", "tonexty"),
        (f"{BANDS} middle", "bb_middle", None),
    ):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=col[column],
                name=name,
                mode="lines",
                line={**band, "dash": "dot"} if column == "bb_middle" else band,
                fill=fill,
                fillcolor="rgba(92, 107, 192, 0.08)",
                legendgroup="bb",
            ),
            row=1,
            col=1,
        )
    for i, m in enumerate(marks(frame, alerts, symbol)):
        fig.add_trace(
            go.Scatter(
                x=[_utc(t) for t in m.times],
                y=m.closes,
                name=m.filter,
                mode="markers",
                marker={
                    "symbol": _PLOTLY_SYMBOLS[i % len(_PLOTLY_SYMBOLS)],
                    "size": 11,
                    "line": {"width": 1, "color": "black"},
                },
                text=m.messages,
                hovertemplate="%{text}<extra>" + m.filter + "</extra>",
            ),
            row=1,
            col=1,
        )
    colors = [UP if r else DOWN for r in rising]
    fig.add_trace(
        go.Bar(x=x, y=col["volume"], name="volume", marker_color=colors, showlegend=False),
        row=2,
        col=1,
    )
    fig.add_trace(
        go.Scatter(x=x, y=col[RSI], name=f"RSI {PARAMS.rsi}", line={"color": "#7e57c2"}),
        row=3,
        col=1,
    )
    for level in RSI_LINES:
        fig.add_hline(y=level, line={"dash": "dash", "color": "gray", "width": 1}, row=3, col=1)
    hist = [UP if (h or 0) >= 0 else DOWN for h in col["macd_hist"]]
    fig.add_trace(
        go.Bar(x=x, y=col["macd_hist"], name="MACD histogram", marker_color=hist), row=4, col=1
    )
    fig.add_trace(
        go.Scatter(x=x, y=col["macd"], name=MACD, line={"color": "#1e88e5", "width": 1.2}),
        row=4,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=x, y=col["macd_signal"], name="MACD signal", line={"color": "#fb8c00", "width": 1.2}
        ),
        row=4,
        col=1,
    )
    fig.update_layout(
        title={"text": title},
        template="plotly_white",
        height=900,
        hovermode="x",
        xaxis_rangeslider_visible=False,
        margin={"l": 60, "r": 20, "t": 60, "b": 40},
    )
    for row, label in enumerate(("price", "volume", f"RSI {PARAMS.rsi}", "MACD"), start=1):
        fig.update_yaxes(title_text=label, row=row, col=1)
    fig.update_yaxes(range=[0, 100], row=3, col=1)
    fig.update_xaxes(title_text="UTC", row=4, col=1)
    return fig


def render_html(
    bars: pl.DataFrame, *, symbol: str, title: str, alerts: Sequence[Alert] = ()
) -> str:
    """A self-contained HTML page (plotly.js inside, so it opens offline) with the chart."""
    fig = plotly_figure(bars, symbol=symbol, title=title, alerts=alerts)
    return str(fig.to_html(include_plotlyjs=True, full_html=True))


# -- matplotlib ----------------------------------------------------------------------------------


def matplotlib_figure(
    bars: pl.DataFrame,
    *,
    symbol: str,
    title: str,
    alerts: Sequence[Alert] = (),
    width: int = 1200,
    height: int = 800,
) -> Figure:
    """The chart as a matplotlib `Figure` of `width` × `height` pixels, made without pyplot so
    that no global state or GUI backend is involved."""
    with _needs("matplotlib", "Drawing a PNG or SVG chart"):
        import matplotlib
        from matplotlib.figure import Figure

    frame = prepare(bars, symbol)
    # the converter is chosen when an axis first sees dates: concise labels, no repeated day
    with matplotlib.rc_context({"date.converter": "concise"}):
        fig = Figure(figsize=(width / 100, height / 100), dpi=100, layout="constrained")
        price, volume, rsi, macd = fig.subplots(
            4, 1, sharex=True, gridspec_kw={"height_ratios": [5, 1.3, 1.6, 1.6]}
        )
        fig.suptitle(title)
        x, step, colors = _times_and_colors(frame)
        _price_pane(price, frame, x, step, colors, marks(frame, alerts, symbol))
        price.set_ylabel(symbol)
        volume.bar(x, frame["volume"].to_numpy(), width=step * 0.8, color=colors)
        volume.set_ylabel("volume")
        rsi.plot(x, frame[RSI].to_numpy(), color="#7e57c2", linewidth=0.9)
        for level in RSI_LINES:
            rsi.axhline(level, color="gray", linestyle="--", linewidth=0.7)
        rsi.set_ylim(0, 100)
        rsi.set_yticks([0, *RSI_LINES, 100])
        rsi.set_ylabel(f"RSI {PARAMS.rsi}")
        _macd_pane(macd, frame, x, step)
        macd.set_xlabel("UTC")
    return fig


def _times_and_colors(frame: pl.DataFrame) -> tuple[Any, Any, list[str]]:
    """Bar starts as numpy datetimes, the spacing of bars as a timedelta, each bar's colour."""
    import numpy as np

    x = frame["time"].cast(pl.Datetime("ms")).to_numpy()
    step = np.timedelta64(infer_timeframe(frame["time"]), "ms")
    rising = (frame["close"] >= frame["open"]).to_list()
    return x, step, [UP if r else DOWN for r in rising]


def _price_pane(
    ax: Axes, frame: pl.DataFrame, x: Any, step: Any, colors: list[str], fired: list[Marks]
) -> None:
    o, h, lo, c = (frame[n].to_numpy() for n in PRICES)
    ax.vlines(x, lo, h, colors=colors, linewidth=0.6)
    # an edge keeps a candle whose open equals its close visible as a line
    ax.bar(x, c - o, bottom=o, width=step * 0.7, color=colors, edgecolor=colors, linewidth=0.4)
    upper, middle, lower = (frame[n].to_numpy() for n in ("bb_upper", "bb_middle", "bb_lower"))
    ax.plot(x, upper, color=BAND, linewidth=0.8, label=BANDS)
    ax.plot(x, lower, color=BAND, linewidth=0.8)
    ax.plot(x, middle, color=BAND, linewidth=0.6, linestyle=":")
    ax.fill_between(x, lower, upper, color=BAND, alpha=0.07)
    for i, m in enumerate(fired):
        ax.scatter(
            pl.Series(m.times).cast(pl.Datetime("ms")).to_numpy(),
            m.closes,
            marker=_MPL_MARKERS[i % len(_MPL_MARKERS)],
            s=42,
            edgecolors="black",
            linewidths=0.6,
            zorder=5,
            label=m.filter,
        )
    ax.legend(loc="upper left", fontsize="small")


def _macd_pane(ax: Axes, frame: pl.DataFrame, x: Any, step: Any) -> None:
    hist = frame["macd_hist"].fill_null(0.0)
    ax.bar(x, hist.to_numpy(), width=step * 0.8, color=[UP if h >= 0 else DOWN for h in hist])
    ax.plot(x, frame["macd"].to_numpy(), color="#1e88e5", linewidth=0.9, label=MACD)
    ax.plot(x, frame["macd_signal"].to_numpy(), color="#fb8c00", linewidth=0.9, label="signal")
    ax.legend(loc="upper left", fontsize="x-small")
    ax.set_ylabel("MACD")


_DRAWING = threading.Lock()


def _render_image(
    kind: str,
    bars: pl.DataFrame,
    *,
    symbol: str,
    title: str,
    alerts: Sequence[Alert],
    width: int = 1200,
    height: int = 800,
) -> bytes:
    # One at a time: the Telegram notifier and the commands draw on their own threads, and
    # matplotlib's settings (rc_context) are global.
    with _DRAWING:
        fig = matplotlib_figure(
            bars, symbol=symbol, title=title, alerts=alerts, width=width, height=height
        )
        buffer = io.BytesIO()
        fig.savefig(buffer, format=kind, dpi=100)
    return buffer.getvalue()


def render_png(
    bars: pl.DataFrame,
    *,
    symbol: str,
    title: str,
    alerts: Sequence[Alert] = (),
    width: int = 1200,
    height: int = 800,
) -> bytes:
    """The chart as PNG bytes of `width` × `height` pixels (for a file or a message)."""
    return _render_image(
        "png", bars, symbol=symbol, title=title, alerts=alerts, width=width, height=height
    )


# -- plotext -------------------------------------------------------------------------------------


def render_terminal(
    bars: pl.DataFrame,
    *,
    symbol: str,
    title: str,
    alerts: Sequence[Alert] = (),
    width: int | None = None,
    height: int | None = None,
    color: bool = True,
) -> str:
    """The chart as terminal text, as wide as the terminal: candlesticks (several bars merged
    into one candle when there are more bars than columns) with alert markers over an RSI pane."""
    with _needs("plotext", "Drawing a chart in the terminal"):
        import plotext as plt

    size = shutil.get_terminal_size()
    width = max(40, width or size.columns)
    height = max(16, height or size.lines - 1)
    frame = prepare(bars, symbol)
    candles = _merged(frame, max(1, (width - 12) // 2))
    stamp = "%Y-%m-%d %H:%M"

    plt.clear_figure()
    plt.subplots(2, 1)
    plt.subplot(1, 1)
    plt.date_form("Y-m-d H:M")
    plt.plotsize(width, height * 2 // 3)
    plt.title(title)
    plt.candlestick(
        candles["time"].dt.strftime(stamp).to_list(),
        {n.capitalize(): candles[n].to_list() for n in PRICES},
    )
    for m in marks(frame, alerts, symbol):
        times = [_utc(t).strftime(stamp) for t in m.times]
        plt.scatter(times, m.closes, marker="x", color="yellow", label=m.filter)
    plt.subplot(2, 1)
    plt.date_form("Y-m-d H:M")
    plt.plotsize(width, height - height * 2 // 3)
    rsi = frame.select(pl.from_epoch("time", time_unit="ms"), RSI).drop_nulls()
    if rsi.height:
        plt.plot(
            rsi["time"].dt.strftime(stamp).to_list(), rsi[RSI].to_list(), label=f"RSI {PARAMS.rsi}"
        )
    for level in RSI_LINES:
        plt.hline(level, "gray")
    plt.ylim(0, 100)
    plt.yticks(list(RSI_LINES))
    text = str(plt.build())
    plt.clear_figure()
    return (text if color else str(plt.uncolorize(text))) + "\n"


def _merged(frame: pl.DataFrame, most: int) -> pl.DataFrame:
    """At most `most` candles: runs of consecutive bars merged into one (first open, highest
    high, lowest low, last close), each at its first bar's start."""
    per = math.ceil(frame.height / most)
    return (
        frame.with_row_index("i")
        .group_by((pl.col("i") // per).alias("group"), maintain_order=True)
        .agg(
            pl.col("time").first(),
            pl.col("open").first(),
            pl.col("high").max(),
            pl.col("low").min(),
            pl.col("close").last(),
        )
        .with_columns(pl.from_epoch("time", time_unit="ms"))
    )
