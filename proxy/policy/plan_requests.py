"""Request policy per plan: what a caller may ask fal for. Pure functions; no I/O.

A plan (``[requests.<plan>]`` in ``FAL_PROXY_PLANS_FILE``, see :mod:`proxy.limits.quotas`)
can **pin** a header (set it, whatever the caller sent), **cap** a number (the caller's
value or the cap, whichever is less), or **strip** a hint. A key left out passes the
caller's value through untouched. A caller's value is never trusted: every spelling of a
governed header (any letter case, every duplicate) is removed before the policy's value
is set, and a caller's number that does not parse is replaced by the cap, never passed on.

What fal accepts, and where that was checked (fal's "Platform Headers" page,
https://fal.ai/docs/documentation/model-apis/common-parameters, and the SDKs' sources:
fal-ai/fal-js ``libs/client/src/headers.ts`` and fal-ai/fal
``projects/fal_client/src/fal_client/_headers.py``, both as of August 2026):

* ``x-fal-queue-priority``: ``normal`` (the default) or ``low``; a low request waits behind
  every normal one on the endpoint's queue. TOML ``queue_priority``: pinned.
* ``x-fal-runner-hint``: a routing hint (runner affinity), free text. TOML ``runner_hint``:
  ``"strip"`` removes it, any other string pins it.
* ``x-fal-store-io``: ``"0"`` stops fal keeping the request's JSON input and output (30
  days by default), ``"1"`` is the default. TOML ``store_io``: ``false`` pins ``0``,
  ``true`` pins ``1``.
* ``x-fal-no-retry``: ``"1"``, ``"true"`` or ``"yes"`` turns off fal's own retries of a
  queued request (up to 10 attempts on 503/504/connection errors). TOML ``no_retry``:
  ``true`` pins ``1``; ``false`` removes the caller's header (fal's default: retries).
* ``x-fal-object-lifecycle-preference``: JSON ``{"expiration_duration_seconds": N,
  "initial_acl": {...}}``: how long fal's CDN keeps the files a request makes (without it,
  the account's setting, "forever if not configured"; the Python SDK's docstring says
  the backend reads ``0`` as no expiration). TOML ``object_expiration_max_seconds``: a cap.
  A request without the header gets ``{"expiration_duration_seconds": cap}``: no header
  means the account default, possibly forever, which is over any cap. A caller's object
  keeps ``initial_acl`` (an object, passed as it came) with the expiration capped; other
  keys are dropped (unknown to the proxy, so not vouched for). A value that is not a JSON
  object, or is sent more than once, is **replaced** by ``{"expiration_duration_seconds":
  cap}`` rather than removed, since removing it would again mean the account default.
  ``x-fal-object-lifecycle`` (what the SDKs send on storage uploads) is capped the same
  way when present, never added.
* The start timeout: seconds a request may wait for a runner before fal gives up (504
  with ``x-fal-request-timeout-type: user``); no header means no deadline. fal's page and
  both SDKs (JS 1.10.1 and the newest sources) name it ``x-fal-request-timeout``, with a
  minimum "> 0.1 seconds" (the SDKs themselves require > 1). ``x-fal-request-start-timeout``
  is the name the proxy was asked to target as its successor; no fal source found says
  fal reads it. TOML ``request_start_timeout_max_seconds``: a cap. The caller's values
  under either name are read together (a value that is not a plain decimal number above
  0.1 is replaced by the cap; no value at all gets the cap, no deadline being over any
  cap) and the result is sent under **both** names, so that whichever one fal reads, it
  reads the capped value.
* ``fal_max_queue_length``: a **query parameter** on queue submits (fal answers 429 when
  more than N requests already wait on the endpoint's queue); not a header. TOML
  ``max_queue_length``: a cap (a caller's lower number only makes its own request fail
  sooner, so there is nothing to pin). Every spelling (percent-encoded, any case,
  repeated) is replaced by one ``fal_max_queue_length=N`` where the first stood (at the
  end if there was none); the other parameters keep their order and bytes.

Which requests: :func:`for_target`. Queue submits get the whole policy; runs and streams on
``fal.run`` the headers (platform headers apply to every inference method; fal ignores
those a direct run has no use for) but not ``fal_max_queue_length`` (on ``fal.run`` a
GET's query is the model's input); storage upload initiation only the expiration cap
(the SDKs send the lifecycle there); status, result, cancel, tokens and world-model
calls nothing (they start no generation and read none of these).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import unquote_plus

from .targets import Target, starts_generation

STRIP = "strip"  # runner_hint = "strip": remove the caller's hint
PRIORITIES = ("normal", "low")

QUEUE_PRIORITY = b"x-fal-queue-priority"
RUNNER_HINT = b"x-fal-runner-hint"
STORE_IO = b"x-fal-store-io"
NO_RETRY = b"x-fal-no-retry"
LIFECYCLE_PREFERENCE = b"x-fal-object-lifecycle-preference"
LIFECYCLE = b"x-fal-object-lifecycle"
REQUEST_TIMEOUT = b"x-fal-request-timeout"  # fal's documented name, what the SDKs send
REQUEST_START_TIMEOUT = b"x-fal-request-start-timeout"
MAX_QUEUE_LENGTH = "fal_max_queue_length"

MIN_START_TIMEOUT = 0.1  # fal: "Minimum > 0.1 seconds"
_HINT = re.compile(r"[\x21-\x7e]{1,256}")  # visible ASCII: nothing to split a header with
_DECIMAL = re.compile(rb"[0-9]{1,12}(?:\.[0-9]{1,6})?")
_COUNT = re.compile(r"[0-9]{1,12}")
_LIFECYCLE_KEYS = ("expiration_duration_seconds", "initial_acl")


@dataclass(frozen=True, slots=True)
class RequestPolicy:
    """One plan's policy; ``None`` everywhere passes every caller value through."""

    queue_priority: str | None = None  # pin: "normal" | "low"
    runner_hint: str | None = None  # pin, or STRIP
    store_io: bool | None = None  # pin: x-fal-store-io 1 | 0
    no_retry: bool | None = None  # True pins x-fal-no-retry: 1; False removes it
    object_expiration_max_seconds: int | None = None  # cap of expiration_duration_seconds
    request_start_timeout_max_seconds: float | None = None  # cap of the start timeout
    max_queue_length: int | None = None  # cap of ?fal_max_queue_length

    @property
    def empty(self) -> bool:
        # Asked of every call: the shared PASS_THROUGH answers by identity, without a
        # walk over the fields (two per call were ~35 of a small request's ~800 calls).
        return self is PASS_THROUGH or self == PASS_THROUGH


