"""Throughput and latency of a run spread over processes through NATS JetStream.

Everything is measured on whole processes, as a user runs them, each against a nats-server of
its own: `nats-server -js -a 127.0.0.1 -p PORT -sd DIR`, started fresh per measurement on a free
port (never 4222) with a temporary store, checked to be the one listening (its log says it is
ready) and stopped afterwards. The binary is `nats-server` on PATH, else /usr/sbin/nats-server.

1. Throughput. One recording of `--events` events (default 1,000,000), written with
   `bench_engine.write_recording` (three symbols, ~75% trades, frames of 1-20 events). Timed,
   best of `--repeat` (default 3), wall time from just before the first process starts to the
   exit of the last one, start-up included:
   - plain: `polystream watch SYMBOLS --feed REC -t 1s -t 1m --json --no-ui --filters filters/`
     (the shipped filters), the baseline;
   - ingest alone: `polystream ingest SYMBOLS --feed REC --publish URL --partitions P`;
   - ingest -> 1 shard and ingest -> 2 shards: the ingest and `polystream watch --from URL
     --shard K/N -t 1s -t 1m --json --no-ui --filters filters/` for each K, all started at
     once; the time runs until every shard has exited (the ingest's own time is shown too).
   Each gives events/s (the recording's events over the wall time) and its ratio to plain's.
   Every process's stdout goes to a file, stderr to another; every run must exit 0. The bar and
   alert records on the shards' stdout, together, are compared with plain's, as canonical JSON
   ("same records: yes/no"); a "no" names how many records differ, in which fields and by how
   much, and is reported, not raised.
2. Latency the bus adds, live. `bench_latency`'s loopback feed (a process serving the Polygon
   crypto WebSocket protocol) streams `--rate` events/s (default 2,000) for `--seconds`
   (default 20), with `--marked-per-second` (20) marked trades of size >= 1000 that one filter
   (`on: trade`, `when: size >= 1000`, `trigger: level`) alerts on. Two runs:
   - plain: `polystream watch SYMBOLS --feed ws://127.0.0.1:PORT --json --no-ui --no-warmup
     --filters DIR -t 1m` (`bench_latency.run_once`);
   - bus: `polystream ingest SYMBOLS --feed ws://127.0.0.1:PORT --publish URL` and `polystream
     watch --from URL --shard 0/1 --json --no-ui --no-warmup --filters DIR -t 1m`.
   The alert lines are read off the (shard's) stdout pipe as they come and stamped with the wall
   clock; the latency of a marked trade is that stamp minus its alert's trade time (`time`,
   which is the trade's `t`: alerts with another time are counted). The feed's `t` is the wall
   clock of the same machine when it builds the frame, so the difference of the two runs is
   what the bus adds. The first `--warmup` seconds (2) are left out; p50/p90/p99/max of each,
   and bus minus plain at p50 and p99.

Run from the project root, with the virtualenv active:

    python benchmarks/bench_bus.py [--events N] [--repeat R] [--partitions P]
        [--rate R] [--seconds S] [--warmup W] [--only throughput|latency]
        [--polystream PATH] [--nats-server PATH] [--tmp DIR]

The defaults take about two minutes on two cores. The exit code is 0 unless the
setup is impossible (no nats-server, no polystream): this reports numbers, it does not gate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_latency as live
from bench_engine import SYMBOLS, clean_environment, write_recording
from common import cpu_model, fmt_rate, version

ROOT = Path(__file__).resolve().parent.parent
FILTERS = ROOT / "filters"
DEBIAN_NATS = "/usr/sbin/nats-server"
NATS_READY = "Server is ready"
NATS_START_S = 10.0
RUN_TIMEOUT_S = 600.0  # a throughput run that takes longer has hung
SEED = 20240529
EVENT_RATE = 300.0  # the recording's event-time events/s per symbol (bench_engine's default)
TIMEFRAMES = ("-t", "1s", "-t", "1m")
MIB = 1024 * 1024
NAMES = ("shard", "ingest")
# What the throughput section times: no bus (None), or an ingest and that many shards.
MEASURES: dict[str, int | None] = {
    "plain": None,
    "ingest alone": 0,
    "ingest -> 1 shard": 1,
    "ingest -> 2 shards": 2,
}  # the processes of a live run over the bus


# --- nats-server ------------------------------------------------------------------------------


def find_nats(given: str | None) -> str | None:
    """The nats-server binary: the one given, else on PATH, else where Debian puts it."""
    if given:
        return given if os.access(given, os.X_OK) else None
    return shutil.which("nats-server") or (DEBIAN_NATS if os.access(DEBIAN_NATS, os.X_OK) else None)


def nats_version(binary: str) -> str:
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return (done.stdout or done.stderr).strip()


def free_port() -> int:
    """A loopback port nobody listens on now, never NATS's default 4222."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 4222:
            return port


