"""The pipeline, on the main thread: drains a source's queue in batches, decodes, turns events
into columnar micro-batches, builds bars and indicators, evaluates the filters (picking up
changed filter files every half second), and hands records, alerts and snapshots to the outputs.
The only module that imports every stage.

Ctrl-C (KeyboardInterrupt) stops the source, drains what it already delivered, emits the open
bars as `partial`, and returns a result with `interrupted` set; the CLI makes that exit 130.
"""

from __future__ import annotations

import concurrent.futures
import gc
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
import polars as pl

from .batch import TRADE_SCHEMA, Batch, Batcher
from .config import timeframe_name
from .decode import Decoder
from .errors import FeedError, PolystreamError
from .events import SIDE_UNKNOWN, Book
from .features import BookFeatures, book_features, quote_features
from .filters import Alert, Filter, FilterEngine, FilterWatcher, write_last_fired
from .indicators import IndicatorParams
from .record import Recorder, ReplaySource, read_recording
from .source import EndOfStream, Frame, Frames, Gap, Item, Notice
from .symbols import from_pair
from .window import BarEngine, BarOptions


class SymbolState(msgspec.Struct):
    """What the dashboard shows for one symbol."""

    symbol: str
    last_price: float | None = None
    last_size: float | None = None
    last_side: int = SIDE_UNKNOWN
    bid: float | None = None
    ask: float | None = None
    trades: int = 0
    quotes: int = 0
    events: int = 0
    rate: float = 0.0
    last_event_ms: int | None = None
    bar: dict[str, Any] | None = None
    bars: int = 0
    imbalance: float | None = None
    book: BookFeatures | None = None

    @property
    def spread(self) -> float | None:
        if self.bid is None or self.ask is None:
            return None
        return self.ask - self.bid


class FeedState(msgspec.Struct):
    """What the dashboard footer shows for the connection and the queue."""

    state: str = "idle"
    reconnects: int = 0
    lag_ms: int = 0
    queue_depth: int = 0
    queue_size: int = 0
    frames: int = 0
    events: int = 0
    rejected: int = 0
    malformed_frames: int = 0
    other_symbols: int = 0
    gaps: int = 0
    bars: int = 0
    revised: int = 0
    too_late: int = 0
    drift: str = ""
    filters: int = 0
    alerts: int = 0
    sinks: dict[str, int] = msgspec.field(default_factory=dict)  # rows stored, messages sent…


class Snapshot(msgspec.Struct):
    """A consistent view of the run for outputs; `now_ms` is the pipeline clock."""

    now_ms: int
    symbols: list[SymbolState]
    feed: FeedState
    timeframe: str = "1m"
    warmup: int = 0
    alerts: list[Alert] = msgspec.field(default_factory=list)  # the latest, oldest first


class Output(Protocol):
    """Where the pipeline sends what users see (dashboard, JSON lines, plain log)."""

    def status(self, notice: Notice) -> None: ...

    def bars(self, records: pl.DataFrame) -> None: ...

    def book(self, features: list[BookFeatures]) -> None: ...

    def alerts(self, alerts: list[Alert]) -> None: ...

    def refresh(self, snapshot: Snapshot) -> None: ...

    def close(self, snapshot: Snapshot) -> None: ...


class RowSink(Protocol):
    """Where rows are stored (the database writer): `offer` never blocks and never drops."""

    fatal: PolystreamError | None

    def start(self) -> object: ...

    def offer(self, table: str, frame: pl.DataFrame) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def counters(self) -> dict[str, int]: ...


class AlertSink(Protocol):
    """Where alerts routed to it go (the Telegram notifier): `offer` never blocks or drops."""

    problems: list[str]

    def start(self) -> object: ...

    def offer(self, alerts: Sequence[Alert]) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def counters(self) -> dict[str, int]: ...


class TradeHistory(Protocol):
    """Where missing data comes from (the REST API): every trade of a symbol in [start, end),
    or, when trades are not in the plan, its aggregates of a timeframe."""

    def trades(self, symbol: str, start_ms: int, end_ms: int) -> Iterable[pl.DataFrame]: ...

    def aggregates(
        self, symbol: str, timeframe_ms: int, start_ms: int, end_ms: int
    ) -> Iterable[pl.DataFrame]: ...


