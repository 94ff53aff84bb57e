"""The filters directory: listing, adding and removing filter files, and `FilterWatcher`, which
a running `watch` polls (pipeline thread) to pick up added, changed and removed files.

Files are written whole to a temporary name and renamed into place, so a reader never sees
half a filter. A file that stops being valid keeps its last good version running.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import ConfigError, PolystreamError
from ..indicators import IndicatorParams
from .spec import Filter, FilterError, Located, read_filter

SUFFIXES = (".yaml", ".yml")
# A file changed this recently is left for the next poll, so a half-written one is not read.
SETTLE_NS = 100_000_000
LAST_FIRED = "last-fired.json"


def filter_files(directory: Path) -> list[Path]:
    """The filter files in `directory` (not hidden, not editor backups), sorted by name."""
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise ConfigError(
            f"The filters directory {directory} is a file, not a directory."
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"Cannot read the filters directory {directory}: {exc.strerror}."
        ) from None
    return [
        p
        for p in entries
        if p.suffix in SUFFIXES and not p.name.startswith((".", "#")) and p.is_file()
    ]


@dataclass
class Loaded:
    """What a directory holds: valid filters by name, and the files that are not valid."""

    filters: dict[str, Filter]
    paths: dict[str, Path]
    errors: list[PolystreamError]


def load_directory(directory: Path, params: IndicatorParams | None = None) -> Loaded:
    """Every filter in `directory`; a second file with a name already taken is an error."""
    out = Loaded({}, {}, [])
    for path in filter_files(directory):
        try:
            f = read_filter(path, params)
        except PolystreamError as exc:
            out.errors.append(exc)
            continue
        if f.name in out.filters:
            out.errors.append(_duplicate(path, f.name, out.paths[f.name]))
            continue
        out.filters[f.name] = f
        out.paths[f.name] = path
    return out


def _duplicate(path: Path, name: str, other: Path) -> FilterError:
    return FilterError(
        str(path), [Located(str(path), 1, 1, f"the name {name!r} is already used by {other}", "")]
    )


def _holder(directory: Path, name: str) -> Path | None:
    """The file that holds the filter called `name`; an invalid file counts by its stem."""
    for path in filter_files(directory):
        try:
            found = read_filter(path).name
        except PolystreamError:
            found = path.stem
        if found == name:
            return path
    return None


def find_filter(directory: Path, name: str) -> Path:
    """The file in `directory` that holds the filter called `name`."""
    path = _holder(directory, name)
    if path is not None:
        return path
    known = ", ".join(sorted(load_directory(directory).filters)) or "none"
    raise ConfigError(f"No filter named {name!r} in {directory} (filters there: {known}).")


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_filter(directory: Path, f: Filter, text: str, *, force: bool = False) -> Path:
    """Write a checked filter into `directory` as NAME.yaml; a filter of the same name is
    replaced only with `force` (and then in its own file)."""
    target = directory / f"{f.name}.yaml"
    existing = _holder(directory, f.name)
    if existing is not None:
        if not force:
            raise ConfigError(
                f"A filter named {f.name!r} already exists in {existing}; "
                "use --force to replace it."
            )
        target = existing
    elif target.exists():
        raise ConfigError(f"{target} exists and holds another filter; rename {f.name!r}.")
    write_atomically(target, text if text.endswith("\n") else text + "\n")
    return target


@dataclass(frozen=True)
class Event:
    """What changed in the directory, for the status line: `event` is filter_added,
    filter_changed, filter_removed or filter_error."""

    event: str
    detail: str


class FilterWatcher:
    """Polls a filters directory; `poll()` returns what changed since the last call and
    `filters` is the current set (the last good version of each file)."""

    def __init__(self, directory: Path, params: IndicatorParams | None = None) -> None:
        self.directory = directory
        self.params = params
        self._stamps: dict[Path, tuple[int, int, int]] = {}
        self._good: dict[Path, Filter] = {}

    @property
    def filters(self) -> list[Filter]:
        seen: dict[str, Filter] = {}
        for f in self._good.values():
            seen.setdefault(f.name, f)
        return list(seen.values())

    def load(self) -> list[PolystreamError]:
        """The first scan: every invalid file is returned (a run refuses to start with one)."""
        errors: list[PolystreamError] = []
        for event in self._scan(settling=False):
            if event[0] == "error":
                errors.append(event[2])  # type: ignore[arg-type]
        return errors

    def poll(self) -> list[Event]:
        out = []
        for kind, path, detail in self._scan():
            if kind == "error":
                assert isinstance(detail, PolystreamError)
                first = (
                    detail.problems[0].render().splitlines()[0]
                    if isinstance(detail, FilterError) and detail.problems
                    else str(detail)
                )
                keeps = " the previous version keeps running." if path in self._good else ""
                out.append(Event("filter_error", f"{first}{';' if keeps else ''}{keeps}"))
            else:
                out.append(Event(f"filter_{kind}", str(detail)))
        return out

    def _scan(self, settling: bool = True) -> list[tuple[str, Path, object]]:
        try:
            paths = filter_files(self.directory)
        except ConfigError as exc:
            return [("error", self.directory, exc)]
        events: list[tuple[str, Path, object]] = []
        for gone in [p for p in self._stamps if p not in paths]:
            del self._stamps[gone]
            old = self._good.pop(gone, None)
            if old is not None:
                events.append(("removed", gone, f"{old.name} ({gone.name})"))
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._stamps.get(path) == stamp:
                continue
            if settling and time.time_ns() - st.st_mtime_ns < SETTLE_NS:
                continue  # an editor may be between truncating and writing it: look next time
            self._stamps[path] = stamp
            try:
                f = read_filter(path, self.params)
            except PolystreamError as exc:
                events.append(("error", path, exc))
                continue
            clash = next((p for p, g in self._good.items() if g.name == f.name and p != path), None)
            if clash is not None:
                events.append(("error", path, _duplicate(path, f.name, clash)))
                continue
            before = self._good.get(path)
            self._good[path] = f
            if before is None:
                events.append(("added", path, f"{f.name} ({path.name})"))
            elif before != f:
                events.append(("changed", path, f"{f.name} ({path.name})"))
        return events


def read_last_fired(state_dir: Path) -> dict[str, int]:
    try:
        data = json.loads((state_dir / LAST_FIRED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


def write_last_fired(state_dir: Path, fired: Iterable[tuple[str, int]]) -> None:
    """Merge when each filter last fired into the state directory (for `filter list`)."""
    known = read_last_fired(state_dir)
    for name, t in fired:
        known[name] = max(t, known.get(name, 0))
    # only `filter list` reads it; a read-only state directory must not stop a run
    with contextlib.suppress(OSError):
        write_atomically(state_dir / LAST_FIRED, json.dumps(known, sort_keys=True))


def shipped_dir() -> Path:
    """The directory of the filters that come with polystream."""
    return Path(str(resources.files("polystream.shipped_filters")))
