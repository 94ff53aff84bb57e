"""Trade-to-alert latency of ``polystream watch`` over a live loopback Polygon crypto feed.

For each rate in ``--rates`` (default 2,000, 20,000 and 100,000 events/s) one run:

1. A feed process (multiprocessing, spawn; so it shares no GIL with the process that reads
   polystream's output) serves the Polygon crypto WebSocket protocol on a free port of
   127.0.0.1 with the ``websockets`` library, as POLYGON.md §2 describes and as
   ``polystream/simulator.py`` does: a ``connected`` status on connect, ``auth_success`` to
   ``{"action":"auth",...}``, one ``success`` "subscribed to: XT.BTC-USD" status per topic
   subscribed. Once all of XT and XQ for BTC-USD, ETH-USD and SOL-USD are subscribed (or
   1 s after the last subscribe message) it streams JSON-array text frames for ``--seconds``:
   about 75% XT trades (pair, p, s, c [1] or [2], x, string i, t, r) and 25% XQ quotes (pair, bp,
   bs, ap, as, x, t, r) over the three pairs, with random-walk prices. The events are
   pre-encoded in a pool that is cycled (each pair's walk is a bridge that ends where it
   starts, so the cycle has no jump); only the trade ids (unique over the run) and the
   timestamps are written per frame. Every ~1 ms it sends one frame holding the events due at
   the target rate (rate x elapsed - sent, so a late tick sends a bigger frame), with
   ``t`` = ``r`` = the wall-clock time in ms at which the frame is built. TCP_NODELAY is set on
   the connection. The feed reports the rate it actually achieved and the time it spent in
   ``send()`` (a polystream that does not read fast enough shows up there).
2. Marked trades: ``--marked-per-second`` (default 20) XT trades spread over the run and over
   the three pairs at random positions inside frames, told apart by a size no ordinary trade
   has: size = 1000 + seq/1000, so the size encodes the trade's sequence number. For each, the
   feed records ``time.time_ns()`` immediately before its frame is handed to the socket (the
   trade's ``t`` is taken a few microseconds earlier, when the frame is built) and sends them
   back at the end.
3. polystream runs as a separate process, exactly as a user runs it:
   ``POLYSTREAM watch X:BTCUSD X:ETHUSD X:SOLUSD --feed ws://127.0.0.1:PORT --json --no-ui
   --no-warmup --filters DIR -t 1m``, in an empty temporary working directory, with a clean
   environment (a bench API key, POLYSTREAM_STATE_DIR in a temporary directory, nothing else
   of polystream's: no DATABASE_URL, TELEGRAM_* or other POLYGON_* variables). DIR holds one filter,
   ``on: trade``, ``when: size >= 1000``, ``trigger: level``, checked first with
   ``polystream filter validate``. A thread of this process reads polystream's stdout pipe with
   raw ``os.read`` calls and stamps each line with ``time.time_ns()`` as soon as the read that
   completes it returns; only the ``"type":"alert"`` lines are parsed (msgspec). stderr goes to
   a temporary file. After the stream (and up to 5 s for the last alerts) polystream gets
   SIGINT and is waited for (130 is its orderly exit code).
4. Latency of a marked trade = (time its alert line was read on stdout) - (the instant its
   frame was handed to the socket); alerts are matched to marked trades through the size in
   the alert's ``values``. The latency against the trade's integer-ms ``t`` is shown for
   reference (it is up to 1 ms larger). The first ``--warmup`` seconds (default 2) of each
   run are left out of the statistics, but every marked trade after them must be alerted.
   Alerts whose ``time`` is not their trade's ``t`` are counted too.

Per rate it prints the achieved event rate, the marked trades sent, alerted and missing
("every marked trade alerted: yes/no"), p50/p90/p99/max in ms and a verdict: for rates up to
20,000 events/s PASS when p50 <= 2 ms, p99 <= 10 ms and no marked trade is missing, else FAIL;
above that the figures are only reported. With ``--baseline PATH`` a second polystream
executable is run with the same settings right after each rate, and both are shown side by
side with the ratios baseline/new of p50 and p99.

Run from the project root, with the virtualenv active:

    python benchmarks/bench_latency.py [--rates 2000,20000,100000] [--seconds 20] [--warmup 2]
        [--polystream PATH] [--baseline PATH] [--extra OPTIONS] [--marked-per-second 20]
        [--seed 7]

``--extra`` adds options to the new run's ``watch`` only: with ``--baseline`` the same executable,
the two columns show what those options cost (``--extra '--metrics 127.0.0.1:0'``).

``--polystream`` defaults to the ``polystream`` script beside the running Python.

The defaults take about a minute and a half (twice that with ``--baseline``). The machine
should be otherwise quiet: the feed, polystream and the reader compete for the same cores. The
exit code is always 0: this reports numbers, it does not gate anything.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import multiprocessing
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

SYMBOLS = ("X:BTCUSD", "X:ETHUSD", "X:SOLUSD")
# pair, starting price, share of the traffic, median ordinary trade size
PAIRS = (
    ("BTC-USD", 67_250.0, 0.45, 0.02),
    ("ETH-USD", 3_480.0, 0.35, 0.3),
    ("SOL-USD", 148.0, 0.20, 6.0),
)
CHANNELS = ("XT", "XQ")
EXCHANGES = (1, 2, 6, 23)
TRADE_SHARE = 0.75
POOL_EVENTS = 1 << 17
STEP_VOLATILITY = 1e-4  # log-price standard deviation per trade
MAX_ORDINARY_SIZE = 500.0
MARK_BASE = 1000.0
MARK_SCALE = 1000  # size = MARK_BASE + seq / MARK_SCALE
FRAME_PERIOD = 0.001
MAX_EVENTS_PER_FRAME = 4000  # ~0.5 MB, under the usual 1 MiB frame limit
SUBSCRIBE_SETTLE = 1.0
CONNECT_TIMEOUT = 60.0
READY_TIMEOUT = 30.0
ALERT_GRACE = 5.0
STOP_TIMEOUT = 15.0
EXIT_INTERRUPTED = 130
BENCH_KEY = "bench-latency-not-a-secret"

TARGET_MAX_RATE = 20_000
TARGET_P50_MS = 2.0
TARGET_P99_MS = 10.0

FILTER_YAML = """\
name: marked
description: the benchmark's marked trades (size >= 1000, which no ordinary trade has)
on: trade
when: size >= 1000
trigger: level
severity: info
message: "{symbol} {size}"
"""

_ENV_PASSED = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


# --- the feed (runs in its own process) ------------------------------------------------------


def _status(status: str, message: str) -> str:
    return msgspec.json.encode([{"ev": "status", "status": status, "message": message}]).decode()


@dataclass
class _Pool:
    """Pre-encoded events, cycled. A trade is (text before its id, text after it up to "t":),
    a quote is (its text up to "t":, None). price_at[p][k] is pair p's last trade price at or
    before position k, for the marked trades."""

    entries: list[tuple[str, str | None]]
    pair_of: list[int]
    channel_of: list[str]
    price_at: list[list[float]]


def _build_pool(rng: random.Random, size: int) -> _Pool:
    shares = [share for _, _, share, _ in PAIRS]
    pair_of = rng.choices(range(len(PAIRS)), shares, k=size)
    is_trade = [rng.random() < TRADE_SHARE for _ in range(size)]
    trades_per_pair = Counter(p for p, trade in zip(pair_of, is_trade, strict=True) if trade)
    # One Brownian bridge per pair: the log price walks and comes back to its start, so cycling
    # over the pool does not make the price jump.
    walks: list[list[float]] = []
    for p, (_, base, _, _) in enumerate(PAIRS):
        n = max(trades_per_pair[p], 1)
        steps = [rng.gauss(0.0, STEP_VOLATILITY) for _ in range(n)]
        drift = sum(steps) / n
        level, path = 0.0, []
        for step in steps:
            level += step - drift
            path.append(round(base * math.exp(level), 2))
        walks.append(path)
    taken = [0] * len(PAIRS)
    last = [base for _, base, _, _ in PAIRS]
    previous = list(last)
    entries: list[tuple[str, str | None]] = []
    channels: list[str] = []
    price_at: list[list[float]] = [[] for _ in PAIRS]
    for k in range(size):
        p = pair_of[k]
        pair, _, _, median = PAIRS[p]
        x = rng.choice(EXCHANGES)
        if is_trade[k]:
            price = walks[p][taken[p]]
            taken[p] += 1
            side = 2 if price > previous[p] else 1 if price < previous[p] else rng.choice((1, 2))
            previous[p] = last[p] = price
            s = min(MAX_ORDINARY_SIZE, median * rng.lognormvariate(0.0, 1.0))
            entries.append(
                (
                    f'{{"ev":"XT","pair":"{pair}","p":{price:.2f},"s":{max(s, 1e-8):.8f},'
                    f'"c":[{side}],"x":{x},"i":"',
                    '","t":',
                )
            )
            channels.append("XT")
        else:
            half = last[p] * rng.uniform(0.5e-4, 2e-4)
            bid, ask = round(last[p] - half, 2), round(last[p] + half, 2)
            if ask <= bid:
                ask = round(bid + 0.01, 2)
            bs = median * rng.lognormvariate(1.0, 1.0)
            asz = median * rng.lognormvariate(1.0, 1.0)
            entries.append(
                (
                    f'{{"ev":"XQ","pair":"{pair}","bp":{bid:.2f},"bs":{bs:.8f},'
                    f'"ap":{ask:.2f},"as":{asz:.8f},"x":{x},"t":',
                    None,
                )
            )
            channels.append("XQ")
        for q in range(len(PAIRS)):
            price_at[q].append(last[q])
    return _Pool(entries, pair_of, channels, price_at)


class _Feed:
    """Serves the protocol to whoever connects; streams once, to the first client that
    subscribes, then keeps that connection open and idle until the process is stopped."""

    def __init__(self, cfg: dict[str, Any], conn: Connection) -> None:
        self.rate = float(cfg["rate"])
        self.seconds = float(cfg["seconds"])
        self.marked_per_second = float(cfg["marked_per_second"])
        self.seed = int(cfg["seed"])
        self.pool = _build_pool(random.Random(f"{self.seed}:pool"), POOL_EVENTS)
        self._conn = conn
        self._send_lock = threading.Lock()
        self._stream_lock = threading.Lock()
        self.streamed = False
        self.done = threading.Event()
        self.result: dict[str, Any] = {}

    def notify(self, *message: Any) -> None:
        """Progress for the parent (for its error messages), never blocking the feed for long."""
        with self._send_lock, contextlib.suppress(OSError, ValueError):
            self._conn.send(message)

    def handle(self, ws: ServerConnection) -> None:
        with contextlib.suppress(OSError):
            ws.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.notify("progress", "connected")
        expected = {f"{ch}.{pair}" for ch in CHANNELS for pair, _, _, _ in PAIRS}
        topics: set[str] = set()
        authenticated = False
        try:
            ws.send(_status("connected", "Connected Successfully"))
            while True:
                waiting = topics and not self.streamed
                try:
                    message = ws.recv(timeout=SUBSCRIBE_SETTLE if waiting else None)
                except TimeoutError:
                    self._stream_once(ws, topics)
                    continue
                try:
                    request = msgspec.json.decode(message)
                except msgspec.DecodeError as err:
                    ws.send(_status("error", f"invalid JSON: {err}"))
                    continue
                if not isinstance(request, dict):
                    ws.send(_status("error", "expected a JSON object with action and params"))
                    continue
                action, params = request.get("action"), request.get("params")
                if action == "auth":
                    authenticated = isinstance(params, str) and bool(params)
                    if authenticated:
                        ws.send(_status("auth_success", "authenticated"))
                        self.notify("progress", "authenticated")
                    else:
                        ws.send(_status("auth_failed", "authentication failed"))
                        ws.close(1008, "authentication failed")
                        return
                elif action in ("subscribe", "unsubscribe"):
                    if not authenticated:
                        ws.send(_status("auth_required", "authentication required"))
                        continue
                    if not isinstance(params, str):
                        ws.send(_status("error", "params must be a comma-separated string"))
                        continue
                    for topic in (t.strip() for t in params.split(",")):
                        if not topic:
                            continue
                        if action == "subscribe":
                            topics.add(topic)
                            ws.send(_status("success", f"subscribed to: {topic}"))
                        else:
                            topics.discard(topic)
                            ws.send(_status("success", f"unsubscribed to: {topic}"))
                    self.notify("progress", f"subscribed to {len(topics)} topics")
                    if expected <= topics:
                        self._stream_once(ws, topics)
                else:
                    ws.send(_status("error", f"unknown action: {action!r}"))
        except ConnectionClosed:
            pass
        except OSError as err:
            self.notify("progress", f"connection error: {err}")

    def _stream_once(self, ws: ServerConnection, topics: set[str]) -> None:
        with self._stream_lock:
            if self.streamed:
                return
            self.streamed = True
        self.notify("progress", "streaming")
        try:
            self.result = self._stream(ws, topics)
        finally:
            self.done.set()

    def _stream(self, ws: ServerConnection, topics: set[str]) -> dict[str, Any]:
        pool = self.pool
        keep = [
            k
            for k in range(len(pool.entries))
            if f"{pool.channel_of[k]}.{PAIRS[pool.pair_of[k]][0]}" in topics
        ]
        marked_pairs = [p for p, (pair, _, _, _) in enumerate(PAIRS) if f"XT.{pair}" in topics]
        entries = [pool.entries[k] for k in keep]
        pair_price = [[pool.price_at[p][k] for k in keep] for p in range(len(PAIRS))]
        size = len(entries)
        if size == 0:
            return {"error": f"no event of the subscribed topics {sorted(topics)}"}
        rng = random.Random(f"{self.seed}:stream")
        n_marks = int(self.marked_per_second * self.seconds) if marked_pairs else 0
        step = 1.0 / self.marked_per_second if n_marks else 0.0
        mark_times = [(j + rng.random()) * step for j in range(n_marks)]
        rate, seconds = self.rate, self.seconds
        next_id = rng.randrange(10_000_000, 90_000_000)
        pos = rng.randrange(size)
        sent = frames = marks_sent = 0
        marked: list[tuple[int, str, int, int]] = []  # seq, pair, send ns, t ms
        send_total = send_max = late_max = 0.0
        error = ""
        perf, time_ns, sleep = time.perf_counter, time.time_ns, time.sleep
        gc.collect()
        gc.disable()
        start = perf()
        start_ns = time_ns()
        tick = 0
        try:
            while True:
                tick += 1
                target = start + tick * FRAME_PERIOD
                now = perf()
                if target > now:
                    sleep(target - now)
                    now = perf()
                late_max = max(late_max, now - target)
                elapsed = now - start
                if elapsed >= seconds:
                    break
                due = min(int(rate * elapsed) - sent, MAX_EVENTS_PER_FRAME)
                m = 0
                while marks_sent + m < n_marks and mark_times[marks_sent + m] <= elapsed:
                    m += 1
                if due <= 0 and m == 0:
                    continue
                parts: list[str] = []
                append = parts.append
                for _ in range(max(due - m, 0)):
                    head, tail = entries[pos]
                    pos += 1
                    if pos == size:
                        pos = 0
                    if tail is None:
                        append(head)
                    else:
                        append(f"{head}{next_id}{tail}")
                        next_id += 1
                marks: list[tuple[int, str]] = []
                for _ in range(m):
                    seq = marks_sent
                    marks_sent += 1
                    p = rng.choice(marked_pairs)
                    pair = PAIRS[p][0]
                    price = pair_price[p][pos]
                    mark_size = MARK_BASE + seq / MARK_SCALE
                    parts.insert(
                        rng.randrange(len(parts) + 1),
                        f'{{"ev":"XT","pair":"{pair}","p":{price:.2f},"s":{mark_size:.3f},'
                        f'"c":[{rng.choice((1, 2))}],"x":1,"i":"{next_id}","t":',
                    )
                    next_id += 1
                    marks.append((seq, pair))
                t_ns = time_ns()
                t = str(t_ns // 1_000_000)
                glue = f'{t},"r":{t}}},'
                frame = "[" + glue.join(parts) + f'{t},"r":{t}}}]'
                before = perf()
                send_ns = time_ns()
                ws.send(frame)
                took = perf() - before
                send_total += took
                send_max = max(send_max, took)
                t_ms = int(t)
                marked.extend((seq, pair, send_ns, t_ms) for seq, pair in marks)
                sent += len(parts)
                frames += 1
        except (ConnectionClosed, OSError) as err:
            error = f"the connection was lost after {perf() - start:.1f} s ({err})"
        finally:
            gc.enable()
        elapsed = perf() - start
        return {
            "start_ns": start_ns,
            "elapsed": elapsed,
            "events": sent,
            "frames": frames,
            "marked": marked,
            "marks_planned": n_marks,
            "send_total": send_total,
            "send_max": send_max,
            "late_max": late_max,
            "topics": sorted(topics),
            "error": error,
        }


def _feed_main(conn: Connection, cfg: dict[str, Any]) -> None:
    """The feed process: serve, report the port, stream once, report, wait to be stopped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this process ends
    quiet = logging.getLogger("bench_latency.feed")
    quiet.setLevel(logging.CRITICAL)
    feed = _Feed(cfg, conn)
    server = serve(
        feed.handle,
        "127.0.0.1",
        0,
        compression=None,
        max_size=2**20,
        close_timeout=1.0,
        logger=quiet,
    )
    threading.Thread(target=server.serve_forever, name="feed-serve", daemon=True).start()
    feed.notify("ready", int(server.socket.getsockname()[1]))
    deadline = time.monotonic() + float(cfg["timeout"])
    try:
        while time.monotonic() < deadline:
            if feed.done.wait(0.05):
                feed.notify("result", feed.result)
                break
            if conn.poll() and conn.recv() == "stop":
                return
        while time.monotonic() < deadline and not (conn.poll(0.5) and conn.recv() == "stop"):
            pass
    except (EOFError, OSError):
        pass  # the parent went away
    finally:
        server.shutdown()


