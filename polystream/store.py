"""Storage in PostgreSQL/TimescaleDB. `Store` is the `polystream-store` worker: `offer` never
blocks, rows go in with COPY and idempotent upserts, or to an on-disk journal while the database is
away. `migrate`, `rollback`, `migration_status`, `require_migrated`: yoyo, on the caller's thread.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import msgspec
import polars as pl
import psycopg
import psycopg.errors
import yoyo
import yoyo.exceptions
from polars._typing import PolarsDataType

from .config import display_url
from .errors import ConfigError, PolystreamError
from .schema import ALERT, BAR, BOOK, GAP, QUOTE, TRADE, Schema, bar_schema
from .worker import Backoff, Worker

TABLES = ("trades", "quotes", "bars", "books", "alerts", "gaps")
MIGRATE_COMMAND = "polystream migrate"
THREAD_NAME = "polystream-store"
CONNECT_TIMEOUT = 5  # seconds; libpq's minimum is 2

_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
# Connection failures that waiting does not fix: the server answered and said no.
_FATAL_REASONS = (
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "permission denied",
)


class StoreError(PolystreamError):
    """The database cannot be used as configured, or the store cannot keep its journal."""


# --- URLs and error sentences -------------------------------------------------------------------


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise StoreError(
            f"DATABASE_URL {display_url(url)!r} is not a PostgreSQL URL: "
            "write it as postgresql://user:password@host:port/database."
        )
    try:
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        raise StoreError(
            f"DATABASE_URL {display_url(url)!r} has an invalid port: "
            "write it as postgresql://user:password@host:port/database."
        ) from None


def where(url: str) -> str:
    """`host:port/database` of a URL, which is how errors name a database (never the password)."""
    parts = urlsplit(url)
    try:
        port = parts.port or 5432
    except ValueError:
        port = 5432
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    database = unquote(parts.path.lstrip("/")) or unquote(parts.username or "")
    return f"{host}:{port}/{database}"


def _driver_url(url: str) -> str:
    _check_url(url)
    return re.sub(r"^[^:]+:", "postgresql:", url, count=1)


def _yoyo_url(url: str) -> str:
    _check_url(url)
    return re.sub(r"^[^:]+:", "postgresql+psycopg:", url, count=1)


def _reason(exc: BaseException, url: str) -> str:
    """The gist of a driver error, lower-cased, without the password or the libpq boilerplate."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if "failed: " in line:
        line = line.rsplit("failed: ", 1)[1]
    line = " ".join(re.sub(r"^(FATAL|ERROR):\s*", "", line.strip()).split()).rstrip(".")
    if "resolve host" in line or "translate host name" in line:
        line = "the host name does not resolve"
    password = urlsplit(url).password
    if password:
        line = line.replace(password, "…").replace(unquote(password), "…")
    if len(line) > 1 and line[0].isupper() and not line[1].isupper():
        line = line[0].lower() + line[1:]
    return line or type(exc).__name__


class Unreachable(StoreError):
    """The database cannot be reached now but may come back: rows can wait in the journal."""


def _is_fatal(reason: str) -> bool:
    return any(r in reason for r in _FATAL_REASONS)


def connect_error(url: str, exc: BaseException) -> StoreError:
    """One sentence naming host, port and database (never the password) and what went wrong."""
    reason = _reason(exc, url)
    hint = ""
    if "authentication failed" in reason or "role" in reason or "pg_hba" in reason:
        hint = "; check the user and password in DATABASE_URL"
    elif "database" in reason and "does not exist" in reason:
        hint = "; create it or correct DATABASE_URL"
    text = f"Cannot connect to PostgreSQL at {where(url)}: {reason}{hint}."
    return StoreError(text) if _is_fatal(reason) else Unreachable(text)


# --- migrations ---------------------------------------------------------------------------------


