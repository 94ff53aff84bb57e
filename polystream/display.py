"""What users see, on the pipeline thread: the rich dashboard and plain log on stderr, JSON lines on
stdout. The only module that touches rich.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, NamedTuple

import msgspec
import polars as pl
from rich import box
from rich.cells import cell_len
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.logging import RichHandler
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .config import RedactingFilter, Redactor
from .errors import OutputClosed
from .schema import SIDE_BUY, SIDE_SELL, Alert, Notice
from .sinks import BaseSink, FeedState, Output, View
from .view import RECENT_CLOSES, Board, SymbolState

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
    "no_filters": "yellow",
    "no_events": "yellow",
    "filter_added": "cyan",
    "filter_changed": "cyan",
    "filter_removed": "cyan",
    "warning": "yellow",
    "critical": "bold red",
}
_SEVERITY_STYLE = {"info": "cyan", "warning": "yellow", "critical": "bold red"}


def clock_text(ms: int, utc: bool = True) -> str:
    """A time of day (HH:MM:SS) in UTC, or in local time."""
    seconds = ms / 1000
    return time.strftime("%H:%M:%S", time.gmtime(seconds) if utc else time.localtime(seconds))


def zone_name(ms: int, utc: bool = True) -> str:
    """The zone `clock_text` shows `ms` in: UTC, or the local zone's abbreviation then."""
    if utc:
        return "UTC"
    local = time.localtime(ms / 1000)
    return local.tm_zone or time.strftime("UTC%z", local)


def _alert_parts(alert: Alert, utc: bool = True) -> tuple[str, str, str, str]:
    """Time, severity, filter, and symbol (with timeframe) with the message, as shown; the
    symbol is left out when the message names it already."""
    stamp = clock_text(alert.time, utc)
    symbol = "" if alert.symbol in alert.message else alert.symbol
    where = " ".join(p for p in (symbol, alert.timeframe) if p)
    rest = f"{where}: {alert.message}" if where else alert.message
    return f"{stamp} ", f"{alert.severity:<8}", f" {alert.filter} ", rest


def alert_line(alert: Alert, utc: bool = True, severity: bool = True) -> Text:
    """One alert as a line: time, severity, filter, symbol (and timeframe), message; without
    `severity` the filter's name takes the severity's colour instead of the word."""
    stamp, level, name, rest = _alert_parts(alert, utc)
    style = _SEVERITY_STYLE.get(alert.severity, "")
    text = Text(stamp)
    if severity:
        text.append(level, style=style)
        text.append(name, style="bold")
    else:
        text.append(name.lstrip(), style=f"bold {style}")
    text.append(rest)
    return text


def alert_text(alert: Alert, utc: bool = True) -> str:
    """`alert_line` without styles, for plain lines."""
    return "".join(_alert_parts(alert, utc))


def _to_console(alerts: Iterable[Alert]) -> list[Alert]:
    return [a for a in alerts if "console" in a.notify]


def setup_logging(redactor: Redactor, debug: bool = False) -> None:
    """Send library logs to stderr through rich, with every known secret redacted."""
    handler = RichHandler(
        console=stderr_console,
        show_path=debug,
        rich_tracebacks=debug,
        log_time_format="%H:%M:%S",  # as the status lines show time
    )
    handler.addFilter(RedactingFilter(redactor))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    for noisy in ("websockets", "websocket", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.INFO if debug else logging.CRITICAL)


class PanelLog(logging.Handler):
    """While the dashboard is on screen, a log record becomes one line of its feed panel (the
    level, then the message's first line and the exception's one-line summary) instead of a
    block printed above the live view. It takes the stderr handler's filters, so secrets are
    scrubbed the same way."""

    def __init__(self, notices: deque[Notice], filters: Iterable[Any] = ()) -> None:
        super().__init__(logging.WARNING)
        for f in filters:
            self.addFilter(f)
        self._notices = notices

    def emit(self, record: logging.LogRecord) -> None:
        lines = record.getMessage().strip().splitlines()
        detail = lines[0] if lines else ""
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            summary = f"{type(exc).__name__}: {exc}".splitlines()[0]
            detail = f"{detail} ({summary})" if detail else summary
        if detail != record.getMessage():  # the exception's text passes the filters too
            scrubbed = logging.makeLogRecord({"msg": detail, "levelno": record.levelno})
            self.filter(scrubbed)
            detail = scrubbed.getMessage()
        level = "critical" if record.levelno >= logging.ERROR else "warning"
        # deque.append is atomic: records from worker threads need no lock
        self._notices.append(Notice(level, int(record.created * 1000), detail))


