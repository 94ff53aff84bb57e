"""Worker threads, one base for all: the feed reader, the replay reader, the database writer, the
Telegram notifier and the gap-repair fetcher each run on a named daemon thread with an optional
bounded inbox, start/stop/join, backoff with jitter, and a fatal error kept as one sentence.

The owner calls `start`, `put` (never blocks unless the subclass says so), `stop` and `join`
from its own thread; the subclass's `run` is the thread's body and watches `stopping`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from typing import Generic, Self, TypeVar

from .errors import PolystreamError

log = logging.getLogger(__name__)

T = TypeVar("T")


class WorkerError(PolystreamError):
    """A worker thread ended on an error nobody foresaw."""


class Backoff:
    """Capped exponential backoff with jitter: the n-th delay is `base · (1 − jitter · u)` with
    base = min(maximum, initial · 2ⁿ) and u uniform in [0, 1), so that many clients do not retry
    in lockstep; `reset` after a success."""

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if not 0.0 <= jitter <= 1.0:
            raise ValueError("jitter must be within [0, 1]")
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.attempts = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The delay before the next attempt; counts the attempt."""
        base = min(self.maximum, self.initial * 2.0 ** min(self.attempts, 64))
        self.attempts += 1
        return float(base * (1.0 - self.jitter * self._rng.random()))

    def reset(self) -> None:
        self.attempts = 0


_WAKE = object()


class Worker(Generic[T]):
    """A named daemon thread running `run`, with an inbox of at most `inbox_size` items (none
    when 0).

    `put` puts an item in the inbox without blocking; when it is full, `overflow(item)`
    decides (by default the caller waits for room: market data is never dropped). `stop` asks
    the thread to end within `timeout` seconds (`deadline` tells it when) and waits that long
    when a timeout is given; `stopped()` then runs on the caller's thread. An exception that
    escapes `run` ends the thread and is kept in `fatal` as one sentence.
    """

    def __init__(self, name: str, *, inbox_size: int = 0) -> None:
        self.name = name
        self.inbox: queue.Queue[T] | None = queue.Queue(inbox_size) if inbox_size > 0 else None
        self.fatal: PolystreamError | None = None
        self.deadline = float("inf")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False

    # -- the owner's side ------------------------------------------------------------------------

    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
            self._thread.start()
        return self

    def put(self, item: T) -> None:
        """Hand `item` to the thread; see the class docstring for a full inbox."""
        assert self.inbox is not None, f"{self.name} has no inbox"
        try:
            self.inbox.put_nowait(item)
        except queue.Full:
            self.overflow(item)
        else:
            self._wake.set()

    def overflow(self, item: T) -> None:
        """The inbox is full: wait for room (polling, so that a stop is noticed)."""
        assert self.inbox is not None
        while True:
            try:
                self.inbox.put(item, timeout=0.2)
                self._wake.set()
                return
            except queue.Full:
                if self.stopping and not self.alive:
                    raise

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to end, within `timeout` seconds when given (and wait that long)."""
        if timeout is not None:
            self.deadline = min(self.deadline, time.monotonic() + max(0.0, timeout))
        self._stop.set()
        self._wake.set()
        if self.inbox is not None:
            # a full inbox is being worked on: the flag is seen between items
            with contextlib.suppress(queue.Full):
                self.inbox.put_nowait(_WAKE)  # type: ignore[arg-type]
        if timeout is not None:
            self.join(timeout)
        if not self._stopped and not self.alive:
            self._stopped = True
            self.stopped()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True when it has ended (or never started)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.alive

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the thread's side -----------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def left(self) -> float:
        """Seconds until the deadline `stop` gave (infinite before, or without one)."""
        return self.deadline - time.monotonic()

    def sleep(self, seconds: float) -> bool:
        """Wait up to `seconds` (None: until woken); True when `stop` was called meanwhile."""
        return self._stop.wait(seconds)

    def pause(self, seconds: float | None) -> None:
        """Wait up to `seconds` (None: until woken) or until an offer or `stop` wakes us."""
        self._wake.wait(seconds)
        self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    def next_item(self, timeout: float | None) -> T | None:
        """The next item of the inbox, waiting up to `timeout` seconds (0: don't wait); None when
        there is none or `stop` interrupted the wait."""
        assert self.inbox is not None
        try:
            item = self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
        except queue.Empty:
            return None
        return None if item is _WAKE else item

    def drain(self) -> list[T]:
        """Everything the inbox holds now."""
        items: list[T] = []
        if self.inbox is None:
            return items
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return items
            if item is not _WAKE:
                items.append(item)

    def run(self) -> None:
        """The thread's body: return when `stopping` (or when there is nothing more to do)."""
        raise NotImplementedError

    def stopped(self) -> None:
        """Runs on the owner's thread once the thread has ended after `stop`."""

    def _main(self) -> None:
        try:
            self.run()
        except PolystreamError as exc:
            self.fatal = exc
        except Exception as exc:
            log.exception("%s stopped after an unexpected error", self.name)
            self.fatal = WorkerError(
                f"The {self.name} thread stopped after an unexpected error "
                f"({type(exc).__name__}: {exc})."
            )
