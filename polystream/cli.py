"""The `polystream` command: thin typer commands over the library. Errors from the library arrive
as `PolystreamError` and leave here as one sentence and an exit code (DESIGN §1).
"""

from __future__ import annotations

import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main
from typer.core import TyperArgument
from typer.exceptions import TyperException

from . import __version__, display
from .app import RunOptions, database_url
from .app import backfill as app_backfill
from .app import ingest as app_ingest
from .app import run as app_run
from .cli_chart import chart_command
from .cli_filters import filter_app
from .config import (
    TIMEFRAMES,
    Settings,
    load_settings,
    parse_channels,
    parse_duration,
    parse_shard,
    parse_timeframe,
)
from .errors import PolystreamError, UsageError
from .filters import shipped_dir
from .schema import Notice
from .simulator import DemoFeed

# -h as well as --help, and help as wide as the terminal up to 120 columns, on every command
HELP_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 120}

app = typer.Typer(
    name="polystream",
    help="Streaming analyzer for Polygon.io / Massive crypto market data.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=HELP_SETTINGS,
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


# Options `watch` and `demo` share, declared once.
TimeframeOption = Annotated[
    list[str],
    typer.Option("--timeframe", "-t", help=f"Bar timeframe, repeatable: {' '.join(TIMEFRAMES)}."),
]
NoUiOption = Annotated[bool, typer.Option("--no-ui", help="No dashboard; plain lines.")]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON lines on stdout.")]
DurationOption = Annotated[
    float | None, typer.Option(help="Stop cleanly after this many seconds.", min=0)
]
RecordOption = Annotated[
    Path | None, typer.Option(help="Record every frame to FILE (.gz/.zst compress).")
]
SeedOption = Annotated[int, typer.Option(help="Seed of the demo feed.")]
MetricsOption = Annotated[
    str | None,
    typer.Option(
        "--metrics",
        metavar="[HOST:]PORT",
        help="Serve Prometheus metrics on /metrics and health on /healthz (host 127.0.0.1 "
        "unless given; port 0 picks a free one).",
    ),
]
WatchdogOption = Annotated[
    str,
    typer.Option(
        help="Reconnect, and count the feed as down (health, Telegram), after this long "
        "without data."
    ),
]
ServeOption = Annotated[
    str | None,
    typer.Option(
        "--serve",
        metavar="[HOST:]PORT",
        help="Serve the records over WebSocket (host 127.0.0.1 unless given; port 0 picks a "
        "free one); clients send the token of POLYSTREAM_SERVE_TOKEN when it is set.",
    ),
]
UtcOption = Annotated[
    bool, typer.Option("--utc", help="Show times in UTC [default: local time, zone shown].")
]

# Flags for settings, each beating its variable (not typer's envvar=, which would let the
# environment beat .env the wrong way round): they feed `load_settings`, keyed by variable.
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="API key; the environment or .env is safer, as a flag shows in ps. "
        "[env: POLYGON_API_KEY]",
    ),
]
WsUrlOption = Annotated[
    str | None,
    typer.Option("--ws-url", help="WebSocket feed of --feed polygon. [env: POLYGON_WS_URL]"),
]
RestUrlOption = Annotated[
    str | None,
    typer.Option(
        "--rest-url",
        help="REST API, for backfill, warm-up and gap repair. [env: POLYGON_REST_URL]",
    ),
]
DatabaseUrlOption = Annotated[
    str | None,
    typer.Option("--database-url", help="PostgreSQL / TimescaleDB. [env: DATABASE_URL]"),
]


def _run(options: RunOptions, **overrides: str | None) -> None:
    """Run, and make a run stopped by a signal exit 128 + its number (130 for Ctrl-C)."""
    settings = _settings(**overrides)
    result = app_run(options, settings)
    if result.interrupted:
        raise typer.Exit(128 + (result.signal or signal.SIGINT))


