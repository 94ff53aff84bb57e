"""One malformed element costs that element alone, as users run polystream: `watch --feed REC`
over a recording of good frames plus one bad element exits 0 without a traceback, its output is
the clean recording's, and the bad element is counted (and logged) as rejected."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from polystream.record import Recorder
from polystream.source import Frame

T0 = 1_700_000_100_000  # a minute boundary
STEP = 500  # ms between frames
FRAMES = 240
MIDDLE = FRAMES // 2  # the frame the bad element joins
AT = T0 + MIDDLE * STEP
PRICE = 40_000.0

# What each bad element would be were it good: in the run's time and price range, so that
# accepting it, even with a field nulled or mangled, would change the output.
TRADE = {"ev": "XT", "pair": "BTC-USD", "p": PRICE, "t": AT, "s": 1.5, "c": [2], "i": "x", "x": 1}
QUOTE = {"ev": "XQ", "pair": "BTC-USD", "bp": PRICE, "bs": 1.0, "ap": PRICE, "as": 1.0, "t": AT}
BOOK = {"ev": "XL2", "pair": "BTC-USD", "t": AT, "x": 1, "b": [[PRICE, 1.0]], "a": [[PRICE, 1.0]]}
SECOND = AT // 1000 * 1000 - 1000
AGGREGATE = {
    "ev": "XAS",
    "pair": "BTC-USD",
    "o": PRICE,
    "h": PRICE,
    "l": PRICE,
    "c": PRICE,
    "v": 1.5,
    "vw": PRICE,
    "z": 0.5,
    "s": SECOND,
    "e": SECOND + 1000,
}
MINUTE = {**AGGREGATE, "ev": "XA", "s": T0, "e": T0 + 60_000}
SUMMARY = re.compile(r"^([\d,]+) events in ([\d,]+) frames; (\d+) rejected, (\d+) malformed frames")


def good_frames() -> list[tuple[int, list[dict[str, object]]]]:
    """Two minutes of BTC-USD trades, quotes, second aggregates and books, and ETH-USD trades
    nobody watches, as (receipt time, elements)."""
    rng = random.Random(5)
    price = PRICE
    second: list[tuple[float, float]] = []
    frames = []
    for k in range(FRAMES):
        t = T0 + k * STEP
        price = round(price * (1 + rng.gauss(0, 1e-4)), 2)
        size = round(rng.uniform(0.01, 2.0), 6)
        elements: list[dict[str, object]] = [
            {**TRADE, "p": price, "t": t, "s": size, "c": [rng.choice([1, 2])], "i": str(k)},
            {**TRADE, "pair": "ETH-USD", "p": 2_000.0, "t": t, "i": f"e{k}"},
            {**QUOTE, "bp": price - 0.5, "ap": price + 0.5, "t": t, "x": 1},
        ]
        if k % 10 == 0:
            elements.append({**BOOK, "t": t, "b": [[price - 0.5, 1.0]], "a": [[price + 0.5, 2.0]]})
        if t % 1000 == 0 and second:
            prices = [p for p, _ in second]
            volume = sum(s for _, s in second)
            elements.append(
                {
                    **AGGREGATE,
                    "o": prices[0],
                    "h": max(prices),
                    "l": min(prices),
                    "c": prices[-1],
                    "v": volume,
                    "vw": sum(p * s for p, s in second) / volume,
                    "z": volume / len(second),
                    "s": t - 1000,
                    "e": t,
                }
            )
            second = []
        second.append((price, size))
        frames.append((t + 3, elements))
    return frames


def write(path: Path, lines: list[tuple[int, list[dict[str, object]]]]) -> Path:
    rec = Recorder(path)
    for received, elements in lines:
        rec.write(Frame(received, msgspec.json.encode(elements)))
    rec.close()
    return path


def with_element(tmp_path: Path, element: dict[str, object]) -> Path:
    lines = good_frames()
    received, elements = lines[MIDDLE]
    lines[MIDDLE] = (received, [*elements[:1], element, *elements[1:]])
    return write(tmp_path / "bad.rec", lines)


@dataclass
class Run:
    returncode: int
    stderr: str
    output: list[dict[str, object]]  # every record but status records (which carry wall time)
    events: int
    frames: int
    rejected: int
    malformed: int


def watch(tmp_path: Path, recording: Path, bars: str) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYGON_", "MASSIVE_"))}
    env.update(POLYSTREAM_STATE_DIR=str(tmp_path / "state"), COLUMNS="400")  # log lines unwrapped
    command = ["watch", "X:BTCUSD", "--feed", str(recording), "--no-ui", "--json", "-t", "1s"]
    result = subprocess.run(
        [sys.executable, "-m", "polystream", *command, "--bars", bars],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    lines = result.stderr.strip().splitlines()
    found = SUMMARY.match(lines[-1]) if lines else None
    counts = [int(g.replace(",", "")) for g in found.groups()] if found else [-1] * 4
    return Run(
        result.returncode,
        result.stderr,
        [r for r in records if r["type"] != "status"],
        *counts,
    )


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The clean recording's run, with bars from trades and from the feed's aggregates."""
    path = tmp_path_factory.mktemp("clean")
    recording = write(path / "clean.rec", good_frames())
    runs = {bars: watch(path, recording, bars) for bars in ("trades", "polygon")}
    for run in runs.values():
        assert run.returncode == 0 and run.rejected == 0, run.stderr
        assert sum(r["type"] == "bar" for r in run.output) > 100
    return runs


