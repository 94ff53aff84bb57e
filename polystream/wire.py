"""What a run spread over processes sends over NATS JetStream (DESIGN §9): the subjects, the
partition of a symbol, and the messages, built once here for `ingest` and the shards.

`ingest` decodes each batch of frames once and publishes, per symbol partition that has events,
one message with that partition's columns (`polystream.md.<p>`), then one clock message
(`polystream.md.clock`) with every trade's event and receipt time and partition, in arrival
order. A shard reads the clock and its partitions' messages of each batch in sequence, so its
bar engine sees the whole run's clock (see `window`): the watermark comes from what ingest
received, never from the shard's own clock. Columns travel as Arrow IPC, which a shard reads
without decoding JSON again; book snapshots as msgpack. Messages carry batches, never single
events. Results (bars, alerts, books, status) go back as JSON records, one per message, to
`polystream.<type>.…` subjects of their own stream.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence

import msgspec
import polars as pl

from .batch import Batch
from .events import Book
from .schema import AGGREGATE, QUOTE, TRADE, Schema, empty

MD_STREAM = "POLYSTREAM_MD"
OUT_STREAM = "POLYSTREAM_OUT"
MD_SUBJECTS = ["polystream.md.>"]
OUT_SUBJECTS = [
    "polystream.bar.>",
    "polystream.alert.>",
    "polystream.book.>",
    "polystream.status.>",
]
CLOCK = "polystream.md.clock"
RUN = "polystream.md.run"
DEFAULT_PARTITIONS = 16

# headers
SEQ = "Polystream-Seq"  # the batch's number, 1, 2, … over the life of the stream
RECEIVED = "Polystream-Received"  # receipt time of the batch's last frame (epoch ms)
NOW = "Polystream-Now"  # ingest's wall clock (epoch ms), live only: moves the watermark
FRAMES = "Polystream-Frames"  # frames in the batch
PARTS = "Polystream-Parts"  # partitions with a message in the batch, comma-separated
END = "Polystream-End"  # "1": a finite source ended; every open bar is final
COUNT = "Polystream-Count"  # results: records published on this subject so far

_BOOKS = msgspec.msgpack.Encoder()
_BOOKS_IN = msgspec.msgpack.Decoder(list[tuple[str, Book]])
_PART = msgspec.msgpack.Decoder(dict[str, bytes])
_PACK = msgspec.msgpack.Encoder()
CLOCK_SCHEMA: Schema = {"time": pl.Int64, "received": pl.Int64, "part": pl.Int16}


class Run(msgspec.Struct, frozen=True):
    """What ingest publishes once on `polystream.md.run`, for the shards: the symbols (none:
    every symbol of the feed), the number of partitions, and whether the source is live (a
    replay's end makes bars final)."""

    symbols: tuple[str, ...]
    partitions: int
    live: bool
    started: int  # epoch ms


def partition(symbol: str, partitions: int) -> int:
    """The partition of a symbol: stable across processes, machines and Python versions."""
    return zlib.crc32(symbol.encode()) % partitions


def md_subject(part: int) -> str:
    return f"polystream.md.{part}"


def _ipc(frame: pl.DataFrame) -> bytes:
    # the stream format: a live batch of a few rows is 15 µs each way, the file format 0.3 ms
    out = io.BytesIO()
    frame.write_ipc_stream(out, compression="uncompressed")
    return out.getvalue()


def _frame(data: bytes) -> pl.DataFrame:
    return pl.read_ipc_stream(io.BytesIO(data))


def split(batch: Batch, partitions: int) -> tuple[dict[int, bytes], pl.DataFrame]:
    """A batch as one message body per partition with events, and its clock: every trade's
    time, receipt time and partition, in arrival order. Each partition's trades carry their
    row number in the clock (`n`) so that a shard can put them back in place."""
    parts_of = {s: partition(s, partitions) for s in _symbols(batch)}
    single = len(set(parts_of.values())) == 1

    def tagged(frame: pl.DataFrame) -> pl.DataFrame:
        part = pl.col("symbol").replace_strict(parts_of, default=0, return_dtype=pl.Int16)
        return frame.with_columns(part.alias("part"))

    def by_part(frame: pl.DataFrame) -> dict[int, pl.DataFrame]:
        if not frame.height:
            return {}
        if single:
            return {parts_of[frame["symbol"][0]]: frame.drop("part", strict=False)}
        if "part" not in frame.columns:
            frame = tagged(frame)
        split = frame.partition_by("part", as_dict=True, include_key=False)
        return {int(key[0]): rows for key, rows in split.items()}

    trades = batch.trades.with_row_index("n")
    if single and trades.height:
        only = pl.lit(next(iter(parts_of.values())), pl.Int16)
        trades = trades.with_columns(only.alias("part"))
    else:
        trades = tagged(trades)
    clock = trades.select("time", "received", "part")
    bodies: dict[int, dict[str, bytes]] = {}
    for kind, frame in (("t", trades), ("q", batch.quotes), ("a", batch.aggregates)):
        for part, rows in by_part(frame).items():
            bodies.setdefault(part, {})[kind] = _ipc(rows)
    books: dict[int, list[tuple[str, Book]]] = {}
    for symbol, book in batch.books:
        books.setdefault(parts_of[symbol], []).append((symbol, book))
    for part, items in books.items():
        bodies.setdefault(part, {})["b"] = _BOOKS.encode(items)
    return {p: _PACK.encode(b) for p, b in sorted(bodies.items())}, clock


def _symbols(batch: Batch) -> list[str]:
    names: set[str] = set()
    for frame in (batch.trades, batch.quotes, batch.aggregates):
        if frame.height:
            names.update(frame["symbol"].unique().to_list())
    names.update(s for s, _ in batch.books)
    return sorted(names)


def clock_body(clock: pl.DataFrame) -> bytes:
    return _ipc(clock) if clock.height else b""


def read_clock(body: bytes) -> pl.DataFrame:
    return _frame(body) if body else empty(CLOCK_SCHEMA)


def join(bodies: Sequence[bytes], clock: pl.DataFrame, owned: set[int], received: int) -> tuple[
    Batch, pl.DataFrame
]:
    """A shard's share of a batch from its partitions' message bodies, and the trades its bar
    engine gets: its own in full, the others' as clock rows without a symbol, in arrival
    order."""
    parts = [_PART.decode(b) for b in bodies]

    def frames(kind: str, schema: Schema) -> pl.DataFrame:
        found = [_frame(p[kind]) for p in parts if kind in p]
        if not found:
            return empty(schema)
        return found[0] if len(found) == 1 else pl.concat(found)

    numbered: Schema = {"n": pl.UInt32, **TRADE}
    trades = frames("t", numbered)
    if len(parts) > 1:
        trades = trades.sort("n")
    books = [item for p in parts if "b" in p for item in _BOOKS_IN.decode(p["b"])]
    batch = Batch(
        trades.drop("n"), frames("q", QUOTE), frames("a", AGGREGATE), books, received
    )
    if clock.height == trades.height:  # nothing of other shards in this batch
        return batch, batch.trades
    others = (
        clock.with_row_index("n")
        .filter(~pl.col("part").is_in(sorted(owned)))
        .select("n", "time", "received")
    )
    merged = pl.concat([trades, others], how="diagonal").sort("n").drop("n")
    return batch, merged.select(list(TRADE))
