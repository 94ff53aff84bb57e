"""`polystream chart`: a thin typer command over `polystream.chart` — bars from a file or the
database, the alerts of the given filters, drawn to HTML, PNG, SVG or the terminal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import chart, display
from .app import database_url
from .cli_filters import DirOption, _locate
from .config import TIMEFRAMES, load_settings, parse_timeframe
from .filters import read_filter
from .symbols import normalize

# Bars drawn from the database unless --last says otherwise.
DB_BARS = 300


def chart_command(
    symbol: Annotated[str, typer.Argument(help="The symbol to chart, e.g. X:BTCUSD.")],
    bars: Annotated[
        Path | None,
        typer.Option(
            help="OHLCV bars (CSV or Parquet); of a file with a symbol column, SYMBOL's bars."
        ),
    ] = None,
    db: Annotated[
        bool, typer.Option("--db", help="Chart the bars stored in DATABASE_URL.")
    ] = False,
    timeframe: Annotated[
        str | None,
        typer.Option(
            "--timeframe",
            "-t",
            help=f"With --db: the bar timeframe ({' '.join(TIMEFRAMES)}) [default: 1m].",
        ),
    ] = None,
    filter_: Annotated[
        list[str] | None,
        typer.Option(
            "--filter",
            metavar="NAME",
            help="Mark where this filter (a file, or a filter's name) fired; repeatable.",
        ),
    ] = None,
    last: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help=f"Draw the last N bars [default: all of a file, {DB_BARS} from the database].",
            min=1,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write .html (interactive, works offline), .png or .svg [default: draw in the "
            "terminal].",
        ),
    ] = None,
    filters: DirOption = None,
) -> None:
    """Candlesticks with volume and indicators, and where filters fired.

    Bollinger Bands on the price, then volume, RSI and MACD panes; each --filter marks the bars
    it would have fired on. -o chart.html is interactive (works offline), .png or .svg an image;
    without -o the chart is drawn in the terminal.

    \b
    Examples:
      polystream chart X:BTCUSD --bars bars.csv --filter rsi-oversold -o chart.html
      polystream chart X:ETHUSD --db -t 5m --last 500 -o eth.png
      polystream chart X:BTCUSD --bars bars.csv
    """
    if (bars is None) == (not db):
        raise typer.BadParameter("give exactly one of --bars and --db", param_hint="--bars")
    if bars is not None and timeframe is not None:
        raise typer.BadParameter(
            "--timeframe goes with --db; a bar file has its own timeframe",
            param_hint="--timeframe",
        )
    chart.output_kind(output)  # a bad suffix is reported before anything is read
    count = last or (DB_BARS if db else None)
    settings = load_settings()
    label = normalize(symbol)
    directory = filters or settings.filters_dir
    chosen = [read_filter(_locate(name, [directory])) for name in filter_ or []]
    if bars is not None:
        frame = chart.file_bars(bars, label)
    else:
        tf = parse_timeframe(timeframe or "1m")
        frame = chart.stored_bars(database_url(settings), label, tf, count or DB_BARS)
    alerts = chart.filter_alerts(chosen, frame, label)
    shown = frame if count is None else frame.tail(count)
    marked = chart.visible_alerts(shown, alerts, label)
    title = chart.title_for(shown, label)
    chart.write_chart(shown, output, symbol=label, title=title, alerts=marked)
    if output is not None:
        drawn = "1 alert" if len(marked) == 1 else f"{len(marked):,} alerts"
        display.note(f"wrote chart of {shown.height:,} bars and {drawn} to {output}")