def assert_costs_only_itself(run: Run, clean: Run, rejected: int = 1) -> None:
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert (run.rejected, run.malformed) == (rejected, 0), run.stderr
    assert (run.events, run.frames) == (clean.events, clean.frames)
    assert run.output == clean.output  # every bar, book and alert record
    if rejected:
        assert "rejected event" in run.stderr  # the first few are logged


def changed(base: dict[str, object], **fields: object) -> dict[str, object]:
    return {**base, **{k.rstrip("_"): v for k, v in fields.items()}}


@pytest.mark.parametrize(
    "element",
    [
        pytest.param(changed(TRADE, x=99_999), id="x=99999"),
        pytest.param(changed(TRADE, x=32_768), id="x=32768"),
        pytest.param(changed(TRADE, x=-1), id="x=-1"),
        pytest.param(changed(TRADE, t=99_999_999_999_999_999_999), id="t=1e20"),
        pytest.param(changed(TRADE, t=2**63), id="t=2**63"),
        pytest.param(changed(TRADE, t=253_402_300_800_000), id="t=year 10000"),
        pytest.param(changed(TRADE, t=-1), id="t=-1"),
        pytest.param(changed(TRADE, s=1e308), id="s=1e308"),
        pytest.param(changed(TRADE, s=-1.5), id="s=-1.5"),
        pytest.param(changed(TRADE, p=1e308), id="p=1e308"),
        pytest.param(changed(TRADE, p=-1.0), id="p=-1"),
        pytest.param(changed(TRADE, p=1e15, s=1e15), id="p=1e15,s=1e15"),
    ],
)
def test_a_trade_with_a_number_out_of_range(
    tmp_path: Path, clean: dict[str, Run], element: dict[str, object]
) -> None:
    # Before: x, t out of range were nulled and the trade kept (bars changed, 0 rejected);
    # s or p = 1e308 (or both at 1e15) ended the run with an Int128 overflow traceback.
    run = watch(tmp_path, with_element(tmp_path, element), "trades")
    assert_costs_only_itself(run, clean["trades"])


@pytest.mark.parametrize(
    "element",
    [
        pytest.param(changed(QUOTE, bp=1e308), id="bp=1e308"),
        pytest.param(changed(QUOTE, bs=1e308), id="bs=1e308"),
        pytest.param(changed(QUOTE, ap=-1.0), id="ap=-1"),
        pytest.param(changed(QUOTE, as_=-1e308), id="as=-1e308"),
        pytest.param(changed(QUOTE, x=99_999), id="x=99999"),
        pytest.param(changed(QUOTE, t=99_999_999_999_999_999_999), id="t=1e20"),
    ],
)
def test_a_quote_with_a_number_out_of_range(
    tmp_path: Path, clean: dict[str, Run], element: dict[str, object]
) -> None:
    # Before: kept, with its out-of-range integers nulled; 0 rejected.
    run = watch(tmp_path, with_element(tmp_path, element), "trades")
    assert_costs_only_itself(run, clean["trades"])


