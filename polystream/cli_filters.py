"""`polystream filter …`: thin typer commands over `polystream.filters` (add, list, show,
remove, validate, test). Nothing is written unless the filter is valid.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from . import display
from .config import TIMEFRAMES, load_settings, parse_timeframe, timeframe_name
from .errors import ConfigError, PolystreamError
from .filters import (
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

filter_app = typer.Typer(
    help="Manage filter files; `test` shows when a filter would have fired on history.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

DirOption = Annotated[
    Path | None, typer.Option("--filters", help="Filters directory [default: ./filters].")
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
        str | None, typer.Option(help="Bar timeframe [default: the run's first].")
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
    """Validate a filter, then copy it into the filters directory (or write one from options)."""
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


def _last(name: str, fired: dict[str, int]) -> str:
    t = fired.get(name)
    return "never" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t / 1000))


@filter_app.command("list")
def list_(
    shipped: Annotated[
        bool, typer.Option(help="List the filters that ship with polystream.")
    ] = False,
    filters: DirOption = None,
) -> None:
    """A table of the filters: name, on, timeframe, symbols, condition, last fired."""
    directory = shipped_dir() if shipped else _dir(filters)
    loaded = load_directory(directory)
    fired = {} if shipped else read_last_fired(load_settings().state_dir)
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
    filters: DirOption = None,
) -> None:
    """Print a filter's file."""
    path = _locate(name, [_dir(filters)], files=False)
    display.show_file(str(path), path.read_text(encoding="utf-8"))


@filter_app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="The filter's name.")],
    filters: DirOption = None,
) -> None:
    """Delete a filter's file from the filters directory (a running watch drops it)."""
    path = find_filter(_dir(filters), name)
    path.unlink()
    display.note(f"removed {name} ({path})", "green")


@filter_app.command("validate")
def validate(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Files or directories [default: the filters dir].")
    ] = None,
    filters: DirOption = None,
) -> None:
    """Check filter files and report every problem; exit 1 if any file is not valid."""
    targets = paths or [_dir(filters)]
    files: list[Path] = []
    for target in targets:
        if target.is_dir():
            files += filter_files(target)
        elif target.is_file():
            files.append(target)
        else:
            raise ConfigError(f"{target} is neither a filter file nor a directory.")
    bad = 0
    names: dict[str, Path] = {}
    for path in files:
        try:
            f = read_filter(path)
        except PolystreamError as exc:
            bad += 1
            display.details(exc.details or [str(exc)])
            continue
        if f.name in names:
            bad += 1
            display.note(f"{path}: the name {f.name!r} is already used by {names[f.name]}", "red")
            continue
        names[f.name] = path
        display.note(f"ok {path} ({f.name})", "green")
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
    filters: DirOption = None,
) -> None:
    """When a filter would have fired: on a bar file (bar filters) or a recording (any)."""
    from .analyze import file_symbols, read_bars
    from .app import replay_filters
    from .symbols import normalize

    if (bars is None) == (replay is None):
        raise typer.BadParameter("give exactly one of --bars and --replay", param_hint="--bars")
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
        alerts, final = replay_filters(replay, [f], watched, timeframe=tf)
        summary = (
            f"{f.name} fired {len(alerts)} times replaying {replay} "
            f"({final:,} {timeframe_name(tf)} bars)"
        )
    if json_out:
        out = display.JsonLines()
        for a in alerts:
            out.record(a.record())
    elif alerts:
        display.alert_table(alerts, summary)
    if not alerts or json_out:
        display.note(summary)
