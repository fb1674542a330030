"""Support for ``test_fuzz_raw.py``: a raw-bytes client, a barrier that waits until the proxy
has finished with a request, an independent statement of the access policy (to judge what
the emulated gateway received), and a JWT builder that can forge anything.

Nothing here imports the proxy's own policy code: the expectations are written from the
README, so a bug in the proxy's policy cannot hide behind the same bug in the oracle.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

import jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.conftest import CF_TOKEN, FAL_KEY, PREFIX, FakeGateway, RunningProxy

HOSTPORT = b"@HOSTPORT@"  # replaced by the proxy's host:port when a request is sent
PORT = b"@PORT@"  # replaced by the proxy's port

# --- the policy the proxy under test is configured with ---------------------------------------

# emulator/die answers 200 with a content-length of 1000, sends 10 bytes and drops the
# connection: an allowed upstream that dies mid-body.
ALLOWED_APPS = ("fal-ai/fast-sdxl", "fal-ai/flux/*", "emulator/echo", "emulator/die")
# README "realtime token": each alias in allowed_apps must be the alias of an allowed pattern.
TOKEN_ALIASES = frozenset({"fast-sdxl", "flux", "echo", "die"})
TOKEN_MAX_EXPIRATION = 300  # FAL_PROXY_TOKEN_MAX_EXPIRATION default
REST_PATHS = ("/storage/upload/initiate", "/storage/upload/initiate-multipart", "/tokens/")
FORWARDED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
CREDENTIAL_SUBPROTOCOLS = ("fal-api-key.", "cf-aig-authorization.", "proxy-authorization.")
# Request headers that carry a client's credential and must never reach the gateway.
CLIENT_CREDENTIAL_HEADERS = ("cookie", "cookie2", "proxy-authorization", "x-proxy-authorization")


def app_allowed(path: str) -> bool:
    """A fal.run path (``/fal-ai/flux/dev/stream``) names an allowed app: the endpoint id,
    or a longer prefix of the path, matches an allowed glob."""
    segments = path.strip("/").split("/")
    return any(
        fnmatchcase("/".join(segments[:end]), pattern)
        for end in range(1, len(segments) + 1)
        for pattern in ALLOWED_APPS
    )


def owner_alias_allowed(prefix: str) -> bool:
    """Queue status/result/cancel carry ``owner/alias``: allowed when an allowed app lives
    under it (or it is an allowed app itself)."""
    if app_allowed(prefix):
        return True
    depth = prefix.count("/") + 1
    return any(
        len(p.split("/")) > depth and fnmatchcase(prefix, "/".join(p.split("/")[:depth]))
        for p in ALLOWED_APPS
    )


def fully_decoded(text: str) -> str:
    for _ in range(8):
        decoded = unquote(text, errors="replace")
        if decoded == text:
            break
        text = decoded
    return text


def has_dot_segment(path: str) -> bool:
    return any(s in (".", "..") for s in re.split(r"[/?#;\\]", fully_decoded(path)))


# --- realtime token bodies ---------------------------------------------------------------------


class _Pairs(dict):
    """A JSON object that remembers its duplicate keys (``json`` keeps only the last)."""

    duplicates: list[str]


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _Pairs:
    out = _Pairs(pairs)
    seen: set[str] = set()
    out.duplicates = []
    for key, _ in pairs:
        if key.casefold() in seen:
            out.duplicates.append(key)
        seen.add(key.casefold())
    return out


def _any_nested_duplicate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Pairs):
            if item.duplicates:
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def token_body_verdict(body: bytes) -> bool | None:
    """Is this ``rest.fal.ai/tokens/`` body one the proxy may send to fal?

    False: it must not go upstream (not strict UTF-8 JSON, a BOM, a duplicated or
    case-folded ``allowed_apps``/``token_expiration``, an alias not allowed, an
    expiration outside 1..300). True: a clean, allowed body. None: well-formed and
    allowed, but with something a strict proxy may refuse and a lenient one may pass
    (a duplicate elsewhere, NaN, very deep nesting): no claim either way.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if text.startswith("\ufeff"):
        return False
    odd = False

    def constant(name: str) -> float:  # NaN, Infinity: not JSON, but harmless here
        nonlocal odd
        odd = True
        return float(name.replace("Infinity", "inf"))

    try:
        data = json.loads(text, object_pairs_hook=_pairs_hook, parse_constant=constant)
    except RecursionError:
        return None
    except ValueError:
        return False
    if not isinstance(data, dict):
        return False
    folded = {k.casefold() for k in data.duplicates}
    if folded & {"allowed_apps", "token_expiration"}:
        return False
    apps = data.get("allowed_apps")
    if not isinstance(apps, list) or not apps or not all(isinstance(a, str) and a for a in apps):
        return False
    if not all(a in TOKEN_ALIASES for a in apps):
        return False
    expiration = data.get("token_expiration", 120)
    if (
        not isinstance(expiration, int)
        or isinstance(expiration, bool)
        or not 0 < expiration <= TOKEN_MAX_EXPIRATION
    ):
        return False
    if odd or data.duplicates or _any_nested_duplicate(data) or _depth(text) > 32:
        return None
    return True