@app.command()
def watch(
    symbols: Annotated[
        list[str] | None,
        typer.Argument(
            help="Symbols such as X:BTCUSD, BTC-USD or btcusd (with --from: the ones to show).",
            show_default=False,
        ),
    ] = None,
    feed: Annotated[
        str, typer.Option(help="polygon, demo, a ws:// or wss:// URL, or a recording to replay.")
    ] = "polygon",
    timeframe: TimeframeOption = ["1m"],  # noqa: B006  (typer reads the default; never mutated)
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
    no_ui: NoUiOption = False,
    json_out: JsonOption = False,
    duration: DurationOption = None,
    record: RecordOption = None,
    speed: Annotated[
        float | None, typer.Option(help="Replay at N x real time (default: as fast as possible).")
    ] = None,
    seed: SeedOption = 0,
    filters: Annotated[
        Path | None,
        typer.Option(
            help="Filters directory, watched for changes [default: ./filters]. "
            "[env: POLYSTREAM_FILTERS_DIR]"
        ),
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
    utc: UtcOption = False,
    serve: ServeOption = None,
    metrics: MetricsOption = None,
    watchdog: WatchdogOption = "30s",
    from_bus: Annotated[
        str | None,
        typer.Option(
            "--from",
            metavar="NATS_URL",
            help="Take the market data from the run `polystream ingest` publishes on NATS "
            "JetStream instead of the feed; with --shard, compute and publish a share of it, "
            "without, show what the shards publish.",
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            metavar="K/N",
            help="With --from: be shard K of N, owning the partitions p with p % N == K.",
        ),
    ] = None,
    api_key: ApiKeyOption = None,
    ws_url: WsUrlOption = None,
    rest_url: RestUrlOption = None,
    db_url: DatabaseUrlOption = None,
) -> None:
    """Live market data -> bars, indicators, filters and alerts.

    Shows a dashboard, or plain lines (--no-ui), or JSON records (--json); stores rows
    (--store), sends alerts to Telegram (--notify) and records frames (--record). --feed takes
    the Polygon feed, the demo feed, a ws:// URL or a recording to replay.

    \b
    Examples:
      polystream watch X:BTCUSD ETH-USD -t 1m -t 5m
      polystream watch X:BTCUSD --json --no-ui > records.jsonl
      polystream watch X:BTCUSD --store --record today.rec.zst
      polystream watch X:BTCUSD --feed today.rec.zst --speed 10
    """
    if bars not in ("trades", "polygon"):
        raise UsageError(f"Unknown bar source {bars!r} for --bars: use trades or polygon.")
    if shard is not None and from_bus is None:
        raise UsageError("--shard goes with --from, the NATS server the run is published on.")
    if from_bus is not None and shard is None:
        from .viewer import view_results

        if metrics is not None:
            raise UsageError(
                "--metrics serves a run that computes: give --shard K/N with --from, or a feed."
            )
        _settings()
        code = view_results(
            from_bus,
            symbols or (),
            ui="lines" if no_ui else "dashboard",
            json=json_out,
            duration=duration,
            utc=utc,
        )
        raise typer.Exit(code)
    if not symbols and from_bus is None:
        raise UsageError("Give at least one symbol, such as X:BTCUSD.")
    _run(
        RunOptions(
            tuple(symbols or ()),
            feed=feed,
            timeframes=tuple(parse_timeframe(tf) for tf in timeframe),
            channels=parse_channels(channels),
            bars="polygon" if bars == "polygon" else "trades",
            lateness=int(parse_duration(lateness, "--lateness") * 1000),
            horizon=int(parse_duration(revision_horizon, "--revision-horizon") * 1000),
            ui="lines" if no_ui else "dashboard",
            json=json_out,
            duration=duration,
            record=record,
            speed=speed,
            seed=seed,
            filters_dir=filters,
            store=store,
            notify=notify,
            warmup=warmup,
            utc=utc,
            serve=serve,
            metrics=metrics,
            watchdog=parse_duration(watchdog, "--watchdog"),
            bus=from_bus,
            shard=parse_shard(shard) if shard else (0, 1),
        ),
        POLYGON_API_KEY=api_key,
        POLYGON_WS_URL=ws_url,
        POLYGON_REST_URL=rest_url,
        DATABASE_URL=db_url,
    )


@app.command()
def demo(
    timeframe: TimeframeOption = ["1s", "1m"],  # noqa: B006  (typer reads the default)
    no_ui: NoUiOption = False,
    json_out: JsonOption = False,
    duration: DurationOption = None,
    record: RecordOption = None,
    seed: SeedOption = 0,
    filters: Annotated[
        Path | None,
        typer.Option(
            help="Filters directory [default: ./filters, else the shipped filters]. "
            "[env: POLYSTREAM_FILTERS_DIR]"
        ),
    ] = None,
    store: Annotated[
        bool, typer.Option("--store/--no-store", help="Store the demo's rows in DATABASE_URL.")
    ] = False,
    notify: Annotated[
        bool, typer.Option("--notify/--no-notify", help="Send its alerts to Telegram.")
    ] = False,
    utc: UtcOption = False,
    serve: ServeOption = None,
    metrics: MetricsOption = None,
    db_url: DatabaseUrlOption = None,
) -> None:
    """The whole pipeline on the built-in demo feed: no key, no network.

    The same as `watch X:BTCUSD X:ETHUSD --feed demo -t 1s -t 1m`, with the filters of ./filters
    or, when there is none, the shipped ones. Ctrl-C stops it.

    \b
    Examples:
      polystream demo
      polystream demo --no-ui --duration 30
      polystream demo --json --no-ui | jq 'select(.type == "alert")'
    """
    if filters is None:
        configured = load_settings().filters_dir
        filters = configured if configured.is_dir() else shipped_dir()
    watch(
        ["X:BTCUSD", "X:ETHUSD"],
        feed="demo",
        timeframe=timeframe,
        no_ui=no_ui,
        json_out=json_out,
        duration=duration,
        record=record,
        seed=seed,
        filters=filters,
        store=store,
        notify=notify,
        utc=utc,
        serve=serve,
        metrics=metrics,
        db_url=db_url,
    )


def _when(text: str, option: str) -> int:
    """Epoch ms from a date (`2024-05-29`, midnight UTC) or an ISO date and time (UTC unless
    it names an offset), read as `analyze` reads times."""
    from .analyze import iso_ms

    ms = iso_ms(text.strip())
    if ms is None:
        raise UsageError(
            f"Invalid date {text!r} for {option}: write it like 2024-05-29 or 2024-05-29T13:30."
        )
    return ms


@app.command()
def ingest(
    publish: Annotated[
        str,
        typer.Option(
            metavar="NATS_URL",
            help="The NATS server with JetStream to publish to, e.g. nats://127.0.0.1:4222.",
        ),
    ],
    symbols: Annotated[
        list[str] | None,
        typer.Argument(help="Symbols such as X:BTCUSD.", show_default=False),
    ] = None,
    feed: Annotated[
        str, typer.Option(help="polygon, demo, a ws:// or wss:// URL, or a recording to replay.")
    ] = "polygon",
    channels: Annotated[str, typer.Option(help="Comma-separated: XT,XQ,XA,XAS,XL2.")] = "XT,XQ",
    partitions: Annotated[
        int, typer.Option(help="Symbol partitions; shards split them among themselves.", min=1)
    ] = 16,
    replicas: Annotated[
        int, typer.Option(help="Servers of a cluster that keep each stream (1, 3 or 5).", min=1)
    ] = 1,
    duration: DurationOption = None,
    speed: Annotated[
        float | None, typer.Option(help="Replay at N x real time (default: as fast as possible).")
    ] = None,
    seed: SeedOption = 0,
    reset: Annotated[
        bool, typer.Option(help="Empty the market-data and results streams first.")
    ] = False,
    every: Annotated[
        bool, typer.Option("--all", help="Every symbol of the feed instead of SYMBOL...")
    ] = False,
    api_key: ApiKeyOption = None,
    ws_url: WsUrlOption = None,
) -> None:
    """Hold the feed and publish it to NATS JetStream for shards (`watch --from`).

    The market data is decoded once and published in batches split by symbol partition, with
    the clock every shard needs for its bars to equal one process's. A recording is cut into
    the same batches on every run, so ingesting it again stores nothing twice.

    \b
    Examples:
      polystream ingest X:BTCUSD X:ETHUSD --publish nats://127.0.0.1:4222
      polystream ingest --all --partitions 64 --publish nats://127.0.0.1:4222
      polystream ingest X:BTCUSD --feed today.rec.zst --publish nats://127.0.0.1:4222 --reset
      polystream watch --from nats://127.0.0.1:4222 --shard 0/2 --no-ui
    """
    if bool(symbols) == every:
        raise UsageError("Give the symbols to ingest, or --all for every symbol of the feed.")
    settings = _settings(POLYGON_API_KEY=api_key, POLYGON_WS_URL=ws_url)
    options = RunOptions(
        tuple(symbols or ()),
        feed=feed,
        channels=parse_channels(channels),
        duration=duration,
        speed=speed,
        seed=seed,
    )
    stats, stopped = app_ingest(
        options,
        settings,
        publish,
        partitions=partitions,
        replicas=replicas,
        reset=reset,
        say=lambda n: display.stderr_console.print(
            f"{n.event} {n.detail}".strip(), highlight=False, markup=False
        ),
    )
    skipped = f", {stats.skipped:,} held already" if stats.skipped else ""
    display.note(
        f"published {stats.events:,} events of {stats.frames:,} frames in {stats.batches:,} "
        f"batches ({stats.messages:,} messages, {stats.bytes / 1e6:,.1f} MB){skipped}",
        "green",
    )
    if stopped is not None:
        raise typer.Exit(128 + stopped)


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
    api_key: ApiKeyOption = None,
    rest_url: RestUrlOption = None,
    db_url: DatabaseUrlOption = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="A JSON summary per symbol on stdout; no progress bars.")
    ] = False,
) -> None:
    """History over REST: aggregates (and trades) into the database, or bars into a file.

    Without --from it resumes after the last stored bar. Ctrl-C keeps what was fetched and
    exits 130.

    \b
    Examples:
      polystream backfill X:BTCUSD X:ETHUSD --from 2024-05-01 --to 2024-05-29
      polystream backfill X:BTCUSD --from 2024-05-01 -t 5m -o btc-5m.csv
      polystream backfill X:BTCUSD --trades --per-minute 0
    """
    result = app_backfill(
        _settings(POLYGON_API_KEY=api_key, POLYGON_REST_URL=rest_url, DATABASE_URL=db_url),
        symbols,
        start_ms=_when(from_, "--from") if from_ else None,
        end_ms=_when(to, "--to") if to else int(time.time() * 1000),
        timeframe_ms=parse_timeframe(timeframe),
        trades=trades,
        output=output,
        per_minute=per_minute,
        json=json_out,
    )
    if json_out:
        display.json_lines(s.record() for s in result.symbols)
    display.note(result.summary, "yellow" if result.interrupted else "green")
    if result.interrupted:
        raise typer.Exit(128 + signal.SIGINT)


