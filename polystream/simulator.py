"""Built-in demo feed: a loopback WebSocket server speaking the Polygon crypto protocol.

BTC-USD replays the real minute bars in `data/`, other pairs follow a seeded random walk; prices,
sizes and sides depend only on `seed`, while events carry the current wall-clock time.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import queue
import random
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from types import TracebackType
from typing import Any, NamedTuple, Protocol

import msgspec
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve

from .schema import PRICES, SIDE_BUY, SIDE_SELL

CHANNELS = ("XT", "XQ", "XA", "XAS", "XL2")
DEMO_PAIRS = ("BTC-USD", "ETH-USD", "SOL-USD")
REPLAY_PAIR = "BTC-USD"

_BARS_FILE = "btcusd_1m_2019-03-29.csv"
_PAIR_FORM = re.compile(r"^[A-Z0-9]{1,12}-[A-Z0-9]{2,6}$")
_BASE_PRICES = {"ETH-USD": 3000.0, "SOL-USD": 150.0}
_OTHER_BASE_PRICE = 100.0
_EXCHANGES = (1, 2, 6, 23)
_SATOSHI = 100_000_000
_SECOND_MS = 1000
_MINUTE_MS = 60_000
_TICK_SECONDS = (0.02, 0.04)
_BOOK_SECONDS = 1.0
_BOOK_DEPTH = 20
_QUOTES_PER_BATCH = 3
# A tick never generates more than this much market time, so that a process that was
# suspended does not wake up to a burst of hours of trades.
_MAX_CATCH_UP = 2.0
# Frames waiting for one client; beyond this the client is cut off as the real feed cuts off
# slow consumers, instead of the server buffering without bound.
_MAX_BACKLOG = 20_000
_CLOSE_TIMEOUT = 0.5
_STOP_GRACE = 0.4
_STATUS_CLOSE_CODE = 1008
_SENDABLE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})

# Per-trade GARCH(1,1) parameters: long-run volatility of 0.3 bp per trade, strong persistence
# so calm and busy stretches alternate, and a slow pull back to the base price so a long demo
# does not wander off.
_LONG_RUN_VAR = 3e-5**2
_GARCH_ALPHA = 0.06
_GARCH_BETA = 0.93
_GARCH_OMEGA = _LONG_RUN_VAR * (1 - _GARCH_ALPHA - _GARCH_BETA)
_MEAN_REVERSION = 1e-6
_MEDIAN_NOTIONAL = 300.0

# The websockets library logs a traceback whenever a client vanishes mid-handshake or
# mid-frame, and at debug level every frame, API keys included; for a demo server both are
# noise or worse, so only critical records get through, whatever the root level.
_WS_LOG = logging.getLogger("polystream.simulator.websockets")
_WS_LOG.setLevel(logging.CRITICAL)


class _Bar(NamedTuple):
    open: float
    high: float
    low: float
    close: float
    units: int


class _Fill(NamedTuple):
    at: float
    price: float
    units: int
    side: int
    exchange: int


class _Path(Protocol):
    decimals: int

    def take(self, until: float) -> list[_Fill]: ...


@lru_cache(maxsize=1)
def _load_bars() -> tuple[_Bar, ...]:
    text = resources.files("polystream.data").joinpath(_BARS_FILE).read_text(encoding="utf-8")
    bars: list[_Bar] = []
    for row in csv.DictReader(io.StringIO(text)):
        o, h, lo, c = (float(row[k]) for k in PRICES)
        volume = float(row["volume"])
        values = (o, h, lo, c, volume)
        if not all(math.isfinite(v) for v in values) or min(o, h, lo, c) <= 0 or volume < 0:
            continue
        bars.append(_Bar(o, h, lo, c, round(volume * _SATOSHI)))
    if not bars:
        raise RuntimeError(f"{_BARS_FILE} holds no usable bar")
    return tuple(bars)


def _decimals(price: float) -> int:
    if price >= 10:
        return 2
    if price >= 0.1:
        return 4
    return 8


def _side_for(price: float, previous: float, last_side: int, rng: random.Random) -> int:
    if price > previous:
        return SIDE_BUY if rng.random() < 0.8 else SIDE_SELL
    if price < previous:
        return SIDE_SELL if rng.random() < 0.8 else SIDE_BUY
    if rng.random() < 0.7:
        return last_side
    return SIDE_SELL if last_side == SIDE_BUY else SIDE_BUY


def _split_units(total: int, count: int, rng: random.Random) -> list[int]:
    """Split `total` into `count` positive integers with random, skewed weights."""
    weights = [rng.expovariate(1.0) + 1e-9 for _ in range(count)]
    spare = total - count
    scale = spare / sum(weights)
    shares = [w * scale for w in weights]
    units = [1 + int(s) for s in shares]
    leftover = total - sum(units)
    by_remainder = sorted(range(count), key=lambda i: (int(shares[i]) - shares[i], i))
    for i in by_remainder[:leftover]:
        units[i] += 1
    return units


class _Replay:
    """Trades synthesised inside the real minute bars, one bar per `bar_seconds` of market time."""

    decimals = 2

    def __init__(
        self, bars: Sequence[_Bar], bar_seconds: float, trades_per_bar: float, rng: random.Random
    ) -> None:
        self._bars = bars
        self._bar_seconds = bar_seconds
        self._trades_per_bar = trades_per_bar
        self._rng = rng
        self._next_bar = 0
        self._pending: deque[_Fill] = deque()
        self._last_price = round(bars[0].open, self.decimals)
        self._last_side = SIDE_BUY
        volumes = sorted(b.units for b in bars if b.units > 0)
        self._median_units = volumes[len(volumes) // 2] if volumes else 1

    def take(self, until: float) -> list[_Fill]:
        out: list[_Fill] = []
        while True:
            while self._pending and self._pending[0].at <= until:
                out.append(self._pending.popleft())
            if self._pending:
                return out
            start = self._next_bar * self._bar_seconds
            if start > until:
                return out
            bar = self._bars[self._next_bar % len(self._bars)]
            self._pending.extend(self._synthesise(bar, start))
            self._next_bar += 1

    def _anchors(self, bar: _Bar) -> list[float]:
        extremes: list[float] = []
        if bar.high > max(bar.open, bar.close):
            extremes.append(bar.high)
        if bar.low < min(bar.open, bar.close):
            extremes.append(bar.low)
        # A rising bar more often dips first and a falling one peaks first, as real bars do.
        low_first = self._rng.random() < (0.7 if bar.close >= bar.open else 0.3)
        extremes.sort(reverse=not low_first)
        if not extremes and bar.open == bar.close:
            return [bar.open]
        return [bar.open, *extremes, bar.close]

    def _synthesise(self, bar: _Bar, start: float) -> list[_Fill]:
        if bar.units <= 0:
            return []
        rng = self._rng
        anchors = self._anchors(bar)
        activity = min(3.0, max(0.3, math.sqrt(bar.units / self._median_units)))
        count = max(len(anchors), round(self._trades_per_bar * activity))
        count = min(count, bar.units)
        if count < len(anchors):
            anchors = [anchors[0], anchors[-1]][:count]
        if len(anchors) == 1:
            raw = [anchors[0]] * count
        else:
            inner = sorted(rng.sample(range(1, count - 1), len(anchors) - 2))
            positions = [0, *inner, count - 1]
            raw = [0.0] * count
            noise = 0.25 * (bar.high - bar.low)
            for j in range(len(positions) - 1):
                a, b = positions[j], positions[j + 1]
                pa, pb = anchors[j], anchors[j + 1]
                for i in range(a, b + 1):
                    frac = (i - a) / (b - a)
                    wiggle = rng.gauss(0.0, noise) * math.sqrt(frac * (1 - frac))
                    raw[i] = min(bar.high, max(bar.low, pa + (pb - pa) * frac + wiggle))
        sizes = _split_units(bar.units, count, rng)
        offsets = sorted(rng.random() * self._bar_seconds for _ in range(count))
        fills: list[_Fill] = []
        for offset, value, units in zip(offsets, raw, sizes, strict=True):
            price = round(value, self.decimals)
            side = _side_for(price, self._last_price, self._last_side, rng)
            fills.append(_Fill(start + offset, price, units, side, rng.choice(_EXCHANGES)))
            self._last_price, self._last_side = price, side
        return fills


class _RandomWalk:
    """A GARCH(1,1)-like log-price walk; trades arrive as a Poisson stream that speeds up with
    the volatility."""

    def __init__(self, base: float, rate: float, rng: random.Random) -> None:
        self.decimals = _decimals(base)
        self._tick = 10.0**-self.decimals
        self._rate = rate
        self._rng = rng
        self._log_base = math.log(base)
        self._log_price = self._log_base
        self._var = _LONG_RUN_VAR
        self._at = 0.0
        self._last_price = round(base, self.decimals)
        self._last_side = SIDE_BUY
        self._next = self._step()

    def _step(self) -> _Fill:
        rng = self._rng
        intensity = min(2.0, max(0.5, math.sqrt(self._var / _LONG_RUN_VAR)))
        self._at += rng.expovariate(self._rate * intensity)
        shock = math.sqrt(self._var) * rng.gauss(0.0, 1.0)
        var = _GARCH_OMEGA + _GARCH_ALPHA * shock * shock + _GARCH_BETA * self._var
        self._var = min(_LONG_RUN_VAR * 100, max(_LONG_RUN_VAR / 25, var))
        self._log_price += shock - _MEAN_REVERSION * (self._log_price - self._log_base)
        price = max(self._tick, round(math.exp(self._log_price), self.decimals))
        side = _side_for(price, self._last_price, self._last_side, rng)
        notional = _MEDIAN_NOTIONAL * rng.lognormvariate(0.0, 1.0)
        units = max(1, round(notional / price * _SATOSHI))
        self._last_price, self._last_side = price, side
        return _Fill(self._at, price, units, side, rng.choice(_EXCHANGES))

    def take(self, until: float) -> list[_Fill]:
        out: list[_Fill] = []
        while self._next.at <= until:
            out.append(self._next)
            self._next = self._step()
        return out


@dataclass
class _Window:
    start: int
    open: float
    high: float
    low: float
    close: float
    units: int
    notional: float
    count: int


class _Aggregator:
    """OHLCV of the trades actually emitted, per wall-clock window of `width` ms."""

    def __init__(self, ev: str, width: int) -> None:
        self.ev = ev
        self.width = width
        self._current: _Window | None = None

    def add(self, t: int, price: float, units: int) -> _Window | None:
        start = t - t % self.width
        w = self._current
        if w is not None and w.start == start:
            w.high = max(w.high, price)
            w.low = min(w.low, price)
            w.close = price
            w.units += units
            w.notional += price * units
            w.count += 1
            return None
        self._current = _Window(start, price, price, price, price, units, price * units, 1)
        return w

    def due(self, now_ms: int) -> _Window | None:
        w = self._current
        if w is not None and w.start + self.width <= now_ms:
            self._current = None
            return w
        return None


def _size(units: int) -> float:
    return round(units / _SATOSHI, 8)


def _encode(event: dict[str, Any]) -> bytes:
    return msgspec.json.encode(event)


def _status(status: str, message: str) -> str:
    frame = [{"ev": "status", "status": status, "message": message}]
    return msgspec.json.encode(frame).decode()


class _Clock:
    """Maps monotonic time to epoch milliseconds, so stamps never go backwards."""

    def __init__(self) -> None:
        self._epoch_ms = time.time() * 1000.0
        self._mono = time.monotonic()

    def ms(self, mono: float) -> int:
        return int(self._epoch_ms + (mono - self._mono) * 1000.0)


_Out = tuple[str, str, bytes]


class _Symbol:
    """One pair's market: its price path, trade ids, last quote and running aggregates."""

    def __init__(self, pair: str, path: _Path, seed: int, now: float) -> None:
        self.pair = pair
        self._path = path
        self._aux = random.Random(f"{seed}:{pair}:aux")
        self._origin = now
        self._taken = 0.0
        self._next_id = random.Random(f"{seed}:{pair}:id").randrange(10_000_000, 90_000_000)
        self._tick = 10.0**-path.decimals
        self._aggs = (_Aggregator("XAS", _SECOND_MS), _Aggregator("XA", _MINUTE_MS))
        self._quote: tuple[float, float, int] | None = None
        self._next_book = now

    def advance(self, now: float, clock: _Clock, emit: bool) -> list[_Out]:
        market = now - self._origin
        if market - self._taken > _MAX_CATCH_UP:
            self._origin += market - self._taken - _MAX_CATCH_UP
            market = now - self._origin
        fills = self._path.take(market)
        self._taken = market
        if not emit:
            # The trades happened but nobody got them: the ids skip, as after a real outage.
            self._next_id += len(fills)
            return []
        now_ms = clock.ms(now)
        out: list[_Out] = []
        quoted = {len(fills) - 1}
        if len(fills) > 1:
            extra = self._aux.randint(0, _QUOTES_PER_BATCH - 1)
            quoted.update(self._aux.sample(range(len(fills) - 1), min(extra, len(fills) - 1)))
        for index, fill in enumerate(fills):
            t = min(now_ms, clock.ms(self._origin + fill.at))
            for agg in self._aggs:
                closed = agg.add(t, fill.price, fill.units)
                if closed is not None:
                    out.append(self._aggregate(agg, closed))
            out.append(("XT", self.pair, self._trade(fill, t)))
            if index in quoted:
                out.append(("XQ", self.pair, self._quote_after(fill, t)))
        for agg in self._aggs:
            closed = agg.due(now_ms)
            if closed is not None:
                out.append(self._aggregate(agg, closed))
        if self._quote is not None and now >= self._next_book:
            self._next_book = now + _BOOK_SECONDS
            out.append(("XL2", self.pair, self._book(now_ms)))
        return out

    def _received(self, t: int) -> int:
        return t + self._aux.randint(2, 15)

    def _trade(self, fill: _Fill, t: int) -> bytes:
        trade_id = self._next_id
        self._next_id += 1
        return _encode(
            {
                "ev": "XT",
                "pair": self.pair,
                "p": fill.price,
                "s": _size(fill.units),
                "t": t,
                "c": [fill.side],
                "i": str(trade_id),
                "x": fill.exchange,
                "r": self._received(t),
            }
        )

    def _quote_after(self, fill: _Fill, t: int) -> bytes:
        # The trade lifted the ask or hit the bid, so the quote keeps it at the touched side.
        dec = self._path.decimals
        price_ticks = round(fill.price / self._tick)
        spread = max(1, round(fill.price * self._aux.uniform(0.2e-4, 2e-4) / self._tick))
        if fill.side == SIDE_BUY and price_ticks - spread >= 1:
            bid_ticks, ask_ticks = price_ticks - spread, price_ticks
        else:
            bid_ticks, ask_ticks = price_ticks, price_ticks + spread
        bid = round(bid_ticks * self._tick, dec)
        ask = round(ask_ticks * self._tick, dec)
        self._quote = (bid, ask, fill.exchange)
        return _encode(
            {
                "ev": "XQ",
                "pair": self.pair,
                "bp": bid,
                "bs": _size(self._book_units(bid)),
                "ap": ask,
                "as": _size(self._book_units(ask)),
                "t": t,
                "x": fill.exchange,
                "r": self._received(t),
            }
        )

    def _book_units(self, price: float) -> int:
        return max(
            1, round(_MEDIAN_NOTIONAL * 5 * self._aux.lognormvariate(0.0, 1.0) / price * _SATOSHI)
        )

    def _book(self, now_ms: int) -> bytes:
        assert self._quote is not None
        bid, ask, exchange = self._quote
        dec = self._path.decimals
        bid_ticks, ask_ticks = round(bid / self._tick), round(ask / self._tick)
        bids: list[list[float]] = []
        asks: list[list[float]] = []
        for _ in range(_BOOK_DEPTH):
            if bid_ticks >= 1:
                price = round(bid_ticks * self._tick, dec)
                bids.append([price, _size(self._book_units(price))])
            price = round(ask_ticks * self._tick, dec)
            asks.append([price, _size(self._book_units(price))])
            bid_ticks -= self._aux.randint(1, 3)
            ask_ticks += self._aux.randint(1, 3)
        return _encode(
            {
                "ev": "XL2",
                "pair": self.pair,
                "t": now_ms,
                "r": self._received(now_ms),
                "x": exchange,
                "b": bids,
                "a": asks,
            }
        )

    def _aggregate(self, agg: _Aggregator, w: _Window) -> _Out:
        dec = self._path.decimals
        event = {
            "ev": agg.ev,
            "pair": self.pair,
            "o": w.open,
            "h": w.high,
            "l": w.low,
            "c": w.close,
            "v": _size(w.units),
            "vw": round(w.notional / w.units, dec + 2),
            "z": _size(round(w.units / w.count)),
            "s": w.start,
            "e": w.start + agg.width,
        }
        return agg.ev, self.pair, _encode(event)