def _depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


# --- what the gateway received ------------------------------------------------------------------


@dataclass
class Record:
    """One request (or WebSocket handshake) the emulated gateway received."""

    kind: str
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    body_len: int
    target_url: str | None

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name]

    def text(self) -> str:
        """Everything in the record, for substring searches."""
        return "\n".join(
            [
                self.path,
                self.query,
                self.target_url or "",
                *(f"{n}: {v}" for n, v in self.headers),
                self.body.decode("latin-1"),
            ]
        )

    def short(self) -> str:
        return (
            f"{self.kind} {self.method} {self.path}{'?' + self.query if self.query else ''} "
            f"target={self.target_url!r} headers={self.headers!r} body={self.body[:200]!r}"
        )


def gateway_records(gateway: FakeGateway) -> list[Record]:
    out = []
    for r in gateway.client.get("/_emulator/requests").json():
        out.append(
            Record(
                r["kind"],
                r["method"],
                r["path"],
                r["query"],
                [(n, v) for n, v in r["headers"]],
                base64.b64decode(r["body_b64"]),
                r["body_len"],
                r["target_url"],
            )
        )
    return out


def record_problems(
    record: Record,
    secrets: Iterable[str],
    caller_header: str = "x-proxy-authorization",
    cf_token: str | None = CF_TOKEN,
) -> list[str]:
    """Why ``record`` should never have reached the gateway (empty: it is fine)."""
    problems: list[str] = []
    if record.kind not in ("gateway", "websocket"):
        return [f"unexpected record kind {record.kind}"]
    # The proxy's key, once; the gateway token, once; no client credential under any name.
    if record.values("authorization") != [f"Key {FAL_KEY}"]:
        problems.append(
            f"authorization is {record.values('authorization')!r}, not the proxy's key once"
        )
    if cf_token is not None and record.values("cf-aig-authorization") != [f"Bearer {cf_token}"]:
        problems.append(f"cf-aig-authorization is {record.values('cf-aig-authorization')!r}")
    for name, _ in record.headers:
        lowered = name.lower()
        if "_" in name:
            problems.append(f"header with an underscore forwarded: {name!r}")
        if lowered in CLIENT_CREDENTIAL_HEADERS or lowered == caller_header:
            problems.append(f"client credential header forwarded: {name!r}")
    text = record.text()
    decoded = fully_decoded(text.replace("+", " "))
    for secret in secrets:
        if secret and (secret in text or secret in decoded):
            problems.append(f"a client credential reached the gateway: {secret!r}")
    if len(record.values("x-fal-target-url")) > 1:
        problems.append("more than one x-fal-target-url")
    if not record.path.startswith(PREFIX):
        return [*problems, f"path outside the gateway prefix: {record.path!r}"]
    fal_path = record.path[len(PREFIX) :]

    if record.kind == "websocket":
        if not _fal_path_ok(fal_path):
            problems.append(f"socket for an app not allowed: {fal_path!r}")
        keys = [unquote_plus(k) for k, _ in parse_qsl(record.query, keep_blank_values=True)]
        if "fal_jwt_token" in keys:
            problems.append("a client fal_jwt_token went upstream")
        for value in record.values("sec-websocket-protocol"):
            for offered in value.split(","):
                if offered.strip().lower().startswith(CREDENTIAL_SUBPROTOCOLS):
                    problems.append(f"credential sub-protocol forwarded: {offered.strip()!r}")
        return problems

    if record.target_url is None:  # path mode: https://fal.run/<path>
        if not _fal_path_ok(fal_path):
            problems.append(f"fal.run call to an app not allowed: {fal_path!r}")
        return problems
    if fal_path not in ("", "/"):
        problems.append(f"target mode with a path: {fal_path!r}")
    try:
        parts = urlsplit(record.target_url)
        port = parts.port
    except ValueError:
        return [*problems, f"unparseable target {record.target_url!r}"]
    host = (parts.hostname or "").lower()
    if (
        parts.scheme != "https"
        or port not in (None, 443)
        or parts.username is not None
        or parts.password is not None
    ):
        problems.append(f"target not https on fal's default port: {record.target_url!r}")
    if has_dot_segment(parts.path) or re.search(r"[\x00-\x20\x7f]", fully_decoded(parts.path)):
        problems.append(f"target path with dot segments or controls: {parts.path!r}")
    if host in ("fal.run", "queue.fal.run"):
        match = re.fullmatch(r"/(.+?)/requests/[^/]+(?:/.*)?", parts.path)
        if host == "queue.fal.run" and match:
            if not owner_alias_allowed(match[1]) or not owner_alias_allowed(
                fully_decoded(match[1])
            ):
                problems.append(f"queue call for an app not allowed: {parts.path!r}")
        elif not _fal_path_ok(parts.path):
            problems.append(f"call for an app not allowed: {record.target_url!r}")
    elif host == "rest.fal.ai":
        if parts.path not in REST_PATHS:
            problems.append(f"rest.fal.ai path not allowed: {parts.path!r}")
        if parts.path == "/tokens/" and token_body_verdict(record.body) is False:
            problems.append(f"token body that must be refused went upstream: {record.body[:300]!r}")
    else:
        problems.append(f"target host not fal's: {record.target_url!r}")
    return problems


