"""`polystream filter …`: thin typer commands over `polystream.filters` (add, list, show,
remove, validate, test). Nothing is written unless the filter is valid.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, NamedTuple

import polars as pl
import typer

from . import display
from .config import TIMEFRAMES, load_settings, parse_timeframe, timeframe_name
from .errors import ConfigError, PolystreamError, UsageError
from .filters import (
    Filter,
    FilterError,
    add_filter,
    filter_files,
    filter_from_options,
    find_filter,
    load_directory,
    read_filter,
    read_last_fired,
    run_on_bars,
    shipped_dir,
)
from .schema import Alert

filter_app = typer.Typer(
    help="Manage filter files; `test` shows when a filter would have fired on history.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

DirOption = Annotated[
    Path | None,
    typer.Option(
        "--filters", help="Filters directory [default: ./filters]. [env: POLYSTREAM_FILTERS_DIR]"
    ),
]


def _dir(filters: Path | None) -> Path:
    return filters or load_settings().filters_dir


def _locate(target: str, directories: list[Path], *, files: bool = True) -> Path:
    """A filter given as a file path (when `files`), or by name: the file that holds it in the
    first of `directories` that has it, else among the shipped filters."""
    path = Path(target)
    if files and path.is_file():
        return path
    for where in [*directories, shipped_dir()]:
        try:
            return find_filter(where, target)
        except ConfigError:
            continue
    places = " or ".join([*map(str, directories), "the shipped filters"])
    kind = "neither a filter file nor the name of a filter" if files else "not the name of a filter"
    raise ConfigError(
        f"{target!r} is {kind} in {places} (polystream filter list --shipped lists those)."
    )


@filter_app.command("add")
def add(
    file: Annotated[
        str | None,
        typer.Argument(help="A filter file, or the name of a shipped filter, to copy in."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name of a new filter.")] = None,
    when: Annotated[str | None, typer.Option(help="Its condition, e.g. 'rsi(14) < 30'.")] = None,
    on: Annotated[str, typer.Option(help="bar, trade or quote.")] = "bar",
    timeframe: Annotated[
        str | None,
        typer.Option(
            "--timeframe",
            "-t",
            help=f"Bar timeframe: {' '.join(TIMEFRAMES)} [default: the run's first].",
        ),
    ] = None,
    symbols: Annotated[
        str | None, typer.Option(help="Comma-separated symbols [default: every one].")
    ] = None,
    cooldown: Annotated[str | None, typer.Option(help="Quiet time per symbol, e.g. 5m.")] = None,
    trigger: Annotated[str, typer.Option(help="edge (becomes true) or level (is true).")] = "edge",
    severity: Annotated[str, typer.Option(help="info, warning or critical.")] = "warning",
    message: Annotated[
        str | None, typer.Option(help="Message template, e.g. '{symbol} RSI {rsi_14:.1f}'.")
    ] = None,
    description: Annotated[str | None, typer.Option(help="What the filter is for.")] = None,
    notify: Annotated[str, typer.Option(help="Comma-separated: console, telegram.")] = "console",
    force: Annotated[bool, typer.Option(help="Replace a filter of the same name.")] = False,
    filters: DirOption = None,
) -> None:
    """Validate a filter, then copy it into the filters directory (or write one from options).

    Nothing is written unless the filter is valid; a running watch picks it up within a second.

    \b
    Examples:
      polystream filter add my-filter.yaml
      polystream filter add rsi-oversold            (a shipped filter, by name)
      polystream filter add --name btc-dip --when 'rsi(14) < 25' --symbols X:BTCUSD -t 5m
    """
    directory = _dir(filters)
    if (file is None) == (when is None and name is None):
        raise typer.BadParameter(
            "give either a FILE or --name and --when", param_hint="FILE / --name --when"
        )
    if file is not None:
        path = _locate(file, [])
        f = read_filter(path)
        text = path.read_text(encoding="utf-8")
    else:
        if not name or not when:
            raise typer.BadParameter("--name and --when go together", param_hint="--name/--when")
        try:
            f = filter_from_options(
                name,
                when,
                on=on,
                timeframe=timeframe,
                symbols=[s.strip() for s in (symbols or "").split(",") if s.strip()],
                cooldown=cooldown,
                trigger=trigger,
                severity=severity,
                message=message,
                description=description,
                notify=[n.strip() for n in notify.split(",") if n.strip()],
            )
        except FilterError as exc:
            display.details(exc.details)
            raise ConfigError(
                "The filter given by the options is not valid; nothing was written."
            ) from None
        text = f.to_yaml()
    target = add_filter(directory, f, text, force=force)
    display.note(f"added {f.name} to {target}", "green")


def _seconds(ms: int) -> float | None:
    """A cooldown in seconds (whole ones as integers), None for none."""
    if not ms:
        return None
    return ms // 1000 if ms % 1000 == 0 else ms / 1000


def _filter_record(f: Filter, fired: dict[str, int]) -> dict[str, object]:
    """A valid filter as `--json` shows it: its settings as in the file, with the defaults
    filled in (a bar filter's null timeframe is the run's first; a null cooldown is none)."""
    return {
        "name": f.name,
        "file": f.path,
        "valid": True,
        "description": f.description or None,
        "on": f.on,
        "timeframe": f.timeframe_name,
        "symbols": list(f.symbols),
        "when": f.when,
        "trigger": f.trigger,
        "cooldown": _seconds(f.cooldown),
        "severity": f.severity,
        "message": f.message or None,
        "notify": list(f.notify),
        "attach": f.attach,
        "last_fired": fired.get(f.name),
    }


def _problems(exc: PolystreamError) -> list[dict[str, object]]:
    """Each problem with its 1-based line and column (null for a file that cannot be read)."""
    if isinstance(exc, FilterError) and exc.problems:
        return [{"line": p.line, "column": p.column, "message": p.message} for p in exc.problems]
    return [{"line": None, "column": None, "message": str(exc)}]


def _invalid_record(exc: PolystreamError) -> dict[str, object]:
    """A file that does not load, named by its stem as `filter list` shows it."""
    path = getattr(exc, "path", None)
    return {
        "name": Path(path).stem if path else None,
        "file": path,
        "valid": False,
        "error": str(exc),
        "problems": _problems(exc),
    }


def _last(name: str, fired: dict[str, int]) -> str:
    t = fired.get(name)
    return "never" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t / 1000))


@filter_app.command("list")
def list_(
    shipped: Annotated[
        bool, typer.Option(help="List the filters that ship with polystream.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object per filter file on stdout.")
    ] = False,
    filters: DirOption = None,
) -> None:
    """The filters: name, on, timeframe, symbols, condition, last fired.

    \b
    Examples:
      polystream filter list
      polystream filter list --shipped
      polystream filter list --json | jq -r .name
    """
    directory = shipped_dir() if shipped else _dir(filters)
    loaded = load_directory(directory)
    fired = {} if shipped else read_last_fired(load_settings().state_dir)
    if json_out:
        display.json_lines(
            [
                *(_filter_record(f, fired) for f in loaded.filters.values()),
                *map(_invalid_record, loaded.errors),
            ]
        )
        if not loaded.filters and not loaded.errors:
            display.note(f"no filters in {directory}; add one with polystream filter add")
        return
    rows: list[tuple[str, str, str, str, str, str]] = [
        (
            f.name,
            f.on,
            f.timeframe_name or ("-" if f.on != "bar" else "run's first"),
            ", ".join(f.symbols) or "*",
            f.when,
            _last(f.name, fired),
        )
        for f in loaded.filters.values()
    ]
    for err in loaded.errors:
        path = getattr(err, "path", "?")
        rows.append((Path(path).stem, "invalid", "", "", str(err), ""))
    title = f"{len(loaded.filters)} filters in {directory}"
    if not rows:
        display.note(f"no filters in {directory}; add one with polystream filter add")
        return
    display.filter_table(rows, title)


@filter_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="The filter's name (or a shipped filter's).")],
    json_out: Annotated[
        bool, typer.Option("--json", help="The filter as one JSON object on stdout.")
    ] = False,
    filters: DirOption = None,
) -> None:
    """Print a filter's file.

    \b
    Examples:
      polystream filter show rsi-oversold
      polystream filter show rsi-oversold --json
    """
    path = _locate(name, [_dir(filters)], files=False)
    if not json_out:
        display.show_file(str(path), path.read_text(encoding="utf-8"))
        return
    try:
        record = _filter_record(read_filter(path), read_last_fired(load_settings().state_dir))
    except PolystreamError as exc:
        record = _invalid_record(exc)
    display.json_lines([record])


@filter_app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="The filter's name.")],
    filters: DirOption = None,
) -> None:
    """Delete a filter's file from the filters directory (a running watch drops it).

    \b
    Example:
      polystream filter remove btc-dip
    """
    path = find_filter(_dir(filters), name)
    path.unlink()
    display.note(f"removed {name} ({path})", "green")


class _Checked(NamedTuple):
    """One file as `validate` found it: its filter's name, if it has one, and what is wrong."""

    path: Path
    name: str | None
    error: PolystreamError | None = None
    clash: Path | None = None  # an earlier file whose filter has the same name

    @property
    def valid(self) -> bool:
        return self.error is None and self.clash is None


