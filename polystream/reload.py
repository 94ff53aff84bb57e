"""Filter files picked up while a run goes on, on the pipeline thread: every `every` seconds the
filters directory is polled, added, changed and removed filters reach the filter engine, and each
change becomes a status record (a broken edit keeps the previous version and says why).

It also keeps when each filter last fired in the state directory, so `filter list` can show it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import timeframe_name
from .filters import FilterEngine, FilterWatcher, write_last_fired
from .schema import Notice
from .sinks import Output


class FilterReload:
    """A pipeline unit (see `pipeline.Unit`) over `watcher` and the run's filter `engine`."""

    def __init__(
        self,
        watcher: FilterWatcher,
        engine: FilterEngine,
        state_dir: Path | None = None,
        *,
        every: float = 0.5,
        save_every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.watcher = watcher
        self.engine = engine
        self.state_dir = state_dir
        self.every = every
        self.save_every = save_every
        self._clock = clock
        self._next_poll = 0.0
        self._next_save = 0.0
        self._saved = 0  # alerts fired when last saved
        self._waiting: set[str] | None = None

    def tick(self, now_ms: int) -> Sequence[Output]:
        now = self._clock()
        notices: list[Notice] = []
        if self._waiting is None or now >= self._next_poll:
            self._next_poll = now + self.every
            notices += self._poll(now_ms)
        if now >= self._next_save:
            self._next_save = now + self.save_every
            self._save()
        return [Output(notices=notices)] if notices else []

    def close(self, now_ms: int) -> Sequence[Output]:
        self._save()
        return []

    def _poll(self, now_ms: int) -> list[Notice]:
        notices = []
        events = self.watcher.poll()
        if any(e.event != "filter_error" for e in events):
            self.engine.set_filters(self.watcher.filters)
        notices += [Notice(e.event, now_ms, e.detail) for e in events]
        # bar filters for a timeframe this run does not build, said once each
        built = " ".join(timeframe_name(tf) for tf in self.engine.timeframes)
        waiting = {f.name: f for f in self.engine.waiting}
        for name in sorted(set(waiting) - (self._waiting or set())):
            tf = waiting[name].timeframe_name
            notices.append(
                Notice(
                    "filter_waiting",
                    now_ms,
                    f"{name} needs {tf} bars, which this run does not build ({built}); "
                    f"restart with -t {tf} to run it",
                )
            )
        self._waiting = set(waiting)
        return notices

    def _save(self) -> None:
        fired = sum(self.engine.fired.values())
        if self.state_dir is None or fired == self._saved:
            return
        self._saved = fired
        write_last_fired(self.state_dir, self.engine.last_fired.items())