def migration_ids() -> list[str]:
    """Ids of the migrations shipped with polystream, in the order they apply."""
    ids = []
    for entry in resources.files("polystream.migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and not name.endswith(".rollback.sql"):
            ids.append(name[: -len(".sql")])
        elif name.endswith(".py") and not name.startswith("__"):
            ids.append(name[: -len(".py")])
    return sorted(ids)


def _migrations() -> Any:
    with resources.as_file(resources.files("polystream.migrations")) as path:
        found = yoyo.read_migrations(str(path))
    # The package's __init__.py would otherwise count as a migration.
    return found.__class__([m for m in found if not m.id.startswith("__")], found.post_apply)


@contextlib.contextmanager
def _backend(url: str) -> Iterator[Any]:
    try:
        backend = yoyo.get_backend(_yoyo_url(url))
    except psycopg.Error as exc:
        raise connect_error(url, exc) from None
    try:
        yield backend
    except yoyo.exceptions.LockTimeout:
        raise StoreError(
            f"Another `{MIGRATE_COMMAND}` holds the migration lock on {where(url)}: "
            "wait for it to finish, or remove the row in its yoyo_lock table if it died."
        ) from None
    except psycopg.OperationalError as exc:
        raise connect_error(url, exc) from None
    finally:
        with contextlib.suppress(Exception):
            backend.connection.close()


def _failed(url: str, migration: str, action: str, exc: psycopg.Error) -> StoreError:
    return StoreError(
        f"Migration {migration} could not be {action} on {where(url)}: {_reason(exc, url)}."
    )


def migrate(url: str) -> list[str]:
    """Apply every pending migration; return their ids (empty when the schema is current)."""
    with _backend(url) as backend:
        with backend.lock():
            pending = backend.to_apply(_migrations())
            for m in pending:
                try:
                    backend.apply_one(m)
                except psycopg.Error as exc:
                    raise _failed(url, m.id, "applied", exc) from None
        return [m.id for m in pending]


def rollback(url: str) -> str | None:
    """Undo the last applied migration; return its id, or None when none is applied."""
    with _backend(url) as backend:
        with backend.lock():
            applied = backend.to_rollback(_migrations())
            if not applied:
                return None
            last = applied[0]
            try:
                backend.rollback_one(last)
            except psycopg.Error as exc:
                raise _failed(url, last.id, "rolled back", exc) from None
        return str(last.id)


def migration_status(url: str) -> list[tuple[str, bool]]:
    """Every shipped migration's id, and whether it is applied, in order."""
    with _backend(url) as backend:
        applied = backend.get_applied_migration_hashes()
        return [(str(m.id), m.hash in applied) for m in _migrations()]


def _not_migrated(url: str, pending: Sequence[str]) -> ConfigError:
    shown = ", ".join(pending[:3]) + (", …" if len(pending) > 3 else "")
    count = f"{len(pending)} migration{'s' if len(pending) != 1 else ''}"
    return ConfigError(
        f"The database at {where(url)} lacks {count} ({shown}): run `{MIGRATE_COMMAND}`."
    )


def require_migrated(url: str) -> None:
    """Raise `ConfigError` naming `polystream migrate` when any migration is pending."""
    pending = [m for m, applied in migration_status(url) if not applied]
    if pending:
        raise _not_migrated(url, pending)


def recent_bars(
    url: str, symbols: Sequence[str], timeframes: Sequence[int], count: int, now_ms: int
) -> pl.DataFrame:
    """The last `count` stored final or revised bars per symbol and timeframe (ms) that ended
    by the start of the bucket `now_ms` is in, oldest first, as bar records (symbol, timeframe,
    start, open, high, low, close, volume, vwap, trades, buy_volume, sell_volume)."""
    from .config import timeframe_name

    query = """
        SELECT symbol, timeframe, (extract(epoch FROM start) * 1000)::int8 AS start,
               open, high, low, close, volume, vwap, trades::int8 AS trades,
               buy_volume, sell_volume
        FROM (
            SELECT * FROM bars
            WHERE symbol = %s AND timeframe = %s AND state <> 'partial'
              AND "end" <= to_timestamp(%s::int8 / 1000.0)
            ORDER BY start DESC LIMIT %s
        ) AS recent
        ORDER BY start
    """
    schema = {c: t for c, t in BAR.items() if c not in ("end", "state")}
    rows: list[tuple[Any, ...]] = []
    try:
        with psycopg.connect(_driver_url(url), connect_timeout=CONNECT_TIMEOUT) as conn:
            for symbol in symbols:
                for tf in timeframes:
                    cutoff = now_ms // tf * tf
                    args = (symbol, timeframe_name(tf), cutoff, count)
                    rows += conn.execute(query, args).fetchall()
    except psycopg.Error as exc:
        raise connect_error(url, exc) from None
    return pl.DataFrame(rows, schema=schema, orient="row")


def last_bar_start(url: str, symbol: str, timeframe: str) -> int | None:
    """The start (epoch ms) of the latest stored final or revised bar, or None."""
    query = """
        SELECT (extract(epoch FROM max(start)) * 1000)::int8 FROM bars
        WHERE symbol = %s AND timeframe = %s AND state <> 'partial'
    """
    try:
        with psycopg.connect(_driver_url(url), connect_timeout=CONNECT_TIMEOUT) as conn:
            row = conn.execute(query, (symbol, timeframe)).fetchone()
    except psycopg.Error as exc:
        raise connect_error(url, exc) from None
    return None if row is None or row[0] is None else int(row[0])


# --- tables -------------------------------------------------------------------------------------

_PG_TYPES: dict[PolarsDataType, str] = {
    pl.String: "text",
    pl.Int64: "int8",
    pl.Int16: "int2",
    pl.Int8: "int2",  # PostgreSQL has no one-byte integer
    pl.Float64: "float8",
}


def _ts(column: str) -> str:
    # Exact: whole microseconds (ms · 1000 stays below 2^53 until the year 2255) added to the
    # epoch, with no float rounding and no time-zone arithmetic.
    return f"timestamptz 'epoch' + \"{column}\" * interval '1 millisecond'"


@dataclass(frozen=True)
class _Table:
    """How one kind of offered frame reaches its table: the staging columns (times as epoch
    ms), the columns a frame must have, and the statement that moves staged rows over."""

    name: str
    target: str
    columns: Schema
    required: tuple[str, ...]
    insert: str
    json: tuple[str, ...] = ()

    @property
    def stage(self) -> str:
        return f"stage_{self.name}"

    def create_stage(self) -> str:
        cols = ", ".join(f'"{c}" {_PG_TYPES[t]}' for c, t in self.columns.items())
        return f"CREATE TEMP TABLE IF NOT EXISTS {self.stage} ({cols}) ON COMMIT DELETE ROWS"

    def copy(self) -> str:
        cols = ", ".join(f'"{c}"' for c in self.columns)
        return f"COPY {self.stage} ({cols}) FROM STDIN (FORMAT csv)"

    @property
    def plain(self) -> str | None:
        """For DO NOTHING tables, the insert without its ON CONFLICT clause."""
        if not self.insert.endswith(" DO NOTHING"):
            return None
        return self.insert[: self.insert.rindex(" ON CONFLICT")]


def _upsert_set(table: str, columns: Sequence[str]) -> str:
    assignments = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in columns)
    old = ", ".join(f'{table}."{c}"' for c in columns)
    new = ", ".join(f'EXCLUDED."{c}"' for c in columns)
    # Rows that would not change are left alone: a replay writes nothing, not even dead tuples.
    return f"DO UPDATE SET {assignments} WHERE ({old}) IS DISTINCT FROM ({new})"