class _Repair(msgspec.Struct):
    """One symbol and timeframe of one outage: bars starting in [lo, hi) are rebuilt once all
    of them are final."""

    symbol: str
    tf: int
    lo: int
    hi: int
    # (trades, or None when only aggregates could be had, and those aggregates)
    future: concurrent.futures.Future[tuple[pl.DataFrame | None, pl.DataFrame]] | None = None


class Source(Protocol):
    """A live feed client or a replay: both deliver `Item`s on a bounded queue."""

    queue: queue.Queue[Item]
    state: str
    reconnects: int
    gaps: list[Gap]

    @property
    def fatal(self) -> Exception | None: ...

    def start(self) -> object: ...

    def stop(self) -> None: ...

    def join(self, timeout: float | None = None) -> bool: ...


class Drift(msgspec.Struct):
    """Running comparison of the feed's aggregates with trade-built bars."""

    matched: int = 0
    close_sum: float = 0.0
    close_max: float = 0.0
    volume_sum: float = 0.0


class RunResult(msgspec.Struct):
    """How a run ended."""

    interrupted: bool
    snapshot: Snapshot


class Pipeline:
    """Runs one source to its end, a duration, or Ctrl-C; see the module docstring.

    `live` sources let the wall clock close quiet bars; replays use recorded receipt times only.
    With `bar_source="polygon"` bars come from the feed's XA/XAS aggregates, and when trades are
    also subscribed the drift between the two is measured.
    """

    def __init__(
        self,
        source: Source,
        symbols: Sequence[str],
        outputs: Sequence[Output] = (),
        *,
        bars: BarOptions | None = None,
        bar_source: str = "trades",
        live: bool = True,
        recorder: Recorder | None = None,
        batcher: Batcher | None = None,
        filters: FilterEngine | None = None,
        watcher: FilterWatcher | None = None,
        state_dir: Path | None = None,
        store: RowSink | None = None,
        notifier: AlertSink | None = None,
        repair: TradeHistory | None = None,
        sink_timeout: float = 15.0,
        clock: Callable[[], float] = time.time,
        max_items: int = 2_000,
        refresh_every: float = 0.25,
        poll_every: float = 0.5,
        drain_timeout: float = 5.0,
    ) -> None:
        self.source = source
        self.symbols = {s: SymbolState(s) for s in symbols}
        self._watched = pl.Series(list(self.symbols), dtype=pl.String)
        self.outputs = list(outputs)
        self.recorder = recorder
        self.batcher = batcher or Batcher()
        self.decoder = self.batcher.decoder
        self.engine = BarEngine(bars)
        self.bar_source = bar_source
        self._shadow = BarEngine(bars) if bar_source == "polygon" else None
        self._drift = Drift()
        self._agg_seen: dict[tuple[str, str, int], tuple[float, float]] = {}
        self._trade_seen: dict[tuple[str, str, int], tuple[float, float]] = {}
        self.live = live
        self.feed = FeedState(queue_size=source.queue.maxsize)
        self._clock = clock
        self._max_items = max_items
        self._refresh_every = refresh_every
        self._drain_timeout = drain_timeout
        self._counted_at = 0.0
        self._counted: dict[str, int] = {}
        self._ended = False
        self._interrupted = False
        self._error: PolystreamError | None = None
        options = self.engine.options
        self._primary = options.timeframes[0]
        self._warmup = options.params.warmup
        self.filters = filters
        if watcher is not None and filters is None:
            self.filters = FilterEngine(
                watcher.filters, params=options.params, timeframes=options.timeframes
            )
        self.watcher = watcher
        self._poll_every = poll_every
        self._waiting: set[str] = set()
        self._recent: deque[Alert] = deque(maxlen=50)
        self._state_dir = state_dir
        self._fired_dirty = False
        self.store = store
        self.notifier = notifier
        self._sink_timeout = sink_timeout
        self._gaps_stored = 0
        self._problems_shown = 0
        self.repair = repair
        self._gaps_seen = 0
        self._repairs: list[_Repair] = []
        self._fetcher: concurrent.futures.ThreadPoolExecutor | None = None

    def warm(self, history: pl.DataFrame) -> int:
        """Seed the indicators and the filters with earlier final bars (see `BarEngine.warm`)
        before `run`; returns how many bars were taken."""
        records = self.engine.warm(history)
        if records.height == 0:
            return 0
        if self.filters is not None:
            self.filters.seed(records)
        primary = records.filter(pl.col("end") - pl.col("start") == self._primary)
        for row in primary.iter_rows(named=True):
            st = self.symbols.get(row["symbol"])
            if st is not None:
                st.bars += 1
                st.bar = row
        notice = Notice("warmed", self._now_ms(), f"{records.height:,} earlier bars loaded")
        for out in self.outputs:
            out.status(notice)
        return records.height

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def snapshot(self) -> Snapshot:
        feed = self.feed
        feed.state = self.source.state
        feed.reconnects = self.source.reconnects
        feed.queue_depth = self.source.queue.qsize()
        feed.gaps = len(self.source.gaps)
        stats = self.decoder.stats
        feed.frames, feed.events = stats.frames, stats.events
        feed.rejected, feed.malformed_frames = stats.rejected_events, stats.malformed_frames
        bar_stats = self.engine.stats
        feed.bars, feed.revised, feed.too_late = (
            bar_stats.final,
            bar_stats.revised,
            bar_stats.too_late,
        )
        if self.filters is not None:
            feed.filters = len(self.filters.filters)
            feed.alerts = sum(self.filters.fired.values())
        feed.sinks = {
            **(self.store.counters() if self.store is not None else {}),
            **(self.notifier.counters() if self.notifier is not None else {}),
        }
        return Snapshot(
            self._now_ms(),
            list(self.symbols.values()),
            feed,
            timeframe_name(self._primary),
            self._warmup,
            list(self._recent),
        )

    def run(self, duration: float | None = None) -> RunResult:
        """Process until the source ends, `duration` seconds pass, or Ctrl-C."""
        deadline = None if duration is None else time.monotonic() + duration
        # What exists now (modules, settings) lives as long as the run: keep the collector's
        # full passes from rescanning it over and over.
        gc.freeze()
        previous = self._catch_ctrl_c()
        for sink in (self.store, self.notifier):
            if sink is not None:
                sink.start()
        self.source.start()
        self._report_waiting()
        next_refresh = next_poll = time.monotonic()
        try:
            while not self._ended and not self._interrupted:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self._step(timeout=min(self._refresh_every, self._poll_every))
                now = time.monotonic()
                if now >= next_poll:
                    self._poll_filters()
                    next_poll = time.monotonic() + self._poll_every
                if now >= next_refresh:
                    self._refresh()
                    next_refresh = time.monotonic() + self._refresh_every
        except KeyboardInterrupt:
            self._interrupted = True
        finally:
            self._shutdown()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if self._error is not None:
            raise self._error
        return RunResult(self._interrupted, self.snapshot())

    def _catch_ctrl_c(self) -> Any:
        """On the main thread, make the first Ctrl-C a request to stop (checked between
        batches) rather than an exception that could land inside a polars callback; a second
        one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def on_sigint(signum: int, frame: object) -> None:
            self._interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        return signal.signal(signal.SIGINT, on_sigint)

    def _shutdown(self) -> None:
        self.source.stop()
        drain_until = time.monotonic() + self._drain_timeout
        while not self._ended and time.monotonic() < drain_until:
            try:
                self._step(timeout=0.1)
            except KeyboardInterrupt:
                break
        self.source.join(timeout=max(0.0, drain_until - time.monotonic()))
        self._flush()
        if self.live:
            self._bars(self.engine.partial())
        self._store_gaps()
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=False, cancel_futures=True)
        if self.recorder is not None:
            self.recorder.close()
        self._save_fired()
        # the sinks drain last, after everything the pipeline made has been offered to them
        for sink in (self.store, self.notifier):
            if sink is not None:
                sink.stop(self._sink_timeout)
        self._check_sinks()
        if self._shadow is not None:
            notice = Notice("drift", self._now_ms(), self.drift() or "no bars to compare")
            for out in self.outputs:
                out.status(notice)
        snap = self.snapshot()
        for out in self.outputs:
            out.close(snap)

    def _step(self, timeout: float) -> None:
        """Take what the queue holds (waiting for the first item), then flush when owed."""
        q = self.source.queue
        try:
            item = q.get(timeout=timeout)
        except queue.Empty:
            self._idle()
            return
        items = [item]
        while len(items) < self._max_items:
            try:
                items.append(q.get_nowait())
            except queue.Empty:
                break
        last: Frame | None = None
        for item in items:
            if isinstance(item, Frame | Frames):
                frames = item.frames if isinstance(item, Frames) else (item,)
                if self.recorder is not None:
                    for frame in frames:
                        self.recorder.write(frame)
                self.batcher.add_many(frames)
                last = frames[-1]
                if self.batcher.due():
                    self._flush()
            elif isinstance(item, Notice):
                for out in self.outputs:
                    out.status(item)
            else:
                self._end(item)
        if last is not None and self.live:
            self.feed.lag_ms = max(0, self._now_ms() - last.received)
        if q.empty():
            self._idle()

    def _idle(self) -> None:
        """Nothing is waiting: flush what is old enough and, live, let the clock close bars."""
        if self.batcher.due():
            self._flush()
        if self.live and not self._ended:
            self._bars(self.engine.advance(self._now_ms()))
            if self._shadow is not None:
                self._compare(self._shadow.advance(self._now_ms()))

    def _end(self, item: EndOfStream) -> None:
        self._ended = True
        self._flush()
        if not self.live:  # a replay's end makes every open bar final; a live stop does not
            self._bars(self.engine.finish())
            if self._shadow is not None:
                self._compare(self._shadow.finish())
        if item.error is not None:
            fatal = self.source.fatal
            self._error = fatal if isinstance(fatal, PolystreamError) else FeedError(item.error)

    def _flush(self) -> None:
        if not len(self.batcher):
            return
        batch = self.batcher.flush()
        watched = self._watched
        trades = batch.trades.filter(pl.col("symbol").is_in(watched.implode()))
        quotes = batch.quotes.filter(pl.col("symbol").is_in(watched.implode()))
        self.feed.other_symbols += (
            batch.trades.height - trades.height + batch.quotes.height - quotes.height
        )
        self._track(trades, quotes, batch)
        if self.bar_source == "polygon":
            aggs = batch.aggregates.filter(pl.col("symbol").is_in(watched.implode()))
            self._bars(self.engine.add_aggregates(aggs))
            if self._shadow is not None:
                self._compare(self._shadow.add_trades(trades))
        else:
            self._bars(self.engine.add_trades(trades))
        if self.filters is not None:
            self._alerts(self.filters.on_trades(trades))
            self._alerts(self.filters.on_quotes(quotes))
        if self.store is not None:
            if trades.height:
                self.store.offer("trades", trades)
            if quotes.height:
                self.store.offer("quotes", quotes)
            if batch.books:
                self.store.offer("books", _book_rows(batch.books, self.symbols))

    def _track(self, trades: pl.DataFrame, quotes: pl.DataFrame, batch: Batch) -> None:
        """Dashboard state from a batch: the last trade and quote per symbol, event counts."""
        if trades.height:
            last = trades.group_by("symbol").agg(
                pl.col("price").last(),
                pl.col("size").last(),
                pl.col("side").last(),
                pl.col("time").max(),
                pl.len().alias("n"),
            )
            for sym, price, size, side, t, n in last.iter_rows():
                st = self.symbols[sym]
                st.last_price, st.last_size, st.last_side = price, size, side
                st.trades += n
                st.events += n
                st.last_event_ms = max(st.last_event_ms or 0, t)
        if quotes.height:
            counts = dict(quotes.group_by("symbol").len().iter_rows())
            # the last quote received per symbol is what the dashboard shows
            latest = quote_features(quotes.group_by("symbol").last()).select(
                "symbol", "bid", "ask", "imbalance", "time"
            )
            for sym, bid, ask, imbalance, t in latest.iter_rows():
                st = self.symbols[sym]
                st.bid, st.ask, st.imbalance = bid, ask, imbalance
                st.quotes += counts[sym]
                st.events += counts[sym]
                st.last_event_ms = max(st.last_event_ms or 0, t)
        latest_books: dict[str, Book] = {}
        for sym, book in batch.books:
            book_state = self.symbols.get(sym)
            if book_state is not None:
                book_state.events += 1
                latest_books[sym] = book
        if latest_books:
            features = [
                book_features(sym, b.time, b.bids, b.asks) for sym, b in latest_books.items()
            ]
            for f in features:
                self.symbols[f.symbol].book = f
            for out in self.outputs:
                out.book(features)

    def _bars(self, records: pl.DataFrame) -> None:
        if records.height == 0:
            return
        if self._shadow is not None:
            self._match(records, self._agg_seen, self._trade_seen)
            self.feed.drift = self.drift()
        for out in self.outputs:
            out.bars(records)
        if self.store is not None and records.height:
            self.store.offer("bars", records)
        if self.filters is not None:
            self._alerts(self.filters.on_bars(records))
        primary = records.filter(pl.col("end") - pl.col("start") == self._primary)
        for row in primary.iter_rows(named=True):
            st = self.symbols.get(row["symbol"])
            if st is None:
                continue
            if row["state"] == "final":
                st.bars += 1
            if st.bar is None or row["start"] >= st.bar["start"]:
                st.bar = row

    # -- filters -------------------------------------------------------------------------------

    def _alerts(self, alerts: list[Alert]) -> None:
        if not alerts:
            return
        self._recent.extend(alerts)
        self._fired_dirty = True
        for out in self.outputs:
            out.alerts(alerts)
        if self.store is not None:
            self.store.offer("alerts", _alert_rows(alerts))
        if self.notifier is not None:
            routed = [a for a in alerts if "telegram" in a.notify]
            if routed:
                self.notifier.offer(routed)

    def _repair_gaps(self) -> None:
        """Plan a repair for each new outage, fetch the missing trades once every bar it
        touched is final, and put the rebuilt bars out as `revised`."""
        if self.repair is None:
            return
        gaps = self.source.gaps
        offset = self.engine.offset or 0
        for gap in gaps[self._gaps_seen :]:
            if gap.symbol not in self.symbols:
                continue
            for tf in self.engine.options.timeframes:
                lo = (gap.start + offset) // tf * tf
                hi = (gap.end + offset) // tf * tf + tf
                self._repairs.append(_Repair(gap.symbol, tf, lo, hi))
        self._gaps_seen = len(gaps)
        lateness = self.engine.options.lateness
        for job in list(self._repairs):
            if job.future is None:
                if self.engine.watermark < job.hi + lateness:
                    continue
                if self._fetcher is None:
                    self._fetcher = concurrent.futures.ThreadPoolExecutor(
                        max_workers=1, thread_name_prefix="polystream-repair"
                    )
                job.future = self._fetcher.submit(self._fetch, job)
                continue
            if not job.future.done():
                continue
            self._repairs.remove(job)
            try:
                trades, aggs = job.future.result()
            except PolystreamError as exc:
                self._status("error", f"gap repair of {job.symbol} failed: {exc}")
                continue
            if trades is not None:
                records = self.engine.rebuild(job.symbol, job.tf, job.lo, job.hi, trades)
                source = f"{trades.height:,} trades"
                if self.store is not None and trades.height:
                    # the trades the outage kept from us; those already stored are skipped
                    self.store.offer("trades", trades)
            else:
                records = self.engine.rebuild_from_aggregates(
                    job.symbol, job.tf, job.lo, job.hi, aggs
                )
                source = f"{aggs.height:,} aggregates (trades are not in the plan)"
            self._bars(records)
            self._status(
                "gap_repaired",
                f"{job.symbol} {timeframe_name(job.tf)}: {records.height} bars rebuilt from "
                f"{source}",
            )

    def _fetch(self, job: _Repair) -> tuple[pl.DataFrame | None, pl.DataFrame]:
        """On the repair thread: the outage's trades, or its aggregates when the plan lacks
        trades."""
        from .rest import NotEntitled

        assert self.repair is not None
        try:
            pages = list(self.repair.trades(job.symbol, job.lo, job.hi))
        except NotEntitled:
            aggs = list(self.repair.aggregates(job.symbol, job.tf, job.lo, job.hi))
            return None, pl.concat(aggs) if aggs else pl.DataFrame()
        trades = pl.concat(pages) if pages else pl.DataFrame(schema=TRADE_SCHEMA)
        return trades, pl.DataFrame()

    def _status(self, event: str, detail: str) -> None:
        notice = Notice(event, self._now_ms(), detail)
        for out in self.outputs:
            out.status(notice)

    def _store_gaps(self) -> None:
        gaps = self.source.gaps
        if self.store is None or len(gaps) <= self._gaps_stored:
            return
        new = gaps[self._gaps_stored :]
        self._gaps_stored = len(gaps)
        self.store.offer(
            "gaps",
            pl.DataFrame(
                {
                    "symbol": [g.symbol for g in new],
                    "start": [g.start for g in new],
                    "end": [g.end for g in new],
                },
                schema={"symbol": pl.String, "start": pl.Int64, "end": pl.Int64},
            ),
        )

    def _check_sinks(self) -> None:
        """A sink's fatal error ends the run as one sentence; a notifier's problems (a chat
        that blocked the bot) are shown once each and the run goes on."""
        if self.store is not None and self.store.fatal is not None and self._error is None:
            self._error = self.store.fatal
            self._ended = True
        if self.notifier is not None:
            problems = self.notifier.problems
            for text in problems[self._problems_shown :]:
                notice = Notice("error", self._now_ms(), text)
                for out in self.outputs:
                    out.status(notice)
            self._problems_shown = len(problems)

    def _poll_filters(self) -> None:
        """Pick up added, changed and removed filter files; a broken edit keeps the previous
        version and is reported."""
        if self.watcher is None or self.filters is None:
            return
        events = self.watcher.poll()
        if not events:
            return
        now = self._now_ms()
        if any(e.event != "filter_error" for e in events):
            self.filters.set_filters(self.watcher.filters)
        for e in events:
            notice = Notice(e.event, now, e.detail)
            for out in self.outputs:
                out.status(notice)
        self._report_waiting()

    def _report_waiting(self) -> None:
        if self.filters is None:
            return
        built = " ".join(timeframe_name(tf) for tf in self.engine.options.timeframes)
        waiting = {f.name: f for f in self.filters.waiting}
        for name in sorted(set(waiting) - self._waiting):
            tf = waiting[name].timeframe_name
            notice = Notice(
                "filter_waiting",
                self._now_ms(),
                f"{name} needs {tf} bars, which this run does not build ({built}); "
                f"restart with -t {tf} to run it",
            )
            for out in self.outputs:
                out.status(notice)
        self._waiting = set(waiting)

    def _save_fired(self) -> None:
        if self._state_dir is None or self.filters is None or not self._fired_dirty:
            return
        self._fired_dirty = False
        write_last_fired(self._state_dir, self.filters.last_fired.items())

    def _compare(self, trade_bars: pl.DataFrame) -> None:
        self._match(trade_bars, self._trade_seen, self._agg_seen)

    def _match(
        self,
        records: pl.DataFrame,
        mine: dict[tuple[str, str, int], tuple[float, float]],
        other: dict[tuple[str, str, int], tuple[float, float]],
    ) -> None:
        """Pair trade-built and feed-built bars of the same key and accumulate their drift."""
        rows = records.filter(pl.col("state") != "partial").select(
            "symbol", "timeframe", "start", "close", "volume"
        )
        d = self._drift
        for sym, tf, start, close, volume in rows.iter_rows():
            key = (sym, tf, start)
            theirs = other.pop(key, None)
            if theirs is None:
                mine[key] = (close, volume)
                continue
            agg, trade = (
                ((close, volume), theirs) if mine is self._agg_seen else (theirs, (close, volume))
            )
            if trade[0]:
                rel = abs(agg[0] - trade[0]) / abs(trade[0])
                d.matched += 1
                d.close_sum += rel
                d.close_max = max(d.close_max, rel)
            if trade[1]:
                d.volume_sum += abs(agg[1] - trade[1]) / trade[1]
        for seen in (mine, other):
            while len(seen) > 10_000:  # pairs that never meet are forgotten, oldest first
                seen.pop(next(iter(seen)))

    def drift(self) -> str:
        """How far the feed's aggregates are from trade-built bars, as a sentence fragment."""
        d = self._drift
        if not d.matched:
            return ""
        return (
            f"{d.matched} bars compared: close differs by {d.close_sum / d.matched:.4%} "
            f"on average ({d.close_max:.4%} at most), volume by "
            f"{d.volume_sum / d.matched:.2%}"
        )

    def _refresh(self) -> None:
        now = time.monotonic()
        elapsed = now - self._counted_at
        if elapsed >= 1.0:
            for name, state in self.symbols.items():
                before = self._counted.get(name, state.events)
                state.rate = (state.events - before) / elapsed if self._counted_at else 0.0
                self._counted[name] = state.events
            self._counted_at = now
            self._save_fired()
            self._store_gaps()
            self._check_sinks()
        self._repair_gaps()
        snap = self.snapshot()
        for out in self.outputs:
            out.refresh(snap)


