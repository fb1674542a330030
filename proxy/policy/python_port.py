"""The TLS port for fal's Python client: how its requests are read, how queue answers are
rewritten. Pure functions and one small class; the forwarder and the bridge do the rest, with
the same admission, header policy and gateway routing as on the main port.

What ``fal-client`` sends here (with the variables of ``python-env``):

* ``/<app>[/<path>]``: ``run``, ``stream`` and ``realtime``/``ws_connect`` (``FAL_RUN_HOST``):
  fal.run-shaped, as on the main port;
* ``/queue.fal.run/<app>``, ``/queue.fal.run/<app>/requests/<id>[/status|/cancel]``:
  ``submit`` (``FAL_QUEUE_RUN_HOST``) and the URLs the submit answer carried, once this
  module has pointed them here (:func:`rewrite_queue_urls`);
* ``Authorization: Key <FAL_KEY>``: the only credential the client can send, so on this port
  it is the caller's credential for the proxy (dropped, like every client ``Authorization``).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import BadGateway
from .request_head import RequestHeaders
from .targets import BACKUP_HOSTS, QUEUE_HOST, RUN_HOST, Target

QUEUE_PREFIX = "/queue.fal.run"  # FAL_QUEUE_RUN_HOST=<name>:<port>/queue.fal.run

URL_KEYS = ("status_url", "response_url", "cancel_url")
# Queue answers are small JSON; one this large is not fal's, and is not held in memory.
MAX_REWRITTEN_BYTES = 8 * 1024 * 1024
# Encodings the proxy asks for (and can read) when it must rewrite an answer.
REWRITE_ACCEPT_ENCODING = "gzip, deflate"
_STATUS = re.compile(r"/[^?]+/requests/[^/?]+/status/?")


def queue_target(raw_path: str, query: str) -> str | None:
    """The fal queue URL a path on this port names (``/queue.fal.run/<rest>`` →
    ``https://queue.fal.run/<rest>``), None for any other path (a fal.run-shaped run)."""
    if raw_path != QUEUE_PREFIX and not raw_path.startswith(QUEUE_PREFIX + "/"):
        return None
    rest = raw_path[len(QUEUE_PREFIX) :] or "/"
    return f"https://{QUEUE_HOST}{rest}" + (f"?{query}" if query else "")


def key_credential(value: str | None) -> str | None:
    """The caller's credential in ``Authorization: Key <credential>`` (fal-client's form)."""
    if value is None:
        return None
    scheme, _, rest = value.strip().partition(" ")
    return rest.strip() if scheme.lower() == "key" else value.strip()


def proxied_url(url: str, origin: str) -> str | None:
    """A fal queue or run URL as this port serves it; None for anything else (which must not
    reach the client: it would follow it with the caller's credential)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if parts.scheme.lower() != "https" or port not in (None, 443) or parts.username is not None:
        return None
    prefix = {QUEUE_HOST: QUEUE_PREFIX, RUN_HOST: ""}.get(BACKUP_HOSTS.get(host, host))
    if prefix is None:
        return None
    return f"{origin}{prefix}{parts.path or '/'}" + (f"?{parts.query}" if parts.query else "")


def rewrite_queue_urls(body: bytes, origin: str) -> bytes | None:
    """A queue answer (a JSON object) with its ``status_url``, ``response_url`` and
    ``cancel_url`` pointed at this port; None when there is nothing to change (not a JSON
    object, or no such member). Only those three strings are replaced, in place: every other
    byte is kept as it came (numbers, escapes, member order, duplicates). A URL that is not
    fal's is refused (BadGateway): handed on, the client would take the caller's credential
    there. Fails closed, never open."""
    try:
        text = body.decode("utf-8")
        spans = _url_members(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None  # unreadable: the client's own JSON parser cannot read it either
    if not spans:
        return None
    out, last = [], 0
    for start, end, key, value in spans:
        new = proxied_url(value, origin)
        if new is None:
            raise BadGateway(
                "the gateway's queue answer points outside fal", f"{key} is not a fal URL"
            )
        out += [text[last:start], json.dumps(new)]
        last = end
    out.append(text[last:])
    return "".join(out).encode()


_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# The stdlib's JSON string scanner (C): (value, end) for the string starting after a '"'.
scanstring = json.decoder.scanstring  # type: ignore[attr-defined]


def _skip(text: str, at: int) -> int:
    """Past the JSON whitespace at ``at``."""
    match = _SPACE.match(text, at)
    assert match is not None  # "*": it always matches
    return match.end()


def _url_members(text: str) -> list[tuple[int, int, str, str]]:
    """Where the URL members' string values stand in a JSON object's text: (start, end, key,
    value) each; [] when ``text`` is not one JSON object. Raises ValueError on bad JSON."""
    at = _skip(text, 0)
    if text[at : at + 1] != "{":
        return []
    at = _skip(text, at + 1)
    spans: list[tuple[int, int, str, str]] = []
    if text[at : at + 1] == "}":
        at += 1
    else:
        while True:
            if text[at : at + 1] != '"':
                raise ValueError("a member name was expected")
            key, at = scanstring(text, at + 1)
            at = _skip(text, at)
            if text[at : at + 1] != ":":
                raise ValueError("':' was expected")
            at = _skip(text, at + 1)
            if key in URL_KEYS and text[at : at + 1] == '"':
                value, end = scanstring(text, at + 1)
                spans.append((at, end, key, value))
                at = end
            else:
                _, at = _DECODER.raw_decode(text, at)  # any other value, skipped whole
            at = _skip(text, at)
            if text[at : at + 1] == "}":
                at += 1
                break
            if text[at : at + 1] != ",":
                raise ValueError("',' or '}' was expected")
            at = _skip(text, at + 1)
    if _skip(text, at) != len(text):
        raise ValueError("text after the object")
    return spans


def decoded(body: bytes, encoding: str) -> bytes:
    """``body`` without its ``content-encoding`` (gzip, deflate or none), at most
    MAX_REWRITTEN_BYTES; BadGateway for another encoding or a body that does not decode. A
    gzip body may hold several members (RFC 1952), all decoded; anything else after the
    compressed data is an error, not dropped."""
    coding = encoding.strip().lower()
    if coding in ("", "identity") or not body:
        return body
    if coding not in ("gzip", "x-gzip", "deflate"):
        raise BadGateway(
            "the gateway sent a queue answer the proxy cannot rewrite",
            f"content-encoding {coding}; the proxy asked for {REWRITE_ACCEPT_ENCODING}",
        )
    gzipped = coding != "deflate"
    # gzip: a gzip header (wbits 16+); deflate: a zlib header, or none (as some servers send).
    wbits = zlib.MAX_WBITS | 16 if gzipped else zlib.MAX_WBITS if body[:1] == b"\x78" else -15
    out, rest = bytearray(), body
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            # Bounded: a bomb is refused after the limit, never inflated whole.
            out += inflater.decompress(rest, MAX_REWRITTEN_BYTES + 1 - len(out))
        except zlib.error:
            break
        if len(out) > MAX_REWRITTEN_BYTES:
            raise BadGateway(
                "the gateway's queue answer is too large",
                f"over {MAX_REWRITTEN_BYTES} bytes decoded",
            )
        if not inflater.eof:
            break
        rest = inflater.unused_data
        if not rest:
            return bytes(out)
        if not (gzipped and rest[:2] == b"\x1f\x8b"):  # another member, or else garbage
            break
    raise BadGateway(
        "the gateway sent a queue answer that does not decode", f"content-encoding {coding}"
    )


@dataclass(frozen=True)
class PythonSdkListener:
    """The Python client's port, as the forwarder and the bridge see it."""

    origin: str  # https://<name>:<port>, what the client was told (python-env)

    def read_headers(self, scope: Mapping[str, Any]) -> RequestHeaders:
        """The headers admission reads, with the caller's credential from ``Authorization:
        Key`` and the target from the path (a client's own ``x-fal-target-url`` is ignored,
        and dropped upstream as everywhere)."""
        seen = RequestHeaders.read(scope["headers"], b"authorization")
        seen.credential = key_credential(seen.credential)
        raw = scope.get("raw_path")
        path = raw.decode("latin-1") if raw else scope["path"]
        seen.target = queue_target(path, scope["query_string"].decode("latin-1"))
        return seen

    @staticmethod
    def rewrites(method: str, target: Target) -> bool:
        """Does this call's answer carry queue URLs to point here: a submit (a POST to an
        app on the queue) or a status poll. A result is the app's output: never touched."""
        if target.kind != "queue":
            return False
        if method == "POST":
            return "/requests/" not in target.path
        return method == "GET" and _STATUS.fullmatch(target.path) is not None
