"""Running polystream from code: `RunOptions` (what `watch` is asked for) and `Settings` become a
pipeline with its source, stages, sinks, warm-up and gap repair.

    from polystream import RunOptions, run
    result = run(RunOptions(("X:BTCUSD",), feed="demo", ui="lines", duration=10))

`open_run` gives the pipeline to drive yourself (add a sink, then `run`). Problems are raised as
`PolystreamError` sentences before anything starts: a bad filter file, a database with pending
migrations, a feed that needs a key that is not set.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, TypeAlias
from urllib.parse import urlsplit

import msgspec
import polars as pl

from . import display, wire
from .config import DEFAULT_REST_URL, Settings, check_url, load_settings, timeframe_name
from .decode import Decoder
from .errors import ConfigError, FeedError, PolystreamError, SymbolError
from .feedalerts import FeedAlertSink
from .filters import Filter, FilterEngine, FilterWatcher
from .indicators import IndicatorParams
from .pipeline import Pipeline, RunResult, Source
from .record import Recorder, ReplaySource, read_recording
from .reload import FilterReload
from .repair import GapRepair
from .schema import BAR, OHLCV, Alert, Notice, empty
from .simulator import DemoFeed
from .sinks import BaseSink, Output, RecorderSink, Sink, StoreSink, TelegramSink
from .source import FeedClient, FeedOptions
from .stages import BarSource, Stages
from .symbols import from_pair, normalize, to_pair
from .window import BarOptions

if TYPE_CHECKING:
    from .ingest import IngestStats
    from .metrics import MetricsSink
    from .notify import TelegramNotifier
    from .rest import RestClient
    from .store import Store

UI: TypeAlias = Literal["dashboard", "lines", "none"]

# Bars of history per symbol and timeframe for a warm-up: a few times the longest warm-up, so
# that EMA-based indicators have forgotten where the history starts.
WARMUP_BARS = 300
# Trades worth one call of the bar engine in a replay as fast as it can go, whose watermark makes
# bars due all the time: each call has a fixed cost.
REPLAY_PENDING = 100_000
# How long the writer and the notifier may take to finish at the end of a run.
SINK_TIMEOUT = 15.0


class RunOptions(msgspec.Struct, frozen=True):
    """What a run is asked for (the options of `watch`). Times are milliseconds.

    `feed` is polygon, demo, a ws:// or wss:// URL, or a recording to replay (as fast as it
    can be processed, or at `speed` × real time). `store`/`notify` None mean: on when
    configured. `filters_dir` None means the settings' directory. `serve` is a [HOST:]PORT to
    serve the records on over WebSocket.
    """

    symbols: tuple[str, ...]
    feed: str = "polygon"
    timeframes: tuple[int, ...] = (60_000,)
    channels: tuple[str, ...] = ("XT", "XQ")
    bars: BarSource = "trades"
    lateness: int = 2_000
    horizon: int = 60_000
    ui: UI = "dashboard"
    json: bool = False
    duration: float | None = None
    record: Path | None = None
    speed: float | None = None
    seed: int = 0
    filters_dir: Path | None = None
    store: bool | None = None
    notify: bool | None = None
    warmup: bool = True
    utc: bool = False  # times on screen in UTC rather than local time
    bus: str | None = None  # nats://…: a shard of a run that `ingest` publishes there
    shard: tuple[int, int] = (0, 1)  # K of N: the partitions p % N == K
    serve: str | None = None
    metrics: str | None = None  # [HOST:]PORT to serve /metrics and /healthz on
    watchdog: float = 30.0  # seconds without data: the feed reconnects and counts as down


def run(options: RunOptions, settings: Settings | None = None) -> RunResult:
    """Run to the end of the feed, `options.duration` or Ctrl-C; a live run that never reached
    its feed is an error, not a success."""
    with open_run(options, settings or load_settings()) as pipeline:
        result = pipeline.run()
        source = pipeline.source
        if result.interrupted or options.feed == "demo" or not isinstance(source, FeedClient):
            return result
        if not source.streamed:
            why = f": {source.last_failure}" if source.last_failure else ""
            raise FeedError(f"The feed at {source.url} was never reached{why}.")
        return result


@contextlib.contextmanager
def open_run(options: RunOptions, settings: Settings) -> Iterator[Pipeline]:
    """A pipeline ready to `run`, with everything it needs started; stopped again on exit."""
    if options.bus is not None:
        with _shard_run(options, settings) as pipeline:
            yield pipeline
        return
    symbols = tuple(dict.fromkeys(normalize(s) for s in options.symbols))
    if not symbols:
        raise ConfigError("Give at least one symbol, such as X:BTCUSD.")
    if options.speed is not None and options.speed <= 0:
        raise ConfigError(
            f"Invalid --speed {options.speed:g}: give a positive multiple of real time."
        )
    watcher, bar_options = _bars(options, settings)
    timeframes = bar_options.timeframes
    channels = options.channels
    if options.bars == "polygon":
        needed = {"XA"} if min(timeframes) >= 60_000 else {"XA", "XAS"}
        channels = tuple(dict.fromkeys([*channels, *sorted(needed)]))
    store, store_down = _store(settings, options.store)
    notifier = _notifier(settings, options.notify)
    filters = FilterEngine(watcher.filters, params=bar_options.params, timeframes=timeframes)
    with contextlib.ExitStack() as stack:
        source = _source(options, settings, [to_pair(s) for s in symbols], channels, stack)
        live = not isinstance(source, ReplaySource)
        stages = Stages(
            symbols,
            bar_options,
            filters=filters,
            bar_source=options.bars,
            # an unpaced replay wants throughput; a live run or a paced replay, its bars at once
            min_pending=REPLAY_PENDING if not live and options.speed is None else 0,
        )
        # the demo feed's alerts are made up: they leave the user's "last fired" times alone
        fired_to = None if options.feed == "demo" else settings.state_dir
        units: list[FilterReload | GapRepair] = [FilterReload(watcher, filters, fired_to)]
        history = _repairer(settings, options.feed, store)
        if history is not None:
            units.append(GapRepair(history, stages, lambda: source.gaps))
        sinks = _sinks(options, symbols, timeframes)
        pipeline = Pipeline(
            source,
            stages,
            sinks,
            units=units,
            live=live,
            duration=options.duration,
            watchdog=options.watchdog,
        )
        if not watcher.filters:
            pipeline.report("no_filters", _no_filters(watcher.directory))
        if options.metrics is not None:  # before the workers: it closes after them
            pipeline.add(stack.enter_context(_metrics(options.metrics, pipeline, store, notifier)))
        if options.record is not None:
            pipeline.add(RecorderSink(Recorder(options.record)))
        if store is not None:
            pipeline.add(StoreSink(store, SINK_TIMEOUT, down=store_down))
        if notifier is not None:
            telegram = _telegram(settings, notifier, filters, store, live)
            pipeline.add(telegram)
            # after the notifier's sink: it closes first, while the notifier still takes alerts
            muted = telegram.mutes.muted if telegram.mutes is not None else None
            limit = settings.journal_alert_bytes
            pipeline.add(FeedAlertSink(notifier, store=store, muted=muted, journal_limit=limit))
        if options.warmup and live:
            stored = store is not None and store_down is None
            history_bars = _history(settings, stored, options.feed, symbols, timeframes)
            if history_bars is not None:
                pipeline.sinks.write(stages.warm(history_bars, pipeline.now_ms()))
        yield pipeline


@contextlib.contextmanager
def _shard_run(options: RunOptions, settings: Settings) -> Iterator[Pipeline]:
    """A shard's pipeline: the run `ingest` publishes on `options.bus`, the partitions of
    shard K of N, the filters of the filters directory, results published back (see `shard`).
    The watermark comes from ingest's clock: its receipt times, and its wall clock when live."""
    from .bus import Bus
    from .shard import ResultSink, ShardSource, owned, wait_for_run

    assert options.bus is not None
    if options.bars != "trades":
        raise ConfigError("A shard builds bars from trades: --bars polygon needs one process.")
    shard, shards = options.shard
    with contextlib.ExitStack() as stack:
        bus = stack.enter_context(Bus(options.bus, name=f"polystream-shard-{shard}-{shards}"))
        run = wait_for_run(bus)  # ingest made the streams
        parts, symbols = owned(run, shard, shards)
        watcher, bar_options = _bars(options, settings)
        timeframes = bar_options.timeframes
        filters = FilterEngine(watcher.filters, params=bar_options.params, timeframes=timeframes)
        name = f"shard {shard}/{shards}"
        source = ShardSource(bus, run, parts, name)
        stages = Stages(
            symbols,
            bar_options,
            filters=filters,
            min_pending=0 if run.live else REPLAY_PENDING,
        )
        units: list[FilterReload | GapRepair] = [FilterReload(watcher, filters, settings.state_dir)]
        sinks = _sinks(options, symbols, timeframes)
        pipeline = Pipeline(
            source,
            stages,
            [*sinks, ResultSink(bus, f"shard-{shard}-{shards}")],
            units=units,
            live=run.live,
            clock=source.clock,
            duration=options.duration,
        )
        if options.metrics is not None:
            pipeline.add(stack.enter_context(_metrics(options.metrics, pipeline)))
        if not watcher.filters:
            pipeline.report("no_filters", _no_filters(watcher.directory))
        yield pipeline


