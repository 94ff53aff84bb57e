"""One definition of every record schema and of the trade side: no other module spells out a
record's columns, and every place that reads a trade's side reads it the same way."""

from __future__ import annotations

import ast
from pathlib import Path

import msgspec
import polars as pl
import pytest

import polystream
from polystream import schema
from polystream.batch import Batcher
from polystream.events import Trade
from polystream.rest import _trade_frame
from polystream.source import Frame

PACKAGE = Path(polystream.__file__).parent
RECORDS = {
    "TRADE": schema.TRADE,
    "QUOTE": schema.QUOTE,
    "AGGREGATE": schema.AGGREGATE,
    "BOOK": schema.BOOK,
    "BAR": schema.BAR,
    "ALERT": schema.ALERT,
}
# Literals that name several columns of a record on purpose, and why.
ALLOWED = {
    # the bar engine's own state: volumes as exact integers, first and last event times
    ("window.py", "STATE_SCHEMA"),
}
SHARED = {"symbol", "time", "start", "end", "received", "exchange"}  # too common to tell


def _is_dtype(node: ast.expr | None) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and (node.value.id == "pl")
    )


def _literal_names(node: ast.AST) -> list[str]:
    """The column names a literal spells out: a list, tuple or set of strings only, or a dict
    of polars dtypes (its keys). Code that builds columns by name is not a definition."""
    if isinstance(node, ast.List | ast.Tuple | ast.Set):
        items: list[ast.expr | None] = list(node.elts)
    elif isinstance(node, ast.Dict) and node.values and all(map(_is_dtype, node.values)):
        items = list(node.keys)
    else:
        return []
    names = [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]
    return names if len(names) == len(items) else []


def _owner(tree: ast.Module, target: ast.AST) -> str:
    """The name a module-level assignment gives the literal (or '')."""
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign | ast.AnnAssign) and any(
            n is target for n in ast.walk(stmt)
        ):
            names = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            return next((n.id for n in names if isinstance(n, ast.Name)), "")
    return ""


def test_no_module_spells_out_a_record_schema_again() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "schema.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = set(_literal_names(node)) - SHARED
            for record, columns in RECORDS.items():
                own = set(columns) - SHARED
                if len(names & own) >= 4 and (path.name, _owner(tree, node)) not in ALLOWED:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} repeats {record}")
    assert not found, "\n".join(found)


def test_the_scan_finds_a_repeated_schema(tmp_path: Path) -> None:
    """The scan above can fail: a bar column list written out is caught."""
    tree = ast.parse('COLUMNS = ("open", "high", "low", "close", "volume")')
    literal = tree.body[0].value  # type: ignore[attr-defined]
    assert len(set(_literal_names(literal)) & set(schema.BAR)) == 5
    assert _owner(tree, literal) == "COLUMNS"
    typed = ast.parse(
        'S = {"bid": pl.Float64, "ask": pl.Float64, "bid_size": pl.Float64, "x": pl.Int8}'
    )
    assert len(set(_literal_names(typed.body[0].value)) & set(schema.QUOTE)) == 3  # type: ignore[attr-defined]


SIDES = [
    ([2], schema.SIDE_BUY),
    ([1], schema.SIDE_SELL),
    ([1, 2], schema.SIDE_SELL),
    ([2, 1], schema.SIDE_BUY),
    ([0, 2], schema.SIDE_BUY),
    ([37, 1], schema.SIDE_SELL),
    ([], schema.SIDE_UNKNOWN),
    ([0], schema.SIDE_UNKNOWN),
    ([3, 4], schema.SIDE_UNKNOWN),
]


@pytest.mark.parametrize(("conditions", "side"), SIDES)
def test_every_reader_of_the_trade_side_agrees(conditions: list[int], side: int) -> None:
    assert schema.trade_side(conditions) == side
    trade = {"ev": "XT", "pair": "BTC-USD", "p": 1.0, "t": 5, "s": 1.0, "c": conditions}
    # the decoded event
    assert msgspec.json.decode(msgspec.json.encode(trade), type=Trade).side == side
    # the columns built from a feed frame
    frame = Frame(5, msgspec.json.encode([trade]))
    assert Batcher(["X:BTCUSD"]).build([frame]).trades["side"].to_list() == [side]
    # a REST trades page
    rest = {"conditions": conditions, "price": 1.0, "size": 1.0, "participant_timestamp": 5}
    assert _trade_frame("X:BTCUSD", [rest])["side"].to_list() == [side]


def test_records_have_the_schema_columns() -> None:
    assert schema.bar_columns(["rsi_14"]) == [*schema.BAR, "rsi_14", "flow_imbalance"]
    alert = schema.Alert("f", "X:BTCUSD", "1m", 5, "info", "m", {"rsi_14": 1.0})
    assert list(alert.record()) == ["type", *schema.ALERT]
    rows = schema.alert_rows([alert])
    assert rows.schema == pl.Schema(schema.ALERT)
    assert rows["values"].to_list() == ['{"rsi_14":1.0}']
    gaps = schema.gap_rows([schema.Gap("X:BTCUSD", 1, 2)])
    assert gaps.schema == pl.Schema(schema.GAP) and gaps.row(0) == ("X:BTCUSD", 1, 2)