# --- polystream's side ------------------------------------------------------------------------


@dataclass
class _Alert:
    read_ns: int
    seq: int
    symbol: str
    time: int | None


class _StdoutReader(threading.Thread):
    """Reads polystream's stdout with raw reads and stamps each line when the read that
    completes it returns; parses only alert lines, keeps status lines for later."""

    def __init__(self, fd: int) -> None:
        super().__init__(name="stdout-reader", daemon=True)
        self._fd = fd
        self._decoder = msgspec.json.Decoder()
        self.lock = threading.Lock()
        self.alerts: list[_Alert] = []
        self.seen: set[int] = set()
        self.other_alerts = 0
        self.status_lines: list[bytes] = []
        self.lines = 0
        self.bars = 0
        self.unparsable = 0

    def run(self) -> None:
        rest = b""
        read, time_ns = os.read, time.time_ns
        while True:
            try:
                chunk = read(self._fd, 1 << 16)
            except OSError:
                break
            now = time_ns()
            if not chunk:
                break
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                self._line(now, line)
        if rest.strip():
            self._line(time_ns(), rest)

    def _line(self, now: int, line: bytes) -> None:
        self.lines += 1
        if b'"alert"' in line:
            try:
                obj = self._decoder.decode(line)
                values = obj.get("values") or {}
                size = values.get("size")
                if obj.get("type") != "alert" or not isinstance(size, int | float):
                    raise ValueError
            except (msgspec.DecodeError, AttributeError, ValueError):
                self.other_alerts += 1
                return
            if size < MARK_BASE:
                self.other_alerts += 1
                return
            seq = round((size - MARK_BASE) * MARK_SCALE)
            with self.lock:
                at = obj.get("time")
                alert = _Alert(
                    now, seq, str(obj.get("symbol")), at if isinstance(at, int) else None
                )
                self.alerts.append(alert)
                self.seen.add(seq)
        elif b'"status"' in line:
            self.status_lines.append(line)
        elif b'"bar"' in line:
            self.bars += 1

    def status_events(self) -> Counter[str]:
        events: Counter[str] = Counter()
        for line in self.status_lines:
            try:
                obj = msgspec.json.decode(line)
                events[str(obj.get("event"))] += 1
            except (msgspec.DecodeError, AttributeError):
                self.unparsable += 1
        return events


