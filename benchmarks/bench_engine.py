"""End-to-end throughput and memory benchmark of the polystream pipeline on a replayed recording.

One run, one seeded and realistic crypto stream over X:BTCUSD, X:ETHUSD and X:SOLUSD (feed pairs
BTC-USD, ETH-USD, SOL-USD): ~75% XT trades (string ids, side conditions [1] or [2], fractional
sizes), ~25% XQ quotes, in JSON-array frames of 1-20 events spanning at most 50 ms. Event time
advances at about `--rate` (300) events/s per symbol, in calmer and busier spells with the odd
lull, so 2 M events span about half an hour and 10 M about three hours, and 1 s, 1 m and 5 m bars
all close many times. Each frame's receipt time is its latest event time plus a few ms of latency;
about one trade in a thousand arrives up to 1.5 s late, inside the allowed lateness of 2 s, so
the watermark has to hold bars open for it. The stream is generated and written (untimed,
streamed, never held in memory) with polystream's `Recorder` to a plain recording in a temporary
directory.

It measures:

1. Throughput, best of `--repeat` runs, by default not pinned: every thread of the process may run
   on every CPU it is allowed, as a user runs it (the bar engine's thread and polars' pool use a
   second core); `--cpu N` pins every thread to CPU N instead. Which it used is printed.
   - end to end: ``Pipeline(ReplaySource(path), Stages(symbols, BarOptions(timeframes=(1000,
     60000, 300000)), min_pending=REPLAY_PENDING), [], live=False).run()``, as ``polystream
     watch --feed FILE`` sets it up: read, decode, columns, bars at 1 s, 1 m and 5 m and every
     oscillator on the bar engine's thread; the final bar count is checked against the stream's
     event-time span, and the peak RSS (``ru_maxrss``) of those runs is reported;
   - reading alone: ``read_recording`` iterated, and ``ReplaySource.take(0.1, 24_000_000, 0.05)``
     called until ``EndOfStream`` with no processing: reading and chunking into passes of up to
     ``Pipeline.max_bytes``, on the thread that calls it (in a run, the pipeline thread);
   - in memory, over the recording's frames read beforehand in the passes that ``take`` makes:
     ``Decoder().decode`` alone; ``Batcher(symbols).build`` of each pass (decode and columns);
     and ``BarEngine.add_trades`` of each pass's trades plus ``finish``;
   then each stage's share of the end-to-end time, and the ratios of end to end to each stage.
2. Memory: in a fresh interpreter (so that what the sections above freed but the allocator kept
   does not count), an end-to-end run over `--memory-events` events from a longer recording, with
   RSS sampled by a sink given to the pipeline at ten checkpoints by events (counted in the trade
   and quote rows it is handed, so they fall at the ends of passes, about 200,000 events each: a
   run of fewer than ten passes has fewer), and its growth from the first checkpoint to the last.
3. Filters (`--filters K`, default 50; 0 skips it): the end-to-end run above, on the same CPUs,
   without filters and with K filters attached through a ``FilterEngine`` given to ``Stages``,
   alternately, best of `--repeat` each; a sink given to both counts the alerts. The filters are
   the first K of a pool of 50 written as filter-file YAML and read with ``parse_filter`` (past
   50, renamed copies of the pool): 40 on bars at 1 s, 1 m and 5 m (RSI extremes, MACD,
   Stochastic and AO crosses, CCI beyond +-100, Bollinger breakouts and %B, some with indicator
   parameters other than the run's such as rsi(7), macd(5, 35, 5), ema(50) or bb_upper(20, 2.5),
   and lookbacks such as prev, pct_change, highest, lowest and sma(volume, 20); edge and level
   triggers, some cooldowns), 5 on trades (whale notional, large buys or sells, price spikes
   over 50 trades) and 5 on quotes (wide spreads, book imbalance, mid drops). It reports both
   rates and their ratio against the target, and the alerts per kind of row.
4. A summary against the targets: >= 1,000,000 events/s end to end in-process, memory flat over
   the memory run (RSS growth <= `--flat-mib`), and with the filters >= 70% of the rate without.

Run from the project root:

    . .venv/bin/activate
    python benchmarks/bench_engine.py [--events N] [--memory-events M] [--filters K]
        [--repeat R] [--cpu C] [--tmp DIR]

The defaults (2 M events timed, 10 M for memory, 50 filters) take about six minutes, most of it
writing the recordings. The exit code is always 0: this reports numbers, it does not gate anything.

With `--command`, it runs none of the above and times instead the real command as a user runs
it, against a plain msgspec decode of the same frames in the same run:

- the command: ``polystream watch X:BTCUSD X:ETHUSD X:SOLUSD --feed REC --no-ui --json -t 1s
  -t 1m -t 5m --filters EMPTY_DIR``, started as a new process with stdout to /dev/null and stderr
  on a pseudo-terminal that a thread drains (so its human-readable lines are rendered for a
  terminal, as a user sees them), from a fresh empty working directory (no ./filters, no .env)
  with an empty filters directory, POLYSTREAM_STATE_DIR set to a fresh empty directory, and
  this environment without DATABASE_URL, POLYGON_*, MASSIVE_*, TELEGRAM_*, POLYSTREAM_*,
  PYTHONPATH and PYTHONHOME: so 0 filters, no storage, no notifier. Its wall time runs from just
  before the process starts to its exit, start-up included. Each run must exit 0 and its final
  summary line must name the number of events the plain decode counted; a run that does not is
  reported with the terminal's last lines and not counted. Each run also reports its start-up
  (to its first output), CPU time (``wait4``) and peak RSS (VmHWM from /proc/PID/status, read
  every 50 ms; ``ru_maxrss`` would not do, since exec carries the parent's peak over);
- the plain decode: every frame of the recording read into memory beforehand with
  ``read_recording`` (untimed), then ``msgspec.json.Decoder(list[polystream.events.Event])``,
  built once, decoding them one call per frame;
- best of `--repeat` each, in alternating rounds so that the machine's noise hits both; their
  events/s and the ratio command / decode, against the targets: >= 750,000 events/s and a ratio
  >= 0.3. `--baseline EXE` times a second polystream executable in the same rounds and prints its
  rate, its ratio to the decode and the speed-up of `--polystream` over it;
- memory: the command once over `--memory-events` events (10 M by default, 0 skips it), with the
  child's VmRSS read every 0.5 s, shown at ten evenly spaced checkpoints of the run's wall time;
  flat means a growth of at most `--flat-mib` from the first checkpoint sampled after start-up
  to the last.

The recordings (`--events` and `--memory-events` events, this file's generator) are written to
`--tmp` (default: the system's temporary directory) under a name made of their event count, seed
and rate, and kept there: a later run with the same parameters reuses them (a 10 M one is about
1.2 GB). `--recording FILE` times over a given recording instead. The command mode needs only
`polystream.events` and `polystream.record` (and `polystream.source` for the writer) from the
package, not the in-process API the sections above use, nor bench_decode:

    python benchmarks/bench_engine.py --command [--events N] [--memory-events M] [--repeat R]
        [--polystream EXE] [--baseline EXE] [--extra OPTIONS] [--recording FILE] [--tmp DIR]
        [--cpu C]

`--extra` adds options to the timed executable's `watch` only: with `--baseline` the same
executable, the rounds show what those options cost (`--extra '--metrics 127.0.0.1:0'`).

`--polystream` defaults to the `polystream` script beside this Python. The command is not pinned
unless `--cpu` is given (then this process and, by inheritance, the command run on that CPU).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import random
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import polars as pl
from common import cpu_model, fmt_rate, version

from polystream.events import Event
from polystream.record import Recorder, read_recording
from polystream.source import Frame

# What only the in-process sections use. `--command` runs without these modules, so that it works
# whatever becomes of their API (or of the environment bench_decode needs).
try:
    from polystream.app import REPLAY_PENDING
    from polystream.batch import Batcher
    from polystream.config import timeframe_name
    from polystream.decode import Decoder
    from polystream.filters import Filter, FilterEngine, parse_filter
    from polystream.pipeline import Pipeline
    from polystream.record import ReplaySource
    from polystream.schema import Notice
    from polystream.sinks import BaseSink, Output, Sink, View
    from polystream.source import EndOfStream, Frames
    from polystream.stages import Stages
    from polystream.window import BarEngine, BarOptions
except Exception as exc:  # a package half-way through a change can fail in any way on import
    IN_PROCESS_IMPORT_ERROR: Exception | None = exc
    # The sinks below subclass it: a stand-in lets this module load for `--command` regardless.
    BaseSink = object  # type: ignore[assignment,misc]
else:
    IN_PROCESS_IMPORT_ERROR = None

TARGET_EVENTS_PER_S = 1_000_000  # end to end, in-process
FILTERS_MIN_RATIO = 0.70  # events/s with the filters over events/s without
TIMEFRAMES = (1_000, 60_000, 300_000)
# What one pass of a replay takes (`Pipeline`'s defaults for max_bytes and max_age), and the
# timeout the pipeline gives `take` when it drains.
PASS_BYTES = 24_000_000
PASS_AGE = 0.05
TAKE_TIMEOUT = 0.1
MIB = 1024 * 1024

# Start of the synthetic session (2024-05-29T16:26:40Z); only relative times matter.
T0_MS = 1_717_000_000_000


@dataclass(frozen=True)
class PairSpec:
    symbol: str  # REST form, as the pipeline is asked for it
    pair: str  # the feed's form, as the frames carry it
    price: float  # starting price, USD
    price_dp: int  # decimals of the venue's price tick
    weight: float  # share of the traffic
    size: float  # median trade size, base currency
    size_dp: int


PAIRS: tuple[PairSpec, ...] = (
    PairSpec("X:BTCUSD", "BTC-USD", 67_250.0, 2, 0.40, 0.012, 8),
    PairSpec("X:ETHUSD", "ETH-USD", 3_480.0, 2, 0.35, 0.15, 8),
    PairSpec("X:SOLUSD", "SOL-USD", 148.0, 3, 0.25, 3.0, 6),
)
SYMBOLS = [p.symbol for p in PAIRS]
EXCHANGES = (1, 2, 6, 10, 23)  # Coinbase, Bitfinex, Bitstamp, Binance, Kraken
TRADE_SHARE = 0.75
LATE_TRADE_SHARE = 0.001
MAX_LATE_MS = 1_500
FRAME_WINDOW_MS = 50


@dataclass
class StreamInfo:
    """What the generator wrote, for the report and the sanity checks."""

    path: Path
    events: int = 0
    frames: int = 0
    trades: int = 0
    quotes: int = 0
    late_trades: int = 0
    bytes: int = 0
    first_trade: dict[str, int] = field(default_factory=dict)
    last_trade: dict[str, int] = field(default_factory=dict)
    first_ms: int = 0
    last_ms: int = 0

    @property
    def span_s(self) -> float:
        return (self.last_ms - self.first_ms) / 1000

    def expected_final_bars(self) -> int:
        """Every bucket from each symbol's first to last trade, empty ones filled, at each tf."""
        return sum(self.expected_final_bars_at(tf) for tf in TIMEFRAMES)

    def expected_final_bars_at(self, tf: int) -> int:
        return sum(
            self.last_trade[s] // tf - self.first_trade[s] // tf + 1 for s in self.first_trade
        )


