"""A run spread over processes on a real NATS JetStream server: `ingest` publishes a recording,
1, 2 or 4 shards (`watch --from … --shard K/N`) compute it, and together they give exactly
the bars and alerts of one `watch` on that recording; a shard killed with SIGKILL and started
again, and an ingest killed and started again, lose nothing and repeat nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nats_server import NatsServer

from polystream import wire
from polystream.bus import Bus

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from bench_engine import write_recording

ROOT = Path(__file__).parent.parent
SYMBOLS = ["X:BTCUSD", "X:ETHUSD", "X:SOLUSD"]
TIMEFRAMES = ["-t", "1s", "-t", "1m"]
FILTERS = str(ROOT / "filters")


def polystream(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYGON_", "DATABASE"))}
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "polystream", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "POLYSTREAM_STATE_DIR": str(kwargs.pop("state"))},
        **kwargs,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


def results(lines: str) -> list[str]:
    """The bar and alert records of JSON lines, each as canonical text, sorted."""
    found = []
    for line in lines.splitlines():
        record = json.loads(line)
        if record["type"] in ("bar", "alert"):
            found.append(json.dumps(record, sort_keys=True))
    return sorted(found)


def published(url: str) -> list[str]:
    """The bar and alert records on the results stream, as `results` gives them."""
    found: list[str] = []
    with Bus(url) as bus:
        for subject in ("polystream.bar.>", "polystream.alert.>"):
            while batch := bus.pull(wire.OUT_STREAM, None, subject, batch=500, timeout=1.0):
                found += [json.dumps(json.loads(m.data), sort_keys=True) for m in batch]
                for m in batch:
                    m.ack()
    return sorted(found)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "three.rec"
    write_recording(path, 30_000, 20240529, 300)
    return path


@pytest.fixture(scope="module")
def plain(recording: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """What one `watch` makes of the recording."""
    state = tmp_path_factory.mktemp("state")
    proc = polystream(
        "watch", *SYMBOLS, "--feed", str(recording), *TIMEFRAMES, "--json", "--no-ui",
        "--filters", FILTERS, state=state,
    )  # fmt: skip
    found = results(finish(proc))
    assert sum('"type": "alert"' in r for r in found) > 5
    return found


@pytest.fixture
def server(nats_server: Callable[[], NatsServer]) -> Iterator[NatsServer]:
    """A JetStream server of the test's own: the streams have fixed names."""
    yield nats_server()


def ingest(url: str, recording: Path, tmp: Path, *extra: str) -> subprocess.Popen[str]:
    return polystream(
        "ingest", *SYMBOLS, "--feed", str(recording), "--publish", url, "--partitions", "8",
        *extra, state=tmp,
    )  # fmt: skip


def shard(url: str, k: int, n: int, tmp: Path) -> subprocess.Popen[str]:
    return polystream(
        "watch", "--from", url, "--shard", f"{k}/{n}", *TIMEFRAMES, "--json", "--no-ui",
        "--filters", FILTERS, state=tmp,
    )  # fmt: skip


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_shards_together_equal_one_process(
    shards: int, server: NatsServer, recording: Path, plain: list[str], tmp_path: Path
) -> None:
    feeding = ingest(server.url, recording, tmp_path)
    procs = [shard(server.url, k, shards, tmp_path) for k in range(shards)]
    finish(feeding)
    outputs = [finish(p) for p in procs]
    assert sorted(r for out in outputs for r in results(out)) == plain
    assert published(server.url) == plain
    if shards > 1:  # each shard did a share, not everything
        assert all(len(results(out)) < len(plain) for out in outputs)


def test_a_shard_killed_and_started_again_repeats_nothing(
    server: NatsServer, recording: Path, plain: list[str], tmp_path: Path
) -> None:
    finish(ingest(server.url, recording, tmp_path))
    first = shard(server.url, 0, 1, tmp_path)
    assert first.stdout is not None
    seen = 0
    while seen < len(plain) // 3:  # part of the way through, mid-stream
        line = first.stdout.readline()
        assert line, first.stderr.read() if first.stderr else ""
        seen += '"type":"bar"' in line or '"type":"alert"' in line
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    partly = published(server.url)
    assert 0 < len(partly) < len(plain)
    again = finish(shard(server.url, 0, 1, tmp_path))
    assert results(again) == plain  # it computed everything again...
    final = published(server.url)
    assert final == plain  # ...and published only what was missing
    alerts = Counter(r for r in final if '"type": "alert"' in r)
    assert alerts and max(alerts.values()) == 1