@contextlib.contextmanager
def nats_server(binary: str, tmp: Path) -> Iterator[str]:
    """A fresh JetStream server on loopback, its URL; stopped and its store deleted after. Ready
    means its own log says so: a connection alone could reach another server on a taken port."""
    store = Path(tempfile.mkdtemp(prefix="bench_bus-nats-", dir=tmp))
    try:
        for _ in range(3):  # a port taken between free_port() and the bind: try another
            port = free_port()
            log = store / f"server-{port}.log"
            argv = [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store / "js")]
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
                )
            try:
                if _wait_ready(proc, log):
                    yield f"nats://127.0.0.1:{port}"
                    return
            finally:
                _end(proc, signal.SIGTERM)
        raise RuntimeError(f"nats-server did not start:\n{log.read_text(errors='replace')}")
    finally:
        shutil.rmtree(store, ignore_errors=True)


def _wait_ready(proc: subprocess.Popen[bytes], log: Path) -> bool:
    deadline = time.monotonic() + NATS_START_S
    while time.monotonic() < deadline and proc.poll() is None:
        if NATS_READY in log.read_text(errors="replace"):
            return True
        time.sleep(0.02)
    return False


def _end(proc: subprocess.Popen[bytes], sig: signal.Signals) -> int | None:
    """Signal a process of ours and wait for it; kill it if it does not go."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


# --- running polystream -----------------------------------------------------------------------


@dataclass
class Setup:
    """What every throughput process shares: the executable, environment and directories."""

    exe: Path
    recording: Path
    partitions: int
    env: dict[str, str]
    cwd: Path
    out: Path  # where stdout and stderr files go

    def plain(self) -> list[str]:
        return [str(self.exe), "watch", *SYMBOLS, "--feed", str(self.recording), *TIMEFRAMES,
                "--json", "--no-ui", "--filters", str(FILTERS)]  # fmt: skip

    def ingest(self, url: str) -> list[str]:
        return [str(self.exe), "ingest", *SYMBOLS, "--feed", str(self.recording), "--publish",
                url, "--partitions", str(self.partitions)]  # fmt: skip

    def shard(self, url: str, k: int, n: int) -> list[str]:
        return [str(self.exe), "watch", "--from", url, "--shard", f"{k}/{n}", *TIMEFRAMES,
                "--json", "--no-ui", "--filters", str(FILTERS)]  # fmt: skip


@dataclass
class Launched:
    name: str
    proc: subprocess.Popen[bytes]
    stdout: Path | None  # None: /dev/null
    stderr: Path
    exited: float = math.nan  # seconds from the run's start


def launch(setup: Setup, name: str, argv: list[str], keep_stdout: bool) -> Launched:
    """Start one process: stdout to a file (or /dev/null), stderr to a file, never a pipe."""
    out = setup.out / f"{name}.stdout" if keep_stdout else None
    err = setup.out / f"{name}.stderr"
    with contextlib.ExitStack() as stack:
        stderr = stack.enter_context(err.open("wb"))
        stdout: Any = stack.enter_context(out.open("wb")) if out else subprocess.DEVNULL
        proc = subprocess.Popen(
            argv, cwd=setup.cwd, env=setup.env, stdin=subprocess.DEVNULL, stdout=stdout,
            stderr=stderr,
        )  # fmt: skip
    return Launched(name, proc, out, err)


def wait_all(procs: Sequence[Launched], t0: float) -> None:
    """Wait for every process, stamping when each exited; kill them all past RUN_TIMEOUT_S."""

    def watch(p: Launched) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(RUN_TIMEOUT_S)
            p.exited = time.perf_counter() - t0

    threads = [threading.Thread(target=watch, args=(p,), daemon=True) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        if p.proc.poll() is None:
            _end(p.proc, signal.SIGKILL)


def tail(path: Path, n: int = 4) -> list[str]:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError as exc:
        return [f"(unreadable: {exc})"]
    return lines[-n:] or ["(empty)"]


# --- the records ------------------------------------------------------------------------------


def records(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The bar and alert records of JSON-lines files, in file order."""
    found = []
    for path in paths:
        with path.open("rb") as f:
            for line in f:
                record = json.loads(line)
                if record.get("type") in ("bar", "alert"):
                    found.append(record)
    return found


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    """What a record is about (not what it says): its kind, symbol, timeframe, filter, time."""
    at = r.get("start", r.get("time"))
    return (r["type"], r.get("symbol"), r.get("timeframe"), r.get("filter"), at, r.get("state"))