@app.command()
def migrate(
    list_: Annotated[
        bool, typer.Option("--list", help="Show the applied and the pending migrations.")
    ] = False,
    rollback: Annotated[
        bool, typer.Option("--rollback", help="Undo the last applied migration.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="With --list: one JSON object per migration on stdout.")
    ] = False,
    db_url: DatabaseUrlOption = None,
) -> None:
    """Apply the SQL migrations to DATABASE_URL (or list them, or undo the last one).

    \b
    Examples:
      polystream migrate
      polystream migrate --list --json
      polystream migrate --rollback --database-url postgresql://localhost/polystream
    """
    from . import store as storage

    if list_ and rollback:
        raise typer.BadParameter("give --list or --rollback, not both", param_hint="--list")
    if json_out and not list_:
        raise UsageError("--json goes with --list, the one form of migrate that prints data.")
    url = database_url(_settings(DATABASE_URL=db_url))
    if list_:
        status = storage.migration_status(url)
        if json_out:
            display.json_lines({"id": name, "applied": applied} for name, applied in status)
        else:
            display.migration_table(status)
    elif rollback:
        undone = storage.rollback(url)
        display.note(f"rolled back {undone}" if undone else "no migration to roll back")
    else:
        applied = storage.migrate(url)
        if applied:
            display.note(f"applied {len(applied)} migrations: {', '.join(applied)}", "green")
        else:
            display.note("the database is up to date")


FromOption = Annotated[
    str,
    typer.Option(
        "--from",
        metavar="NATS_URL",
        help="The NATS server with JetStream that ingest and the shards publish to.",
    ),
]


def _status_line(notice: Notice) -> None:
    display.stderr_console.print(
        f"{notice.event} {notice.detail}".strip(), highlight=False, markup=False
    )


@app.command("store")
def store_command(
    from_: FromOption,
    duration: DurationOption = None,
    db_url: DatabaseUrlOption = None,
) -> None:
    """Store what ingest and the shards publish: trades, quotes, books, bars and alerts.

    Durable consumers acknowledge each message once its rows are committed, so a restarted
    store goes on where it stopped and stores nothing twice. The database must be migrated.
    Ctrl-C writes what it has read and exits 130.

    \b
    Examples:
      polystream store --from nats://127.0.0.1:4222
      polystream store --from nats://127.0.0.1:4222 --database-url postgresql://localhost/ps
    """
    from .consumers import store_from

    settings = _settings(DATABASE_URL=db_url)
    consumer = store_from(settings, from_, duration=duration, say=_status_line)
    stats = consumer.store.stats
    tables = ", ".join(f"{n:,} {t}" for t, n in stats.rows_by_table.items() if n)
    display.note(
        f"stored {stats.rows_written:,} new rows{f' ({tables})' if tables else ''} from "
        f"{consumer.messages:,} messages",
        "green",
    )
    if consumer.signal is not None:
        raise typer.Exit(128 + consumer.signal)


@app.command("notify")
def notify_command(from_: FromOption, duration: DurationOption = None) -> None:
    """Send the alerts the shards publish to Telegram, each once.

    TELEGRAM_BOT_TOKEN and TELEGRAM_CHAT_ID name the bot and the chats. A durable consumer
    acknowledges each alert once it is in the notifier's outbox, which delivers it once across
    restarts. Ctrl-C sends what is pending for up to 15 s and exits 130.

    \b
    Examples:
      polystream notify --from nats://127.0.0.1:4222
      polystream notify --from nats://127.0.0.1:4222 --duration 3600
    """
    from .consumers import notify_from

    consumer = notify_from(_settings(), from_, duration=duration, say=_status_line)
    sent = consumer.notifier.stats
    display.note(
        f"read {consumer.messages:,} alerts; Telegram accepted {sent.sent:,} messages, "
        f"{sent.pending:,} wait in the outbox",
        "green",
    )
    if consumer.signal is not None:
        raise typer.Exit(128 + consumer.signal)


@app.command()
def analyze(
    file: Annotated[Path, typer.Argument(help="OHLCV bars: CSV or Parquet.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write CSV or Parquet (by suffix); - for CSV on stdout [default: a table in a "
            "terminal, CSV into a pipe].",
        ),
    ] = None,
    symbol: Annotated[
        str | None,
        typer.Option(help="Keep only this symbol of a file with a symbol column, e.g. X:BTCUSD."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Every row as a JSON object per line on stdout.")
    ] = False,
) -> None:
    """Indicators for OHLCV bars from a CSV or Parquet file, offline.

    The same indicator columns as `watch` (RSI, Stochastic, MACD, AO, CCI, Bollinger Bands),
    per symbol when the file has a symbol column. Without -o: a table in a terminal, CSV into a
    pipe.

    \b
    Examples:
      polystream analyze bars.csv
      polystream analyze bars.csv -o bars-with-indicators.parquet
      polystream analyze history.csv --symbol X:ETHUSD -o - | head
      polystream analyze bars.csv --json | jq .rsi_14
    """
    from . import analyze as offline

    if json_out and output is not None:
        raise UsageError("Give --json or --output, not both: --json writes the rows to stdout.")
    _settings()
    frame = offline.analyze(file, symbol=symbol)
    if json_out:
        display.frame_json_lines(frame)
    elif output is None and sys.stdout.isatty():
        display.print_frame(frame, title=str(file))
    elif output is None or str(output) == "-":
        sys.stdout.write(frame.write_csv())  # every row, for the next program in the pipe
        sys.stdout.flush()
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
    """Serve the built-in Polygon-protocol feed on loopback until Ctrl-C.

    Any non-empty key is accepted unless --api-key is given; a watch on a loopback feed needs
    no key of its own. The fault options make it misbehave the way real feeds do.

    \b
    Examples:
      polystream simulate --port 8765
      polystream watch X:BTCUSD --feed ws://127.0.0.1:8765
      polystream simulate --drop-every 10 --malformed-every 500
    """
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


@app.command("config")
def config_command(
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Check what the settings point at instead: the database (connects), filters, "
            "state directory, Telegram settings (not contacted) and API key; exit 1 on a problem.",
        ),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object per setting (or check) on stdout.")
    ] = False,
    api_key: ApiKeyOption = None,
    ws_url: WsUrlOption = None,
    rest_url: RestUrlOption = None,
    db_url: DatabaseUrlOption = None,
    filters: Annotated[
        Path | None,
        typer.Option(help="Filters directory [default: ./filters]. [env: POLYSTREAM_FILTERS_DIR]"),
    ] = None,
) -> None:
    """The settings in effect and where each comes from; --check tests them.

    Secrets are redacted; each value's origin is a flag, the environment, .env (with its line)
    or the default. --check tries the database, the filters, the state directory, the Telegram
    settings and the API key, and exits 1 if any has a problem.

    \b
    Examples:
      polystream config
      polystream config --check
      polystream config --json --database-url postgresql://localhost/polystream
    """
    from . import doctor

    settings = _settings(
        POLYGON_API_KEY=api_key,
        POLYGON_WS_URL=ws_url,
        POLYGON_REST_URL=rest_url,
        DATABASE_URL=db_url,
        POLYSTREAM_FILTERS_DIR=str(filters) if filters else None,
    )
    if check:
        checks = doctor.run_checks(settings)
        if json_out:
            display.json_lines(doctor.records(checks))
        else:
            print("\n".join(doctor.check_lines(checks)), flush=True)
        doctor.require_ok(checks)
        return
    rows = doctor.settings_rows(settings)
    if json_out:
        display.json_lines(doctor.records(rows))
    else:
        print("\n".join(doctor.settings_lines(rows)), flush=True)