def test_an_ingest_killed_and_started_again_loses_nothing(
    server: NatsServer, recording: Path, plain: list[str], tmp_path: Path
) -> None:
    first = ingest(server.url, recording, tmp_path, "--speed", "20")
    deadline = time.monotonic() + 60
    with Bus(server.url) as bus:
        while time.monotonic() < deadline:
            try:
                clock = bus.last(wire.MD_STREAM, wire.CLOCK)
            except Exception:
                clock = None
            if clock is not None and int(clock.headers[wire.SEQ]) >= 2:
                break
            time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    second = ingest(server.url, recording, tmp_path)
    assert "held already" in second.communicate(timeout=120)[1]
    assert second.returncode == 0
    assert results(finish(shard(server.url, 0, 2, tmp_path))) + results(
        finish(shard(server.url, 1, 2, tmp_path))
    ) != []
    assert published(server.url) == plain
    with Bus(server.url) as bus:
        seqs = []
        while batch := bus.pull(wire.MD_STREAM, None, wire.CLOCK, batch=500, timeout=1.0):
            seqs += [int(m.headers[wire.SEQ]) for m in batch]
    assert seqs == list(range(1, len(seqs) + 1))  # every batch once, in order


def test_bad_shard_options_are_bad_usage(tmp_path: Path) -> None:
    for args in (
        ["watch", "--from", "nats://127.0.0.1:1", "--shard", "2/2"],
        ["watch", "--from", "nats://127.0.0.1:1", "--shard", "x"],
        ["watch", "X:BTCUSD", "--shard", "0/2"],
    ):
        proc = polystream(*args, state=tmp_path)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 2, err
        assert err.strip().startswith("polystream: error:") and len(err.strip().splitlines()) == 1


def test_a_live_ingest_closes_the_shards_bars_by_its_clock(
    server: NatsServer, tmp_path: Path
) -> None:
    """Live, quiet bars close by ingest's wall clock, which its clock messages carry: the
    shard's 1s bars come out final while the feed runs, for every symbol."""
    feeding = polystream(
        "ingest", "X:BTCUSD", "X:ETHUSD", "--feed", "demo", "--publish", server.url,
        "--duration", "5", state=tmp_path,
    )  # fmt: skip
    watching = polystream(
        "watch", "--from", server.url, "--shard", "0/1", "-t", "1s", "--json", "--no-ui",
        "--duration", "7", "--filters", FILTERS, state=tmp_path,
    )  # fmt: skip
    finish(feeding)
    bars = [json.loads(line) for line in finish(watching).splitlines() if '"bar"' in line]
    final = [b for b in bars if b["state"] == "final"]
    assert {b["symbol"] for b in final} == {"X:BTCUSD", "X:ETHUSD"}
    assert len(final) >= 4
    out = [r for r in published(server.url) if '"type": "bar"' in r]
    assert out == sorted(json.dumps(b, sort_keys=True) for b in final)  # partial ones stay here


def test_another_run_needs_reset(server: NatsServer, recording: Path, tmp_path: Path) -> None:
    finish(ingest(server.url, recording, tmp_path))
    other = polystream(
        "ingest", "X:BTCUSD", "--feed", str(recording), "--publish", server.url, state=tmp_path
    )
    _, err = other.communicate(timeout=60)
    assert other.returncode == 1 and "--reset" in err and len(err.strip().splitlines()) <= 2
    reset = polystream(
        "ingest", "X:BTCUSD", "--feed", str(recording), "--publish", server.url, "--reset",
        state=tmp_path,
    )  # fmt: skip
    finish(reset)
    with Bus(server.url) as bus:
        run = bus.last(wire.MD_STREAM, wire.RUN)
        assert run is not None and json.loads(run.data)["symbols"] == ["X:BTCUSD"]
        assert bus.last(wire.OUT_STREAM, "polystream.status.ingest") is not None


def test_ingest_of_every_symbol_equals_one_process_of_them_all(
    server: NatsServer, recording: Path, plain: list[str], tmp_path: Path
) -> None:
    """`ingest --all`: no list of symbols; the shards take whatever their partitions hold."""
    feeding = polystream(
        "ingest", "--all", "--feed", str(recording), "--publish", server.url, "--partitions",
        "8", state=tmp_path,
    )  # fmt: skip
    procs = [shard(server.url, k, 2, tmp_path) for k in range(2)]
    finish(feeding)
    assert sorted(r for p in procs for r in results(finish(p))) == plain
    both = polystream("ingest", "X:BTCUSD", "--all", "--publish", server.url, state=tmp_path)
    assert both.wait(timeout=60) == 2


def test_ctrl_c_stops_a_live_shard_at_once(server: NatsServer, tmp_path: Path) -> None:
    feeding = polystream(
        "ingest", "X:BTCUSD", "--feed", "demo", "--publish", server.url, "--duration", "8",
        state=tmp_path,
    )  # fmt: skip
    watching = polystream(
        "watch", "--from", server.url, "--shard", "0/1", "-t", "1s", "--json", "--no-ui",
        "--filters", FILTERS, state=tmp_path,
    )  # fmt: skip
    time.sleep(4)
    watching.send_signal(signal.SIGINT)
    asked = time.monotonic()
    _, err = watching.communicate(timeout=30)
    assert watching.returncode == 130, err
    assert time.monotonic() - asked < 3.0
    feeding.send_signal(signal.SIGINT)
    feeding.communicate(timeout=30)
    assert feeding.returncode == 130
