"""`watch --metrics [HOST:]PORT`: Prometheus metrics on `/metrics` and the run's health on
`/healthz`, served over HTTP from a daemon thread (`polystream-metrics`).

The pipeline thread never waits for a scrape. On every tick (about four times a second) and at
the end, `MetricsSink` builds one snapshot of the run (the view's counters, what the sink counted
in the outputs, the database writer's and the Telegram notifier's statistics, and the health
verdict) and swaps it in whole; scrapes read the latest one. So the counters equal the run's own
summary (`View.feed`): they are the same numbers, taken at the same moment. Only the histograms
(events per pass, pass time, trade-to-alert latency) are observed as things happen, through
`prometheus_client`'s own locks.

The server is bound when the sink is made (an address in use is an error before the run starts)
and serves until `stop`: `app.open_run` stops it when its context exits, so the final values can
still be scraped after `Pipeline.run` returned. Each sink has its own `CollectorRegistry`, so
several runs in one process do not collide.

`/healthz` answers 200 with `{"status": "ok", "reasons": [], "feed": STATE, ...}` while the run
is healthy, and 503 with `"status": "unhealthy"` and the reasons otherwise: the feed has sent
no data for longer than the watchdog (`sinks.feed_down`); the feed client failed, or stopped
before the run ended; the database writer failed or lost its connection; the Telegram notifier
stopped or was refused the bot token; the pipeline has not ticked for `STALE` seconds (or the
watchdog, when longer); the run has ended. Label values and reasons never hold a secret: labels
are channels, timeframes, bar states, filter names, severities, tables and status events, and
the writer's and the notifier's sentences are written without the password or the token.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import msgspec
from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from .config import parse_timeframe
from .errors import ConfigError, UsageError
from .schema import Notice
from .serve import parse_address
from .sinks import BaseSink, FeedState, Output, View, feed_down

if TYPE_CHECKING:
    from .notify import NotifyStats, TelegramNotifier
    from .pipeline import Pipeline
    from .store import Store, StoreStats

# Seconds without a tick after which the pipeline counts as stuck (the watchdog, when longer).
STALE = 10.0
# How often the server's thread looks whether it is asked to stop.
POLL = 0.2
PASS_EVENTS_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
PASS_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def parse_metrics_address(text: str) -> tuple[str, int]:
    """`9100`, `0.0.0.0:9100`, `[::1]:9100` → (host, port), as `serve.parse_address` reads
    them; the error names --metrics."""
    try:
        return parse_address(text)
    except UsageError:
        raise UsageError(
            f"Invalid --metrics {text!r}: give a port (9100), HOST:PORT (127.0.0.1:9100) or "
            "[IPv6]:PORT ([::1]:9100), the port from 0 (any free one) to 65535."
        ) from None


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Health(msgspec.Struct, frozen=True):
    """The verdict of `/healthz`: healthy when there are no `reasons`."""

    reasons: tuple[str, ...]
    feed: str
    quiet_seconds: float
    watchdog_seconds: float
    events: int
    alerts: int

    @property
    def ok(self) -> bool:
        return not self.reasons

    def body(self, extra: Sequence[str] = ()) -> bytes:
        """The JSON answer, with `extra` reasons found when it is asked for."""
        reasons = [*self.reasons, *extra]
        fields = msgspec.structs.asdict(self)
        fields.update(status="unhealthy" if reasons else "ok", reasons=reasons)
        order = ("status", "reasons", "feed")
        return msgspec.json.encode({k: fields[k] for k in (*order, *fields) if k in fields})


class _Snapshot(msgspec.Struct, frozen=True):
    """Everything a scrape shows but the histograms, as of one tick (see the module docstring)."""

    feed: FeedState
    channels: dict[str, int]
    bars: dict[tuple[str, str], int]
    alerts: dict[tuple[str, str], int]
    gap_seconds: float
    filter_events: dict[str, int]
    trade_lag: float | None  # the pipeline's now − the latest trade's time, seconds
    receipt_delay: float | None  # that trade's receipt time − its time, seconds
    store: StoreStats | None
    telegram: NotifyStats | None
    health: Health
    taken: float  # time.monotonic() when it was made
    closed: bool


def _health(
    feed: FeedState,
    closed: bool,
    store: Store | None,
    stats: StoreStats | None,
    notifier: TelegramNotifier | None,
) -> Health:
    reasons = []
    down = feed_down(feed)
    if down is not None:
        reasons.append(f"the feed is down: {down}")
    if feed.state == "failed" or (feed.state == "stopped" and not closed):
        reasons.append(f"the feed client has {feed.state}")
    if store is not None and stats is not None:
        if store.fatal is not None:
            reasons.append(f"the database writer failed: {store.fatal}")
        elif not stats.connected and stats.last_error:
            reasons.append(f"the database writer is disconnected: {stats.last_error}")
    if notifier is not None and (notifier.fatal or notifier.halted):
        why = notifier.problems[-1] if notifier.problems else "it stopped"
        reasons.append(f"the Telegram notifier halted: {why}")
    if closed:
        reasons.append("the run has ended")
    return Health(
        tuple(reasons),
        feed.state,
        feed.quiet_ms / 1000,
        feed.watchdog_ms / 1000,
        feed.events,
        feed.alerts,
    )


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _labelled(
    family: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    labels: Sequence[str],
    values: Iterable[tuple[Sequence[str], float]],
) -> Metric:
    metric = family(name, doc, labels=labels)
    for label_values, value in sorted(values):
        metric.add_metric(list(label_values), value)
    return metric


class _RunCollector(Collector):
    """The snapshot's metrics, for the registry; `snapshot` is replaced whole by the sink."""

    def __init__(self, snapshot: _Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        f = s.feed
        # every event counted has a channel; what no channel accounts for would show as "other"
        channels = {c: n for c, n in s.channels.items() if n}
        rest = f.events - sum(channels.values())
        if rest:
            channels["other"] = channels.get("other", 0) + rest
        yield _labelled(
            CounterMetricFamily,
            "polystream_events",
            "Events decoded, by channel (the feed's ev); rejected ones are not counted.",
            ["channel"],
            (((c,), n) for c, n in channels.items()),
        )
        yield _counter("polystream_frames", "Frames received.", f.frames)
        yield _counter("polystream_rejected_events", "Events rejected as invalid.", f.rejected)
        yield _counter(
            "polystream_malformed_frames", "Frames that were not JSON.", f.malformed_frames
        )
        yield _counter(
            "polystream_other_symbol_events",
            "Events of symbols the run does not watch, dropped.",
            f.other_symbols,
        )
        yield _counter("polystream_reconnects", "Reconnections to the feed.", f.reconnects)
        yield _counter("polystream_gaps", "Feed outages per symbol.", f.gaps)
        yield _counter(
            "polystream_gap_seconds",
            "Sum of the lengths of the feed's outages (per symbol).",
            s.gap_seconds,
        )
        yield _counter(
            "polystream_late_trades", "Trades too late for their bar, left out.", f.too_late
        )
        yield _counter(
            "polystream_ahead_trades", "Trades stamped too far ahead, left out.", f.ahead
        )
        yield _labelled(
            CounterMetricFamily,
            "polystream_bars",
            "Bar records emitted, by timeframe and state (final, revised, partial).",
            ["timeframe", "state"],
            s.bars.items(),
        )
        yield _labelled(
            CounterMetricFamily,
            "polystream_alerts",
            "Alerts raised, by filter and severity.",
            ["filter", "severity"],
            s.alerts.items(),
        )
        reloads = {e: n for e, n in s.filter_events.items() if e != "filter_error"}
        yield _labelled(
            CounterMetricFamily,
            "polystream_filter_reloads",
            "Filter files picked up while running, by status event.",
            ["event"],
            (((e,), n) for e, n in reloads.items()),
        )
        yield _counter(
            "polystream_filter_errors",
            "Filter files found invalid while running (the previous version kept running).",
            s.filter_events.get("filter_error", 0),
        )
        yield _gauge("polystream_filters", "Filters loaded.", f.filters)
        yield _labelled(
            GaugeMetricFamily,
            "polystream_feed_state",
            "The feed client's state: 1 for the current one.",
            ["state"],
            [((f.state,), 1)],
        )
        yield _gauge(
            "polystream_feed_quiet_seconds",
            "Seconds since the latest frame arrived (live runs).",
            f.quiet_ms / 1000,
        )
        if s.trade_lag is not None and s.receipt_delay is not None:
            yield _gauge(
                "polystream_feed_lag_seconds",
                "The pipeline's clock minus the time of the latest trade (in a replay, "
                "minus the recording's time).",
                s.trade_lag,
            )
            yield _gauge(
                "polystream_feed_receipt_delay_seconds",
                "Receipt time minus event time of the latest trade.",
                s.receipt_delay,
            )
        yield _gauge("polystream_queue_depth", "Items waiting for the pipeline.", f.queue_depth)
        yield _gauge(
            "polystream_queue_capacity", "Items that can wait for the pipeline.", f.queue_size
        )
        yield _gauge("polystream_healthy", "1 when /healthz answers 200.", int(s.health.ok))
        if s.store is not None:
            yield from self._store(s.store)
        if s.telegram is not None:
            yield from self._telegram(s.telegram)

    @staticmethod
    def _store(st: StoreStats) -> Iterator[Metric]:
        yield _labelled(
            CounterMetricFamily,
            "polystream_store_rows",
            "Rows the database writer inserted or changed, by table.",
            ["table"],
            (((t,), n) for t, n in st.rows_by_table.items()),
        )
        yield _gauge(
            "polystream_store_journal_bytes", "Bytes waiting in the journal.", st.journal_bytes
        )
        yield _gauge(
            "polystream_store_journal_rows", "Rows waiting in the journal.", st.journal_rows
        )
        yield _gauge(
            "polystream_store_connected", "1 while connected to the database.", int(st.connected)
        )
        yield _counter(
            "polystream_store_reconnects", "Reconnections to the database.", st.reconnects
        )

    @staticmethod
    def _telegram(t: NotifyStats) -> Iterator[Metric]:
        yield _counter("polystream_telegram_sent", "Telegram messages accepted.", t.sent)
        yield _counter(
            "polystream_telegram_retries",
            "Telegram requests repeated (429, 5xx, network).",
            t.retried,
        )
        yield _counter("polystream_telegram_throttled", "429 answers from Telegram.", t.throttled)
        yield _counter(
            "polystream_telegram_failed", "Alerts given up on after a refusal.", t.failed
        )
        yield _gauge(
            "polystream_telegram_outbox", "Alerts (per chat) waiting in the outbox.", t.pending
        )


class _Quiet(WSGIRequestHandler):
    """No line on stderr per request."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingWSGIServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-answer is no news


class _Server6(_Server):
    address_family = socket.AF_INET6


StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class MetricsSink(BaseSink):
    """`--metrics`: see the module docstring. Made with the pipeline it observes (before its
    run), the run's database writer and Telegram notifier, if any; a context manager that stops
    the server on exit."""

    name = "metrics"

    def __init__(
        self,
        address: str,
        pipeline: Pipeline,
        store: Store | None = None,
        notifier: TelegramNotifier | None = None,
    ) -> None:
        host, port = parse_metrics_address(address)
        self.store = store
        self.notifier = notifier
        self._live = pipeline.live
        self._stages = pipeline.stages
        self._stale = max(STALE, pipeline.watchdog)
        self.registry = CollectorRegistry()
        self._pass_events = Histogram(
            "polystream_pass_events",
            "Events per pass (the batch the pipeline takes at once).",
            buckets=PASS_EVENTS_BUCKETS,
            registry=self.registry,
        )
        self._pass_seconds = Histogram(
            "polystream_pass_duration_seconds",
            "Seconds a pass takes, from its frames to its outputs handed to every sink.",
            buckets=PASS_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._latency = Histogram(
            "polystream_alert_latency_seconds",
            "Live runs: the wall clock as an alert reaches the sinks minus its trade's or "
            "quote's time, or minus its bar's end.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._channels: dict[str, int] = {}
        self._bars: collections.Counter[tuple[str, str]] = collections.Counter()
        self._alerts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._filter_events: collections.Counter[str] = collections.Counter()
        self._gap_ms = 0
        self._trade: tuple[int, int] | None = None  # (time, received) of the latest trade
        self._tf_ms: dict[str, int] = {}
        self._closed = False
        empty = FeedState()
        self._collector = _RunCollector(self._snapshot(empty, 0))
        self.registry.register(self._collector)
        self._metrics_app = make_wsgi_app(self.registry)
        self._server = self._bind(host, port)
        self.url = http_url(host, self._server.server_address[1])
        self._announced = False
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(POLL,), name="polystream-metrics", daemon=True
        )
        self._thread.start()
        pipeline.on_pass.append(self._passed)

    def _bind(self, host: str, port: int) -> _Server:
        server_class = _Server6 if ":" in host else _Server
        try:
            server = make_server(host, port, self._app, server_class, handler_class=_Quiet)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).rstrip(".").lower()
            raise ConfigError(
                f"Cannot serve metrics on {http_url(host, port)}: {reason}; give --metrics "
                "another [HOST:]PORT."
            ) from None
        assert isinstance(server, _Server)
        return server

    def __enter__(self) -> MetricsSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving (the final values stay readable in `registry`)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5.0)
        self._server.server_close()

    # -- HTTP, on the server's threads ---------------------------------------------------------

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/healthz":
            return self._healthz(start_response)
        if path in ("/metrics", "/"):
            result: Iterable[bytes] = self._metrics_app(environ, start_response)
            return result
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"Not found: polystream serves /metrics and /healthz.\n"]

    def _healthz(self, start_response: StartResponse) -> list[bytes]:
        snapshot = self._collector.snapshot
        extra = []
        idle = time.monotonic() - snapshot.taken
        if not snapshot.closed and idle > self._stale:
            extra.append(f"the pipeline has not ticked for {idle:.0f} s")
        body = snapshot.health.body(extra)
        ok = snapshot.health.ok and not extra
        start_response(
            "200 OK" if ok else "503 Service Unavailable",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [body]

    # -- the sink, on the pipeline thread ------------------------------------------------------

    def _passed(self, frames: int, events: int, seconds: float) -> None:
        self._pass_events.observe(events)
        self._pass_seconds.observe(seconds)

    def write(self, out: Output) -> None:
        trades = out.trades
        if trades is not None and trades.height:
            self._trade = (trades.get_column("time")[-1], trades.get_column("received")[-1])
        if out.bars is not None and out.bars.height:
            bars = out.bars
            self._bars.update(
                zip(
                    bars.get_column("timeframe").to_list(),
                    bars.get_column("state").to_list(),
                    strict=True,
                )
            )
        if out.alerts:
            self._alerts.update((a.filter, a.severity) for a in out.alerts)
            if self._live:
                self._alert_latency(out)
        for gap in out.gaps:
            self._gap_ms += max(0, gap.end - gap.start)
        for notice in out.notices:
            if notice.event.startswith("filter_") and notice.event != "filter_waiting":
                self._filter_events[notice.event] += 1

    def _alert_latency(self, out: Output) -> None:
        now = time.time() * 1000
        observe = self._latency.observe
        for alert in out.alerts:
            if alert.timeframe is None:
                observe(max(0.0, now - alert.time) / 1000)
            else:
                observe(max(0.0, now - alert.time - self._timeframe_ms(alert.timeframe)) / 1000)

    def _timeframe_ms(self, name: str) -> int:
        ms = self._tf_ms.get(name)
        if ms is None:
            ms = self._tf_ms[name] = parse_timeframe(name)
        return ms

    def tick(self, view: View) -> Sequence[Notice]:
        self._collector.snapshot = self._snapshot(view.feed, view.now_ms)
        if self._announced:
            return ()
        self._announced = True
        detail = f"serving /metrics and /healthz on {self.url}"
        return [Notice("metrics", view.now_ms, detail)]

    def close(self, view: View) -> Sequence[Notice]:
        """The final values; the server keeps serving them until `stop`."""
        self._closed = True
        self._collector.snapshot = self._snapshot(view.feed, view.now_ms)
        return ()

    def _snapshot(self, feed: FeedState, now_ms: int) -> _Snapshot:
        trade = self._trade
        notifier = self.notifier
        stored = self.store.stats if self.store is not None else None
        return _Snapshot(
            feed=feed,
            channels=dict(self._stages.decoder.stats.channels),
            bars=dict(self._bars),
            alerts=dict(self._alerts),
            gap_seconds=self._gap_ms / 1000,
            filter_events=dict(self._filter_events),
            trade_lag=None if trade is None else (now_ms - trade[0]) / 1000,
            receipt_delay=None if trade is None else (trade[1] - trade[0]) / 1000,
            store=stored,
            telegram=notifier.stats if notifier is not None else None,
            health=_health(feed, self._closed, self.store, stored, notifier),
            taken=time.monotonic(),
            closed=self._closed,
        )