def _table_order(record: Schema, *leading: str) -> Schema:
    """`record`'s columns in its table's order: `leading` first, then the rest as in `record`."""
    return {**{c: record[c] for c in leading}, **record}


def _required(record: Schema, *optional: str) -> tuple[str, ...]:
    """The columns an offered frame must have: all of `record`'s but the `optional` ones."""
    return tuple(c for c in record if c not in optional)


# The bars table has one column per indicator, named without the periods a run's columns carry
# (rsi_14 is stored as rsi); the migrations fix this list.
_BAR_INDICATORS = (
    "rsi", "stoch_k", "stoch_d", "macd", "macd_signal", "macd_hist", "ao", "cci",
    "bb_upper", "bb_middle", "bb_lower",
)  # fmt: skip
_BAR_TABLE = bar_schema(_BAR_INDICATORS)
_BAR_KEY = ("symbol", "timeframe", "start")
_BAR_VALUES = tuple(c for c in _BAR_TABLE if c not in _BAR_KEY)

_SPECS: dict[str, _Table] = {
    "trades": _Table(
        "trades",
        "trades",
        _table_order(TRADE, "symbol", "time", "exchange", "trade_id"),
        _required(TRADE, "side", "exchange", "trade_id", "received"),
        # A trade without an id is keyed by its content, so that a replay still finds it.
        'INSERT INTO trades (symbol, "time", exchange, trade_id, price, size, side, received) '
        f"SELECT symbol, {_ts('time')}, coalesce(exchange, 0), "
        "coalesce(nullif(trade_id, ''), "
        "'~' || price || ':' || size || ':' || coalesce(side, 0)), "
        f"price, size, coalesce(side, 0), {_ts('received')} FROM stage_trades "
        'ON CONFLICT (symbol, exchange, trade_id, "time") DO NOTHING',
    ),
    "quotes": _Table(
        "quotes",
        "quotes",
        _table_order(QUOTE, "symbol", "time", "exchange"),
        _required(QUOTE, "exchange", "received"),
        'INSERT INTO quotes (symbol, "time", exchange, bid, bid_size, ask, ask_size, received) '
        f"SELECT symbol, {_ts('time')}, coalesce(exchange, 0), bid, bid_size, ask, ask_size, "
        f"{_ts('received')} FROM stage_quotes "
        'ON CONFLICT (symbol, "time", exchange, bid, bid_size, ask, ask_size) DO NOTHING',
    ),
    "bars": _Table(
        "bars",
        "bars",
        # Staged with `end` last, so that the staging table and journal files keep one layout.
        {**{c: t for c, t in _BAR_TABLE.items() if c != "end"}, "end": _BAR_TABLE["end"]},
        ("symbol", "timeframe", "start", "end", "state"),
        "INSERT INTO bars (symbol, timeframe, start, "
        + ", ".join(f'"{c}"' for c in _BAR_VALUES)
        + f") SELECT symbol, timeframe, {_ts('start')}, "
        + ", ".join(_ts(c) if c == "end" else f'"{c}"' for c in _BAR_VALUES)
        + " FROM stage_bars ON CONFLICT (symbol, timeframe, start) "
        + _upsert_set("bars", _BAR_VALUES),
    ),
    "books": _Table(
        "books",
        "book_snapshots",
        BOOK,
        _required(BOOK, "exchange"),
        'INSERT INTO book_snapshots (symbol, "time", exchange, bids, asks) '
        f"SELECT symbol, {_ts('time')}, coalesce(exchange, 0), bids::jsonb, asks::jsonb "
        'FROM stage_books ON CONFLICT (symbol, "time", exchange) DO NOTHING',
        json=("bids", "asks"),
    ),
    "alerts": _Table(
        "alerts",
        "alerts",
        ALERT,
        _required(ALERT, "timeframe"),
        'INSERT INTO alerts (filter, symbol, timeframe, "time", severity, message, "values") '
        f'SELECT filter, symbol, timeframe, {_ts("time")}, severity, message, "values"::jsonb '
        'FROM stage_alerts ON CONFLICT (filter, symbol, "time") DO NOTHING',
        json=("values",),
    ),
    "gaps": _Table(
        "gaps",
        "gaps",
        GAP,
        ("symbol", "start", "end"),
        'INSERT INTO gaps (symbol, start, "end") '
        f"SELECT symbol, {_ts('start')}, {_ts('end')} FROM stage_gaps "
        'ON CONFLICT (symbol, start) DO UPDATE SET "end" = EXCLUDED."end" '
        'WHERE EXCLUDED."end" > gaps."end"',
    ),
}


