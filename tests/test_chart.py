"""`polystream chart` and `polystream.chart`: the shipped BTC bars and a shipped filter drawn to
HTML (the plotly figure read back from the page), PNG, SVG and the terminal, from a file and
from a real database, and the one-sentence errors."""

from __future__ import annotations

import io
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from matplotlib import image

from polystream import chart
from polystream.analyze import analyze
from polystream.errors import ConfigError, UsageError
from polystream.filters import Alert, read_filter, run_on_bars, shipped_dir
from polystream.filters.engine import bar_records
from polystream.store import Store, migrate
from test_cli import assert_one_sentence_error, records, run
from test_filter_cli import BTC_BARS, two_symbol_bars

FILTER = "rsi-oversold"  # fires 15 times on the shipped bars
SYMBOL = "X:BTCUSD"
TITLE = "X:BTCUSD 1m bars from 2019-03-29 00:00 to 2019-03-29 23:59 UTC"
PNG = b"\x89PNG\r\n\x1a\n"
ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def bars() -> pl.DataFrame:
    return analyze(BTC_BARS)


@pytest.fixture(scope="module")
def alerts(bars: pl.DataFrame) -> list[Alert]:
    f = read_filter(shipped_dir() / f"{FILTER}.yaml")
    fired, _ = run_on_bars(f, bars.select("time", "open", "high", "low", "close", "volume"), SYMBOL)
    assert len(fired) > 3
    return fired


def utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)


def iso(ms: int) -> str:
    return utc(ms).isoformat()


