"""What users see, on the pipeline thread: the rich dashboard and plain log on stderr, JSON lines on
stdout. The only module that touches rich.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from typing import IO

import msgspec
from rich.console import Console, Group
from rich.live import Live
from rich.logging import RichHandler
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .config import RedactingFilter, Redactor
from .events import SIDE_BUY, SIDE_SELL
from .pipeline import Snapshot, SymbolState
from .source import Notice

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
}


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


class JsonLines:
    """Machine-readable output: one JSON object per line on stdout (DESIGN §1)."""

    def __init__(self, out: IO[bytes] | None = None) -> None:
        self._out = out or sys.stdout.buffer
        self._encoder = msgspec.json.Encoder()

    def write(self, record: dict[str, object]) -> None:
        self._out.write(self._encoder.encode(record) + b"\n")
        self._out.flush()

    def status(self, notice: Notice) -> None:
        self.write(
            {"type": "status", "event": notice.event, "time": notice.time, "detail": notice.detail}
        )

    def refresh(self, snapshot: Snapshot) -> None:
        pass

    def close(self, snapshot: Snapshot) -> None:
        self._out.flush()


class TextLog:
    """`--no-ui`: status changes as plain lines on stderr, and a summary at the end."""

    def __init__(self, console: Console = stderr_console) -> None:
        self._console = console

    def status(self, notice: Notice) -> None:
        stamp = time.strftime("%H:%M:%S", time.gmtime(notice.time / 1000))
        style = _NOTICE_STYLE.get(notice.event, "")
        detail = f" {notice.detail}" if notice.detail else ""
        self._console.print(Text(f"{stamp} {notice.event}{detail}", style=style))

    def refresh(self, snapshot: Snapshot) -> None:
        pass

    def close(self, snapshot: Snapshot) -> None:
        f = snapshot.feed
        self._console.print(
            f"{f.events:,} events in {f.frames:,} frames; {f.rejected} rejected, "
            f"{f.malformed_frames} malformed frames; {f.reconnects} reconnects; {f.gaps} gaps"
        )


class Dashboard:
    """The live terminal view: a row per symbol, recent notices, and a footer for the feed."""

    def __init__(self, console: Console = stderr_console, title: str = "polystream") -> None:
        self._console = console
        self._title = title
        self._notices: deque[Notice] = deque(maxlen=6)
        self._live = Live(console=console, refresh_per_second=4, transient=False)
        self._started = False

    def status(self, notice: Notice) -> None:
        self._notices.append(notice)

    def refresh(self, snapshot: Snapshot) -> None:
        if not self._started:
            self._live.start()
            self._started = True
        self._live.update(self.render(snapshot))

    def close(self, snapshot: Snapshot) -> None:
        if not self._started:
            self._live.start()
            self._started = True
        self._live.update(self.render(snapshot))
        self._live.stop()

    def render(self, snapshot: Snapshot) -> Group:
        table = Table(title=self._title, expand=True, title_style="bold")
        for name, justify in (
            ("symbol", "left"),
            ("last", "right"),
            ("size", "right"),
            ("side", "center"),
            ("bid", "right"),
            ("ask", "right"),
            ("spread", "right"),
            ("events/s", "right"),
            ("age", "right"),
        ):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for s in snapshot.symbols:
            table.add_row(
                Text(s.symbol, style="bold"),
                fmt_price(s.last_price),
                fmt_size(s.last_size),
                _side(s.last_side),
                fmt_price(s.bid),
                fmt_price(s.ask),
                fmt_price(s.spread, s.ask),
                f"{s.rate:,.0f}",
                _age(s, snapshot.now_ms),
            )
        parts: list[Table | Panel | Text] = [table]
        if self._notices:
            lines = Text()
            for n in self._notices:
                stamp = time.strftime("%H:%M:%S", time.gmtime(n.time / 1000))
                style = _NOTICE_STYLE.get(n.event, "")
                lines.append(f"{stamp} {n.event} {n.detail}\n", style=style)
            lines.rstrip()
            parts.append(Panel(lines, title="feed", title_align="left", border_style="dim"))
        parts.append(self._footer(snapshot))
        return Group(*parts)

    def _footer(self, snapshot: Snapshot) -> Text:
        f = snapshot.feed
        text = Text()
        text.append(f" {f.state} ", style=f"reverse {_STATE_STYLE.get(f.state, '')}")
        text.append(
            f"  reconnects {f.reconnects}  lag {f.lag_ms} ms  queue {f.queue_depth}/{f.queue_size}"
            f"  events {f.events:,}  rejected {f.rejected + f.malformed_frames}  gaps {f.gaps}"
        )
        return text