# --- the stream -----------------------------------------------------------------------------------


class _PairState:
    """Random-walk price and trade id per pair, so consecutive events look like one market."""

    def __init__(self, spec: PairSpec, rng: random.Random) -> None:
        self.spec = spec
        self.mid = spec.price
        self.tick = 10.0**-spec.price_dp
        self.min_size = 10.0**-spec.size_dp
        self.trade_id = rng.randrange(100_000_000, 900_000_000)


def generate_frames(n_events: int, seed: int, rate: float, info: StreamInfo) -> Iterator[Frame]:
    """Yield the frames of the stream one by one, counting what they hold into `info`."""
    rng = random.Random(seed)
    states = [_PairState(spec, rng) for spec in PAIRS]
    cumulative = list(itertools.accumulate(spec.weight for spec in PAIRS))
    encode = msgspec.json.encode
    base_gap = 1000.0 / (rate * len(PAIRS))  # mean ms between events at intensity 1
    now = float(T0_MS)
    received = T0_MS
    spell_end = now
    gap = base_gap
    first, last = info.first_trade, info.last_trade
    made = 0
    # The feed sends what it has every few tens of ms: a frame never spans more than that.
    frame_end = now
    pending = False
    while made < n_events:
        batch: list[dict[str, Any]] = []
        max_t = 0
        for _ in range(min(rng.randint(1, 20), n_events - made)):
            if pending:  # the event that did not fit in the previous frame opens this one
                pending = False
                frame_end = now + FRAME_WINDOW_MS
            else:
                if now >= spell_end:
                    # Busier and calmer spells of 5-60 s (mean intensity 1), now and then a lull.
                    spell_end = now + rng.uniform(5_000, 60_000)
                    quiet = rng.random() < 0.03
                    gap = base_gap * (200.0 if quiet else 1.0 / rng.lognormvariate(-0.245, 0.7))
                now += rng.expovariate(1.0 / gap)
                if not batch:
                    frame_end = now + FRAME_WINDOW_MS
                elif now > frame_end:
                    pending = True
                    break
            t = int(now) - rng.randint(0, 25)  # venues' clocks and paths differ by a few ms
            r = rng.random()
            st = states[0 if r < cumulative[0] else 1 if r < cumulative[1] else 2]
            spec = st.spec
            st.mid *= math.exp(rng.gauss(0.0, 1.2e-4))
            if rng.random() < TRADE_SHARE:
                if rng.random() < LATE_TRADE_SHARE:
                    t = int(now) - rng.randint(100, MAX_LATE_MS)
                    info.late_trades += 1
                st.trade_id += rng.randint(1, 3)
                batch.append(
                    {
                        "ev": "XT",
                        "pair": spec.pair,
                        "p": round(st.mid + rng.choice((-0.5, 0.5)) * st.tick, spec.price_dp),
                        "t": t,
                        "s": _size(rng, st, 1.0),
                        "c": [1 if rng.random() < 0.48 else 2],
                        "i": str(st.trade_id),
                        "x": rng.choice(EXCHANGES),
                        "r": t + rng.randint(1, 6),
                    }
                )
                info.trades += 1
                first[spec.symbol] = min(first.get(spec.symbol, t), t)
                last[spec.symbol] = max(last.get(spec.symbol, t), t)
            else:
                half = st.tick * rng.randint(1, 6) / 2
                batch.append(
                    {
                        "ev": "XQ",
                        "pair": spec.pair,
                        "bp": round(st.mid - half, spec.price_dp),
                        "bs": _size(rng, st, 4.0),
                        "ap": round(st.mid + half, spec.price_dp),
                        "as": _size(rng, st, 4.0),
                        "t": t,
                        "x": rng.choice(EXCHANGES),
                        "r": t + rng.randint(1, 6),
                    }
                )
                info.quotes += 1
            max_t = max(max_t, t)
        received = max(received, max_t + 2 + int(rng.expovariate(1 / 6)))
        data = encode(batch)
        made += len(batch)
        info.frames += 1
        info.bytes += len(data)
        yield Frame(received, data)
    info.events = made
    info.first_ms = T0_MS
    info.last_ms = received


def _size(rng: random.Random, st: _PairState, scale: float) -> float:
    # Trade sizes are heavy-tailed: lognormal around the pair's median, never rounded to zero.
    size = round(st.spec.size * scale * rng.lognormvariate(0.0, 1.2), st.spec.size_dp)
    return size or st.min_size


def write_recording(path: Path, n_events: int, seed: int, rate: float) -> StreamInfo:
    """Stream the generator into a recording with polystream's `Recorder`."""
    info = StreamInfo(path)
    recorder = Recorder(path)
    try:
        for frame in generate_frames(n_events, seed, rate, info):
            recorder.write(frame)
    finally:
        recorder.close()
    return info


def describe(info: StreamInfo, built_in: float) -> None:
    print(f"  built in {built_in:.1f} s (not timed below): {info.path}")
    print(
        f"  {info.frames:,} frames, {info.events:,} events "
        f"({info.events / info.frames:.2f}/frame), {info.bytes / MIB:.1f} MiB of JSON"
    )
    print(
        f"  mix: XT {info.trades / info.events:.1%}, XQ {info.quotes / info.events:.1%}; "
        f"{info.late_trades:,} trades up to {MAX_LATE_MS / 1000:g} s late"
    )
    print(
        f"  event time spans {info.span_s / 3600:.2f} h "
        f"({info.events / info.span_s / len(PAIRS):.0f} events/s per symbol on average)"
    )


# --- the measured paths ---------------------------------------------------------------------------


@dataclass
class EndToEnd:
    seconds: float
    events: int
    frames: int
    passes: int  # passes of the pipeline's loop that carried frames
    final_bars: int
    revised: int
    too_late: int
    rejected: int
    alerts: int = 0  # as the filter engine counted them


def run_end_to_end(
    path: Path, sinks: Sequence[Sink] = (), filters: Sequence[Filter] = ()
) -> EndToEnd:
    """One replay of `path` through the pipeline, set up as `polystream watch --feed FILE` sets
    it up (bars at `TIMEFRAMES`, `REPLAY_PENDING` trades per call of the bar engine); only
    `run()` is timed, the bar engine's thread and `Stages.close` at its end included."""
    options = BarOptions(timeframes=TIMEFRAMES)
    engine = (
        FilterEngine(filters, params=options.params, timeframes=options.timeframes)
        if filters
        else None
    )
    stages = Stages(SYMBOLS, options, filters=engine, min_pending=REPLAY_PENDING)
    pipeline = Pipeline(ReplaySource(path), stages, sinks, live=False)
    if pipeline.max_bytes != PASS_BYTES or pipeline.max_age != PASS_AGE:
        print(
            f"  WARNING the pipeline takes passes of up to {pipeline.max_bytes:,} bytes and "
            f"{pipeline.max_age:g} s; the stages alone below use {PASS_BYTES:,} and {PASS_AGE:g}"
        )
    t0 = time.perf_counter()
    result = pipeline.run()
    elapsed = time.perf_counter() - t0
    if result.interrupted:
        raise KeyboardInterrupt
    feed = result.view.feed
    return EndToEnd(
        elapsed,
        feed.events,
        feed.frames,
        pipeline.passes,
        feed.bars,
        feed.revised,
        feed.too_late,
        feed.rejected,
        feed.alerts,
    )


