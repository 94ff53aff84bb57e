"""The dashboard (display.Dashboard over view.Board): every timeframe's table, the alerts and
the footer on an 80×24 and a 160×50 screen, rendered with rich's recording console."""

from __future__ import annotations

import io
import math
import time
from collections.abc import Iterator

import polars as pl
import pytest
from rich.console import Console

from polystream.display import Dashboard, alert_text, notice_text, sparkline
from polystream.schema import BAR, QUOTE, TRADE, Alert, Notice
from polystream.sinks import FeedState, Output, View
from polystream.view import RECENT_CLOSES, Board

T0 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
SYMBOLS = ("X:BTCUSD", "X:ETHUSD")
BASE = {"X:BTCUSD": 4108.10, "X:ETHUSD": 2997.27}
INDICATORS = {
    "rsi_14": pl.Float64,
    "stoch_k": pl.Float64,
    "stoch_d": pl.Float64,
    "macd": pl.Float64,
    "macd_signal": pl.Float64,
    "macd_hist": pl.Float64,
    "ao": pl.Float64,
    "cci_20": pl.Float64,
    "bb_upper": pl.Float64,
    "bb_middle": pl.Float64,
    "bb_lower": pl.Float64,
    "flow_imbalance": pl.Float64,
}


def bar_records(
    symbol: str, timeframe: str, step: int, closes: list[float], last: str = "partial"
) -> pl.DataFrame:
    """Bar records of one series, one per close, the last one in state `last`."""
    n = len(closes)
    rows = [
        {
            "symbol": symbol,
            "timeframe": timeframe,
            "start": T0 + k * step,
            "end": T0 + (k + 1) * step,
            "open": c - 0.5,
            "high": c + 1.0,
            "low": c - 1.0,
            "close": c,
            "volume": 0.83548859,
            "vwap": c,
            "trades": 12,
            "buy_volume": 0.5,
            "sell_volume": 0.33548859,
            "state": last if k == n - 1 else "final",
            "rsi_14": 76.0,
            "stoch_k": 93.0,
            "stoch_d": 94.6,
            "macd": 1.2,
            "macd_signal": 0.9,
            "macd_hist": 0.3128,
            "ao": 8.373,
            "cci_20": 97.0,
            "bb_upper": c + 2.0,
            "bb_middle": c,
            "bb_lower": c - 2.0,
            "flow_imbalance": 0.2,
        }
        for k, c in enumerate(closes)
    ]
    return pl.DataFrame(rows, schema={**BAR, **INDICATORS})


def trades(symbol: str, prices: list[float], t0: int = T0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "symbol": [symbol] * len(prices),
            "time": [t0 + k for k in range(len(prices))],
            "price": prices,
            "size": [0.00820081] * len(prices),
            "side": [2] * len(prices),
            "exchange": [1] * len(prices),
            "trade_id": [str(k) for k in range(len(prices))],
            "received": [t0 + k for k in range(len(prices))],
        },
        schema=TRADE,
    )


def quotes(symbol: str, price: float) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "symbol": [symbol],
            "time": [T0],
            "bid": [price - 0.29],
            "bid_size": [1.0],
            "ask": [price],
            "ask_size": [0.8],
            "exchange": [1],
            "received": [T0],
        },
        schema=QUOTE,
    )


def alert(name: str, symbol: str, k: int, severity: str = "info") -> Alert:
    message = f"{symbol} CCI {120 + k} above +100 at {BASE.get(symbol, 100.0):.2f}"
    return Alert(name, symbol, "1s", T0 + k * 1000, severity, message, {}, ("console",))


FILTERS = ("cci-overbought", "bollinger-breakout-up", "rsi-overbought")


