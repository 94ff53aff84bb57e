"""Filter files (DESIGN §5): YAML text → a checked `Filter`, or a `FilterError` listing every
problem with its file, line and column.

The YAML is only composed into nodes (no tags, no objects are constructed) and walked here, so
unknown or repeated keys, aliases and wrong types are reported at their position. The `when`
expression goes through `lang`; the message template may name only the row's values.
"""

from __future__ import annotations

import difflib
import json
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import msgspec
import yaml

from ..config import TIMEFRAMES, timeframe_name
from ..errors import ConfigError, PolystreamError, SymbolError
from ..indicators import IndicatorParams
from ..schema import RowKind, Severity
from ..symbols import normalize
from . import lang

MAX_FILE_BYTES = 64 * 1024
NAME = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
TRIGGERS = ("edge", "level")
SEVERITIES: tuple[Severity, ...] = get_args(Severity)
NOTIFIERS = ("console", "telegram")
# what `attach:` may ask to send with an alert: a chart of the bars around it (Telegram)
ATTACHMENTS = ("chart",)
KEYS = (
    "name",
    "description",
    "symbols",
    "on",
    "timeframe",
    "when",
    "trigger",
    "cooldown",
    "severity",
    "message",
    "notify",
    "attach",
)
# names every message may use besides the row's values
META = ("filter", "symbol", "timeframe", "time", "severity")
_TEXT_NAMES = ("symbol", "side", "filter", "severity", "timeframe", "time", "state")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, None: 1000}


@dataclass(frozen=True)
class Located:
    """One problem at a 1-based line and column of a file."""

    path: str
    line: int
    column: int
    message: str
    text: str  # the source line

    def render(self) -> str:
        # tabs stay tabs, so that the caret lines up wherever the terminal puts tab stops
        caret = "".join(c if c == "\t" else " " for c in self.text[: self.column - 1])
        caret = caret.ljust(self.column - 1) + "^"
        where = f"{self.path}:{self.line}:{self.column}: {self.message}"
        return f"{where}\n    {self.text}\n    {caret}" if self.text else where


class FilterError(PolystreamError):
    """A filter file (or command-line filter) is not valid; `problems` lists every problem."""

    def __init__(self, path: str, problems: list[Located]) -> None:
        self.path = path
        self.problems = sorted(problems, key=lambda p: (p.line, p.column))
        problems = self.problems
        more = len(problems) - 1
        first = problems[0].message if problems else "invalid"
        tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""
        super().__init__(f"{path} is not a valid filter: {first}{tail}.")

    @property
    def details(self) -> list[str]:
        return [p.render() for p in self.problems]


class Template(msgspec.Struct, frozen=True):
    """A message such as "{symbol} RSI {rsi_14:.1f}": literal text and (name, format) pairs."""

    parts: tuple[tuple[str, str | None, str], ...]  # (literal, name or None, format spec)

    @property
    def names(self) -> list[str]:
        return [name for _, name, _ in self.parts if name is not None]

    def render(self, values: dict[str, object]) -> str:
        out: list[str] = []
        for literal, name, spec in self.parts:
            out.append(literal)
            if name is None:
                continue
            value = values.get(name)
            if value is None or (isinstance(value, float) and value != value):
                out.append("n/a")
                continue
            try:
                out.append(format(value, spec))
            except (ValueError, TypeError):
                out.append(str(value))
        return "".join(out)


def parse_template(text: str) -> tuple[Template | None, list[tuple[int, str]]]:
    """The template, or (offset, problem) pairs: only plain names, no attributes, indexes or
    conversions, so rendering can never reach into an object."""
    parts: list[tuple[str, str | None, str]] = []
    try:
        pieces = list(string.Formatter().parse(text))
    except ValueError as exc:
        return None, [(0, f"the message is not a valid template: {exc}")]
    problems: list[tuple[int, str]] = []
    at = 0
    for literal, name, spec, conversion in pieces:
        at += len(literal) + literal.count("{") + literal.count("}")  # `{{` in the source
        if name is None:
            parts.append((literal, None, ""))
            continue
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name) or "__" in name:
            problems.append((at, f"{{{name}}} is not a plain value name; expected e.g. {{close}}"))
        elif conversion:
            problems.append((at, f"conversions such as !{conversion} are not allowed"))
        elif spec and "{" in spec:
            problems.append((at, "nested fields in a format are not allowed"))
        parts.append((literal, name, spec or ""))
        at += len(name) + len(spec or "") + 2 + (2 if conversion else 0) + (1 if spec else 0)
    return Template(tuple(parts)), problems


