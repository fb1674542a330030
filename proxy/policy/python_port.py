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
# fal's answers are one gzip member; many tiny ones are work, not data, and are refused.
MAX_GZIP_MEMBERS = 64
_FEED = 64 * 1024  # input handed to zlib at a time (what its unused_data may copy)
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
    ``cancel_url`` pointed at this port; None when there is nothing to change (no such member,
    or bytes no JSON parser reads). Only those three strings are replaced, in place: every
    other byte is kept as it came (numbers, escapes, member order, duplicates).

    Fails closed, never open (BadGateway), for whatever the client's ``json.loads`` could read
    with a URL the proxy has not pointed here: a URL that is not fal's (the client would take
    the caller's credential there); a URL member that is neither a string nor null; an answer
    in another encoding json reads (UTF-8 with a BOM, UTF-16, UTF-32: fal sends plain UTF-8).
    Values are skipped, not built, so no depth or digit limit of this Python (which the
    client's may not share) hides a member; whatever is passed on, rewritten or not, is
    checked again with ``json.loads`` itself."""
    # Read as json.loads reads bytes: in the encoding json detects (a BOM, or NULs in the
    # first four bytes, make it another), lone surrogates allowed.
    encoding = json.detect_encoding(body)
    if encoding != "utf-8":
        raise BadGateway(
            "the gateway sent a queue answer the proxy cannot rewrite",
            f"{encoding} text; fal answers in UTF-8 without a byte order mark",
        )
    try:
        text = body.decode(encoding, "surrogatepass")
        spans = _url_members(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        _verify(body, origin)  # not JSON, unless json.loads (the client's parser) reads it
        return None
    if not spans:
        _verify(body, origin)  # belt and braces: nothing the client would follow
        return None
    out, last = [], 0
    for start, end, key, value in spans:
        new = proxied_url(value, origin) if isinstance(value, str) else None
        if new is None:
            raise BadGateway(
                "the gateway's queue answer points outside fal", f"{key} is not a fal URL"
            )
        out += [text[last:start], json.dumps(new)]
        last = end
    out.append(text[last:])
    rewritten = "".join(out).encode("utf-8", "surrogatepass")
    _verify(rewritten, origin)
    return rewritten


def _verify(body: bytes, origin: str) -> None:
    """BadGateway unless what ``json.loads`` makes of ``body`` (as fal-client reads it) has
    each URL member null or pointing here: the rewrite checked by the client's own parser."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        answer = None  # the rewrite parsed it: not reached, and nothing to follow if it were
    if not isinstance(answer, dict):
        return
    for key in URL_KEYS:
        value = answer.get(key)
        if value is not None and not (isinstance(value, str) and value.startswith(origin + "/")):
            raise BadGateway(
                "the gateway's queue answer points outside fal", f"{key} is not a fal URL"
            )


_SPACE = re.compile(r"[ \t\n\r]*")
# A number or a constant as json's C scanner reads them (ASCII digits only).
_SCALAR = re.compile(
    r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|null|true|false|NaN|-?Infinity"
)
_NOT_A_STRING = object()  # a URL member's value that is not a string (nor null)
# The stdlib's JSON string scanner (C): (value, end) for the string starting after a '"'.
scanstring = json.decoder.scanstring  # type: ignore[attr-defined]


def _skip(text: str, at: int) -> int:
    """Past the JSON whitespace at ``at``."""
    match = _SPACE.match(text, at)
    assert match is not None  # "*": it always matches
    return match.end()


def _url_members(text: str) -> list[tuple[int, int, str, object]]:
    """Where the URL members' values stand in a JSON object's text: (start, end, key, value)
    each, every occurrence (json.loads keeps the last of duplicates; all are checked); []
    when ``text`` is not one JSON object. Raises JSONDecodeError on bad JSON. Other values
    are skipped (:func:`_skip_value`), not built: no depth or digit limit of this Python
    decides what is read."""
    at = _skip(text, 0)
    if text[at : at + 1] != "{":
        return []
    at = _skip(text, at + 1)
    spans: list[tuple[int, int, str, object]] = []
    if text[at : at + 1] == "}":
        at += 1
    else:
        while True:
            key, at = _member(text, at)
            if key in URL_KEYS:
                value: object
                if text[at : at + 1] == '"':
                    value, end = scanstring(text, at + 1)
                else:  # a URL member that is not a string: null is let be, the rest refused
                    end = _skip_value(text, at)
                    value = None if text[at:end] == "null" else _NOT_A_STRING
                if value is not None:
                    spans.append((at, end, key, value))
                at = end
            else:
                at = _skip_value(text, at)  # any other value, skipped whole
            at = _skip(text, at)
            if text[at : at + 1] == "}":
                at += 1
                break
            if text[at : at + 1] != ",":
                raise json.JSONDecodeError("',' or '}' was expected", text, at)
            at = _skip(text, at + 1)
    if _skip(text, at) != len(text):
        raise json.JSONDecodeError("text after the object", text, at)
    return spans


def _skip_value(text: str, at: int) -> int:
    """Past the JSON value at ``at`` (no whitespace before it), as strictly as json.loads reads
    it; with a stack, not recursion, so any depth is read. Raises JSONDecodeError."""
    closers: list[str] = []  # the containers open around the current value
    while True:
        char = text[at : at + 1]
        if char == '"':
            _, at = scanstring(text, at + 1)
        elif char in ("{", "["):
            at = _skip(text, at + 1)
            close = "}" if char == "{" else "]"
            if text[at : at + 1] == close:
                at += 1
            else:
                closers.append(close)
                at = _member(text, at)[1] if close == "}" else at
                continue
        else:
            match = _SCALAR.match(text, at)
            if match is None:
                raise json.JSONDecodeError("a value was expected", text, at)
            at = match.end()
        while closers:  # after a value: close what ends here, or go on to the next one
            at = _skip(text, at)
            if text[at : at + 1] == closers[-1]:
                closers.pop()
                at += 1
                continue
            if text[at : at + 1] != ",":
                raise json.JSONDecodeError("',' or a closing bracket was expected", text, at)
            at = _skip(text, at + 1)
            at = _member(text, at)[1] if closers[-1] == "}" else at
            break
        else:
            return at


def _member(text: str, at: int) -> tuple[str, int]:
    """An object member's name at ``at``, and where its value starts (past the ':')."""
    if text[at : at + 1] != '"':
        raise json.JSONDecodeError("a member name was expected", text, at)
    key, at = scanstring(text, at + 1)
    at = _skip(text, at)
    if text[at : at + 1] != ":":
        raise json.JSONDecodeError("':' was expected", text, at)
    return key, _skip(text, at + 1)


def decoded(body: bytes, encoding: str) -> bytes:
    """``body`` without its ``content-encoding`` (gzip, deflate or none), at most
    MAX_REWRITTEN_BYTES; BadGateway for another encoding or a body that does not decode. A
    gzip body may hold several members (RFC 1952), at most MAX_GZIP_MEMBERS, all decoded;
    anything else after the compressed data is an error, not dropped. Linear in the body: the
    input is fed in slices of a view (zlib's ``unused_data`` copies at most one slice), never
    re-sliced whole per member; with the member cap, no answer can hold the event loop."""
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
    view, at, out = memoryview(body), 0, bytearray()
    for _member in range(MAX_GZIP_MEMBERS):
        inflater = zlib.decompressobj(wbits)
        while not inflater.eof and at < len(view):
            piece = view[at : at + _FEED]
            at += len(piece)
            try:
                # Bounded: a bomb is refused after the limit, never inflated whole.
                out += inflater.decompress(piece, MAX_REWRITTEN_BYTES + 1 - len(out))
            except zlib.error:
                break
            if len(out) > MAX_REWRITTEN_BYTES:
                raise BadGateway(
                    "the gateway's queue answer is too large",
                    f"over {MAX_REWRITTEN_BYTES} bytes decoded",
                )
        if not inflater.eof:
            break  # truncated, or not this encoding
        at -= len(inflater.unused_data)  # the input after this member: given back
        if at == len(view):
            return bytes(out)
        if not (gzipped and bytes(view[at : at + 2]) == b"\x1f\x8b"):  # another member, or garbage
            break
    else:
        raise BadGateway(
            "the gateway sent a queue answer the proxy cannot rewrite",
            f"more than {MAX_GZIP_MEMBERS} gzip members",
        )
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
