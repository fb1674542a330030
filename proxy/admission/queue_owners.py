"""Which caller submitted each queue request: only that caller may read or cancel it.

Every caller's queue submit goes to fal under the proxy's one key, so fal cannot tell one
caller's request from another's: any caller holding a request id could read its result or
cancel it. With callers identified (``FAL_PROXY_AUTH`` token or jwt), the proxy notes the
fal request id (``x-fal-request-id``) of every submit fal accepted, with its caller, and a
status, status stream, result or cancel call naming that id from another caller is refused
(403 ``queue_request_refused``) before it reaches the gateway.

The notes live in this process, the newest :data:`QUEUE_OWNERS_KEPT` of them (about 180
bytes each). An id it holds no note of (dropped as the oldest, from before a restart, or
submitted through another worker or replica) is let through, as before this check: the
check never refuses the caller who made the request. ``FAL_PROXY_QUEUE_OWNER_CHECK=false``
turns it off, for apps that submit with one credential and poll with another.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from ..errors import Forbidden

QUEUE_OWNERS_KEPT = 100_000  # notes kept: the newest submits'
# fal's request ids are UUIDs. A path segment that starts with one names that request as far
# as this check goes, whatever follows it (";x", ".json"), and whatever its letters' case:
# how fal reads a segment like that is fal's business, and must not get past the check.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


def request_key(request_id: str) -> str:
    """The key a request id is noted and looked up by: its leading UUID, lower-cased."""
    match = _UUID.match(request_id)
    return (match.group(0) if match else request_id).lower()


class QueueRequestRefused(Forbidden):
    reason = "queue_request_refused"
    hint = (
        "a caller asked for a queue request another caller submitted: if one app submits with "
        "one credential and reads with another, set FAL_PROXY_QUEUE_OWNER_CHECK=false"
    )


class QueueOwners:
    """fal request id → the caller who submitted it, the newest :data:`QUEUE_OWNERS_KEPT`."""

    def __init__(self, size: int = QUEUE_OWNERS_KEPT) -> None:
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._size = size

    def note(self, request_id: str, caller: str) -> None:
        """``caller`` submitted ``request_id`` (fal's id for a submit it accepted). The first
        note of an id stands: fal never hands the same id to two submits."""
        key = request_key(request_id)
        if key not in self._owners:
            self._owners[key] = caller
            if len(self._owners) > self._size:
                self._owners.popitem(last=False)

    def check(self, request_id: str, caller: str) -> None:
        """Raise :class:`QueueRequestRefused` if another caller submitted ``request_id``."""
        owner = self._owners.get(request_key(request_id))
        if owner is not None and owner != caller:
            raise QueueRequestRefused(
                "queue request refused",
                "this queue request was submitted by another caller; only its caller may "
                "read its status or result, or cancel it",
            )

    def __len__(self) -> int:
        return len(self._owners)