def _canon(r: dict[str, Any]) -> str:
    return json.dumps(r, sort_keys=True)


def compare(plain: list[dict[str, Any]], got: list[dict[str, Any]]) -> str:
    """Yes when the two sets of records are equal; otherwise no, and how they differ."""
    if sorted(map(_canon, plain)) == sorted(map(_canon, got)):
        return f"yes ({len(plain):,} records)"
    mine: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in plain:
        mine.setdefault(_key(r), []).append(r)
    theirs: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in got:
        theirs.setdefault(_key(r), []).append(r)
    fields: Counter[str] = Counter()
    worst = 0.0  # largest relative difference of a numeric field
    differ = unmatched = 0
    for key in mine.keys() | theirs.keys():
        a = sorted(mine.get(key, []), key=_canon)
        b = sorted(theirs.get(key, []), key=_canon)
        if len(a) != len(b):
            unmatched += abs(len(a) - len(b))
        for x, y in zip(a, b, strict=False):
            changed = [f for f in x.keys() | y.keys() if x.get(f) != y.get(f)]
            differ += bool(changed)
            fields.update(changed)
            for f in changed:
                u, v = x.get(f), y.get(f)
                if isinstance(u, int | float) and isinstance(v, int | float):
                    worst = max(worst, abs(u - v) / max(abs(u), abs(v), 1e-300))
                else:
                    worst = math.inf
    named = ", ".join(f"{f} in {n:,}" for f, n in fields.most_common(5)) or "none"
    return (
        f"no: {len(plain):,} records plain, {len(got):,} here; {unmatched:,} without a "
        f"counterpart; {differ:,} differ (fields: {named}; largest relative difference "
        f"{worst:.1e})"
    )


# --- throughput -------------------------------------------------------------------------------


@dataclass
class Timed:
    """One measurement over its rounds: the wall times of the rounds that ran clean."""

    label: str
    seconds: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    same: list[str] = field(default_factory=list)

    @property
    def best(self) -> float | None:
        return min(self.seconds) if self.seconds else None


def run_plain(setup: Setup) -> tuple[float | None, list[Launched]]:
    t0 = time.perf_counter()
    procs = [launch(setup, "plain", setup.plain(), keep_stdout=True)]
    wait_all(procs, t0)
    return _clean(procs), procs


def run_bus(setup: Setup, nats: str, shards: int) -> tuple[float | None, list[Launched]]:
    """The ingest and `shards` shards on a fresh server, started together; the wall time until
    the last of them exits (None if one failed)."""
    with nats_server(nats, setup.out) as url:
        t0 = time.perf_counter()
        procs = [launch(setup, "ingest", setup.ingest(url), keep_stdout=False)]
        procs += [
            launch(setup, f"shard-{k}-of-{shards}", setup.shard(url, k, shards), keep_stdout=True)
            for k in range(shards)
        ]
        wait_all(procs, t0)
    return _clean(procs), procs


def _clean(procs: Sequence[Launched]) -> float | None:
    """The run's wall time, or None, with what went wrong printed, if a process failed."""
    ok = True
    for p in procs:
        if p.proc.returncode != 0:
            ok = False
            print(f"  !! {p.name} exited {p.proc.returncode}; stderr ends:")
            for line in tail(p.stderr):
                print(f"  !!   {line}")
    return max(p.exited for p in procs) if ok else None


def published_line(procs: Sequence[Launched]) -> str:
    """The ingest's own summary ("published N events ... (M messages, X MB)"), if it ran."""
    for p in procs:
        if p.name == "ingest":
            lines = [s for s in tail(p.stderr, 10) if s.startswith("published")]
            return lines[-1] if lines else ""
    return ""