def _fal_path_ok(path: str) -> bool:
    if path in ("", "/") or has_dot_segment(path):
        return False
    return app_allowed(path) and app_allowed(fully_decoded(path))


# --- a raw HTTP/1.x client ----------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    head: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    body: bytes
    complete: bool = True

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    def __repr__(self) -> str:
        return f"Reply({self.status}, head={self.head[:300]!r}, body={self.body[:300]!r})"


@dataclass
class Outcome:
    """Everything the proxy sent back on one connection."""

    replies: list[Reply] = field(default_factory=list)
    received: bytes = b""
    timed_out: bool = False
    reset: bool = False
    upgraded: bool = False  # a 101 came back (we then closed the socket properly)

    @property
    def final(self) -> list[Reply]:
        return [r for r in self.replies if r.status >= 200 or r.status == 101]

    def summary(self) -> str:
        return (
            f"statuses={[r.status for r in self.replies]} timed_out={self.timed_out} "
            f"reset={self.reset} "
            f"received={self.received[:400]!r}"
        )


_CLOSE_FRAME = b"\x88\x82\x01\x02\x03\x04" + bytes(
    b ^ m for b, m in zip(b"\x03\xe8", b"\x01\x02", strict=True)
)


def send_raw(
    address: tuple[str, int],
    data: bytes,
    *,
    method: str = "GET",
    half_close: bool = False,
    timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
) -> Outcome:
    """Write ``data`` on a fresh connection and read what comes back.

    After the first final response the write side is shut down, so anything the server
    still has to say (a pipelined request's answer) arrives before the connection ends, and
    nothing waits on a keep-alive timer. ``half_close`` shuts it down right after the
    request (a body shorter than announced: the server then sees the client leave).
    With ``tls`` the connection is TLS and is never half-closed (that would end TLS, not the
    stream): send ``connection: close`` so the server ends it. After a
    101 a WebSocket close frame is sent. ``timed_out`` means the server neither answered
    nor closed within ``timeout`` seconds.
    """
    out = Outcome()
    deadline = time.monotonic() + timeout
    sock = socket.create_connection(address, timeout=timeout)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=address[0])
    buffer = bytearray()
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered (and closed) before it read everything: read the answer
        shut = False

        def shutdown() -> None:
            nonlocal shut
            if not shut and tls is None:
                shut = True
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        if half_close:
            shutdown()
        pos, eof = 0, False
        while True:
            if not out.upgraded:
                parsed = _parse_reply(bytes(buffer), pos, method if not out.final else "GET", eof)
                if parsed is not None:
                    reply, pos = parsed
                    out.replies.append(reply)
                    if reply.status == 101:
                        out.upgraded = True
                        try:
                            sock.sendall(_CLOSE_FRAME)
                        except OSError:
                            pass
                        shutdown()
                    elif reply.status >= 200:
                        shutdown()
                    continue
            if eof:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                out.timed_out = True
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                out.timed_out = True
                break
            except (ConnectionResetError, ssl.SSLError):  # TLS: an end without close_notify
                out.reset, eof = True, True
                continue
            if not chunk:
                eof = True
            buffer += chunk
        if not out.upgraded and pos < len(buffer):
            partial = _parse_reply(bytes(buffer), pos, "GET", True)
            if partial is not None:
                out.replies.append(partial[0])
    finally:
        sock.close()
    out.received = bytes(buffer)
    return out