PASS_THROUGH = RequestPolicy()  # every caller value passes through
KEYS = tuple(f.name for f in fields(RequestPolicy))  # the TOML keys, as the fields


def parse_request_policy(table: dict[str, Any], source: str) -> RequestPolicy:
    """A ``[requests.<plan>]`` table → a policy; ValueError naming ``source`` and the key."""
    if not isinstance(table, dict):
        raise ValueError(f"{source}: must be a table of {', '.join(KEYS)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{source}: {key}"
        if key not in KEYS:
            raise ValueError(f"{source}: unknown key {key!r}; valid keys: {', '.join(KEYS)}")
        if key == "queue_priority":
            if value not in PRIORITIES:
                raise ValueError(f"{where} must be one of {', '.join(map(repr, PRIORITIES))}")
        elif key == "runner_hint":
            if not isinstance(value, str) or not _HINT.fullmatch(value):
                raise ValueError(
                    f"{where} must be {STRIP!r} or a hint to pin: 1 to 256 visible ASCII "
                    "characters, no spaces"
                )
        elif key in ("store_io", "no_retry"):
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false")
        elif key == "request_start_timeout_max_seconds":
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 1
            ):
                raise ValueError(f"{where} must be a number of seconds, 1 or more")
            value = float(value)
        else:  # object_expiration_max_seconds (1 or more: fal reads 0 as never), max_queue_length
            least = 1 if key == "object_expiration_max_seconds" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{where} must be a whole number, {least} or more")
        values[key] = value
    return RequestPolicy(**values)