class Filter(msgspec.Struct, frozen=True):
    """One checked filter file. `symbols` empty means every watched symbol; `timeframe` None
    means the run's first timeframe."""

    name: str
    when: str
    on: RowKind = "bar"
    description: str = ""
    symbols: tuple[str, ...] = ()
    timeframe: int | None = None
    trigger: str = "edge"
    cooldown: int = 0  # ms
    severity: Severity = "warning"
    message: str = ""
    notify: tuple[str, ...] = ("console",)
    attach: str | None = None  # "chart": Telegram sends the alert with a chart of its bars
    path: str = ""
    source: str = ""

    @property
    def timeframe_name(self) -> str | None:
        return None if self.timeframe is None else timeframe_name(self.timeframe)

    def template(self) -> Template:
        text = self.message or "{filter}: " + self.when.replace("{", "{{").replace("}", "}}")
        template, _ = parse_template(text)
        assert template is not None
        return template

    def compile(self, params: IndicatorParams | None = None) -> lang.Compiled:
        compiled, problems = lang.compile_expression(self.when, self.on, params)
        if compiled is None:
            raise FilterError(
                self.path or self.name,
                [Located(self.path, 1, p.at + 1, p.message, "") for p in problems],
            )
        return compiled

    def to_yaml(self) -> str:
        """The filter as a file, with only the keys that differ from the defaults."""
        doc: dict[str, object] = {"name": self.name}
        if self.description:
            doc["description"] = self.description
        if self.symbols:
            doc["symbols"] = list(self.symbols)
        doc["on"] = self.on
        if self.timeframe is not None:
            doc["timeframe"] = timeframe_name(self.timeframe)
        doc["when"] = self.when
        doc["trigger"] = self.trigger
        if self.cooldown:
            doc["cooldown"] = _duration_text(self.cooldown)
        doc["severity"] = self.severity
        if self.message:
            doc["message"] = self.message
        doc["notify"] = list(self.notify)
        if self.attach is not None:
            doc["attach"] = self.attach
        return _emit(doc)


# characters YAML does not allow raw in a file, or reads as line breaks: written escaped
_UNPRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff]")