def throughput(args: argparse.Namespace, nats: str, tmp: Path) -> None:
    print(f"\n== Throughput: {args.events:,} events from a recording ==")
    recording = tmp / "stream.rec"
    t0 = time.perf_counter()
    info = write_recording(recording, args.events, SEED, EVENT_RATE)
    print(
        f"  recording: {info.events:,} events ({info.trades:,} trades, {info.quotes:,} quotes) "
        f"in {info.frames:,} frames, {recording.stat().st_size / MIB:.1f} MiB, "
        f"{info.span_s / 60:.1f} min of event time; written in {time.perf_counter() - t0:.1f} s "
        "(not timed)"
    )
    env, dropped = clean_environment()
    cwd = tmp / "cwd"
    cwd.mkdir()
    setup = Setup(args.polystream, recording, args.partitions, env, cwd, tmp)
    shown = Setup(Path("polystream"), Path("REC"), args.partitions, env, cwd, tmp)
    url = "nats://127.0.0.1:PORT"
    print("  commands (REC: the recording; filters/: the shipped filters; a fresh server each):")
    print(f"    plain         {' '.join(shown.plain())}")
    print(f"    ingest        {' '.join(shown.ingest(url))}")
    print(f"    shard K of N  {' '.join(shown.shard(url, 0, 1)).replace('0/1', 'K/N')}")
    print(
        "  stdout and stderr to files; a fresh empty working directory; the environment without "
        f"{', '.join(dropped) or '(nothing to drop)'}; POLYSTREAM_STATE_DIR fresh per run"
    )
    print(f"  best of {args.repeat}; wall time from the first process's start to the last's exit")

    results = {label: Timed(label) for label in MEASURES}
    baseline: list[dict[str, Any]] | None = None
    for rnd in range(1, args.repeat + 1):
        for label, shards in MEASURES.items():
            state = Path(tempfile.mkdtemp(prefix="state-", dir=tmp))
            setup.env = {**env, "POLYSTREAM_STATE_DIR": str(state)}
            if shards is None:
                seconds, procs = run_plain(setup)
            else:
                seconds, procs = run_bus(setup, nats, shards)
            shutil.rmtree(state, ignore_errors=True)
            result = results[label]
            note = _round(rnd, label, seconds, procs, args.events)
            if seconds is None:
                continue
            result.seconds.append(seconds)
            if note:
                result.notes.append(note)
            outputs = [p.stdout for p in procs if p.stdout is not None]
            if label == "plain":
                baseline = records(outputs)
            elif outputs and baseline is not None:
                result.same.append(compare(baseline, records(outputs)))
    summarize_throughput(results, args.events)


def _round(rnd: int, label: str, seconds: float | None, procs: list[Launched], n: int) -> str:
    """Print one round's line; the ingest's own summary, if any, is returned for the report."""
    if seconds is None:
        print(f"  round {rnd}  {label:<20} failed (not counted)")
        return ""
    ends = ", ".join(f"{p.name} exited at {p.exited:.2f} s" for p in procs)
    print(f"  round {rnd}  {label:<20} {seconds:7.2f} s  {fmt_rate(n / seconds)}  ({ends})")
    return published_line(procs)


def summarize_throughput(results: dict[str, Timed], events: int) -> None:
    plain = results["plain"].best
    print(f"\n  {'':<20} {'wall s':>8} {'events/s':>12} {'x plain':>8}  same records as plain")
    for label, result in results.items():
        best = result.best
        if best is None:
            print(f"  {label:<20} {'failed':>8}")
            continue
        ratio = f"{plain / best:8.2f}" if plain else f"{'n/a':>8}"
        if label == "plain":
            same = "(the baseline)"
        elif result.same:
            same = result.same[0] if len(set(result.same)) == 1 else "; ".join(result.same)
        else:
            same = "(no records: nothing computes bars)"
        print(f"  {label:<20} {best:8.2f} {events / best:12,.0f} {ratio}  {same}")
    print("  (x plain: events/s over plain's, the same as plain's wall time over this one's)")
    said = next((r.notes[-1] for r in results.values() if r.notes), None)
    if said:
        print(f"  the ingest said: {said}")


# --- latency ----------------------------------------------------------------------------------