def run_read_recording(path: Path) -> int:
    n = 0
    for _ in read_recording(path):
        n += 1
    return n


def replay_passes(path: Path) -> Iterator[list[Frame]]:
    """The frames of each pass a replay hands the pipeline: `ReplaySource.take` called as the
    pipeline calls it, until `EndOfStream`; status records are skipped."""
    source = ReplaySource(path).start()
    take = source.take
    while True:
        for item in take(TAKE_TIMEOUT, PASS_BYTES, PASS_AGE):
            if type(item) is Frames:
                yield item.frames
            elif type(item) is Frame:
                yield [item]
            elif type(item) is EndOfStream:
                if item.error is not None:
                    raise RuntimeError(f"the replay of {path} failed: {item.error}")
                return


def run_replay_take(path: Path) -> int:
    n = 0
    for frames in replay_passes(path):
        n += len(frames)
    return n


def run_decode(frames: list[bytes]) -> int:
    decode = Decoder().decode
    n = 0
    for frame in frames:
        n += len(decode(frame))
    return n


def run_build(passes: list[list[Frame]]) -> int:
    build = Batcher(SYMBOLS).build
    n = 0
    for frames in passes:
        n += build(frames).size
    return n


def best_of(
    name: str, run: Callable[[], int], expected: int, events: int, repeat: int
) -> tuple[float, float]:
    """Best seconds and events/s of `repeat` rounds; `run` returns a count to check."""
    times: list[float] = []
    for rnd in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        n = run()
        elapsed = time.perf_counter() - t0
        if n != expected:
            print(f"  WARNING {name} counted {n:,}, expected {expected:,}")
        times.append(elapsed)
        print(f"  round {rnd + 1}  {name:<40} {elapsed:7.3f} s  {fmt_rate(events / elapsed)}")
    best = min(times)
    return best, events / best


def run_bars(batches: list[pl.DataFrame]) -> int:
    engine = BarEngine(BarOptions(timeframes=TIMEFRAMES))
    for trades in batches:
        engine.add_trades(trades)
    engine.finish()
    return engine.stats.final


@dataclass
class InMemory:
    decode: float  # events/s of each stage alone
    batch: float  # decode and columns
    bars: float  # bars and oscillators from pre-built batches, per event of the stream


def in_memory_rates(path: Path, events: int, final_bars: int, repeat: int) -> InMemory:
    """Best events/s of the pipeline's stages, each alone, over the recording read into memory
    in the passes a replay takes."""
    print(f"\n== In memory, over the recording's frames read beforehand; best of {repeat} ==")
    passes = list(replay_passes(path))
    frames = [f.data for chunk in passes for f in chunk]
    print(
        f"  {len(frames):,} frames in {len(passes)} passes of up to {PASS_BYTES:,} bytes "
        "(Pipeline.max_bytes), as ReplaySource.take hands them to the pipeline"
    )
    _, decode_rate = best_of("Decoder().decode", lambda: run_decode(frames), events, events, repeat)
    _, batch_rate = best_of(
        "Batcher.build of each pass", lambda: run_build(passes), events, events, repeat
    )
    batcher = Batcher(SYMBOLS)
    batches = [batcher.build(chunk).trades for chunk in passes]
    _, bars_rate = best_of(
        "BarEngine.add_trades + finish",
        lambda: run_bars(batches),
        final_bars,
        events,
        repeat,
    )
    print(
        f"  (the bar engine is fed the {sum(b.height for b in batches):,} trades of the "
        f"{len(batches)} passes, one call each, on this thread; a replay's Stages gives it at "
        f"least {REPLAY_PENDING:,} per call, on its own thread. Its rate counts every event of "
        "the stream, quotes included)"
    )
    return InMemory(decode_rate, batch_rate, bars_rate)


# --- memory ---------------------------------------------------------------------------------------


class RssProbe(BaseSink):
    """A sink that samples RSS when the run passes each of `checkpoints` marks, counted in the
    trade and quote rows of the passes it is handed, and once more at close."""

    name = "RSS probe"

    def __init__(self, total_events: int, checkpoints: int) -> None:
        self.total = total_events
        self.step = total_events / checkpoints
        self.checkpoints = checkpoints
        self.next_mark = self.step
        self.samples: list[tuple[int, int]] = []
        self.events = 0
        self.records = 0
        self.t0 = time.perf_counter()

    def write(self, out: Output) -> None:
        if out.bars is not None:
            self.records += out.bars.height
        rows = (0 if out.trades is None else out.trades.height) + (
            0 if out.quotes is None else out.quotes.height
        )
        if not rows:
            return
        self.events += rows
        events = self.events
        if events >= self.total:  # the last checkpoint is taken at close, after the final bars
            return
        if events >= self.next_mark and len(self.samples) < self.checkpoints - 1:
            self._sample(events)
            while self.next_mark <= events:
                self.next_mark += self.step

    def close(self, view: View) -> Sequence[Notice]:
        self._sample(view.feed.events)
        return ()

    def _sample(self, events: int) -> None:
        rss = rss_bytes()
        self.samples.append((events, rss))
        print(
            f"  checkpoint {len(self.samples):>2}  {events:>12,} events  "
            f"RSS {rss / MIB:8.1f} MiB  at {time.perf_counter() - self.t0:6.1f} s  "
            f"({self.records:,} bar records so far)"
        )


@dataclass
class MemoryResult:
    events: int
    growth: int
    flat: bool
    bars_ok: bool


def memory_section(
    path: Path, n_events: int, seed: int, rate: float, flat_mib: float
) -> MemoryResult:
    """Write the long recording, run it end to end with an `RssProbe` sink, print and return."""
    t0 = time.perf_counter()
    info = write_recording(path, n_events, seed, rate)
    describe(info, time.perf_counter() - t0)
    gc.collect()
    print(f"  before the run: RSS {rss_bytes() / MIB:8.1f} MiB")
    probe = RssProbe(info.events, checkpoints=10)
    run = run_end_to_end(path, [probe])
    path.unlink()
    samples = probe.samples
    growth = samples[-1][1] - samples[0][1]
    # one checkpoint (a run of one pass) compares nothing: that is no evidence of flatness
    flat = len(samples) > 1 and growth <= flat_mib * MIB
    bars_ok = run.final_bars == info.expected_final_bars()
    peak, peak_label = own_peak_rss_bytes()
    print(
        f"  {run.events:,} events in {run.seconds:.1f} s ({fmt_rate(run.events / run.seconds)}), "
        f"{run.final_bars:,} final bars (expected {info.expected_final_bars():,}: "
        f"{'OK' if bars_ok else 'MISMATCH'}); peak RSS {peak_label} {peak / MIB:.1f} MiB"
    )
    per_pass = run.events / max(run.passes, 1)
    print(
        f"  {run.passes:,} passes of about {per_pass:,.0f} events: the checkpoints fall on "
        "their ends"
        + (
            f"; only {len(samples)} of the ten (ten need about {10 * per_pass:,.0f} events)"
            if len(samples) < probe.checkpoints
            else ""
        )
    )
    print(
        f"  growth, checkpoint 1 -> {len(samples)}: {growth / MIB:+.2f} MiB "
        f"(flat means <= {flat_mib:g} MiB"
        + (", over two checkpoints at least" if len(samples) < 2 else "")
        + f"): {_verdict(flat)}"
    )
    return MemoryResult(run.events, growth, flat, bars_ok)


def memory_in_child(args: argparse.Namespace, cpu: int | None, tmp: Path) -> MemoryResult:
    """Run `memory_section` in a fresh interpreter, so that memory the throughput sections freed
    but the allocator kept counts neither in its RSS nor in its peak."""
    result = tmp / "memory.json"
    command = [
        sys.executable,
        __file__,
        "--memory-child",
        str(result),
        "--memory-events",
        str(args.memory_events),
        "--seed",
        str(args.seed + 1),
        "--rate",
        str(args.rate),
        "--flat-mib",
        str(args.flat_mib),
        "--tmp",
        str(tmp),
    ]
    if cpu is not None:
        command += ["--cpu", str(cpu)]
    sys.stdout.flush()
    subprocess.run(command, check=True)
    return msgspec.json.decode(result.read_bytes(), type=MemoryResult)


