"""`watch --from nats://… [SYMBOL…]` without `--shard`: a read-only view of what the shards
publish (see `wire`). Result records in, from the start of the results stream, on a pull
consumer each for bars, alerts, books and status (per given symbol, status always); out, the
same dashboard or plain lines a `watch` shows, and with `--json` the records exactly as the
shards published them. Reader threads pull; the sinks run on the calling (main) thread.
"""

from __future__ import annotations

import math
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec
import polars as pl

from . import display, wire
from .bus import Bus, BusError, Message
from .errors import PolystreamError
from .features import BookFeatures
from .pipeline import STOP_SIGNALS
from .schema import BAR, Alert, Notice
from .sinks import FeedState, Output, Sink, Sinks, View
from .symbols import normalize

TICK = 0.25  # seconds between the sinks' ticks
PROBE = 0.5  # seconds between looks for the results stream
PULL = 256  # messages per pull
PULL_WAIT = 0.5  # seconds a pull waits for messages
QUEUE = 64  # pulled batches waiting for the main thread
WARMUP = 34  # bars the slowest default indicator (AO 5/34) needs
# Any subject of the results stream: asking for its last message tells whether the stream
# exists.
_PROBE_SUBJECT = "polystream.status.viewer"

_RECORD = msgspec.json.Decoder(dict[str, Any])
_TYPES: dict[Any, Any] = {pl.String: str, pl.Int64: int, pl.Float64: float | None}
_BAR_RECORD = msgspec.defstruct("BarRecord", [(c, _TYPES[t]) for c, t in BAR.items()])
"""The leading columns of a bar record (`schema.BAR`), to check a record's types before it
joins a frame: one bad record must cost that record, not the batch."""


class Records(NamedTuple):
    """What a batch of result records becomes: the output for the displays, the valid records
    as received (for `--json`), and how many were not valid."""

    output: Output
    valid: list[bytes]
    rejected: int


def read_records(records: Sequence[bytes]) -> Records:
    """Result records (`watch --json` lines, one per message) back into an `Output`. Every
    alert is routed to the console: a record does not carry its filter's notify list."""
    bars: list[dict[str, Any]] = []
    alerts: list[Alert] = []
    books: list[BookFeatures] = []
    notices: list[Notice] = []
    valid: list[bytes] = []
    for data in records:
        try:
            record = _RECORD.decode(data)
            kind = record.get("type")
            if kind == "bar":
                bars.append(_bar(record))
            elif kind == "alert":
                alerts.append(msgspec.convert({**record, "notify": ["console"]}, Alert))
            elif kind == "book":
                books.append(msgspec.convert(record, BookFeatures))
            elif kind == "status":
                notices.append(msgspec.convert(record, Notice))
            else:
                continue
        except msgspec.MsgspecError:
            continue
        valid.append(data)
    output = Output(
        bars=_bar_frame(bars) if bars else None,
        alerts=alerts,
        book_features=books,
        notices=notices,
    )
    return Records(output, valid, len(records) - len(valid))


def _bar(record: dict[str, Any]) -> dict[str, Any]:
    """The record, once its columns have the types of a bar record's."""
    msgspec.convert(record, _BAR_RECORD)
    extra = {k: v for k, v in record.items() if k not in BAR and k != "type"}
    msgspec.convert(extra, dict[str, float | None])
    return record