def latency(args: argparse.Namespace, nats: str) -> None:
    print(f"\n== Latency: {args.rate:,} events/s for {args.seconds:g} s, live on loopback ==")
    feed = "ws://127.0.0.1:PORT"
    common_flags = "--json --no-ui --no-warmup --filters DIR -t 1m"
    print(f"  plain  polystream watch {' '.join(live.SYMBOLS)} --feed {feed} {common_flags}")
    print(
        f"  bus    polystream ingest {' '.join(live.SYMBOLS)} --feed {feed} --publish "
        f"nats://127.0.0.1:NATS_PORT\n         polystream watch --from nats://127.0.0.1:NATS_PORT "
        f"--shard 0/1 {common_flags}"
    )
    print(
        f"  DIR: one filter ({live.FILTER_YAML.splitlines()[2]}, "
        f"{live.FILTER_YAML.splitlines()[3]}, trigger: level) on "
        f"{args.marked_per_second:g} marked trades/s; first {args.warmup:g} s left out"
    )
    plain = live.run_once(args.polystream, "plain", args.rate, args)
    _print_latency(plain)
    bus = run_bus_live(args, nats)
    _print_latency(bus)
    if plain.vs_t_ms and bus.vs_t_ms:
        p50, _, p99, _ = live.summary(plain.vs_t_ms)
        b50, _, b99, _ = live.summary(bus.vs_t_ms)
        print(
            f"  the bus adds: p50 {b50 - p50:+.2f} ms ({b50:.2f} vs {p50:.2f}), "
            f"p99 {b99 - p99:+.2f} ms ({b99:.2f} vs {p99:.2f})"
        )
    else:
        print("  the bus adds: not measurable (a run has no latencies)")


def _print_latency(r: live.RunResult) -> None:
    print(f"  [{r.label}]")
    if r.events:
        print(
            f"    feed     {r.events:,} events sent, {r.achieved:,.0f}/s achieved; time in "
            f"send() {r.send_total:.2f} s in all"
        )
    if r.problem:
        print(f"    FAILED   {r.problem}")
    if not r.events:
        return
    print(
        f"    marked   {r.measured:,} after the warm-up, {r.alerted:,} alerted, "
        f"{len(r.missing):,} missing; {r.wrong_time} alerts with a time other than the trade's t, "
        f"{r.duplicates} duplicates"
    )
    t50, t90, t99, tmx = live.summary(r.vs_t_ms)
    s50, _, s99, _ = live.summary(r.latencies_ms)
    print(
        f"    alert line read - its trade's time: p50 {t50:.2f}  p90 {t90:.2f}  p99 {t99:.2f}  "
        f"max {tmx:.2f} ms"
    )
    print(f"    (from the frame's send instead: p50 {s50:.2f}  p99 {s99:.2f} ms)")
    code = "none" if r.exit_code is None else str(r.exit_code)
    print(f"    exit code after SIGINT {code}{' (killed)' if r.killed else ''}; {r.bars} bars")


