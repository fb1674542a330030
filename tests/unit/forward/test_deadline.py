"""forward/deadline: asyncio.timeout's answers, a timer armed once and pushed back lazily.

The clock is a fake (``FakeLoop``): a test moves time and fires the timers due, so that
"fired early, re-armed for what was left" is seen exactly, with no sleep. The last tests
run the real thing on the running loop, against ``asyncio.timeout`` on the same scripts.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.forward.deadline import SLACK, Deadline


class FakeHandle:
    def __init__(self, when: float, callback: Any) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """``time()`` and ``call_at()``; :meth:`advance` runs what falls due, in order."""

    def __init__(self) -> None:
        self.now = 100.0
        self.handles: list[FakeHandle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> FakeHandle:
        handle = FakeHandle(when, callback)
        self.handles.append(handle)
        return handle

    def armed(self) -> list[float]:
        return [h.when for h in self.handles if not h.cancelled]

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while due := [h for h in self.handles if not h.cancelled and h.when <= self.now]:
            handle = min(due, key=lambda h: h.when)
            handle.cancelled = True  # ran: no longer pending
            handle.callback()


class FakeTask:
    def __init__(self) -> None:
        self.cancels = 0

    def cancel(self) -> bool:
        self.cancels += 1
        return True

    def cancelling(self) -> int:
        return self.cancels

    def uncancel(self) -> int:
        self.cancels -= 1
        return self.cancels


def run_now(coroutine: Any) -> None:
    """Run a coroutine that never waits (``__aenter__``, ``__aexit__``) to its end."""
    with pytest.raises(StopIteration):
        coroutine.send(None)


def entered(when: float | None) -> tuple[Deadline, FakeLoop, FakeTask]:
    loop, task = FakeLoop(), FakeTask()
    start = None if when is None else loop.now + when
    deadline = Deadline(loop, task, start)  # type: ignore[arg-type]
    run_now(deadline.__aenter__())
    return deadline, loop, task


def test_it_cancels_the_task_when_the_time_comes_and_not_before() -> None:
    deadline, loop, task = entered(5.0)
    loop.advance(4.9)
    assert (task.cancels, deadline.expired()) == (0, False)
    loop.advance(0.1)
    assert (task.cancels, deadline.expired()) == (1, True)


def test_pushing_it_back_arms_no_timer_and_the_early_one_rearms_for_what_is_left() -> None:
    deadline, loop, task = entered(5.0)
    for _ in range(100):  # a chunk a second: each pushes the idle deadline back
        loop.advance(1.0)
        deadline.after(5.0)
    assert task.cancels == 0
    # Armed at t+5; each time it fires the deadline is 4 s on (the last push was 1 s ago):
    # t+5, t+9, ... t+101, one timer per 4 s of the stream (25), not one per chunk (100).
    assert len(loop.handles) == 25
    loop.advance(4.9)
    assert task.cancels == 0
    loop.advance(0.1)
    assert task.cancels == 1


def test_moved_earlier_the_timer_is_armed_again_at_once() -> None:
    deadline, loop, task = entered(60.0)
    deadline.reschedule(loop.now + 2.0)
    assert loop.armed() == [loop.now + 2.0]
    loop.advance(2.0)
    assert task.cancels == 1


def test_no_deadline_while_off_and_the_next_one_counts_from_then() -> None:
    deadline, loop, task = entered(5.0)
    deadline.reschedule(None)  # a chunk is being sent to a slow client
    loop.advance(30.0)
    assert task.cancels == 0 and loop.armed() == []
    deadline.after(5.0)
    loop.advance(4.9)
    assert task.cancels == 0
    loop.advance(0.1)
    assert task.cancels == 1


def test_within_the_slack_it_fires_rather_than_arming_a_timer_for_nothing() -> None:
    deadline, loop, task = entered(5.0)
    deadline.reschedule(loop.now + 5.0 + SLACK / 2)
    loop.advance(5.0)
    assert task.cancels == 1


def test_after_the_block_nothing_fires() -> None:
    deadline, loop, task = entered(5.0)
    run_now(deadline.__aexit__(None, None, None))
    assert loop.armed() == []
    deadline.reschedule(loop.now + 1.0)  # too late to matter: the block ended
    loop.advance(10.0)
    assert task.cancels == 0 and not deadline.expired()


@pytest.mark.anyio
async def test_on_the_running_loop_it_answers_as_asyncio_timeout() -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    never = asyncio.Event()

    async def waits_past(clock: Any) -> str:
        try:
            async with clock:
                await never.wait()
        except TimeoutError:
            return "TimeoutError"
        return "done"

    # Due at once: the first await is cancelled, and the block raises TimeoutError.
    ours = await waits_past(Deadline(loop, task, loop.time()))
    theirs = await waits_past(asyncio.timeout_at(loop.time()))
    assert ours == theirs == "TimeoutError"
    assert task.cancelling() == 0  # uncancelled on the way out, as asyncio's is

    deadline = Deadline(loop, task, None)
    async with deadline:
        await asyncio.sleep(0)
    assert not deadline.expired()


@pytest.mark.anyio
async def test_a_cancellation_of_its_own_is_not_turned_into_a_timeout() -> None:
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    async def body() -> None:
        task = asyncio.current_task()
        assert task is not None
        async with Deadline(loop, task, loop.time() + 3600):
            started.set()
            await asyncio.Event().wait()

    inner = asyncio.ensure_future(body())
    await started.wait()
    inner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await inner