def demo_outputs(symbols: tuple[str, ...] = SYMBOLS) -> list[Output]:
    """What a short demo run gives a dashboard: statuses, trades, quotes, 1s and 1m bars and a
    dozen alerts from three filters."""
    notices = [
        Notice("connected", T0, "Connected Successfully"),
        Notice("authenticated", T0),
        Notice("subscribed", T0, "4 topics"),
    ]
    outs = [Output(notices=notices)]
    for s in symbols:
        base = BASE.get(s, 100.0)
        walk = [base + 10 * math.sin(k / 3) for k in range(40)]
        outs.append(Output(trades=trades(s, [base - 20, *walk, base]), quotes=quotes(s, base)))
        outs.append(Output(bars=bar_records(s, "1s", 1000, walk)))
        outs.append(Output(bars=bar_records(s, "1m", 60_000, walk[:2])))
    fired = [
        alert(FILTERS[k % 3], symbols[k % len(symbols)], k, "warning" if k % 3 == 1 else "info")
        for k in range(12)
    ]
    outs.append(Output(alerts=fired))
    return outs


def view(timeframes: tuple[str, ...] = ("1s", "1m"), now: int = T0 + 45_000) -> View:
    feed = FeedState(
        state="streaming", queue_size=10_000, events=25_287, bars=86, filters=15, alerts=12
    )
    return View(now, SYMBOLS, timeframes, 34, feed)


def render(
    width: int, height: int, outputs: list[Output], v: View | None = None, **options: object
) -> str:
    console = Console(record=True, width=width, height=height, file=io.StringIO())
    dashboard = Dashboard(
        [s for s in BASE if any(o.trades is not None for o in outputs)] or list(SYMBOLS),
        "1s",
        console,
        **options,  # type: ignore[arg-type]
    )
    for out in outputs:
        dashboard.write(out)
    console.print(dashboard.render(v or view()))
    return console.export_text()