def _book_rows(books: list[tuple[str, Book]], watched: dict[str, SymbolState]) -> pl.DataFrame:
    """Book snapshots of watched symbols as rows for storage, levels as JSON text."""
    encode = msgspec.json.encode
    kept = [(sym, b) for sym, b in books if sym in watched]
    return pl.DataFrame(
        {
            "symbol": [sym for sym, _ in kept],
            "time": [b.time for _, b in kept],
            "exchange": [b.exchange for _, b in kept],
            "bids": [encode(b.bids).decode() for _, b in kept],
            "asks": [encode(b.asks).decode() for _, b in kept],
        },
        schema={
            "symbol": pl.String,
            "time": pl.Int64,
            "exchange": pl.Int16,
            "bids": pl.String,
            "asks": pl.String,
        },
    )


def _alert_rows(alerts: list[Alert]) -> pl.DataFrame:
    """Alerts as rows for storage, their values as JSON text."""
    encode = msgspec.json.encode
    return pl.DataFrame(
        {
            "filter": [a.filter for a in alerts],
            "symbol": [a.symbol for a in alerts],
            "timeframe": [a.timeframe for a in alerts],
            "time": [a.time for a in alerts],
            "severity": [a.severity for a in alerts],
            "message": [a.message for a in alerts],
            "values": [encode(a.values).decode() for a in alerts],
        },
        schema={
            "filter": pl.String,
            "symbol": pl.String,
            "timeframe": pl.String,
            "time": pl.Int64,
            "severity": pl.String,
            "message": pl.String,
            "values": pl.String,
        },
    )