def memory_child(args: argparse.Namespace) -> int:
    placed = place(args.cpu)[1]
    print(
        f"  in a fresh process (pid {os.getpid()}), {placed}; "
        f"polars thread pool size {pl.thread_pool_size()}"
    )
    result = memory_section(
        args.tmp / "memory.rec", args.memory_events, args.seed, args.rate, args.flat_mib
    )
    args.memory_child.write_bytes(msgspec.json.encode(result))
    return 0


# --- filters --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterSpec:
    """One filter of the pool, written out as a filter file's YAML by `yaml`."""

    name: str
    on: str
    when: str
    timeframe: str | None = None  # for on: bar
    trigger: str = "edge"
    cooldown: str | None = None
    symbols: tuple[str, ...] = ()
    severity: str = "info"
    message: str | None = None

    def yaml(self, name: str | None = None) -> str:
        lines = [f"name: {name or self.name}"]
        if self.symbols:
            lines.append(f"symbols: {json.dumps(list(self.symbols))}")
        lines.append(f"on: {self.on}")
        if self.timeframe is not None:
            lines.append(f"timeframe: {self.timeframe}")
        lines.append(f"when: {json.dumps(self.when)}")
        lines.append(f"trigger: {self.trigger}")
        if self.cooldown is not None:
            lines.append(f"cooldown: {self.cooldown}")
        lines.append(f"severity: {self.severity}")
        if self.message is not None:
            lines.append(f"message: {json.dumps(self.message)}")
        return "\n".join(lines) + "\n"


def _bar(name: str, tf: str, when: str, **kw: Any) -> FilterSpec:
    return FilterSpec(f"{name}-{tf}", "bar", when, timeframe=tf, **kw)


# What users write: mostly bar filters over the run's timeframes with the default indicators,
# some with parameters of their own (computed by the filter engine from streaming states) or
# lookbacks over earlier bars; a few on every trade and quote. Thresholds are set so that each
# kind fires now and then on the generated stream, not on most rows.
BAR_FILTERS: tuple[FilterSpec, ...] = (
    _bar(
        "rsi-oversold",
        "1s",
        "rsi(14) < 25",
        cooldown="30s",
        message="{symbol} RSI {rsi_14:.1f} at {close}",
    ),
    _bar(
        "rsi-overbought",
        "1s",
        "rsi(14) > 75",
        cooldown="30s",
        message="{symbol} RSI {rsi_14:.1f} at {close}",
    ),
    _bar("macd-bull-cross", "1s", "crosses_above(macd(), macd_signal()) and macd() < 0"),
    _bar("stoch-bull-cross", "1s", "crosses_above(stoch_k(), stoch_d()) and stoch_k() < 20"),
    _bar(
        "rsi-oversold",
        "1m",
        "rsi(14) < 30",
        severity="warning",
        message="{symbol} RSI {rsi_14:.1f} at {close}",
    ),
    _bar("ao-zero-up", "1s", "crosses_above(ao(), 0)", cooldown="1m"),
    _bar("cci-above-100", "1s", "cci(20) > 100", cooldown="1m"),
    _bar("bb-breakout-up", "1s", "close > bb_upper() and volume > sma(volume, 20)"),
    _bar(
        "rsi-overbought",
        "1m",
        "rsi(14) > 70",
        severity="warning",
        message="{symbol} RSI {rsi_14:.1f} at {close}",
    ),
    _bar("rsi-buyers", "1s", "rsi(14) < 30 and buy_volume > sell_volume", cooldown="1m"),
    _bar("macd-bear-cross", "1s", "crosses_below(macd(), macd_signal()) and macd() > 0"),
    _bar("stoch-bear-cross", "1s", "crosses_below(stoch_k(), stoch_d()) and stoch_k() > 80"),
    _bar("cci-above-100", "1m", "cci() > 100"),
    _bar("ao-zero-down", "1s", "crosses_below(ao(), 0)", cooldown="1m"),
    _bar("cci-below-100", "1s", "cci(20) < -100", cooldown="1m"),
    _bar("bb-breakdown", "1s", "close < bb_lower() and volume > sma(volume, 20)"),
    _bar("cci-below-100", "1m", "cci() < -100"),
    _bar("bb-percent-low", "1s", "bb_percent() < 0", trigger="level", cooldown="15s"),
    _bar(
        "rsi7-extreme",
        "1s",
        "rsi(7) < 15 or rsi(7) > 85",
        cooldown="30s",
        message="{symbol} fast RSI {rsi_7:.1f}",
    ),
    _bar("macd-fast-cross", "1s", "crosses_above(macd(5, 35, 5), macd_signal(5, 35, 5))"),
    _bar("bb-breakout-up", "1m", "close > bb_upper()", severity="warning"),
    _bar("ema50-cross-up", "1s", "crosses_above(close, ema(50))", cooldown="1m"),
    _bar("bb-wide-breakout", "1s", "close > bb_upper(20, 2.5)", cooldown="30s"),
    _bar(
        "volume-spike",
        "1s",
        "volume > 4 * sma(volume, 20)",
        cooldown="10s",
        message="{symbol} volume {volume:.4f}, 4x its 20-bar mean",
    ),
    _bar("bb-breakdown", "1m", "close < bb_lower()", severity="warning"),
    _bar("momentum-up", "1s", "pct_change(close, 10) > 2", cooldown="1m"),
    _bar("momentum-down", "1s", "pct_change(close, 10) < -2", cooldown="1m"),
    _bar(
        "new-high", "1s", "close > prev(highest(high, 60))", symbols=("X:BTCUSD",), cooldown="30s"
    ),
    _bar("stoch-bull-cross", "1m", "crosses_above(stoch_k(), stoch_d()) and stoch_k() < 20"),
    _bar("new-low", "1s", "close < prev(lowest(low, 60))", symbols=("X:BTCUSD",), cooldown="30s"),
    _bar("buy-flow", "1s", "imbalance() > 0.5 and trades >= 50", cooldown="30s"),
    _bar("fast-stoch-low", "1s", "stoch_k(5, 3, 3) < 5", trigger="level", cooldown="1m"),
    _bar("rsi7-extreme", "1m", "rsi(7) < 20 or rsi(7) > 80"),
    _bar("range-expansion", "1m", "high - low > 2 * sma(high - low, 14)", cooldown="5m"),
    _bar("momentum", "1m", "abs(pct_change(close, 5)) > 3", severity="critical"),
    _bar("rsi-oversold", "5m", "rsi(14) < 30", severity="critical"),
    _bar("macd-bull-cross", "5m", "crosses_above(macd(), macd_signal())", severity="warning"),
    _bar("bb-wide-breakout", "5m", "close > bb_upper(20, 2.5)", severity="warning"),
    _bar("ao-zero-up", "5m", "crosses_above(ao(), 0)", severity="warning"),
    _bar("momentum", "5m", "abs(pct_change(close)) > 3", severity="critical"),
)
TRADE_FILTERS: tuple[FilterSpec, ...] = (
    FilterSpec(
        "whale-trade",
        "trade",
        "price * size > 50000",
        severity="warning",
        message="{symbol} {side} {size} at {price}",
    ),
    FilterSpec("eth-big-buy", "trade", 'side == "buy" and size > 10', symbols=("X:ETHUSD",)),
    FilterSpec(
        "price-spike-up", "trade", "pct_change(price, 50) > 0.3", cooldown="1m", severity="critical"
    ),
    FilterSpec("sol-big-sell", "trade", 'side == "sell" and size > 150', symbols=("X:SOLUSD",)),
    FilterSpec(
        "price-spike-down",
        "trade",
        "pct_change(price, 50) < -0.3",
        cooldown="1m",
        severity="critical",
    ),
)
QUOTE_FILTERS: tuple[FilterSpec, ...] = (
    FilterSpec("wide-spread", "quote", "spread > 0.05", symbols=("X:BTCUSD",), cooldown="1m"),
    FilterSpec(
        "bid-imbalance",
        "quote",
        "imbalance() > 0.95",
        cooldown="30s",
        message="{symbol} bids {bid_size} vs asks {ask_size}",
    ),
    FilterSpec("ask-imbalance", "quote", "imbalance() < -0.95", cooldown="30s"),
    FilterSpec("wide-spread-bps", "quote", "spread / mid * 10000 > 0.35", cooldown="1m"),
    FilterSpec(
        "mid-drop", "quote", "pct_change(mid, 100) < -0.5", cooldown="1m", severity="warning"
    ),
)


def filter_pool() -> list[FilterSpec]:
    """The pool in the order `--filters K` takes from: four bar filters, then a trade or a quote
    filter, and so on, so that any K has a similar mix."""
    pool: list[FilterSpec] = []
    events = [f for pair in zip(TRADE_FILTERS, QUOTE_FILTERS, strict=True) for f in pair]
    bars = iter(BAR_FILTERS)
    for extra in events:
        pool += itertools.islice(bars, 4)
        pool.append(extra)
    return pool + list(bars)


