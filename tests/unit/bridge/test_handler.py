"""The WebSocket bridge driven as an ASGI callable, in process, with hand-written receive and send.

As Starlette's own tests do (and ``forward/test_handler.py`` for the forwarder): for the
paths awkward through a subprocess (a client gone during the upstream handshake, each
refusal's exact shape, each close code both ways, a cancellation by the server). The
upstream is a ``websockets`` server on loopback, scripted per test, or a closed port.
Every wait is on an event (a message sent, a handshake or a close seen), never a timer.
"""

from __future__ import annotations

import asyncio
import http
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import pytest
from starlette.types import Message
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from proxy.admission import Admission
from proxy.bridge.handler import Bridge
from proxy.config.settings import Settings
from proxy.observe.metrics import Metrics
from proxy.policy.headers import CLIENT_PROXY_ID

pytestmark = pytest.mark.anyio

PATH = "/fal-ai/fast-lcm-diffusion/realtime"
WAIT = 5.0  # a bound on each event wait, so that a broken bridge fails instead of hanging
JSON_HEADERS = b"content-type", b"application/json"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings(gateway: str, **env: str) -> Settings:
    return Settings.from_env({"FAL_KEY": "k-inprocess", "FAL_PROXY_GATEWAY_URL": gateway, **env})


def scope(
    path: str = PATH,
    query: bytes = b"",
    headers: Any = (),
    subprotocols: Any = (),
    http_response: bool = True,
) -> dict[str, Any]:
    """A websocket scope as uvicorn builds it; ``http_response``: the server offers ASGI's
    ``websocket.http.response`` extension (uvicorn does)."""
    return {
        "type": "websocket", "http_version": "1.1", "scheme": "ws", "path": path,
        "raw_path": path.encode(), "query_string": query, "client": ("127.0.0.1", 5000),
        "headers": [(b"host", b"127.0.0.1:8787"), *headers],
        "subprotocols": list(subprotocols),
        "extensions": {"websocket.http.response": {}} if http_response else {},
    }  # fmt: skip


CONNECT = {"type": "websocket.connect"}


def accept(subprotocol: str | None = None) -> dict[str, Any]:
    return {"type": "websocket.accept", "subprotocol": subprotocol}


def close(code: int, reason: str) -> dict[str, Any]:
    return {"type": "websocket.close", "code": code, "reason": reason}


def disconnect(code: int, reason: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "websocket.disconnect", "code": code}
    if reason is not None:
        message["reason"] = reason
    return message


def refusal(
    status: int, body: bytes, *, content_type: bytes | None = b"application/json", **more: bytes
) -> list[dict[str, Any]]:
    """What a refused upgrade sends: the status with its type (JSON: the proxy's own body) and
    length, ``more`` headers (``retry_after=b"3"``), the body."""
    headers = [(b"content-type", content_type)] if content_type is not None else []
    headers.append((b"content-length", str(len(body)).encode()))
    headers += [(name.replace("_", "-").encode(), value) for name, value in more.items()]
    return [
        {"type": "websocket.http.response.start", "status": status, "headers": headers},
        {"type": "websocket.http.response.body", "body": body},
    ]


class Client:
    """receive() hands out the queued messages, then waits (as a live client does).

    send() checks what uvicorn's ("websockets", legacy) implementation checks: a refusal's
    status must be an ``http.HTTPStatus`` (ValueError otherwise), and nothing may follow a
    close (RuntimeError; uvicorn raises it, and the message lands in ``rejected``). ``fail``:
    the message type whose send raises that exception (OSError: the ASGI spec's "client
    gone"), after being recorded.
    """

    def __init__(self, *messages: Message, fail: tuple[str, BaseException] | None = None) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        for message in messages:
            self.queue.put_nowait(message)
        self.sent: list[Message] = []
        self.changed = asyncio.Event()
        self.fail = fail
        self.rejected: list[Message] = []

    async def receive(self) -> Message:
        return await self.queue.get()

    async def send(self, message: Message) -> None:
        if message["type"] == "websocket.http.response.start":
            http.HTTPStatus(message["status"])
        if any(m["type"] == "websocket.close" for m in self.sent):
            self.rejected.append(message)
            raise RuntimeError(f"Unexpected ASGI message {message['type']!r} after a close")
        self.sent.append(message)
        self.changed.set()
        if self.fail is not None and message["type"] == self.fail[0]:
            raise self.fail[1]

    def leave(self, code: int = 1006) -> None:
        """The client goes away: its next receive() is the disconnect."""
        self.queue.put_nowait(disconnect(code))

    async def sent_count(self, n: int) -> None:
        """Wait (on the sends, not a timer) until the bridge has sent ``n`` messages."""
        while len(self.sent) < n:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), WAIT)