@dataclass
class RunResult:
    label: str
    rate: int
    ok: bool
    problem: str = ""
    achieved: float = 0.0
    events: int = 0
    frames: int = 0
    send_total: float = 0.0
    send_max: float = 0.0
    late_max: float = 0.0
    marked_all: int = 0
    measured: int = 0
    alerted: int = 0
    missing: list[int] = field(default_factory=list)
    duplicates: int = 0
    wrong_time: int = 0
    unknown: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    vs_t_ms: list[float] = field(default_factory=list)
    exit_code: int | None = None
    killed: bool = False
    stdout_lines: int = 0
    bars: int = 0
    status: Counter[str] = field(default_factory=Counter)
    other_alerts: int = 0
    stderr_lines: int = 0
    stderr_notes: list[str] = field(default_factory=list)
    feed_error: str = ""


def _clean_env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _ENV_PASSED}
    env["POLYGON_API_KEY"] = BENCH_KEY
    env["POLYSTREAM_STATE_DIR"] = str(state_dir)
    return env


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        return f"(stderr unreadable: {err})"
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join(f"    | {line}" for line in kept) if kept else "    | (empty)"


def _stderr_notes(path: Path) -> tuple[int, list[str]]:
    """Line count and the distinct lines that look like warnings or errors (at most 8)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return 0, []
    notes: list[str] = []
    for line in lines:
        low = line.lower()
        if any(w in low for w in ("warn", "error", "traceback", "exception", "slow", "lag")):
            text = line.strip()
            if text not in notes:
                notes.append(text)
            if len(notes) >= 8:
                break
    return len(lines), notes


def _stop(proc: subprocess.Popen[bytes]) -> tuple[int | None, bool]:
    """SIGINT, then wait; kill if it hangs. Returns the exit code and whether it was killed."""
    killed = False
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            killed = True
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    return proc.poll(), killed


def validate_filters(exe: Path, filters: Path, cwd: Path, env: dict[str, str]) -> str | None:
    """None when `polystream filter validate` accepts the directory, else what it said."""
    try:
        done = subprocess.run(
            [str(exe), "filter", "validate", str(filters)],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    if done.returncode != 0:
        return f"exit {done.returncode}: {(done.stdout + done.stderr).strip()}"
    return None


def run_once(exe: Path, label: str, rate: int, args: argparse.Namespace) -> RunResult:
    result = RunResult(label, rate, ok=False)
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench_latency-") as tmp_name:
        tmp = Path(tmp_name)
        work, state, filters = tmp / "work", tmp / "state", tmp / "filters"
        for d in (work, state, filters):
            d.mkdir()
        (filters / "marked.yaml").write_text(FILTER_YAML, encoding="utf-8")
        env = _clean_env(state)
        problem = validate_filters(exe, filters, work, env)
        if problem is not None:
            result.problem = f"`polystream filter validate` rejected the filter: {problem}"
            return result
        cfg = {
            "rate": rate,
            "seconds": args.seconds,
            "marked_per_second": args.marked_per_second,
            "seed": args.seed,
            "timeout": READY_TIMEOUT + CONNECT_TIMEOUT + args.seconds + ALERT_GRACE + 60,
        }
        here, there = ctx.Pipe()
        feed = ctx.Process(target=_feed_main, args=(there, cfg), name="bench-feed", daemon=True)
        feed.start()
        there.close()
        proc: subprocess.Popen[bytes] | None = None
        err_path = tmp / "stderr.txt"
        try:
            port = _wait_ready(here, feed)
            cmd = [
                str(exe),
                "watch",
                *SYMBOLS,
                "--feed",
                f"ws://127.0.0.1:{port}",
                "--json",
                "--no-ui",
                "--no-warmup",
                "--filters",
                str(filters),
                "-t",
                "1m",
                *(shlex.split(args.extra) if label == "new" else ()),
            ]
            with open(err_path, "wb") as err_file:
                proc = subprocess.Popen(
                    cmd,
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=err_file,
                    bufsize=0,
                    start_new_session=True,
                )
            assert proc.stdout is not None
            reader = _StdoutReader(proc.stdout.fileno())
            reader.start()
            stream = _wait_stream(here, proc, args.seconds)
            marked: list[tuple[int, str, int, int]] = [tuple(m) for m in stream["marked"]]
            wanted = {seq for seq, _, _, _ in marked}
            grace_end = time.monotonic() + ALERT_GRACE
            while time.monotonic() < grace_end and proc.poll() is None:
                with reader.lock:
                    if wanted <= reader.seen:
                        break
                time.sleep(0.05)
            early_exit = proc.poll()
            result.exit_code, result.killed = _stop(proc)
            reader.join(5)
            if early_exit is not None:
                result.problem = f"polystream exited early (exit code {early_exit})"
            _fill(result, stream, marked, reader, args.warmup)
            result.ok = not result.problem
        except _RunError as err:
            result.problem = str(err)
        finally:
            if proc is not None and proc.poll() is None:
                result.exit_code, result.killed = _stop(proc)
            with contextlib.suppress(OSError):
                here.send("stop")
            feed.join(5)
            if feed.is_alive():
                feed.terminate()
                feed.join(5)
            if feed.is_alive():
                feed.kill()
                feed.join(5)
            here.close()
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()
            result.stderr_lines, result.stderr_notes = _stderr_notes(err_path)
            if result.problem:
                result.problem += f"\n    stderr (last lines):\n{_tail(err_path)}"
    return result


class _RunError(Exception):
    pass


def _recv(conn: Connection, timeout: float) -> tuple[Any, ...] | None:
    try:
        if conn.poll(timeout):
            message: tuple[Any, ...] = conn.recv()
            return message
    except (EOFError, OSError) as err:
        raise _RunError(f"the feed process went away ({err})") from err
    return None


def _wait_ready(conn: Connection, feed: multiprocessing.process.BaseProcess) -> int:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        message = _recv(conn, 0.2)
        if message is not None and message[0] == "ready":
            return int(message[1])
        if not feed.is_alive():
            raise _RunError(f"the feed process exited (code {feed.exitcode}) before listening")
    raise _RunError(f"the feed process was not listening after {READY_TIMEOUT:.0f} s")


def _wait_stream(conn: Connection, proc: subprocess.Popen[bytes], seconds: float) -> dict[str, Any]:
    """The feed's report, once it has streamed; fails if polystream exits or nothing happens."""
    phase = "waiting for polystream to connect"
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        message = _recv(conn, 0.1)
        if message is not None:
            if message[0] == "result":
                report: dict[str, Any] = message[1]
                if not report.get("frames") and report.get("error"):
                    raise _RunError(f"the feed did not stream: {report['error']}")
                return report
            if message[0] == "progress":
                phase = f"feed: {message[1]}"
                if message[1] == "streaming":
                    deadline = time.monotonic() + seconds + 30
        code = proc.poll()
        if code is not None:
            raise _RunError(f"polystream exited early with code {code} ({phase})")
        if time.monotonic() > deadline:
            raise _RunError(f"timed out ({phase})")


