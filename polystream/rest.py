"""Backfill from the Massive (Polygon.io) REST API: aggregates and trades as polars pages.

Blocking, on the caller's thread (the CLI's main thread or one worker); one `RestClient` per
thread. The key travels only in an `Authorization: Bearer` header and never appears in any output.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote, urlencode, urlsplit

import msgspec
import polars as pl
import requests

from .config import TIMEFRAMES, Redactor, check_url, redact, timeframe_name
from .errors import PolystreamError
from .schema import BAR, OHLCV, TRADE, Schema, trade_side
from .symbols import normalize
from .worker import Backoff

log = logging.getLogger(__name__)

MAX_LIMIT = 50_000
_NS_PER_MS = 1_000_000
_RETRY_STATUSES = frozenset({500, 502, 503, 504})
_TIMESPANS = (
    (86_400_000, "day"),
    (3_600_000, "hour"),
    (60_000, "minute"),
    (1_000, "second"),
)

AGG_SCHEMA: Schema = {
    "time": pl.Int64,
    **{c: BAR[c] for c in (*OHLCV, "vwap", "trades")},
    "symbol": pl.String,
}
"""An aggregates page: the bar's start as `time`, then the REST API's own columns."""


class RestError(PolystreamError):
    """The REST API could not deliver the data asked for."""


class RestAuthError(RestError):
    """The API key was refused (HTTP 401)."""


class NotEntitled(RestError):
    """The key is valid but the plan does not include the data (`NOT_AUTHORIZED`)."""


class UnknownTicker(RestError):
    """The ticker does not exist (HTTP 404) or has no data at all in the range."""


class Progress(Protocol):
    """Told after every non-empty page: rows in it and the time (ms) the walk has reached."""

    def __call__(self, symbol: str, rows: int, done_ms: int) -> None: ...


class Wait(NamedTuple):
    """A pause before the next request, so that a stalled progress bar can say why."""

    seconds: float
    reason: str  # "rate limit 5/min", "429 from the server", "server error 503, retry 2"


class WaitObserver(Protocol):
    """Told when a request for `symbol` must wait, then with None when requests go on."""

    def __call__(self, symbol: str, wait: Wait | None) -> None: ...


def timespan(timeframe_ms: int) -> tuple[int, str]:
    """The `(multiplier, timespan)` path segments for a timeframe: 300_000 → (5, "minute")."""
    for unit, name in _TIMESPANS:
        if timeframe_ms > 0 and timeframe_ms % unit == 0:
            return timeframe_ms // unit, name
    raise RestError(
        f"A timeframe of {timeframe_ms} ms cannot be asked of the REST API: "
        "use a whole number of seconds, such as 1s, 1m, 5m, 1h or 1d."
    )


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _strip_api_key(query: str) -> str:
    # Dropping whole `apiKey=` items keeps the rest of the query (the opaque cursor) byte-exact.
    kept = [p for p in query.split("&") if p and p.split("=", 1)[0].lower() != "apikey"]
    return "&".join(kept)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class RateLimiter:
    """At most `limit` acquisitions in any `window` seconds; `limit=0` means unlimited."""

    def __init__(
        self,
        limit: int,
        window: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if limit < 0:
            raise ValueError(limit)
        self.limit = limit
        self.window = window
        self._clock = clock
        self._sleep = sleep
        self._times: collections.deque[float] = collections.deque()

    @property
    def text(self) -> str:
        """The limit as users set it: `5/min`."""
        return f"{self.limit}/min" if self.window == 60.0 else f"{self.limit} per {self.window:g}s"

    def acquire(self, pause: Callable[[float], None] | None = None) -> float:
        """Block until a request may be sent, through `pause(seconds)` when given; return the
        seconds waited."""
        if self.limit == 0:
            return 0.0
        waited = 0.0
        while len(self._times) >= self.limit:
            delay = self._times[0] + self.window - self._clock()
            if delay <= 0:
                self._times.popleft()
                continue
            (pause or self._sleep)(delay)
            waited += delay
        self._times.append(self._clock())
        return waited


class RestClient:
    """A rate-limited, retrying client for the aggregates and trades endpoints."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        per_minute: int = 5,
        session: requests.Session | None = None,
        max_retries: int = 6,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        window: float = 60.0,
        timeout: float = 30.0,
        max_pages: int = 1_000_000,
        on_wait: WaitObserver | None = None,
    ) -> None:
        if not api_key:
            raise RestError("No API key for the REST API: set POLYGON_API_KEY or MASSIVE_API_KEY.")
        if per_minute < 0:
            raise RestError(f"The request limit must be 0 (unlimited) or more, not {per_minute}.")
        self.base_url = check_url("POLYGON_REST_URL", base_url, ("http", "https")).rstrip("/")
        self._key = api_key
        self._redact = Redactor([api_key])
        self.session = session or requests.Session()
        self.limiter = RateLimiter(per_minute, window)
        self.max_retries = max_retries
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.max_pages = max_pages
        self.on_wait = on_wait
        self.requests_sent = 0
        self.pages_received = 0
        self.waited = 0.0  # seconds paused for the rate limit and between retries

    def __repr__(self) -> str:
        return (
            f"RestClient({self.base_url!r}, api_key={redact(self._key)!r}, "
            f"per_minute={self.limiter.limit})"
        )

    # -- endpoints ------------------------------------------------------------------------------

    def aggregates(
        self,
        symbol: str,
        timeframe_ms: int,
        start_ms: int,
        end_ms: int,
        *,
        allow_empty: bool = False,
    ) -> Iterator[pl.DataFrame]:
        """Pages of bars starting in [start_ms, end_ms), oldest first, with `AGG_SCHEMA` columns.

        Raises `UnknownTicker` when the whole range has no bars, unless `allow_empty`.
        """
        ticker = normalize(symbol)
        multiplier, span = timespan(timeframe_ms)
        _check_range(start_ms, end_ms)
        # `to` is inclusive on the bar start, so the last millisecond before `end_ms` is asked.
        path = (
            f"/v2/aggs/ticker/{quote(ticker, safe=':')}/range/{multiplier}/{span}"
            f"/{start_ms}/{end_ms - 1}"
        )
        params = {"adjusted": "true", "sort": "asc", "limit": str(MAX_LIMIT)}
        what = f"{multiplier} {span} aggregates for {ticker}"
        rows = 0
        for body in self._pages(path, params, ticker, what):
            results = body.get("results") or []
            frame = _agg_frame(ticker, results)
            if frame.height:
                frame = frame.filter(pl.col("time").is_between(start_ms, end_ms, closed="left"))
            if frame.height:
                rows += frame.height
                yield frame
        if rows == 0 and not allow_empty:
            raise UnknownTicker(_no_data(ticker, "aggregates", start_ms, end_ms))

    def trades(
        self, symbol: str, start_ms: int, end_ms: int, *, allow_empty: bool = True
    ) -> Iterator[pl.DataFrame]:
        """Pages of trades in [start_ms, end_ms), oldest first, with `schema.TRADE` columns.

        A quiet pair may have no trades in a short range, so an empty result is not an error
        unless `allow_empty` is false.
        """
        ticker = normalize(symbol)
        _check_range(start_ms, end_ms)
        path = f"/v3/trades/{quote(ticker, safe=':')}"
        params = {
            "timestamp.gte": str(start_ms * _NS_PER_MS),
            "timestamp.lt": str(end_ms * _NS_PER_MS),
            "order": "asc",
            "sort": "timestamp",
            "limit": str(MAX_LIMIT),
        }
        rows = 0
        for body in self._pages(path, params, ticker, f"trades for {ticker}"):
            frame = _trade_frame(ticker, body.get("results") or [])
            if frame.height:
                rows += frame.height
                yield frame
        if rows == 0 and not allow_empty:
            raise UnknownTicker(_no_data(ticker, "trades", start_ms, end_ms))

    # -- transport ------------------------------------------------------------------------------

    def _pages(
        self, path: str, params: Mapping[str, str], ticker: str, what: str
    ) -> Iterator[dict[str, Any]]:
        target = f"{path}?{urlencode(params, safe=':')}"
        seen = {target}
        for _ in range(self.max_pages):
            body = self._get(target, ticker, what)
            yield body
            next_url = body.get("next_url")
            if not next_url or not isinstance(next_url, str):
                return
            # As the official client does: keep only path and query and send them to our own
            # base, adding nothing, so a link naming another host still reaches the configured one.
            parts = urlsplit(next_url)
            query = _strip_api_key(parts.query)
            target = parts.path + (f"?{query}" if query else "")
            if target in seen:
                raise RestError(
                    f"The REST API sent a next-page link it had already sent while fetching "
                    f"{what}: stopped instead of looping; try again later."
                )
            seen.add(target)
        raise RestError(
            f"Fetching {what} took more than {self.max_pages} pages: "
            "stopped; ask for a shorter range."
        )

    def _get(self, target: str, ticker: str, what: str) -> dict[str, Any]:
        url = self.base_url + target
        headers = {"Authorization": f"Bearer {self._key}", "Accept": "application/json"}
        # No jitter: the rate limiter already paces this client, and the documented doubling
        # stays exact.
        backoff = Backoff(self.backoff_initial, self.backoff_max, jitter=0.0)
        problem = ""
        limited = f"rate limit {self.limiter.text}"
        for attempt in range(self.max_retries + 1):
            self.limiter.acquire(lambda seconds: self._pause(ticker, Wait(seconds, limited)))
            self.requests_sent += 1
            retry = f"retry {attempt + 1}"
            try:
                resp = self.session.get(url, headers=headers, timeout=self.timeout)
            except requests.RequestException as exc:
                problem = f"could not be reached ({type(exc).__name__})"
                delay = backoff.next()
                detail = self._redact(str(exc))
                why = f"server not reached, {retry}"
            else:
                if resp.status_code == 429:
                    problem = "kept answering HTTP 429 Too Many Requests"
                    hinted = _retry_after(resp.headers.get("Retry-After"))
                    delay = backoff.next()  # counted even when the server says how long
                    if hinted is not None:
                        delay = hinted
                    detail = "HTTP 429"
                    why = "429 from the server"
                elif resp.status_code in _RETRY_STATUSES:
                    problem = f"kept answering HTTP {resp.status_code}"
                    delay = backoff.next()
                    detail = f"HTTP {resp.status_code}"
                    why = f"server error {resp.status_code}, {retry}"
                else:
                    body = self._decode(resp, ticker, what)
                    self.pages_received += 1
                    return body
            if attempt == self.max_retries:
                break
            # An observer shows the wait already: the line is then for --debug.
            log.log(
                logging.DEBUG if self.on_wait else logging.WARNING,
                "%s",
                self._redact(
                    f"REST request for {what} failed ({detail}); "
                    f"retry {attempt + 1} of {self.max_retries} in {delay:.1f}s"
                ),
            )
            self._pause(ticker, Wait(delay, why))
        raise RestError(
            self._redact(
                f"The REST API at {self.base_url} {problem} while fetching {what}, "
                f"{self.max_retries} retries included: check the network or try again later."
            )
        )

    def _pause(self, ticker: str, wait: Wait) -> None:
        """Sleep, telling `on_wait` before and after; the time counts even when Ctrl-C cuts
        it short."""
        if self.on_wait is not None:
            self.on_wait(ticker, wait)
        began = time.monotonic()
        try:
            time.sleep(wait.seconds)
        finally:
            self.waited += time.monotonic() - began
            if self.on_wait is not None:
                self.on_wait(ticker, None)

    def _decode(self, resp: requests.Response, ticker: str, what: str) -> dict[str, Any]:
        try:
            body = msgspec.json.decode(resp.content)
        except msgspec.DecodeError:
            body = None
        if not isinstance(body, dict):
            body = {}
        status = str(body.get("status", "")).upper()
        message = _server_message(body)
        code = resp.status_code
        if code == 401:
            raise RestAuthError(
                "The REST API refused the API key (HTTP 401): "
                "check POLYGON_API_KEY or MASSIVE_API_KEY."
            )
        if status == "NOT_AUTHORIZED" or code == 403:
            raise NotEntitled(
                f"Your Massive plan does not include {what}: "
                "upgrade the plan or ask for data it covers."
            )
        if code == 404:
            raise UnknownTicker(
                f"The REST API does not know the ticker {ticker} (HTTP 404): "
                "check the symbol and POLYGON_REST_URL."
            )
        if code == 200 and not body:
            raise RestError(
                f"The REST API at {self.base_url} sent a response that is not a JSON object "
                f"while fetching {what}: check POLYGON_REST_URL."
            )
        if code != 200 or status == "ERROR":
            said = f" ({message})" if message else ""
            raise RestError(
                self._redact(
                    f"The REST API refused the request for {what} with HTTP {code}{said}: "
                    "check the symbol, timeframe and dates."
                )
            )
        return body