def _quote(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _emit(doc: dict[str, object]) -> str:
    """A filter document as YAML, one key per line, strings double-quoted (a JSON string is a
    valid YAML one) so that nothing in an expression or message is read as YAML syntax."""
    lines = []
    for key, value in doc.items():
        if isinstance(value, list):
            text = "[" + ", ".join(_quote(v) for v in value) + "]"
        elif isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", value):
            text = value
        else:
            text = _quote(value)
        lines.append(f"{key}: {text}")
    return "\n".join(lines) + "\n"


def _duration_text(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def template_names(kind: str, compiled: lang.Compiled | None, params: IndicatorParams) -> set[str]:
    """Every name a message for rows of `kind` may use."""
    names = set(META) | set(lang.FIELDS[kind])
    if kind == "bar":
        names |= {"start", "end", "state", "flow_imbalance", *params.columns}
    if compiled is not None:
        names |= {name for name, _, _ in compiled.values}
    return names


# -- reading files -----------------------------------------------------------------------------


class _Reader:
    """Walks the composed YAML of one file, collecting located problems."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text
        self.lines = text.splitlines()
        self.problems: list[Located] = []

    def at(self, index: int, message: str) -> None:
        line = self.text.count("\n", 0, index)
        start = self.text.rfind("\n", 0, index) + 1
        source = self.lines[line] if line < len(self.lines) else ""
        self.problems.append(Located(self.path, line + 1, index - start + 1, message, source))

    def node(self, node: yaml.Node, message: str) -> None:
        self.at(node.start_mark.index, message)

    def scalar(self, node: yaml.Node, what: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode):
            found = "list" if isinstance(node, yaml.SequenceNode) else "mapping"
            self.node(node, f"expected {what}, found a {found}")
            return None
        return str(node.value)

    def strings(self, node: yaml.Node, what: str) -> list[tuple[yaml.Node, str]] | None:
        """A list of scalars, or one scalar taken as a list of one."""
        if isinstance(node, yaml.ScalarNode):
            return [(node, str(node.value))]
        if isinstance(node, yaml.SequenceNode):
            out: list[tuple[yaml.Node, str]] = []
            for item in node.value:
                value = self.scalar(item, what)
                if value is not None:
                    out.append((item, value))
            return out
        self.node(node, f"expected {what}, found a mapping")
        return None

    def offsets(self, node: yaml.ScalarNode, value: str) -> list[int]:
        """Source index of each character of a scalar's value (quotes, folding and indentation
        make them differ); whitespace maps to where the search stands."""
        source, j, end = self.text, node.start_mark.index, node.end_mark.index
        out = []
        for ch in value:
            if ch.isspace():
                out.append(min(j, max(end - 1, 0)))
                continue
            k = source.find(ch, j, end)
            if k < 0:
                out.append(min(j, max(end - 1, 0)))
                continue
            out.append(k)
            j = k + 1
        return out

    def in_value(self, node: yaml.ScalarNode, value: str, offset: int, message: str) -> None:
        places = self.offsets(node, value)
        if not places:
            self.node(node, message)
        elif offset >= len(places):
            self.at(places[-1] + 1, message)
        else:
            self.at(places[offset], message)


# PyYAML's words for what it met or expected, as a user knows them
_YAML_WORDS = (
    ("found unexpected end of stream", "the file ends"),
    ("'<stream end>'", "the end of the file"),
    ("<block end>", "the end of the indented block"),
    ("'<block mapping start>'", "a more indented key"),
    ("found character '\\t' that cannot start any token", "found a tab; indent with spaces"),
    ("a flow sequence", "the [ list"),
    ("a flow mapping", "the { mapping"),
    ("a double-quoted scalar", "the quoted string"),
    ("a quoted scalar", "the quoted string"),
)
# hints for problems whose cause PyYAML does not name
_YAML_HINTS = {
    "mapping values are not allowed here": "quote a value that holds ': '",
    "the file ends": "expected the closing quote",
}


def yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's problem and context as one clause: what it met, in what construct and where
    that began, and what was expected."""
    problem = " ".join(str(exc.problem or "").split())
    context = " ".join(str(exc.context or "").split())
    for words, plain in _YAML_WORDS:
        problem, context = problem.replace(words, plain), context.replace(words, plain)
    begun = exc.context_mark
    if context.startswith("while") and begun is not None:
        problem += f" {context} that starts at line {begun.line + 1}, column {begun.column + 1}"
    elif context and not context.startswith("while"):
        problem = f"{context}, {problem}" if problem else context
    hint = next((h for p, h in _YAML_HINTS.items() if problem.startswith(p)), None)
    return "not valid YAML: " + problem + (f"; {hint}" if hint else "")


def parse_filter(
    text: str, path: str = "<filter>", params: IndicatorParams | None = None
) -> Filter:
    """The filter in `text`, or a `FilterError` with every problem found."""
    params = params or IndicatorParams()
    r = _Reader(path, text)
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        r.at(0, f"the file is larger than {MAX_FILE_BYTES // 1024} KiB; a filter is a few lines")
        raise FilterError(path, r.problems)
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            where = event.start_mark.index if event.start_mark is not None else 0
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                r.at(where, "anchors and aliases are not allowed in filter files")
            elif (tag := getattr(event, "tag", None)) and not (
                isinstance(event, yaml.ScalarEvent) and event.implicit[0]
            ):
                r.at(where, f"YAML tags such as {tag} are not allowed in filter files")
            elif isinstance(event, yaml.DocumentStartEvent) and event.tags:
                r.at(where, "YAML directives are not allowed in filter files")
        if r.problems:
            raise FilterError(path, r.problems)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.reader.ReaderError as exc:
        ch = exc.character if isinstance(exc.character, str) else chr(exc.character)
        r.at(exc.position, f"the character U+{ord(ch):04X} is not allowed in a YAML file")
        raise FilterError(path, r.problems) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        # a mark at the end of the stream lies past the last line: point after its last word
        r.at(min(mark.index, len(text.rstrip())) if mark else 0, yaml_problem(exc))
        raise FilterError(path, r.problems) from None
    except yaml.YAMLError as exc:
        r.at(0, "not valid YAML: " + " ".join(str(exc).split()))
        raise FilterError(path, r.problems) from None
    if root is None:
        r.at(0, "the file is empty; expected keys such as name: and when:")
        raise FilterError(path, r.problems)
    if not isinstance(root, yaml.MappingNode):
        r.node(root, "expected a mapping of keys such as name: and when:")
        raise FilterError(path, r.problems)

    found: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in root.value:
        key = r.scalar(key_node, "a key")
        if key is None:
            continue
        if key not in KEYS:
            close = [k for k in KEYS if k[:3] == key[:3]]
            close += difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            r.node(key_node, f"unknown key {key!r}{hint}; expected one of {', '.join(KEYS)}")
        elif key in found:
            r.node(key_node, f"the key {key!r} appears twice")
        else:
            found[key] = (key_node, value_node)
    fields: dict[str, object] = {"path": path, "source": text}

    def value(key: str, what: str) -> tuple[yaml.Node, str] | None:
        if key not in found:
            return None
        node = found[key][1]
        got = r.scalar(node, what)
        return None if got is None else (node, got)

    for key in ("name", "when"):
        if key not in found:
            r.at(0, f"the key {key!r} is missing")
    if (got := value("name", "a name")) is not None:
        node, name = got
        if not NAME.match(name) or len(name) > 64:
            r.node(node, f"invalid name {name!r}: use lowercase letters, digits and dashes")
        fields["name"] = name
    if (got := value("description", "a description")) is not None:
        fields["description"] = got[1].strip()
    on = "bar"
    if (got := value("on", "bar, trade or quote")) is not None:
        node, on = got
        if on not in lang.KINDS:
            r.node(node, f"unknown row kind {on!r} for on:; expected bar, trade or quote")
            on = ""
        fields["on"] = on
    if (got := value("timeframe", "a timeframe")) is not None:
        node, tf = got
        if on in ("trade", "quote"):
            r.node(found["timeframe"][0], f"timeframe: applies to bars; this filter runs on {on}s")
        elif tf.strip().lower() not in TIMEFRAMES:
            r.node(node, f"unknown timeframe {tf!r}; expected one of {' '.join(TIMEFRAMES)}")
        else:
            fields["timeframe"] = TIMEFRAMES[tf.strip().lower()]
    if "symbols" in found and (items := r.strings(found["symbols"][1], "symbols")) is not None:
        symbols: list[str] = []
        for node, text_value in items:
            if text_value.strip() == "*":
                continue
            try:
                symbols.append(normalize(text_value))
            except SymbolError as exc:
                r.node(node, str(exc).rstrip("."))
        fields["symbols"] = tuple(dict.fromkeys(symbols))
        node = found["symbols"][1]
        if isinstance(node, yaml.SequenceNode) and not node.value:
            r.node(node, 'expected at least one symbol, or ["*"] for all')
    if (got := value("trigger", "edge or level")) is not None:
        node, trigger = got
        if trigger not in TRIGGERS:
            r.node(node, f"unknown trigger {trigger!r}; expected edge or level")
        fields["trigger"] = trigger
    if (got := value("cooldown", "a duration")) is not None:
        node, text_value = got
        m = _DURATION.match(text_value)
        if m is None:
            r.node(node, f"invalid cooldown {text_value!r}; write it like 30s, 5m or 1h")
        else:
            fields["cooldown"] = round(float(m.group(1)) * _UNITS[m.group(2)])
    if (got := value("severity", "info, warning or critical")) is not None:
        node, severity = got
        if severity not in SEVERITIES:
            r.node(node, f"unknown severity {severity!r}; expected info, warning or critical")
        fields["severity"] = severity
    if "notify" in found and (items := r.strings(found["notify"][1], "notifiers")) is not None:
        for node, target in items:
            if target not in NOTIFIERS:
                r.node(node, f"unknown notifier {target!r}; expected console or telegram")
        fields["notify"] = tuple(dict.fromkeys(t for _, t in items))
    if (got := value("attach", "chart")) is not None:
        node, attachment = got
        if attachment not in ATTACHMENTS:
            r.node(node, f"unknown attachment {attachment!r} for attach:; expected chart")
        fields["attach"] = attachment

    compiled: lang.Compiled | None = None
    if (got := value("when", "an expression")) is not None and on:
        node, when = got
        fields["when"] = when.strip()
        assert isinstance(node, yaml.ScalarNode)
        compiled, problems = lang.compile_expression(when, on, params)
        for problem in problems:
            r.in_value(node, when, problem.at, problem.message)
    if (got := value("message", "a message")) is not None:
        node, message = got
        fields["message"] = message
        template, template_problems = parse_template(message)
        assert isinstance(node, yaml.ScalarNode)
        for offset, text_problem in template_problems:
            r.in_value(node, message, offset, text_problem)
        if template is not None and not template_problems and on and compiled is not None:
            allowed = template_names(on, compiled, params)
            for name in template.names:
                if name not in allowed:
                    offset = message.find("{" + name)
                    r.in_value(
                        node,
                        message,
                        max(offset, 0),
                        f"the message names {name!r}, which this filter's rows do not have; "
                        f"expected one of {', '.join(sorted(allowed))}",
                    )
            for _, part, spec in template.parts:
                if part is None or not spec:
                    continue
                sample: object = "x" if part in _TEXT_NAMES else 1.5
                try:
                    format(sample, spec)
                except ValueError:
                    offset = message.find(":" + spec)
                    r.in_value(node, message, max(offset, 0), f"invalid format {spec!r} for {part}")
    if r.problems:
        raise FilterError(path, r.problems)
    try:
        return msgspec.convert(fields, Filter)
    except msgspec.ValidationError as exc:  # a key left unset by an error already reported
        raise FilterError(path, [Located(path, 1, 1, str(exc), "")]) from None


def read_filter(path: Path, params: IndicatorParams | None = None) -> Filter:
    """Parse one filter file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Cannot read filter file {path}: {exc.strerror or exc}.") from None
    if len(raw) > MAX_FILE_BYTES:
        raise FilterError(
            str(path), [Located(str(path), 1, 1, "the file is larger than 64 KiB", "")]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FilterError(
            str(path), [Located(str(path), 1, 1, f"not UTF-8 text (byte {exc.start})", "")]
        ) from None
    return parse_filter(text, str(path), params)


def filter_from_options(
    name: str,
    when: str,
    *,
    on: str = "bar",
    timeframe: str | None = None,
    symbols: Iterable[str] = (),
    cooldown: str | None = None,
    trigger: str = "edge",
    severity: str = "warning",
    message: str | None = None,
    description: str | None = None,
    notify: Iterable[str] = ("console",),
) -> Filter:
    """A filter from command-line options, checked exactly as a file would be."""
    doc: dict[str, object] = {"name": name}
    if description:
        doc["description"] = description
    syms = list(symbols)
    if syms:
        doc["symbols"] = syms
    doc["on"] = on
    if timeframe:
        doc["timeframe"] = timeframe
    doc["when"] = when
    doc["trigger"] = trigger
    if cooldown:
        doc["cooldown"] = cooldown
    doc["severity"] = severity
    if message:
        doc["message"] = message
    doc["notify"] = list(notify)
    return parse_filter(_emit(doc), "(the options)")
