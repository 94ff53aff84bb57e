"""The REST client against a local HTTP server that speaks the aggregates and trades endpoints,
paginates with `next_url` as the real API does, and fails on cue (429, 5xx, 401, 403, 404)."""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import polars as pl
import pytest

from polystream.errors import PolystreamError
from polystream.rest import (
    AGG_SCHEMA,
    NotEntitled,
    RestAuthError,
    RestClient,
    RestError,
    UnknownTicker,
    backfill,
    timespan,
)
from polystream.schema import BAR, TRADE

KEY = "pk_rest_SECRET_0123456789abcdef"
WRONG_KEY = "pk_wrong_SECRET_9876543210zyxw"
T0 = 1_700_000_040_000  # a minute boundary
MINUTE = 60_000
AGGS = re.compile(r"^/v2/aggs/ticker/([^/]+)/range/(\d+)/(\w+)/(\d+)/(\d+)$")
TRADES = re.compile(r"^/v3/trades/([^/]+)$")


@dataclass
class Seen:
    at: float
    path: str
    auth: str | None


@dataclass
class Reply:
    status: int
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def _bar(i: int) -> dict[str, Any]:
    p = 100.0 + i
    return {"o": p, "h": p + 2, "l": p - 1, "c": p + 1, "v": 1.5 * i, "vw": p + 0.5, "n": i}


def _trade(i: int) -> dict[str, Any]:
    conditions = [[1], [2], [], [0]][i % 4]
    row: dict[str, Any] = {
        "exchange": 1 + i % 3,
        "id": i * 7 if i % 2 else f"t{i}",
        "participant_timestamp": (T0 + i * 1000) * 1_000_000 + 999_999,
        "price": 35_000.0 + i,
        "size": 0.25 * (i + 1),
    }
    if conditions:
        row["conditions"] = conditions
    return row


