"""The Python client's port in process: the forwarder with its listener, against an aiohttp
upstream that answers queue calls the way a hostile or broken gateway might. What the client
gets is checked byte for byte: rewritten URLs, lengths, encodings, and clean JSON refusals."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from proxy.policy.python_port import MAX_REWRITTEN_BYTES, PythonSdkListener
from tests.unit.forward.test_handler import Client, forwarder, scope, serving, settings

pytestmark = pytest.mark.anyio
ORIGIN = "https://127.0.0.1:8443"
QUEUE = "https://queue.fal.run"
SUBMIT = "/queue.fal.run/fal-ai/x"
STATUS = "/queue.fal.run/fal-ai/x/requests/r1/status"
RESULT = "/queue.fal.run/fal-ai/x/requests/r1"
URLS = {
    "status_url": f"{QUEUE}/fal-ai/x/requests/r1/status",
    "response_url": f"{QUEUE}/fal-ai/x/requests/r1",
    "cancel_url": f"{QUEUE}/fal-ai/x/requests/r1/cancel",
}
HERE = {key: value.replace(QUEUE, f"{ORIGIN}/queue.fal.run") for key, value in URLS.items()}
ANSWER = json.dumps({"request_id": "r1", "status": "IN_QUEUE", **URLS}).encode()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


Answer = tuple[int, dict[str, str], bytes]


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """An upstream answering ``state["answer"]`` (or a behaviour); records what it got."""
    state: dict[str, Any] = {"answer": (200, {}, ANSWER), "got": []}
    done = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        state["got"].append((request.headers.get("x-fal-target-url"), dict(request.headers)))
        behaviour = state.get("behaviour")
        status, headers, body = state["answer"]
        response = web.StreamResponse(status=status, headers=headers)
        if behaviour is None:
            response.content_length = len(body)
        await response.prepare(request)
        if behaviour == "stall":
            await response.write(body[:10])
            await done.wait()  # the proxy's idle timeout cuts it first
        if behaviour == "die":
            await response.write(body[:10])
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(body)
        return response

    async with serving(handle) as url:
        yield url, state
        done.set()


async def call(
    gateway: str, method: str, path: str, *, idle: str = "5", headers: Any = ()
) -> Client:
    config = settings(gateway, FAL_PROXY_IDLE_TIMEOUT=idle)
    forward = await forwarder(config, PythonSdkListener(ORIGIN))
    client = Client({"type": "http.request", "body": b"{}", "more_body": False})
    try:
        await forward(scope(method, path, headers), client.receive, client.send)
    finally:
        await forward.session.close()  # type: ignore[union-attr]
    return client


def response_headers(client: Client) -> dict[bytes, bytes]:
    return dict(client.sent[0]["headers"])


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        (None, ANSWER),
        ("gzip", gzip.compress(ANSWER)),
        ("deflate", zlib.compress(ANSWER)),
    ],
)
async def test_a_submit_answer_is_decoded_rewritten_and_sent_with_its_new_length(
    gateway, encoding: str | None, body: bytes
) -> None:
    url, state = gateway
    state["answer"] = (200, {"content-encoding": encoding} if encoding else {}, body)
    client = await call(url, "POST", SUBMIT, headers=[(b"accept-encoding", b"br, zstd")])
    assert client.status() == 200
    out = client.body()
    assert json.loads(out) == {"request_id": "r1", "status": "IN_QUEUE", **HERE}
    headers = response_headers(client)
    assert headers[b"content-length"] == str(len(out)).encode()
    assert b"content-encoding" not in headers
    target, sent = state["got"][0]
    assert target == f"{QUEUE}/fal-ai/x"
    assert sent["Accept-Encoding"] == "gzip, deflate"  # what the proxy can read, not br


async def test_a_status_answer_is_rewritten_too(gateway) -> None:
    url, state = gateway
    client = await call(url, "GET", STATUS)
    assert json.loads(client.body())["status_url"] == HERE["status_url"]
    assert state["got"][0][0] == f"{QUEUE}/fal-ai/x/requests/r1/status"


async def test_a_result_is_the_apps_output_and_passes_untouched(gateway) -> None:
    url, state = gateway
    body = gzip.compress(ANSWER)
    state["answer"] = (200, {"content-encoding": "gzip"}, body)
    client = await call(url, "GET", RESULT, headers=[(b"accept-encoding", b"br, gzip")])
    assert client.body() == body  # still compressed, as sent: streamed, not rewritten
    assert response_headers(client)[b"content-encoding"] == b"gzip"
    assert state["got"][0][1]["Accept-Encoding"] == "br, gzip"  # the client's own


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        ((200, {"content-encoding": "br"}, b"\x0b\x02\x80"), "cannot rewrite"),
        ((200, {"content-encoding": "gzip"}, b"nope"), "does not decode"),
        ((200, {"content-encoding": "gzip"}, gzip.compress(b"0" * (MAX_REWRITTEN_BYTES + 1))),
         "too large"),
        ((200, {}, b" " * (MAX_REWRITTEN_BYTES + 1)), "too large"),
    ],
)  # fmt: skip
async def test_an_answer_that_cannot_be_rewritten_is_a_clean_502(
    gateway, answer: Answer, words: str
) -> None:
    url, state = gateway
    state["answer"] = answer
    client = await call(url, "POST", SUBMIT)
    assert client.status() == 502
    body = json.loads(client.body())
    assert words in body["message"] and "detail" in body
    assert response_headers(client)[b"content-length"] == str(len(client.body())).encode()


@pytest.mark.parametrize(
    "answer",
    [
        (200, {"content-type": "text/plain"}, b"not json at all"),
        (200, {}, b"[1, 2, 3]"),
        (422, {}, json.dumps({"detail": [{"msg": "bad"}], **URLS}).encode()),  # an error: as is
        (200, {}, b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"),  # unreadable to any client
    ],
)
async def test_an_answer_with_nothing_to_rewrite_is_passed_as_it_came(
    gateway, answer: Answer
) -> None:
    url, state = gateway
    state["answer"] = answer
    client = await call(url, "POST", SUBMIT)
    assert client.status() == answer[0] and client.body() == answer[2]


@pytest.mark.parametrize(
    "foreign",
    [
        "https://evil.example/x",
        "http://queue.fal.run/fal-ai/x/requests/r1/status",
        "https://queue.fal.run.evil.example/fal-ai/x/requests/r1/status",
    ],
)
async def test_a_url_outside_fal_is_never_handed_to_the_client(gateway, foreign: str) -> None:
    """fal-client follows these URLs with the caller's credential: refused, not passed on."""
    url, state = gateway
    answer = {"request_id": "r1", **URLS, "cancel_url": foreign}
    state["answer"] = (200, {}, json.dumps(answer).encode())
    client = await call(url, "POST", SUBMIT)
    assert client.status() == 502 and foreign.encode() not in client.body()


