"""How far the feed's own aggregates (`--bars polygon`) are from bars built from its trades, on the
pipeline thread: trades and the run's bar records in, a running comparison out.
"""

from __future__ import annotations

import polars as pl

from .window import BarEngine, BarOptions

_Key = tuple[str, str, int]
_Seen = dict[_Key, tuple[float, float]]
# Bars of one side that never meet their other half are forgotten, oldest first, past this.
_MAX_UNMATCHED = 10_000


class DriftMeter:
    """Builds shadow bars from trades and pairs them with the feed-built bars of the same
    symbol, timeframe and start as both arrive."""

    def __init__(self, options: BarOptions) -> None:
        self.shadow = BarEngine(options)
        self.matched = 0
        self.close_sum = 0.0
        self.close_max = 0.0
        self.volume_sum = 0.0
        self._aggs: _Seen = {}
        self._trades: _Seen = {}

    def trades(self, trades: pl.DataFrame) -> None:
        """The run's trades: they build the shadow bars."""
        self._match(self.shadow.add_trades(trades), feed=False)

    def bars(self, records: pl.DataFrame) -> None:
        """The run's bar records, built from the feed's aggregates."""
        self._match(records, feed=True)

    def advance(self, now_ms: int) -> None:
        self._match(self.shadow.advance(now_ms), feed=False)

    def finish(self) -> None:
        self._match(self.shadow.finish(), feed=False)

    def summary(self) -> str:
        """How far apart the two are, as a sentence fragment ('' before any pair met)."""
        if not self.matched:
            return ""
        return (
            f"{self.matched} bars compared: close differs by "
            f"{self.close_sum / self.matched:.4%} on average ({self.close_max:.4%} at most), "
            f"volume by {self.volume_sum / self.matched:.2%}"
        )

    def _match(self, records: pl.DataFrame, feed: bool) -> None:
        mine, other = (self._aggs, self._trades) if feed else (self._trades, self._aggs)
        rows = records.filter(pl.col("state") != "partial").select(
            "symbol", "timeframe", "start", "close", "volume"
        )
        for sym, tf, start, close, volume in rows.iter_rows():
            key = (sym, tf, start)
            theirs = other.pop(key, None)
            if theirs is None:
                mine[key] = (close, volume)
                continue
            agg, trade = ((close, volume), theirs) if feed else (theirs, (close, volume))
            if trade[0]:
                rel = abs(agg[0] - trade[0]) / abs(trade[0])
                self.matched += 1
                self.close_sum += rel
                self.close_max = max(self.close_max, rel)
            if trade[1]:
                self.volume_sum += abs(agg[1] - trade[1]) / trade[1]
        for seen in (mine, other):
            while len(seen) > _MAX_UNMATCHED:
                seen.pop(next(iter(seen)))