def _metrics(
    address: str,
    pipeline: Pipeline,
    store: Store | None = None,
    notifier: TelegramNotifier | None = None,
) -> MetricsSink:
    """`--metrics`: serving from now until the run's context exits, so the final values can be
    read after `run` returned."""
    from .metrics import MetricsSink

    return MetricsSink(address, pipeline, store, notifier)


def ingest(
    options: RunOptions,
    settings: Settings,
    url: str,
    *,
    partitions: int,
    replicas: int = 1,
    reset: bool = False,
    say: Callable[[Notice], None] = lambda notice: None,
) -> tuple[IngestStats, int | None]:
    """`polystream ingest`: hold `options.feed` (anything `watch --feed` takes) and publish
    it to the NATS JetStream server at `url` for shards (every symbol of the feed when
    `options.symbols` is empty); the statistics, and the signal that stopped it, if one did."""
    from .bus import Bus
    from .ingest import Ingest

    symbols = tuple(dict.fromkeys(normalize(s) for s in options.symbols))
    pairs = [to_pair(s) for s in symbols] or ["*"]  # no symbols: every pair of the feed
    with contextlib.ExitStack() as stack:
        bus = stack.enter_context(Bus(url, name="polystream-ingest"))
        if reset:
            bus.delete_stream(wire.MD_STREAM)
            bus.delete_stream(wire.OUT_STREAM)
        source = _source(options, settings, pairs, options.channels, stack)
        live = not isinstance(source, ReplaySource)
        job = Ingest(
            bus, source, symbols, live=live, partitions=partitions, replicas=replicas, say=say
        )
        stats = job.run(options.duration)
        return stats, job.signal