def _bar_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Bar records as `watch` makes them: `schema.BAR`, then the indicator columns."""
    extra = dict.fromkeys(k for row in rows for k in row if k not in BAR and k != "type")
    return pl.DataFrame(rows, schema={**BAR, **dict.fromkeys(extra, pl.Float64)})


def subjects(symbols: Sequence[str]) -> list[str]:
    """The filter subject of each consumer: bars, alerts and books of every symbol, or of each
    given one; status always."""
    if not symbols:
        return list(wire.OUT_SUBJECTS)
    per_symbol = [
        subject
        for s in symbols
        for subject in (f"polystream.bar.*.{s}", f"polystream.alert.*.{s}", f"polystream.book.{s}")
    ]
    return [*per_symbol, "polystream.status.>"]


class Viewer:
    """Shows the results stream on `sinks` (and prints it on `printer`) until `run`'s duration
    is over or a stop signal comes."""

    def __init__(
        self,
        bus: Bus,
        symbols: Sequence[str],
        sinks: Sinks,
        printer: display.RawJsonLines | None = None,
    ) -> None:
        self.bus = bus
        self.symbols = tuple(symbols)
        self.sinks = sinks
        self.printer = printer
        self.feed = FeedState(state="waiting")
        self.signal: int | None = None
        self.fatal: PolystreamError | None = None
        self._seen: dict[str, None] = dict.fromkeys(self.symbols)
        self._timeframes: dict[str, None] = {}
        self._queue: queue.Queue[list[Message]] = queue.Queue(QUEUE)
        self._stop = threading.Event()
        self._readers: list[threading.Thread] = []
        self._said_waiting = False

    def run(self, duration: float | None) -> int:
        """Show the results; the exit code: 0, or 128 + the signal that stopped it."""
        stop_at = math.inf if duration is None else time.monotonic() + duration
        previous = self._catch_signals()
        error: PolystreamError | None = None
        try:
            self._loop(stop_at)
        except KeyboardInterrupt:
            self.signal = self.signal or signal.SIGINT
        except PolystreamError as exc:  # the reader of the JSON lines went away
            error = exc
        finally:
            try:
                self._close()
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
        error = error or self.fatal or self.sinks.error
        if error is not None:
            raise error
        return 128 + self.signal if self.signal else 0

    def view(self) -> View:
        now_ms = int(time.time() * 1000)
        return View(now_ms, tuple(self._seen), tuple(self._timeframes), WARMUP, self.feed)

    def _loop(self, stop_at: float) -> None:
        next_tick = next_probe = time.monotonic()
        while self.signal is None and self.fatal is None and self.sinks.error is None:
            now = time.monotonic()
            if now >= stop_at:
                return
            if not self._readers and now >= next_probe:
                next_probe = now + PROBE
                self._start_when_ready()
            if now >= next_tick:
                next_tick = now + TICK
                self.sinks.tick(self.view())
            self._take(max(0.0, min(next_tick, stop_at) - time.monotonic()))

    def _start_when_ready(self) -> None:
        """Start a reader per consumer once the results stream exists (as the shards do, any
        failure to look is taken for "not yet": the bus reconnects by itself)."""
        try:
            self.bus.last(wire.OUT_STREAM, _PROBE_SUBJECT)
        except BusError:
            if not self._said_waiting:
                self._said_waiting = True
                display.note(f"waiting for shards to publish on {self.bus.shown}")
            return
        for k, subject in enumerate(subjects(self.symbols)):
            reader = threading.Thread(
                target=self._read, args=(subject,), name=f"polystream-view-{k}", daemon=True
            )
            self._readers.append(reader)
            reader.start()

    def _read(self, subject: str) -> None:
        """On a reader thread: pull `subject`'s records from the stream's start."""
        try:
            while not self._stop.is_set():
                pulled = self.bus.pull(
                    wire.OUT_STREAM, None, subject, batch=PULL, timeout=PULL_WAIT
                )
                while pulled and not self._stop.is_set():
                    try:
                        self._queue.put(pulled, timeout=PULL_WAIT)
                        pulled = []
                    except queue.Full:
                        continue
        except PolystreamError as exc:
            if not self._stop.is_set():
                self.fatal = self.fatal or exc

    def _take(self, timeout: float) -> None:
        """Show what the readers have pulled, waiting up to `timeout` for the first of it."""
        if not self._readers:
            time.sleep(timeout)
            return
        try:
            messages = self._queue.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            try:
                messages += self._queue.get_nowait()
            except queue.Empty:
                break
        self._show(sorted(messages, key=lambda m: m.seq))  # as published, across consumers

    def _show(self, messages: list[Message]) -> None:
        records = read_records([m.data for m in messages])
        if self.printer is not None:
            self.printer.lines(records.valid)
        out = records.output
        self._count(out, records.rejected)
        self.sinks.write(out)
        for m in messages:
            m.ack()

    def _count(self, out: Output, rejected: int) -> None:
        feed = self.feed
        feed.state = "streaming"
        feed.rejected += rejected
        feed.alerts += len(out.alerts)
        self._seen.update(dict.fromkeys(a.symbol for a in out.alerts))
        self._seen.update(dict.fromkeys(f.symbol for f in out.book_features))
        if out.bars is not None:
            feed.bars += out.bars.height
            self._seen.update(dict.fromkeys(out.bars.get_column("symbol").to_list()))
            self._timeframes.update(dict.fromkeys(out.bars.get_column("timeframe").to_list()))

    def _close(self) -> None:
        self._stop.set()
        for reader in self._readers:
            reader.join(PULL_WAIT + 2.0)
        self.feed.state = "stopped"
        self.sinks.close(self.view)

    def _catch_signals(self) -> dict[int, Any]:
        """On the main thread, make the first stop signal a request to stop (checked between
        passes) and the second an interrupt. Returns the handlers it replaced."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def again(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        def first(signum: int, frame: object) -> None:
            self.signal = signum
            for sig in STOP_SIGNALS:
                signal.signal(sig, again)

        return {sig: signal.signal(sig, first) for sig in STOP_SIGNALS}


def _displays(symbols: Sequence[str], ui: str, json: bool, utc: bool) -> list[Sink]:
    """Plain lines or the dashboard on stderr, chosen as `watch` chooses them: JSON lines on a
    terminal leave no room for the dashboard."""
    if ui == "lines" or (json and sys.stdout.isatty()):
        return [display.TextLog(bars=not json, utc=utc)]
    if ui == "dashboard":
        return [display.ResultsDashboard(symbols, utc=utc)]
    return []


def view_results(
    url: str, symbols: Sequence[str], *, ui: str, json: bool, duration: float | None, utc: bool
) -> int:
    """`watch --from URL [SYMBOL…]`: show what the shards publish on the NATS server at `url`
    (only `symbols`' records, when given; status always) until `duration` seconds are over or
    a stop signal comes; the exit code."""
    wanted = tuple(dict.fromkeys(normalize(s) for s in symbols))
    with Bus(url, name="polystream-viewer") as bus:
        printer = display.RawJsonLines() if json else None
        viewer = Viewer(bus, wanted, Sinks(_displays(wanted, ui, json, utc)), printer)
        return viewer.run(duration)
