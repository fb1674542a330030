"""App policy (``FAL_PROXY_ALLOWED_APPS``): which fal endpoint ids callers may use. Pure.

Patterns are globs over endpoint ids (``fal-ai/flux/*``, ``fal-ai/fast-sdxl``), matched
case-sensitively with :func:`fnmatch.fnmatchcase` (``*`` may cross ``/``). They apply to
every kind of call, each of which names its app differently:

* runs and streams (``fal.run``) and queue submits: the path *is* the endpoint id, maybe
  followed by a sub-path (``/stream``, ``/realtime``, a custom path): allowed when the id
  or any longer prefix of it matches, so ``fal-ai/fast-sdxl`` also covers
  ``fal-ai/fast-sdxl/stream``;
* queue status/result/cancel carry only ``owner/alias`` (the SDK drops the sub-path,
  ``workflows/`` and ``comfy/`` namespaces kept): allowed when a pattern's own first
  segments match that prefix, i.e. when some allowed app lives under it;
* realtime token requests (``rest.fal.ai/tokens/``) name bare aliases in ``allowed_apps``:
  each must be the alias (second segment) of an allowed pattern (the owner is not in the
  request, so ``fal-ai/*`` allows tokens for any alias); ``token_expiration`` is capped;
* storage upload initiation names no app and is not restricted here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from ..errors import BadRequest, Forbidden
from .targets import Target

_QUEUE_REQUEST = re.compile(r"/(?P<prefix>.+?)/requests/[^/]+(?:/.*)?")
NAMESPACES = ("workflows", "comfy")  # first segments before owner/alias


@dataclass(frozen=True)
class AppPolicy:
    patterns: tuple[str, ...]  # empty = every app

    @property
    def allows_all(self) -> bool:
        return not self.patterns or "*" in self.patterns

    def check(self, target: Target) -> str | None:
        """Raise Forbidden unless ``target`` names an allowed app (token bodies: see check_token).

        Returns the pattern that admitted it (``"*"`` when every app is allowed), or None for
        calls that name no app (storage, tokens): a bounded value, fit for a metrics label.
        """
        if target.kind in ("storage", "token"):
            return None
        if self.allows_all:
            return "*"
        path = target.path
        if target.kind == "queue" and (match := _QUEUE_REQUEST.fullmatch(path)):
            prefix = match["prefix"]
            depth = prefix.count("/") + 1
            # At least owner/alias (namespace/owner/alias): the owner alone ("fal-ai") would
            # match every app of that owner once any one of them is allowed.
            if depth < (3 if prefix.split("/", 1)[0] in NAMESPACES else 2):
                raise _refused(prefix)
            for pattern in self.patterns:
                if fnmatchcase(prefix, "/".join(pattern.split("/")[:depth])):
                    return pattern
            raise _refused(prefix)
        for candidate in endpoint_prefixes(path):
            for pattern in self.patterns:
                if fnmatchcase(candidate, pattern):
                    return pattern
        raise _refused(path.strip("/"))

    def check_token(self, body: bytes, max_expiration: int) -> bytes:
        """Check a ``/tokens/`` body: every alias allowed, ``token_expiration`` within the cap.

        Returns the body to forward: the checked values re-serialised, never the client's
        bytes, so fal cannot read anything the check did not (a second ``allowed_apps``, a
        key in other letter cases, another encoding). Keys other than the two are dropped.
        """
        data = parse_token_body(body)
        apps = data.get("allowed_apps")
        # Bare aliases only (``fast-lcm-diffusion``): no glob, path, space or look-alike
        # letter that fal might read as more, or as another app, than the checks below did.
        if (
            not isinstance(apps, list)
            or not apps
            or not all(isinstance(a, str) and _ALIAS.fullmatch(a) for a in apps)
        ):
            raise Forbidden(
                "token request refused",
                "allowed_apps must be a non-empty list of app aliases "
                "(letters, digits, '.', '_' and '-', like fast-lcm-diffusion)",
                reason="token_refused",
            )
        expiration = data.get("token_expiration", DEFAULT_TOKEN_EXPIRATION)
        if (
            not isinstance(expiration, int)
            or isinstance(expiration, bool)
            or not 0 < expiration <= max_expiration
        ):
            raise Forbidden(
                "token request refused",
                f"token_expiration must be 1-{max_expiration} seconds "
                "(FAL_PROXY_TOKEN_MAX_EXPIRATION)",
                reason="token_refused",
            )
        if not self.allows_all:
            aliases = {_alias(p) for p in self.patterns}
            for app in apps:
                if not any(alias is not None and fnmatchcase(app, alias) for alias in aliases):
                    raise Forbidden(
                        "token request refused",
                        f"app {app!r} is not in FAL_PROXY_ALLOWED_APPS",
                        reason="app_refused",
                    )
        return json.dumps(
            {"allowed_apps": apps, "token_expiration": expiration},
            ensure_ascii=True,
            separators=(",", ":"),
        ).encode()


DEFAULT_TOKEN_EXPIRATION = 120  # what the SDKs ask for
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # ASCII only
_TOKEN_KEYS = ("allowed_apps", "token_expiration")
MAX_TOKEN_NESTING = 8


def parse_token_body(body: bytes) -> dict[str, Any]:
    """A token request body as one unambiguous JSON object, or BadRequest.

    Strict where ``json.loads`` is lenient: UTF-8 only (no BOM, no UTF-16/32, which
    ``json.loads(bytes)`` would guess), no duplicate keys, no key that differs from
    ``allowed_apps`` or ``token_expiration`` only in letter case, and no deep nesting (a
    body of 30,000 ``[`` would otherwise overflow the parser's recursion).
    """

    def refuse(detail: str) -> BadRequest:
        return BadRequest("token request refused", detail, reason="token_refused")

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse("the body must be UTF-8 JSON") from None
    if _nesting(text) > MAX_TOKEN_NESTING:
        raise refuse(f"the JSON is nested more than {MAX_TOKEN_NESTING} levels deep")

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise refuse(f"the key {key!r} appears twice")
            if key.lower() in _TOKEN_KEYS and key not in _TOKEN_KEYS:
                raise refuse(f"the key {key!r} must be written in lower case")
            out[key] = value
        return out

    try:
        data = json.loads(text, object_pairs_hook=unique)
    except ValueError:  # JSONDecodeError, and a BOM
        raise refuse("the body is not JSON") from None
    if not isinstance(data, dict):
        raise refuse("the body must be a JSON object")
    return data


def _nesting(text: str) -> int:
    """The deepest bracket nesting in ``text``, counting brackets inside strings too (an
    over-estimate that only ever refuses more)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def endpoint_prefixes(path: str) -> list[str]:
    """An endpoint path and its shorter prefixes, longest first: what a pattern may match
    (``/fal-ai/fast-sdxl/stream`` → ``fal-ai/fast-sdxl/stream``, ``fal-ai/fast-sdxl``,
    ``fal-ai``). Quotas (:mod:`proxy.limits.quotas`) match apps the same way."""
    segments = path.strip("/").split("/")
    return ["/".join(segments[:end]) for end in range(len(segments), 0, -1)]


def _alias(pattern: str) -> str | None:
    """The alias part of a pattern: ``fal-ai/fast-lcm-diffusion/*`` → ``fast-lcm-diffusion``."""
    parts = pattern.split("/")
    if parts[0] in NAMESPACES:
        return None  # workflows have no realtime endpoint
    if len(parts) >= 2:
        return parts[1]
    return "*" if parts[0] == "*" else None


def _refused(app: str) -> Forbidden:
    return Forbidden(
        "app not allowed", f"{app!r} does not match FAL_PROXY_ALLOWED_APPS", reason="app_refused"
    )