# Hosts of a feed on this machine, which is never the real one: without a key, this one is sent.
LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOOPBACK_KEY = "local"


def _bars(options: RunOptions, settings: Settings) -> tuple[FilterWatcher, BarOptions]:
    """The run's filters, and its bars: the timeframes asked for, then those the filters name
    (bars for them are built too)."""
    watcher = load_filters(options.filters_dir or settings.filters_dir)
    timeframes = tuple(dict.fromkeys(options.timeframes))
    wanted = {f.timeframe for f in watcher.filters if f.on == "bar" and f.timeframe}
    timeframes += tuple(sorted(wanted - set(timeframes)))
    bar_options = BarOptions(
        timeframes=timeframes, lateness=options.lateness, horizon=options.horizon
    )
    return watcher, bar_options


def _no_filters(directory: Path) -> str:
    """Why a run raises no alerts, and what to do about it."""
    where = (
        f"{directory} does not exist"
        if not directory.exists()
        else f"{directory} holds no filter files"
    )
    return (
        f"no alerts: {where}; `polystream filter add` writes one there (watched, so it is "
        "picked up at once), `polystream demo` runs the shipped ones"
    )


def _sinks(options: RunOptions, symbols: Sequence[str], timeframes: Sequence[int]) -> list[Sink]:
    """What users see: JSON lines first (the latency-critical reader), then lines or the
    dashboard. JSON lines on a terminal leave no room for the dashboard: plain lines go to
    stderr instead."""
    sinks: list[Sink] = []
    if options.json:
        sinks.append(display.JsonLines())
    if options.serve is not None:
        from .serve import TOKEN_VAR, ServeSink

        # before the displays: it closes after them, so its clients get every last record
        sinks.append(ServeSink(options.serve, token=os.environ.get(TOKEN_VAR)))
    if options.ui == "lines" or (options.json and sys.stdout.isatty()):
        sinks.append(display.TextLog(bars=not options.json, utc=options.utc))
    elif options.ui == "dashboard":
        sinks.append(display.Dashboard(symbols, timeframe_name(timeframes[0]), utc=options.utc))
    return sinks


