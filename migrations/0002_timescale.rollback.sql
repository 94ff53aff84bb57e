-- Compression is undone (policies removed, chunks decompressed); the tables stay hypertables,
-- since TimescaleDB cannot turn a hypertable back into a plain table in place. Rolling back
-- 0001_tables drops them altogether.
DO $$
DECLARE
    t text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RETURN;
    END IF;
    FOREACH t IN ARRAY ARRAY['trades', 'quotes', 'bars', 'book_snapshots'] LOOP
        PERFORM remove_compression_policy(t::regclass, if_exists => true);
        PERFORM decompress_chunk(c, if_compressed => true) FROM show_chunks(t::regclass) AS c;
        EXECUTE format('ALTER TABLE %I SET (timescaledb.compress = false)', t);
    END LOOP;
END
$$;
