"""What users see, on the pipeline thread: the rich dashboard and plain log on stderr, JSON lines on
stdout. The only module that touches rich.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any

import msgspec
import polars as pl
from rich.console import Console, Group
from rich.live import Live
from rich.logging import RichHandler
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .config import RedactingFilter, Redactor
from .schema import SIDE_BUY, SIDE_SELL, Alert, Notice
from .sinks import BaseSink, FeedState, Output, View
from .view import Board, SymbolState

stderr_console = Console(stderr=True, highlight=False)

_STATE_STYLE = {
    "streaming": "green",
    "replaying": "green",
    "ended": "cyan",
    "backoff": "yellow",
    "connecting": "yellow",
    "authenticating": "yellow",
    "subscribing": "yellow",
    "failed": "red",
    "stopped": "dim",
}
_NOTICE_STYLE = {
    "error": "bold red",
    "max_connections": "bold red",
    "disconnected": "yellow",
    "reconnecting": "yellow",
    "slow_consumer": "yellow",
    "gap": "magenta",
    "ahead": "yellow",
    "store_down": "bold red",
    "store_up": "green",
    "store_pending": "yellow",
    "filter_error": "bold red",
    "filter_waiting": "yellow",
    "filter_added": "cyan",
    "filter_changed": "cyan",
    "filter_removed": "cyan",
}
_SEVERITY_STYLE = {"info": "cyan", "warning": "yellow", "critical": "bold red"}


def _alert_parts(alert: Alert) -> tuple[str, str, str, str]:
    """Time, severity, filter, and symbol (with timeframe) with the message, as shown."""
    stamp = time.strftime("%H:%M:%S", time.gmtime(alert.time / 1000))
    where = f"{alert.symbol} {alert.timeframe}" if alert.timeframe else alert.symbol
    return f"{stamp} ", f"{alert.severity:<8}", f" {alert.filter} ", f"{where}: {alert.message}"


def alert_line(alert: Alert) -> Text:
    """One alert as a line: time, severity, filter, symbol (and timeframe), message."""
    stamp, severity, name, rest = _alert_parts(alert)
    text = Text(stamp)
    text.append(severity, style=_SEVERITY_STYLE.get(alert.severity, ""))
    text.append(name, style="bold")
    text.append(rest)
    return text


def alert_text(alert: Alert) -> str:
    """`alert_line` without styles, for plain lines."""
    return "".join(_alert_parts(alert))


def _to_console(alerts: Iterable[Alert]) -> list[Alert]:
    return [a for a in alerts if "console" in a.notify]


def setup_logging(redactor: Redactor, debug: bool = False) -> None:
    """Send library logs to stderr through rich, with every known secret redacted."""
    handler = RichHandler(console=stderr_console, show_path=debug, rich_tracebacks=debug)
    handler.addFilter(RedactingFilter(redactor))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    for noisy in ("websockets", "websocket"):
        logging.getLogger(noisy).setLevel(logging.INFO if debug else logging.CRITICAL)


def error(message: str) -> None:
    """The one place a fatal error reaches the user: one sentence on stderr."""
    sys.stderr.write(f"polystream: error: {message}\n")
    sys.stderr.flush()


def details(lines: list[str]) -> None:
    """Detail lines (problems with their carets) on stderr, before the error sentence."""
    for line in lines:
        stderr_console.print(line, highlight=False, markup=False, soft_wrap=True)


def fmt_price(value: float | None, scale: float | None = None) -> str:
    """A price with as many decimals as its magnitude (or `scale`'s, for a spread) deserves."""
    if value is None:
        return "—"
    magnitude = abs(value if scale is None else scale)
    digits = 2 if magnitude >= 100 else 4 if magnitude >= 1 else 8
    return f"{value:,.{digits}f}"


def fmt_size(value: float | None) -> str:
    return "—" if value is None else f"{value:.8g}"


def _side(side: int) -> Text:
    if side == SIDE_BUY:
        return Text("buy", style="green")
    if side == SIDE_SELL:
        return Text("sell", style="red")
    return Text("—", style="dim")


def _age(state: SymbolState, now_ms: int) -> str:
    if state.last_event_ms is None:
        return "—"
    return f"{max(0, now_ms - state.last_event_ms) / 1000:.1f}s"


def _level(value: float | None, low: float, high: float, digits: int = 1) -> Text:
    """A value coloured as oversold (green, below `low`) or overbought (red, above `high`)."""
    if value is None:
        return Text("…", style="dim")
    style = "bold green" if value < low else "bold red" if value > high else ""
    return Text(f"{value:.{digits}f}", style=style)


def _signed(value: float | None) -> Text:
    if value is None:
        return Text("…", style="dim")
    return Text(f"{value:+.4g}", style="green" if value > 0 else "red" if value < 0 else "")


# Below this many columns the tables drop their least telling columns instead of squeezing all.
_WIDE = 120


def _drop_columns(table: Table, names: set[str]) -> None:
    table.columns[:] = [c for c in table.columns if c.header not in names]


def _signed_share(value: float | None) -> Text:
    """An imbalance in [-1, 1] as a signed percentage: positive leans to the bid (buyers)."""
    if value is None:
        return Text("—", style="dim")
    return Text(f"{value:+.0%}", style="green" if value > 0 else "red" if value < 0 else "")


def _flow(buy: float | None, sell: float | None) -> Text:
    if not buy and not sell:
        return Text("—", style="dim")
    share = (buy or 0.0) / ((buy or 0.0) + (sell or 0.0))
    return Text(f"{share:.0%} buy", style="green" if share > 0.5 else "red" if share < 0.5 else "")


def _percent_b(bar: dict[str, object]) -> float | None:
    upper, lower, close = bar.get("bb_upper"), bar.get("bb_lower"), bar.get("close")
    if not isinstance(upper, float) or not isinstance(lower, float) or not isinstance(close, float):
        return None
    return 0.5 if upper == lower else (close - lower) / (upper - lower)


def bar_line(row: tuple[Any, ...]) -> str:
    """One bar as a plain line for `--no-ui`: (start, symbol, timeframe, state, close, volume,
    trades, rsi)."""
    start, symbol, timeframe, state, close, volume, trades, rsi = row
    stamp = time.strftime("%H:%M:%S", time.gmtime(start / 1000))
    rsi_text = f"{rsi:.1f}" if rsi is not None else "…"
    return (
        f"{stamp} {symbol} {timeframe} {state}: close {fmt_price(close)} volume "
        f"{fmt_size(volume)} trades {trades} RSI {rsi_text}"
    )


def _summary(feed: FeedState) -> str:
    f = feed
    summary = (
        f"{f.events:,} events in {f.frames:,} frames; {f.rejected} rejected, "
        f"{f.malformed_frames} malformed frames; {f.reconnects} reconnects; {f.gaps} gaps; "
        f"{f.bars} bars, {f.revised} revised, {f.too_late} trades too late"
        + (f", {f.ahead} ahead of the feed's clock" if f.ahead else "")
        + f"; {f.alerts} alerts from {f.filters} filters"
    )
    if f.sinks:
        summary += "; " + ", ".join(f"{k} {v:,}" for k, v in f.sinks.items())
    return summary


class JsonLines(BaseSink):
    """Machine-readable output: one JSON object per line on stdout (DESIGN §1): status
    records, book records, bar records and alerts (every alert, whatever its notify list)."""

    name = "JSON"

    def __init__(self, out: IO[bytes] | None = None) -> None:
        self._out = out or sys.stdout.buffer
        self._encode = msgspec.json.Encoder().encode

    def record(self, record: dict[str, object]) -> None:
        """One record on its own line, at once."""
        self._out.write(self._encode(record) + b"\n")
        self._out.flush()

    def write(self, out: Output) -> None:
        encode = self._encode
        lines = [
            encode({"type": "status", "event": n.event, "time": n.time, "detail": n.detail})
            for n in out.notices
        ]
        lines += [encode({"type": "book", **msgspec.structs.asdict(f)}) for f in out.book_features]
        if out.bars is not None and out.bars.height:
            text = out.bars.select(pl.lit("bar").alias("type"), pl.all()).write_ndjson()
            lines.append(text.encode().rstrip(b"\n"))
        lines += [encode(a.record()) for a in out.alerts]
        if lines:
            # one write and one flush per output: each line is out as soon as it is made
            self._out.write(b"\n".join(lines) + b"\n")
            self._out.flush()

    def close(self, view: View) -> Sequence[Notice]:
        self._out.flush()
        return ()


class TextLog(BaseSink):
    """`--no-ui`: status changes and console alerts as plain lines on stderr, a line per bar (or,
    with `bars=False`, a count of them every `every` seconds), and a summary at the end. Lines
    are written as plain text: rich renders only the few status lines."""

    name = "lines"

    def __init__(
        self,
        console: Console = stderr_console,
        *,
        bars: bool = True,
        every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._console = console
        self._bars = bars
        self._every = every
        self._clock = clock
        self._next = clock() + every
        self._counts: dict[tuple[str, str], int] = {}
        self._latest = 0

    def write(self, out: Output) -> None:
        for notice in out.notices:
            stamp = time.strftime("%H:%M:%S", time.gmtime(notice.time / 1000))
            style = _NOTICE_STYLE.get(notice.event, "")
            detail = f" {notice.detail}" if notice.detail else ""
            self._console.print(
                Text(f"{stamp} {notice.event}{detail}", style=style), soft_wrap=True
            )
        lines: list[str] = []
        records = out.bars
        if records is not None and records.height:
            if self._bars:
                rsi = next((c for c in records.columns if c.startswith("rsi_")), None)
                rows = records.select(
                    "start",
                    "symbol",
                    "timeframe",
                    "state",
                    "close",
                    "volume",
                    "trades",
                    pl.col(rsi) if rsi else pl.lit(None, pl.Float64),
                ).rows()
                lines += map(bar_line, rows)
            else:
                counts = records.group_by("timeframe", "state").len().rows()
                for tf, state, n in counts:
                    self._counts[(tf, state)] = self._counts.get((tf, state), 0) + n
                self._latest = max(self._latest, int(records["start"].max()))  # type: ignore[arg-type]
        lines += [alert_text(a) for a in _to_console(out.alerts)]
        if lines:
            self._console.file.write("\n".join(lines) + "\n")
            self._console.file.flush()

    def tick(self, view: View) -> Sequence[Notice]:
        if not self._bars and self._counts and self._clock() >= self._next:
            self._next = self._clock() + self._every
            self._bar_counts()
        return ()

    def close(self, view: View) -> Sequence[Notice]:
        if self._counts:
            self._bar_counts()
        self._console.print(_summary(view.feed), soft_wrap=True)
        return ()

    def _bar_counts(self) -> None:
        """The bars made since the last count, per timeframe and state."""
        parts = [f"{n:,} {tf} {state}" for (tf, state), n in sorted(self._counts.items())]
        self._counts = {}
        upto = time.strftime("%H:%M:%S", time.gmtime(self._latest / 1000))
        self._console.print(f"bars: {', '.join(parts)} (up to {upto})", soft_wrap=True)


_ALERT_LINES = 8


class Dashboard(BaseSink):
    """The live terminal view: a row per symbol, the main timeframe's bars, recent notices and
    alerts, and a footer for the feed."""

    name = "dashboard"

    def __init__(
        self,
        symbols: Sequence[str],
        timeframe: str,
        console: Console = stderr_console,
        title: str = "polystream",
    ) -> None:
        self.board = Board(symbols, timeframe)
        self._console = console
        self._title = title
        self._notices: deque[Notice] = deque(maxlen=6)
        self._live = Live(console=console, refresh_per_second=4, transient=False)
        self._started = False

    def write(self, out: Output) -> None:
        self.board.update(out)
        self._notices.extend(out.notices)

    def tick(self, view: View) -> Sequence[Notice]:
        if not self._started:
            self._live.start()
            self._started = True
        self._live.update(self.render(view))
        return ()

    def close(self, view: View) -> Sequence[Notice]:
        self.tick(view)
        self._live.stop()
        return ()

    def render(self, view: View) -> Group:
        rows = self.board.rows()
        table = Table(title=self._title, expand=True, title_style="bold")
        for name, justify in (
            ("symbol", "left"),
            ("last", "right"),
            ("size", "right"),
            ("side", "center"),
            ("bid", "right"),
            ("ask", "right"),
            ("spread", "right"),
            ("imbalance", "right"),
            ("events/s", "right"),
            ("age", "right"),
        ):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for s in rows:
            table.add_row(
                Text(s.symbol, style="bold"),
                fmt_price(s.last_price),
                fmt_size(s.last_size),
                _side(s.last_side),
                fmt_price(s.bid),
                fmt_price(s.ask),
                fmt_price(s.spread, s.ask),
                _signed_share(s.imbalance),
                f"{s.rate:,.0f}",
                _age(s, view.now_ms),
            )
        bars = self._bar_table(rows, view)
        if self._console.width < _WIDE:
            _drop_columns(table, {"size", "imbalance", "age"})
            _drop_columns(bars, {"bar", "volume", "buy/sell", "AO"})
        parts: list[Table | Panel | Text] = [table, bars]
        books = [s for s in rows if s.book is not None]
        if books:
            parts.append(self._book_table(books))
        if self._notices:
            lines = Text()
            for n in self._notices:
                stamp = time.strftime("%H:%M:%S", time.gmtime(n.time / 1000))
                style = _NOTICE_STYLE.get(n.event, "")
                lines.append(f"{stamp} {n.event} {n.detail}\n", style=style)
            lines.rstrip()
            parts.append(Panel(lines, title="feed", title_align="left", border_style="dim"))
        shown = _to_console(self.board.alerts)[-_ALERT_LINES:]
        if shown:
            alert_lines = Text()
            for a in shown:
                alert_lines.append_text(alert_line(a))
                alert_lines.append("\n")
            alert_lines.rstrip()
            parts.append(
                Panel(alert_lines, title="alerts", title_align="left", border_style="yellow")
            )
        parts.append(self._footer(view))
        return Group(*parts)

    def _bar_table(self, rows: list[SymbolState], view: View) -> Table:
        table = Table(expand=True, title=f"{self.board.timeframe} bars", title_style="bold")
        for name in (
            "symbol",
            "bar",
            "close",
            "volume",
            "buy/sell",
            "RSI",
            "%K",
            "%D",
            "MACD hist",
            "AO",
            "CCI",
            "BB %B",
            "state",
        ):
            table.add_column(
                name, justify="left" if name in ("symbol", "bar", "state") else "right"
            )
        for s in rows:
            b = s.bar
            if b is None:
                table.add_row(
                    Text(s.symbol, style="bold"),
                    *(["—"] * 11),
                    Text("waiting for the first bar", style="dim"),
                )
                continue
            rsi = b.get(next((k for k in b if k.startswith("rsi_")), ""), None)
            cci = b.get(next((k for k in b if k.startswith("cci_")), ""), None)
            keys = list(b)
            warming = any(b[k] is None for k in keys[keys.index("state") + 1 :])
            state = (
                Text(f"warming {s.bars}/{view.warmup}", style="yellow")
                if warming
                else Text(b["state"], style="dim" if b["state"] == "final" else "cyan")
            )
            table.add_row(
                Text(s.symbol, style="bold"),
                time.strftime("%H:%M:%S", time.gmtime(b["start"] / 1000)),
                fmt_price(b["close"]),
                fmt_size(b["volume"]),
                _flow(b.get("buy_volume"), b.get("sell_volume")),
                _level(rsi, 30, 70),
                _level(b.get("stoch_k"), 20, 80),
                _level(b.get("stoch_d"), 20, 80),
                _signed(b.get("macd_hist")),
                _signed(b.get("ao")),
                _level(cci, -100, 100),
                _level(_percent_b(b), 0, 1, digits=2),
                state,
            )
        return table

    def _book_table(self, symbols: list[SymbolState]) -> Table:
        table = Table(expand=True, title="order book", title_style="bold")
        for name in (
            "symbol",
            "depth imbalance",
            "bid depth",
            "ask depth",
            "supports",
            "resistances",
        ):
            table.add_column(name, justify="left" if name == "symbol" else "right")
        for s in symbols:
            b = s.book
            assert b is not None
            table.add_row(
                Text(s.symbol, style="bold"),
                _signed_share(b.depth_imbalance),
                fmt_size(b.bid_depth),
                fmt_size(b.ask_depth),
                Text(" ".join(fmt_price(p, b.mid) for p in b.supports), style="green"),
                Text(" ".join(fmt_price(p, b.mid) for p in b.resistances), style="red"),
            )
        return table

    def _footer(self, view: View) -> Text:
        f = view.feed
        text = Text()
        text.append(f" {f.state} ", style=f"reverse {_STATE_STYLE.get(f.state, '')}")
        text.append(
            f"  reconnects {f.reconnects}  lag {f.lag_ms} ms  queue {f.queue_depth}/{f.queue_size}"
            f"  events {f.events:,}  rejected {f.rejected + f.malformed_frames}  gaps {f.gaps}"
            f"  bars {f.bars:,}  revised {f.revised}  late {f.too_late}"
            + (f"  ahead {f.ahead}" if f.ahead else "")
            + f"  filters {f.filters}  alerts {f.alerts:,}"
        )
        if f.sinks:
            text.append("  " + "  ".join(f"{k} {v:,}" for k, v in f.sinks.items()))
        if f.drift:
            text.append(f"\n drift vs trade-built bars: {f.drift}", style="dim")
        return text


def print_frame(frame: pl.DataFrame, title: str, rows: int = 40) -> None:
    """A table of the last `rows` rows of a frame, on stdout (for `analyze` without -o)."""
    console = Console(highlight=False)
    table = Table(title=f"{title}: last {min(rows, frame.height)} of {frame.height:,} bars")
    for name in frame.columns:
        table.add_column(name, justify="right")
    for row in frame.tail(rows).iter_rows():
        table.add_row(*(_cell(v) for v in row))
    console.print(table)


def _cell(value: object) -> str:
    if value is None:
        return "…"
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e6 else f"{value:,.2f}"
    return str(value)


stdout_console = Console(highlight=False)


def note(message: str, style: str = "") -> None:
    """A line for humans on stderr."""
    stderr_console.print(Text(message, style=style), soft_wrap=True)


def filter_table(rows: list[tuple[str, str, str, str, str, str]], title: str) -> None:
    """`filter list`: name, on, timeframe, symbols, condition, last fired."""
    table = Table(title=title, title_style="bold", expand=False)
    for name in ("name", "on", "timeframe", "symbols", "condition", "last fired"):
        table.add_column(name, overflow="fold")
    for row in rows:
        style = "red" if row[1] == "invalid" else ""
        table.add_row(*row, style=style)
    stdout_console.print(table)


def show_file(path: str, text: str) -> None:
    """`filter show`: the file, highlighted, with its path."""
    from rich.syntax import Syntax

    stdout_console.print(Text(f"# {path}", style="dim"))
    stdout_console.print(Syntax(text, "yaml", background_color="default"))


def alert_table(alerts: list[Alert], title: str) -> None:
    """`filter test`: when a filter would have fired, with the values it saw."""
    table = Table(title=title, title_style="bold")
    for name in ("time (UTC)", "symbol", "values", "message"):
        table.add_column(name, overflow="fold")
    for a in alerts:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a.time / 1000))
        values = "  ".join(f"{k} {_cell(v)}" for k, v in a.values.items())
        table.add_row(stamp, a.symbol, values, a.message)
    stdout_console.print(table)


def migration_table(rows: list[tuple[str, bool]]) -> None:
    """`migrate --list`: each migration and whether it is applied."""
    table = Table(title="migrations", title_style="bold")
    table.add_column("migration")
    table.add_column("state")
    for name, applied in rows:
        table.add_row(name, Text("applied", "green") if applied else Text("pending", "yellow"))
    stdout_console.print(table)


class BackfillProgress:
    """`backfill`: a progress bar per symbol with rows fetched and the time left."""

    def __init__(self, symbols: list[str], start_ms: int, end_ms: int) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._start = start_ms
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[rows]:>12,} rows"),
            TimeRemainingColumn(),
            console=stderr_console,
        )
        self._tasks = {
            s: self._progress.add_task(s, total=max(1, end_ms - start_ms), rows=0) for s in symbols
        }

    def __enter__(self) -> BackfillProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def __call__(self, symbol: str, rows: int, done_ms: int) -> None:
        task = self._tasks.get(symbol)
        if task is None:
            return
        fields = self._progress.tasks[task].fields
        self._progress.update(
            task, completed=max(0, done_ms - self._start), rows=fields["rows"] + rows
        )