app.add_typer(filter_app, name="filter")
app.command("chart")(chart_command)


# What help shows for a value, where the parameter's name alone would not say it well
_METAVARS = {
    "timeframe": "TF",
    "lateness": "DURATION",
    "watchdog": "DURATION",
    "revision_horizon": "DURATION",
    "cooldown": "DURATION",
    "bars": "SOURCE",
    "from_": "DATE",
    "to": "DATE",
    "api_key": "KEY",
    "ws_url": "URL",
    "rest_url": "URL",
    "db_url": "URL",
    "when": "EXPR",
    "symbols": "LIST",
    "notify": "LIST",
    "speed": "N",
}


def _metavar(param: Any) -> str:
    """A placeholder such as FILE, DIR, N, SECONDS or SYMBOL... for a parameter, instead of
    the Python type the help would otherwise show (`<list[str]>`, `<float range>`)."""
    name = param.name or ""
    annotation = str(param.type_descriptor.annotation)
    if "Path" in annotation:
        value = "DIR" if name == "filters" else "FILE"
    elif "float" in annotation and name != "speed":
        value = "SECONDS"
    elif "int" in annotation:
        value = "PORT" if name == "port" else "N"
    elif param.param_type_name == "argument":
        value = name.upper().rstrip("S") if param.nargs != 1 else name.upper()
    else:
        value = _METAVARS.get(name, name.upper())
    return f"{value}..." if param.param_type_name == "argument" and param.nargs != 1 else value


class _Argument(TyperArgument):
    """An argument shown by its placeholder alone, as `SYMBOL...` or `[FILE]...`, without the
    Python type and the braces typer adds."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        name = self.metavar or (self.name or "").upper()
        return name if self.required else f"[{name}]"


def _name_values(command: Any) -> Any:
    """`command` with a placeholder on every parameter that takes a value and has none."""
    for param in command.params:
        if param.metavar is None and not getattr(param, "is_flag", False):
            param.metavar = _metavar(param)
        if type(param) is TyperArgument:
            param.__class__ = _Argument
    for sub in getattr(command, "commands", {}).values():
        _name_values(sub)
    return command


def main() -> None:
    """Entry point: runs the app and maps every failure to the exit-code contract."""
    try:
        code = _name_values(typer.main.get_command(app)).main(
            standalone_mode=False, prog_name="polystream"
        )
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
        code = exc.exit_code
        if code:  # not a quiet end, such as the reader of the output going away
            if _debug:
                traceback.print_exc()
            display.details(exc.details)
            display.error(str(exc))
    sys.exit(code if isinstance(code, int) else 0)