def _server_message(body: Mapping[str, Any]) -> str:
    for field in ("error", "message"):
        value = body.get(field)
        if isinstance(value, str) and value.strip():
            # The server's text goes inside our sentence, so it must not end it early.
            return " ".join(value.split()).rstrip(".")[:200]
    return ""


def _check_range(start_ms: int, end_ms: int) -> None:
    if start_ms >= end_ms:
        raise RestError(
            f"The start {_iso(start_ms)} is not before the end {_iso(end_ms)}: "
            "give the earlier date first."
        )


def _no_data(ticker: str, kind: str, start_ms: int, end_ms: int) -> str:
    return (
        f"The REST API has no {kind} for {ticker} from {_iso(start_ms)} to {_iso(end_ms)}: "
        "check that the ticker exists (for example X:BTCUSD) and that the dates are right."
    )


def _agg_frame(ticker: str, results: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "time": [r.get("t") for r in results],
            "open": [r.get("o") for r in results],
            "high": [r.get("h") for r in results],
            "low": [r.get("l") for r in results],
            "close": [r.get("c") for r in results],
            "volume": [r.get("v") for r in results],
            "vwap": [r.get("vw") for r in results],
            "trades": [r.get("n") for r in results],
            "symbol": [ticker] * len(results),
        },
        schema=AGG_SCHEMA,
        strict=False,
    )


