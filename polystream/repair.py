"""Gap repair: every outage of the feed is refetched over REST once the bars it touched are final,
and those bars are rebuilt and put out again as `revised`.

`GapRepair` is a pipeline unit (pipeline thread): it plans one job per outage and timeframe and
hands the rebuilt bars to the sinks; `RepairWorker` fetches on its own `polystream-repair`
thread, so a slow REST API never holds up the pipeline.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import msgspec
import polars as pl

from .config import timeframe_name
from .errors import PolystreamError
from .schema import TRADE, Gap, Notice
from .sinks import Output
from .stages import Stages
from .worker import Worker


class TradeHistory(Protocol):
    """Where missing data comes from (the REST API): every trade of a symbol in [start, end),
    or, when trades are not in the plan, its aggregates of a timeframe."""

    def trades(self, symbol: str, start_ms: int, end_ms: int) -> Iterable[pl.DataFrame]: ...

    def aggregates(
        self, symbol: str, timeframe_ms: int, start_ms: int, end_ms: int
    ) -> Iterable[pl.DataFrame]: ...


class Job(msgspec.Struct):
    """One symbol and timeframe of one outage: bars starting in [lo, hi) are rebuilt once all
    of them are final. The worker fills in `trades` (None: only aggregates could be had),
    `aggregates` or `error`."""

    symbol: str
    tf: int
    lo: int
    hi: int
    trades: pl.DataFrame | None = None
    aggregates: pl.DataFrame | None = None
    error: PolystreamError | None = None


class RepairWorker(Worker[Job]):
    """Fetches the jobs offered to it, one at a time; finished ones wait in `done`."""

    def __init__(self, history: TradeHistory) -> None:
        super().__init__("polystream-repair", inbox_size=1_000)
        self.history = history
        self.done: collections.deque[Job] = collections.deque()

    def run(self) -> None:
        while not self.stopping:
            job = self.next_item(0.5)
            if job is None:
                continue
            try:
                self._fetch(job)
            except PolystreamError as exc:
                job.error = exc
            self.done.append(job)

    def _fetch(self, job: Job) -> None:
        from .rest import NotEntitled

        try:
            pages = list(self.history.trades(job.symbol, job.lo, job.hi))
        except NotEntitled:
            aggs = list(self.history.aggregates(job.symbol, job.tf, job.lo, job.hi))
            job.aggregates = pl.concat(aggs) if aggs else pl.DataFrame()
            return
        job.trades = pl.concat(pages) if pages else pl.DataFrame(schema=TRADE)


class GapRepair:
    """A pipeline unit (see `pipeline.Unit`): repairs the outages in `gaps()` as they appear."""

    def __init__(self, history: TradeHistory, stages: Stages, gaps: Callable[[], list[Gap]]):
        self.stages = stages
        self.gaps = gaps
        self.worker = RepairWorker(history)
        self._seen = 0
        self._planned: list[Job] = []

    def tick(self, now_ms: int) -> Sequence[Output]:
        self._plan()
        engine = self.stages.engine
        lateness = engine.options.lateness
        for job in [j for j in self._planned if engine.watermark >= j.hi + lateness]:
            self._planned.remove(job)
            self.worker.start().put(job)
        outs = []
        while self.worker.done:
            outs += self._rebuilt(self.worker.done.popleft(), now_ms)
        return outs

    def close(self, now_ms: int) -> Sequence[Output]:
        self.worker.stop()  # a fetch in flight is not waited for: the gap stays in the ledger
        return []

    def _plan(self) -> None:
        gaps = self.gaps()
        engine = self.stages.engine
        offset = engine.offset or 0
        for gap in gaps[self._seen :]:
            if gap.symbol not in self.stages.symbols:
                continue
            for tf in engine.options.timeframes:
                lo = (gap.start + offset) // tf * tf
                hi = (gap.end + offset) // tf * tf + tf
                self._planned.append(Job(gap.symbol, tf, lo, hi))
        self._seen = len(gaps)

    def _rebuilt(self, job: Job, now_ms: int) -> list[Output]:
        if job.error is not None:
            detail = f"gap repair of {job.symbol} failed: {job.error}"
            return [Output(notices=[Notice("error", now_ms, detail)])]
        held = list(self.stages.flush())
        out = list(
            self.stages.rebuild(job.symbol, job.tf, job.lo, job.hi, job.trades, job.aggregates)
        )
        rebuilt = sum(o.bars.height for o in out if o.bars is not None)
        if job.trades is not None:
            source = f"{job.trades.height:,} trades"
        else:
            assert job.aggregates is not None
            source = f"{job.aggregates.height:,} aggregates (trades are not in the plan)"
        done = Notice(
            "gap_repaired",
            now_ms,
            f"{job.symbol} {timeframe_name(job.tf)}: {rebuilt} bars rebuilt from {source}",
        )
        # the trades the outage kept from us go to storage; those already stored are skipped
        return [*held, *out, Output(repaired=job.trades, notices=[done])]