def for_target(policy: RequestPolicy, method: str, target: Target) -> RequestPolicy:
    """The part of ``policy`` that applies to a ``method`` call on ``target`` (see the
    module's docstring): all of it on a queue submit, all but the queue length on a run or
    stream, the expiration cap on a storage upload's initiation, nothing elsewhere."""
    if policy.empty:
        return policy
    if target.kind == "queue" and starts_generation(method, target):
        return policy
    if target.kind in ("run", "stream"):
        return replace(policy, max_queue_length=None)
    if target.kind == "storage":
        return RequestPolicy(object_expiration_max_seconds=policy.object_expiration_max_seconds)
    return PASS_THROUGH


Headers = list[tuple[bytes, bytes]]
Rule = Callable[[list[bytes]], tuple[Headers, bool | None]]


def apply_request_policy(
    policy: RequestPolicy, headers: Iterable[tuple[bytes, bytes]], query: str
) -> tuple[Headers, str, tuple[str, ...]]:
    """The client's ``headers`` (raw ``(name, value)`` pairs, as the server gives them and
    :func:`proxy.policy.headers.upstream_request_headers` takes them) and raw ``query``
    (without ``?``) with ``policy`` applied, and the names of the policy's fields that
    changed what the caller asked for (for the log line: names only, never values)."""
    out = list(headers)
    if policy.empty:
        return out, query, ()
    changed: list[str] = []

    def govern(field: str, names: tuple[bytes, ...], rule: Rule) -> None:
        """Replace every ``names`` header by what ``rule`` makes of the caller's values
        (and whether that changed what was asked; None: compare the headers)."""
        nonlocal out
        sent = [(n.lower(), v) for n, v in out if n.lower() in names]
        new, differs = rule([v for _, v in sent])
        if differs if differs is not None else sorted(sent) != sorted(new):
            changed.append(field)
        out = [(n, v) for n, v in out if n.lower() not in names] + new

    if policy.queue_priority is not None:
        pinned = [(QUEUE_PRIORITY, policy.queue_priority.encode())]
        govern("queue_priority", (QUEUE_PRIORITY,), lambda _: (pinned, None))
    if policy.runner_hint is not None:
        hint = [] if policy.runner_hint == STRIP else [(RUNNER_HINT, policy.runner_hint.encode())]
        govern("runner_hint", (RUNNER_HINT,), lambda _: (hint, None))
    if policy.store_io is not None:
        store = [(STORE_IO, b"1" if policy.store_io else b"0")]
        govern("store_io", (STORE_IO,), lambda _: (store, None))
    if policy.no_retry is not None:
        retry = [(NO_RETRY, b"1")] if policy.no_retry else []
        govern("no_retry", (NO_RETRY,), lambda _: (retry, None))
    if (cap := policy.request_start_timeout_max_seconds) is not None:
        govern(
            "request_start_timeout_max_seconds",
            (REQUEST_TIMEOUT, REQUEST_START_TIMEOUT),
            lambda sent: _start_timeout(sent, cap),
        )
    if (most := policy.object_expiration_max_seconds) is not None:
        govern(
            "object_expiration_max_seconds",
            (LIFECYCLE_PREFERENCE,),
            lambda sent: _lifecycle(LIFECYCLE_PREFERENCE, sent, most, add=True),
        )
        govern(
            "object_expiration_max_seconds",
            (LIFECYCLE,),
            lambda sent: _lifecycle(LIFECYCLE, sent, most, add=False),
        )
    if policy.max_queue_length is not None:
        capped = cap_queue_length(query, policy.max_queue_length)
        if capped != query:
            changed.append("max_queue_length")
        query = capped
    return out, query, tuple(dict.fromkeys(changed))