def _check(files: Iterable[Path]) -> Iterable[_Checked]:
    """Each file in turn; a filter whose name an earlier file took is not valid, as `watch`
    would refuse it."""
    names: dict[str, Path] = {}
    for path in files:
        try:
            f = read_filter(path)
        except PolystreamError as exc:
            yield _Checked(path, None, error=exc)
            continue
        yield _Checked(path, f.name, clash=names.get(f.name))
        names.setdefault(f.name, path)


def _checked_record(c: _Checked) -> dict[str, object]:
    """`validate --json`: the file, whether it is valid, its filter's name and its problems."""
    problems = _problems(c.error) if c.error is not None else []
    if c.clash is not None:
        message = f"the name {c.name!r} is already used by {c.clash}"
        problems.append({"line": None, "column": None, "message": message})
    name = {} if c.name is None else {"name": c.name}
    return {"file": str(c.path), "valid": c.valid, **name, "problems": problems}


@filter_app.command("validate")
def validate(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Files or directories [default: the filters dir].")
    ] = None,
    json_out: Annotated[
        bool,
        typer.Option("--json", help="One JSON object per file on stdout, with its problems."),
    ] = False,
    filters: DirOption = None,
) -> None:
    """Check filter files and report every problem; exit 1 if any file is not valid.

    \b
    Examples:
      polystream filter validate
      polystream filter validate my-filter.yaml other-dir/
      polystream filter validate --json
    """
    targets = paths or [_dir(filters)]
    files: list[Path] = []
    for target in targets:
        if target.is_dir():
            files += filter_files(target)
        elif target.is_file():
            files.append(target)
        else:
            raise ConfigError(f"{target} is neither a filter file nor a directory.")
    checked = list(_check(files))
    if json_out:
        display.json_lines(map(_checked_record, checked))
    else:
        for c in checked:
            if c.error is not None:
                display.details(c.error.details or [str(c.error)])
            elif c.clash is not None:
                display.note(f"{c.path}: the name {c.name!r} is already used by {c.clash}", "red")
            else:
                display.note(f"ok {c.path} ({c.name})", "green")
    bad = sum(not c.valid for c in checked)
    if not files:
        display.note(f"no filter files in {', '.join(map(str, targets))}")
    if bad:
        raise ConfigError(f"{bad} of {len(files)} filter files are not valid.")


