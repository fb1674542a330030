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

from .errors import Forbidden
from .targets import Target

_QUEUE_REQUEST = re.compile(r"/(?P<prefix>.+?)/requests/[^/]+(?:/.*)?")
_NAMESPACES = ("workflows", "comfy")


@dataclass(frozen=True)
class AppPolicy:
    patterns: tuple[str, ...]  # empty = every app

    @property
    def allows_all(self) -> bool:
        return not self.patterns or "*" in self.patterns

    def check(self, target: Target) -> None:
        """Raise Forbidden unless ``target`` names an allowed app (token bodies: see check_token)."""
        if self.allows_all or target.kind in ("storage", "token"):
            return
        path = target.path
        if target.kind == "queue" and (match := _QUEUE_REQUEST.fullmatch(path)):
            prefix = match["prefix"]
            depth = prefix.count("/") + 1
            if any(fnmatchcase(prefix, "/".join(p.split("/")[:depth])) for p in self.patterns):
                return
            raise _refused(prefix)
        segments = path.strip("/").split("/")
        for end in range(len(segments), 0, -1):
            candidate = "/".join(segments[:end])
            if any(fnmatchcase(candidate, p) for p in self.patterns):
                return
        raise _refused(path.strip("/"))

    def check_token(self, body: bytes, max_expiration: int) -> None:
        """Check a ``/tokens/`` body: every alias allowed, ``token_expiration`` within the cap."""
        try:
            data = json.loads(body)
        except ValueError:
            raise Forbidden("token request refused", "the body is not JSON", reason="token_refused") from None
        apps = data.get("allowed_apps") if isinstance(data, dict) else None
        if not isinstance(apps, list) or not apps or not all(isinstance(a, str) and a for a in apps):
            raise Forbidden("token request refused", "allowed_apps must be a non-empty list of app aliases",
                            reason="token_refused")
        expiration = data.get("token_expiration", 120)
        if not isinstance(expiration, int) or isinstance(expiration, bool) or not 0 < expiration <= max_expiration:
            raise Forbidden("token request refused",
                            f"token_expiration must be 1-{max_expiration} seconds (FAL_PROXY_TOKEN_MAX_EXPIRATION)",
                            reason="token_refused")
        if self.allows_all:
            return
        aliases = {_alias(p) for p in self.patterns}
        for app in apps:
            if not any(alias is not None and fnmatchcase(app, alias) for alias in aliases):
                raise Forbidden("token request refused", f"app {app!r} is not in FAL_PROXY_ALLOWED_APPS",
                                reason="app_refused")


def _alias(pattern: str) -> str | None:
    """The alias part of a pattern: ``fal-ai/fast-lcm-diffusion/*`` → ``fast-lcm-diffusion``."""
    parts = pattern.split("/")
    if parts[0] in _NAMESPACES:
        return None  # workflows have no realtime endpoint
    if len(parts) >= 2:
        return parts[1]
    return "*" if parts[0] == "*" else None


def _refused(app: str) -> Forbidden:
    return Forbidden("app not allowed", f"{app!r} does not match FAL_PROXY_ALLOWED_APPS", reason="app_refused")
