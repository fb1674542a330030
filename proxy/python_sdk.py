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
from dataclasses import dataclass

from starlette.types import Scope

from .admission import RequestHeaders
from .errors import BadGateway
from .python_sdk_settings import QUEUE_PREFIX
from .targets import QUEUE_HOST, RUN_HOST, Target

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


def proxied_url(url: str, origin: str) -> str:
    """A fal URL as this port serves it; any other URL unchanged."""
    for host, prefix in ((QUEUE_HOST, QUEUE_PREFIX), (RUN_HOST, "")):
        root = f"https://{host}/"
        if url.startswith(root):
            return f"{origin}{prefix}/{url[len(root) :]}"
    return url


def rewrite_queue_urls(body: bytes, origin: str) -> bytes | None:
    """A queue answer (a JSON object) with its ``status_url``, ``response_url`` and
    ``cancel_url`` pointed at this port; None when there is nothing to change (not a JSON
    object, or no such fal URL). Every other member is kept as it was."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    changed = False
    for key in URL_KEYS:
        value = data.get(key)
        if isinstance(value, str) and (new := proxied_url(value, origin)) != value:
            data[key] = new
            changed = True
    if not changed:
        return None
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def decoded(body: bytes, encoding: str) -> bytes:
    """``body`` without its ``content-encoding`` (gzip, deflate or none), at most
    MAX_REWRITTEN_BYTES; BadGateway for another encoding or a body that does not decode."""
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        return body
    if coding not in ("gzip", "x-gzip", "deflate"):
        raise BadGateway(
            "the gateway sent a queue answer the proxy cannot rewrite",
            f"content-encoding {coding}; the proxy asked for {REWRITE_ACCEPT_ENCODING}",
        )
    # gzip: a gzip header (wbits 16+); deflate: a zlib header, or none (as some servers send).
    raw_deflate = coding == "deflate" and body[:1] != b"\x78"
    wbits = -zlib.MAX_WBITS if raw_deflate else zlib.MAX_WBITS | (16 if coding != "deflate" else 0)
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, MAX_REWRITTEN_BYTES + 1)  # bounded: no zip bomb
    except zlib.error:
        data = None
    if data is not None and len(data) > MAX_REWRITTEN_BYTES:
        raise BadGateway(
            "the gateway's queue answer is too large", f"over {MAX_REWRITTEN_BYTES} bytes decoded"
        )
    if data is None or not inflater.eof:
        raise BadGateway(
            "the gateway sent a queue answer that does not decode", f"content-encoding {coding}"
        )
    return data


@dataclass(frozen=True)
class PythonSdkListener:
    """The Python client's port, as the forwarder and the bridge see it."""

    origin: str  # https://<name>:<port>, what the client was told (python-env)

    def read_headers(self, scope: Scope) -> RequestHeaders:
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
