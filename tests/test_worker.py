"""The worker base: backoff with jitter, a named thread with a bounded inbox and its full-inbox
policy, stop within a deadline, and an unforeseen error kept as one sentence."""

from __future__ import annotations

import random
import threading
import time

import pytest

from polystream.errors import PolystreamError
from polystream.worker import Backoff, Worker, WorkerError


def test_backoff_doubles_up_to_its_cap_with_jitter_below_each_step() -> None:
    backoff = Backoff(0.5, 8.0, jitter=0.5, rng=random.Random(7))
    delays = [backoff.next() for _ in range(8)]
    bases = [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    for delay, base in zip(delays, bases, strict=True):
        assert base / 2 <= delay <= base
    assert len(set(delays)) == len(delays)  # jittered, not in lockstep
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5


def test_backoff_without_jitter_is_exact() -> None:
    backoff = Backoff(0.05, 0.2, jitter=0.0)
    assert [backoff.next() for _ in range(4)] == [0.05, 0.1, 0.2, 0.2]
    with pytest.raises(ValueError):
        Backoff(1, 2, jitter=1.5)


class Collector(Worker[int]):
    """Takes items one by one, slowly when asked; what did not fit goes to `spilled`."""

    def __init__(self, inbox_size: int = 4, delay: float = 0.0) -> None:
        super().__init__("polystream-test", inbox_size=inbox_size)
        self.delay = delay
        self.seen: list[int] = []
        self.spilled: list[int] = []
        self.thread_names: set[str] = set()
        self.closed = 0

    def run(self) -> None:
        while not self.stopping or (self.inbox is not None and not self.inbox.empty()):
            item = self.next_item(0.05)
            if item is None:
                continue
            self.thread_names.add(threading.current_thread().name)
            time.sleep(self.delay)
            self.seen.append(item)

    def overflow(self, item: int) -> None:
        self.spilled.append(item)

    def stopped(self) -> None:
        self.closed += 1


def test_items_are_handled_in_order_on_the_named_thread_and_stop_waits() -> None:
    worker = Collector().start()
    for i in range(3):
        worker.put(i)
    worker.stop(5.0)
    assert worker.seen == [0, 1, 2]
    assert worker.thread_names == {"polystream-test"}
    assert not worker.alive and worker.closed == 1
    worker.stop(1.0)
    assert worker.closed == 1  # the hook runs once


def test_a_full_inbox_follows_the_workers_policy_and_loses_nothing() -> None:
    worker = Collector(inbox_size=2, delay=0.2).start()
    for i in range(8):
        worker.put(i)  # never blocks: the policy here is to set items aside
    worker.stop(10.0)
    assert sorted(worker.seen + worker.spilled) == list(range(8))
    assert worker.spilled  # the inbox did fill up


def test_the_default_policy_waits_for_room() -> None:
    class Waiting(Collector):
        overflow = Worker.overflow  # type: ignore[assignment]

    worker = Waiting(inbox_size=1, delay=0.05).start()
    started = time.monotonic()
    for i in range(6):
        worker.put(i)
    assert time.monotonic() - started >= 0.1  # the caller waited for room
    worker.stop(5.0)
    assert worker.seen == list(range(6))


def test_stop_without_a_timeout_returns_at_once_and_join_waits() -> None:
    worker = Collector(delay=0.3).start()
    worker.put(1)
    time.sleep(0.05)
    started = time.monotonic()
    worker.stop()
    assert time.monotonic() - started < 0.1
    assert worker.join(5.0) and worker.seen == [1]


def test_an_unforeseen_error_ends_the_thread_as_one_sentence() -> None:
    class Broken(Worker[None]):
        def run(self) -> None:
            raise ValueError("the disk is a teapot")

    worker = Broken("polystream-broken").start()
    assert worker.join(5.0)
    assert isinstance(worker.fatal, WorkerError)
    text = str(worker.fatal)
    assert "polystream-broken" in text and "the disk is a teapot" in text
    assert text.endswith(".") and "\n" not in text


def test_a_library_error_is_kept_as_it_is() -> None:
    class Refused(Worker[None]):
        def run(self) -> None:
            raise PolystreamError("The database refused the login: check DATABASE_URL.")

    worker = Refused("polystream-refused").start()
    assert worker.join(5.0)
    assert str(worker.fatal) == "The database refused the login: check DATABASE_URL."