def _fill(
    result: RunResult,
    stream: dict[str, Any],
    marked: list[tuple[int, str, int, int]],
    reader: _StdoutReader,
    warmup: float,
) -> None:
    result.events = int(stream["events"])
    result.frames = int(stream["frames"])
    result.achieved = result.events / max(float(stream["elapsed"]), 1e-9)
    result.send_total = float(stream["send_total"])
    result.send_max = float(stream["send_max"])
    result.late_max = float(stream["late_max"])
    result.feed_error = str(stream.get("error") or "")
    cutoff = int(stream["start_ns"]) + int(warmup * 1e9)
    sent = {seq: (send_ns, t_ms) for seq, _, send_ns, t_ms in marked}
    measured = {seq for seq, _, send_ns, _ in marked if send_ns >= cutoff}
    with reader.lock:
        alerts = list(reader.alerts)
    first: dict[int, int] = {}
    for a in alerts:
        if a.seq not in sent:
            result.unknown += 1
        elif a.seq in first:
            result.duplicates += 1
        else:
            first[a.seq] = a.read_ns
            if a.time != sent[a.seq][1]:
                result.wrong_time += 1
    result.marked_all = len(marked)
    result.measured = len(measured)
    result.alerted = sum(1 for seq in measured if seq in first)
    result.missing = sorted(seq for seq in measured if seq not in first)
    for seq in sorted(measured & first.keys()):
        send_ns, t_ms = sent[seq]
        result.latencies_ms.append((first[seq] - send_ns) / 1e6)
        result.vs_t_ms.append((first[seq] - t_ms * 1_000_000) / 1e6)
    result.stdout_lines = reader.lines
    result.bars = reader.bars
    result.status = reader.status_events()
    result.other_alerts = reader.other_alerts