def load_filters(directory: Path) -> FilterWatcher:
    """The first scan of the filters directory: a run does not start with an invalid file."""
    watcher = FilterWatcher(directory)
    errors = watcher.load()
    if not errors:
        return watcher
    raise InvalidFilters(watcher.directory, errors)


class InvalidFilters(ConfigError):
    """Filter files that are not valid, each problem shown before the sentence."""

    def __init__(self, directory: Path, errors: Sequence[PolystreamError]) -> None:
        n = len(errors)
        super().__init__(
            f"{n} filter file{'s' if n > 1 else ''} in {directory} "
            f"{'are' if n > 1 else 'is'} not valid; fix or remove "
            f"{'them' if n > 1 else 'it'} (polystream filter validate shows every problem)."
        )
        self.errors = list(errors)

    @property
    def details(self) -> list[str]:
        return [line for err in self.errors for line in (err.details or [str(err)])]


def _source(
    options: RunOptions,
    settings: Settings,
    pairs: list[str],
    channels: tuple[str, ...],
    stack: contextlib.ExitStack,
) -> Source:
    feed = options.feed
    if feed == "demo":
        demo = stack.enter_context(DemoFeed(seed=options.seed))
        return FeedClient(demo.url, "demo", pairs, channels, options=_feed_options(options))
    if feed == "polygon" or feed.startswith(("ws://", "wss://")):
        url = settings.ws_url if feed == "polygon" else check_url("--feed", feed, ("ws", "wss"))
        key = settings.api_key
        if not key and urlsplit(url).hostname in LOOPBACK:
            key = LOOPBACK_KEY  # a local feed such as `polystream simulate` takes any key
        if not key:
            raise ConfigError(
                f"No API key for the feed at {url}: set POLYGON_API_KEY (or MASSIVE_API_KEY) "
                "in the environment or .env, or try the built-in feed with `polystream demo`."
            )
        return FeedClient(url, key, pairs, channels, options=_feed_options(options))
    path = Path(feed)
    if not path.exists():
        raise ConfigError(
            f"--feed {feed!r}: the recording {path} does not exist (and it is not polygon, demo, "
            "or a ws:// or wss:// URL)."
        )
    return ReplaySource(path, speed=options.speed)


def _feed_options(options: RunOptions) -> FeedOptions:
    if not options.watchdog > 0:
        raise ConfigError(f"Invalid --watchdog {options.watchdog:g} s: give a positive duration.")
    return FeedOptions(silence_timeout=options.watchdog)