def build_filters(k: int) -> list[Filter]:
    """The first `k` filters of the pool, parsed from their YAML; past the pool's size, renamed
    copies of it over and over."""
    pool = filter_pool()
    out: list[Filter] = []
    for i in range(k):
        spec = pool[i % len(pool)]
        copy = i // len(pool)
        name = spec.name if copy == 0 else f"{spec.name}-copy{copy}"
        out.append(parse_filter(spec.yaml(name), f"<{name}.yaml>"))
    return out


class AlertTally(BaseSink):
    """A sink that counts the alerts it is handed, per filter; everything else it ignores."""

    name = "alert tally"

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def write(self, out: Output) -> None:
        counts = self.counts
        for alert in out.alerts:
            counts[alert.filter] = counts.get(alert.filter, 0) + 1


@dataclass
class FilterResult:
    count: int
    rate: float  # events/s with the filters
    baseline: float  # events/s without, in the same rounds
    ratio: float
    alerts: int
    ok: bool


def _kind(f: Filter) -> str:
    return f"{f.timeframe_name} bars" if f.on == "bar" else f"{f.on}s"


def filters_section(path: Path, info: StreamInfo, k: int, repeat: int) -> FilterResult:
    """End to end without filters and with the first `k` of the pool, alternately, both with an
    `AlertTally` sink; the best of each, their ratio, and what fired."""
    t0 = time.perf_counter()
    filters = build_filters(k)
    built_ms = (time.perf_counter() - t0) * 1000
    rows = {f"{timeframe_name(tf)} bars": info.expected_final_bars_at(tf) for tf in TIMEFRAMES}
    rows |= {"trades": info.trades, "quotes": info.quotes}
    by_kind = {kind: [f.name for f in filters if _kind(f) == kind] for kind in rows}
    print(
        f"\n== Filters: end to end without filters and with {k}, alternately; best of {repeat} =="
    )
    print(
        f"  {k} filters ("
        + ", ".join(f"{len(names)} on {kind}" for kind, names in by_kind.items() if names)
        + f"), parsed from YAML and compiled in {built_ms:.0f} ms (not timed)"
    )
    plain: list[EndToEnd] = []
    filtered: list[EndToEnd] = []
    tallies: list[AlertTally] = []
    for rnd in range(repeat):
        for with_filters in (False, True):
            gc.collect()
            tally = AlertTally()
            run = run_end_to_end(path, [tally], filters if with_filters else ())
            (filtered if with_filters else plain).append(run)
            label = f"{k} filters" if with_filters else "no filters"
            alerts = ""
            if with_filters:
                tallies.append(tally)
                alerts = f"  {run.alerts:,} alerts"
            print(
                f"  round {rnd + 1}  {label:<12} {run.seconds:7.3f} s  "
                f"{fmt_rate(run.events / run.seconds)}  {run.final_bars:,} final bars{alerts}"
            )
    best_plain = min(plain, key=lambda r: r.seconds)
    best_i = min(range(repeat), key=lambda i: filtered[i].seconds)
    best_filtered = filtered[best_i]
    baseline = best_plain.events / best_plain.seconds
    rate = best_filtered.events / best_filtered.seconds
    ratio = rate / baseline
    ok = ratio >= FILTERS_MIN_RATIO
    print(f"  best     {'no filters':<12} {best_plain.seconds:7.3f} s  {fmt_rate(baseline)}")
    print(f"  best     {f'{k} filters':<12} {best_filtered.seconds:7.3f} s  {fmt_rate(rate)}")

    per_round = [sum(t.counts.values()) for t in tallies]
    reached = all(r.alerts == n for r, n in zip(filtered, per_round, strict=True))
    bars_same = all(r.final_bars == best_plain.final_bars for r in plain + filtered)
    print(
        f"  alerts per round {', '.join(f'{n:,}' for n in per_round)} "
        f"({'the same' if len(set(per_round)) == 1 else 'they differ'}); "
        f"{'all' if reached else 'NOT all'} of those the engine counted reached the sink; "
        f"final bars {'the same' if bars_same else 'DIFFERENT'} with and without filters"
    )
    delivered, counts = per_round[best_i], tallies[best_i].counts
    print(f"  in the best round with filters, {delivered:,} alerts:")
    for kind, names in by_kind.items():
        if not names:
            continue
        fired = sum(counts.get(n, 0) for n in names)
        firing = sum(1 for n in names if counts.get(n, 0))
        share = fired / max(rows[kind] * len(names), 1)
        print(
            f"    {kind:<8} {len(names):>3} filters, {firing:>3} fired: {fired:>7,} alerts over "
            f"{rows[kind]:>9,} rows ({share:.4%} of filter x row evaluations)"
        )
    silent = sorted({n for n in itertools.chain(*by_kind.values()) if not counts.get(n)})
    if silent:
        more = f" and {len(silent) - 12} more" if len(silent) > 12 else ""
        print(f"    never fired: {', '.join(silent[:12])}{more}")
    print(
        f"  ratio with / without filters {ratio:6.3f} (target >= {FILTERS_MIN_RATIO:.2f}): "
        f"{_verdict(ok)}"
    )
    return FilterResult(k, rate, baseline, ratio, delivered, ok)


# --- the command, as a user runs it ---------------------------------------------------------------

COMMAND_TARGET_EVENTS_PER_S = 750_000
COMMAND_MIN_RATIO = 0.30  # the command's events/s over a plain msgspec decode's, same frames
COMMAND_SYMBOLS = ("X:BTCUSD", "X:ETHUSD", "X:SOLUSD")
COMMAND_TIMEFRAMES = ("1s", "1m", "5m")
# Nothing from the bench's own environment that would switch on storage, notifications, a live
# feed, another filters or state directory, or another copy of the package.
CLEARED_PREFIXES = ("POLYGON_", "MASSIVE_", "TELEGRAM_", "POLYSTREAM_")
CLEARED_VARIABLES = ("DATABASE_URL", "PYTHONPATH", "PYTHONHOME")
PEAK_SAMPLE_S = 0.05  # how often the throughput rounds read the child's VmHWM
MEMORY_SAMPLE_S = 0.5  # how often the memory run reads the child's VmRSS
CHECKPOINTS = 10
TERMINAL_KEEP = 32 * 1024  # bytes of the terminal's output kept for its tail
# CSI and OSC sequences and two-byte escapes: what a terminal renders but a report should not show.
ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
EVENTS_NAMED = re.compile(r"(\d[\d,]*)\s+events\b")


def clean_environment() -> tuple[dict[str, str], list[str]]:
    """This process's environment without the variables that would change what the run does; the
    names of those dropped (never their values)."""
    env: dict[str, str] = {}
    dropped: list[str] = []
    for name, value in os.environ.items():
        if name.startswith(CLEARED_PREFIXES) or name in CLEARED_VARIABLES:
            dropped.append(name)
        else:
            env[name] = value
    env.setdefault("TERM", "xterm-256color")
    return env, sorted(dropped)


def watch_argv(
    executable: Path, recording: Path, filters: Path, extra: Sequence[str] = ()
) -> list[str]:
    argv = [str(executable), "watch", *COMMAND_SYMBOLS, "--feed", str(recording), "--no-ui"]
    argv.append("--json")
    for tf in COMMAND_TIMEFRAMES:
        argv += ["-t", tf]
    return [*argv, "--filters", str(filters), *extra]


class TerminalDrain(threading.Thread):
    """Reads the pseudo-terminal's master side until every writer has closed the other side,
    as a terminal would, keeping the last `TERMINAL_KEEP` bytes and when the first one came."""

    def __init__(self, fd: int) -> None:
        super().__init__(name="bench-terminal", daemon=True)
        self.fd = fd
        self.first: float | None = None  # perf_counter of the first output
        self.bytes = 0
        self.lines = 0
        self.kept = bytearray()

    def run(self) -> None:
        kept = self.kept
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: nothing holds the terminal open any more
                break
            if not chunk:
                break
            if self.first is None:
                self.first = time.perf_counter()
            self.bytes += len(chunk)
            self.lines += chunk.count(b"\n")
            kept += chunk
            if len(kept) > 2 * TERMINAL_KEEP:
                del kept[:-TERMINAL_KEEP]

    def tail(self, n: int) -> list[str]:
        """The last `n` non-blank lines as a terminal shows them, escape sequences removed."""
        text = ESCAPES.sub("", self.kept.decode("utf-8", "replace"))
        # A bare carriage return redraws its line: what follows the last one is what is shown.
        lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
        return [line for line in lines if line.strip()][-n:]


class StatusSampler(threading.Thread):
    """Reads /proc/PID/status every `every` seconds: the largest VmHWM, and VmRSS over time."""

    def __init__(self, pid: int, t0: float, every: float) -> None:
        super().__init__(name="bench-rss", daemon=True)
        self.path = f"/proc/{pid}/status"
        self.t0 = t0
        self.every = every
        self.done = threading.Event()
        self.peak = 0  # bytes; 0 if nothing could be read
        self.samples: list[tuple[float, int]] = []  # (seconds since t0, VmRSS bytes)

    def run(self) -> None:
        while True:
            try:
                with open(self.path) as f:
                    fields = dict(line.split(":", 1) for line in f if line.startswith("Vm"))
            except (OSError, ValueError):
                return  # gone, or no /proc here
            at = time.perf_counter() - self.t0
            if "VmHWM" in fields:
                self.peak = max(self.peak, int(fields["VmHWM"].split()[0]) * 1024)
            if "VmRSS" in fields:
                self.samples.append((at, int(fields["VmRSS"].split()[0]) * 1024))
            if self.done.wait(self.every):
                return