# --- report -----------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not sorted_values:
        return math.nan
    at = (len(sorted_values) - 1) * q
    lo = math.floor(at)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (at - lo)


def summary(values: list[float]) -> tuple[float, float, float, float]:
    s = sorted(values)
    return percentile(s, 0.5), percentile(s, 0.9), percentile(s, 0.99), s[-1] if s else math.nan


def verdict(r: RunResult) -> str:
    if r.rate > TARGET_MAX_RATE:
        return "report"
    if not r.ok or not r.latencies_ms:
        return "FAIL"
    p50, _, p99, _ = summary(r.latencies_ms)
    good = p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS and not r.missing
    return "PASS" if good else "FAIL"


def _ms(v: float) -> str:
    return "     n/a" if math.isnan(v) else f"{v:8.2f}"


def print_run(r: RunResult, exe: Path) -> None:
    print(f"  [{r.label}] {exe}")
    if r.events:
        per_frame = r.events / max(r.frames, 1)
        print(
            f"    feed       {r.rate:,} events/s asked, {r.achieved:,.0f} achieved "
            f"({r.events:,} events in {r.frames:,} frames, {per_frame:.1f} per frame); "
            f"time in send() {r.send_total:.2f} s in all, {r.send_max * 1e3:.1f} ms at most; "
            f"tick late by {r.late_max * 1e3:.1f} ms at most"
        )
    if r.feed_error:
        print(f"    feed       {r.feed_error}")
    if not r.ok:
        print(f"    FAILED     {r.problem}")
        if not r.events:
            return
    every = "yes" if not r.missing and r.measured else "no"
    print(
        f"    marked     {r.measured:,} sent after the warm-up ({r.marked_all:,} in all), "
        f"{r.alerted:,} alerted, {len(r.missing):,} missing; "
        f"every marked trade alerted: {every}"
    )
    if r.missing:
        shown = ", ".join(str(s) for s in r.missing[:10])
        print(f"    missing    seq {shown}{' ...' if len(r.missing) > 10 else ''}")
    if r.duplicates or r.unknown or r.other_alerts or r.wrong_time:
        print(
            f"    alerts     {r.duplicates} duplicates, {r.unknown} of unknown trades, "
            f"{r.other_alerts} other alert lines, {r.wrong_time} with a time other than "
            "the trade's t"
        )
    p50, p90, p99, mx = summary(r.latencies_ms)
    t50, t90, t99, tmx = summary(r.vs_t_ms)
    print(f"    latency    p50 {_ms(p50)}  p90 {_ms(p90)}  p99 {_ms(p99)}  max {_ms(mx)} ms")
    print(f"    vs `t`     p50 {_ms(t50)}  p90 {_ms(t90)}  p99 {_ms(t99)}  max {_ms(tmx)} ms")
    v = verdict(r)
    if v == "report":
        print(f"    target     none above {TARGET_MAX_RATE:,} events/s: report")
    else:
        print(
            f"    target     p50 <= {TARGET_P50_MS:g} ms, p99 <= {TARGET_P99_MS:g} ms, "
            f"none missing: {v}"
        )
    status = ", ".join(f"{k} {n}" for k, n in sorted(r.status.items())) or "none"
    code = "none" if r.exit_code is None else str(r.exit_code)
    if r.killed:
        code += f" (killed: still running {STOP_TIMEOUT:g} s after SIGINT)"
    elif r.ok and r.exit_code != EXIT_INTERRUPTED:
        code += f" (expected {EXIT_INTERRUPTED} after SIGINT)"
    print(
        f"    polystream exit code {code}; stdout {r.stdout_lines:,} lines "
        f"({r.bars} bars; status: {status}); stderr {r.stderr_lines:,} lines"
    )
    for note in r.stderr_notes:
        print(f"    stderr     {note[:160]}")