def _parse_reply(buf: bytes, pos: int, method: str, eof: bool) -> tuple[Reply, int] | None:
    end = buf.find(b"\r\n\r\n", pos)
    if end < 0:
        return None
    head = buf[pos:end]
    status_line, *lines = head.split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return None
    status = int(parts[1])
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    reply = Reply(status, head, headers, b"")
    start = end + 4
    get = reply.header
    if status < 200 or status in (204, 304):
        return reply, start
    if method == "HEAD" and (get(b"connection") or b"").lower() != b"close":
        return reply, start
    if (get(b"transfer-encoding") or b"").lower() == b"chunked":
        body, at = bytearray(), start
        while True:
            line_end = buf.find(b"\r\n", at)
            if line_end < 0:
                break
            try:
                size = int(buf[at:line_end].split(b";")[0], 16)
            except ValueError:
                break
            if len(buf) < line_end + 2 + size + 2:
                break
            body += buf[line_end + 2 : line_end + 2 + size]
            at = line_end + 2 + size + 2
            if size == 0:
                reply.body = bytes(body)
                return reply, at
        if eof:
            reply.body, reply.complete = bytes(body), False
            return reply, len(buf)
        return None
    length = get(b"content-length")
    if length is not None and length.isdigit():
        if len(buf) - start >= int(length):
            reply.body = buf[start : start + int(length)]
            return reply, start + int(length)
        if eof:
            reply.body, reply.complete = buf[start:], False
            return reply, len(buf)
        return None
    if not eof:  # delimited by the end of the connection
        return None
    reply.body = buf[start:]
    return reply, len(buf)


# --- waiting until the proxy is done with a request --------------------------------------------


_GAUGE = re.compile(rb"^(fal_proxy_in_flight_requests|fal_proxy_open_websockets) (\S+)$", re.M)


