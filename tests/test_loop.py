"""The loop and what plugs into it: natural batching (a lone frame is handled at once, a burst in
few passes, both bounds hold), the sink protocol (a sink that fails is reported and closed, the
others go on; a library error ends the run in order), and running a pipeline from code."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import polars as pl
import pytest

import polystream
from polystream import BaseSink, Output, RunOptions, View
from polystream.errors import PolystreamError
from polystream.filters import FilterEngine, parse_filter
from polystream.pipeline import Pipeline
from polystream.record import Recorder, ReplaySource
from polystream.schema import Notice
from polystream.source import EndOfStream, Frame, Item, take_waiting
from polystream.stages import Stages
from polystream.window import BarOptions

T0 = 1_700_000_000_000
MARKED = parse_filter("name: marked\non: trade\nwhen: size >= 1000\ntrigger: level\n", "m.yaml")


def trade_frame(t: int, size: float = 1.0, price: float = 100.0) -> Frame:
    trade = {"ev": "XT", "pair": "BTC-USD", "p": price, "t": t, "s": size, "c": [2], "i": str(t)}
    return Frame(t + 3, msgspec.json.encode([trade]))


class Capture(BaseSink):
    """Keeps every output; `fail_after` makes its n-th write raise."""

    def __init__(self, name: str = "capture", fail_after: int | None = None) -> None:
        self.name = name
        self.outputs: list[Output] = []
        self.fail_after = fail_after
        self.closed = False
        self.seen_at: list[float] = []

    def write(self, out: Output) -> None:
        if self.fail_after is not None and len(self.outputs) >= self.fail_after:
            raise RuntimeError("the screen caught fire")
        self.outputs.append(out)
        self.seen_at.append(time.monotonic())

    def close(self, view: View) -> Sequence[Notice]:
        self.closed = True
        return ()

    @property
    def notices(self) -> list[Notice]:
        return [n for o in self.outputs for n in o.notices]

    @property
    def alerts(self) -> list[polystream.Alert]:
        return [a for o in self.outputs for a in o.alerts]

    @property
    def trades(self) -> int:
        return sum(o.trades.height for o in self.outputs if o.trades is not None)


class QueueSource:
    """A source fed by the test through a queue, taken from as the feed client's is."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Item] = queue.Queue()
        self.state = "streaming"
        self.reconnects = 0
        self.gaps: list[polystream.schema.Gap] = []
        self.fatal: PolystreamError | None = None

    def start(self) -> QueueSource:
        return self

    def take(self, timeout: float, max_bytes: int, max_age: float) -> list[Item]:
        return take_waiting(self.queue, timeout, max_bytes, max_age)

    def depth(self) -> tuple[int, int]:
        return self.queue.qsize(), 0

    def stop(self, timeout: float | None = None) -> None:
        self.queue.put(EndOfStream())

    def join(self, timeout: float | None = None) -> bool:
        return True


def stages(**kw: object) -> Stages:
    return Stages(
        ["X:BTCUSD"],
        BarOptions(timeframes=(1_000,)),
        filters=FilterEngine([MARKED], timeframes=(1_000,)),
        **kw,  # type: ignore[arg-type]
    )


# -- natural batching ---------------------------------------------------------------------------


def test_a_lone_frame_is_handled_at_once_not_after_the_age_bound() -> None:
    source, out = QueueSource(), Capture()
    pipeline = Pipeline(source, stages(), [out], max_age=30.0, tick_every=30.0)
    runner = threading.Thread(target=pipeline.run, kwargs={"duration": 20})
    runner.start()
    try:
        time.sleep(0.3)  # the loop waits for data
        sent = time.monotonic()
        source.queue.put(trade_frame(int(time.time() * 1000), size=1234.5))
        deadline = sent + 5
        while not out.alerts and time.monotonic() < deadline:
            time.sleep(0.001)
        assert [a.values["size"] for a in out.alerts] == [1234.5]
        first = next(t for o, t in zip(out.outputs, out.seen_at, strict=True) if o.alerts)
        assert first - sent < 0.25  # neither the 30 s age bound nor a tick
    finally:
        source.stop()
        runner.join(10)
    assert not runner.is_alive()


