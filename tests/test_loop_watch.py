"""The test servers' loop watch: it must catch real blocking and only that."""

from __future__ import annotations

import ctypes
import gc
import threading
import time

from tests.support import SLOW_CALLBACK_CPU_S, SLOW_CALLBACK_WALL_S, LoopThread

# How long the GIL test's other thread holds the GIL: well above the CPU budget a callback is blamed for,
# well below the wall-clock limit that catches a callback blocking without using the CPU.
HOLD_S = 0.5


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
    # Mid-callback, another thread takes the GIL for one long C call: the callback waits on the wall clock
    # while doing almost no work of its own. That is the box being busy (on CI: generation threads and the
    # test's own client), not the code blocking the loop. The C call is a sleep made through ctypes.PyDLL,
    # which keeps the GIL for its whole length: the hold is HOLD_S on any machine, fast or loaded, where a
    # computation's length would be whatever the CPU and the load make it.
    thread = LoopThread()
    try:

        def hog() -> None:
            ctypes.PyDLL(None).usleep(int(HOLD_S * 1_000_000))

        async def kept_waiting() -> tuple[float, float]:
            wall, cpu = time.monotonic(), time.thread_time()
            hogger = threading.Thread(target=hog)
            hogger.start()
            while hogger.is_alive():
                pass  # gives the GIL up to the hog within one switch interval, then waits for it
            hogger.join()
            return time.monotonic() - wall, time.thread_time() - cpu

        held, worked = thread.call(kept_waiting())
        # The scene is as described: held up well past the CPU budget, working well within it.
        assert held >= HOLD_S > SLOW_CALLBACK_CPU_S, held
        assert worked < SLOW_CALLBACK_CPU_S / 2, worked
        assert thread.slow.seen == []
    finally:
        thread.close()


def test_time_in_the_garbage_collector_is_not_blamed() -> None:
    # A full collection lands in whichever callback allocates; with enough live objects it takes long.
    thread = LoopThread()
    hoard = [[i] for i in range(1_000_000)]  # many small containers for the collector to walk
    try:

        async def collect() -> float:
            # Collect until the collector has spent more than the CPU budget, however fast this machine is.
            start = time.thread_time()
            while time.thread_time() - start <= SLOW_CALLBACK_CPU_S * 1.5:
                gc.collect()
            return time.thread_time() - start

        spent = thread.call(collect())
        assert spent > SLOW_CALLBACK_CPU_S, "the collections should have taken a while"
        assert thread.slow.seen == []
    finally:
        del hoard
        thread.close()
