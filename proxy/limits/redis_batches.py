"""The Redis limiter's script calls: what one replica sends Redis, a batch at a time.

The admits of one turn of the event loop go in one call of the script
(:mod:`proxy.limits.script`; a batch, in order, at most ``MAX_BATCH``), which first applies
what this replica owes Redis from earlier calls (lease releases, billable units), so giving
a slot back costs no round trip of its own; when no admit comes to carry them within
``FLUSH_DELAY``, a batch of no admits does. Every admit is answered, whatever happens, and
a slot the script may have taken for nobody (the batch failed, the waiter left) is owed
back. What cannot be sent is kept for the next batch, up to ``MAX_PENDING``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError, ResponseError

from ..observe.logs import get_logger
from .base import LimitSettings
from .script import NO_LEASE, Answer, joined
from .usage import MAX_APPS, ONCE_TTL, OTHER

FLUSH_DELAY = 0.02  # s a release or units may wait for a call to carry them
MAX_PENDING = 10_000  # owed operations kept while Redis is down; then dropped (leases expire)
MAX_BATCH = 64  # admits in one script call; a turn with more sends several
_MAX_FIELDS = 3 * MAX_APPS + 3  # a usage hash: g:, u: and s:<app> per app, "other" thrice
STORE_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

log = get_logger("proxy.limits")


@dataclass(frozen=True, slots=True)
class Owed:
    """Units, spend and budget settlements one call owes Redis: ``units`` and ``micros``
    added to ``app`` in the ``usage`` hash (kept until ``until``), and each budget counter
    of ``budgets`` moved by its delta (never below 0; kept until its period ends), all only
    if ``once`` (a fal request id's marker key) is new; :data:`~.script.NO_ONCE`: always."""

    usage: str
    once: str
    app: str
    units: float
    micros: int
    until: int
    budgets: tuple[tuple[str, int, int], ...] = ()  # (counter key, delta, its expiry)


class Call(Protocol):
    """What a batch needs of one admit (the limiter's ``_Call``): its KEYS and arguments
    (in the script's layout) and the future its answer (or the store's error) is given to."""

    keys: list[str]
    args: list[Any]
    answer: asyncio.Future[Any]

    def lease(self) -> tuple[str, str]:
        """(leases key, lease id): what releases the slot this call may have taken."""
        ...


class Batches:
    """The script calls of one limiter: this turn's admits, what is owed, what is in flight.

    ``script`` gives the registered script (redis-py's AsyncScript) when a batch leaves,
    or None before the limiter started (then a batch sends nothing, and what it took of
    the owed is dropped)."""

    def __init__(self, settings: LimitSettings, script: Callable[[], Any]) -> None:
        self._settings = settings
        self._script = script
        self._releases: list[tuple[str, str]] = []  # (leases key, lease id) owed to Redis
        self._units: list[Owed] = []  # units, spend and budget settlements
        self._flush: asyncio.TimerHandle | None = None
        self._queued: list[Call] = []  # this turn's admits, sent together at its end
        self.sending: set[asyncio.Task[None]] = set()  # batches in flight
        # Batches in flight that give slots back, by the leases key they release in: an
        # admit of that key waits for them, so a slot released here is free for its next call.
        self._releasing: dict[str, asyncio.Task[None]] = {}
        # Each script call's round trip and whether it failed (the app's metrics).
        self.on_call: Callable[[float, bool], None] = lambda _seconds, _failed: None

    async def answer(self, call: Call) -> Any:
        """Add an admit to this turn's batch and wait for its answer (or the store's error).
        The batch leaves once every callback of this turn has run."""
        self._queued.append(call)
        if len(self._queued) == 1:
            asyncio.get_running_loop().call_soon(self._send_queued)
        try:
            return await call.answer
        except asyncio.CancelledError:
            # Cancelled in the turn its answer came, before this task ran again: a slot
            # taken for it would have no holder.
            answer = call.answer
            if answer.done() and not answer.cancelled() and self._took_slot(call, answer.result()):
                self.owe([call.lease()], [])
            raise

    def _send_queued(self) -> None:
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), MAX_BATCH):
            self._spawn(self._send(queued[start : start + MAX_BATCH]))

    def _spawn(self, send: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(send)
        self.sending.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self.sending.discard)
        return task

    async def _after_releases(self, calls: list[Call]) -> None:
        """Wait for the batches in flight that give back a slot of these calls' callers.
        Batches travel on several connections, so Redis may run a later one first: a caller
        whose call just ended on this replica would be refused its next call for its own
        released slot. Other callers' admits do not wait."""
        releasing = self._releasing
        if not releasing:
            return
        waits = {task for call in calls if (task := releasing.get(call.lease()[0])) is not None}
        if waits:
            await asyncio.wait(waits)  # their outcome is their own (what fails is owed again)

    def _releases_in_flight(self, releases: list[tuple[str, str]]) -> None:
        """This batch (the current task) gives back these slots until it is done."""
        task = asyncio.current_task()
        assert task is not None
        for key, _ in releases:
            self._releasing[key] = task

        def done(_task: object) -> None:
            for key, _ in releases:
                if self._releasing.get(key) is task:
                    del self._releasing[key]

        task.add_done_callback(done)

    async def _send(self, calls: list[Call]) -> None:
        """One script call: what is owed, then ``calls`` in order (none: only what is owed).
        Every call is answered, whatever happens; a slot nobody will hold is given back."""
        if calls:
            await self._after_releases(calls)
        calls = [call for call in calls if not call.answer.cancelled()]  # gone: nothing taken
        releases, units, keys, args = self._take_owed()
        if releases:
            self._releases_in_flight(releases)
        script = self._script()
        if not (calls or releases or units) or script is None:
            return
        settings = self._settings
        head = [len(calls), len(releases), len(units), settings.lease_ttl,
                settings.concurrent, _MAX_FIELDS, OTHER, ONCE_TTL]  # fmt: skip
        keys.insert(0, ":".join([settings.key_prefix, "batch", unique_id()]))
        for call in calls:
            keys += call.keys
            args += call.args
        sent, answered = time.perf_counter(), False
        try:
            answers: list[Any] = await script(keys=keys, args=[joined(head + args)])
            answered = True
            self.on_call(time.perf_counter() - sent, False)
            if len(answers) != len(calls):
                raise ResponseError(f"{len(answers)} answers for {len(calls)} calls")
        except BaseException as exc:
            if not answered and isinstance(exc, STORE_ERRORS):  # not cancelled: failed
                self.on_call(time.perf_counter() - sent, True)
            # Redis may have run the batch (the reply lost or late): the slots it took for
            # the calls are given back, and what was owed is sent again. Releases repeat
            # harmlessly; units would count twice had it run (a reply over REDIS_TIMEOUT
            # late), which errs toward billing, not toward losing a paid generation's units.
            self.owe(releases, units)
            if settings.concurrent:
                self.owe(_slots(calls), [])
            if not isinstance(exc, STORE_ERRORS):  # cancelled (shutdown), or a bug
                for call in calls:
                    if not call.answer.done():
                        call.answer.set_result(RedisError("the limiter stopped"))
                raise
            if not calls:
                log.warning("limiter_flush_failed", error=describe(exc),
                            kept=len(releases) + len(units))  # fmt: skip
            answers = [exc] * len(calls)
        for call, answer in zip(calls, answers, strict=True):
            if (
                isinstance(answer, list) and answer[0] == Answer.REFUSED
            ):  # this call's commands failed
                if settings.concurrent:
                    self.owe(_slots([call]), [])
                answer = ResponseError("Redis refused a command of this call")
            if not call.answer.cancelled():
                call.answer.set_result(answer)
            elif self._took_slot(call, answer):  # its waiter left: give the slot back
                self.owe([call.lease()], [])

    def _took_slot(self, call: Call, answer: Any) -> bool:
        return (
            bool(self._settings.concurrent)
            and bool(_slots([call]))
            and isinstance(answer, list)
            and answer[0] == Answer.ADMITTED
        )

    def owe(self, releases: list[tuple[str, str]], units: list[Owed]) -> None:
        """Keep what Redis must be told for the next call (or the flush) to carry."""
        room = MAX_PENDING - len(self._releases) - len(self._units)
        self._releases += releases[: max(room, 0)]
        self._units += units[: max(room - len(releases), 0)]
        if (self._releases or self._units) and self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(FLUSH_DELAY, self._start_flush)

    def _start_flush(self) -> None:
        self._flush = None
        self._spawn(self._send([]))

    def _take_owed(
        self,
    ) -> tuple[list[tuple[str, str]], list[Owed], list[str], list[Any]]:
        """What this replica owes Redis, taken for one script call: the releases and units,
        and their KEYS and arguments in the order the script reads them."""
        releases, units = self._releases, self._units
        self._releases, self._units = [], []
        if self._flush is not None:  # all of it rides on this batch: no flush is due
            self._flush.cancel()
            self._flush = None
        keys = [key for key, _ in releases]
        args: list[Any] = [lease_id for _, lease_id in releases]
        for owed in units:
            keys += [owed.usage, owed.once, *(key for key, _, _ in owed.budgets)]
            args += [owed.app, owed.units, owed.micros, owed.until, len(owed.budgets)]
            for _, delta, expire_at in owed.budgets:
                args += [delta, expire_at]
        return releases, units, keys, args

    async def flush(self) -> None:
        """Send what this replica owes Redis now (releases, units) instead of within
        ``FLUSH_DELAY``."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        await asyncio.shield(self._spawn(self._send([])))  # a caller cancelled: still sent


def _slots(calls: list[Call]) -> list[tuple[str, str]]:
    """The leases these calls may have taken (a call counted with no slot took none)."""
    return [lease for call in calls if (lease := call.lease())[1] != NO_LEASE]


def unique_id() -> str:
    """A lease's or a batch's id: 96 random bits, unique across replicas (``random`` seeds
    itself from the OS in each process) without a getrandom() call per request."""
    return f"{random.getrandbits(96):024x}"


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