@dataclass
class CommandRun:
    seconds: float  # wall time, from just before the process is started to its exit
    exit_code: int
    startup: float | None  # seconds to its first output on the terminal
    cpu: float  # user + system seconds, all of its threads
    peak_rss: int  # largest VmHWM sampled, bytes (0: not available)
    samples: list[tuple[float, int]]  # (seconds, VmRSS bytes)
    tail: list[str]  # its last lines on the terminal
    lines: int  # lines it wrote to the terminal
    reported: int | None  # the event count its last summary line names

    def ok(self, expected: int) -> bool:
        return self.exit_code == 0 and self.reported == expected


def _set_window_size(fd: int) -> None:
    import fcntl
    import struct
    import termios

    columns, rows = shutil.get_terminal_size((120, 40))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def run_command(
    executable: Path, recording: Path, sample_every: float, extra: Sequence[str] = ()
) -> CommandRun:
    """One run of `polystream watch ... --feed recording`, as a user at a terminal starts it:
    stdout to /dev/null, stderr on a pseudo-terminal, no filters, no storage, no notifier."""
    env, _ = clean_environment()
    with tempfile.TemporaryDirectory(prefix="bench_engine-run-") as sandbox:
        cwd, state, filters = (Path(sandbox) / name for name in ("cwd", "state", "filters"))
        for directory in (cwd, state, filters):
            directory.mkdir()
        env["POLYSTREAM_STATE_DIR"] = str(state)
        argv = watch_argv(executable, recording, filters, extra)
        master, slave = os.openpty()
        drain = TerminalDrain(master)
        proc: subprocess.Popen[bytes] | None = None
        try:
            _set_window_size(slave)
            drain.start()
            t0 = time.perf_counter()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=slave,
                    cwd=cwd,
                    env=env,
                )
            finally:
                os.close(slave)  # the child's copy is the only one left
            sampler = StatusSampler(proc.pid, t0, sample_every)
            sampler.start()
            # wait4 gives this child's own CPU times; its ru_maxrss would not do for the peak,
            # since exec carries the parent's high-water mark over into it.
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            sampler.done.set()
            sampler.join()
            drain.join(timeout=10)
        except BaseException:
            if proc is not None and proc.returncode is None:
                proc.kill()
                proc.wait()
            raise
        finally:
            os.close(master)
    tail = drain.tail(4)
    reported = None
    for line in reversed(tail):
        named = EVENTS_NAMED.findall(line)
        if named:
            reported = int(named[0].replace(",", ""))
            break
    return CommandRun(
        seconds,
        proc.returncode,
        None if drain.first is None else drain.first - t0,
        usage.ru_utime + usage.ru_stime,
        sampler.peak,
        sampler.samples,
        tail,
        drain.lines,
        reported,
    )


def run_plain_decode(frames: list[bytes], decode: Callable[[bytes], list[Event]]) -> int:
    n = 0
    for frame in frames:
        n += len(decode(frame))
    return n


def command_recording(directory: Path, events: int, seed: int, rate: float) -> Path:
    """The recording of `events` events with this seed and rate in `directory`: the one a previous
    run left there, or a new one written with this file's generator and kept for the next run."""
    path = directory / f"bench_engine-{events}ev-seed{seed}-rate{rate:g}.rec"
    if path.exists():
        print(
            f"  reused {path} ({path.stat().st_size / MIB:.1f} MiB), written by an earlier run "
            "with the same events, seed and rate"
        )
        return path
    part = path.with_name(path.name + ".part")  # renamed once complete: never reuse a torn one
    part.unlink(missing_ok=True)
    t0 = time.perf_counter()
    info = write_recording(part, events, seed, rate)
    os.replace(part, path)
    info.path = path
    describe(info, time.perf_counter() - t0)
    print("  kept for the next run with the same --events, --seed and --rate; delete it when done")
    return path


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n else "n/a"