class FakeMassive:
    """The two endpoints; `page_size` rows a page, the cursor pages accepting no other params."""

    def __init__(self) -> None:
        self.bars: dict[str, dict[int, dict[str, Any]]] = {}
        self.trade_rows: dict[str, list[dict[str, Any]]] = {}
        self.page_size = 3
        self.faults: dict[int, Reply] = {}
        self.always: Reply | None = None
        self.seen: list[Seen] = []
        self.not_entitled: set[str] = set()
        self.missing: set[str] = set()
        self.loop = False
        self.next_host: str | None = None
        self.key_in_next_url = False
        self.hold_from: int | None = None  # requests from this index on wait for `release`
        self.release = threading.Event()
        self.url = ""
        self._lock = threading.Lock()

    def add_bars(self, ticker: str, count: int, start: int = T0) -> None:
        self.bars[ticker] = {
            start + i * MINUTE: {**_bar(i), "t": start + i * MINUTE} for i in range(count)
        }

    def add_trades(self, ticker: str, count: int) -> None:
        self.trade_rows[ticker] = [_trade(i) for i in range(count)]

    def _next(self, path: str, cursor: dict[str, Any]) -> str:
        token = base64.urlsafe_b64encode(json.dumps(cursor).encode()).decode()
        url = f"{self.next_host or self.url}{path}?cursor={token}"
        return url + (f"&apiKey={KEY}" if self.key_in_next_url else "")

    def answer(self, path: str, auth: str | None) -> Reply:
        with self._lock:
            index = len(self.seen)
            self.seen.append(Seen(time.monotonic(), path, auth))
        if self.hold_from is not None and index >= self.hold_from:
            self.release.wait(30)  # a slow server, until the test lets it go
        if self.always is not None:
            return self.always
        if index in self.faults:
            return self.faults[index]
        if auth != f"Bearer {KEY}":
            return Reply(401, {"status": "ERROR", "request_id": "r", "error": "Unknown API Key"})
        parts = urlsplit(path)
        query = dict(parse_qsl(parts.query))
        if "apiKey" in query or "apikey" in parts.query.lower():
            return Reply(400, {"status": "ERROR", "error": "the key belongs in the header"})
        if "cursor" in query:
            if len(query) != 1:
                return Reply(400, {"status": "ERROR", "error": "a cursor takes no other params"})
            cursor = json.loads(base64.urlsafe_b64decode(query["cursor"]))
        else:
            cursor = None
        if m := AGGS.match(parts.path):
            return self._aggs(m, query, cursor)
        if m := TRADES.match(parts.path):
            return self._trades(m.group(1), query, cursor)
        return Reply(404, {"status": "NOT_FOUND", "message": "no such route"})

    def _refused(self, ticker: str) -> Reply | None:
        if ticker in self.not_entitled:
            return Reply(
                403,
                {
                    "status": "NOT_AUTHORIZED",
                    "request_id": "r",
                    "message": "You are not entitled to this data. Please upgrade your plan.",
                },
            )
        if ticker in self.missing:
            return Reply(404, {"status": "NOT_FOUND", "request_id": "r", "message": "Not found."})
        return None

    def _aggs(self, m: re.Match[str], query: dict[str, str], cursor: Any) -> Reply:
        ticker, mult, span, start, end = m.groups()
        if refused := self._refused(ticker):
            return refused
        if cursor is None and query != {"adjusted": "true", "sort": "asc", "limit": "50000"}:
            return Reply(400, {"status": "ERROR", "error": f"unexpected params {query}"})
        assert mult == "1" and span in ("second", "minute")
        bars = [
            b for t, b in sorted(self.bars.get(ticker, {}).items()) if int(start) <= t <= int(end)
        ]
        page, rest = bars[: self.page_size], bars[self.page_size :]
        body: dict[str, Any] = {"ticker": ticker, "status": "OK", "request_id": "r"}
        body |= {"queryCount": len(page), "resultsCount": len(page)}
        if page:
            body["results"] = page
        if rest:
            # As the real API does: the `from` segment moves on, limit and sort go in the cursor.
            resume = T0 + MINUTE if self.loop else rest[0]["t"]
            path = f"/v2/aggs/ticker/{ticker}/range/{mult}/{span}/{resume}/{end}"
            body["next_url"] = self._next(path, {"limit": 50000, "sort": "asc"})
        return Reply(200, body)

    def _trades(self, ticker: str, query: dict[str, str], cursor: Any) -> Reply:
        if refused := self._refused(ticker):
            return refused
        if cursor is None:
            want = {"order": "asc", "sort": "timestamp", "limit": "50000"}
            if {k: query.get(k) for k in want} != want:
                return Reply(400, {"status": "ERROR", "error": f"unexpected params {query}"})
            cursor = {"gte": int(query["timestamp.gte"]), "lt": int(query["timestamp.lt"]), "at": 0}
        rows = [
            r
            for r in self.trade_rows.get(ticker, [])
            if cursor["gte"] <= r["participant_timestamp"] < cursor["lt"]
        ]
        at = cursor["at"]
        page = rows[at : at + self.page_size]
        body: dict[str, Any] = {"status": "OK", "request_id": "r", "results": page}
        if at + self.page_size < len(rows):
            following = at if self.loop and at else at + self.page_size
            body["next_url"] = self._next(f"/v3/trades/{ticker}", {**cursor, "at": following})
        return Reply(200, body)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        reply = self.server.fake.answer(self.path, self.headers.get("Authorization"))
        data = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        for k, v in {"Content-Type": "application/json", **reply.headers}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: FakeMassive) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake


@pytest.fixture
def api() -> Iterator[FakeMassive]:
    fake = FakeMassive()
    server = _Server(fake)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    fake.release.set()
    server.shutdown()
    server.server_close()
    thread.join()


def client(api: FakeMassive, key: str = KEY, **kw: Any) -> RestClient:
    options: dict[str, Any] = {"per_minute": 0, "backoff_initial": 0.05, "backoff_max": 0.2}
    return RestClient(api.url, key, **{**options, **kw})


def one_sentence(text: str) -> bool:
    return text.endswith(".") and "\n" not in text and ". " not in text and text[0].isupper()


def expected_bars(ticker: str, indexes: range) -> pl.DataFrame:
    rows = [{**_bar(i), "t": T0 + i * MINUTE} for i in indexes]
    return pl.DataFrame(
        {
            "time": [r["t"] for r in rows],
            "open": [r["o"] for r in rows],
            "high": [r["h"] for r in rows],
            "low": [r["l"] for r in rows],
            "close": [r["c"] for r in rows],
            "volume": [r["v"] for r in rows],
            "vwap": [r["vw"] for r in rows],
            "trades": [r["n"] for r in rows],
            "symbol": [ticker] * len(rows),
        },
        schema=AGG_SCHEMA,
    )


# --- pagination ---------------------------------------------------------------------------------