@contextlib.contextmanager
def logs_into(notices: deque[Notice]) -> Iterator[None]:
    """Route the root logger's records into `notices` for as long as the block runs (not with
    `--debug`, whose verbose records and tracebacks keep their stderr handler)."""
    root = logging.getLogger()
    if root.level <= logging.DEBUG or not root.handlers:
        yield
        return
    saved = root.handlers[:]
    root.handlers[:] = [PanelLog(notices, [f for h in saved for f in h.filters])]
    try:
        yield
    finally:
        root.handlers[:] = saved


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


def bar_line(row: tuple[Any, ...], utc: bool = True) -> str:
    """One bar as a plain line for `--no-ui`: (start, symbol, timeframe, state, close, volume,
    trades, rsi)."""
    start, symbol, timeframe, state, close, volume, trades, rsi = row
    stamp = clock_text(start, utc)
    rsi_text = f"{rsi:.1f}" if rsi is not None else "…"
    return (
        f"{stamp} {symbol} {timeframe} {state}: close {fmt_price(close)} volume "
        f"{fmt_size(volume)} trades {trades} RSI {rsi_text}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _summary(feed: FeedState) -> str:
    f = feed
    summary = (
        f"{f.events:,} events in {f.frames:,} frames; {f.rejected} rejected, "
        f"{f.malformed_frames} malformed frames; {_count(f.reconnects, 'reconnect')}; "
        f"{_count(f.gaps, 'gap')}; {f.bars} bars, {f.revised} revised, {f.too_late} trades too late"
        + (f", {f.ahead} ahead of the feed's clock" if f.ahead else "")
        + f"; {_count(f.alerts, 'alert')} from {_count(f.filters, 'filter')}"
    )
    if f.sinks:
        summary += "; " + ", ".join(f"{k} {v:,}" for k, v in f.sinks.items())
    return summary


class JsonRecord(NamedTuple):
    """One `--json` record, encoded, with what a `--serve` subscription selects it by."""

    type: str  # status, book, bar or alert
    symbol: str  # "" for a status record
    data: bytes


def json_records(out: Output, encode: Callable[[Any], bytes]) -> list[JsonRecord]:
    """The records of one output as `--json` prints them, in its order: status, book, bar,
    alert. JSON lines and `--serve` both take them from here, so both carry the same records."""
    records = [
        JsonRecord(
            "status",
            "",
            encode({"type": "status", "event": n.event, "time": n.time, "detail": n.detail}),
        )
        for n in out.notices
    ]
    records += [
        JsonRecord("book", f.symbol, encode({"type": "book", **msgspec.structs.asdict(f)}))
        for f in out.book_features
    ]
    if out.bars is not None and out.bars.height:
        text = out.bars.select(pl.lit("bar").alias("type"), pl.all()).write_ndjson()
        lines = text.encode().rstrip(b"\n").split(b"\n")  # one line per row: newlines are escaped
        symbols = out.bars.get_column("symbol").to_list()
        records += [JsonRecord("bar", s, line) for s, line in zip(symbols, lines, strict=True)]
    records += [JsonRecord("alert", a.symbol, encode(a.record())) for a in out.alerts]
    return records


class JsonLines(BaseSink):
    """Machine-readable output: one JSON object per line on stdout (DESIGN §1): status
    records, book records, bar records and alerts (every alert, whatever its notify list)."""

    name = "JSON"

    def __init__(self, out: IO[bytes] | None = None) -> None:
        self._out = out or sys.stdout.buffer
        self._encode = msgspec.json.Encoder().encode
        self._closed = False

    def record(self, record: dict[str, object]) -> None:
        """One record on its own line, at once."""
        self._emit(self._encode(record) + b"\n")

    def write(self, out: Output) -> None:
        lines = [record.data for record in json_records(out, self._encode)]
        if lines:
            # one write and one flush per output: each line is out as soon as it is made
            self._emit(b"\n".join(lines) + b"\n")

    def close(self, view: View) -> Sequence[Notice]:
        self._emit(b"")
        return ()

    def _emit(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            self._out.write(data)
            self._out.flush()
        except BrokenPipeError:
            # The reader left (`| head`): the run ends in order; what is still buffered for
            # the closed pipe must not fail again as the interpreter exits.
            self._closed = True
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self._out.fileno())
            raise OutputClosed("The reader of the JSON output has gone.") from None


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
        utc: bool = False,
    ) -> None:
        self._console = console
        self._bars = bars
        self._utc = utc
        self._every = every
        self._clock = clock
        self._next = clock() + every
        self._counts: dict[tuple[str, str], int] = {}
        self._latest = 0

    def write(self, out: Output) -> None:
        for notice in out.notices:
            stamp = clock_text(notice.time, self._utc)
            style = _NOTICE_STYLE.get(notice.event, "")
            self._console.print(Text(f"{stamp} {notice_text(notice)}", style=style), soft_wrap=True)
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
                lines += [bar_line(row, self._utc) for row in rows]
            else:
                counts = records.group_by("timeframe", "state").len().rows()
                for tf, state, n in counts:
                    self._counts[(tf, state)] = self._counts.get((tf, state), 0) + n
                self._latest = max(self._latest, int(records["start"].max()))  # type: ignore[arg-type]
        lines += [alert_text(a, self._utc) for a in _to_console(out.alerts)]
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
        upto = clock_text(self._latest, self._utc)
        self._console.print(f"bars: {', '.join(parts)} (up to {upto})", soft_wrap=True)