def test_a_burst_is_handled_in_few_passes_and_the_size_bound_holds() -> None:
    burst = [trade_frame(T0 + i) for i in range(2_000)]

    def run(max_bytes: int) -> Pipeline:
        source, out = QueueSource(), Capture()
        for frame in burst:
            source.queue.put(frame)
        source.queue.put(EndOfStream())
        pipeline = Pipeline(source, stages(), [out], live=False, max_bytes=max_bytes)
        pipeline.run()
        assert out.trades == len(burst)
        return pipeline

    assert run(max_bytes=10_000_000).passes == 1
    size = len(burst[0].data)
    assert run(max_bytes=50 * size).passes == len(burst) // 50


def test_taking_stops_at_the_age_bound() -> None:
    q: queue.Queue[Item] = queue.Queue()
    for i in range(100):
        q.put(trade_frame(T0 + i))
    assert len(take_waiting(q, 0.1, 10**9, 10.0)) == 100
    for i in range(100):
        q.put(trade_frame(T0 + i))
    assert len(take_waiting(q, 0.1, 10**9, 0.0)) == 2  # the first, then the bound
    assert take_waiting(queue.Queue(), 0.05, 10**9, 1.0) == []


# -- sinks --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A minute of trades, one or two a second, with two marked ones."""
    path = tmp_path_factory.mktemp("loop") / "minute.rec"
    rec = Recorder(path)
    for i in range(120):
        rec.write(trade_frame(T0 + i * 500, size=5_000.0 if i in (30, 90) else 0.5))
    rec.close()
    return path


def replay(path: Path, sinks: Sequence[BaseSink]) -> Pipeline:
    return Pipeline(ReplaySource(path), stages(), sinks, live=False)


def test_a_failing_sink_is_reported_and_closed_and_the_others_go_on(recording: Path) -> None:
    broken, good = Capture("broken", fail_after=1), Capture("good")
    result = replay(recording, [broken, good]).run()
    assert not result.interrupted
    assert len(broken.outputs) == 1 and broken.closed  # nothing after it failed
    errors = [n.detail for n in good.notices if n.event == "error"]
    assert len(errors) == 1
    assert "broken output failed (RuntimeError: the screen caught fire)" in errors[0]
    # the others got the whole run: every trade, every bar, both alerts
    assert good.trades == 120
    bars = pl.concat([o.bars for o in good.outputs if o.bars is not None])
    assert bars.filter(pl.col("state") == "final").height == 60
    assert len(good.alerts) == 2 and good.closed


def test_a_library_error_from_a_sink_ends_the_run_in_order(recording: Path) -> None:
    class Refusing(Capture):
        def tick(self, view: View) -> Sequence[Notice]:
            raise PolystreamError("The database refused the login: check DATABASE_URL.")

    refusing, other = Refusing("database"), Capture("other")
    with pytest.raises(PolystreamError, match="refused the login"):
        replay(recording, [other, refusing]).run()
    assert other.closed and refusing.closed


def test_sinks_close_last_first_and_what_they_report_reaches_the_others(recording: Path) -> None:
    order: list[str] = []

    class Closing(Capture):
        def close(self, view: View) -> Sequence[Notice]:
            order.append(self.name)
            return [Notice("drained", view.now_ms, f"{self.name} drained")]

    first, second = Closing("display"), Closing("writer")
    replay(recording, [first, second]).run()
    assert order == ["writer", "display"]
    assert [n.detail for n in first.notices if n.event == "drained"] == ["writer drained"]


# -- from code ----------------------------------------------------------------------------------


def test_a_run_from_code(recording: Path, tmp_path: Path) -> None:
    filters = tmp_path / "filters"
    filters.mkdir()
    (filters / "marked.yaml").write_text("name: marked\non: trade\nwhen: size >= 1000\n")
    options = RunOptions(
        ("X:BTCUSD",), feed=str(recording), timeframes=(1_000,), ui="none", filters_dir=filters
    )
    environ = {"POLYSTREAM_STATE_DIR": str(tmp_path / "state")}
    settings = polystream.load_settings(environ=environ, env_file=None)
    result = polystream.run(options, settings)
    assert result.view.feed.events == 120 and result.view.feed.alerts == 2

    seen = Capture()
    with polystream.open_run(options, settings) as pipeline:
        pipeline.add(seen)
        pipeline.run()
    assert seen.trades == 120 and len(seen.alerts) == 2