def test_aggregates_follow_next_url_once_each_in_order(api: FakeMassive) -> None:
    api.add_bars("X:BTCUSD", 12)
    pages = list(client(api).aggregates("btc-usd", MINUTE, T0, T0 + 10 * MINUTE))
    assert [p.height for p in pages] == [3, 3, 3, 1]
    # A bar starting exactly at the end is outside the half-open range.
    assert pl.concat(pages).equals(expected_bars("X:BTCUSD", range(10)))
    paths = [s.path for s in api.seen]
    assert len(paths) == len(set(paths)) == 4
    assert paths[0] == (
        f"/v2/aggs/ticker/X:BTCUSD/range/1/minute/{T0}/{T0 + 10 * MINUTE - 1}"
        "?adjusted=true&sort=asc&limit=50000"
    )
    assert all(s.auth == f"Bearer {KEY}" for s in api.seen)


def test_trades_are_converted_to_the_trade_schema(api: FakeMassive) -> None:
    api.add_trades("X:ETHUSD", 8)
    pages = list(client(api).trades("X:ETHUSD", T0, T0 + 7_000))
    assert [p.height for p in pages] == [3, 3, 1]
    got = pl.concat(pages)
    assert got.schema == pl.Schema(TRADE)
    times = [T0 + i * 1000 for i in range(7)]
    assert got.to_dict(as_series=False) == {
        "symbol": ["X:ETHUSD"] * 7,
        "time": times,
        "price": [35_000.0 + i for i in range(7)],
        "size": [0.25 * (i + 1) for i in range(7)],
        "side": [1, 2, 0, 0, 1, 2, 0],
        "exchange": [1 + i % 3 for i in range(7)],
        "trade_id": ["t0", "7", "t2", "21", "t4", "35", "t6"],
        "received": times,
    }
    first = urlsplit(api.seen[0].path)
    assert dict(parse_qsl(first.query)) == {
        "timestamp.gte": str(T0 * 1_000_000),
        "timestamp.lt": str((T0 + 7_000) * 1_000_000),
        "order": "asc",
        "sort": "timestamp",
        "limit": "50000",
    }


def test_next_url_is_reissued_on_the_configured_base_without_a_key(api: FakeMassive) -> None:
    api.add_bars("X:BTCUSD", 7)
    api.next_host = "https://api.polygon.io"
    api.key_in_next_url = True
    pages = list(client(api).aggregates("X:BTCUSD", MINUTE, T0, T0 + 7 * MINUTE))
    assert pl.concat(pages).equals(expected_bars("X:BTCUSD", range(7)))
    assert len(api.seen) == 3
    assert not any(KEY in s.path for s in api.seen)


@pytest.mark.parametrize("endpoint", ["aggregates", "trades"])
def test_a_repeated_next_url_stops_with_an_error(api: FakeMassive, endpoint: str) -> None:
    api.add_bars("X:BTCUSD", 20)
    api.add_trades("X:BTCUSD", 20)
    api.loop = True
    c = client(api)
    pages = (
        c.aggregates("X:BTCUSD", MINUTE, T0, T0 + 20 * MINUTE)
        if endpoint == "aggregates"
        else c.trades("X:BTCUSD", T0, T0 + 20_000)
    )
    with pytest.raises(RestError) as err:
        list(pages)
    assert "already sent" in str(err.value)
    assert one_sentence(str(err.value))
    assert len(api.seen) <= 3


# --- retries and the rate limit -----------------------------------------------------------------


def test_429_with_retry_after_is_honoured(api: FakeMassive) -> None:
    api.add_bars("X:BTCUSD", 6)
    api.faults[1] = Reply(429, {"status": "ERROR", "error": "too many"}, {"Retry-After": "1"})
    pages = list(client(api).aggregates("X:BTCUSD", MINUTE, T0, T0 + 6 * MINUTE))
    assert pl.concat(pages).equals(expected_bars("X:BTCUSD", range(6)))
    assert len(pages) == 2
    assert api.seen[2].at - api.seen[1].at >= 1.0
    assert api.seen[1].path == api.seen[2].path