# Alert lines shown at most, and status lines at most, however tall the screen.
_ALERT_LINES = 8
_NOTICE_LINES = 6
# Below this many columns alert lines leave out the severity word (its colour stays).
_WIDE = 100
_SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float]) -> str:
    """One block character per value, from ▁ (the lowest) to █ (the highest)."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi == lo:
        return _SPARKS[3] * len(values)
    scale = (len(_SPARKS) - 1) / (hi - lo)
    return "".join(_SPARKS[round((v - lo) * scale)] for v in values)


def _change(value: float | None) -> Text:
    if value is None:
        return Text("—", style="dim")
    return Text(f"{value:+.2%}", style="green" if value > 0 else "red" if value < 0 else "")


class _Column(NamedTuple):
    """A column and its cells; when the width is short the columns of the highest `rank` go
    first, all of that rank at once."""

    header: str
    rank: int
    cells: list[Text]
    justify: JustifyMethod = "right"
    least: int = 0  # the narrowest it may be, so that the tables line up


def _text(value: Text | str) -> Text:
    return value if isinstance(value, Text) else Text(value)


def _fit(columns: list[_Column], width: int, gap: int) -> list[_Column]:
    """The columns that fit in `width` when each is as wide as its widest cell."""
    widths = [max(c.least, cell_len(c.header), *(t.cell_len for t in c.cells)) for c in columns]
    kept = list(range(len(columns)))
    while True:
        need = sum(widths[i] for i in kept) + gap * (len(kept) - 1)
        worst = max(columns[i].rank for i in kept)
        if need <= width or worst == 0:
            return [columns[i] for i in kept]
        kept = [i for i in kept if columns[i].rank != worst]


def _aligned(tables: list[list[_Column]], width: int, gap: int) -> list[list[_Column]]:
    """The same columns, as wide, in every table, so that stacked tables line up."""
    merged = [
        _Column(c.header, c.rank, [t for cols in tables for t in cols[i].cells], c.justify, c.least)
        for i, c in enumerate(tables[0])
    ]
    kept = {
        c.header: max(c.least, cell_len(c.header), *(t.cell_len for t in c.cells))
        for c in _fit(merged, width, gap)
    }
    return [[c._replace(least=kept[c.header]) for c in cols if c.header in kept] for cols in tables]


def _table(columns: list[_Column], width: int, ruled: bool, title: str | None = None) -> Table:
    # no outer edge and no padding there; with a rule under the header, a divider of one space
    gap = 3 if ruled else 2
    table = Table(
        title=title,
        title_style="bold",
        title_justify="left",
        box=box.SIMPLE_HEAD if ruled else None,
        show_edge=False,
        pad_edge=False,
        header_style="bold",
        expand=True,
    )
    kept = _fit(columns, width, gap)
    for c in kept:
        table.add_column(c.header, justify=c.justify, no_wrap=True, min_width=c.least or None)
    for row in zip(*(c.cells for c in kept), strict=True):
        table.add_row(*row)
    return table


def _table_height(rows: int, ruled: bool, title: bool) -> int:
    return int(title) + 1 + int(ruled) + rows


def notice_text(notice: Notice) -> str:
    """A status record as `event detail`, without a detail that only repeats the event
    (`connected` rather than `connected Connected Successfully`)."""
    detail = notice.detail.strip()
    first, _, rest = detail.partition(" ")
    if first.lower() == notice.event.lower().replace("_", " "):
        detail = "" if rest.lower() in ("", "successfully", "success", "ok") else rest
    return f"{notice.event} {detail}" if detail else notice.event


class Dashboard(BaseSink):
    """The live terminal view, fitted to the screen: a row per symbol (price, change and range
    since the start, a sparkline of the main timeframe's closes, quote), a table per timeframe,
    the order book, recent notices, recent alerts with a count per filter, and a footer for the
    feed. Times are local, with the zone shown, or UTC."""

    name = "dashboard"

    def __init__(
        self,
        symbols: Sequence[str],
        timeframe: str,
        console: Console = stderr_console,
        title: str = "polystream",
        *,
        timeframes: Sequence[str] = (),
        utc: bool = False,
    ) -> None:
        self.board = Board(symbols, timeframe, timeframes=timeframes)
        self._console = console
        self._title = title
        self._utc = utc
        self._notices: deque[Notice] = deque(maxlen=_NOTICE_LINES)
        self._live = Live(console=console, refresh_per_second=4, transient=False)
        self._started = False
        self._logs = contextlib.ExitStack()

    def write(self, out: Output) -> None:
        self.board.update(out)
        self._notices.extend(out.notices)

    def tick(self, view: View) -> Sequence[Notice]:
        if not self._started:
            self._logs.enter_context(logs_into(self._notices))
            self._live.start()
            self._started = True
        self._live.update(self.render(view))
        return ()

    def close(self, view: View) -> Sequence[Notice]:
        self.tick(view)
        self._live.stop()
        self._logs.close()
        return ()

    def render(self, view: View) -> Group:
        """Everything, in at most the console's height: the tables lose their header rules,
        then the order book, then rows, before the alerts lose their last lines."""
        width, height = self._console.width, self._console.height
        rows = self.board.rows()
        for tf in view.timeframes:
            if tf not in self.board.timeframes:
                self.board.timeframes.append(tf)
        timeframes = self.board.timeframes
        books = [s for s in rows if s.book is not None]
        zone = zone_name(view.now_ms, self._utc)
        header = self._header(view, zone, timeframes)
        footer = self._footer(view, width)
        fixed = 1 + len(footer.wrap(self._console, width))
        shown = _to_console(self.board.alerts)
        notices = list(self._notices)
        # what the notices and alerts need at least: a line of notices, a few alert lines
        least = 2 + max(1, min(len(shown), 4)) + (3 if notices else 0)

        ruled, limit = True, len(rows)

        def tables_height() -> int:
            n = min(limit, len(rows))
            total = _table_height(n, ruled, False)
            total += len(timeframes) * _table_height(n, ruled, True)
            if books:
                total += _table_height(min(limit, len(books)), ruled, True)
            return total

        if fixed + tables_height() + least > height:
            ruled = False
        if fixed + tables_height() + least > height:
            books = []
        while limit > 1 and fixed + tables_height() + least > height:
            limit -= 1
        parts: list[RenderableType] = [header]
        parts.append(self._symbol_table(rows[:limit], view, width, ruled))
        shown_rows = rows[:limit]
        title = f" ({zone})" + (f", {limit} of {len(rows)} symbols" if limit < len(rows) else "")
        tables = [self._bar_columns(tf, shown_rows, view) for tf in timeframes]
        for tf, columns in zip(timeframes, _aligned(tables, width, 3 if ruled else 2), strict=True):
            parts.append(_table(columns, width, ruled, f"{tf} bars{title}"))
        if books:
            parts.append(self._book_table(books[:limit], width, ruled))
        room = height - fixed - tables_height() - (2 if notices else 0) - 2
        feed_lines = min(len(notices), max(1, room // 4)) if notices else 0
        alert_lines = max(1, min(len(shown), _ALERT_LINES, room - feed_lines))
        feed_lines = max(feed_lines, min(len(notices), room - alert_lines))
        if notices:
            parts.append(self._feed_panel(notices[-feed_lines:], width))
        parts.append(self._alert_panel(shown[-alert_lines:] if shown else [], width))
        parts.append(footer)
        return Group(*parts)

    def _header(self, view: View, zone: str, timeframes: list[str]) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f" {self._title} ", style="bold reverse")
        text.append(f"  {clock_text(view.now_ms, self._utc)} {zone}", style="bold")
        text.append(f"  bars {' '.join(timeframes)}", style="dim")
        return text

    def _symbol_table(self, rows: list[SymbolState], view: View, width: int, ruled: bool) -> Table:
        main = self.board.timeframe
        columns = [
            _Column("symbol", 0, [Text(s.symbol, style="bold") for s in rows], "left"),
            _Column("last", 0, [_text(fmt_price(s.last_price)) for s in rows]),
            _Column("change", 1, [_change(s.change) for s in rows]),
            _Column(
                f"{main} closes",
                2,
                [Text(sparkline(s.closes)) for s in rows],
                "left",
                RECENT_CLOSES,
            ),
            _Column("low", 3, [_text(fmt_price(s.low)) for s in rows]),
            _Column("high", 3, [_text(fmt_price(s.high)) for s in rows]),
            _Column("events/s", 4, [Text(f"{s.rate:,.0f}") for s in rows]),
            _Column("bid", 5, [_text(fmt_price(s.bid)) for s in rows]),
            _Column("ask", 5, [_text(fmt_price(s.ask)) for s in rows]),
            _Column("spread", 6, [_text(fmt_price(s.spread, s.ask)) for s in rows]),
            _Column("imbalance", 7, [_signed_share(s.imbalance) for s in rows]),
            _Column("age", 8, [Text(_age(s, view.now_ms)) for s in rows]),
            _Column("size", 9, [_text(fmt_size(s.last_size)) for s in rows]),
            _Column("side", 9, [_side(s.last_side) for s in rows], "center"),
        ]
        return _table(columns, width, ruled)

    def _bar_columns(self, timeframe: str, shown: list[SymbolState], view: View) -> list[_Column]:
        cells: dict[str, list[Text]] = {}
        for s in shown:
            series = s.of(timeframe)
            for name, value in self._bar_cells(series.bar, series.count, view).items():
                cells.setdefault(name, []).append(value)
            cells.setdefault("trend", []).append(Text(sparkline(series.closes)))
        return [
            _Column("symbol", 0, [Text(s.symbol, style="bold") for s in shown], "left"),
            _Column("start", 5, cells["start"], "left"),
            _Column("close", 0, cells["close"]),
            _Column("volume", 10, cells["volume"]),
            _Column("buy/sell", 8, cells["buy/sell"]),
            _Column("RSI", 1, cells["RSI"]),
            _Column("%K", 3, cells["%K"]),
            _Column("%D", 7, cells["%D"]),
            _Column("MACD hist", 3, cells["MACD hist"]),
            _Column("AO", 9, cells["AO"]),
            _Column("CCI", 2, cells["CCI"]),
            _Column("BB %B", 4, cells["BB %B"]),
            _Column("trend", 6, cells["trend"], "left", RECENT_CLOSES),
            _Column("state", 1, cells["state"], "left"),
        ]

    def _bar_cells(self, b: dict[str, Any] | None, count: int, view: View) -> dict[str, Text]:
        if b is None:
            none = Text("—", style="dim")
            names = ("start", "close", "volume", "buy/sell", "RSI", "%K", "%D", "MACD hist")
            return {
                **dict.fromkeys((*names, "AO", "CCI", "BB %B"), none),
                "state": Text("no bar yet", style="dim"),
            }
        rsi = b.get(next((k for k in b if k.startswith("rsi_")), ""), None)
        cci = b.get(next((k for k in b if k.startswith("cci_")), ""), None)
        keys = list(b)
        warming = any(b[k] is None for k in keys[keys.index("state") + 1 :])
        state = (
            Text(f"warming {count}/{view.warmup}", style="yellow")
            if warming
            else Text(b["state"], style="dim" if b["state"] == "final" else "cyan")
        )
        return {
            "start": Text(clock_text(b["start"], self._utc)),
            "close": Text(fmt_price(b["close"])),
            "volume": Text(fmt_size(b["volume"])),
            "buy/sell": _flow(b.get("buy_volume"), b.get("sell_volume")),
            "RSI": _level(rsi, 30, 70),
            "%K": _level(b.get("stoch_k"), 20, 80),
            "%D": _level(b.get("stoch_d"), 20, 80),
            "MACD hist": _signed(b.get("macd_hist")),
            "AO": _signed(b.get("ao")),
            "CCI": _level(cci, -100, 100),
            "BB %B": _level(_percent_b(b), 0, 1, digits=2),
            "state": state,
        }

    def _book_table(self, symbols: list[SymbolState], width: int, ruled: bool) -> Table:
        books = [s.book for s in symbols if s.book is not None]
        columns = [
            _Column("symbol", 0, [Text(s.symbol, style="bold") for s in symbols], "left"),
            _Column("depth imbalance", 0, [_signed_share(b.depth_imbalance) for b in books]),
            _Column("bid depth", 2, [_text(fmt_size(b.bid_depth)) for b in books]),
            _Column("ask depth", 2, [_text(fmt_size(b.ask_depth)) for b in books]),
            _Column(
                "supports",
                1,
                [Text(" ".join(fmt_price(p, b.mid) for p in b.supports), "green") for b in books],
            ),
            _Column(
                "resistances",
                1,
                [Text(" ".join(fmt_price(p, b.mid) for p in b.resistances), "red") for b in books],
            ),
        ]
        return _table(columns, width, ruled, "order book")

    def _feed_panel(self, notices: list[Notice], width: int) -> Panel:
        lines = Text(no_wrap=True, overflow="ellipsis")
        for n in notices:
            style = _NOTICE_STYLE.get(n.event, "")
            lines.append(f"{clock_text(n.time, self._utc)} {notice_text(n)}\n", style=style)
        lines.rstrip()
        return Panel(lines, title="feed", title_align="left", border_style="dim", width=width)

    def _alert_panel(self, alerts: list[Alert], width: int) -> Panel:
        lines = Text(no_wrap=True, overflow="ellipsis")
        for a in alerts:
            lines.append_text(alert_line(a, utc=self._utc, severity=width >= _WIDE))
            lines.append("\n")
        lines.rstrip()
        if not alerts:
            lines.append("none yet", style="dim")
        return Panel(
            lines,
            title=self._alert_title(width - 6),
            title_align="left",
            border_style="yellow",
            width=width,
        )

    def _alert_title(self, room: int) -> Text:
        """`alerts` and how many each filter fired, the most active first, as many as fit."""
        fired = self.board.fired
        title = Text("alerts", style="bold")
        ranked = fired.most_common()
        for k, (name, n) in enumerate(ranked):
            part = f" · {name} {n:,}"
            rest = len(ranked) - k - 1
            more = f" · +{rest} more" if rest else ""
            if title.cell_len + len(part) + len(more) > room:
                title.append(f" · +{len(ranked) - k} more", style="dim")
                break
            title.append(part)
        return title

    def _footer(self, view: View, width: int) -> Text:
        """The feed's state and counters, broken between counters to fit `width`."""
        f = view.feed
        wide = width >= _WIDE
        counters = [
            ("reconnects", f.reconnects),
            ("lag", f"{f.lag_ms} ms"),
            ("queue", f"{f.queue_depth}/{f.queue_size}" if wide or f.queue_depth else 0),
            ("events", f"{f.events:,}"),
            ("rejected", f.rejected + f.malformed_frames),
            ("gaps", f.gaps),
            ("bars", f"{f.bars:,}"),
            ("revised", f.revised),
            ("late", f.too_late),
            ("ahead", f.ahead),
            ("filters", f.filters),
            ("alerts", f"{f.alerts:,}"),
        ]
        # a narrow footer leaves out the counters that are still zero
        pieces = [
            f"{k} {v}"
            for k, v in counters
            if v != 0 or k in ("filters", "alerts") or (wide and k != "ahead")
        ]
        pieces += [f"{k} {v:,}" for k, v in f.sinks.items()]
        text = Text()
        text.append(f" {f.state} ", style=f"reverse {_STATE_STYLE.get(f.state, '')}")
        used = text.cell_len
        for piece in pieces:
            gap = "  "
            if used + len(gap) + len(piece) > width:
                text.append("\n")
                used, gap = 0, " "
            text.append(gap + piece)
            used += len(gap) + len(piece)
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


# In plain backfill output (`--json`, or stderr is not a terminal), a wait this long or shorter
# prints nothing.
PLAIN_WAIT = 5.0


def _seconds(value: float) -> int:
    """Whole seconds, rounded up: a wait that is not over never shows 0s."""
    return int(-(-value // 1))


def _eta_or_wait() -> Any:
    """A progress column: the time left, or, while requests wait, how long still and why."""
    from rich.progress import ProgressColumn, Task, TimeRemainingColumn

    class EtaOrWait(ProgressColumn):
        def __init__(self) -> None:
            super().__init__()
            self._eta = TimeRemainingColumn()

        def render(self, task: Task) -> Text:
            pause = task.fields.get("pause")
            if pause is None:
                return self._eta.render(task)
            until, reason = pause
            left = _seconds(max(0.0, until - time.monotonic()))
            return Text(f"waiting {left}s ({reason})", style="yellow")

    return EtaOrWait()


class BackfillProgress:
    """`backfill`: a progress bar per symbol with rows fetched and the time left, or, while
    requests wait, how long and why (the rate limit, a 429, a server error), so that a stalled
    bar is never a mystery. Plain (`plain`, or stderr is not a terminal): no bars, and one line
    for each wait longer than `PLAIN_WAIT` seconds."""

    def __init__(self, starts: dict[str, int], end_ms: int, *, plain: bool = False) -> None:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self._starts = starts
        self._live = not plain and stderr_console.is_terminal
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rows]:>12,} rows"),
            _eta_or_wait(),
            console=stderr_console,
            disable=not self._live,
        )
        self._tasks = {
            s: self._progress.add_task(s, total=max(1, end_ms - start), rows=0, pause=None)
            for s, start in starts.items()
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
            task, completed=max(0, done_ms - self._starts[symbol]), rows=fields["rows"] + rows
        )

    def waiting(self, symbol: str, wait: tuple[float, str] | None) -> None:
        """Told by the REST client (`rest.WaitObserver`): a wait begins, or (None) is over."""
        task = self._tasks.get(symbol)
        if task is None:
            return
        if not self._live:
            if wait is not None and wait[0] > PLAIN_WAIT:
                note(f"{symbol}: waiting {_seconds(wait[0])}s ({wait[1]})", "yellow")
            return
        pause = None if wait is None else (time.monotonic() + wait[0], wait[1])
        self._progress.update(task, pause=pause)


