-- Tables for trades, quotes, bars, book snapshots, alerts and feed gaps.
-- Each has a natural key, so that the writer's INSERT … ON CONFLICT makes every write idempotent:
-- a replayed batch changes nothing. Times are timestamptz (UTC instants). Symbols, ids and other
-- codes compare bytewise (COLLATE "C"): they need no linguistic order, and the unique indexes
-- that every write maintains are markedly cheaper that way.

-- TimescaleDB must be preloaded before CREATE EXTENSION can succeed; where it is installed but
-- not preloaded, the schema stays plain PostgreSQL rather than failing.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        IF current_setting('shared_preload_libraries') LIKE '%timescaledb%' THEN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
        ELSE
            RAISE NOTICE 'timescaledb is installed but not in shared_preload_libraries: '
                'using plain PostgreSQL tables';
        END IF;
    END IF;
END
$$;

CREATE TABLE trades (
    symbol text COLLATE "C" NOT NULL,
    "time" timestamptz NOT NULL,
    exchange smallint NOT NULL,
    -- A trade without an id gets one built from its content ("~price:size:side").
    trade_id text COLLATE "C" NOT NULL,
    price float8 NOT NULL,
    size float8 NOT NULL,
    side smallint NOT NULL,
    received timestamptz,
    -- Time first: new trades then land at the right edge of the index, which makes the writer
    -- about half again as fast as with symbol first, and range scans by time stay cheap.
    CONSTRAINT trades_key UNIQUE ("time", symbol, exchange, trade_id)
);

CREATE TABLE quotes (
    symbol text COLLATE "C" NOT NULL,
    "time" timestamptz NOT NULL,
    exchange smallint NOT NULL,
    bid float8 NOT NULL,
    bid_size float8 NOT NULL,
    ask float8 NOT NULL,
    ask_size float8 NOT NULL,
    received timestamptz,
    -- Time first, as for trades.
    CONSTRAINT quotes_key UNIQUE ("time", symbol, exchange, bid, bid_size, ask, ask_size)
);

CREATE TABLE bars (
    symbol text COLLATE "C" NOT NULL,
    timeframe text COLLATE "C" NOT NULL,
    start timestamptz NOT NULL,
    "end" timestamptz NOT NULL,
    open float8,
    high float8,
    low float8,
    close float8,
    volume float8,
    vwap float8,
    trades integer,
    buy_volume float8,
    sell_volume float8,
    state text NOT NULL,
    rsi float8,
    stoch_k float8,
    stoch_d float8,
    macd float8,
    macd_signal float8,
    macd_hist float8,
    ao float8,
    cci float8,
    bb_upper float8,
    bb_middle float8,
    bb_lower float8,
    flow_imbalance float8,
    CONSTRAINT bars_key UNIQUE (symbol, timeframe, start)
);

CREATE TABLE book_snapshots (
    symbol text COLLATE "C" NOT NULL,
    "time" timestamptz NOT NULL,
    exchange smallint NOT NULL,
    bids jsonb NOT NULL,
    asks jsonb NOT NULL,
    CONSTRAINT book_snapshots_key UNIQUE (symbol, "time", exchange)
);

CREATE TABLE alerts (
    filter text COLLATE "C" NOT NULL,
    symbol text COLLATE "C" NOT NULL,
    timeframe text COLLATE "C",
    "time" timestamptz NOT NULL,
    severity text NOT NULL,
    message text NOT NULL,
    "values" jsonb NOT NULL,
    CONSTRAINT alerts_key UNIQUE (filter, symbol, "time")
);

CREATE TABLE gaps (
    symbol text COLLATE "C" NOT NULL,
    start timestamptz NOT NULL,
    "end" timestamptz NOT NULL,
    CONSTRAINT gaps_key UNIQUE (symbol, start)
);
