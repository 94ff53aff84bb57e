"""The `when` expression language of filter files (DESIGN §5): text → checked tree → polars.

A hand-written tokenizer and recursive-descent parser accept only numbers, strings, the fields
of the filter's row kind, the whitelisted functions, `+ - * /`, comparisons, `and or not` and
parentheses; nothing is ever evaluated as Python. `compile_expression` type-checks the tree and
builds one boolean polars expression (a comparison with null is false) plus the named values an
alert shows. Problems carry offsets into the text; `spec` turns them into file positions.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import get_args

import msgspec
import polars as pl

from ..errors import SymbolError
from ..indicators import IndicatorParams
from ..schema import BAR_FIELDS, SIDE_BUY, SIDE_SELL, SIDE_UNKNOWN, RowKind
from ..symbols import normalize

MAX_LENGTH = 2_000
MAX_DEPTH = 24
MAX_TOKENS = 400
MAX_PERIOD = 1_000
MAX_COST = 2_000
# An EMA's seed weighs (1 − α)^n after n more rows: 40 periods put it below 1e-17.
EMA_MEMORY = 40
# Explicit window sums keep results independent of batch cuts; past this, a rolling sum.
EXPLICIT_SUM = 64

KINDS: tuple[RowKind, ...] = get_args(RowKind)
NUM, BOOL = "number", "true/false"
SIDES = {"buy": SIDE_BUY, "sell": SIDE_SELL, "unknown": SIDE_UNKNOWN}


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    """` (did you mean X?)` for the closest known name, transposed letters included."""
    names = list(known)
    close = [k for k in names if k.startswith(name[:3])] if len(name) >= 3 else []
    close += difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class Problem(Exception):
    """One thing wrong with an expression, at character offset `at` of its text."""

    def __init__(self, at: int, message: str) -> None:
        super().__init__(message)
        self.at = at
        self.message = message


# -- tokens ------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    |(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<string>"[^"\\\n]*"|'[^'\\\n]*')
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<op><=|>=|==|!=|[-+*/(),<>])
    """,
    re.VERBOSE,
)
_HINTS = {
    "=": "expected '==' to compare for equality",
    "&": "expected 'and'",
    "|": "expected 'or'",
    "!": "expected 'not' or '!='",
    ".": "attribute access is not allowed; expected an operator",
    "[": "indexing is not allowed",
    "]": "indexing is not allowed",
    "%": "expected one of + - * /",
    "^": "expected one of + - * / (there is no power operator)",
    "'": "a string is not closed; expected a closing quote on the same line",
    '"': "a string is not closed; expected a closing quote on the same line",
}
_KEYWORDS = {"and", "or", "not", "true", "false"}


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # number, string, name, op, end
    text: str
    at: int


def tokenize(text: str) -> list[Token]:
    if len(text) > MAX_LENGTH:
        raise Problem(MAX_LENGTH, f"the expression is longer than {MAX_LENGTH} characters")
    tokens: list[Token] = []
    at = 0
    while at < len(text):
        m = _TOKEN.match(text, at)
        if m is None:
            ch = text[at]
            hint = _HINTS.get(ch, "expected a number, a name, an operator or a parenthesis")
            raise Problem(at, f"unexpected {ch!r}: {hint}")
        kind = m.lastgroup or "space"
        if kind != "space":
            if len(tokens) >= MAX_TOKENS:
                raise Problem(at, f"the expression has more than {MAX_TOKENS} tokens")
            tokens.append(Token(kind, m.group(), at))
        at = m.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


# -- the tree ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Num:
    at: int
    value: float
    text: str


@dataclass(frozen=True, slots=True)
class Str:
    at: int
    value: str


@dataclass(frozen=True, slots=True)
class Bool:
    at: int
    value: bool


@dataclass(frozen=True, slots=True)
class Name:
    at: int
    name: str


@dataclass(frozen=True, slots=True)
class Call:
    at: int
    name: str
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Unary:
    at: int
    op: str
    operand: Node


