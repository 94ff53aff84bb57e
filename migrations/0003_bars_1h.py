"""With TimescaleDB: `bars_1h`, a continuous aggregate of the 1-minute bars into hourly ones,
refreshed every half hour. Without the extension this migration changes nothing.

TimescaleDB refuses to create a continuous aggregate inside a transaction (or a DO block), so
this migration runs outside one and decides in Python whether there is anything to do.
"""

from __future__ import annotations

from typing import Any

from yoyo import step

__transactional__ = False

CREATE_VIEW = """
CREATE MATERIALIZED VIEW IF NOT EXISTS bars_1h
WITH (timescaledb.continuous) AS
SELECT
    symbol,
    time_bucket(INTERVAL '1 hour', start) AS start,
    first(open, start) AS open,
    max(high) AS high,
    min(low) AS low,
    last(close, start) AS close,
    sum(volume) AS volume,
    sum(vwap * volume) / nullif(sum(volume), 0) AS vwap,
    sum(trades) AS trades,
    sum(buy_volume) AS buy_volume,
    sum(sell_volume) AS sell_volume
FROM bars
WHERE timeframe = '1m'
GROUP BY symbol, time_bucket(INTERVAL '1 hour', start)
WITH NO DATA
"""

# Revised 1-minute bars arrive within minutes, so three hours back covers every late change.
ADD_POLICY = """
SELECT add_continuous_aggregate_policy(
    'bars_1h',
    start_offset => INTERVAL '3 hours',
    end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '30 minutes',
    if_not_exists => true
)
"""


def _has_timescale(conn: Any) -> bool:
    cursor = conn.cursor()
    cursor.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
    return cursor.fetchone() is not None


def apply(conn: Any) -> None:
    if _has_timescale(conn):
        cursor = conn.cursor()
        cursor.execute(CREATE_VIEW)
        cursor.execute(ADD_POLICY)


def rollback(conn: Any) -> None:
    if _has_timescale(conn):
        conn.cursor().execute("DROP MATERIALIZED VIEW IF EXISTS bars_1h")


step(apply, rollback)