def _trade_time(r: Mapping[str, Any]) -> int | None:
    # Crypto trades carry only the exchange's `participant_timestamp` (ns); `sip_timestamp` is
    # accepted in case the API adds it.
    ns = r.get("participant_timestamp") or r.get("sip_timestamp")
    return None if ns is None else int(ns) // _NS_PER_MS


def _trade_frame(ticker: str, results: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    times = [_trade_time(r) for r in results]
    return pl.DataFrame(
        {
            "symbol": [ticker] * len(results),
            "time": times,
            "price": [r.get("price") for r in results],
            "size": [r.get("size") for r in results],
            "side": [trade_side(r.get("conditions")) for r in results],
            "exchange": [r.get("exchange") for r in results],
            "trade_id": [None if r.get("id") is None else str(r["id"]) for r in results],
            "received": times,
        },
        schema=TRADE,
        strict=False,
    )


def bar_records(frame: pl.DataFrame, timeframe_ms: int) -> pl.DataFrame:
    """Aggregate pages as final bar records, with `schema.BAR`'s columns and dtypes."""
    made = {
        "timeframe": pl.lit(timeframe_name(timeframe_ms)),
        "start": pl.col("time"),
        "end": pl.col("time") + timeframe_ms,
        # Aggregates do not split the volume by side.
        "buy_volume": pl.lit(None),
        "sell_volume": pl.lit(None),
        "state": pl.lit("final"),
    }
    return frame.select(
        (made[c] if c in made else pl.col(c)).cast(t).alias(c) for c, t in BAR.items()
    )


def backfill(
    client: RestClient,
    symbols: Iterable[str],
    start_ms: int,
    end_ms: int,
    *,
    timeframe_ms: int = 60_000,
    trades: bool = False,
    sink: Callable[[str, pl.DataFrame], None],
    on_page: Progress | None = None,
) -> dict[str, int]:
    """Send every page for every symbol to `sink("bars" | "trades", frame)`; rows per symbol.

    Everything is checked before the first request: the range, the timeframe and the symbols.
    Bars are final bar records; trades have `schema.TRADE` columns.
    """
    _check_range(start_ms, end_ms)
    if timeframe_ms not in TIMEFRAMES.values():
        raise RestError(
            f"A timeframe of {timeframe_ms} ms cannot be backfilled: "
            f"use one of {' '.join(TIMEFRAMES)}."
        )
    tickers = list(dict.fromkeys(normalize(s) for s in symbols))
    counts: dict[str, int] = {}
    for ticker in tickers:
        counts[ticker] = 0
        for page in client.aggregates(ticker, timeframe_ms, start_ms, end_ms):
            sink("bars", bar_records(page, timeframe_ms))
            counts[ticker] += page.height
            if on_page is not None:
                done = min(end_ms, int(page["time"][-1]) + timeframe_ms)
                on_page(ticker, page.height, done)
        if trades:
            for page in client.trades(ticker, start_ms, end_ms):
                sink("trades", page)
                counts[ticker] += page.height
                if on_page is not None:
                    on_page(ticker, page.height, int(page["time"][-1]))
    return counts
