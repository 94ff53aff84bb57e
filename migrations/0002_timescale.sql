-- With TimescaleDB: the time-series tables become hypertables partitioned by their time column
-- (every natural key includes it, as TimescaleDB requires of unique indexes), and chunks older
-- than a week are compressed. Trades and quotes skip TimescaleDB's default time index: their
-- unique keys already lead with the time. Without the extension this migration changes nothing.
DO $$
DECLARE
    t record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RETURN;
    END IF;
    FOR t IN
        SELECT * FROM (VALUES
            ('trades', 'time', false, 'symbol', 'time DESC'),
            ('quotes', 'time', false, 'symbol', 'time DESC'),
            ('bars', 'start', true, 'symbol, timeframe', 'start DESC'),
            ('book_snapshots', 'time', true, 'symbol', 'time DESC')
        ) AS v (name, time_column, default_indexes, segment_by, order_by)
    LOOP
        PERFORM create_hypertable(
            t.name::regclass,
            t.time_column::name,
            create_default_indexes => t.default_indexes,
            if_not_exists => true,
            migrate_data => true
        );
        EXECUTE format(
            'ALTER TABLE %I SET (timescaledb.compress, timescaledb.compress_segmentby = %L, '
            'timescaledb.compress_orderby = %L)',
            t.name, t.segment_by, t.order_by
        );
        PERFORM add_compression_policy(t.name::regclass, INTERVAL '7 days', if_not_exists => true);
    END LOOP;
END
$$;