def describe_executable(label: str, executable: Path) -> None:
    env, _ = clean_environment()
    try:
        out = subprocess.run(
            [str(executable), "--version"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        ).stdout.strip()
    except OSError as exc:
        out = f"cannot run it: {exc}"
    try:
        with open(executable, "rb") as f:
            first = f.readline(512).decode("utf-8", "replace").strip()
        interpreter = first[2:].strip() if first.startswith("#!") else "(not a script)"
    except OSError:
        interpreter = "?"
    print(f"  {label:<18} {executable} ({out or 'no --version output'}; runs {interpreter})")


def _round_line(rnd: int, name: str, seconds: float, events: int, extra: str = "") -> None:
    print(
        f"  round {rnd}  {name:<18} {seconds:7.3f} s  {fmt_rate(events / seconds)}{extra}",
        flush=True,
    )


def _report_failure(name: str, run: CommandRun, expected: int) -> None:
    print(f"  !! {name}: exit code {run.exit_code}, ", end="")
    if run.reported is None:
        print(f"its last lines name no event count (expected {expected:,}):")
    else:
        print(f"its summary names {run.reported:,} events, expected {expected:,}:")
    for line in run.tail or ["(no output)"]:
        print(f"  !!   {line}")


@dataclass
class CommandResult:
    rate: float | None  # best events/s of the runs that passed the checks; None if none did
    decode_rate: float
    runs_ok: bool
    baseline_rate: float | None = None


def command_throughput(
    args: argparse.Namespace, recording: Path, executables: dict[str, Path]
) -> CommandResult:
    print("\n== Frames for the plain decode ==")
    t0 = time.perf_counter()
    frames = [frame.data for frame in read_recording(recording)]
    read_s = time.perf_counter() - t0
    decode = msgspec.json.Decoder(list[Event]).decode
    t0 = time.perf_counter()
    events = run_plain_decode(frames, decode)
    print(
        f"  {len(frames):,} frames read into memory in {read_s:.1f} s, {events:,} events "
        f"counted by a first decode in {time.perf_counter() - t0:.2f} s (neither timed)"
    )
    print(f"  {sum(len(f) for f in frames) / MIB:.1f} MiB of JSON")

    names = [*executables, "msgspec decode"]
    print(
        f"\n== The command against a plain decode, alternately; best of {args.repeat}, "
        f"{events:,} events per run =="
    )
    print(f"  command: {' '.join(watch_argv(Path('polystream'), recording, Path('EMPTY_DIR')))}")
    if args.extra:
        print(f"  polystream watch (not the baseline) also gets: {args.extra}")
    print(
        "  stdout to /dev/null, stderr on a pseudo-terminal; a fresh empty working directory, "
        "filters directory and state directory per run; wall time from just before the process "
        "starts to its exit"
    )
    print(
        "  decode: msgspec.json.Decoder(list[polystream.events.Event]).decode, one call per "
        "frame, over the frames in memory"
    )
    times: dict[str, list[float]] = {name: [] for name in names}
    last: dict[str, CommandRun] = {}
    runs_ok = True
    for rnd in range(args.repeat):
        # Rotating the order spreads drift in the machine's speed over every path.
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            gc.collect()
            if name not in executables:
                t0 = time.perf_counter()
                n = run_plain_decode(frames, decode)
                elapsed = time.perf_counter() - t0
                if n != events:
                    print(f"  WARNING the decode counted {n:,} events, expected {events:,}")
                times[name].append(elapsed)
                _round_line(rnd + 1, name, elapsed, events)
                continue
            extra = shlex.split(args.extra) if name == "polystream watch" else []
            run = run_command(executables[name], recording, PEAK_SAMPLE_S, extra)
            last[name] = run
            startup = "n/a" if run.startup is None else f"{run.startup:.2f} s"
            details = (
                f"  exit {run.exit_code}, start-up {startup}, CPU {run.cpu:.1f} s "
                f"({run.cpu / run.seconds:.0%} of wall), peak RSS {_mib(run.peak_rss)}"
            )
            if run.ok(events):
                times[name].append(run.seconds)
                _round_line(rnd + 1, name, run.seconds, events, details)
            else:
                runs_ok = False
                print(f"  round {rnd + 1}  {name:<18} {run.seconds:7.3f} s  (not counted){details}")
                _report_failure(name, run, events)
    del frames
    gc.collect()

    for name, run in last.items():
        print(
            f"\n  {name}: the terminal's last lines in its last round "
            f"(of {run.lines:,} lines written):"
        )
        for line in run.tail[-3:] or ["(no output)"]:
            print(f"    {line}")
        verdict = "OK" if run.reported == events else "MISMATCH"
        reported = "no event count" if run.reported is None else f"{run.reported:,} events"
        print(f"    -> it names {reported}, expected {events:,}: {verdict}")

    best: dict[str, float] = {}
    print()
    for name in names:
        if times[name]:
            best[name] = events / min(times[name])
            print(f"  best     {name:<18} {min(times[name]):7.3f} s  {fmt_rate(best[name])}")
        else:
            print(f"  best     {name:<18} no run passed the checks")
    decode_rate = best["msgspec decode"]
    new = best.get("polystream watch")
    base = best.get("baseline watch")
    if new is not None:
        ratio = new / decode_rate
        print(
            f"  ratio polystream watch / msgspec decode  {ratio:6.3f} "
            f"(target >= {COMMAND_MIN_RATIO:.2f}): {_verdict(ratio >= COMMAND_MIN_RATIO)}"
        )
    if base is not None:
        print(f"  ratio baseline watch / msgspec decode    {base / decode_rate:6.3f}")
        if new is not None:
            print(f"  speed-up polystream / baseline           {new / base:6.3f}x")
    return CommandResult(new, decode_rate, runs_ok, base)


@dataclass
class CommandMemory:
    events: int
    growth: int | None  # bytes, first checkpoint after start-up to the last; None: no samples
    flat: bool
    ok: bool  # exit code 0 and the event count reported


def command_memory(args: argparse.Namespace, directory: Path, executable: Path) -> CommandMemory:
    n = args.memory_events
    print(
        f"\n== Memory: the command once over {n:,} events, VmRSS sampled every "
        f"{MEMORY_SAMPLE_S:g} s =="
    )
    recording = command_recording(directory, n, args.seed, args.rate)
    run = run_command(executable, recording, MEMORY_SAMPLE_S)
    startup = run.startup if run.startup is not None else 0.0
    print(
        f"  {run.seconds:.1f} s wall ({n / run.seconds:,.0f} events/s), exit {run.exit_code}, "
        f"start-up {startup:.2f} s (to its first output), CPU {run.cpu:.1f} s, "
        f"peak RSS {_mib(run.peak_rss)}, {len(run.samples)} samples"
    )
    ok = run.ok(n)
    if not ok:
        _report_failure("polystream watch", run, n)
    else:
        print(f"  {run.tail[-1]}")
    if not run.samples:
        print("  no RSS samples (no /proc/PID/status here?)")
        return CommandMemory(n, None, False, ok)
    picked: list[tuple[int, float, float, int]] = []  # (checkpoint, mark, sample time, RSS)
    for k in range(1, CHECKPOINTS + 1):
        mark = run.seconds * k / CHECKPOINTS
        before = [s for s in run.samples if s[0] <= mark]
        if not before:
            print(f"  checkpoint {k:>2}  at {mark:6.1f} s  (no sample yet)")
            continue
        at, rss = before[-1]
        picked.append((k, mark, at, rss))
        print(
            f"  checkpoint {k:>2}  at {mark:6.1f} s ({k / CHECKPOINTS:4.0%})  "
            f"RSS {rss / MIB:8.1f} MiB  (sampled at {at:6.1f} s)"
        )
    # The first checkpoint whose sample was taken once the process had started up (its first
    # output): before that, RSS only measures the imports.
    after = [p for p in picked if p[2] >= startup] or picked
    first, final = after[0], picked[-1]
    growth = final[3] - first[3]
    flat = growth <= args.flat_mib * MIB
    print(
        f"  growth, checkpoint {first[0]} (the first sampled after start-up) -> {final[0]}: "
        f"{growth / MIB:+.2f} MiB (flat means <= {args.flat_mib:g} MiB): {_verdict(flat)}"
    )
    return CommandMemory(n, growth, flat, ok)


def command_main(args: argparse.Namespace) -> int:
    """`--command`: the real command against a plain decode, and its memory over a long run."""
    executables = {"polystream watch": args.polystream.resolve()}
    if args.baseline is not None:
        executables["baseline watch"] = args.baseline.resolve()
    print("== Environment ==")
    print(
        f"  bench: python {platform.python_version()} ({platform.python_implementation()}), "
        f"msgspec {version('msgspec')}"
    )
    print(f"  {platform.platform()}; CPU: {cpu_model()}")
    if args.cpu is None:
        allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        print(f"  not pinned: the command runs as a user runs it, on CPUs {allowed or '(all)'}")
    else:
        print(f"  {pin_cpu(args.cpu)[1]}; the command inherits it")
    for label, executable in executables.items():
        describe_executable(label, executable)
    _, dropped = clean_environment()
    print(
        "  the command's environment: this one without "
        + (", ".join(dropped) if dropped else "(nothing to drop)")
        + "; POLYSTREAM_STATE_DIR set to a fresh empty directory"
    )

    directory = args.tmp if args.tmp is not None else Path(tempfile.gettempdir())
    directory.mkdir(parents=True, exist_ok=True)
    print(f"\n== Stream (seed {args.seed}, rate {args.rate:g}) ==")
    if args.recording is not None:
        recording = args.recording.resolve()
        print(f"  given: {recording} ({recording.stat().st_size / MIB:.1f} MiB)")
    else:
        recording = command_recording(directory, args.events, args.seed, args.rate)
    result = command_throughput(args, recording, executables)

    memory = None
    if args.memory_events > 0:
        memory = command_memory(args, directory, executables["polystream watch"])

    print("\n== Summary ==")
    rate, ratio = result.rate, None if result.rate is None else result.rate / result.decode_rate
    rows = [
        (
            f"command >= {COMMAND_TARGET_EVENTS_PER_S:,} events/s, wall time",
            "n/a" if rate is None else f"{rate:,.0f} /s",
            rate is not None and rate >= COMMAND_TARGET_EVENTS_PER_S,
        ),
        (
            f"command / plain msgspec decode >= {COMMAND_MIN_RATIO:.2f}",
            "n/a" if ratio is None else f"{ratio:.3f}",
            ratio is not None and ratio >= COMMAND_MIN_RATIO,
        ),
        ("every run exits 0 and reports every event", "", result.runs_ok),
    ]
    if memory is not None:
        rows.append(
            (
                f"RSS flat over {memory.events:,} events (<= {args.flat_mib:g} MiB growth)",
                "n/a" if memory.growth is None else f"{memory.growth / MIB:+.2f} MiB",
                memory.flat and memory.ok,
            )
        )
    for target, measured, ok in rows:
        print(f"  {target:<52} {measured:>16}   {_verdict(ok)}")
    if result.baseline_rate is not None:
        print(
            f"  (baseline: {result.baseline_rate:,.0f} /s, "
            f"{result.baseline_rate / result.decode_rate:.3f} of the decode)"
        )
    return 0


# --- measurement helpers --------------------------------------------------------------------------


def place(cpu: int | None) -> tuple[int | None, str]:
    """The in-process sections' CPUs: every one allowed (None, the default: as a user runs it),
    or every thread pinned to `cpu`; what was done, as a phrase."""
    if cpu is not None:
        return pin_cpu(cpu)
    if not hasattr(os, "sched_getaffinity"):
        return None, "not pinned (every CPU)"
    allowed = sorted(os.sched_getaffinity(0))
    return None, (
        f"not pinned: every thread may run on CPUs {allowed}, as a user runs it (the bar "
        "engine's thread and polars' pool can use a core the pipeline thread does not)"
    )


def cpus_label(cpu: int | None) -> str:
    """`place`'s outcome in a few words, once it is done."""
    if cpu is not None:
        return f"pinned to CPU {cpu}"
    if hasattr(os, "sched_getaffinity"):
        return f"not pinned, on CPUs {sorted(os.sched_getaffinity(0))}"
    return "not pinned"


def pin_cpu(cpu: int) -> tuple[int | None, str]:
    """Pin every thread of the process (polars' pool included) to one CPU; new threads inherit."""
    if not hasattr(os, "sched_setaffinity"):
        return None, "not pinned (os.sched_setaffinity unavailable on this platform)"
    allowed = sorted(os.sched_getaffinity(0))
    try:
        os.sched_setaffinity(0, {cpu})
        threads = _threads()
        for tid in threads:
            os.sched_setaffinity(tid, {cpu})
    except OSError as exc:
        return None, f"not pinned (sched_setaffinity({cpu}) failed: {exc})"
    return (
        cpu,
        f"pinned to CPU {cpu} (of {len(allowed)} allowed: {allowed}), {len(threads)} threads",
    )


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def pinning_check() -> str:
    masks = {tid: os.sched_getaffinity(tid) for tid in _threads()}
    cpus = set().union(*masks.values())
    return f"{len(masks)} threads, running on CPUs {sorted(cpus)}"


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def own_peak_rss_bytes() -> tuple[int, str]:
    """Peak RSS of this process image: ru_maxrss survives exec and would count the parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "(VmHWM)"
    except OSError:
        pass
    return peak_rss_bytes(), "(ru_maxrss)"


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux but bytes on macOS.
    return peak * (1 if sys.platform == "darwin" else 1024)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--events", type=int, default=2_000_000, help="events in the timed stream")
    ap.add_argument("--memory-events", type=int, default=10_000_000, help="events for the RSS run")
    ap.add_argument(
        "--filters", type=int, default=50, help="filters to time end to end (0: skip that run)"
    )
    ap.add_argument("--rate", type=float, default=300.0, help="event-time events/s per symbol")
    ap.add_argument("--seed", type=int, default=20240529)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per path; best one counts")
    ap.add_argument("--flat-mib", type=float, default=20.0, help="max RSS growth counted as flat")
    ap.add_argument(
        "--cpu",
        type=int,
        default=None,
        help="pin every thread to this CPU (default: not pinned, every CPU allowed)",
    )
    ap.add_argument(
        "--tmp",
        type=Path,
        default=None,
        help="directory for the recordings (with --command, kept there for reuse; default: the "
        "system's temporary directory)",
    )
    ap.add_argument("--memory-child", type=Path, default=None, help=argparse.SUPPRESS)
    command = ap.add_argument_group(
        "the command as a user runs it (--command: only that, none of the sections above)"
    )
    command.add_argument(
        "--command",
        action="store_true",
        help="time `polystream watch ... --feed REC --no-ui --json` against a plain decode",
    )
    command.add_argument(
        "--polystream",
        type=Path,
        default=Path(sys.executable).parent / "polystream",
        help="the executable to time (default: the one beside this python)",
    )
    command.add_argument(
        "--baseline", type=Path, default=None, help="another executable, timed in the same rounds"
    )
    command.add_argument(
        "--extra",
        default="",
        help="more options for the timed executable's watch, not the baseline's (with --baseline "
        "the same executable: what the options cost), such as '--metrics 127.0.0.1:0'",
    )
    command.add_argument(
        "--recording",
        type=Path,
        default=None,
        help="time over this recording instead of one of --events events in --tmp",
    )
    args = ap.parse_args(argv)
    if args.memory_events < 100_000 and not (args.command and args.memory_events == 0):
        ap.error(
            "--memory-events must be at least 100000 for ten checkpoints to mean anything "
            "(with --command, 0 skips the memory run)"
        )
    if args.memory_child is not None:
        return memory_child(args)
    if args.command:
        for executable in [args.polystream, args.baseline]:
            if executable is not None and not os.access(executable, os.X_OK):
                ap.error(f"{executable} is not an executable (see --polystream, --baseline)")
        if args.recording is not None and not args.recording.is_file():
            ap.error(f"--recording {args.recording}: no such file")
        return command_main(args)
    if IN_PROCESS_IMPORT_ERROR is not None:
        raise IN_PROCESS_IMPORT_ERROR

    print("== Environment ==")
    print(
        f"  python {platform.python_version()} ({platform.python_implementation()}), "
        f"polars {version('polars')}, msgspec {version('msgspec')}, "
        f"polystream {version('polystream')}"
    )
    print(f"  {platform.platform()}; CPU: {cpu_model()}")
    cpu, placed = place(args.cpu)
    print(f"  in-process sections {placed}; polars thread pool size {pl.thread_pool_size()}")
    print(f"  gc enabled={gc.isenabled()}, thresholds={gc.get_threshold()} (left as is)")

    with tempfile.TemporaryDirectory(prefix="bench_engine-", dir=args.tmp) as tmp:
        path = Path(tmp) / "stream.rec"
        print(f"\n== Stream (seed {args.seed}) ==")
        t0 = time.perf_counter()
        info = write_recording(path, args.events, args.seed, args.rate)
        describe(info, time.perf_counter() - t0)
        events = info.events

        print(
            "\n== End to end: replay -> decode -> columns -> bars at 1s, 1m, 5m and oscillators "
            f"(the bar engine's thread); best of {args.repeat} =="
        )
        print(
            f"  Pipeline(ReplaySource, Stages(..., min_pending={REPLAY_PENDING:,}), [], "
            f"live=False).run(), {cpus_label(cpu)}"
        )
        rss_before = rss_bytes()
        runs: list[EndToEnd] = []
        for rnd in range(args.repeat):
            gc.collect()
            run = run_end_to_end(path)
            runs.append(run)
            print(
                f"  round {rnd + 1}  {run.seconds:7.3f} s  {fmt_rate(run.events / run.seconds)}  "
                f"{run.final_bars:,} final bars"
            )
        peak_e2e = peak_rss_bytes()
        best = min(runs, key=lambda r: r.seconds)
        e2e_rate = best.events / best.seconds
        expected_bars = info.expected_final_bars()
        bars_ok = all(r.final_bars == expected_bars for r in runs)
        print(
            f"  best     {best.seconds:7.3f} s  {fmt_rate(e2e_rate)}  "
            f"({best.events:,} events decoded in {best.frames:,} frames, {best.passes} passes)"
        )
        print(
            f"  final bars {best.final_bars:,} (expected {expected_bars:,} from each symbol's "
            f"trade span at 1s/1m/5m: {'OK' if bars_ok else 'MISMATCH'}); "
            f"revised {best.revised}, too late {best.too_late}, rejected {best.rejected}"
        )
        if best.events != events:
            print(f"  WARNING the pipeline decoded {best.events:,} events, expected {events:,}")
        print(
            f"  RSS before the runs {rss_before / MIB:.1f} MiB; peak RSS (ru_maxrss) "
            f"{peak_e2e / MIB:.1f} MiB"
        )
        print(f"  pinning after the runs: {pinning_check()}")

        print(f"\n== Reading the recording alone; best of {args.repeat} ==")
        _, read_rate = best_of(
            "read_recording() iterated",
            lambda: run_read_recording(path),
            info.frames,
            events,
            args.repeat,
        )
        _, take_rate = best_of(
            "ReplaySource.take until EndOfStream",
            lambda: run_replay_take(path),
            info.frames,
            events,
            args.repeat,
        )
        print(
            f"  (take({TAKE_TIMEOUT:g}, {PASS_BYTES:,}, {PASS_AGE:g}): reading and chunking into "
            "passes on the thread that calls it, in a run the pipeline thread)"
        )

        stages = in_memory_rates(path, events, expected_bars, args.repeat)
        gc.collect()

        print("\n== Where the end-to-end time goes: each stage alone, per event of the stream ==")
        if cpu is None:
            print(
                "  (the bar engine runs on its own thread: not pinned, its time overlaps the "
                "pipeline thread's on a second core, so the stages can add up to more than end to "
                "end and the rest come out negative)"
            )
        else:
            print(
                f"  (pinned to CPU {cpu}: the bar engine's thread takes turns with the pipeline "
                "thread, so the stages add up to about end to end)"
            )
        e2e_us = 1e6 / e2e_rate
        parts = [
            ("ReplaySource.take until EndOfStream", 1e6 / take_rate),
            ("Decoder().decode", 1e6 / stages.decode),
            (
                "Batcher.build columns (build - decode alone)",
                1e6 / stages.batch - 1e6 / stages.decode,
            ),
            ("BarEngine.add_trades + finish, oscillators", 1e6 / stages.bars),
        ]
        parts.append(
            (
                "the rest, by difference (loop, sinks, hand-offs)",
                e2e_us - sum(us for _, us in parts),
            )
        )
        print(f"  {'end to end':<52} {e2e_us:6.3f} us/event  100.0%")
        for name, us in parts:
            print(f"  {name:<52} {us:6.3f} us/event  {us / e2e_us:6.1%}")
        print(f"  (read_recording alone, no chunking into passes: {1e6 / read_rate:.3f} us/event)")
        print(f"  ratio end to end / decode only          {e2e_rate / stages.decode:6.3f}")
        print(f"  ratio end to end / Batcher.build        {e2e_rate / stages.batch:6.3f}")
        print(f"  ratio end to end / bar engine alone     {e2e_rate / stages.bars:6.3f}")
        print(f"  ratio end to end / ReplaySource.take    {e2e_rate / take_rate:6.3f}")

        filtered = None
        if args.filters > 0:
            filtered = filters_section(path, info, args.filters, args.repeat)

        path.unlink()
        print(f"\n== Memory: {args.memory_events:,} events end to end ==")
        mem = memory_in_child(args, cpu, Path(tmp))

    print("\n== Summary ==")
    rows = [
        (
            f"end to end >= {TARGET_EVENTS_PER_S:,} events/s in-process",
            f"{e2e_rate:,.0f} /s",
            e2e_rate >= TARGET_EVENTS_PER_S,
        ),
        (
            f"RSS flat over {mem.events:,} events (<= {args.flat_mib:g} MiB growth)",
            f"{mem.growth / MIB:+.2f} MiB",
            mem.flat,
        ),
        ("final bars match the streams' spans", f"{best.final_bars:,}", bars_ok and mem.bars_ok),
    ]
    if filtered is not None:
        rows.append(
            (
                f"{filtered.count} filters >= {FILTERS_MIN_RATIO:.0%} of the rate without",
                f"{filtered.ratio:.3f} x",
                filtered.ok,
            )
        )
    for target, measured, ok in rows:
        print(f"  {target:<52} {measured:>16}   {_verdict(ok)}")
    print(f"  (in-process sections {cpus_label(cpu)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