class Log:
    """Stands in for the bridge's structlog logger: the lines, as (event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, {**fields, "level": "warning"}))

    def exception(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    def events(self) -> list[str]:
        return [event for event, _ in self.lines]

    def session(self) -> dict[str, Any]:
        """The one canonical line of the one session."""
        lines = [fields for event, fields in self.lines if event == "websocket"]
        assert len(lines) == 1, self.lines
        return lines[0]


Script = Callable[[ServerConnection], Awaitable[None]]


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


class Upstream:
    """A loopback websockets server standing in for the gateway.

    Records each handshake request (and its connection) and the close frame it got (None:
    none came); per test, ``hold`` keeps the handshake waiting, ``answer`` refuses it with a
    status (any, Cloudflare's 520 too), a body (text/plain unless a ``content-type`` is
    given; None: no such header) and headers, and ``script`` is what the socket does once
    open (echo by default).
    """

    def __init__(self) -> None:
        self.gateway = ""
        self.handshakes: list[Request] = []
        self.handshake_seen = asyncio.Event()
        self.hold: asyncio.Event | None = None
        self.answer: tuple[int, str, Mapping[str, str | None]] | None = None
        self.script: Script = echo
        self.closes: list[tuple[int | None, str | None]] = []
        self.closed = asyncio.Event()
        self.connections: list[ServerConnection] = []

    async def process_request(self, connection: ServerConnection, request: Request) -> Any:
        self.handshakes.append(request)
        self.connections.append(connection)
        self.handshake_seen.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.answer is None:
            return None
        status, text, headers = self.answer
        body = text.encode()
        fields = {"content-type": "text/plain; charset=utf-8", **headers}
        pairs = [(name, value) for name, value in fields.items() if value is not None]
        # Built by hand: websockets' own respond() takes only statuses http.HTTPStatus knows.
        return Response(status, "Refused", Headers([*pairs, ("content-length", str(len(body)))]),
                        body)  # fmt: skip

    async def handler(self, ws: ServerConnection) -> None:
        try:
            await self.script(ws)
        except ConnectionClosed:
            pass
        await ws.wait_closed()
        rcvd = ws.protocol.close_rcvd
        self.closes.append((rcvd.code, rcvd.reason) if rcvd is not None else (None, None))
        self.closed.set()

    async def close_seen(self) -> tuple[int | None, str | None]:
        await asyncio.wait_for(self.closed.wait(), WAIT)
        assert len(self.closes) == 1, self.closes
        return self.closes[0]

    def handshake(self) -> tuple[str, Headers]:
        assert len(self.handshakes) == 1, [r.path for r in self.handshakes]
        return self.handshakes[0].path, self.handshakes[0].headers


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    async with serve(up.handler, "127.0.0.1", 0, process_request=up.process_request) as server:
        port = server.sockets[0].getsockname()[1]
        up.gateway = f"http://127.0.0.1:{port}/v1/a/g/fal"
        yield up
        if up.hold is not None:
            up.hold.set()


async def make_bridge(config: Settings) -> Bridge:
    admission = Admission(config)
    await admission.limiter.start()
    bridge = Bridge(config, admission, Metrics())
    bridge.log = Log()
    return bridge


def logged(bridge: Bridge) -> Log:
    assert isinstance(bridge.log, Log)
    return bridge.log


def open_sockets(bridge: Bridge) -> float | None:
    return bridge.metrics.registry.get_sample_value("fal_proxy_open_websockets")


# --- a session ----------------------------------------------------------------------------------


async def test_frames_go_both_ways_keeping_their_type_with_the_key_and_no_client_credential(
    upstream: Upstream,
) -> None:
    bridge = await make_bridge(settings(upstream.gateway, CF_AIG_TOKEN="cf-inprocess"))
    client = Client(CONNECT, {"type": "websocket.receive", "text": "hi"})
    offered = ["fal-api-key.client-key", "v1", "Proxy-Authorization.tok"]
    session = scope(query=b"fal_jwt_token=abc&max_buffering=5", subprotocols=offered)
    task = asyncio.ensure_future(bridge(session, client.receive, client.send))
    await client.sent_count(2)
    client.queue.put_nowait({"type": "websocket.receive", "bytes": b""})  # stays binary
    await client.sent_count(3)
    client.queue.put_nowait(disconnect(1000))
    await asyncio.wait_for(task, WAIT)

    assert client.sent == [
        accept("v1"),  # the upstream chose none: the first offer that went up
        {"type": "websocket.send", "text": "hi"},
        {"type": "websocket.send", "bytes": b""},
    ]
    path, headers = upstream.handshake()
    assert path == f"/v1/a/g/fal{PATH}?max_buffering=5"
    assert headers["authorization"] == "Key k-inprocess"
    assert headers["cf-aig-authorization"] == "Bearer cf-inprocess"
    assert headers["x-fal-client-proxy"] == CLIENT_PROXY_ID
    assert headers["user-agent"] == CLIENT_PROXY_ID
    assert headers.get_all("sec-websocket-protocol") == ["v1"]
    assert await upstream.close_seen() == (1000, "")
    line = logged(bridge).session()
    assert {k: v for k, v in line.items() if k not in ("duration_ms", "request_id")} == {
        "route": "websocket", "target_path": PATH, "frames_in": 2, "frames_out": 2,
        "bytes_in": 2, "bytes_out": 2, "client_close": 1000, "upstream_close": 1000,
        "generations": 2,  # the session's opening (its first message), and the second
    }  # fmt: skip
    assert not bridge.sessions and open_sockets(bridge) == 0


async def test_a_client_gone_during_the_upstream_handshake_aborts_it_and_frees_the_slot(
    upstream: Upstream,
) -> None:
    # The client is watched while the upstream handshake runs: when it leaves, the handshake
    # is abandoned at once (its TCP connection closed), not after FAL_PROXY_CONNECT_TIMEOUT
    # (10 s here, longer than WAIT), its slot is freed, and no accept goes to the gone client.
    upstream.hold = asyncio.Event()  # the upstream never answers this one
    bridge = await make_bridge(settings(upstream.gateway, FAL_PROXY_MAX_CONCURRENT="1"))
    client = Client(CONNECT)
    task = asyncio.ensure_future(bridge(scope(), client.receive, client.send))
    await asyncio.wait_for(upstream.handshake_seen.wait(), WAIT)
    client.leave(1006)
    await asyncio.wait_for(task, WAIT)
    await asyncio.wait_for(upstream.connections[0].wait_closed(), WAIT)

    # A close before any accept ends the server's half of the handshake (uvicorn logs an
    # error for a handler that returns without one); it reaches nobody.
    assert client.sent == [{"type": "websocket.close", "code": 1000}]
    line = logged(bridge).session()
    assert (line["client_close"], line["upstream_close"], line["error"]) == (
        1006, None, "client_gone")  # fmt: skip
    assert not bridge.sessions

    upstream.hold.set()
    second = Client(CONNECT)  # the slot is free: admitted, not refused with 429
    task = asyncio.ensure_future(bridge(scope(), second.receive, second.send))
    await second.sent_count(1)
    second.leave(1000)
    await asyncio.wait_for(task, WAIT)
    assert second.sent == [accept()]


async def test_a_client_message_during_the_upstream_handshake_is_kept_for_the_session(
    upstream: Upstream,
) -> None:
    # The watch reads the client while the upstream handshake runs; what it reads that is not
    # a disconnect is the session's first frame, not lost.
    upstream.hold = asyncio.Event()
    bridge = await make_bridge(settings(upstream.gateway))
    client = Client(CONNECT)
    task = asyncio.ensure_future(bridge(scope(), client.receive, client.send))
    await asyncio.wait_for(upstream.handshake_seen.wait(), WAIT)
    client.queue.put_nowait({"type": "websocket.receive", "text": "early"})
    upstream.hold.set()
    await client.sent_count(2)
    client.leave(1000)
    await asyncio.wait_for(task, WAIT)
    assert client.sent == [accept(), {"type": "websocket.send", "text": "early"}]


async def test_a_client_that_leaves_before_connecting_gets_nothing(upstream: Upstream) -> None:
    bridge = await make_bridge(settings(upstream.gateway))
    client = Client(disconnect(1006))
    await bridge(scope(), client.receive, client.send)
    assert client.sent == [] and upstream.handshakes == []
    assert "error" not in logged(bridge).session()


# --- refusals -----------------------------------------------------------------------------------


TEXT = b"text/plain; charset=utf-8"


@pytest.mark.parametrize(
    ("status", "body", "headers", "relayed"),
    [
        (403, '{"detail":"bad key"}', {"content-type": "application/json"},
         {"content_type": b"application/json"}),
        (429, "slow down", {"retry-after": "3"}, {"content_type": TEXT, "retry_after": b"3"}),
        (503, "", {"retry-after": "Wed, 21 Oct 2026 07:28:00 GMT", "content-type": None},
         {"content_type": None, "retry_after": b"Wed, 21 Oct 2026 07:28:00 GMT"}),
        # Never followed, and its Location not relayed: it names the gateway's own path.
        (302, "", {"location": f"/v1/a/g/fal{PATH}?followed=1"}, {"content_type": TEXT}),
    ],
)  # fmt: skip
async def test_an_upstream_refusal_is_relayed_with_its_status_body_type_and_retry_after(
    upstream: Upstream,
    status: int,
    body: str,
    headers: dict[str, str | None],
    relayed: dict[str, Any],
) -> None:
    upstream.answer = (status, body, headers)
    bridge = await make_bridge(settings(upstream.gateway))
    client = Client(CONNECT)
    await bridge(scope(), client.receive, client.send)
    # The upstream's own body with its own type (none if it gave none) and Retry-After.
    assert client.sent == refusal(status, body.encode(), **relayed)
    assert upstream.handshake()[0] == f"/v1/a/g/fal{PATH}"  # one handshake: no redirect taken
    assert logged(bridge).session()["error"] == "upstream_refused"
    assert not bridge.sessions


async def test_a_refusal_relays_no_other_upstream_header(upstream: Upstream) -> None:
    upstream.answer = (401, "no", {
        "www-authenticate": 'Key realm="fal"', "set-cookie": "session=secret",
        "location": "https://elsewhere.example/", "cf-ray": "8a1b", "x-fal-anything": "1",
        "authorization": "Key upstream-echo", "content-length-extra": "5",
    })  # fmt: skip
    bridge = await make_bridge(settings(upstream.gateway))
    client = Client(CONNECT)
    await bridge(scope(), client.receive, client.send)
    assert client.sent == refusal(401, b"no", content_type=TEXT)


@pytest.mark.parametrize(
    ("content_type", "retry_after", "relayed"),
    [
        ("text/html; charset=UTF-8", "120", {"content_type": b"text/html; charset=UTF-8",
                                             "retry_after": b"120"}),
        ('application/problem+json; profile="x y"', "0",
         {"content_type": b'application/problem+json; profile="x y"', "retry_after": b"0"}),
        ("not a media type", "soon", {"content_type": None}),
        ("text/html, text/plain", "-1", {"content_type": None}),
        ("text/" + "x" * 300, "1" * 20, {"content_type": None}),
    ],
)  # fmt: skip
async def test_a_refusal_relays_the_upstream_type_and_retry_after_only_when_well_formed(
    upstream: Upstream, content_type: str, retry_after: str, relayed: dict[str, Any]
) -> None:
    upstream.answer = (503, "busy", {"content-type": content_type, "retry-after": retry_after})
    bridge = await make_bridge(settings(upstream.gateway))
    client = Client(CONNECT)
    await bridge(scope(), client.receive, client.send)
    assert client.sent == refusal(503, b"busy", **relayed)


@pytest.mark.parametrize(
    ("status", "relayed"),
    [
        (520, 502), (521, 502), (522, 502), (523, 502), (524, 502), (525, 502), (526, 502),
        (527, 502), (530, 502),  # Cloudflare's: the origin failed, so a bad gateway
        (499, 502),  # "client closed request": the proxy did not; not the client's fault
        (460, 400),  # an unknown 4xx still blames the request
        (299, 502),  # not a standard status at all (600 and up: not HTTP, 502 "InvalidMessage")
    ],
)  # fmt: skip
async def test_a_non_standard_upstream_status_is_relayed_as_a_standard_one(
    upstream: Upstream, status: int, relayed: int
) -> None:
    # uvicorn's legacy implementation turns the status into an http.HTTPStatus: a 520 there
    # was a ValueError, a traceback and a 500 "internal proxy error" (Client checks the same).
    upstream.answer = (status, "<html>origin error</html>", {"content-type": "text/html",
                                                             "retry-after": "5"})  # fmt: skip
    bridge = await make_bridge(settings(upstream.gateway))
    client = Client(CONNECT)
    await bridge(scope(), client.receive, client.send)
    body = json.dumps({
        "message": "the upstream refused the handshake",
        "detail": f"the upstream answered HTTP {status}, not a standard status",
    }).encode()  # fmt: skip
    assert client.sent == refusal(relayed, body, retry_after=b"5")
    line = logged(bridge).session()
    assert line["error"] == "upstream_refused"
    assert "internal_error" not in logged(bridge).events()


async def test_an_unreachable_upstream_is_a_json_502() -> None:
    with socket.socket() as held:  # bound, never listening: connections are refused
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        bridge = await make_bridge(settings(f"http://127.0.0.1:{port}/v1/a/g/fal"))
        client = Client(CONNECT)
        await bridge(scope(), client.receive, client.send)
    body = json.dumps(
        {"message": "the gateway could not be reached", "detail": "ConnectionRefusedError"}
    ).encode()
    assert client.sent == refusal(502, body)
    assert logged(bridge).session()["error"] == "upstream_unavailable"


async def test_an_upstream_handshake_past_the_connect_timeout_is_a_json_502(
    upstream: Upstream,
) -> None:
    upstream.hold = asyncio.Event()  # never set during the test
    bridge = await make_bridge(settings(upstream.gateway, FAL_PROXY_CONNECT_TIMEOUT="0.2"))
    client = Client(CONNECT)
    await asyncio.wait_for(bridge(scope(), client.receive, client.send), WAIT)
    body = json.dumps(
        {"message": "the gateway could not be reached", "detail": "TimeoutError"}
    ).encode()
    assert client.sent == refusal(502, body)


@pytest.mark.parametrize(
    ("answer", "closed"),
    [((403, "no", {}), 1008), ((502, "", {}), 1011)],
)
async def test_without_the_http_response_extension_a_refusal_is_a_close(
    upstream: Upstream, answer: tuple[int, str, dict[str, str]], closed: int
) -> None:
    upstream.answer = answer
    bridge = await make_bridge(settings(upstream.gateway))
    client = Client(CONNECT)
    await bridge(scope(http_response=False), client.receive, client.send)
    assert client.sent == [{"type": "websocket.close", "code": closed}]


async def test_an_admission_refusal_is_json_and_nothing_goes_upstream(upstream: Upstream) -> None:
    bridge = await make_bridge(settings(upstream.gateway))
    client = Client(CONNECT)
    evil = ((b"origin", b"https://evil.example"),)
    await bridge(scope(headers=evil), client.receive, client.send)
    assert [m["type"] for m in client.sent] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert client.sent[0]["status"] == 403
    assert client.sent[0]["headers"][0] == JSON_HEADERS
    assert set(json.loads(client.sent[1]["body"])) == {"message", "detail"}
    assert upstream.handshakes == []


async def test_a_bug_before_the_upstream_is_a_json_500_with_the_request_id(
    upstream: Upstream,
) -> None:
    bridge = await make_bridge(settings(upstream.gateway))

    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    bridge.admission.take_slot = broken  # type: ignore[method-assign]
    client = Client(CONNECT)
    await bridge(scope(), client.receive, client.send)
    line = logged(bridge).session()
    body = json.dumps(
        {"message": "internal proxy error", "detail": f"request id {line['request_id']}"}
    ).encode()
    assert client.sent == refusal(500, body)
    assert line["error"] == "internal"
    assert ("internal_error", {"request_id": line["request_id"]}) in logged(bridge).lines
    assert upstream.handshakes == []


# --- closes -------------------------------------------------------------------------------------


async def close_4003(ws: ServerConnection) -> None:
    await ws.close(4003, "nope")


async def close_without_status(ws: ServerConnection) -> None:
    await ws.close(None)  # type: ignore[arg-type]  # an empty close frame: 1005 received


async def drop(ws: ServerConnection) -> None:
    ws.transport.abort()  # no close frame: the connection is lost


@pytest.mark.parametrize(
    ("script", "received", "sent"),
    [
        (close_4003, 4003, close(4003, "nope")),
        (close_without_status, 1005, close(1000, "")),
        (drop, 1006, close(1011, "upstream connection lost")),
    ],
)
async def test_an_upstream_close_reaches_the_client_as_its_mapped_code(
    upstream: Upstream, script: Script, received: int, sent: dict[str, Any]
) -> None:
    upstream.script = script
    bridge = await make_bridge(settings(upstream.gateway))
    client = Client(CONNECT)
    await asyncio.wait_for(bridge(scope(), client.receive, client.send), WAIT)
    assert client.sent == [accept(), sent]
    line = logged(bridge).session()
    assert (line["upstream_close"], line["client_close"]) == (received, None)


@pytest.mark.parametrize(
    ("message", "seen"),
    [
        (disconnect(4001, "bye"), (4001, "bye")),
        (disconnect(1001), (1001, "")),
        (disconnect(1005), (1000, "")),  # no status code: sent as 1000
        (disconnect(1006), (1000, "")),  # connection lost
    ],
)
async def test_a_client_close_reaches_the_upstream(
    upstream: Upstream, message: dict[str, Any], seen: tuple[int, str]
) -> None:
    bridge = await make_bridge(settings(upstream.gateway))
    client = Client(CONNECT)
    task = asyncio.ensure_future(bridge(scope(), client.receive, client.send))
    await client.sent_count(1)
    client.queue.put_nowait(message)
    await asyncio.wait_for(task, WAIT)
    assert client.sent == [accept()]  # nothing more to a client that left
    assert await upstream.close_seen() == seen
    line = logged(bridge).session()
    assert (line["client_close"], line["upstream_close"]) == (message["code"], seen[0])


async def test_an_upstream_message_over_ws_max_bytes_closes_both_sides_with_1009(
    upstream: Upstream,
) -> None:
    async def flood(ws: ServerConnection) -> None:
        await ws.send(b"x" * 1024)  # at the limit: relayed
        await ws.send(b"x" * 1025)
        await ws.wait_closed()

    upstream.script = flood
    bridge = await make_bridge(settings(upstream.gateway, FAL_PROXY_WS_MAX_BYTES="1024"))
    client = Client(CONNECT)
    await asyncio.wait_for(bridge(scope(), client.receive, client.send), WAIT)
    too_big = "frame with 1025 bytes exceeds limit of 1024 bytes"
    assert await upstream.close_seen() == (1009, too_big)
    # The proxy closed the upstream itself: the client is told why, not "connection lost".
    assert client.sent == [
        accept(),
        {"type": "websocket.send", "bytes": b"x" * 1024},
        close(1009, too_big),
    ]
    assert logged(bridge).session()["upstream_close"] == 1009


async def test_an_idle_session_is_closed_both_ways_with_1001(upstream: Upstream) -> None:
    bridge = await make_bridge(settings(upstream.gateway, FAL_PROXY_IDLE_TIMEOUT="0.2"))
    client = Client(CONNECT)
    await asyncio.wait_for(bridge(scope(), client.receive, client.send), WAIT)
    assert client.sent == [accept(), close(1001, "idle timeout")]
    assert await upstream.close_seen() == (1001, "idle timeout")
    line = logged(bridge).session()
    assert (line["error"], line["client_close"], line["upstream_close"]) == (
        "idle_timeout", 1001, 1001)  # fmt: skip


# --- shutdown -----------------------------------------------------------------------------------


async def test_close_all_closes_both_sides_with_1001_and_the_client_once(
    upstream: Upstream,
) -> None:
    bridge = await make_bridge(settings(upstream.gateway))
    client = Client(CONNECT)  # a client that never answers the close
    task = asyncio.ensure_future(bridge(scope(), client.receive, client.send))
    await client.sent_count(1)
    await bridge.close_all()
    await asyncio.wait_for(task, WAIT)  # the upstream's close ends the session
    assert await upstream.close_seen() == (1001, "proxy shutting down")
    # One close: the upstream-to-client pump, ending with the upstream's close, knows the
    # client was closed already (uvicorn would reject a second with a RuntimeError).
    assert client.sent == [accept(), close(1001, "proxy shutting down")]
    assert client.rejected == []
    line = logged(bridge).session()
    assert (line["client_close"], line["upstream_close"]) == (None, 1001)
    assert "error" not in line
    assert not bridge.sessions and open_sockets(bridge) == 0


async def test_nothing_reaches_the_client_after_its_close(upstream: Upstream) -> None:
    # Frames the upstream sends once the client was closed (close_all's first step, before
    # the upstream's close completes) cannot reach it: dropped, not sent (uvicorn would
    # reject them, and the session would end as a failure); nor is the upstream's close.
    release = asyncio.Event()

    async def late(ws: ServerConnection) -> None:
        await release.wait()
        for _ in range(3):
            await ws.send("late")
        await ws.close(4000, "done")

    upstream.script = late
    bridge = await make_bridge(settings(upstream.gateway))
    client = Client(CONNECT)
    task = asyncio.ensure_future(bridge(scope(), client.receive, client.send))
    await client.sent_count(1)
    try:
        (session,) = bridge.sessions
        await session.close_client(1001, "proxy shutting down")
        release.set()
        await asyncio.wait_for(task, WAIT)
    finally:  # (both done already, unless the test failed)
        release.set()
        task.cancel()
    assert client.sent == [accept(), close(1001, "proxy shutting down")]
    assert client.rejected == []
    line = logged(bridge).session()
    assert (line["upstream_close"], line["frames_out"]) == (4000, 0)
    assert "error" not in line


async def test_a_server_cancel_mid_session_ends_it_quietly_with_1001_both_ways(
    upstream: Upstream,
) -> None:
    bridge = await make_bridge(settings(upstream.gateway, FAL_PROXY_MAX_CONCURRENT="1"))
    client = Client(CONNECT, {"type": "websocket.receive", "text": "hi"})
    task = asyncio.ensure_future(bridge(scope(), client.receive, client.send))
    await client.sent_count(2)  # accepted, and the echo is through
    task.cancel()  # what uvicorn does to a task still running past the drain deadline
    # Ended quietly, as the forwarder does: re-raised, uvicorn logs "Exception in ASGI
    # application" with a traceback for every session still open.
    assert await asyncio.wait_for(task, WAIT) is None
    assert client.sent == [
        accept(), {"type": "websocket.send", "text": "hi"}, close(1001, "proxy shutting down")
    ]  # fmt: skip
    assert await upstream.close_seen() == (1001, "proxy shutting down")
    line = logged(bridge).session()
    assert (line["frames_in"], line["frames_out"], line["client_close"]) == (1, 1, None)
    assert line["error"] == "shutdown"
    assert not bridge.sessions and open_sockets(bridge) == 0

    # The concurrency slot was released: a second session is admitted, not refused (429).
    second = Client(CONNECT)
    task = asyncio.ensure_future(bridge(scope(), second.receive, second.send))
    await second.sent_count(1)
    second.leave(1000)
    await asyncio.wait_for(task, WAIT)
    assert second.sent == [accept()]


async def test_a_server_cancel_during_the_upstream_handshake_is_a_503(upstream: Upstream) -> None:
    upstream.hold = asyncio.Event()  # never answered
    bridge = await make_bridge(settings(upstream.gateway))
    client = Client(CONNECT)
    task = asyncio.ensure_future(bridge(scope(), client.receive, client.send))
    await asyncio.wait_for(upstream.handshake_seen.wait(), WAIT)
    task.cancel()
    assert await asyncio.wait_for(task, WAIT) is None
    await asyncio.wait_for(upstream.connections[0].wait_closed(), WAIT)  # the handshake dropped
    body = json.dumps({"message": "proxy shutting down", "detail": "retry the request"}).encode()
    assert client.sent == refusal(503, body)
    assert logged(bridge).session()["error"] == "shutdown"


# --- failures -----------------------------------------------------------------------------------


async def test_an_accept_that_fails_still_closes_the_upstream(upstream: Upstream) -> None:
    bridge = await make_bridge(settings(upstream.gateway, FAL_PROXY_MAX_CONCURRENT="1"))
    client = Client(CONNECT, fail=("websocket.accept", OSError("client gone")))
    await asyncio.wait_for(bridge(scope(), client.receive, client.send), WAIT)
    assert (await upstream.close_seen())[0] == 1001  # not left open until the upstream gives up
    line = logged(bridge).session()
    assert line["error"] == "client_gone"
    assert "internal_error" not in logged(bridge).events()
    assert not bridge.sessions and open_sockets(bridge) == 0


async def send_hello(ws: ServerConnection) -> None:
    await ws.send("hello")
    await ws.wait_closed()


async def test_a_client_gone_on_a_send_ends_the_session_as_client_gone(upstream: Upstream) -> None:
    upstream.script = send_hello
    bridge = await make_bridge(settings(upstream.gateway))
    client = Client(CONNECT, fail=("websocket.send", OSError("client gone")))
    await asyncio.wait_for(bridge(scope(), client.receive, client.send), WAIT)
    assert await upstream.close_seen() == (1001, "client gone")
    assert client.sent == [accept(), {"type": "websocket.send", "text": "hello"}]
    line = logged(bridge).session()
    assert line["error"] == "client_gone"
    assert "internal_error" not in logged(bridge).events()
    assert not bridge.sessions and open_sockets(bridge) == 0


async def test_a_bug_in_a_pump_is_logged_and_closes_both_sides_with_1011(
    upstream: Upstream,
) -> None:
    upstream.script = send_hello
    bridge = await make_bridge(settings(upstream.gateway))
    client = Client(CONNECT, fail=("websocket.send", ValueError("a bug")))
    await asyncio.wait_for(bridge(scope(), client.receive, client.send), WAIT)
    assert await upstream.close_seen() == (1011, "internal proxy error")
    assert client.sent == [
        accept(), {"type": "websocket.send", "text": "hello"}, close(1011, "internal proxy error")
    ]  # fmt: skip
    line = logged(bridge).session()
    assert line["error"] == "internal"
    assert ("internal_error", {"request_id": line["request_id"]}) in logged(bridge).lines
    assert not bridge.sessions and open_sockets(bridge) == 0