def _check_frame(table: str, frame: pl.DataFrame) -> None:
    spec = _SPECS.get(table)
    if spec is None:
        raise ValueError(f"unknown table {table!r}: use one of {', '.join(TABLES)}")
    missing = [c for c in spec.required if c not in frame.columns]
    if missing:
        raise ValueError(f"a frame for {table} lacks the column(s) {', '.join(missing)}")
    for c in spec.json:
        if frame.schema[c] != pl.String:
            raise ValueError(f"column {c} of a frame for {table} must hold JSON text")
    for c, target in spec.columns.items():
        dtype = frame.schema.get(c)
        if dtype is None or dtype == pl.Null:
            continue
        fits = dtype == pl.String if target == pl.String else dtype.is_numeric()
        if not fits:
            raise ValueError(f"column {c} of a frame for {table} has type {dtype}")


def _normalise(table: str, frame: pl.DataFrame) -> pl.DataFrame:
    """One offered frame as its table's staging columns (a no-op on a normalised frame)."""
    spec = _SPECS[table]
    if table == "bars":
        # A run's indicator columns carry its periods (rsi_14, cci_20); the table has one of each.
        renames = {}
        for prefix in ("rsi", "cci"):
            if prefix not in frame.columns:
                found = next((c for c in frame.columns if c.startswith(prefix + "_")), None)
                if found is not None:
                    renames[found] = prefix
        frame = frame.rename(renames).filter(pl.col("state") != "partial")
    return frame.select(
        pl.col(c).cast(t) if c in frame.columns else pl.lit(None, dtype=t).alias(c)
        for c, t in spec.columns.items()
    )