def _start_timeout(sent: list[bytes], cap: float) -> tuple[Headers, bool]:
    """Both names set to the least of the caller's values and ``cap`` (the cap alone if
    any value does not parse, or there is none). Changed: the effective value differs."""
    numbers = [_seconds(v) for v in sent]
    valid = [n for n in numbers if n is not None]
    trusted = bool(sent) and len(valid) == len(numbers)
    value = min([*valid, cap]) if trusted else cap
    text = _format_seconds(value).encode()
    asked = min(valid) if trusted else None
    return [(REQUEST_TIMEOUT, text), (REQUEST_START_TIMEOUT, text)], asked != value


def _seconds(value: bytes) -> float | None:
    """A plain decimal number of seconds above fal's minimum, else None."""
    value = value.strip()
    if not _DECIMAL.fullmatch(value):
        return None
    seconds = float(value)
    return seconds if seconds > MIN_START_TIMEOUT else None


def _format_seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.6f}".rstrip("0")


def _lifecycle(name: bytes, sent: list[bytes], most: int, *, add: bool) -> tuple[Headers, bool]:
    """The lifecycle header ``name`` with its expiration capped at ``most`` (module
    docstring). Changed: anything but one well-formed object whose expiration stays."""
    if not sent:
        if not add:
            return [], False
        return [(name, _dumps({"expiration_duration_seconds": most}))], True
    asked = _lifecycle_object(sent[0]) if len(sent) == 1 else None
    if asked is None:  # malformed, or sent twice: the cap alone (removing it = no limit)
        return [(name, _dumps({"expiration_duration_seconds": most}))], True
    kept = {k: asked[k] for k in _LIFECYCLE_KEYS if k in asked}
    if not isinstance(kept.get("initial_acl", {}), dict):
        del kept["initial_acl"]
    expiration = kept.get("expiration_duration_seconds")
    if isinstance(expiration, int) and not isinstance(expiration, bool) and expiration > 0:
        kept["expiration_duration_seconds"] = min(expiration, most)
    else:  # absent, 0 (fal: no expiration), negative, a float, a string...
        kept["expiration_duration_seconds"] = most
    return [(name, _dumps(kept))], kept != asked


def _lifecycle_object(value: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(value.decode("utf-8"), parse_constant=_no_constant)
    except ValueError:  # not UTF-8, not JSON, NaN / Infinity
        return None
    return parsed if isinstance(parsed, dict) else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _dumps(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode()


def cap_queue_length(query: str, cap: int) -> str:
    """``query`` with every ``fal_max_queue_length`` (any spelling) replaced by one, at most
    ``cap`` (the cap if any value is not a whole number, or there is none), where the first
    stood; every other parameter kept as it came, in its order. Unchanged when the caller
    sent it once, plainly, at most ``cap``."""
    parts = query.split("&") if query else []
    found = [i for i, part in enumerate(parts) if _is_queue_length(part)]
    counts = [_count(parts[i]) for i in found]
    valid = [c for c in counts if c is not None]
    value = min([*valid, cap]) if found and len(valid) == len(counts) else cap
    param = f"{MAX_QUEUE_LENGTH}={value}"
    if len(found) == 1 and parts[found[0]] == param:
        return query
    at = found[0] if found else len(parts)
    drop = set(found)
    rest = [part for i, part in enumerate(parts) if i not in drop]
    return "&".join([*rest[:at], param, *rest[at:]])


def _is_queue_length(part: str) -> bool:
    return unquote_plus(part.partition("=")[0]).strip().lower() == MAX_QUEUE_LENGTH


def _count(part: str) -> int | None:
    value = unquote_plus(part.partition("=")[2]).strip()
    return int(value) if _COUNT.fullmatch(value) else None


def with_query(target: Target, query: str) -> Target:
    """``target`` sent with ``query`` instead of its own: its gateway URL (path mode) or
    its ``x-fal-target-url`` (target mode) rebuilt as :func:`proxy.policy.targets.resolve_target`
    builds them."""
    if query == target.query:
        return target
    old = f"?{target.query}" if target.query else ""
    new = f"?{query}" if query else ""
    if target.target_url is None:
        base = target.upstream_url[: len(target.upstream_url) - len(old)]
        return replace(target, query=query, upstream_url=base + new)
    return replace(target, query=query, target_url=f"https://{target.host}{target.path}{new}")