@dataclass(frozen=True)
class _Close:
    code: int
    reason: str


_Item = str | _Close | None


class _Client:
    """One connection: its session state and the queue its writer thread drains in order."""

    def __init__(self, ws: ServerConnection, number: int) -> None:
        self.ws = ws
        self.number = number
        self.authenticated = False
        self.topics: set[tuple[str, str]] = set()
        self.data_frames = 0
        self.malformed = 0
        self.dead = False
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()

    def put(self, item: _Item) -> None:
        if self.dead:
            return
        if self._queue.qsize() > _MAX_BACKLOG:
            self.abort()
            return
        self._queue.put(item)

    def finish(self) -> None:
        self._queue.put(None)

    def wants(self, channel: str, pair: str) -> bool:
        return (channel, pair) in self.topics or (channel, "*") in self.topics

    def abort(self) -> None:
        """Cut the TCP connection without a close frame, as a network failure would."""
        self.dead = True
        with contextlib.suppress(OSError):
            self.ws.socket.shutdown(socket.SHUT_RDWR)

    def write(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, _Close):
                    self.ws.close(item.code, item.reason)
                    return
                self.ws.send(item)
        except (ConnectionClosed, OSError):
            pass
        finally:
            self.dead = True


def _bad_element(part: bytes) -> bytes:
    event = msgspec.json.decode(part)
    assert isinstance(event, dict)
    event["t" if "t" in event else "s"] = "not-a-number"
    return _encode(event)