async def test_a_lone_surrogate_in_a_status_log_is_kept_not_a_500(gateway) -> None:
    """An app's log line can carry an escaped lone surrogate: valid JSON, passed as it came."""
    url, state = gateway
    body = (
        '{"status":"IN_PROGRESS","request_id":"r1","logs":[{"message":"bad \\ud800 byte"}],'
        f'"status_url":"{URLS["status_url"]}"}}'
    ).encode()
    state["answer"] = (200, {"content-type": "application/json"}, body)
    client = await call(url, "GET", STATUS + "?logs=true")
    assert client.status() == 200
    assert client.body() == body.replace(URLS["status_url"].encode(), HERE["status_url"].encode())


async def test_bodiless_and_empty_answers_keep_their_status(gateway) -> None:
    url, state = gateway
    state["answer"] = (204, {}, b"")
    client = await call(url, "POST", SUBMIT)
    assert client.status() == 204 and b"content-length" not in response_headers(client)
    # An edge error with no body but a gzip label: its status and Retry-After, not a 502.
    state["answer"] = (503, {"content-encoding": "gzip", "retry-after": "7"}, b"")
    client = await call(url, "GET", STATUS)
    assert client.status() == 503 and response_headers(client)[b"retry-after"] == b"7"


async def test_validators_of_the_old_bytes_are_dropped(gateway) -> None:
    url, state = gateway
    state["answer"] = (200, {"etag": '"abc"', "content-md5": "x", "x-fal-request-id": "f1"}, ANSWER)
    headers = response_headers(await call(url, "POST", SUBMIT))
    assert b"etag" not in headers and b"content-md5" not in headers
    assert headers[b"x-fal-request-id"] == b"f1"


async def test_an_upstream_that_stalls_mid_answer_is_a_504(gateway) -> None:
    url, state = gateway
    state["behaviour"] = "stall"
    client = await call(url, "POST", SUBMIT, idle="0.3")
    assert client.status() == 504 and json.loads(client.body())["message"]


async def test_an_upstream_that_dies_mid_answer_is_a_502(gateway) -> None:
    url, state = gateway
    state["behaviour"] = "die"
    client = await call(url, "POST", SUBMIT)
    assert client.status() == 502 and json.loads(client.body())["message"]


async def test_a_gateway_401_is_recognised_under_gzip(gateway) -> None:
    url, state = gateway
    refusal = json.dumps({"success": False, "errors": [{"code": 2009, "message": "Unauthorized"}]})
    state["answer"] = (401, {"content-encoding": "gzip"}, gzip.compress(refusal.encode()))
    client = await call(url, "POST", SUBMIT)
    assert client.status() == 401 and json.loads(client.body())["errors"][0]["code"] == 2009
