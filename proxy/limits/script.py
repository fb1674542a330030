"""The Lua script of :class:`~proxy.limits.redis_backend.RedisLimiter`: a batch of admits.

One call of :data:`ADMIT` (the script, ``admit.lua`` beside this module) applies what the
replica owes Redis (lease releases, billable units), then checks and counts each admit of
the batch in order, exactly as
:class:`~proxy.limits.memory.MemoryLimiter` would one after the other: the windows, every
matching quota, a concurrency lease, and only if all have room the counts and usage.
Redis runs a script atomically, so the batch is as if its calls had come one by one.

Why a batch: one ``EVALSHA`` costs the proxy ~100 µs of redis-py and event-loop work and
redis-server a read and a reply, whatever the script does; the admits that one turn of
the event loop produces share them (under load, most turns carry several).

Layout. Every argument comes in ``ARGV[1]``, joined by ``\\x1f`` (:func:`joined`): redis-py
packs each argument of a command in Python, and one string instead of ~30 saved ~10 % of
a call's client CPU. None may be empty or hold the separator.

* Arguments: ``ncalls, nr, nn, lease_ttl, concurrent, max_fields, other, once_ttl``, then
  ``lease_id * nr`` and ``(app, units, micros, expire_at, m, (delta, expire_at) * m) * nn``
  (what is owed), then per call ``now, lease_id, nw, nq, nu, (limit, period) * nw,
  (limit, expire_at, amount) * nq, (field, expire_at, id) * nu`` (``id``: the caller's,
  :func:`~proxy.limits.admin_ops.id_arg`).
* KEYS: the batch's own key (its answers, kept ``REPLAY_TTL`` seconds), ``leases * nr,
  (usage, once, budget * m) * nn`` (what is owed: units and spend are added to the usage
  hash, and ``delta`` micro-dollars to each budget counter (never below 0), only if
  their ``once`` marker, a fal request id's, is new, and it is then kept ``once_ttl``
  seconds; :data:`NO_ONCE`: always), then per call ``leases, (window current, window
  previous) * nw, quota * nq, (usage, ids) * nu, blocked``.
* ``blocked`` exists while the operator blocks the caller (the admin API): the call is
  refused before anything is read or counted. ``ids`` (the month's digest → caller id
  hash, :mod:`proxy.limits.admin_ops`) gets the caller's id when its usage hash is created.
* A quota's ``amount`` is 1; a budget's is the call's estimate in micro-dollars: it has
  room when its count is under the limit and the amount fits (:mod:`proxy.limits.spend`).
* A call whose ``lease_id`` is :data:`NO_LEASE` takes no slot (a generation counted inside
  a session admitted already).
* Returns one answer per call: ``{0, used * nq}`` admitted, with what each of its quotas
  holds once the call is counted (the ``INCRBY``'s result; a budget counting an estimate of
  0: what it held; just ``{0}`` with no quota: the admission gate's near-limit report,
  :data:`proxy.admission.gate.NEAR_LIMIT`, at no extra round trip), ``{1, i, previous,
  current}`` window ``i`` full, ``{2, i, used}`` quota or budget ``i`` has no room, ``{3}`` no
  concurrency slot, ``{4}`` Redis refused one of the call's commands (its key holds another
  type), ``{5}`` the caller is blocked. A replayed batch's answers (below) come back
  through ``cjson``, whose numbers keep 14 significant digits: exact for any count or
  budget under $10^8.

Run twice (redis-py resends a command once when its connection breaks, and what broke may
have been the reply), a batch answers the second time with the first time's answers,
kept under its key, and counts nothing again.
"""

from __future__ import annotations

from enum import IntEnum
from importlib import resources
from typing import Any

SEPARATOR = "\x1f"
NO_LEASE = "-"  # a call's lease id when it takes no slot (never a unique_id: those are hex)
NO_ONCE = "-"  # owed units' marker key when they have no fal request id (always added)
REPLAY_TTL = 10  # s a batch's answers are kept: redis-py resends at once, within its timeout


# The script's text ships as package data (admit.lua); REPLAY_TTL is written into it here.
ADMIT = (resources.files(__package__).joinpath("admit.lua").read_text(encoding="utf-8")).replace(
    "REPLAY_TTL", str(REPLAY_TTL)
)


class Answer(IntEnum):
    """The first element of the script's answer for one call (see the module doc)."""

    ADMITTED = 0  # {0, used * nq}: what each quota holds with this call counted
    WINDOW_FULL = 1  # {1, i, previous, current}: window i has no room
    QUOTA_USED = 2  # {2, i, used}: quota (or budget) i has no room
    NO_SLOT = 3  # {3}: no concurrency slot
    REFUSED = 4  # {4}: Redis refused one of the call's commands (a key of another type)
    BLOCKED = 5  # {5}: the operator blocked the caller (admin API)


def joined(args: list[Any]) -> str:
    """The script's arguments as its one ``ARGV`` string (see the module doc)."""
    return SEPARATOR.join(map(str, args))