def _rest_trade(data: bytes) -> dict[str, object]:
    """A trade as the REST trades endpoint gives it: nanosecond timestamps, conditions, id."""
    t = msgspec.json.decode(data)
    return {
        "conditions": t["c"],
        "exchange": t["x"],
        "id": t["i"],
        "participant_timestamp": t["t"] * 1_000_000,
        "price": t["p"],
        "size": t["s"],
    }


class DemoFeed:
    """A Polygon-protocol crypto feed on loopback, with fault switches and counters for tests."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        seed: int = 0,
        bar_seconds: float = 1.0,
        events_per_second: float = 200.0,
        api_key: str | None = None,
        auth_failed: bool = False,
        malformed_every: int = 0,
        tape: list[dict[str, object]] | None = None,
    ) -> None:
        if not bar_seconds > 0 or not math.isfinite(bar_seconds):
            raise ValueError(f"bar_seconds must be a positive number, not {bar_seconds!r}.")
        if not events_per_second > 0 or not math.isfinite(events_per_second):
            raise ValueError(
                f"events_per_second must be a positive number, not {events_per_second!r}."
            )
        if malformed_every < 0:
            raise ValueError(f"malformed_every must be 0 or more, not {malformed_every!r}.")
        self._host = host
        self._port = port
        self._seed = seed
        self._bar_seconds = bar_seconds
        self._events_per_second = events_per_second
        self._api_key = api_key
        self._auth_failed = auth_failed
        self._malformed_every = malformed_every

        self._lock = threading.Lock()
        self._clock = _Clock()
        self._symbols: dict[str, _Symbol] = {}
        self._clients: set[_Client] = set()
        self._threads: list[threading.Thread] = []
        self._stall_until = 0.0
        self._blackout_until = 0.0
        # every trade sent or not, as the REST trades endpoint returns it (for gap repair tests)
        self.tape = tape
        self._connections = 0
        self._auth_attempts = 0
        self._subscribe_messages: list[list[str]] = []

        self._server: Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._closing = False

    # lifecycle

    @property
    def url(self) -> str:
        """`ws://host:port`; with port 0 the real port is known only once started."""
        if self._port == 0:
            raise RuntimeError("The demo feed has no port yet: call start() first.")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"ws://{host}:{self._port}"

    def start(self) -> DemoFeed:
        """Listen and serve in background daemon threads; returns self."""
        with self._lock:
            if self._server is not None:
                raise RuntimeError("The demo feed is already running.")
            self._stopping.clear()
            self._closing = False
            server = serve(
                self._handle,
                self._host,
                self._port,
                logger=_WS_LOG,
                close_timeout=_CLOSE_TIMEOUT,
                max_size=2**20,
            )
            self._server = server
            self._port = int(server.socket.getsockname()[1])
            self._serve_thread = threading.Thread(
                target=server.serve_forever, name=f"demo-feed-serve-{self._port}", daemon=True
            )
            self._ticker = threading.Thread(
                target=self._run_ticker, name=f"demo-feed-ticker-{self._port}", daemon=True
            )
        self._serve_thread.start()
        self._ticker.start()
        return self

    def stop(self) -> None:
        """Close every connection and the listening socket, and join every thread."""
        with self._lock:
            server = self._server
            if server is None:
                return
            self._server = None
            self._closing = True
            clients = list(self._clients)
        self._stopping.set()
        if self._ticker is not None:
            self._ticker.join()
        for client in clients:
            client.put(_Close(1001, "server shutting down"))
        deadline = time.monotonic() + _STOP_GRACE
        for client in clients:
            while client in self._clients_snapshot() and time.monotonic() < deadline:
                time.sleep(0.01)
        for client in self._clients_snapshot():
            client.abort()
        server.shutdown()
        if self._serve_thread is not None:
            self._serve_thread.join()
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout=2.0)

    def __enter__(self) -> DemoFeed:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # fault switches

    def drop_connections(self) -> None:
        """Abort every client's TCP connection with no close frame."""
        for client in self._clients_snapshot():
            client.abort()

    def close_connections(self, code: int = 1001) -> None:
        """Close every connection with a close frame carrying `code`, after pending frames."""
        if code not in _SENDABLE_CLOSE_CODES and not 3000 <= code <= 4999:
            raise ValueError(f"{code} is not a close code a server may send.")
        for client in self._clients_snapshot():
            client.put(_Close(code, ""))

    def send_status(self, status: str, message: str, close: bool = False) -> None:
        """Send a status frame to every client, then close with 1008 if `close`."""
        frame = _status(status, message)
        for client in self._clients_snapshot():
            client.put(frame)
            if close:
                client.put(_Close(_STATUS_CLOSE_CODE, status))

    def stall(self, seconds: float) -> None:
        """Send no data frames for `seconds`; the market moves on and pings are still answered."""
        with self._lock:
            self._stall_until = max(self._stall_until, time.monotonic() + seconds)

    def blackout(self, seconds: float) -> None:
        """Drop every connection and refuse new ones for `seconds`, while the market (and the
        tape) goes on: a real outage, which the client sees as a gap."""
        with self._lock:
            self._blackout_until = max(self._blackout_until, time.monotonic() + seconds)
        self.drop_connections()

    def send_raw(self, text: str) -> None:
        """Send `text` as one text frame to every authenticated client."""
        with self._lock:
            for client in self._clients:
                if client.authenticated:
                    client.put(text)

    # observations

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._connections

    @property
    def auth_attempts(self) -> int:
        """Auth messages received so far."""
        with self._lock:
            return self._auth_attempts

    @property
    def subscribe_messages(self) -> list[list[str]]:
        """The topics of each subscribe message received, in order, across connections."""
        with self._lock:
            return [list(m) for m in self._subscribe_messages]

    @property
    def active_clients(self) -> int:
        """Clients currently connected and authenticated."""
        with self._lock:
            return sum(1 for c in self._clients if c.authenticated and not c.dead)

    # internals

    def _clients_snapshot(self) -> list[_Client]:
        with self._lock:
            return list(self._clients)

    def _handle(self, ws: ServerConnection) -> None:
        with self._lock:
            self._connections += 1
            if self._closing or time.monotonic() < self._blackout_until:
                return
            client = _Client(ws, self._connections)
            self._clients.add(client)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(threading.current_thread())
            writer = threading.Thread(
                target=client.write,
                name=f"demo-feed-writer-{self._port}-{client.number}",
                daemon=True,
            )
            self._threads.append(writer)
        client.put(_status("connected", "Connected Successfully"))
        writer.start()
        try:
            while True:
                self._on_message(client, ws.recv())
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                self._clients.discard(client)
            client.finish()
            writer.join(timeout=2.0)

    def _on_message(self, client: _Client, message: str | bytes) -> None:
        try:
            text = message.decode() if isinstance(message, bytes) else message
            request = msgspec.json.decode(text)
        except (UnicodeDecodeError, msgspec.DecodeError) as err:
            client.put(_status("error", f"invalid JSON: {err}"))
            return
        if not isinstance(request, dict):
            client.put(_status("error", "expected a JSON object with action and params"))
            return
        action, params = request.get("action"), request.get("params")
        if action == "auth":
            self._on_auth(client, params if isinstance(params, str) else "")
        elif action in ("subscribe", "unsubscribe"):
            if not isinstance(params, str):
                client.put(_status("error", "params must be a comma-separated string of topics"))
                return
            topics = [item.strip() for item in params.split(",") if item.strip()]
            self._on_subscription(client, action == "subscribe", topics)
        else:
            client.put(_status("error", f"unknown action: {action!r}"))

    def _on_auth(self, client: _Client, key: str) -> None:
        expected = self._api_key
        ok = not self._auth_failed and (key == expected if expected is not None else bool(key))
        with self._lock:
            self._auth_attempts += 1
            client.authenticated = ok
            if ok:
                client.put(_status("auth_success", "authenticated"))
                return
            client.put(_status("auth_failed", "authentication failed"))
            client.put(_Close(_STATUS_CLOSE_CODE, "authentication failed"))

    def _on_subscription(self, client: _Client, subscribe: bool, topics: list[str]) -> None:
        now = time.monotonic()
        with self._lock:
            if subscribe:
                self._subscribe_messages.append(topics)
            if not client.authenticated:
                client.put(_status("auth_required", "authentication required"))
                return
            for topic in topics:
                channel, dot, pair = topic.partition(".")
                if not dot or channel not in CHANNELS:
                    continue
                if subscribe:
                    client.topics.add((channel, pair))
                    for name in DEMO_PAIRS if pair == "*" else (pair,):
                        self._activate(name, now)
                    client.put(_status("success", f"subscribed to: {topic}"))
                else:
                    client.topics.discard((channel, pair))
                    client.put(_status("success", f"unsubscribed to: {topic}"))

    def _activate(self, pair: str, now: float) -> None:
        if pair in self._symbols or not _PAIR_FORM.match(pair):
            return
        rng = random.Random(f"{self._seed}:{pair}")
        path: _Path
        if pair == REPLAY_PAIR:
            path = _Replay(
                _load_bars(), self._bar_seconds, self._events_per_second * self._bar_seconds, rng
            )
        else:
            base = _BASE_PRICES.get(pair, _OTHER_BASE_PRICE * math.exp(rng.uniform(-0.3, 0.3)))
            path = _RandomWalk(base, self._events_per_second, rng)
        self._symbols[pair] = _Symbol(pair, path, self._seed, now)

    def _run_ticker(self) -> None:
        pace = random.Random(f"{self._seed}:pace")
        while not self._stopping.wait(pace.uniform(*_TICK_SECONDS)):
            self._tick()

    def _tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            emit = now >= self._stall_until
            out: list[_Out] = []
            for symbol in self._symbols.values():
                out.extend(symbol.advance(now, self._clock, emit))
            if self.tape is not None:
                self.tape.extend(_rest_trade(data) for channel, _, data in out if channel == "XT")
            if not out or now < self._blackout_until:
                return
            for client in self._clients:
                if not client.authenticated or client.dead:
                    continue
                parts = [data for channel, pair, data in out if client.wants(channel, pair)]
                if parts:
                    client.put(self._data_frame(client, parts))

    def _data_frame(self, client: _Client, parts: list[bytes]) -> str:
        client.data_frames += 1
        every = self._malformed_every
        if every and client.data_frames % every == 0:
            client.malformed += 1
            if client.malformed % 2:
                whole = b"[" + b",".join(parts) + b"]"
                return whole[: max(1, len(whole) // 2)].decode(errors="replace")
            middle = len(parts) // 2
            parts = [*parts[:middle], _bad_element(parts[0]), *parts[middle:]]
        return (b"[" + b",".join(parts) + b"]").decode()