def json_lines(records: Iterable[dict[str, object]]) -> None:
    """`--json` of the commands that print data (`filter list/show/validate`, `migrate --list`):
    one object per line on stdout, through `JsonLines`, so that a reader that goes away ends
    the command quietly."""
    out = JsonLines()
    for record in records:
        out.record(record)


def frame_json_lines(frame: pl.DataFrame) -> None:
    """`analyze --json`: every row of the frame as one JSON object per line, as polars writes
    them (integer times stay integers, nulls are null)."""
    JsonLines()._emit(frame.write_ndjson().encode())


class RawJsonLines(JsonLines):
    """`--json` records that arrive encoded (`watch --from` shows what shards published):
    printed byte for byte as received, one per line, so they equal the shards' own `--json`."""

    def lines(self, records: Sequence[bytes]) -> None:
        if records:
            self._emit(b"\n".join(records) + b"\n")


class ResultsDashboard(Dashboard):
    """The dashboard of `watch --from` without `--shard`, which learns the run from the records
    the shards publish: the first timeframe seen becomes the main one and, when no symbols are
    given, each symbol gets its row as it is first seen."""

    def __init__(
        self, symbols: Sequence[str], console: Console = stderr_console, *, utc: bool = False
    ) -> None:
        super().__init__(symbols, "", console, utc=utc)
        self.board.timeframes.clear()  # no table until a timeframe is seen
        self._follow = not symbols

    def write(self, out: Output) -> None:
        board = self.board
        # Board takes its symbols and main timeframe when it is made; a viewer meets them later
        states = board._states
        bars = out.bars if out.bars is not None and out.bars.height else None
        if bars is not None and not board.timeframe:
            board.timeframe = bars.item(0, "timeframe")
            board.timeframes[:] = dict.fromkeys((board.timeframe, *board.timeframes))
            for state in states.values():
                state.timeframe = board.timeframe
        if self._follow:
            seen = [*(a.symbol for a in out.alerts), *(f.symbol for f in out.book_features)]
            if bars is not None:
                seen += bars.get_column("symbol").unique(maintain_order=True).to_list()
            for symbol in seen:
                states.setdefault(symbol, SymbolState(symbol, board.timeframe))
        super().write(out)