def _combine(table: str, frames: Sequence[pl.DataFrame]) -> pl.DataFrame:
    parts = [_normalise(table, f) for f in frames]
    return parts[0] if len(parts) == 1 else pl.concat(parts)


def _prepare(table: str, frames: Sequence[pl.DataFrame]) -> pl.DataFrame:
    """The frames of one table, in offer order, as the rows to stage."""
    out = _combine(table, frames)
    if table == "bars":
        # One upsert may not touch a row twice; the latest version of a bar is the one to keep.
        out = out.unique(["symbol", "timeframe", "start"], keep="last", maintain_order=True)
    elif table == "gaps":
        out = out.group_by("symbol", "start", maintain_order=True).agg(pl.col("end").max())
    return out


# --- the journal --------------------------------------------------------------------------------


class _File(NamedTuple):
    seq: int
    table: str
    name: str


_JOURNAL_NAME = re.compile(r"^(\d{16})-([a-z]+)\.arrow$")


class Journal:
    """Batches waiting for the database: one Arrow IPC file per table and run of consecutive
    offers, named by the sequence number of the run's first offer, fsynced before it counts."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for leftover in directory.glob(".*.tmp"):
                # Never renamed into place: its batch was still in memory when the process died.
                leftover.unlink()
            files = {}
            for path in directory.iterdir():
                m = _JOURNAL_NAME.match(path.name)
                if m and m.group(2) in _SPECS:
                    file = _File(int(m.group(1)), m.group(2), path.name)
                    files[file] = (path.stat().st_size, _rows_in(path))
        except OSError as exc:
            raise self._error(exc) from None
        self._files: dict[_File, tuple[int, int]] = files  # size in bytes, rows
        self._lock = threading.Lock()

    def _error(self, exc: OSError) -> StoreError:
        return StoreError(f"Cannot use the store journal in {self.dir}: {exc.strerror or exc}.")

    @property
    def next_seq(self) -> int:
        with self._lock:
            return max((f.seq for f in self._files), default=-1) + 1

    def write(self, seq: int, table: str, frame: pl.DataFrame) -> None:
        name = f"{seq:016d}-{table}.arrow"
        path = self.dir / name
        tmp = self.dir / f".{name}.tmp"
        try:
            with open(tmp, "wb") as f:
                frame.write_ipc(f, compression="lz4")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            size = path.stat().st_size
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise self._error(exc) from None
        with self._lock:
            self._files[_File(seq, table, name)] = (size, frame.height)

    def pending(self, below: int) -> list[_File]:
        """Files of offers numbered below `below`, oldest first."""
        with self._lock:
            return sorted(f for f in self._files if f.seq < below)

    def has_pending(self, below: int) -> bool:
        with self._lock:
            return any(f.seq < below for f in self._files)

    def read(self, file: _File) -> pl.DataFrame | None:
        """The file's rows; None when it cannot be parsed, after renaming it out of the way
        (it would otherwise stop every later file from being replayed)."""
        path = self.dir / file.name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise self._error(exc) from None
        try:
            return pl.read_ipc(data)
        except Exception:  # polars reports a damaged file as OSError or as its own errors
            with contextlib.suppress(OSError):
                path.rename(path.with_name(file.name + ".unreadable"))
            with self._lock:
                self._files.pop(file, None)
            return None

    def delete(self, file: _File) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / file.name).unlink()
        with self._lock:
            self._files.pop(file, None)

    def totals(self) -> tuple[int, int, int]:
        """Files, bytes and rows waiting."""
        with self._lock:
            sizes = self._files.values()
            return len(sizes), sum(s for s, _ in sizes), sum(r for _, r in sizes)


def _rows_in(path: Path) -> int:
    """The rows of a journal file, from its metadata (0 when it cannot be read: replaying it
    sets it aside)."""
    try:
        return int(pl.scan_ipc(path).select(pl.len()).collect().item())
    except Exception:  # polars reports a damaged file as OSError or as its own errors
        return 0


# --- the writer ---------------------------------------------------------------------------------


class StoreStats(msgspec.Struct):
    """A snapshot of the writer: rows inserted or changed (rows a replay finds unchanged do not
    count), what waits in the journal, and the connection. `last_error` is the latest problem
    as a sentence without the password; it stays after the writer recovers (see `connected`)."""

    rows_written: int = 0
    rows_by_table: dict[str, int] = msgspec.field(default_factory=dict)
    journal_files: int = 0
    journal_bytes: int = 0
    journal_rows: int = 0
    connected: bool = False
    reconnects: int = 0
    last_error: str | None = None


class _Item(NamedTuple):
    seq: int
    table: str
    frame: pl.DataFrame


def _runs(items: Sequence[_Item]) -> Iterator[list[_Item]]:
    """Items split where their sequence numbers jump (an offer in between went to the journal)."""
    run: list[_Item] = []
    for item in items:
        if run and item.seq != run[-1].seq + 1:
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def _by_table(frames: Sequence[tuple[str, pl.DataFrame]]) -> dict[str, list[pl.DataFrame]]:
    groups: dict[str, list[pl.DataFrame]] = {}
    for table, frame in frames:
        groups.setdefault(table, []).append(frame)
    return groups


class _Lost(Exception):
    """The connection failed; the batch is still to be written."""


class Store(Worker[_Item]):
    """The database writer: see the module docstring.

    Its inbox holds up to `inbox_size` offers; when it is full, an offer goes to the journal on
    disk (`overflow`), so that `offer` neither blocks nor drops. Order is kept per table (a revised
    bar always lands after its final version): every offer gets a sequence number, and while the
    journal holds older offers, newer ones join it and the journal is replayed oldest first.
    """

    def __init__(
        self,
        url: str,
        state_dir: Path,
        *,
        inbox_size: int = 64,
        batch_rows: int = 100_000,
        flush_every: float = 0.5,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
    ) -> None:
        super().__init__(THREAD_NAME, inbox_size=max(1, inbox_size))
        self._url = url
        self._conninfo = _driver_url(url)
        self._where = where(url)
        self._batch_rows = batch_rows
        self._flush_every = flush_every
        self.journal = Journal(Path(state_dir) / "journal")
        self._lock = threading.Lock()  # numbering and placing an offer happen as one step
        self._next_seq = self.journal.next_seq
        # Every offer numbered below this is committed to the database (see `offered`).
        self.committed = 0
        self._closed = False
        self._margin = 0.0
        self._conn: psycopg.Connection[Any] | None = None
        self._ever_connected = False
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._next_attempt = 0.0
        self._stats_lock = threading.Lock()
        self._rows: dict[str, int] = dict.fromkeys(TABLES, 0)
        self._reconnects = 0
        self._last_error: str | None = None

    # -- the caller's side -----------------------------------------------------------------------

    def offer(self, table: str, frame: pl.DataFrame) -> None:
        """Hand over rows for `table`; never blocks on the database (a full inbox, or a stopped
        store, sends the frame to the journal on disk instead)."""
        _check_frame(table, frame)
        if frame.height == 0:
            return
        with self._lock:
            item = _Item(self._next_seq, table, frame)
            self._next_seq += 1
            if self._closed:
                self.overflow(item)
            else:
                self.put(item)

    def overflow(self, item: _Item) -> None:
        """The inbox is full: the offer goes to the journal, in its place in the order."""
        self.journal.write(item.seq, item.table, item.frame)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Write what the inbox holds to the database (or the journal, if the database cannot
        be reached) within `timeout` seconds, then close (None: without a time limit, and
        without waiting). Later offers go to the journal."""
        if timeout is not None:
            # Part of the time is kept for journaling what the database did not take.
            self._margin = min(1.0, timeout / 4)
            # Each call gives the writer its own time, a second one included.
            self.deadline = time.monotonic() + timeout
        super().stop(timeout)
        with self._lock:
            self._closed = True
            # Left only when the thread is gone or overran its time: keep it on disk.
            self._journal_items(self.drain())

    @property
    def offered(self) -> int:
        """The number the next offer gets: the offers made so far are in the database once
        `committed` reaches it (for callers that acknowledge their source only then)."""
        with self._lock:
            return self._next_seq

    @property
    def where(self) -> str:
        """Host, port and database, without the password."""
        return self._where

    @property
    def stats(self) -> StoreStats:
        files, size, waiting = self.journal.totals()
        with self._stats_lock:
            rows = dict(self._rows)
            return StoreStats(
                rows_written=sum(rows.values()),
                rows_by_table=rows,
                journal_files=files,
                journal_bytes=size,
                journal_rows=waiting,
                connected=self._conn is not None,
                reconnects=self._reconnects,
                last_error=self._last_error,
            )

    def counters(self) -> dict[str, int]:
        """The counters shown beside the pipeline's own."""
        s = self.stats
        shown = {"rows stored": s.rows_written, "journal KiB": -(-s.journal_bytes // 1024)}
        if s.reconnects:
            shown["db reconnects"] = s.reconnects
        return shown

    # -- the worker thread -----------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                stopping = self.stopping
                if stopping and self.left() <= self._margin:
                    break
                items, horizon = self._take(0.0 if stopping else self._wait())
                if stopping and not items and not self._replaying(horizon):
                    break
                try:
                    self._round(items, horizon)
                    self._advance(horizon)
                except Exception as exc:  # a bug must not cost the rows: keep them on disk
                    if isinstance(exc, PolystreamError):
                        self._fail(exc)
                    else:
                        self._fail(StoreError(f"The store writer failed: {exc}."))
                    # A run journaled again gets the same file name, so nothing is doubled.
                    with contextlib.suppress(PolystreamError):
                        self._journal_items(items)
        finally:
            with contextlib.suppress(PolystreamError):
                self._journal_items(self.drain())
            self._disconnect()

    def _advance(self, horizon: int) -> None:
        """Move `committed` up after a round: to `horizon`, or to the oldest offer the journal
        still keeps (offers are committed in the order they were numbered)."""
        if self._conn is not None:
            waiting = self.journal.pending(horizon)
            self.committed = max(self.committed, waiting[0].seq if waiting else horizon)

    def _replaying(self, horizon: int) -> bool:
        return self._conn is not None and self.journal.has_pending(horizon)

    def _wait(self) -> float:
        """How long to gather offers before the next round."""
        if self.fatal is not None:
            return self._flush_every
        if self._conn is None:
            return max(0.0, min(self._flush_every, self._next_attempt - time.monotonic()))
        if self.journal.has_pending(self._next_seq):
            return 0.0
        return self._flush_every

    def _take(self, wait: float) -> tuple[list[_Item], int]:
        """Offers from the inbox, up to `batch_rows` rows gathered over at most `wait` seconds,
        and the horizon: every offer numbered below it is in hand or in the journal."""
        assert self.inbox is not None
        items: list[_Item] = []
        rows = 0
        deadline = time.monotonic() + wait
        while rows < self._batch_rows:
            left = deadline - time.monotonic()
            # Short waits: `stop` cannot leave its wake-up in a full inbox, and is noticed at once.
            item = self.next_item(min(left, 0.05) if left > 0 else 0.0)
            if item is None:
                if left > 0 and not self.stopping:
                    continue
                break
            items.append(item)
            rows += item.frame.height
        if items:
            return items, items[-1].seq + 1
        with self._lock:
            # `take` also returns None for the wake-up `stop` leaves, which may precede an offer.
            while (item := self.next_item(0.0)) is None:
                if self.inbox.empty():
                    return [], self._next_seq
        return [item], item.seq + 1

    def _round(self, items: list[_Item], horizon: int) -> None:
        if self.fatal is None and self._conn is None and time.monotonic() >= self._next_attempt:
            self._connect()
        if self._conn is None or self.journal.has_pending(horizon):
            self._journal_items(items)
            if self._conn is not None:
                self._replay(horizon)
            return
        if items:
            try:
                self._write(_by_table([(i.table, i.frame) for i in items]))
            except _Lost:
                self._journal_items(items)

    def _journal_items(self, items: Sequence[_Item]) -> None:
        for run in _runs(items):
            for table, frames in _by_table([(i.table, i.frame) for i in run]).items():
                self.journal.write(run[0].seq, table, _combine(table, frames))

    def _replay(self, horizon: int) -> None:
        """Write the oldest journal files (about `batch_rows` rows) in one transaction."""
        chosen: list[tuple[str, pl.DataFrame]] = []
        files = []
        rows = 0
        for file in self.journal.pending(horizon):
            if rows >= self._batch_rows:
                break
            frame = self.journal.read(file)
            if frame is None:
                with self._stats_lock:
                    self._last_error = (
                        f"The journal file {file.name} could not be read; it was set aside as "
                        f"{file.name}.unreadable in {self.journal.dir}."
                    )
                continue
            chosen.append((file.table, frame))
            files.append(file)
            rows += frame.height
        with contextlib.suppress(_Lost):
            self._write(_by_table(chosen))
            for file in files:
                self.journal.delete(file)

    # -- the database ------------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            conn = psycopg.connect(
                self._conninfo,
                connect_timeout=CONNECT_TIMEOUT,
                application_name=THREAD_NAME,
                # a server that vanished mid-batch (network cut, host down) is noticed in
                # seconds rather than after the kernel's two hours, so the batch goes to the
                # journal instead of blocking the writer
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=3,
                keepalives_count=3,
                tcp_user_timeout=30_000,
            )
        except psycopg.Error as exc:
            self._connect_failed(exc)
            return
        try:
            self._check_schema(conn)
            with conn.cursor() as cur:
                # Compiling each batch's statement costs more than it saves on its rows.
                cur.execute("SET jit = off")
                for spec in _SPECS.values():
                    cur.execute(spec.create_stage().encode())
            conn.commit()
        except (psycopg.Error, PolystreamError) as exc:
            with contextlib.suppress(Exception):
                conn.close()
            if isinstance(exc, PolystreamError):
                self._fail(exc)
            else:
                self._connect_failed(exc)
            return
        with self._stats_lock:
            if self._ever_connected:
                self._reconnects += 1
            self._ever_connected = True
            self._conn = conn
        self._backoff.reset()

    def _connect_failed(self, exc: psycopg.Error) -> None:
        error = connect_error(self._url, exc)
        if _is_fatal(_reason(exc, self._url)):
            self._fail(error)
        else:
            self._retry_later(error)

    def _check_schema(self, conn: psycopg.Connection[Any]) -> None:
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT migration_id FROM _yoyo_migration")
                applied = {row[0] for row in cur.fetchall()}
        except psycopg.errors.UndefinedTable:
            conn.rollback()
            applied = set()
        pending = [m for m in migration_ids() if m not in applied]
        if pending:
            raise _not_migrated(self._url, pending)

    def _write(self, groups: dict[str, list[pl.DataFrame]]) -> None:
        """COPY each table's rows into its staging table and move them over, in one
        transaction. Raises `_Lost` when the connection fails (nothing was committed)."""
        conn = self._conn
        assert conn is not None
        counts: dict[str, int] = {}
        table = ""
        try:
            with conn.cursor() as cur:
                for table in TABLES:
                    if table not in groups:
                        continue
                    frame = _prepare(table, groups[table])
                    if frame.height == 0:
                        continue
                    spec = _SPECS[table]
                    buf = io.BytesIO()
                    frame.write_csv(buf, include_header=False)
                    with cur.copy(spec.copy().encode()) as copy:
                        copy.write(buf.getbuffer())
                    counts[table] = self._insert(cur, spec)
            conn.commit()
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._disconnect()
            self._retry_later(
                StoreError(
                    f"Lost the connection to PostgreSQL at {self._where}: "
                    f"{_reason(exc, self._url)}; keeping rows in the journal until it is back."
                )
            )
            raise _Lost from None
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
            self._rollback()
            raise ConfigError(
                f"The database at {self._where} does not have the tables polystream writes "
                f"({_reason(exc, self._url)}): run `{MIGRATE_COMMAND}`."
            ) from None
        except psycopg.Error as exc:
            self._rollback()
            raise StoreError(
                f"PostgreSQL at {self._where} refused a batch of {table}: "
                f"{_reason(exc, self._url)}; the batch is kept in {self.journal.dir}."
            ) from None
        with self._stats_lock:
            for name, n in counts.items():
                self._rows[name] += n

    def _insert(self, cur: psycopg.Cursor[Any], spec: _Table) -> int:
        """Move the staged rows over; return how many were inserted or changed."""
        plain = spec.plain
        if plain is not None:
            # ON CONFLICT's speculative insertion about halves the rate of a plain INSERT, and
            # new rows are the rule: try without it (in a savepoint) and fall back on a clash.
            try:
                with cur.connection.transaction():
                    cur.execute(plain.encode())
                return max(cur.rowcount, 0)
            except psycopg.errors.UniqueViolation:
                pass
        cur.execute(spec.insert.encode())
        return max(cur.rowcount, 0)

    def _rollback(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.rollback()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _retry_later(self, error: StoreError) -> None:
        with self._stats_lock:
            self._last_error = str(error)
        self._next_attempt = time.monotonic() + self._backoff.next()

    def _fail(self, error: PolystreamError) -> None:
        """Retrying cannot fix this: from now on every offer goes to the journal."""
        self._disconnect()
        with self._stats_lock:
            self._last_error = str(error)
        if self.fatal is None:
            self.fatal = error
