"""Which caller submitted each queue request: only that caller may read or cancel it.

Every caller's queue submit goes to fal under the proxy's one key, so fal cannot tell one
caller's request from another's: any caller holding a request id could read its result or
cancel it. With callers identified (``FAL_PROXY_AUTH`` token or jwt), the proxy notes the
fal request id (``x-fal-request-id``) of every submit fal accepted, with its caller, and a
status, status stream, result or cancel call naming that id
(:func:`proxy.policy.targets.queue_request_id`) from another caller is refused (403
``queue_request_refused``) before it reaches the gateway.

The notes live in this process: the newest :data:`QUEUE_OWNERS_KEPT` in all (at most about 300
bytes each), and at most :data:`QUEUE_OWNERS_PER_CALLER` per caller, so that one caller's submits
push out only its own notes, never another's. An id it holds no note of (dropped, from before
a restart, or submitted through another worker or replica) is let through, as before this
check: the check never refuses the caller who made the request.
``FAL_PROXY_QUEUE_OWNER_CHECK=false`` turns it off, for apps that submit with one credential
and poll with another.
"""

from __future__ import annotations

from collections import OrderedDict

from ..errors import Forbidden

QUEUE_OWNERS_KEPT = 100_000  # notes kept in all: the newest submits'
QUEUE_OWNERS_PER_CALLER = 10_000  # notes kept of one caller's: its newest submits'


class QueueRequestRefused(Forbidden):
    reason = "queue_request_refused"
    hint = (
        "a caller asked for a queue request another caller submitted: if one app submits with "
        "one credential and reads with another, set FAL_PROXY_QUEUE_OWNER_CHECK=false"
    )


class QueueOwners:
    """fal request id (lower-cased) → the caller who submitted it."""

    def __init__(
        self, size: int = QUEUE_OWNERS_KEPT, per_caller: int = QUEUE_OWNERS_PER_CALLER
    ) -> None:
        self._owners: OrderedDict[str, str] = OrderedDict()  # oldest first
        # A caller's noted ids, oldest first: a list (64 bytes for one id; a deque takes 600
        # whatever it holds, and most callers hold a few). Its oldest is taken off the front
        # only past QUEUE_OWNERS_PER_CALLER, or past the cap in all: O(ids held), rarely.
        self._of: dict[str, list[str]] = {}
        self._size = size
        self._per_caller = per_caller

    def note(self, request_id: str, caller: str) -> None:
        """``caller`` submitted ``request_id`` (fal's id for a submit it accepted). The first
        note of an id stands: fal never hands the same id to two submits."""
        key = request_id.lower()
        if key in self._owners:
            return
        self._owners[key] = caller
        mine = self._of.setdefault(caller, [])
        mine.append(key)
        if len(mine) > self._per_caller:  # the caller's oldest goes, nobody else's
            del self._owners[mine.pop(0)]
        if len(self._owners) > self._size:
            # The oldest note in all is also the oldest of its caller's.
            _, owner = self._owners.popitem(last=False)
            theirs = self._of[owner]
            theirs.pop(0)
            if not theirs:
                del self._of[owner]

    def check(self, request_id: str, caller: str) -> None:
        """Raise :class:`QueueRequestRefused` if another caller submitted ``request_id``."""
        owner = self._owners.get(request_id.lower())
        if owner is not None and owner != caller:
            raise QueueRequestRefused(
                "queue request refused",
                "this queue request was submitted by another caller; only its caller may "
                "read its status or result, or cancel it",
            )

    def __len__(self) -> int:
        return len(self._owners)
