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
* world-model sessions (``wma.fal.run/session``) name their endpoint id in the body's
  ``app_id``: checked as a run of that id (:meth:`AppPolicy.check_session`);
* storage upload initiation, a session's heartbeat and ICE servers name no app and are not
  restricted here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from ..errors import BadRequest, Forbidden
from .targets import WMA_KINDS, Target

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
        if target.kind in ("storage", "token") or target.kind in WMA_KINDS:
            return None  # a session's app is in its body: check_session
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
        return self._check_endpoint(path)

    def _check_endpoint(self, path: str) -> str:
        """The pattern that allows a run of the endpoint at ``path``, or Forbidden."""
        if self.allows_all:
            return "*"
        for candidate in endpoint_prefixes(path):
            for pattern in self.patterns:
                if fnmatchcase(candidate, pattern):
                    return pattern
        raise _refused(path.strip("/"))

    def check_session(self, body: bytes) -> tuple[str, str, bytes]:
        """Check a world-model session offer (``wma.fal.run/session``): one unambiguous JSON
        object whose ``app_id`` is a plain endpoint id, allowed as a run of that id would be.

        Returns (the pattern that allowed it, the endpoint id, the body to forward): the
        checked ``app_id``, ``sdp`` and ``type`` re-serialised, never the client's bytes, so
        fal reads no app the check did not. Other keys are dropped.
        """
        data = parse_json_object(
            body, keys=_SESSION_KEYS, message="session request refused", reason="session_refused"
        )
        app_id, sdp, kind = data.get("app_id"), data.get("sdp"), data.get("type")
        if not isinstance(app_id, str) or not _ENDPOINT_ID.fullmatch(app_id):
            raise BadRequest(
                "session request refused",
                "app_id must be a plain endpoint id like fal-ai/some-app (ASCII letters, "
                "digits, '.', '_' and '-' in '/'-separated segments)",
                reason="session_refused",
            )
        if not isinstance(sdp, str) or kind != "offer":
            raise BadRequest(
                "session request refused",
                'sdp must be the offer\'s SDP (a string) and type must be "offer"',
                reason="session_refused",
            )
        pattern = self._check_endpoint(f"/{app_id}")
        forwarded = json.dumps(
            {"app_id": app_id, "sdp": sdp, "type": kind}, ensure_ascii=True, separators=(",", ":")
        ).encode()
        return pattern, app_id, forwarded

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


def check_heartbeat(body: bytes) -> bytes:
    """Check a session heartbeat (``wma.fal.run/session/heartbeat``): one unambiguous JSON
    object with a string ``session_id``. Returns ``{"session_id"}`` re-serialised."""
    data = parse_json_object(
        body, keys=_HEARTBEAT_KEYS, message="heartbeat refused", reason="session_refused"
    )
    session_id = data.get("session_id")
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise BadRequest(
            "heartbeat refused",
            "session_id must be the session's id (1-256 visible ASCII characters)",
            reason="session_refused",
        )
    return json.dumps({"session_id": session_id}, separators=(",", ":")).encode()


DEFAULT_TOKEN_EXPIRATION = 120  # what the SDKs ask for
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # ASCII only
# owner/alias[/path]: plain ASCII segments, none empty, none a dot segment; what a fal.run
# path may spell (targets._check_plain_endpoint), so allowed apps and quotas read one id.
_ENDPOINT_ID = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){1,7}"
)
_SESSION_ID = re.compile(r"[\x21-\x7e]{1,256}")
_TOKEN_KEYS = ("allowed_apps", "token_expiration")
_SESSION_KEYS = ("app_id", "sdp", "type")
_HEARTBEAT_KEYS = ("session_id",)
MAX_TOKEN_NESTING = 8


def parse_token_body(body: bytes) -> dict[str, Any]:
    """A token request body as one unambiguous JSON object, or BadRequest (400
    ``token_refused``): :func:`parse_json_object` with the token's keys."""
    return parse_json_object(
        body, keys=_TOKEN_KEYS, message="token request refused", reason="token_refused"
    )


def parse_json_object(
    body: bytes, *, keys: tuple[str, ...], message: str, reason: str
) -> dict[str, Any]:
    """A small request body (a token request, a session offer or heartbeat) as one
    unambiguous JSON object, or BadRequest with ``message`` and ``reason``.

    Strict where ``json.loads`` is lenient: UTF-8 only (no BOM, no UTF-16/32, which
    ``json.loads(bytes)`` would guess), no duplicate keys, no key that differs from one of
    ``keys`` only in letter case, and no deep nesting (a body of 30,000 ``[`` would
    otherwise overflow the parser's recursion).
    """

    def refuse(detail: str) -> BadRequest:
        return BadRequest(message, detail, reason=reason)

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
            if key.lower() in keys and key not in keys:
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
