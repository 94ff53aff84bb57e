"""Decode throughput and memory benchmark for `polystream.decode.Decoder`.

One run, one seeded and realistic mixed crypto stream (event formats as in POLYGON.md §3: ~71% XT
trades with string ids and side conditions, ~25% XQ quotes, ~4% XA/XAS aggregates, occasional
status frames), batched into JSON-array frames of 1-20 events like the live feed sends them.

It measures:

1. Throughput, best of `--repeat` runs on one pinned CPU, over the identical list of frames:
   - polystream: ``Decoder().decode(frame)``, frame to typed msgspec structs;
   - ``json.loads(frame)`` alone, frame to untyped dicts (a reference point);
   - the official ``massive`` client: ``json.loads(frame)`` then
     ``massive.websocket.models.parse(msgs, logger, Market.Crypto)``, which is what
     ``massive.WebSocketClient`` runs on every frame it receives.
   The frames are bytes; the three paths are then timed again on the same frames as str, which is
   how websocket libraries deliver text frames to the official client.
2. Memory: polystream decoding ``--memory-events`` events, cycling over the pre-built frames and
   retaining only the last ``--keep`` events, with RSS sampled at ten checkpoints.
3. A sanity check that all three paths see the same market events, and a summary against the
   targets: >= 1.5 M events/s on one core, >= 8x the official client's parse path, flat memory.

Run from the project root:

    . .venv/bin/activate
    PYTHONPATH=. python benchmarks/bench_decode.py [--events N] [--memory-events M] [--seed S]

The exit code is always 0: this reports numbers, it does not gate anything.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import math
import os
import platform
import random
import resource
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from common import cpu_model, fmt_rate, version
from massive.websocket.models import Market, parse

from polystream.decode import Decoder
from polystream.events import Status

TARGET_EVENTS_PER_S = 1_500_000
TARGET_VS_MASSIVE = 8.0
MIB = 1024 * 1024

# Start of the synthetic session (2024-05-29T16:26:40Z); only relative times matter.
T0_MS = 1_717_000_000_000


@dataclass(frozen=True)
class PairSpec:
    pair: str
    price: float  # starting price, quote currency
    price_dp: int  # decimals of the venue's price tick
    weight: float  # share of the traffic
    size: float  # median trade size, base currency
    size_dp: int


PAIRS: tuple[PairSpec, ...] = (
    PairSpec("BTC-USD", 67_250.0, 2, 30, 0.012, 8),
    PairSpec("ETH-USD", 3_480.0, 2, 20, 0.15, 8),
    PairSpec("SOL-USD", 148.0, 2, 10, 3.0, 6),
    PairSpec("XRP-USD", 0.5231, 4, 7, 850.0, 6),
    PairSpec("DOGE-USD", 0.15234, 5, 6, 4_000.0, 2),
    PairSpec("ADA-USD", 0.4512, 4, 4, 600.0, 2),
    PairSpec("AVAX-USD", 35.12, 2, 3, 12.0, 6),
    PairSpec("LINK-USD", 14.853, 3, 3, 25.0, 6),
    PairSpec("LTC-USD", 82.41, 2, 3, 4.0, 8),
    PairSpec("BTC-EUR", 62_010.0, 2, 6, 0.01, 8),
    PairSpec("ETH-BTC", 0.05175, 5, 4, 0.3, 8),
    PairSpec("USDT-USD", 1.0001, 4, 4, 2_500.0, 2),
)
EXCHANGES = (1, 2, 6, 10, 23)  # Coinbase, Bitfinex, Bitstamp, Binance, Kraken (see §4.5)
STATUS_MESSAGES = (
    ("success", "subscribed to: XT.*"),
    ("success", "subscribed to: XQ.*"),
    ("error", "slow consumer: buffer near capacity"),
)


@dataclass
class Stream:
    frames: list[bytes]
    market_events: int
    status_events: int
    by_type: Counter[str]

    @property
    def events(self) -> int:
        return self.market_events + self.status_events


class _PairState:
    """Random-walk price and per-pair counters, so consecutive events look like one market."""

    def __init__(self, spec: PairSpec, rng: random.Random) -> None:
        self.spec = spec
        self.mid = spec.price
        self.trade_id = rng.randrange(10_000_000, 900_000_000)
        self.bar_start_s = T0_MS
        self.bar_start_m = T0_MS - T0_MS % 60_000


def _build_stream(n_events: int, seed: int) -> Stream:
    rng = random.Random(seed)
    states = [_PairState(spec, rng) for spec in PAIRS]
    weights = [spec.weight for spec in PAIRS]
    frames: list[bytes] = []
    by_type: Counter[str] = Counter()
    encode = msgspec.json.encode
    status_events = 0
    now = T0_MS

    def status_frame(status: str, message: str) -> None:
        nonlocal status_events
        frames.append(encode([{"ev": "status", "status": status, "message": message}]))
        status_events += 1

    # A real session opens with the handshake before any market data.
    status_frame("connected", "Connected Successfully")
    status_frame("auth_success", "authenticated")

    made = 0
    while made < n_events:
        if rng.random() < 1 / 20_000:
            status_frame(*rng.choice(STATUS_MESSAGES))
        now += rng.randint(0, 4)
        batch: list[dict[str, Any]] = []
        for _ in range(min(rng.randint(1, 20), n_events - made)):
            st = rng.choices(states, weights)[0]
            spec = st.spec
            st.mid *= math.exp(rng.gauss(0.0, 1.5e-4))
            tick = 10.0**-spec.price_dp
            t = now - rng.randint(0, 250)
            r = now + rng.randint(3, 120)
            kind = rng.random()
            if kind < 0.71:
                st.trade_id += rng.randint(1, 3)
                ev: dict[str, Any] = {
                    "ev": "XT",
                    "pair": spec.pair,
                    "p": round(st.mid + rng.choice((-0.5, 0.5)) * tick, spec.price_dp),
                    "t": t,
                    "s": _size(rng, spec),
                    "c": [rng.choice((1, 2))],
                    "i": str(st.trade_id),
                    "x": rng.choice(EXCHANGES),
                    "r": r,
                }
            elif kind < 0.96:
                half = tick * rng.randint(1, 6) / 2
                ev = {
                    "ev": "XQ",
                    "pair": spec.pair,
                    "bp": round(st.mid - half, spec.price_dp),
                    "bs": _size(rng, spec, 4.0),
                    "ap": round(st.mid + half, spec.price_dp),
                    "as": _size(rng, spec, 4.0),
                    "t": t,
                    "x": rng.choice(EXCHANGES),
                    "r": r,
                }
            else:
                ev = _aggregate(rng, st, minute=kind >= 0.99)
            batch.append(ev)
            by_type[ev["ev"]] += 1
        frames.append(encode(batch))
        made += len(batch)
    return Stream(frames, made, status_events, by_type)


def _size(rng: random.Random, spec: PairSpec, scale: float = 1.0) -> float:
    # Trade sizes are heavy-tailed: lognormal around the pair's median, never rounded to zero.
    size = round(spec.size * scale * rng.lognormvariate(0.0, 1.2), spec.size_dp)
    return size or 10.0**-spec.size_dp


def _aggregate(rng: random.Random, st: _PairState, *, minute: bool) -> dict[str, Any]:
    spec = st.spec
    width = 60_000 if minute else 1_000
    if minute:
        st.bar_start_m += width
        start = st.bar_start_m
    else:
        st.bar_start_s += width
        start = st.bar_start_s
    spread = st.mid * abs(rng.gauss(0.0, 4e-4 if minute else 1e-4))
    low = st.mid - spread * rng.random()
    high = low + spread
    o = rng.uniform(low, high)
    c = rng.uniform(low, high)
    vw = rng.uniform(min(o, c), max(o, c))
    trades = rng.randint(1, 400 if minute else 25)
    volume = sum(_size(rng, spec) for _ in range(min(trades, 8))) * trades / min(trades, 8)
    dp = spec.price_dp
    return {
        "ev": "XA" if minute else "XAS",
        "pair": spec.pair,
        "v": round(volume, spec.size_dp),
        "vw": round(vw, dp + 2),
        "z": round(volume / trades, spec.size_dp),
        "o": round(o, dp),
        "c": round(c, dp),
        "h": round(high, dp),
        "l": round(low, dp),
        "s": start,
        "e": start + width,
    }


# --- the three parse paths ------------------------------------------------------------------------
# Each returns the number of top-level elements it was handed, so the loop bodies cost the same
# and every path is charged for the same work: turning every frame into its final objects.


def run_polystream(frames: Sequence[bytes | str]) -> int:
    decode = Decoder().decode
    n = 0
    for frame in frames:
        n += len(decode(frame))
    return n


def run_json(frames: Sequence[bytes | str]) -> int:
    loads = json.loads
    n = 0
    for frame in frames:
        n += len(loads(frame))
    return n


_massive_log = logging.getLogger("bench_decode.massive")


def run_massive(frames: Sequence[bytes | str]) -> int:
    loads = json.loads
    logger = _massive_log
    market = Market.Crypto
    n = 0
    for frame in frames:
        msgs = loads(frame)
        parse(msgs, logger, market)
        n += len(msgs)
    return n


POLY = "polystream Decoder.decode"
JSON = "json.loads"
MASSIVE = "massive json.loads + parse"
PATHS: dict[str, Callable[[Sequence[bytes | str]], int]] = {
    POLY: run_polystream,
    JSON: run_json,
    MASSIVE: run_massive,
}


# --- sanity ---------------------------------------------------------------------------------------


def count_market_events(frames: list[bytes]) -> dict[str, Counter[str]]:
    """Market events per `ev` type as each path sees them; status notices are not market events."""
    decoder = Decoder()
    seen: dict[str, Counter[str]] = {name: Counter() for name in PATHS}
    poly, plain, official = seen[POLY], seen[JSON], seen[MASSIVE]
    logger = _massive_log
    for frame in frames:
        for e in decoder.decode(frame):
            if not isinstance(e, Status):
                poly[str(type(e).__struct_config__.tag)] += 1
        msgs = json.loads(frame)
        for d in msgs:
            if d.get("ev") != "status":
                plain[d["ev"]] += 1
        for m in parse(msgs, logger, Market.Crypto):
            official[m.event_type] += 1
    s = decoder.stats
    if s.malformed_frames or s.rejected_events or s.unknown_events:
        print(f"  WARNING polystream rejected input: {s}")
    return seen


# --- measurement helpers --------------------------------------------------------------------------


def pin_cpu(requested: int | None) -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (os.sched_setaffinity unavailable on this platform)"
    allowed = sorted(os.sched_getaffinity(0))
    # The highest-numbered CPU tends to take fewer device interrupts than CPU 0.
    cpu = allowed[-1] if requested is None else requested
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        return f"not pinned (sched_setaffinity({cpu}) failed: {exc})"
    return f"pinned to CPU {cpu} (of {len(allowed)} allowed: {allowed})"


def rss_bytes() -> tuple[int, str]:
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE"), "current RSS from /proc/self/statm"
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is KiB on Linux but bytes on macOS; without /proc it is only a peak.
        scale = 1 if sys.platform == "darwin" else 1024
        return peak * scale, "peak RSS from getrusage (no /proc): growth is an upper bound"


def time_paths(frames: Sequence[bytes | str], events: int, repeat: int) -> dict[str, float]:
    """Best events/s of each path over `repeat` rounds."""
    timings: dict[str, list[float]] = {name: [] for name in PATHS}
    for rnd in range(repeat):
        # Rotating the order spreads any thermal or frequency drift over all three paths.
        names = list(PATHS)
        names = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in names:
            # Start each run from the same collector state; the collector stays enabled throughout.
            gc.collect()
            t0 = time.perf_counter()
            n = PATHS[name](frames)
            elapsed = time.perf_counter() - t0
            if n != events:
                print(f"  WARNING {name} handled {n:,} elements, expected {events:,}")
            timings[name].append(elapsed)
            print(f"  round {rnd + 1}  {name:<28} {elapsed:7.3f} s  {fmt_rate(events / elapsed)}")
    best = {name: events / min(ts) for name, ts in timings.items()}
    print()
    for name, rate in best.items():
        print(f"  best     {name:<28} {min(timings[name]):7.3f} s  {fmt_rate(rate)}")
    poly = best[POLY]
    print(f"  ratio polystream / json.loads            {poly / best[JSON]:6.2f}x")
    print(f"  ratio polystream / massive parse path    {poly / best[MASSIVE]:6.2f}x")
    return best


def memory_run(
    frames: list[bytes], total: int, keep: int, checkpoints: int
) -> tuple[list[tuple[int, int]], str]:
    decode = Decoder().decode
    recent: deque[Any] = deque(maxlen=keep)
    step = total / checkpoints
    next_mark = step
    done = 0
    samples: list[tuple[int, int]] = []
    source = ""
    for frame in itertools.cycle(frames):
        events = decode(frame)
        recent.extend(events)
        done += len(events)
        if done >= next_mark:
            rss, source = rss_bytes()
            samples.append((done, rss))
            print(f"  checkpoint {len(samples):>2}  {done:>12,} events  RSS {rss / MIB:8.1f} MiB")
            if len(samples) == checkpoints:
                break
            next_mark += step
    return samples, source


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _summary_rows(rows: Iterable[tuple[str, str, bool]]) -> None:
    for target, measured, ok in rows:
        print(f"  {target:<52} {measured:>18}   {_verdict(ok)}")


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--events", type=int, default=1_000_000, help="market events in the stream")
    ap.add_argument("--memory-events", type=int, default=10_000_000, help="events decoded for RSS")
    ap.add_argument("--seed", type=int, default=20240529)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per path; best one counts")
    ap.add_argument("--keep", type=int, default=10_000, help="decoded events retained in memory")
    ap.add_argument("--flat-mib", type=float, default=5.0, help="max RSS growth counted as flat")
    ap.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: highest)")
    args = ap.parse_args(argv)

    print("== Environment ==")
    print(
        f"  python {platform.python_version()} ({platform.python_implementation()}), "
        f"msgspec {version('msgspec')}, massive {version('massive')}, "
        f"polystream {version('polystream')}"
    )
    print(f"  {platform.platform()}; CPU: {cpu_model()}")
    print(f"  {pin_cpu(args.cpu)}")
    print(
        f"  gc enabled={gc.isenabled()}, thresholds={gc.get_threshold()} (left as is for all "
        "paths; polystream's structs are gc=False, json dicts and massive models are tracked)"
    )

    print(f"\n== Stream (seed {args.seed}) ==")
    t0 = time.perf_counter()
    stream = _build_stream(args.events, args.seed)
    built_in = time.perf_counter() - t0
    frames = stream.frames
    sizes = [len(f) for f in frames]
    print(f"  built in {built_in:.1f} s (not timed below)")
    print(
        f"  {len(frames):,} frames, {stream.events:,} events "
        f"({stream.market_events:,} market + {stream.status_events} status), "
        f"{sum(sizes) / MIB:.1f} MiB of JSON"
    )
    print(
        f"  {stream.events / len(frames):.2f} events/frame on average, "
        f"{sum(sizes) / len(frames):.0f} bytes/frame on average"
    )
    mix = ", ".join(
        f"{ev} {n / stream.market_events:.1%}" for ev, n in stream.by_type.most_common()
    )
    print(f"  mix: {mix}")
    print(f"  sample frame: {min(frames[2:12], key=len).decode()}")

    print("\n== Sanity: market events per type as each path sees them ==")
    seen = count_market_events(frames)
    expected = dict(stream.by_type)
    agree = True
    for name, counts in seen.items():
        ok = dict(counts) == expected
        agree &= ok
        total = sum(counts.values())
        detail = ", ".join(f"{ev}={counts[ev]:,}" for ev in sorted(expected))
        print(f"  {name:<28} {total:>10,}  ({detail})  {'OK' if ok else 'MISMATCH'}")
    print(f"  all three paths agree with the generator: {'YES' if agree else 'NO'}")

    print(
        f"\n== Throughput on the bytes frames: best of {args.repeat}, "
        f"{stream.events:,} events per run =="
    )
    best = time_paths(frames, stream.events, args.repeat)
    poly = best[POLY]
    vs_json = poly / best[JSON]
    vs_massive = poly / best[MASSIVE]

    # Websocket libraries hand text frames over as str, which is what massive.WebSocketClient
    # really feeds json.loads; bytes cost json.loads an extra decode, so the bytes-only figure
    # alone would flatter polystream's ratio.
    text_frames = [f.decode() for f in frames]
    print(
        f"\n== Throughput on the same frames as str (as websocket text frames arrive): "
        f"best of {args.repeat} =="
    )
    best_text = time_paths(text_frames, stream.events, args.repeat)
    del text_frames
    vs_massive_text = best_text[POLY] / best_text[MASSIVE]

    print(
        f"\n== Memory: {args.memory_events:,} events through polystream, "
        f"last {args.keep:,} retained, cycling over the {len(frames):,} frames above =="
    )
    before, _ = rss_bytes()
    print(f"  before decoding: RSS {before / MIB:8.1f} MiB")
    t0 = time.perf_counter()
    samples, source = memory_run(frames, args.memory_events, args.keep, checkpoints=10)
    mem_elapsed = time.perf_counter() - t0
    growth = samples[-1][1] - samples[0][1]
    flat = growth < args.flat_mib * MIB
    print(f"  ({source}; {samples[-1][0]:,} events in {mem_elapsed:.1f} s)")
    print(
        f"  growth, checkpoint 1 -> {len(samples)}: {growth / MIB:+.2f} MiB "
        f"(flat means < {args.flat_mib:g} MiB): {_verdict(flat)}"
    )

    print("\n== Summary ==")
    _summary_rows(
        [
            (
                f"polystream >= {TARGET_EVENTS_PER_S / 1e6:g} M events/s on one core",
                f"{poly / 1e6:.3f} M/s",
                poly >= TARGET_EVENTS_PER_S,
            ),
            (
                f"polystream >= {TARGET_VS_MASSIVE:g}x official massive parse path",
                f"{vs_massive:.2f}x",
                vs_massive >= TARGET_VS_MASSIVE,
            ),
            (
                "  same, both fed str frames (massive's real input)",
                f"{vs_massive_text:.2f}x",
                vs_massive_text >= TARGET_VS_MASSIVE,
            ),
            (
                f"memory flat over {args.memory_events:,} events (< {args.flat_mib:g} MiB)",
                f"{growth / MIB:+.2f} MiB",
                flat,
            ),
            (
                "all parse paths see the same market events",
                f"{stream.market_events:,}",
                agree,
            ),
        ]
    )
    print(f"  (for reference: polystream / json.loads = {vs_json:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