def run_bus_live(args: argparse.Namespace, nats: str) -> live.RunResult:
    """`bench_latency.run_once`, with the feed held by an ingest and the alerts read off a shard
    on a fresh server."""
    result = live.RunResult("bus", args.rate, ok=False)
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench_bus-live-") as tmp_name:
        tmp = Path(tmp_name)
        work, state, filters = tmp / "work", tmp / "state", tmp / "filters"
        for d in (work, state, filters):
            d.mkdir()
        (filters / "marked.yaml").write_text(live.FILTER_YAML, encoding="utf-8")
        env = live._clean_env(state)
        cfg = {
            "rate": args.rate,
            "seconds": args.seconds,
            "marked_per_second": args.marked_per_second,
            "seed": args.seed,
            "timeout": live.READY_TIMEOUT + live.CONNECT_TIMEOUT + args.seconds + 120,
        }
        here, there = ctx.Pipe()
        feed = ctx.Process(target=live._feed_main, args=(there, cfg), name="bench-feed")
        feed.daemon = True
        feed.start()
        there.close()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            with nats_server(nats, tmp) as url, contextlib.ExitStack() as files:
                errors = {n: files.enter_context((tmp / f"{n}.stderr").open("wb")) for n in NAMES}
                port = live._wait_ready(here, feed)
                shard = subprocess.Popen(
                    [str(args.polystream), "watch", "--from", url, "--shard", "0/1", "--json",
                     "--no-ui", "--no-warmup", "--filters", str(filters), "-t", "1m"],
                    cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=errors["shard"], bufsize=0, start_new_session=True,
                )  # fmt: skip
                procs.append(shard)
                assert shard.stdout is not None
                reader = live._StdoutReader(shard.stdout.fileno())
                reader.start()
                ingest = subprocess.Popen(
                    [str(args.polystream), "ingest", *live.SYMBOLS, "--feed",
                     f"ws://127.0.0.1:{port}", "--publish", url],
                    cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=errors["ingest"], start_new_session=True,
                )  # fmt: skip
                procs.append(ingest)
                stream = live._wait_stream(here, ingest, args.seconds)
                marked: list[tuple[int, str, int, int]] = [tuple(m) for m in stream["marked"]]
                wanted = {seq for seq, _, _, _ in marked}
                grace_end = time.monotonic() + live.ALERT_GRACE
                while time.monotonic() < grace_end and shard.poll() is None:
                    with reader.lock:
                        if wanted <= reader.seen:
                            break
                    time.sleep(0.05)
                early = shard.poll()
                result.exit_code, result.killed = live._stop(shard)
                live._stop(ingest)
                reader.join(5)
                if early is not None:
                    result.problem = f"the shard exited early (exit code {early})"
                live._fill(result, stream, marked, reader, args.warmup)
                result.ok = not result.problem
        except live._RunError as err:
            result.problem = str(err)
        finally:
            for proc in procs:
                live._stop(proc)
                if proc.stdout is not None:
                    proc.stdout.close()
            with contextlib.suppress(OSError):
                here.send("stop")
            feed.join(5)
            if feed.is_alive():
                feed.kill()
                feed.join(5)
            here.close()
            if result.problem:
                for name in NAMES:
                    result.problem += f"\n    {name} stderr ends:\n" + "\n".join(
                        f"    | {line}" for line in tail(tmp / f"{name}.stderr", 8)
                    )
    return result


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Run from the project root with the virtualenv active. Prints figures; exit 0.",
    )
    throughput_flags = ap.add_argument_group("throughput (a recording, whole processes)")
    throughput_flags.add_argument(
        "--events", type=int, default=1_000_000, metavar="N",
        help="events in the recording (default: 1,000,000)",
    )  # fmt: skip
    throughput_flags.add_argument(
        "--repeat", type=int, default=3, metavar="R",
        help="rounds of the four measurements; the best of each counts (default: 3)",
    )  # fmt: skip
    throughput_flags.add_argument(
        "--partitions", type=int, default=16, metavar="P",
        help="ingest's --partitions (default: 16)",
    )  # fmt: skip
    latency_flags = ap.add_argument_group("latency (a live loopback feed)")
    latency_flags.add_argument(
        "--rate", type=int, default=2_000, metavar="N",
        help="events/s the feed sends (default: 2,000)",
    )  # fmt: skip
    latency_flags.add_argument(
        "--seconds", type=float, default=20.0, metavar="S",
        help="streaming time of each of the two runs (default: 20)",
    )  # fmt: skip
    latency_flags.add_argument(
        "--warmup", type=float, default=2.0, metavar="S",
        help="first seconds left out of the statistics (default: 2)",
    )  # fmt: skip
    latency_flags.add_argument(
        "--marked-per-second", type=float, default=20.0, metavar="N",
        help="marked trades per second, each alerted (default: 20)",
    )  # fmt: skip
    latency_flags.add_argument(
        "--seed", type=int, default=7, metavar="N", help="the feed's seed (default: 7)"
    )
    ap.add_argument("--only", choices=("throughput", "latency"), help="run one section only")
    ap.add_argument(
        "--polystream",
        type=Path,
        default=Path(sys.executable).parent / "polystream",
        metavar="PATH",
        help="polystream executable (default: the one beside this Python)",
    )
    ap.add_argument(
        "--nats-server", default=None, metavar="PATH",
        help=f"nats-server binary (default: on PATH, else {DEBIAN_NATS})",
    )  # fmt: skip
    ap.add_argument(
        "--tmp", type=Path, default=None, metavar="DIR",
        help="directory for the recording and the servers' stores (default: the system's)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.events < 1000 or args.repeat < 1:
        ap.error("--events must be at least 1000 and --repeat at least 1")
    if args.seconds <= args.warmup or args.rate <= 0 or args.marked_per_second <= 0:
        ap.error("--seconds must exceed --warmup; --rate and --marked-per-second be positive")
    if not os.access(args.polystream, os.X_OK):
        ap.error(f"{args.polystream} is not an executable (see --polystream)")
    nats = find_nats(args.nats_server)
    if nats is None:
        ap.error(f"no nats-server on PATH or at {DEBIAN_NATS} (see --nats-server)")

    print("== Environment ==")
    print(f"  CPU: {cpu_model()}; {os.cpu_count()} CPUs; {platform.platform()}")
    print(
        f"  python {platform.python_version()}; polystream {version('polystream')} "
        f"({args.polystream}); {nats_version(nats)} ({nats})"
    )
    print(f"  load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_bus-", dir=args.tmp) as tmp:
        if args.only in (None, "throughput"):
            throughput(args, nats, Path(tmp))
    if args.only in (None, "latency"):
        latency(args, nats)
    print(f"\n(took {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