def test_429_without_retry_after_and_5xx_are_retried_with_backoff(
    api: FakeMassive, caplog: pytest.LogCaptureFixture
) -> None:
    api.add_trades("X:BTCUSD", 9)
    api.faults[0] = Reply(503)
    api.faults[2] = Reply(429)
    api.faults[3] = Reply(500, {"status": "ERROR"})
    api.faults[4] = Reply(502)
    pages = list(client(api).trades("X:BTCUSD", T0, T0 + 9_000))
    got = pl.concat(pages)
    assert got.height == 9 and got["trade_id"].is_unique().all()
    assert len(api.seen) == 3 + 4
    # Backoff doubles from 0.05 s: the 429, 500, 502 in a row waited 0.05 + 0.1 + 0.2 s.
    assert api.seen[5].at - api.seen[2].at >= 0.35
    assert sum("retry" in r.getMessage() for r in caplog.records) == 4


def test_retries_run_out_with_one_sentence(api: FakeMassive) -> None:
    api.always = Reply(503)
    with pytest.raises(RestError) as err:
        list(client(api, max_retries=2).aggregates("X:BTCUSD", MINUTE, T0, T0 + MINUTE))
    assert len(api.seen) == 3
    assert "HTTP 503" in str(err.value) and one_sentence(str(err.value))


def test_the_rate_limit_holds_in_every_window(api: FakeMassive) -> None:
    api.add_bars("X:BTCUSD", 18)
    began = time.monotonic()
    c = client(api, per_minute=2, window=0.4)
    pages = list(c.aggregates("X:BTCUSD", MINUTE, T0, T0 + 18 * MINUTE))
    assert len(pages) == 6
    times = [s.at for s in api.seen]
    assert all(b - a >= 0.4 - 0.03 for a, b in zip(times, times[2:], strict=False))
    assert time.monotonic() - began >= 2 * 0.4


def test_retries_count_against_the_rate_limit(api: FakeMassive) -> None:
    api.add_bars("X:BTCUSD", 3)
    api.faults[0] = Reply(503)
    api.faults[1] = Reply(503)
    c = client(api, per_minute=1, window=0.3, backoff_initial=0.01)
    assert sum(p.height for p in c.aggregates("X:BTCUSD", MINUTE, T0, T0 + 3 * MINUTE)) == 3
    times = [s.at for s in api.seen]
    assert all(b - a >= 0.3 - 0.03 for a, b in pairwise(times))


# --- errors and the key -------------------------------------------------------------------------


def test_not_entitled_unknown_ticker_and_bad_key_sentences(api: FakeMassive) -> None:
    api.add_bars("X:BTCUSD", 3)
    api.not_entitled.add("X:ETHUSD")
    api.missing.add("X:DOGEUSD")
    c = client(api)
    cases: list[tuple[RestClient, str, type[RestError], str]] = [
        (c, "X:ETHUSD", NotEntitled, "plan does not include"),
        (c, "X:DOGEUSD", UnknownTicker, "does not know the ticker X:DOGEUSD"),
        (c, "X:FOOUSD", UnknownTicker, "no aggregates for X:FOOUSD"),
        (client(api, key=WRONG_KEY), "X:BTCUSD", RestAuthError, "refused the API key"),
    ]
    for who, ticker, kind, words in cases:
        with pytest.raises(kind) as err:
            list(who.aggregates(ticker, MINUTE, T0, T0 + 3 * MINUTE))
        assert words in str(err.value)
        assert one_sentence(str(err.value)), str(err.value)
    with pytest.raises(NotEntitled):
        list(c.trades("X:ETHUSD", T0, T0 + 1000))
    assert list(c.trades("X:FOOUSD", T0, T0 + 1000)) == []
    with pytest.raises(UnknownTicker, match="no trades for X:FOOUSD"):
        list(c.trades("X:FOOUSD", T0, T0 + 1000, allow_empty=False))