@pytest.fixture
def local_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time three hours ahead of UTC, in a zone called XYZ."""
    monkeypatch.setenv("TZ", "XYZ-3")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(("width", "height"), [(80, 24), (160, 50)])
def test_every_timeframe_the_alerts_and_the_footer_fit_the_screen(width: int, height: int) -> None:
    text = render(width, height, demo_outputs(), utc=True)
    lines = text.rstrip("\n").split("\n")
    assert len(lines) <= height
    assert max(len(line) for line in lines) <= width
    assert "..." not in text  # nothing collapsed
    assert "1s bars (UTC)" in text and "1m bars (UTC)" in text
    for symbol in SYMBOLS:  # each in the symbol row and in every timeframe's table
        assert sum(line.startswith(symbol) for line in lines) == 3
    assert "4,108.10" in text and "4,112.30" in text and "4,111.37" in text  # last, 1s, 1m
    assert "─ alerts · cci-overbought 4 · bollinger-breakout-up 4 · rsi-overbought 4 ─" in text
    assert "rsi-overbought 1s: X:ETHUSD CCI 131 above +100 at 2997.27" in text
    assert lines[-1].startswith(" streaming ") and lines[-1].endswith("filters 15  alerts 12")


def test_the_wide_screen_shows_every_column_and_more_alerts() -> None:
    text = render(160, 50, demo_outputs(), utc=True)
    for header in ("low", "high", "bid", "ask", "spread", "volume", "AO", "%D", "trend"):
        assert f" {header} " in text
    assert "4,088.10" in text and "4,118.05" in text  # the session's low and high
    assert "+0.49%" in text and "+0.67%" in text  # change since the first trade
    assert "22:13:24 warning  bollinger-breakout-up 1s: X:BTCUSD CCI 124" in text  # 8 lines
    assert "│ 22:13:20 connected   " in text and "Successfully" not in text
    assert "reconnects 0  lag 0 ms  queue 0/10000" in text  # every counter


def test_at_80_columns_alerts_stay_readable_and_the_footer_whole() -> None:
    text = render(80, 24, demo_outputs(), utc=True)
    alert_lines = [line for line in text.split("\n") if line.startswith("│ 22:13:")]
    assert len(alert_lines) >= 5
    assert all(not line.rstrip(" │").endswith("…") for line in alert_lines)
    assert "warning " not in text  # the severity shows as the name's colour instead
    assert " streaming   lag 0 ms  events 25,287  bars 86  filters 15  alerts 12" in text


def test_at_60_columns_symbols_and_prices_are_whole() -> None:
    text = render(60, 24, demo_outputs(), utc=True)
    lines = text.rstrip("\n").split("\n")
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 60
    for symbol, last in (("X:BTCUSD", "4,108.10"), ("X:ETHUSD", "2,997.27")):
        row = next(line for line in lines if line.startswith(symbol))
        assert last in row and "+0." in row
    assert "1s bars" in text and "1m bars" in text and "alerts" in text
    assert "filters 15" in text and "alerts 12" in text


def test_many_symbols_still_show_every_timeframe_at_80x24() -> None:
    symbols = tuple(f"X:C{k}USD" for k in range(8))
    console = Console(record=True, width=80, height=24, file=io.StringIO())
    dashboard = Dashboard(symbols, "1s", console, utc=True)
    for out in demo_outputs(symbols):
        dashboard.write(out)
    v = View(T0, symbols, ("1s", "15s", "1m"), 34, FeedState(filters=1, alerts=12))
    console.print(dashboard.render(v))
    text = console.export_text()
    assert len(text.rstrip("\n").split("\n")) <= 24
    for tf in ("1s", "15s", "1m"):
        assert f"{tf} bars (UTC)" in text and "of 8 symbols" in text
    assert "─ alerts" in text and "filters 1  alerts 12" in text


def test_a_timeframe_without_bars_yet_has_its_table() -> None:
    text = render(160, 50, demo_outputs()[:2], view(("1s", "1m", "5m")), utc=True)
    assert "5m bars (UTC)" in text and "no bar yet" in text
    assert "none yet" in text  # the alerts panel is there before the first alert


def test_times_are_local_with_the_zone_shown_or_utc(local_zone: None) -> None:
    local = render(160, 50, demo_outputs())
    assert " polystream   01:14:05 XYZ" in local  # T0 + 45 s, three hours ahead
    assert "1s bars (XYZ)" in local and "01:13:59" in local
    assert "01:13:31 info     rsi-overbought" in local
    utc = render(160, 50, demo_outputs(), utc=True)
    assert " polystream   22:14:05 UTC" in utc and "01:13" not in utc


def test_alert_lines_name_the_symbol_once() -> None:
    named = alert("rsi-overbought", "X:BTCUSD", 0)
    assert alert_text(named) == (
        "22:13:20 info     rsi-overbought 1s: X:BTCUSD CCI 120 above +100 at 4108.10"
    )
    unnamed = Alert("dip", "X:BTCUSD", "1m", T0, "warning", "RSI 27.3", {}, ("console",))
    assert alert_text(unnamed) == "22:13:20 warning  dip X:BTCUSD 1m: RSI 27.3"
    trade = Alert("whale", "X:BTCUSD", None, T0, "info", "a whale buy", {}, ("console",))
    assert alert_text(trade).endswith(" whale X:BTCUSD: a whale buy")


def test_status_lines_do_not_repeat_the_event() -> None:
    assert notice_text(Notice("connected", T0, "Connected Successfully")) == "connected"
    assert notice_text(Notice("authenticated", T0, "authenticated")) == "authenticated"
    assert notice_text(Notice("subscribed", T0, "4 topics")) == "subscribed 4 topics"
    assert notice_text(Notice("gap", T0, "gap of 3 s in X:BTCUSD")) == "gap of 3 s in X:BTCUSD"
    assert notice_text(Notice("max_connections", T0, "Max connections exceeded")) == (
        "max_connections Max connections exceeded"
    )


def test_sparkline_spans_the_lowest_to_the_highest_close() -> None:
    assert sparkline([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]) == "▁▂▃▄▅▆▇█"
    assert sparkline([5.0, 5.0, 5.0]) == "▄▄▄"
    assert sparkline([]) == ""


def test_the_board_keeps_the_recent_closes_and_counts_of_every_timeframe() -> None:
    board = Board(["X:BTCUSD"], "1s")
    closes = [float(100 + k) for k in range(30)]
    board.update(Output(history=bar_records("X:BTCUSD", "1s", 1000, closes[:25], "final")))
    board.update(Output(bars=bar_records("X:BTCUSD", "1s", 1000, closes, "partial")[25:]))
    grown = bar_records("X:BTCUSD", "1s", 1000, [*closes[:-1], 500.0], "final")[-1:]
    board.update(Output(bars=grown))  # the partial last bar, final now with another close
    board.update(Output(bars=bar_records("X:BTCUSD", "1m", 60_000, [7.0])))
    (row,) = board.rows()
    assert row.closes == [*closes[10:29], 500.0] and len(row.closes) == RECENT_CLOSES
    assert row.bars == 30 and row.bar is not None and row.bar["close"] == 500.0
    assert row.of("1m").closes == [7.0] and row.of("1m").count == 0
    assert board.timeframes == ["1s", "1m"]


def test_the_board_keeps_change_and_range_since_the_first_trade() -> None:
    board = Board(["X:BTCUSD"], "1m")
    board.update(Output(trades=trades("X:BTCUSD", [100.0, 90.0, 104.0])))
    board.update(Output(trades=trades("X:BTCUSD", [120.0, 110.0], T0 + 10)))
    (row,) = board.rows()
    assert (row.first_price, row.last_price, row.low, row.high) == (100.0, 110.0, 90.0, 120.0)
    assert row.change == pytest.approx(0.10)
    assert row.trades == 5


def test_alert_counts_per_filter_include_alerts_not_routed_to_the_console() -> None:
    board = Board(["X:BTCUSD"], "1m")
    quiet = Alert("quiet", "X:BTCUSD", "1m", T0, "info", "x", {}, ("telegram",))
    board.update(Output(alerts=[alert("a", "X:BTCUSD", 0), quiet, alert("a", "X:BTCUSD", 1)]))
    assert board.fired.most_common() == [("a", 2), ("quiet", 1)]


def test_the_utc_option_reaches_the_dashboard(local_zone: None) -> None:
    from polystream.app import RunOptions, _sinks

    for utc, zone in ((True, "UTC"), (False, "XYZ")):
        (sink,) = _sinks(RunOptions(SYMBOLS, utc=utc), SYMBOLS, (1000, 60_000))
        assert isinstance(sink, Dashboard)
        assert f"1s bars ({zone})" in _text_of(sink)


def _text_of(dashboard: Dashboard) -> str:
    console = Console(record=True, width=160, height=50, file=io.StringIO())
    console.print(dashboard.render(view()))
    return console.export_text()


@pytest.fixture
def logging_state() -> Iterator[None]:
    """Leave the logging set-up as the test found it (`setup_logging` changes it globally)."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {n: logging.getLogger(n).level for n in ("websockets", "websocket", "urllib3")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, was in noisy.items():
        logging.getLogger(name).setLevel(was)