def database_url(settings: Settings) -> str:
    if not settings.database_url:
        raise ConfigError(
            "DATABASE_URL is not set: put postgresql://user@host:5432/dbname in the environment "
            "or .env."
        )
    return settings.database_url


def _store(settings: Settings, wanted: bool | None) -> tuple[Store | None, str | None]:
    """The database writer, when storage is asked for or DATABASE_URL is set, and why the
    database cannot be reached now, if it cannot: rows then wait in the journal until it is
    back. A database with pending migrations, or one that refuses the login, is refused before
    anything runs."""
    if wanted is False or (wanted is None and not settings.database_url):
        return None, None
    from .store import Store, Unreachable, require_migrated

    url = database_url(settings)
    down = None
    try:
        require_migrated(url)
    except Unreachable as exc:
        down = str(exc).rstrip(".")
    return Store(url, settings.state_dir), down


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


def _telegram(
    settings: Settings,
    notifier: TelegramNotifier,
    filters: FilterEngine,
    store: Store | None,
    live: bool,
) -> TelegramSink:
    """The notifier's sink, with mutes, and commands for the chats and users allowed to send
    them (a replay's mutes run on its event time)."""
    from .commands import Mutes, RunState, TelegramCommands

    assert settings.telegram_bot_token is not None
    state = RunState(live=live, store=store, notifier=notifier)
    mutes = Mutes(settings.state_dir)
    allowed = settings.telegram_allowed_ids
    commands = None
    if allowed:
        commands = TelegramCommands(
            settings.telegram_bot_token,
            allowed,
            settings.state_dir,
            state=state,
            mutes=mutes,
            filters=filters,
            api_url=settings.telegram_api_url,
        )
    return TelegramSink(notifier, SINK_TIMEOUT, state=state, mutes=mutes, commands=commands)


def has_rest(settings: Settings, feed: str) -> bool:
    """Whether this feed comes with a REST API to ask for history: the Polygon feed with a key,
    or another WebSocket feed when POLYGON_REST_URL names its REST server."""
    if not settings.api_key:
        return False
    if feed == "polygon":
        return True
    return feed.startswith(("ws://", "wss://")) and settings.rest_url != DEFAULT_REST_URL


def _repairer(settings: Settings, feed: str, store: Store | None) -> RestClient | None:
    """Gap repair needs the REST API and somewhere the repaired bars go."""
    if store is None or not has_rest(settings, feed) or settings.api_key is None:
        return None
    from .rest import RestClient

    return RestClient(settings.rest_url, settings.api_key)


def _history(
    settings: Settings, stored: bool, feed: str, symbols: Sequence[str], timeframes: Sequence[int]
) -> pl.DataFrame | None:
    """The latest bars for a warm-up: from the database when storing, else over REST when the
    feed has a REST API; nothing for the demo feed or a replay."""
    now = int(time.time() * 1000)
    if stored:
        from .store import recent_bars

        return recent_bars(
            database_url(settings), list(symbols), tuple(timeframes), WARMUP_BARS, now
        )
    if not has_rest(settings, feed):
        return None
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
        return None
    return pl.concat(pages) if pages else None


# -- history over REST ---------------------------------------------------------------------------

_OUTPUT_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")


class SymbolBackfill(msgspec.Struct):
    """What `backfill` did for one symbol (its `--json` line): bars, and trades (None when not
    asked for), fetched from `from` on. `to` is how far it got: where a new run goes on, the
    end asked for unless `interrupted`. `waited_s`: paused for the rate limit and retries."""

    symbol: str
    timeframe: str
    start: int = msgspec.field(name="from")
    to: int
    bars: int
    trades: int | None
    pages: int
    requests: int
    waited_s: float
    interrupted: bool
    output: str | None

    def record(self) -> dict[str, object]:
        record: dict[str, object] = msgspec.to_builtins(self)
        return record


class BackfillResult(msgspec.Struct):
    """How a backfill ended: one sentence for humans, and a record per symbol."""

    summary: str
    symbols: list[SymbolBackfill]
    interrupted: bool