@filter_app.command("test")
def test(
    target: Annotated[str, typer.Argument(help="A filter file, or a filter's name.")],
    bars: Annotated[Path | None, typer.Option(help="OHLCV bars (CSV or Parquet).")] = None,
    replay: Annotated[Path | None, typer.Option(help="A recording to replay.")] = None,
    symbol: Annotated[
        str | None,
        typer.Option(
            help="Test only this symbol of a --bars file with a symbol column or of a "
            "recording; for a --bars file without one, the symbol it holds "
            "[default: every symbol; the filter's first for such a file]."
        ),
    ] = None,
    timeframe: Annotated[
        str,
        typer.Option(
            "--timeframe",
            "-t",
            help="With --replay: the bars a filter without its own timeframe runs on "
            f"({' '.join(TIMEFRAMES)}).",
        ),
    ] = "1m",
    json_out: Annotated[bool, typer.Option("--json", help="Alert records as JSON lines.")] = False,
    chart: Annotated[
        Path | None,
        typer.Option(
            metavar="OUT",
            help="Also draw the bars with the alerts marked: .html, .png or .svg (needs "
            "polystream[chart]); with several symbols, --symbol picks the one drawn.",
        ),
    ] = None,
    filters: DirOption = None,
) -> None:
    """When a filter would have fired: on a bar file (bar filters) or a recording (any).

    \b
    Examples:
      polystream filter test rsi-oversold --bars bars.csv
      polystream filter test rsi-oversold --bars bars.csv --chart fired.html
      polystream filter test whale-trade --replay session.rec.gz -t 5m --json
    """
    from .analyze import file_symbols, read_bars
    from .app import replay_filters
    from .symbols import normalize

    if (bars is None) == (replay is None):
        raise typer.BadParameter("give exactly one of --bars and --replay", param_hint="--bars")
    if chart is not None:
        from .chart import output_kind

        output_kind(chart, "--chart")  # a wrong suffix is bad usage, before the test runs
    f = read_filter(_locate(target, [_dir(filters)]))
    if bars is not None:
        if f.on != "bar":
            raise ConfigError(
                f"{f.name} runs on {f.on}s, which a bar file does not have; test it with --replay."
            )
        label = normalize(symbol) if symbol else (f.symbols[0] if f.symbols else "X:BTCUSD")
        frame = read_bars(bars, symbol)
        alerts, records = run_on_bars(f, frame, label)
        summary = f"{f.name} fired {len(alerts)} times on {records.height:,} bars of {bars}"
        held = file_symbols(frame)
        if len(held) > 1:
            counts = ", ".join(f"{s} {sum(a.symbol == s for a in alerts)}" for s in held)
            summary += f" ({counts})"
        ignored = [s for s in held if f.symbols and s not in f.symbols]
        if ignored:
            summary += f"; {f.name} watches only {', '.join(f.symbols)}"
    else:
        assert replay is not None
        watched = [normalize(symbol)] if symbol else (list(f.symbols) or None)
        tf = f.timeframe or parse_timeframe(timeframe)
        alerts, records = replay_filters(replay, [f], watched, timeframe=tf)
        if records.height:
            records = records.filter(pl.col("timeframe") == timeframe_name(tf))
        summary = (
            f"{f.name} fired {len(alerts)} times replaying {replay} "
            f"({records.height:,} {timeframe_name(tf)} bars)"
        )
    if chart is not None:
        _chart(chart, records, alerts, symbol, f)
    if json_out:
        display.json_lines(a.record() for a in alerts)
    elif alerts:
        display.alert_table(alerts, summary)
    if not alerts or json_out:
        display.note(summary)


def _chart(
    out: Path, bars: pl.DataFrame, alerts: Sequence[Alert], symbol: str | None, f: Filter
) -> None:
    """`filter test --chart`: the tested bars of one symbol with the filter's alerts marked."""
    from . import chart
    from .symbols import normalize

    held = list(dict.fromkeys(bars["symbol"])) if "symbol" in bars.columns else []
    if symbol:
        shown = normalize(symbol)
    elif len(held) > 1:
        raise UsageError(
            f"The bars hold {len(held)} symbols ({', '.join(held[:5])}): pick the one to "
            "draw with --symbol."
        )
    else:
        shown = held[0] if held else (f.symbols[0] if f.symbols else "X:BTCUSD")
    title = f"{f.name} on {chart.title_for(bars, shown)}"
    chart.write_chart(bars, out, symbol=shown, title=title, alerts=alerts)
    display.stderr_console.print(f"wrote the chart of {shown} to {out}")