def print_comparison(new: RunResult, base: RunResult) -> None:
    if not new.latencies_ms or not base.latencies_ms:
        print("  comparison: not possible (one of the runs has no latencies)")
        return
    n50, _, n99, _ = summary(new.latencies_ms)
    b50, _, b99, _ = summary(base.latencies_ms)
    print(
        f"  baseline / new: p50 {b50:.2f} / {n50:.2f} ms = {b50 / n50:.2f}x, "
        f"p99 {b99:.2f} / {n99:.2f} ms = {b99 / n99:.2f}x"
    )


def print_summary(results: list[RunResult]) -> None:
    print("\n== Summary: latency from the frame's send to the alert line read on stdout ==")
    print(
        f"  {'run':<9} {'rate/s':>8} {'achieved':>9} {'marked':>7} {'alerted':>8} "
        f"{'missing':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}  verdict"
    )
    for r in results:
        p50, p90, p99, mx = summary(r.latencies_ms)
        print(
            f"  {r.label:<9} {r.rate:>8,} {r.achieved:>9,.0f} {r.measured:>7,} {r.alerted:>8,} "
            f"{len(r.missing):>8,} {_ms(p50)} {_ms(p90)} {_ms(p99)} {_ms(mx)}  {verdict(r)}"
        )


def _version(exe: Path) -> str:
    try:
        done = subprocess.run(
            [str(exe), "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({err})"
    return (done.stdout or done.stderr).strip() or f"unknown (exit {done.returncode})"


def _rates(text: str) -> list[int]:
    try:
        rates = [int(float(part)) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of rates: {text}") from err
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates must be positive")
    return rates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument(
        "--rates", type=_rates, default=[2000, 20000, 100000], help="events/s, comma-separated"
    )
    ap.add_argument("--seconds", type=float, default=20.0, help="streaming time per rate")
    ap.add_argument("--warmup", type=float, default=2.0, help="first seconds left out of stats")
    ap.add_argument(
        "--polystream",
        type=Path,
        default=Path(sys.executable).parent / "polystream",
        help="polystream executable (default: the one beside this Python)",
    )
    ap.add_argument("--baseline", type=Path, default=None, help="a second executable to compare")
    ap.add_argument(
        "--extra",
        default="",
        help="more options for the new run's `watch` only, such as '--metrics 127.0.0.1:0' "
        "(with --baseline the same executable: what the options cost)",
    )
    ap.add_argument("--marked-per-second", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    if args.seconds <= args.warmup:
        ap.error("--seconds must be longer than --warmup")
    if args.marked_per_second <= 0 or args.marked_per_second * args.seconds >= 1_000_000:
        ap.error("--marked-per-second must be positive and mark fewer than 1,000,000 trades")

    exes = [("new", args.polystream)]
    if args.baseline is not None:
        exes.append(("baseline", args.baseline))
    print("== Environment ==")
    print(
        f"  python {platform.python_version()}, websockets {metadata.version('websockets')}, "
        f"msgspec {metadata.version('msgspec')}; {platform.platform()}; "
        f"{os.cpu_count()} CPUs; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    usable = []
    for label, exe in exes:
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            print(f"  {label}: {exe} is not an executable file; skipped")
            continue
        options = f", with {args.extra}" if label == "new" and args.extra else ""
        print(f"  {label}: {exe} ({_version(exe)}){options}")
        usable.append((label, exe))
    print(
        f"  {args.seconds:g} s per rate, first {args.warmup:g} s left out; "
        f"{args.marked_per_second:g} marked trades/s; seed {args.seed}"
    )

    results: list[RunResult] = []
    try:
        for rate in args.rates:
            print(f"\n== {rate:,} events/s for {args.seconds:g} s ==")
            done: dict[str, RunResult] = {}
            for label, exe in usable:
                r = run_once(exe, label, rate, args)
                print_run(r, exe)
                results.append(r)
                done[label] = r
            if "new" in done and "baseline" in done:
                print_comparison(done["new"], done["baseline"])
    except KeyboardInterrupt:
        print("\ninterrupted")
    if results:
        print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