class _Tally:
    """One symbol's counts as its pages arrive, and where a new run would go on."""

    def __init__(self, symbol: str, timeframe: str, start: int, end: int, trades: bool) -> None:
        self.symbol = symbol
        self.timeframe = timeframe
        self.start = start
        self.end = end
        self.bars = 0
        self.trades: int | None = 0 if trades else None
        self.bars_to = start
        self.trades_to: int | None = None
        self.done = False
        self.pages = 0
        self.requests = 0
        self.waited = 0.0

    def add(self, table: str, frame: pl.DataFrame) -> None:
        if table == "bars":
            self.bars += frame.height
            self.bars_to = max(self.bars_to, int(frame["end"][-1]))
        else:
            self.trades = (self.trades or 0) + frame.height
            # Trades of one millisecond may straddle two pages: go on from the minute of the
            # latest (a trade stored twice is stored once).
            self.trades_to = max(self.start, int(frame["time"][-1]) // 60_000 * 60_000)

    @property
    def reached(self) -> int:
        """The end when done. Trades come after all of a symbol's bars: then, the minute of the
        latest trade (the start before any); else the end of the latest bar."""
        if self.done:
            return max(self.start, self.end)
        if self.trades is None:
            return self.bars_to
        return self.start if self.trades_to is None else self.trades_to

    @property
    def how_far(self) -> str:
        if self.done:
            return f"{self.symbol} complete"
        if self.reached > self.start:
            return f"{self.symbol} up to {_moment(self.reached)} UTC"
        if self.bars:
            return f"{self.symbol} {self.bars:,} bars, no trades yet"
        return f"{self.symbol} not started"

    def record(self, output: Path | None) -> SymbolBackfill:
        return SymbolBackfill(
            self.symbol,
            self.timeframe,
            self.start,
            self.reached,
            self.bars,
            self.trades,
            self.pages,
            self.requests,
            round(self.waited, 3),
            not self.done,
            None if output is None else str(output),
        )


def _moment(ms: int, sep: str = " ") -> str:
    """`2024-05-03 12:35` (UTC; `sep` "T" for `--from`), with seconds and milliseconds only
    when they are not zero."""
    text = time.strftime(f"%Y-%m-%d{sep}%H:%M", time.gmtime(ms // 1000))
    if ms % 60_000:
        text += f":{ms // 1000 % 60:02d}"
    if ms % 1000:
        text += f".{ms % 1000:03d}"
    return text


def backfill(
    settings: Settings,
    symbols: Sequence[str],
    *,
    start_ms: int | None,
    end_ms: int,
    timeframe_ms: int,
    trades: bool = False,
    output: Path | None = None,
    per_minute: int = 5,
    json: bool = False,
) -> BackfillResult:
    """REST history (aggregates, and trades with `trades`) into the database, or bars into
    `output`; without `start_ms`, each symbol resumes after its last stored bar, and says so.
    Everything is checked before the first request. Ctrl-C keeps what was fetched (written to
    `output`, or stored) and ends with an interrupted result that says how to go on. `json`
    keeps stderr plain for a `--json` run: no progress bars."""
    from . import rest
    from .analyze import SUFFIXES
    from .store import Store, require_migrated

    if not settings.api_key:
        raise ConfigError(
            "No API key: set POLYGON_API_KEY (or MASSIVE_API_KEY) in the environment or .env."
        )
    normalized = [normalize(s) for s in dict.fromkeys(symbols)]
    tf = timeframe_ms
    if output is None and not settings.database_url:
        raise ConfigError("Nowhere to put the history: set DATABASE_URL, or give --output FILE.")
    if output is not None and trades:
        raise ConfigError("--trades needs the database: a file holds bars only.")
    if output is not None and not output.name.lower().endswith(_OUTPUT_SUFFIXES):
        raise ConfigError(f"Cannot write {output}: give it one of the suffixes {SUFFIXES}.")
    if start_ms is not None and start_ms >= end_ms:
        raise ConfigError("--from is not before --to: swap them.")
    starts = _starts(settings, normalized, start_ms, end_ms, tf, output)
    client = rest.RestClient(settings.rest_url, settings.api_key, per_minute=per_minute)
    tallies = [_Tally(s, timeframe_name(tf), starts[s], end_ms, trades) for s in normalized]
    collected: list[pl.DataFrame] = []
    writer = None
    if output is None:
        url = database_url(settings)
        require_migrated(url)
        writer = Store(url, settings.state_dir).start()

    def sink(table: str, frame: pl.DataFrame) -> None:
        if writer is not None:
            writer.offer(table, frame)
        elif table == "bars":
            collected.append(frame)

    progress = display.BackfillProgress(starts, end_ms, plain=json)
    client.on_wait = progress.waiting
    try:
        with progress:
            for tally in tallies:
                _fetch(client, tally, tf, sink, progress)
    except KeyboardInterrupt:
        pass  # what was fetched is kept; the result says how far each symbol got
    finally:
        if writer is not None:
            writer.stop(60.0)
    interrupted = not all(t.done for t in tallies)
    if writer is not None:
        if writer.fatal is not None:
            raise writer.fatal
        summary = _stored(writer, tallies, interrupted)
    else:
        assert output is not None
        summary = _write_bars(collected, output, tallies, interrupted)
    return BackfillResult(summary, [t.record(output) for t in tallies], interrupted)


def _starts(
    settings: Settings,
    symbols: Sequence[str],
    start_ms: int | None,
    end_ms: int,
    tf: int,
    output: Path | None,
) -> dict[str, int]:
    """Where each symbol's history begins: `start_ms`, else after its last stored bar, said on
    stderr so that a resumed run shows from where."""
    if start_ms is not None:
        return dict.fromkeys(symbols, start_ms)
    if output is not None:
        raise ConfigError("--from is needed when writing to a file.")
    from .store import last_bar_start, require_migrated

    url = database_url(settings)
    require_migrated(url)
    name = timeframe_name(tf)
    last: dict[str, int] = {}
    for symbol in symbols:
        stored = last_bar_start(url, symbol, name)
        if stored is None:
            raise ConfigError(f"No {name} bars of {symbol} are stored yet: give --from.")
        last[symbol] = stored
    for symbol, ms in last.items():
        if ms + tf >= end_ms:
            display.note(f"{symbol} {name}: up to date (the last stored bar is {_moment(ms)} UTC)")
        else:
            display.note(f"{symbol} {name}: resuming after {_moment(ms)} UTC (the last stored bar)")
    return {symbol: ms + tf for symbol, ms in last.items()}


def _fetch(
    client: RestClient,
    tally: _Tally,
    tf: int,
    sink: Callable[[str, pl.DataFrame], None],
    progress: display.BackfillProgress,
) -> None:
    """Every page of one symbol into `sink`, counted in `tally`, even when Ctrl-C stops it."""
    from . import rest

    def counted(table: str, frame: pl.DataFrame) -> None:
        sink(table, frame)
        tally.add(table, frame)  # after: a count never claims rows that were not kept

    requests, pages, waited = client.requests_sent, client.pages_received, client.waited
    try:
        if tally.start < tally.end:
            rest.backfill(
                client,
                [tally.symbol],
                tally.start,
                tally.end,
                timeframe_ms=tf,
                trades=tally.trades is not None,
                sink=counted,
                on_page=progress,
            )
        tally.done = True
    finally:
        tally.requests = client.requests_sent - requests
        tally.pages = client.pages_received - pages
        tally.waited = client.waited - waited


def _go_on(tallies: Sequence[_Tally]) -> str:
    """How to fetch the rest: `run again with --from …`, for each group of symbols that stopped
    at the same time when they did not all stop together."""
    left: dict[int, list[str]] = {}
    for t in tallies:
        if not t.done:
            left.setdefault(t.reached, []).append(t.symbol)
    if len(left) == 1 and len(next(iter(left.values()))) == len(tallies):
        return f"run again with --from {_moment(next(iter(left)), 'T')}"
    return "run again " + " and ".join(
        f"for {' '.join(names)} with --from {_moment(ms, 'T')}" for ms, names in left.items()
    )


def _how_far(tallies: Sequence[_Tally]) -> str:
    return ", ".join(t.how_far for t in tallies)


def _stored(writer: Store, tallies: Sequence[_Tally], interrupted: bool) -> str:
    stats = writer.stats
    fetched = sum(t.bars + (t.trades or 0) for t in tallies)
    waiting = f", {stats.journal_rows:,} rows waiting in the journal" if stats.journal_rows else ""
    done = f"fetched {fetched:,} rows; {stats.rows_written:,} new rows stored{waiting}"
    if not interrupted:
        return done
    return f"interrupted: {done} ({_how_far(tallies)}); {_go_on(tallies)} to continue"


def _write_bars(
    collected: Sequence[pl.DataFrame], output: Path, tallies: Sequence[_Tally], interrupted: bool
) -> str:
    """One shape for every file, complete or not: a symbol column first, even for one symbol."""
    from .analyze import write_output

    bars = pl.concat(collected).sort("symbol", "start") if collected else empty(BAR)
    write_output(bars.select("symbol", pl.col("start").alias("time"), *OHLCV), output)
    if not interrupted:
        return f"wrote {bars.height:,} bars to {output}"
    return (
        f"interrupted: wrote {bars.height:,} bars ({_how_far(tallies)}) to {output}; "
        f"{_go_on(tallies)} into a new file to continue"
    )


# -- trying filters on a recording -------------------------------------------------------------


class _Collector(BaseSink):
    """Keeps the alerts and the final bars of a run."""

    name = "collector"

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.bars: list[pl.DataFrame] = []

    def write(self, out: Output) -> None:
        self.alerts += out.alerts
        if out.bars is not None:
            self.bars.append(out.bars.filter(pl.col("state") == "final"))


class Replayed(NamedTuple):
    """What `replay_filters` found: the alerts, and the final bars they were raised on."""

    alerts: list[Alert]
    bars: pl.DataFrame


def recording_symbols(path: Path) -> list[str]:
    """The symbols whose trades or quotes a recording holds, in order of first appearance."""
    decoder = Decoder()
    seen: dict[str, None] = {}
    for frame in read_recording(path):
        for event in decoder.decode(frame.data):
            pair = getattr(event, "pair", None)
            if isinstance(pair, str) and pair not in seen:
                seen[pair] = None
    symbols: dict[str, None] = {}
    for pair in seen:
        with contextlib.suppress(SymbolError):  # the replay rejects and counts its events
            symbols[from_pair(pair)] = None
    return list(symbols)


def replay_filters(
    path: Path,
    filters: Sequence[Filter],
    symbols: Sequence[str] | None = None,
    *,
    params: IndicatorParams | None = None,
    timeframe: int = 60_000,
) -> Replayed:
    """Replay a recording through the whole pipeline with `filters` attached: the alerts they
    would have raised, and the final bars built. A bar filter that names no
    timeframe runs on `timeframe`'s bars, as on a `watch -t` run's first."""
    p = params or IndicatorParams()
    named = sorted({f.timeframe for f in filters if f.on == "bar" and f.timeframe})
    timeframes = tuple(dict.fromkeys([timeframe, *named]))
    watched = list(symbols) if symbols else recording_symbols(path)
    collector = _Collector()
    stages = Stages(
        watched,
        BarOptions(timeframes=timeframes, params=p),
        filters=FilterEngine(filters, params=p, timeframes=timeframes),
        min_pending=REPLAY_PENDING,
    )
    Pipeline(ReplaySource(path), stages, [collector], live=False).run()
    bars = pl.concat(collector.bars, how="diagonal_relaxed") if collector.bars else pl.DataFrame()
    return Replayed(collector.alerts, bars)
