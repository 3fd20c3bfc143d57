"""The test servers' loop watch: it must catch real blocking and only that."""

from __future__ import annotations

import gc
import threading
import time

from tests.support import SLOW_CALLBACK_CPU_S, SLOW_CALLBACK_WALL_S, LoopThread


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_callback_burning_cpu_on_the_loop_is_caught() -> None:
    thread = LoopThread()
    try:

        async def burn() -> None:
            _spin(SLOW_CALLBACK_CPU_S + 0.05)

        thread.call(burn())
        assert len(thread.slow.seen) == 1
        assert "of CPU" in thread.slow.seen[0]
    finally:
        thread.close()


def test_a_callback_sleeping_on_the_loop_is_caught() -> None:
    thread = LoopThread()
    try:

        async def sleep_blocking() -> None:
            time.sleep(SLOW_CALLBACK_WALL_S + 0.05)  # noqa: ASYNC251  # the block under test

        thread.call(sleep_blocking())
        assert len(thread.slow.seen) == 1
    finally:
        thread.close()


def test_a_short_callback_kept_waiting_for_the_gil_is_not_blamed() -> None:
    # Mid-callback, another thread takes the GIL for one long C call (a big integer power): the callback
    # waits most of a second on the wall clock while doing almost no work of its own. That is the box
    # being busy (on CI: generation threads and the test's own client), not the code blocking the loop.
    thread = LoopThread()
    try:

        def hog() -> None:
            _ = 3 ** (4 * 10**6)  # about a second in one C call on a CI core

        async def kept_waiting() -> float:
            start = time.monotonic()
            hogger = threading.Thread(target=hog)
            hogger.start()
            while hogger.is_alive() and time.monotonic() - start < 10:
                pass  # gives the GIL up to the hog within one switch interval, then waits for it
            hogger.join()
            return time.monotonic() - start

        held = thread.call(kept_waiting())
        assert held > 0.5, "the hog should have held the callback up"
        assert thread.slow.seen == []
    finally:
        thread.close()


def test_time_in_the_garbage_collector_is_not_blamed() -> None:
    # A full collection lands in whichever callback allocates; with enough live objects it takes long.
    thread = LoopThread()
    hoard = [[i] for i in range(3_000_000)]  # many small containers for the collector to walk
    try:

        async def collect() -> float:
            start = time.thread_time()
            gc.collect()
            return time.thread_time() - start

        spent = thread.call(collect())
        assert spent > SLOW_CALLBACK_CPU_S, "the collection should have taken a while"
        assert thread.slow.seen == []
    finally:
        del hoard
        thread.close()
