"""A deadline for a known task, cheap to set and to push back.

It behaves as ``asyncio.timeout`` (CPython's ``Lib/asyncio/timeouts.py``: the task is
cancelled when the deadline passes, and the ``CancelledError`` becomes ``TimeoutError`` at
the block's end unless something else cancelled the task too), with two differences that
matter on the hot path:

* the loop and the task are given, not looked up: ``asyncio.timeout`` asks for the current
  task and the running loop on every use (on Python 3.11 each ask is a ``getpid()`` call);
* pushing the deadline back only records the new time. The timer stays armed at the old
  one; when it fires early it re-arms itself for what is left. The response relay pushes
  its idle deadline back on every chunk (an SSE event): re-arming a timer each time costs
  more than the rest of the event's relay (an ``asyncio.timeout`` per chunk was ~4.5 µs).

A deadline may fire up to :data:`SLACK` early, as a loop's timers may (their clock's
resolution): the timer is not re-armed for less than that.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

SLACK = 0.001  # seconds: uvloop's timers are in whole milliseconds

_CREATED, _ENTERED, _EXPIRING, _EXPIRED, _EXITED = range(5)


class Deadline:
    """``async with Deadline(loop, task, when):`` raises ``TimeoutError`` past ``when``
    (``loop.time()`` seconds; None: no deadline until :meth:`reschedule` sets one)."""

    __slots__ = ("_armed_at", "_cancelling", "_handle", "_loop", "_state", "_task", "_when")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object], when: float | None
    ) -> None:
        self._loop, self._task, self._when = loop, task, when
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = math.inf
        self._state = _CREATED
        self._cancelling = 0

    def expired(self) -> bool:
        """Whether the deadline passed (and cancelled the task)."""
        return self._state == _EXPIRING or self._state == _EXPIRED

    def reschedule(self, when: float | None) -> None:
        """Move the deadline to ``when`` (None: no deadline for now). Later than the armed
        timer: only noted. Earlier: the timer is armed again."""
        self._when = when
        if when is not None and when < self._armed_at and self._state == _ENTERED:
            self._arm(when)

    def after(self, seconds: float) -> None:
        """The deadline ``seconds`` from now."""
        self.reschedule(self._loop.time() + seconds)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle, self._armed_at = None, math.inf
        when = self._when
        if when is None or self._state != _ENTERED:
            return  # no deadline for now: the next reschedule arms the timer again
        if when - self._loop.time() > SLACK:
            self._arm(when)  # pushed back since it was armed
            return
        self._task.cancel()
        self._state = _EXPIRING

    async def __aenter__(self) -> Deadline:
        if self._state != _CREATED:
            raise RuntimeError("a Deadline is entered once")
        self._state = _ENTERED
        self._cancelling = self._task.cancelling()
        if self._when is not None:
            self._arm(self._when)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle, self._armed_at = None, math.inf
        if self._state == _EXPIRING:
            self._state = _EXPIRED
            # Ours alone (no other cancellation came on top): the timeout is the answer.
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc
        elif self._state == _ENTERED:
            self._state = _EXITED