def page_figure(html: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The traces and layout that a plotly page hands to `Plotly.newPlot`."""
    decoder = json.JSONDecoder()
    at = html.index("Plotly.newPlot(") + len("Plotly.newPlot(")
    values = []
    for _ in range(3):  # the div's id, the traces, the layout
        while html[at] in " \n\t,":
            at += 1
        value, at = decoder.raw_decode(html, at)
        values.append(value)
    return values[1], values[2]


def by_type(traces: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [t for t in traces if t.get("type", "scatter") == kind]


def named(traces: list[Any], name: str) -> Any:
    found = [t for t in traces if t["name"] == name]
    assert len(found) == 1, [t["name"] for t in traces]
    return found[0]


# -- HTML ----------------------------------------------------------------------------------------


def test_html_chart_from_the_cli_has_every_pane_and_the_alerts(tmp_path: Path) -> None:
    expected = run(tmp_path, "filter", "test", FILTER, "--bars", str(BTC_BARS), "--json")
    assert expected.returncode == 0, expected.stderr
    fired = records(expected.stdout)
    assert len(fired) > 3

    result = run(
        tmp_path, "chart", SYMBOL, "--bars", str(BTC_BARS), "--filter", FILTER, "-o", "c.html"
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote chart of 1,382 bars and {len(fired)} alerts to c.html" in result.stderr
    html = (tmp_path / "c.html").read_text(encoding="utf-8")
    # self-contained: plotly.js is inside, nothing is loaded from elsewhere
    assert "<script src=" not in html and len(html) > 1_000_000
    traces, layout = page_figure(html)

    file = pl.read_csv(BTC_BARS)
    (candles,) = by_type(traces, "candlestick")
    assert len(candles["x"]) == file.height == 1382
    for column in ("open", "high", "low", "close"):
        assert candles[column] == file[column].to_list(), column
    assert candles["x"][0] == iso(file["time"][0])
    assert candles["x"][-1] == iso(file["time"][-1])

    volume = named(traces, "volume")
    assert volume["type"] == "bar" and volume["y"] == file["volume"].to_list()
    assert volume["yaxis"] == "y2"
    rsi = named(traces, "RSI 14")
    assert rsi["yaxis"] == "y3" and len(rsi["y"]) == 1382
    assert rsi["y"][:14] == [None] * 14 and rsi["y"][14] is not None
    for name in ("MACD 12/26/9", "MACD signal", "MACD histogram"):
        assert named(traces, name)["yaxis"] == "y4", name
    for side in ("upper", "middle", "lower"):
        assert named(traces, f"BB 20/2 {side}")["yaxis"] == "y", side
    rsi_lines = sorted(s["y0"] for s in layout["shapes"] if s.get("yref") == "y3")
    assert rsi_lines == [30, 70]
    assert layout["title"]["text"] == TITLE

    marker = named(traces, FILTER)
    assert marker["mode"] == "markers" and marker["yaxis"] == "y"
    assert marker["x"] == [iso(int(a["time"])) for a in fired]
    closes = dict(zip(file["time"].to_list(), file["close"].to_list(), strict=True))
    assert marker["y"] == [closes[a["time"]] for a in fired]
    assert marker["text"] == [a["message"] for a in fired]


def test_plotly_figure_takes_analyze_output_and_bar_records_alike(
    bars: pl.DataFrame, alerts: list[Alert]
) -> None:
    fig = chart.plotly_figure(bars, symbol=SYMBOL, title="t", alerts=alerts)
    (candles,) = [t for t in fig.data if t.type == "candlestick"]
    assert list(candles.close) == bars["close"].to_list()
    assert list(candles.x) == [utc(t) for t in bars["time"]]
    assert list(named(fig.data, "RSI 14").y) == bars["rsi_14"].to_list()
    assert list(named(fig.data, "MACD histogram").y) == bars["macd_hist"].to_list()
    assert list(named(fig.data, "BB 20/2 upper").y) == bars["bb_upper"].to_list()
    marker = named(fig.data, FILTER)
    assert list(marker.x) == [utc(a.time) for a in alerts]

    # what `run_on_bars` returns (records keyed by `start`) draws the same chart
    f = read_filter(shipped_dir() / f"{FILTER}.yaml")
    fired, evaluated = run_on_bars(
        f, bars.select("time", "open", "high", "low", "close", "volume"), SYMBOL
    )
    assert "start" in evaluated.columns and "time" not in evaluated.columns
    again = chart.plotly_figure(evaluated, symbol=SYMBOL, title="t", alerts=fired)
    assert [t.to_plotly_json() for t in again.data] == [t.to_plotly_json() for t in fig.data]


def test_only_the_alerts_of_the_symbol_and_on_drawn_bars_are_marked(
    bars: pl.DataFrame, alerts: list[Alert]
) -> None:
    tail = bars.tail(400)
    inside = [a for a in alerts if a.time >= tail["time"][0]]
    other = Alert(FILTER, "X:ETHUSD", "1m", int(tail["time"][5]), "warning", "eth", {})
    assert chart.visible_alerts(tail, [*alerts, other], SYMBOL) == inside
    fig = chart.plotly_figure(tail, symbol=SYMBOL, title="t", alerts=[*alerts, other])
    assert list(named(fig.data, FILTER).x) == [utc(a.time) for a in inside]
    # without alerts there is no marker trace
    plain = chart.plotly_figure(tail, symbol=SYMBOL, title="t")
    assert all(t.name != FILTER for t in plain.data)


def test_a_trade_alert_is_placed_on_the_bar_that_holds_its_time(bars: pl.DataFrame) -> None:
    start = int(bars["time"][100])
    trade = Alert("whale", SYMBOL, None, start + 42_000, "info", "big", {})
    (m,) = chart.marks(bars, [trade], SYMBOL)
    assert m.times == [start + 42_000] and m.closes == [bars["close"][100]]


# -- PNG and SVG ---------------------------------------------------------------------------------


def test_png_from_the_cli(tmp_path: Path) -> None:
    result = run(
        tmp_path, "chart", "btcusd", "--bars", str(BTC_BARS), "--filter", FILTER, "-o", "c.png"
    )
    assert result.returncode == 0, result.stderr
    assert "wrote chart of 1,382 bars and" in result.stderr
    data = (tmp_path / "c.png").read_bytes()
    assert data.startswith(PNG)
    height, width, _ = image.imread(io.BytesIO(data)).shape
    assert (width, height) == (1200, 800)


def test_render_png_has_the_size_asked_for_and_a_marker_per_alert(
    bars: pl.DataFrame, alerts: list[Alert]
) -> None:
    data = chart.render_png(bars, symbol=SYMBOL, title=TITLE, alerts=alerts, width=640, height=480)
    assert isinstance(data, bytes) and data.startswith(PNG)
    height, width, _ = image.imread(io.BytesIO(data)).shape
    assert (width, height) == (640, 480)

    fig = chart.matplotlib_figure(bars, symbol=SYMBOL, title=TITLE, alerts=alerts)
    price = fig.axes[0]
    (scatter,) = [c for c in price.collections if c.get_label() == FILTER]
    assert len(scatter.get_offsets()) == len(alerts)
    assert [t.get_text() for t in price.get_legend().get_texts()] == ["BB 20/2", FILTER]
    assert fig.axes[2].get_ylim() == (0.0, 100.0)
    assert fig.get_suptitle() == TITLE


def test_svg_and_last(tmp_path: Path, alerts: list[Alert], bars: pl.DataFrame) -> None:
    result = run(
        tmp_path, "chart", SYMBOL, "--bars", str(BTC_BARS), "--filter", FILTER,
        "--last", "200", "-o", "c.svg",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    first = bars["time"][-200]
    shown = sum(a.time >= first for a in alerts)
    drawn = "1 alert" if shown == 1 else f"{shown} alerts"
    assert f"wrote chart of 200 bars and {drawn} to c.svg" in result.stderr
    text = (tmp_path / "c.svg").read_text(encoding="utf-8")
    assert text.startswith("<?xml") and "<svg" in text


# -- the terminal --------------------------------------------------------------------------------


def test_terminal_chart_fits_the_width(tmp_path: Path) -> None:
    result = run(
        tmp_path, "chart", SYMBOL, "--bars", str(BTC_BARS), "--filter", FILTER, COLUMNS="100"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) > 15
    assert TITLE in result.stdout and FILTER in result.stdout and "RSI 14" in result.stdout
    assert not ANSI.search(result.stdout)  # not a terminal: no colours
    assert max(len(line) for line in lines) <= 100


def test_render_terminal_merges_bars_into_the_columns_it_has(bars: pl.DataFrame) -> None:
    narrow = chart.render_terminal(
        bars, symbol=SYMBOL, title="narrow", width=60, height=20, color=False
    )
    lines = narrow.splitlines()
    assert max(len(line) for line in lines) <= 60 and len(lines) <= 22
    assert "narrow" in narrow and not ANSI.search(narrow)
    assert ANSI.search(chart.render_terminal(bars, symbol=SYMBOL, title="c", width=60))


# -- errors --------------------------------------------------------------------------------------


def test_an_unknown_suffix_is_bad_usage(tmp_path: Path) -> None:
    result = run(tmp_path, "chart", SYMBOL, "--bars", str(BTC_BARS), "-o", "c.jpg")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("polystream: error: ")
    assert ".html, .png or .svg" in lines[0]
    assert not (tmp_path / "c.jpg").exists()
    with pytest.raises(UsageError):
        chart.write_chart(pl.DataFrame(), tmp_path / "c.txt", symbol=SYMBOL, title="t")


def test_bad_combinations_of_options(tmp_path: Path) -> None:
    assert run(tmp_path, "chart", SYMBOL).returncode == 2
    assert run(tmp_path, "chart", SYMBOL, "--bars", str(BTC_BARS), "--db").returncode == 2
    timeframe = run(tmp_path, "chart", SYMBOL, "--bars", str(BTC_BARS), "-t", "5m")
    assert timeframe.returncode == 2 and "--timeframe" in timeframe.stderr
    no_db = run(tmp_path, "chart", SYMBOL, "--db")
    assert_one_sentence_error(no_db, "DATABASE_URL is not set")


def test_a_trade_filter_cannot_be_charted(tmp_path: Path) -> None:
    result = run(tmp_path, "chart", SYMBOL, "--bars", str(BTC_BARS), "--filter", "whale-trade")
    assert_one_sentence_error(result, "whale-trade runs on trades")
    unknown = run(tmp_path, "chart", SYMBOL, "--bars", str(BTC_BARS), "--filter", "nope")
    assert_one_sentence_error(unknown, "neither a filter file")


def test_a_file_of_several_symbols(tmp_path: Path) -> None:
    both, alone = two_symbol_bars(tmp_path)
    missing = run(tmp_path, "chart", "SOL-USD", "--bars", str(both), "-o", "c.html")
    assert_one_sentence_error(missing, "X:SOLUSD", "X:BTCUSD and X:ETHUSD")
    picked = run(tmp_path, "chart", "eth-usd", "--bars", str(both), "-o", "eth.html")
    assert picked.returncode == 0, picked.stderr
    traces, _ = page_figure((tmp_path / "eth.html").read_text(encoding="utf-8"))
    (candles,) = by_type(traces, "candlestick")
    assert candles["name"] == "X:ETHUSD"
    assert candles["close"] == pl.read_csv(alone["X:ETHUSD"])["close"].to_list()


@pytest.mark.parametrize(
    ("library", "draw"),
    [
        ("plotly", lambda b: chart.render_html(b, symbol=SYMBOL, title="t")),
        ("matplotlib", lambda b: chart.render_png(b, symbol=SYMBOL, title="t")),
        ("plotext", lambda b: chart.render_terminal(b, symbol=SYMBOL, title="t")),
    ],
)
def test_a_missing_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, bars: pl.DataFrame, library: str, draw: Any
) -> None:
    # None in sys.modules makes every import of the package and its modules fail
    for name in [m for m in sys.modules if m == library or m.startswith(library + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, library, None)
    with pytest.raises(ConfigError) as caught:
        draw(bars)
    sentence = str(caught.value)
    assert sentence.endswith(f"needs {library}: pip install 'polystream[chart]'.")
    assert sentence.startswith("Drawing ") and "\n" not in sentence


# -- the database --------------------------------------------------------------------------------


def test_chart_of_stored_bars(tmp_path: Path, database_url: str) -> None:
    migrate(database_url)
    stored = pl.read_csv(BTC_BARS).head(400)
    writer = Store(database_url, tmp_path / "state").start()
    writer.offer("bars", bar_records(stored, SYMBOL, 60_000))
    writer.stop(timeout=30)

    result = run(
        tmp_path, "chart", "BTC-USD", "--db", "--last", "100", "--filter", FILTER, "-o", "db.html",
        DATABASE_URL=database_url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    traces, layout = page_figure((tmp_path / "db.html").read_text(encoding="utf-8"))
    (candles,) = by_type(traces, "candlestick")
    assert candles["close"] == stored["close"].tail(100).to_list()
    assert candles["x"][0] == iso(stored["time"][300])
    # the 300 stored bars before the drawn ones warm the indicators up, as in the whole series
    expected = chart.file_bars(BTC_BARS, SYMBOL).slice(300, 100)
    assert None not in expected["rsi_14"].to_list()
    assert named(traces, "RSI 14")["y"] == expected["rsi_14"].to_list()
    assert named(traces, "MACD 12/26/9")["y"] == expected["macd"].to_list()
    fired = chart.filter_alerts([read_filter(shipped_dir() / f"{FILTER}.yaml")], stored, SYMBOL)
    shown = [iso(a.time) for a in fired if a.time >= stored["time"][300]]
    assert shown and named(traces, FILTER)["x"] == shown
    assert f"wrote chart of 100 bars and {len(shown)} alert" in result.stderr
    assert layout["title"]["text"].startswith("X:BTCUSD 1m bars from 2019-03-29 ")

    other = run(tmp_path, "chart", SYMBOL, "--db", "-t", "5m", DATABASE_URL=database_url)
    assert_one_sentence_error(other, "no 5m bars of X:BTCUSD")


# -- filter test --chart -------------------------------------------------------------------------


def test_filter_test_draws_its_alerts_on_the_bar_file(tmp_path: Path) -> None:
    result = run(
        tmp_path, "filter", "test", FILTER, "--bars", str(BTC_BARS), "--json", "--chart", "t.html"
    )
    assert result.returncode == 0, result.stderr
    fired = records(result.stdout)
    traces, _ = page_figure((tmp_path / "t.html").read_text())
    (candles,) = by_type(traces, "candlestick")
    assert len(candles["x"]) == pl.read_csv(BTC_BARS).height
    marker = named(traces, FILTER)
    assert marker["x"] == [iso(a["time"]) for a in fired]
    assert "wrote the chart of X:BTCUSD to t.html" in result.stderr


def test_filter_test_draws_the_replayed_bars_of_its_timeframe(tmp_path: Path) -> None:
    from test_filter_cli import EVERY_BAR, T0, write_recording

    (tmp_path / "filters").mkdir()
    (tmp_path / "filters" / "every-bar.yaml").write_text(EVERY_BAR)
    recording = tmp_path / "trades.tsv"
    write_recording(recording, seconds=12)
    result = run(
        tmp_path, "filter", "test", "every-bar", "--replay", str(recording), "--chart", "r.png"
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r.png").read_bytes().startswith(PNG)
    html = run(
        *(tmp_path, "filter", "test", "every-bar", "--replay", str(recording), "--json"),
        *("--chart", "r.html"),
    )
    traces, _ = page_figure((tmp_path / "r.html").read_text())
    (candles,) = by_type(traces, "candlestick")
    starts = [iso(T0 + 1000 * k) for k in range(12)]
    assert candles["x"] == starts  # the 1s bars the filter ran on, final ones only
    assert named(traces, "every-bar")["x"] == starts
    assert "(12 1s bars)" in html.stderr and len(records(html.stdout)) == 12


def test_filter_test_chart_refuses_a_bad_suffix_or_an_unnamed_symbol(tmp_path: Path) -> None:
    suffix = run(tmp_path, "filter", "test", FILTER, "--bars", str(BTC_BARS), "--chart", "t.gif")
    assert suffix.returncode == 2 and "(--chart)" in suffix.stderr
    assert "terminal" not in suffix.stderr
    two, alone = two_symbol_bars(tmp_path)
    several = run(tmp_path, "filter", "test", FILTER, "--bars", str(two), "--chart", "t.html")
    assert several.returncode == 2 and "--symbol" in several.stderr
    picked = run(
        *(tmp_path, "filter", "test", FILTER, "--bars", str(two), "--symbol", "X:ETHUSD"),
        *("--chart", "t.html"),
    )
    assert picked.returncode == 0, picked.stderr
    traces, layout = page_figure((tmp_path / "t.html").read_text())
    (candles,) = by_type(traces, "candlestick")
    assert candles["close"][0] == pl.read_csv(alone["X:ETHUSD"])["close"][0]
    assert "X:ETHUSD" in json.dumps(layout["title"])