@pytest.mark.parametrize(
    "element",
    [
        pytest.param(changed(BOOK, b=[[1e308, 1.0]]), id="bid price 1e308"),
        pytest.param(changed(BOOK, a=[[PRICE, -1.0]]), id="ask size -1"),
        pytest.param(changed(BOOK, a=[[PRICE, 1e308]]), id="ask size 1e308"),
        pytest.param(changed(BOOK, x=99_999), id="x=99999"),
        pytest.param(changed(BOOK, t=99_999_999_999_999_999_999), id="t=1e20"),
    ],
)
def test_a_book_with_a_number_out_of_range(
    tmp_path: Path, clean: dict[str, Run], element: dict[str, object]
) -> None:
    # Before: kept, and the book records made from it differed; 0 rejected.
    run = watch(tmp_path, with_element(tmp_path, element), "trades")
    assert_costs_only_itself(run, clean["trades"])


@pytest.mark.parametrize(
    "element",
    [
        pytest.param(changed(AGGREGATE, v=1e308), id="XAS v=1e308"),
        pytest.param(changed(AGGREGATE, vw=1e15, v=1e15), id="XAS vw=1e15,v=1e15"),
        pytest.param(changed(AGGREGATE, z=1e-300), id="XAS z=1e-300"),
        pytest.param(changed(AGGREGATE, s=99_999_999_999_999_999_999), id="XAS s=1e20"),
        pytest.param(changed(AGGREGATE, e=-1), id="XAS e=-1"),
        pytest.param(changed(AGGREGATE, o=-1.0), id="XAS o=-1"),
        pytest.param(changed(MINUTE, v=1e308), id="XA v=1e308"),
        pytest.param(changed(MINUTE, e=2**64), id="XA e=2**64"),
    ],
)
def test_an_aggregate_with_a_number_out_of_range(
    tmp_path: Path, clean: dict[str, Run], element: dict[str, object]
) -> None:
    # Aggregates make the bars with --bars polygon. Before: an overflow traceback for a volume
    # or notional out of range, otherwise kept with a nulled time; 0 rejected.
    run = watch(tmp_path, with_element(tmp_path, element), "polygon")
    assert_costs_only_itself(run, clean["polygon"])


@pytest.mark.parametrize("pair", ["", "FOO", "??", "BTC-", "-USD"])
@pytest.mark.parametrize(
    ("base", "bars"),
    [
        pytest.param(TRADE, "trades", id="XT"),
        pytest.param(QUOTE, "trades", id="XQ"),
        pytest.param(BOOK, "trades", id="XL2"),
        pytest.param(AGGREGATE, "polygon", id="XAS"),
    ],
)
def test_an_element_whose_pair_names_no_symbol_is_rejected(
    tmp_path: Path, clean: dict[str, Run], base: dict[str, object], bars: str, pair: str
) -> None:
    # Before: counted with the events of unwatched symbols ("BTC-" even became the symbol
    # X:BTC); 0 rejected.
    run = watch(tmp_path, with_element(tmp_path, changed(base, pair=pair)), bars)
    assert_costs_only_itself(run, clean[bars])


@pytest.mark.parametrize("stamp", [b"99999999999999999999999", b"9" * 5_000, b"253402300800000"])
@pytest.mark.parametrize("line", [0, MIDDLE])
def test_a_damaged_receipt_stamp_costs_its_line(
    tmp_path: Path, clean: dict[str, Run], stamp: bytes, line: int
) -> None:
    # Before: the frame was kept with a nulled receipt time (bars changed); 5,000 digits ended
    # the run with a traceback (int() refuses that many).
    path = write(tmp_path / "bad.rec", good_frames())
    lines = path.read_bytes().splitlines(keepends=True)
    damaged = b"%s\t%s\n" % (stamp, msgspec.json.encode([TRADE]))
    path.write_bytes(b"".join([*lines[:line], damaged, *lines[line:]]))
    run = watch(tmp_path, path, "trades")
    assert_costs_only_itself(run, clean["trades"], rejected=0)
    assert f"line {line + 1} is damaged and was skipped" in run.stderr