class Barrier:
    """Waits until the proxy has finished every request and socket, and its log lines are in.

    1. ``/metrics`` until no HTTP request is in flight and no socket is open (a poll with a
       deadline, not a sleep: the requests of the example being judged have all ended);
    2. a marker request the proxy refuses at once, then its canonical log line: stdout is one
       pipe, so every line written before it has been read too.
    """

    def __init__(self, proxy: RunningProxy, marker_headers: bytes = b"") -> None:
        self.proxy = proxy
        host, port = proxy.url.split("://", 1)[1].rsplit(":", 1)
        self.address = (host, int(port))
        self.hostport = f"{host}:{port}".encode()
        self.marker_headers = marker_headers

    def render(self, data: bytes) -> bytes:
        return data.replace(HOSTPORT, self.hostport).replace(PORT, str(self.address[1]).encode())

    def settle(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        request = (
            b"GET /metrics HTTP/1.1\r\nhost: " + self.hostport + b"\r\nconnection: close\r\n\r\n"
        )
        while True:
            outcome = send_raw(self.address, request, timeout=timeout)
            gauges = (
                {m[0]: float(m[1]) for m in _GAUGE.findall(outcome.final[0].body)}
                if outcome.final
                else {}
            )
            if gauges and all(v == 0 for v in gauges.values()):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the proxy never became idle: {gauges} {outcome.summary()}")
            time.sleep(0.005)  # poll interval
        start = len(self.proxy.process.lines)
        marker = send_raw(
            self.address,
            b"GET /api/fal/proxy HTTP/1.1\r\nhost: "
            + self.hostport
            + b"\r\n"
            + self.marker_headers
            + b"connection: close\r\n\r\n",
            timeout=timeout,
        )
        request_id = marker.final[0].header(b"x-proxy-request-id") if marker.final else None
        assert request_id is not None, f"the marker request got no request id: {marker.summary()}"
        self.wait_for_line(request_id.decode(), start, deadline)

    def wait_for_line(self, needle: str, start: int, deadline: float) -> None:
        process = self.proxy.process
        cond = process._cond  # the reader thread's condition (tests/conftest.py)
        with cond:
            while True:
                lines = process.lines
                if any(needle in line for line in lines[start:]):
                    return
                start = len(lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no log line with {needle!r}")
                cond.wait(min(remaining, 0.5))


# --- log lines -----------------------------------------------------------------------------


def log_errors(lines: list[str]) -> list[str]:
    """Lines that show a crash or an error: tracebacks, uvicorn's ASGI exception, level=error."""
    bad = []
    for line in lines:
        if "Traceback" in line or "Exception in ASGI application" in line:
            bad.append(line)
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and str(record.get("level", "")).lower() in (
            "error",
            "critical",
            "exception",
        ):
            bad.append(line)
    return bad


def request_line(lines: list[str], request_id: str) -> dict[str, Any] | None:
    """The proxy's canonical log line for ``request_id``."""
    for line in lines:
        if request_id in line:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("request_id") == request_id:
                return record
    return None


def leaked(blob: bytes | str, secrets: Iterable[str]) -> list[str]:
    text = blob.decode("latin-1") if isinstance(blob, bytes) else blob
    return [s for s in secrets if s and s in text]


# --- JWTs, built by hand so any of their parts can be wrong -----------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Keys:
    rsa: Any  # private keys
    ec: Any
    other_rsa: Any
    other_ec: Any
    hs_secret: str

    def __repr__(self) -> str:
        return "Keys(rsa-1, ec-1, other RSA and EC keys, HS256 secret)"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis's printer
        printer.text(repr(self))

    def jwks(self) -> str:
        rsa_jwk = json.loads(RSAAlgorithm.to_jwk(self.rsa.public_key()))
        ec_jwk = json.loads(ECAlgorithm.to_jwk(self.ec.public_key()))
        rsa_jwk.update(kid="rsa-1", alg="RS256", use="sig")
        ec_jwk.update(kid="ec-1", alg="ES256", use="sig")
        return json.dumps({"keys": [rsa_jwk, ec_jwk]})

    def rsa_public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def sign(method: str, signing_input: bytes, keys: Keys) -> bytes:
    if method == "rsa":
        return RSAAlgorithm(RSAAlgorithm.SHA256).sign(signing_input, keys.rsa)
    if method == "other-rsa":
        return RSAAlgorithm(RSAAlgorithm.SHA256).sign(signing_input, keys.other_rsa)
    if method == "ec":
        return ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input, keys.ec)
    if method == "other-ec":
        return ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input, keys.other_ec)
    if method == "hs":
        return hmac.new(keys.hs_secret.encode(), signing_input, hashlib.sha256).digest()
    if method == "hs-wrong":
        return hmac.new(
            b"not-the-secret-0123456789abcdefghij", signing_input, hashlib.sha256
        ).digest()
    if method == "hs-rsa-pem":  # the classic alg confusion: HMAC keyed with the public key
        return hmac.new(keys.rsa_public_pem(), signing_input, hashlib.sha256).digest()
    if method == "none":
        return b""
    if method == "garbage":
        return b"\x00garbage-signature\xff" * 3
    raise ValueError(method)


def build_jwt(header: dict[str, Any], claims: dict[str, Any], method: str, keys: Keys) -> str:
    head = b64url(json.dumps(header, separators=(",", ":")).encode())
    body = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{head}.{body}".encode()
    return f"{head}.{body}.{b64url(sign(method, signing_input, keys))}"


def jwt_acceptable(
    token: str, *, keys: Keys, mode: str, audience: str | None, issuer: str | None
) -> bool:
    """Could a correct verifier accept this token? (README: RS256/ES256 keys from the JWKS, or
    an HS256 secret; ``exp`` required; ``aud``/``iss`` when configured; the caller claim
    ``sub`` a non-empty string or number.) Generous on purpose: it only decides when a
    request must NOT go upstream."""
    try:
        header = jwt.get_unverified_header(token)
    except Exception:
        return False
    if mode == "hs":
        candidates = [(keys.hs_secret, "HS256")]
    else:
        kid = header.get("kid")
        pairs = [("rsa-1", keys.rsa.public_key(), "RS256"), ("ec-1", keys.ec.public_key(), "ES256")]
        candidates = [(key, alg) for key_id, key, alg in pairs if kid is None or kid == key_id]
    required = ["exp", *(["aud"] if audience else []), *(["iss"] if issuer else [])]
    for key, alg in candidates:
        if header.get("alg") != alg:
            continue
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=audience,
                issuer=issuer,
                leeway=30,
                options={"require": required},
            )
        except Exception:
            continue
        sub = claims.get("sub")
        if isinstance(sub, (str, int)) and not isinstance(sub, bool) and sub != "":
            return True
    return False
