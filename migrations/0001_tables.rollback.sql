-- The timescaledb extension stays: other schemas in the database may use it.
DROP TABLE gaps;
DROP TABLE alerts;
DROP TABLE book_snapshots;
DROP TABLE bars;
DROP TABLE quotes;
DROP TABLE trades;