# -- trying filters on a recording -------------------------------------------------------------


class _Collector:
    """An output that keeps alerts and counts final bars (for `replay_filters`)."""

    def __init__(self) -> None:
        self.collected: list[Alert] = []
        self.final_bars = 0

    def status(self, notice: Notice) -> None:
        pass

    def bars(self, records: pl.DataFrame) -> None:
        self.final_bars += records.filter(pl.col("state") == "final").height

    def book(self, features: list[BookFeatures]) -> None:
        pass

    def alerts(self, alerts: list[Alert]) -> None:
        self.collected += alerts

    def refresh(self, snapshot: Snapshot) -> None:
        pass

    def close(self, snapshot: Snapshot) -> None:
        pass


def recording_symbols(path: Path) -> list[str]:
    """The symbols whose trades or quotes a recording holds, in order of first appearance."""
    decoder = Decoder()
    seen: dict[str, None] = {}
    for frame in read_recording(path):
        for event in decoder.decode(frame.data):
            pair = getattr(event, "pair", None)
            if isinstance(pair, str) and pair not in seen:
                seen[pair] = None
    return [from_pair(p) for p in seen]


def replay_filters(
    path: Path,
    filters: Sequence[Filter],
    symbols: Sequence[str] | None = None,
    *,
    params: IndicatorParams | None = None,
) -> tuple[list[Alert], int]:
    """Replay a recording through the whole pipeline with `filters` attached: the alerts they
    would have raised, and how many final bars were built."""
    p = params or IndicatorParams()
    timeframes = tuple(sorted({f.timeframe or 60_000 for f in filters if f.on == "bar"})) or (
        60_000,
    )
    watched = list(symbols) if symbols else recording_symbols(path)
    collector = _Collector()
    pipeline = Pipeline(
        ReplaySource(path),
        watched,
        [collector],
        bars=BarOptions(timeframes=timeframes, params=p),
        live=False,
        filters=FilterEngine(filters, params=p, timeframes=timeframes),
    )
    pipeline.run()
    return collector.collected, collector.final_bars