def test_log_records_become_one_line_each_in_the_feed_panel(logging_state: None) -> None:
    """While the dashboard is live a warning from any thread is one line of its feed panel
    (message and exception summary, secrets scrubbed), not a block above the screen; the stderr
    handler is back when the dashboard closes."""
    import logging
    import threading

    from polystream.config import Redactor
    from polystream.display import setup_logging

    secret = "sk_live_abcdefghijklmnop"
    setup_logging(Redactor([secret]))
    root = logging.getLogger()
    before = root.handlers[:]
    out = io.StringIO()
    console = Console(record=True, width=160, height=50, file=out, force_terminal=True)
    dashboard = Dashboard(list(SYMBOLS), "1s", console, timeframes=("1s", "1m"))
    dashboard.tick(view())

    def fail() -> None:
        try:
            raise ConnectionError(f"refused with key {secret}\nsecond line of detail")
        except ConnectionError:
            logging.getLogger("polystream.rest").warning("REST request failed", exc_info=True)

    worker = threading.Thread(target=fail)
    worker.start()
    worker.join()
    logging.getLogger("polystream.store").error("writer stopped: disk full")
    panel = _text_of(dashboard)
    dashboard.close(view())
    assert root.handlers == before
    lines = [line for line in panel.splitlines() if "REST request failed" in line]
    assert len(lines) == 1
    assert "warning REST request failed (ConnectionError: refused with key" in lines[0]
    assert "critical writer stopped: disk full" in panel
    assert secret not in panel and secret not in out.getvalue()
    assert "second line of detail" not in panel and "Traceback" not in out.getvalue()