@dataclass(frozen=True, slots=True)
class Binary:
    at: int
    op: str
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Compare:
    at: int
    ops: tuple[str, ...]
    operands: tuple[Node, ...]


Node = Num | Str | Bool | Name | Call | Unary | Binary | Compare
_COMPARE = ("<", "<=", ">", ">=", "==", "!=")


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, text: str, what: str) -> Token:
        if self.tok.text != text or self.tok.kind not in ("op", "name"):
            raise Problem(self.tok.at, f"expected {what}, found {_describe(self.tok)}")
        return self.take()

    def deeper(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise Problem(self.tok.at, f"the expression nests deeper than {MAX_DEPTH} levels")

    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise Problem(0, "the expression is empty; expected a condition such as rsi(14) < 30")
        node = self.disjunction()
        if self.tok.kind != "end":
            raise Problem(
                self.tok.at, f"expected an operator or the end, found {_describe(self.tok)}"
            )
        return node

    def disjunction(self) -> Node:
        node = self.conjunction()
        while self.tok.kind == "name" and self.tok.text == "or":
            at = self.take().at
            node = Binary(at, "or", node, self.conjunction())
        return node

    def conjunction(self) -> Node:
        node = self.negation()
        while self.tok.kind == "name" and self.tok.text == "and":
            at = self.take().at
            node = Binary(at, "and", node, self.negation())
        return node

    def negation(self) -> Node:
        if self.tok.kind == "name" and self.tok.text == "not":
            at = self.take().at
            self.deeper()
            node = Unary(at, "not", self.negation())
            self.depth -= 1
            return node
        return self.comparison()

    def comparison(self) -> Node:
        first = self.sum()
        ops: list[str] = []
        operands = [first]
        while self.tok.kind == "op" and self.tok.text in _COMPARE:
            ops.append(self.take().text)
            operands.append(self.sum())
        if not ops:
            return first
        return Compare(_start(first), tuple(ops), tuple(operands))

    def sum(self) -> Node:
        node = self.product()
        while self.tok.kind == "op" and self.tok.text in "+-":
            tok = self.take()
            node = Binary(tok.at, tok.text, node, self.product())
        return node

    def product(self) -> Node:
        node = self.unary()
        while self.tok.kind == "op" and self.tok.text in "*/":
            tok = self.take()
            node = Binary(tok.at, tok.text, node, self.unary())
        return node

    def unary(self) -> Node:
        if self.tok.kind == "op" and self.tok.text in "+-":
            tok = self.take()
            self.deeper()
            operand = self.unary()
            self.depth -= 1
            return operand if tok.text == "+" else Unary(tok.at, "-", operand)
        return self.atom()

    def atom(self) -> Node:
        tok = self.tok
        if tok.kind == "number":
            self.take()
            value = float(tok.text)
            if not math.isfinite(value):
                raise Problem(tok.at, f"the number {tok.text} is too large")
            return Num(tok.at, value, tok.text)
        if tok.kind == "string":
            self.take()
            return Str(tok.at, tok.text[1:-1])
        if tok.kind == "op" and tok.text == "(":
            self.take()
            self.deeper()
            node = self.disjunction()
            self.depth -= 1
            self.expect(")", "')' to close the parenthesis")
            return node
        if tok.kind == "name":
            if "__" in tok.text:
                raise Problem(tok.at, f"names with double underscores ({tok.text}) are not allowed")
            if tok.text in ("and", "or", "not"):
                raise Problem(tok.at, f"expected a value before '{tok.text}'")
            self.take()
            if tok.text in ("true", "false"):
                return Bool(tok.at, tok.text == "true")
            if self.tok.kind == "op" and self.tok.text == "(":
                self.take()
                self.deeper()
                args: list[Node] = []
                if not (self.tok.kind == "op" and self.tok.text == ")"):
                    args.append(self.disjunction())
                    while self.tok.kind == "op" and self.tok.text == ",":
                        self.take()
                        args.append(self.disjunction())
                self.depth -= 1
                self.expect(")", "',' or ')' to close the argument list")
                return Call(tok.at, tok.text, tuple(args))
            return Name(tok.at, tok.text)
        raise Problem(tok.at, f"expected a number, a name or '(', found {_describe(tok)}")


def _describe(tok: Token) -> str:
    return "the end of the expression" if tok.kind == "end" else repr(tok.text)


def _start(node: Node) -> int:
    """Offset where a node's text begins (a binary node's `at` is its operator)."""
    while isinstance(node, Binary):
        node = node.left
    if isinstance(node, Compare):
        return _start(node.operands[0])
    return node.at


def parse(text: str) -> Node:
    """The tree of `text`, or a `Problem` at the first syntax error."""
    return _Parser(text).parse()


# -- what each row kind offers -----------------------------------------------------------------

SYMBOL, SIDE = "symbol", "side"  # the two string-valued fields


def _f64(name: str) -> pl.Expr:
    return pl.col(name).cast(pl.Float64)


def _safe_div(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    # division by zero gives null, so it compares false, rather than ±inf or NaN (which polars
    # orders above every number)
    # (no `.otherwise(None)`: polars 2.1 takes `lit < when(..).otherwise(None)` for a scalar)
    return pl.when(b != 0).then(a / b)


FIELDS: dict[str, dict[str, pl.Expr]] = {
    "bar": {**{n: _f64(n) for n in BAR_FIELDS}, SYMBOL: pl.col("symbol")},
    "trade": {
        "price": _f64("price"),
        "size": _f64("size"),
        SIDE: pl.col("side"),
        "exchange": _f64("exchange"),
        SYMBOL: pl.col("symbol"),
    },
    "quote": {
        "bid": _f64("bid"),
        "ask": _f64("ask"),
        "bid_size": _f64("bid_size"),
        "ask_size": _f64("ask_size"),
        "spread": _f64("ask") - _f64("bid"),
        "mid": (_f64("ask") + _f64("bid")) * 0.5,
        SYMBOL: pl.col("symbol"),
    },
}
# What `sma(20)` and friends average when no series is named.
DEFAULT_SERIES = {"bar": "close", "trade": "price", "quote": "mid"}

# name → (indicator parameter fields, the IndicatorParams column it reads)
INDICATORS: dict[str, tuple[tuple[str, ...], str]] = {
    "rsi": (("rsi",), "rsi_{rsi}"),
    "stoch_k": (("stoch_k", "stoch_slow_k", "stoch_d"), "stoch_k"),
    "stoch_d": (("stoch_k", "stoch_slow_k", "stoch_d"), "stoch_d"),
    "macd": (("macd_fast", "macd_slow", "macd_signal"), "macd"),
    "macd_signal": (("macd_fast", "macd_slow", "macd_signal"), "macd_signal"),
    "macd_hist": (("macd_fast", "macd_slow", "macd_signal"), "macd_hist"),
    "ao": (("ao_fast", "ao_slow"), "ao"),
    "cci": (("cci",), "cci_{cci}"),
    "bb_upper": (("bb", "bb_k"), "bb_upper"),
    "bb_middle": (("bb",), "bb_middle"),
    "bb_lower": (("bb", "bb_k"), "bb_lower"),
    "bb_percent": (("bb", "bb_k"), "bb_percent"),
}
SERIES_FUNCTIONS = (
    "sma",
    "ema",
    "prev",
    "change",
    "pct_change",
    "highest",
    "lowest",
    "crosses_above",
    "crosses_below",
    "abs",
    "min",
    "max",
    "imbalance",
)
FUNCTIONS = (*INDICATORS, *SERIES_FUNCTIONS)


@dataclass(frozen=True)
class Derived:
    """An indicator column the evaluator adds because its parameters differ from the run's:
    `column` of an `IndicatorParams` with the parameter values in `needs`."""

    name: str
    column: str
    needs: tuple[tuple[str, int | float], ...]


@dataclass(frozen=True)
class Compiled:
    """A checked expression, ready to evaluate over a frame of rows of its kind."""

    condition: pl.Expr  # boolean, never null
    # what an alert shows, in order of appearance, and whether each looks back over rows
    values: tuple[tuple[str, pl.Expr, bool], ...]
    derived: tuple[Derived, ...]
    lookback: int  # earlier rows per symbol the condition reads
    columns: tuple[str, ...]  # engine indicator columns it reads
    divisors: frozenset[int]  # window lengths whose divisor columns it reads (`_mean`)


@dataclass
class _Value:
    kind: str  # NUM, BOOL, SYMBOL or SIDE
    expr: pl.Expr
    lookback: int = 0
    windowed: bool = False
    name: str | None = None
    literal: float | str | None = None
    constant: bool = False  # no column in it: the same on every row, before and after
    cost: int = 1  # column reads when evaluated: nested windows multiply it


@dataclass
class _Compiler:
    kind: str
    params: IndicatorParams
    problems: list[Problem] = field(default_factory=list)
    values: dict[str, tuple[pl.Expr, bool]] = field(default_factory=dict)
    derived: dict[str, Derived] = field(default_factory=dict)
    columns: set[str] = field(default_factory=set)
    divisors: set[int] = field(default_factory=set)
    too_costly: bool = False

    def fail(self, at: int, message: str) -> None:
        self.problems.append(Problem(at, message))

    def name_value(self, name: str, value: _Value) -> None:
        value.name = name
        if value.kind == NUM and name not in self.values:
            self.values[name] = (value.expr, value.windowed)

    # -- nodes ---------------------------------------------------------------------------------

    def visit(self, node: Node) -> _Value | None:
        value = self._visit(node)
        if value is not None and value.cost > MAX_COST:
            if not self.too_costly:
                self.fail(
                    _start(node),
                    f"this part reads columns more than {MAX_COST:,} times (nested windows "
                    "multiply the work); expected a simpler expression",
                )
            self.too_costly = True
            return None
        return value

    def _visit(self, node: Node) -> _Value | None:
        if isinstance(node, Num):
            return _Value(NUM, pl.lit(node.value, pl.Float64), literal=node.value, constant=True)
        if isinstance(node, Bool):
            return _Value(BOOL, pl.lit(node.value), constant=True)
        if isinstance(node, Str):
            return _Value("string", pl.lit(node.value), literal=node.value, constant=True)
        if isinstance(node, Name):
            return self.field(node)
        if isinstance(node, Call):
            return self.call(node)
        if isinstance(node, Unary):
            inner = self.visit(node.operand)
            if inner is None:
                return None
            if node.op == "not":
                if not self.want(inner, BOOL, node.operand, "after 'not'"):
                    return None
                return _Value(
                    BOOL,
                    ~inner.expr,
                    inner.lookback,
                    inner.windowed,
                    constant=inner.constant,
                    cost=inner.cost + 1,
                )
            if not self.want(inner, NUM, node.operand, "after '-'"):
                return None
            literal = -inner.literal if isinstance(inner.literal, float) else None
            return _Value(
                NUM,
                -inner.expr,
                inner.lookback,
                inner.windowed,
                literal=literal,
                constant=inner.constant,
                cost=inner.cost + 1,
            )
        if isinstance(node, Binary):
            return self.binary(node)
        return self.compare(node)

    def want(self, value: _Value, kind: str, node: Node, where: str) -> bool:
        if value.kind == kind:
            return True
        shown = "text" if value.kind in ("string", SYMBOL, SIDE) else value.kind
        self.fail(_start(node), f"expected a {kind} {where}, found {shown}")
        return False

    def field(self, node: Name) -> _Value | None:
        fields = FIELDS[self.kind]
        if node.name in fields:
            kind = node.name if node.name in (SYMBOL, SIDE) else NUM
            value = _Value(kind, fields[node.name])
            self.name_value(node.name, value)
            return value
        if node.name in FUNCTIONS:
            self.fail(node.at, f"{node.name} is a function; expected {node.name}(...)")
        elif node.name in _KEYWORDS:
            self.fail(node.at, f"expected a value, found {node.name!r}")
        else:
            self.fail(
                node.at,
                f"unknown field {node.name!r}{_did_you_mean(node.name, fields)}; "
                f"{self.kind} fields are " + ", ".join(fields),
            )
        return None

    def binary(self, node: Binary) -> _Value | None:
        left, right = self.visit(node.left), self.visit(node.right)
        if left is None or right is None:
            return None
        want = BOOL if node.op in ("and", "or") else NUM
        where = f"on each side of '{node.op}'"
        ok = self.want(left, want, node.left, where) & self.want(right, want, node.right, where)
        if not ok:
            return None
        a, b = left.expr, right.expr
        if node.op == "and":
            expr = a & b
        elif node.op == "or":
            expr = a | b
        elif node.op == "+":
            expr = a + b
        elif node.op == "-":
            expr = a - b
        elif node.op == "*":
            expr = a * b
        else:
            if right.literal == 0.0:
                self.fail(_start(node.right), "division by zero; expected a non-zero divisor")
                return None
            expr = _safe_div(a, b)
        return _Value(
            want,
            expr,
            max(left.lookback, right.lookback),
            left.windowed or right.windowed,
            constant=left.constant and right.constant,
            cost=left.cost + right.cost + 1,
        )

    def compare(self, node: Compare) -> _Value | None:
        operands = [self.visit(n) for n in node.operands]
        if any(v is None for v in operands):
            return None
        values: list[_Value] = operands  # type: ignore[assignment]
        parts: list[pl.Expr] = []
        for i, op in enumerate(node.ops):
            a, b = values[i], values[i + 1]
            text_kinds = ("string", SYMBOL, SIDE)
            if a.kind in text_kinds or b.kind in text_kinds:
                part = self.compare_text(op, a, b, node.operands[i], node.operands[i + 1])
            else:
                where = f"on each side of '{op}'"
                ok = self.want(a, NUM, node.operands[i], where) & self.want(
                    b, NUM, node.operands[i + 1], where
                )
                part = _COMPARISONS[op](a.expr, b.expr) if ok else None
            if part is None:
                return None
            parts.append(part)
        expr = parts[0]
        for part in parts[1:]:
            expr = expr & part
        return _Value(
            BOOL,
            expr.fill_null(False),
            max(v.lookback for v in values),
            any(v.windowed for v in values),
            cost=sum(v.cost for v in values) + 1,
        )

    def compare_text(self, op: str, a: _Value, b: _Value, na: Node, nb: Node) -> pl.Expr | None:
        """`side == "buy"`, `symbol != "X:ETHUSD"`: a text field against a string."""
        if op not in ("==", "!="):
            self.fail(_start(na), f"text can only be compared with == or !=, not {op!r}")
            return None
        fld, lit, lit_node = (a, b, nb) if a.kind in (SYMBOL, SIDE) else (b, a, na)
        if fld.kind not in (SYMBOL, SIDE) or lit.kind != "string":
            self.fail(_start(na), "expected a text field (symbol or side) compared with a string")
            return None
        text = str(lit.literal)
        if fld.kind == SIDE:
            if text not in SIDES:
                self.fail(_start(lit_node), f"unknown side {text!r}; expected buy, sell or unknown")
                return None
            rhs: pl.Expr = pl.lit(SIDES[text], pl.Int8)
        else:
            try:
                rhs = pl.lit(normalize(text))
            except SymbolError as exc:
                self.fail(_start(lit_node), str(exc).rstrip("."))
                return None
        return fld.expr == rhs if op == "==" else fld.expr != rhs

    # -- functions -----------------------------------------------------------------------------

    def call(self, node: Call) -> _Value | None:
        if node.name in INDICATORS:
            return self.indicator(node)
        if node.name in SERIES_FUNCTIONS:
            return self.series_call(node)
        hint = _did_you_mean(node.name, FUNCTIONS)
        self.fail(
            node.at,
            f"unknown function {node.name!r}{hint}; expected one of " + ", ".join(FUNCTIONS),
        )
        return None

    def constant(self, node: Node, what: str, integer: bool, low: float, high: float) -> float:
        """A literal argument such as a period; reports and returns NaN when it is not one."""
        value = node.value if isinstance(node, Num) else None
        if (
            value is None
            or (integer and value != int(value))
            or not low <= value <= high
            or (integer and "." in getattr(node, "text", ""))
        ):
            kind = "a whole number" if integer else "a number"
            self.fail(_start(node), f"expected {what}: {kind} from {low:g} to {high:g}")
            return math.nan
        return value

    def indicator(self, node: Call) -> _Value | None:
        if self.kind != "bar":
            self.fail(node.at, f"{node.name}() works on bars; this filter runs on {self.kind}s")
            return None
        fields, template = INDICATORS[node.name]
        if len(node.args) > len(fields):
            self.fail(
                _start(node.args[len(fields)]),
                f"{node.name}() takes at most {len(fields)} argument"
                f"{'s' if len(fields) > 1 else ''} ({', '.join(fields)})",
            )
            return None
        overrides: dict[str, float | int] = {}
        for arg, name in zip(node.args, fields, strict=False):
            if name == "bb_k":
                overrides[name] = self.constant(arg, "a band width in deviations", False, 0.01, 10)
            else:
                low = 2 if name in ("rsi", "macd_fast") else 1
                period = self.constant(arg, f"the {name} period", True, low, MAX_PERIOD)
                if math.isnan(period):
                    return None
                overrides[name] = int(period)
        if any(isinstance(v, float) and math.isnan(v) for v in overrides.values()):
            return None
        mine = self.params
        custom: dict[str, object] = {k: v for k, v in overrides.items() if getattr(mine, k) != v}
        params = msgspec.structs.replace(mine, **custom)
        column = template.format(**{f: getattr(params, f) for f in fields})
        if not custom:
            name = column
            self.columns.update(("bb_upper", "bb_lower") if node.name == "bb_percent" else (name,))
            expr = self.engine_column(node.name, column)
        else:
            suffix = "_".join(_token(getattr(params, f)) for f in fields)
            name = f"{node.name}_{suffix}"
            needs = tuple((f, getattr(params, f)) for f in fields)
            if node.name == "bb_percent":
                for part in ("bb_upper", "bb_lower"):
                    self.derived[f"{part}_{suffix}"] = Derived(f"{part}_{suffix}", part, needs)
                expr = _bb_percent(pl.col(f"bb_upper_{suffix}"), pl.col(f"bb_lower_{suffix}"))
            else:
                self.derived[name] = Derived(name, column, needs)
                expr = pl.col(name)
        value = _Value(NUM, expr)
        self.name_value(name, value)
        return value

    def engine_column(self, function: str, column: str) -> pl.Expr:
        if function == "bb_percent":
            return _bb_percent(pl.col("bb_upper"), pl.col("bb_lower"))
        return pl.col(column)

    def series_call(self, node: Call) -> _Value | None:
        name, args = node.name, node.args
        spec = _SIGNATURES[name]
        low, high = spec
        if not low <= len(args) <= high:
            count = f"{low}" if low == high else f"{low} to {high}"
            self.fail(node.at, f"{name}() takes {count} arguments, found {len(args)}")
            return None
        if name == "imbalance":
            return self.imbalance(node)
        if name in ("abs", "min", "max"):
            vals = [self.visit(a) for a in args]
            if any(v is None for v in vals):
                return None
            ok = all(
                [self.want(v, NUM, a, f"in {name}()") for v, a in zip(vals, args, strict=True)]  # type: ignore[arg-type]
            )
            if not ok:
                return None
            got: list[_Value] = vals  # type: ignore[assignment]
            exprs = [v.expr for v in got]
            if name == "abs":
                expr = exprs[0].abs()
            else:
                combine = pl.min_horizontal if name == "min" else pl.max_horizontal
                # null when any argument is null, like every other operation
                expr = pl.when(pl.all_horizontal([e.is_not_null() for e in exprs])).then(
                    combine(exprs)
                )
            return _Value(
                NUM,
                expr,
                max(v.lookback for v in got),
                any(v.windowed for v in got),
                cost=got[0].cost + 1 if name == "abs" else 2 * sum(v.cost for v in got) + 1,
            )
        if name in ("crosses_above", "crosses_below"):
            a, b = self.visit(args[0]), self.visit(args[1])
            if a is None or b is None:
                return None
            where = f"in {name}()"
            if not (self.want(a, NUM, args[0], where) & self.want(b, NUM, args[1], where)):
                return None
            now = a.expr > b.expr if name == "crosses_above" else a.expr < b.expr
            pa, pb = _earlier(a, 1), _earlier(b, 1)
            before = pa <= pb if name == "crosses_above" else pa >= pb
            return _Value(
                BOOL,
                (now & before).fill_null(False),
                max(a.lookback, b.lookback) + 1,
                True,
                cost=2 * (a.cost + b.cost) + 1,
            )
        # sma ema prev change pct_change highest lowest: (series[, n]) or, for sma/ema, (n)
        if name in ("sma", "ema") and len(args) == 1:
            series_node: Node = Name(node.at, DEFAULT_SERIES[self.kind])
            count_node: Node | None = args[0]
        else:
            series_node = args[0]
            count_node = args[1] if len(args) > 1 else None
        x = self.visit(series_node)
        if count_node is None:
            n = 1
        else:
            what = "the number of rows back" if name in _SHIFTS else "the window length"
            got_n = self.constant(count_node, what, True, 1, MAX_PERIOD)
            if math.isnan(got_n):
                return None
            n = int(got_n)
        if x is None or not self.want(x, NUM, series_node, f"as the series of {name}()"):
            return None
        base = x.name or "expr"
        default = name in ("sma", "ema") and base == DEFAULT_SERIES[self.kind]
        label = f"{name}_{n}" if default else f"{name}_{base}" + ("" if n == 1 else f"_{n}")
        if default and self.kind == "bar" and name == "ema":
            # the engine's streaming EMA of close: exact however long the run
            if n in self.params.ema:
                self.columns.add(label)
            else:
                self.derived[label] = Derived(label, label, (("ema", n),))
            value = _Value(NUM, pl.col(label))
        else:
            if name in ("sma", "ema") and _explicit(x, n):
                self.divisors.add(n)
            value = self._series(name, x, n)
        self.name_value(label, value)
        return value

    def _series(self, name: str, x: _Value, n: int) -> _Value:
        e = x.expr
        if x.constant and name in ("prev", "highest", "lowest", "sma", "ema"):
            return x  # a constant's past, mean or extreme is itself
        before = _earlier(x, n)
        c = x.cost
        mean_cost = c * n if _explicit(x, n) else c
        if name == "prev":
            return _Value(NUM, before, x.lookback + n, True, cost=c + 1)
        if name == "change":
            return _Value(NUM, e - before, x.lookback + n, True, cost=2 * c + 1)
        if name == "pct_change":
            pct = _safe_div(e - before, before) * 100.0
            return _Value(NUM, pct, x.lookback + n, True, cost=3 * c + 1)
        if name == "highest":
            return _Value(NUM, e.rolling_max(n), x.lookback + n - 1, True, cost=c + 1)
        if name == "lowest":
            return _Value(NUM, e.rolling_min(n), x.lookback + n - 1, True, cost=c + 1)
        explicit = _explicit(x, n)
        if name == "sma":
            return _Value(NUM, _mean(e, n, explicit), x.lookback + n - 1, True, cost=mean_cost + 1)
        memory = x.lookback + min(EMA_MEMORY * n, 20_000)
        return _Value(NUM, _ema(e, n, explicit), memory, True, cost=mean_cost + c + 2)

    def imbalance(self, node: Call) -> _Value | None:
        if self.kind == "bar":
            buy, sell = _f64("buy_volume"), _f64("sell_volume")
            expr = _safe_div(buy - sell, buy + sell)
        elif self.kind == "quote":
            bid, ask = _f64("bid_size"), _f64("ask_size")
            expr = _safe_div(bid - ask, bid + ask)
        else:
            self.fail(node.at, "imbalance() works on bars and quotes; this filter runs on trades")
            return None
        value = _Value(NUM, expr)
        self.name_value("imbalance", value)
        return value


_SHIFTS = ("prev", "change", "pct_change")
_SIGNATURES: dict[str, tuple[int, int]] = {
    "sma": (1, 2),
    "ema": (1, 2),
    "prev": (1, 2),
    "change": (1, 2),
    "pct_change": (1, 2),
    "highest": (2, 2),
    "lowest": (2, 2),
    "crosses_above": (2, 2),
    "crosses_below": (2, 2),
    "abs": (1, 1),
    "min": (2, 8),
    "max": (2, 8),
    "imbalance": (0, 0),
}
_COMPARISONS: dict[str, Callable[[pl.Expr, pl.Expr], pl.Expr]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


def _earlier(value: _Value, n: int) -> pl.Expr:
    """The value n rows back; a constant has no rows of its own to shift (it would be null)."""
    return value.expr if value.constant else value.expr.shift(n)


def _token(value: float) -> str:
    text = f"{value:g}"
    return text.replace(".", "p").replace("-", "m")


def _bb_percent(upper: pl.Expr, lower: pl.Expr) -> pl.Expr:
    return _safe_div(pl.col("close") - lower, upper - lower)


def divisor_column(n: int) -> str:
    return f"_n_{n}"


def _explicit(x: _Value, n: int) -> bool:
    """Whether a window over x is summed term by term: for a column (a field or an indicator)
    and a short window. Over a computed series every term would compute it again."""
    return x.cost == 1 and n <= EXPLICIT_SUM


def _mean(x: pl.Expr, n: int, explicit: bool) -> pl.Expr:
    """Mean of the last n values: null until the window is full. For a column the sum is
    written out, so it does not depend on where the frame starts, and the divisor is a column
    (see `divisor_column`) because polars turns a division by a literal into a multiplication
    by its reciprocal."""
    if not explicit:
        return x.rolling_mean(n)
    total = x.shift(n - 1)
    for k in range(n - 2, -1, -1):
        total = total + x.shift(k)
    return total / pl.col(divisor_column(n))


def _ema(x: pl.Expr, n: int, explicit: bool) -> pl.Expr:
    """TA-Lib's EMA over the rows at hand: seeded with the mean of the first n, then
    y = y' + α(x − y'). Rows are kept long enough (EMA_MEMORY periods) that the seed no longer
    shows."""
    row = pl.int_range(pl.len())
    seeded = pl.when(row == n - 1).then(_mean(x, n, explicit)).when(row >= n).then(x)
    smooth = seeded.ewm_mean(alpha=2 / (n + 1), adjust=False, ignore_nulls=True)
    return pl.when(row >= n - 1).then(smooth)


def compile_expression(
    text: str, kind: str, params: IndicatorParams | None = None
) -> tuple[Compiled | None, list[Problem]]:
    """Check `text` for rows of `kind` and build its polars expressions, or list every problem.

    `params` are the run's indicator parameters: calls with exactly those read the engine's
    columns; any other parameters become `Derived` columns for the evaluator to add.
    """
    try:
        tree = parse(text)
    except Problem as problem:
        return None, [problem]
    compiler = _Compiler(kind, params or IndicatorParams())
    value = compiler.visit(tree)
    if value is not None and value.kind != BOOL:
        compiler.fail(
            _start(tree), "the condition gives a number; expected a comparison such as rsi(14) < 30"
        )
    if compiler.problems or value is None:
        return None, compiler.problems
    # windows (shifts, rolling sums) look back within each symbol's own rows
    condition = value.expr.over("symbol") if value.windowed else value.expr
    values = tuple(
        (name, expr.over("symbol") if windowed else expr, windowed)
        for name, (expr, windowed) in compiler.values.items()
    )
    return (
        Compiled(
            condition,
            values,
            tuple(compiler.derived.values()),
            value.lookback,
            tuple(sorted(compiler.columns)),
            frozenset(compiler.divisors),
        ),
        [],
    )
