"""The `polystream` command: thin typer commands over the library. Errors from the library arrive
as `PolystreamError` and leave here as one sentence and an exit code (DESIGN §1).
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import polars as pl
import typer
from typer.exceptions import TyperException

from . import __version__, display
from .cli_filters import filter_app
from .config import (
    DEFAULT_REST_URL,
    Settings,
    check_url,
    load_settings,
    parse_channels,
    parse_duration,
    parse_timeframe,
    timeframe_name,
)
from .errors import ConfigError, PolystreamError
from .filters import FilterWatcher, shipped_dir
from .pipeline import Output, Pipeline, Source
from .record import Recorder, ReplaySource
from .simulator import DemoFeed
from .source import FeedClient, FeedOptions
from .symbols import normalize, to_pair
from .window import BarOptions

if TYPE_CHECKING:
    from .notify import TelegramNotifier
    from .rest import RestClient
    from .store import Store

app = typer.Typer(
    name="polystream",
    help="Streaming analyzer for Polygon.io / Massive crypto market data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_debug = False


def _version(value: bool) -> None:
    if value:
        print(f"polystream {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Verbose logs and tracebacks (secrets stay redacted).")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    global _debug
    _debug = debug


def _settings(**overrides: str | None) -> Settings:
    settings = load_settings(overrides)
    display.setup_logging(settings.redactor(), _debug)
    return settings


def _open_source(
    feed: str,
    settings: Settings,
    pairs: list[str],
    channels: tuple[str, ...],
    speed: float | None,
    seed: int,
    stack: contextlib.ExitStack,
) -> Source:
    if feed == "demo":
        demo = stack.enter_context(DemoFeed(seed=seed))
        return FeedClient(demo.url, "demo", pairs, channels)
    if feed == "polygon" or feed.startswith(("ws://", "wss://")):
        url = settings.ws_url if feed == "polygon" else feed
        check_url("--feed", url, ("ws", "wss"))
        if not settings.api_key:
            raise ConfigError(
                "No API key: set POLYGON_API_KEY (or MASSIVE_API_KEY) in the environment or "
                ".env, or try the built-in feed with `polystream demo`."
            )
        return FeedClient(url, settings.api_key, pairs, channels, options=FeedOptions())
    path = Path(feed)
    if not path.exists():
        raise ConfigError(
            f"--feed {feed!r} is neither polygon, demo, a ws:// or wss:// URL, "
            "nor an existing recording file."
        )
    return ReplaySource(path, speed=speed)


@app.command()
def watch(
    symbols: Annotated[
        list[str], typer.Argument(help="Symbols such as X:BTCUSD, BTC-USD or btcusd.")
    ],
    feed: Annotated[
        str, typer.Option(help="polygon, demo, a ws:// or wss:// URL, or a recording to replay.")
    ] = "polygon",
    timeframe: Annotated[
        list[str], typer.Option("--timeframe", "-t", help="Bar timeframe; repeatable.")
    ] = ["1m"],  # noqa: B006  (typer reads the default; it is never mutated)
    channels: Annotated[str, typer.Option(help="Comma-separated: XT,XQ,XA,XAS,XL2.")] = "XT,XQ",
    bars: Annotated[
        str, typer.Option(help="Bar source: trades, or polygon (the feed's XA/XAS aggregates).")
    ] = "trades",
    lateness: Annotated[
        str, typer.Option(help="How long a bar waits for late trades before it is final.")
    ] = "2s",
    revision_horizon: Annotated[
        str, typer.Option(help="Trades later than lateness but within this revise the bar.")
    ] = "60s",
    no_ui: Annotated[bool, typer.Option("--no-ui", help="No dashboard; plain lines.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines on stdout.")] = False,
    duration: Annotated[
        float | None, typer.Option(help="Stop cleanly after this many seconds.", min=0)
    ] = None,
    record: Annotated[
        Path | None, typer.Option(help="Record every frame to FILE (.gz/.zst compress).")
    ] = None,
    speed: Annotated[
        float | None, typer.Option(help="Replay at N x real time (default: as fast as possible).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the demo feed.")] = 0,
    filters: Annotated[
        Path | None,
        typer.Option(help="Filters directory, watched for changes [default: ./filters]."),
    ] = None,
    store: Annotated[
        bool | None,
        typer.Option(
            "--store/--no-store", help="Store rows in DATABASE_URL [default: on when it is set]."
        ),
    ] = None,
    notify: Annotated[
        bool | None,
        typer.Option(
            "--notify/--no-notify",
            help="Send alerts routed to telegram [default: on when TELEGRAM_BOT_TOKEN and "
            "TELEGRAM_CHAT_ID are set].",
        ),
    ] = None,
    warmup: Annotated[
        bool,
        typer.Option(
            "--warmup/--no-warmup",
            help="Live: seed the indicators with the latest stored bars first.",
        ),
    ] = True,
) -> None:
    """Live feed -> bars, indicators, filters and alerts, dashboard, JSON records, storage,
    Telegram, recordings."""
    settings = _settings()
    filters_dir = filters or settings.filters_dir
    normalized = [normalize(s) for s in dict.fromkeys(symbols)]
    pairs = [to_pair(s) for s in normalized]
    timeframes = tuple(dict.fromkeys(parse_timeframe(tf) for tf in timeframe))
    chans = parse_channels(channels)
    if bars not in ("trades", "polygon"):
        raise ConfigError(f"Unknown bar source {bars!r} for --bars: use trades or polygon.")
    if bars == "polygon":
        needed = {"XA"} if min(timeframes) >= 60_000 else {"XA", "XAS"}
        chans = tuple(dict.fromkeys([*chans, *sorted(needed)]))
    watcher = FilterWatcher(filters_dir)
    _load_filters(watcher)
    # bars for the timeframes the filters name are built too, after the ones asked for
    wanted = {f.timeframe for f in watcher.filters if f.on == "bar" and f.timeframe}
    timeframes += tuple(sorted(wanted - set(timeframes)))
    bar_options = BarOptions(
        timeframes=timeframes,
        lateness=int(parse_duration(lateness, "--lateness") * 1000),
        horizon=int(parse_duration(revision_horizon, "--revision-horizon") * 1000),
    )
    if speed is not None and speed <= 0:
        raise ConfigError(f"Invalid --speed {speed:g}: give a positive multiple of real time.")
    row_sink = _store(settings, store)
    alert_sink = _notifier(settings, notify)
    with contextlib.ExitStack() as stack:
        source = _open_source(feed, settings, pairs, chans, speed, seed, stack)
        outputs: list[Output] = []
        if json_out:
            outputs.append(display.JsonLines())
        outputs.append(display.TextLog() if no_ui else display.Dashboard())
        recorder = Recorder(record) if record is not None else None
        pipeline = Pipeline(
            source,
            normalized,
            outputs,
            bars=bar_options,
            bar_source=bars,
            live=not isinstance(source, ReplaySource),
            recorder=recorder,
            watcher=watcher,
            state_dir=settings.state_dir,
            store=row_sink,
            notifier=alert_sink,
            repair=_repairer(settings, feed, row_sink),
        )
        if warmup and pipeline.live:
            _warm(pipeline, settings, row_sink is not None, feed, normalized, timeframes)
        result = pipeline.run(duration)
    if result.interrupted:
        raise typer.Exit(130)


@app.command()
def demo(
    timeframe: Annotated[
        list[str], typer.Option("--timeframe", "-t", help="Bar timeframe; repeatable.")
    ] = ["1s", "1m"],  # noqa: B006  (typer reads the default; it is never mutated)
    no_ui: Annotated[bool, typer.Option("--no-ui", help="No dashboard; plain lines.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines on stdout.")] = False,
    duration: Annotated[
        float | None, typer.Option(help="Stop cleanly after this many seconds.", min=0)
    ] = None,
    record: Annotated[Path | None, typer.Option(help="Record every frame to FILE.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the demo feed.")] = 0,
    filters: Annotated[
        Path | None,
        typer.Option(help="Filters directory [default: ./filters, else the shipped filters]."),
    ] = None,
    store: Annotated[
        bool, typer.Option("--store/--no-store", help="Store the demo's rows in DATABASE_URL.")
    ] = False,
    notify: Annotated[
        bool, typer.Option("--notify/--no-notify", help="Send its alerts to Telegram.")
    ] = False,
) -> None:
    """`watch X:BTCUSD X:ETHUSD --feed demo -t 1s -t 1m`: the whole pipeline, no key, no network."""
    if filters is None:
        configured = load_settings().filters_dir
        filters = configured if configured.is_dir() else shipped_dir()
    watch(
        ["X:BTCUSD", "X:ETHUSD"],
        feed="demo",
        timeframe=timeframe,
        channels="XT,XQ",
        no_ui=no_ui,
        json_out=json_out,
        duration=duration,
        record=record,
        speed=None,
        seed=seed,
        filters=filters,
        store=store,
        notify=notify,
    )


def _database_url(settings: Settings) -> str:
    if not settings.database_url:
        raise ConfigError(
            "DATABASE_URL is not set: put postgresql://user@host:5432/dbname in the environment "
            "or .env."
        )
    return settings.database_url


def _store(settings: Settings, wanted: bool | None) -> Store | None:
    """The database writer, when storage is asked for or DATABASE_URL is set; a database with
    pending migrations is refused before anything runs."""
    if wanted is False or (wanted is None and not settings.database_url):
        return None
    from .store import Store, require_migrated

    url = _database_url(settings)
    require_migrated(url)
    return Store(url, settings.state_dir)


def _notifier(settings: Settings, wanted: bool | None) -> TelegramNotifier | None:
    """The Telegram notifier, when asked for or configured."""
    ready = bool(settings.telegram_bot_token and settings.telegram_chat_ids)
    if wanted is True and not ready:
        raise ConfigError(
            "--notify needs TELEGRAM_BOT_TOKEN and TELEGRAM_CHAT_ID in the environment or .env."
        )
    if wanted is False or not ready:
        return None
    from .notify import TelegramNotifier

    assert settings.telegram_bot_token is not None
    return TelegramNotifier(
        settings.telegram_bot_token,
        settings.telegram_chat_ids,
        settings.state_dir,
        api_url=settings.telegram_api_url,
    )


def _has_rest(settings: Settings, feed: str) -> bool:
    """Whether this feed comes with a REST API to ask for history: the Polygon feed with a key,
    or another WebSocket feed when POLYGON_REST_URL names its REST server."""
    if not settings.api_key:
        return False
    if feed == "polygon":
        return True
    return feed.startswith(("ws://", "wss://")) and settings.rest_url != DEFAULT_REST_URL


def _repairer(settings: Settings, feed: str, store: Store | None) -> RestClient | None:
    """Gap repair needs the REST API and somewhere the repaired bars go."""
    if store is None or not _has_rest(settings, feed) or settings.api_key is None:
        return None
    from .rest import RestClient

    return RestClient(settings.rest_url, settings.api_key)


# Bars of history per symbol and timeframe: a few times the longest warm-up, so that EMA-based
# indicators have forgotten where the history starts.
WARMUP_BARS = 300


def _warm(
    pipeline: Pipeline,
    settings: Settings,
    stored: bool,
    feed: str,
    symbols: list[str],
    timeframes: tuple[int, ...],
) -> None:
    """Seed the indicators: from the database when storing, else over REST when a live Polygon
    feed has a key; nothing for the demo feed."""
    now = int(time.time() * 1000)
    if stored:
        from .store import recent_bars

        history = recent_bars(_database_url(settings), symbols, timeframes, WARMUP_BARS, now)
    elif _has_rest(settings, feed):
        from . import rest

        # a few quick retries: the run must not wait minutes for history it can do without
        client = rest.RestClient(
            settings.rest_url, str(settings.api_key), max_retries=2, backoff_max=2.0, timeout=10
        )
        pages = []
        try:
            for symbol in symbols:
                for tf in timeframes:
                    end = now // tf * tf
                    for page in client.aggregates(
                        symbol, tf, end - WARMUP_BARS * tf, end, allow_empty=True
                    ):
                        pages.append(rest.bar_records(page, tf))
        except PolystreamError as exc:
            display.note(f"no warm-up over REST ({exc}); the indicators warm up live", "yellow")
            return
        if not pages:
            return
        history = pl.concat(pages)
    else:
        return
    pipeline.warm(history)


def _load_filters(watcher: FilterWatcher) -> None:
    """The first scan of the filters directory: a run does not start with an invalid file."""
    errors = watcher.load()
    if not errors:
        return
    for err in errors:
        display.details(err.details or [str(err)])
    raise ConfigError(
        f"{len(errors)} filter file{'s' if len(errors) > 1 else ''} in {watcher.directory} "
        f"{'are' if len(errors) > 1 else 'is'} not valid; fix or remove "
        f"{'them' if len(errors) > 1 else 'it'} (polystream filter validate shows every problem)."
    )


_OUTPUT_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")


def _when(text: str, option: str) -> int:
    """Epoch ms from a date (`2024-05-29`, midnight UTC) or an ISO date and time (UTC unless
    it names an offset), read as `analyze` reads times."""
    from .analyze import iso_ms

    ms = iso_ms(text.strip())
    if ms is None:
        raise ConfigError(
            f"Invalid date {text!r} for {option}: write it like 2024-05-29 or 2024-05-29T13:30."
        )
    return ms


@app.command()
def backfill(
    symbols: Annotated[list[str], typer.Argument(help="Symbols such as X:BTCUSD.")],
    from_: Annotated[
        str | None,
        typer.Option(
            "--from", help="First day or time (UTC) [default: after the last stored bar]."
        ),
    ] = None,
    to: Annotated[str | None, typer.Option("--to", help="End, exclusive [default: now].")] = None,
    timeframe: Annotated[str, typer.Option("--timeframe", "-t", help="Bar timeframe.")] = "1m",
    trades: Annotated[bool, typer.Option(help="Also fetch every trade (database only).")] = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the bars to CSV or Parquet instead."),
    ] = None,
    per_minute: Annotated[
        int, typer.Option(help="REST requests per minute (5 on the free plan; 0: no limit).", min=0)
    ] = 5,
) -> None:
    """History over REST: aggregates (and trades) into the database, or bars into a file."""
    from . import rest
    from .analyze import SUFFIXES, write_output

    settings = _settings()
    if not settings.api_key:
        raise ConfigError(
            "No API key: set POLYGON_API_KEY (or MASSIVE_API_KEY) in the environment or .env."
        )
    normalized = [normalize(s) for s in dict.fromkeys(symbols)]
    tf = parse_timeframe(timeframe)
    end = _when(to, "--to") if to else int(time.time() * 1000)
    if output is None and not settings.database_url:
        raise ConfigError("Nowhere to put the history: set DATABASE_URL, or give --output FILE.")
    if output is not None and trades:
        raise ConfigError("--trades needs the database: a file holds bars only.")
    if output is not None and not output.name.lower().endswith(_OUTPUT_SUFFIXES):
        raise ConfigError(f"Cannot write {output}: give it one of the suffixes {SUFFIXES}.")
    starts: dict[str, int] = {}
    if from_ is not None and _when(from_, "--from") >= end:
        raise ConfigError(f"--from {from_} is not before --to {to or 'now'}: swap them.")
    for symbol in normalized:
        if from_ is not None:
            starts[symbol] = _when(from_, "--from")
        elif output is None and settings.database_url is not None:
            from .store import last_bar_start, require_migrated

            require_migrated(settings.database_url)
            last = last_bar_start(settings.database_url, symbol, timeframe_name(tf))
            if last is None:
                raise ConfigError(
                    f"No {timeframe_name(tf)} bars of {symbol} are stored yet: give --from."
                )
            starts[symbol] = last + tf
        else:
            raise ConfigError("--from is needed when writing to a file.")
    client = rest.RestClient(settings.rest_url, settings.api_key, per_minute=per_minute)
    collected: list[pl.DataFrame] = []
    writer = None
    if output is None:
        assert settings.database_url is not None
        from .store import Store, require_migrated

        require_migrated(settings.database_url)
        writer = Store(settings.database_url, settings.state_dir).start()

    def sink(table: str, frame: pl.DataFrame) -> None:
        if writer is not None:
            writer.offer(table, frame)
        elif table == "bars":
            collected.append(frame)

    rows: dict[str, int] = {}
    try:
        with display.BackfillProgress(normalized, min(starts.values()), end) as progress:
            for symbol in normalized:
                if starts[symbol] >= end:
                    rows[symbol] = 0
                    continue
                rows.update(
                    rest.backfill(
                        client,
                        [symbol],
                        starts[symbol],
                        end,
                        timeframe_ms=tf,
                        trades=trades,
                        sink=sink,
                        on_page=progress,
                    )
                )
    finally:
        if writer is not None:
            writer.stop(60.0)
    if writer is not None:
        if writer.fatal is not None:
            raise writer.fatal
        stats = writer.stats
        display.note(
            f"fetched {sum(rows.values()):,} rows; {stats.rows_written:,} new rows stored"
            + (
                f", {stats.journal_files} batches waiting in the journal"
                if stats.journal_files
                else ""
            ),
            "green",
        )
    else:
        bars = (
            pl.concat(collected).sort("start")
            if collected
            else pl.DataFrame(schema=rest.BAR_RECORD_SCHEMA)
        )
        write_output(
            bars.select(pl.col("start").alias("time"), "open", "high", "low", "close", "volume"),
            output,  # type: ignore[arg-type]
        )
        display.note(f"wrote {bars.height:,} bars to {output}", "green")


@app.command()
def migrate(
    list_: Annotated[
        bool, typer.Option("--list", help="Show the applied and the pending migrations.")
    ] = False,
    rollback: Annotated[
        bool, typer.Option("--rollback", help="Undo the last applied migration.")
    ] = False,
) -> None:
    """Apply the SQL migrations to DATABASE_URL (or list them, or undo the last one)."""
    from . import store as storage

    if list_ and rollback:
        raise typer.BadParameter("give --list or --rollback, not both", param_hint="--list")
    url = _database_url(_settings())
    if list_:
        display.migration_table(storage.migration_status(url))
    elif rollback:
        undone = storage.rollback(url)
        display.note(f"rolled back {undone}" if undone else "no migration to roll back")
    else:
        applied = storage.migrate(url)
        if applied:
            display.note(f"applied {len(applied)} migrations: {', '.join(applied)}", "green")
        else:
            display.note("the database is up to date")


@app.command()
def analyze(
    file: Annotated[Path, typer.Argument(help="OHLCV bars: CSV or Parquet.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write CSV or Parquet (by suffix).")
    ] = None,
) -> None:
    """Offline: OHLCV bars from a file -> the same indicator columns as `watch`."""
    from . import analyze as offline

    _settings()
    frame = offline.analyze(file)
    if output is None:
        display.print_frame(frame, title=str(file))
    else:
        offline.write_output(frame, output)
        display.stderr_console.print(f"wrote {frame.height:,} bars to {output}")


@app.command()
def simulate(
    port: Annotated[
        int, typer.Option(help="TCP port (0 picks a free one).", min=0, max=65535)
    ] = 8765,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    seed: Annotated[int, typer.Option(help="Seed of the random walks.")] = 0,
    bar_seconds: Annotated[
        float, typer.Option(help="Wall seconds per replayed BTC minute bar.", min=0.001)
    ] = 1.0,
    api_key: Annotated[
        str | None, typer.Option(help="Accept only this key (default: any non-empty key).")
    ] = None,
    auth_failed: Annotated[bool, typer.Option(help="Fault: refuse every key.")] = False,
    malformed_every: Annotated[
        int, typer.Option(help="Fault: every Nth data frame is malformed.", min=0)
    ] = 0,
    drop_every: Annotated[
        float | None, typer.Option(help="Fault: drop every connection every S seconds.", min=0.1)
    ] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
) -> None:
    """Serve the built-in Polygon-protocol feed on loopback until Ctrl-C."""
    _settings()
    feed = DemoFeed(
        host,
        port,
        seed=seed,
        bar_seconds=bar_seconds,
        api_key=api_key,
        auth_failed=auth_failed,
        malformed_every=malformed_every,
    )
    with feed:
        display.stderr_console.print(f"serving {feed.url} (Ctrl-C to stop)")
        started = time.monotonic()
        next_drop = None if drop_every is None else started + drop_every
        try:
            while duration is None or time.monotonic() - started < duration:
                time.sleep(0.1)
                if next_drop is not None and time.monotonic() >= next_drop:
                    feed.drop_connections()
                    next_drop += drop_every or 0
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


app.add_typer(filter_app, name="filter")


def main() -> None:
    """Entry point: runs the app and maps every failure to the exit-code contract."""
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except TyperException as exc:
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            display.error(exc.format_message())
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except PolystreamError as exc:
        if _debug:
            traceback.print_exc()
        display.details(exc.details)
        display.error(str(exc))
        code = exc.exit_code
    sys.exit(code if isinstance(code, int) else 0)