def test_the_key_is_only_ever_a_bearer_header(
    api: FakeMassive, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api.add_bars("X:BTCUSD", 5)
    api.key_in_next_url = True
    api.faults[1] = Reply(503)
    shown: list[str] = []
    for key in (KEY, WRONG_KEY):
        c = client(api, key=key)
        shown.append(repr(c))
        try:
            list(c.aggregates("X:BTCUSD", MINUTE, T0, T0 + 5 * MINUTE))
        except RestError as exc:
            shown.append(str(exc))
    api.always = Reply(500)
    for c in (
        client(api, max_retries=1),
        RestClient("http://127.0.0.1:9", KEY, max_retries=1, backoff_initial=0.01, per_minute=0),
    ):
        with pytest.raises(RestError) as err:
            list(c.trades("X:BTCUSD", T0, T0 + 1000))
        shown.append(str(err.value))
    assert any("refused the API key" in s for s in shown)
    assert any("could not be reached" in s for s in shown)
    shown += [r.getMessage() for r in caplog.records] + [caplog.text]
    assert any("/v2/aggs/ticker" in s for s in shown)  # urllib3's request lines were captured
    for secret in (KEY, WRONG_KEY):
        assert not any(secret in s for s in shown)
    assert {s.auth for s in api.seen} == {f"Bearer {KEY}", f"Bearer {WRONG_KEY}"}
    assert not any("apikey" in s.path.lower() for s in api.seen)


# --- backfill -----------------------------------------------------------------------------------


def test_backfill_sends_every_page_once_and_repeats_identically(api: FakeMassive) -> None:
    api.add_bars("X:BTCUSD", 7)
    api.add_bars("X:ETHUSD", 2)
    api.add_trades("X:BTCUSD", 5)

    def run() -> tuple[dict[str, int], list[tuple[str, pl.DataFrame]], list[tuple[str, int, int]]]:
        stored: list[tuple[str, pl.DataFrame]] = []
        progress: list[tuple[str, int, int]] = []
        counts = backfill(
            client(api),
            ["btc-usd", "X:ETHUSD", "BTCUSD"],
            T0,
            T0 + 7 * MINUTE,
            trades=True,
            sink=lambda table, frame: stored.append((table, frame)),
            on_page=lambda symbol, rows, done: progress.append((symbol, rows, done)),
        )
        return counts, stored, progress

    counts, stored, progress = run()
    assert counts == {"X:BTCUSD": 7 + 5, "X:ETHUSD": 2}
    assert [(t, f.height) for t, f in stored] == [
        ("bars", 3), ("bars", 3), ("bars", 1), ("trades", 3), ("trades", 2), ("bars", 2),
    ]  # fmt: skip
    assert progress[:3] == [
        ("X:BTCUSD", 3, T0 + 3 * MINUTE),
        ("X:BTCUSD", 3, T0 + 6 * MINUTE),
        ("X:BTCUSD", 1, T0 + 7 * MINUTE),
    ]
    bars = pl.concat(f for t, f in stored if t == "bars")
    assert bars.schema == pl.Schema(BAR)
    btc = bars.filter(pl.col("symbol") == "X:BTCUSD")
    assert btc["start"].to_list() == [T0 + i * MINUTE for i in range(7)]
    assert (btc["end"] - btc["start"]).unique().to_list() == [MINUTE]
    assert set(bars["timeframe"]) == {"1m"} and set(bars["state"]) == {"final"}
    assert bars["buy_volume"].null_count() == bars.height
    assert btc.select("open", "high", "low", "close", "volume", "vwap", "trades").equals(
        expected_bars("X:BTCUSD", range(7)).select(
            "open", "high", "low", "close", "volume", "vwap", "trades"
        )
    )
    assert pl.concat(f for t, f in stored if t == "trades")["trade_id"].is_unique().all()

    again, stored_again, _ = run()
    assert again == counts
    assert len(stored_again) == len(stored)
    assert all(
        a[0] == b[0] and a[1].equals(b[1]) for a, b in zip(stored, stored_again, strict=True)
    )


def test_backfill_checks_everything_before_the_first_request(api: FakeMassive) -> None:
    def sink(table: str, frame: pl.DataFrame) -> None:
        raise AssertionError(table)

    c = client(api)
    with pytest.raises(RestError) as err:
        backfill(c, ["X:BTCUSD"], T0 + MINUTE, T0, sink=sink)
    assert "not before the end" in str(err.value) and one_sentence(str(err.value))
    with pytest.raises(RestError, match="cannot be backfilled"):
        backfill(c, ["X:BTCUSD"], T0, T0 + MINUTE, timeframe_ms=7_000, sink=sink)
    with pytest.raises(PolystreamError):
        backfill(c, ["X:BTCUSD", "not a symbol!"], T0, T0 + MINUTE, sink=sink)
    assert api.seen == []


def test_timespans() -> None:
    assert timespan(1_000) == (1, "second")
    assert timespan(300_000) == (5, "minute")
    assert timespan(14_400_000) == (4, "hour")
    assert timespan(86_400_000) == (1, "day")
    with pytest.raises(RestError):
        timespan(1_500)
