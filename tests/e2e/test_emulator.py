"""The offline emulator itself (``proxy/emulator``), spoken to directly: no proxy in between.

Each test drives a real ``python -m proxy emulator`` process over loopback HTTP (httpx) or
WebSocket (``websockets``) and checks one behaviour of the emulated Cloudflare AI Gateway
in front of fal. Waits are gates or polls with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import msgpack
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from proxy.emulator.faults import pattern_block
from proxy.emulator.queue import owner_alias
from tests.conftest import FAL_KEY, PREFIX, FakeGateway, start_fake_gateway

KEY = {"authorization": f"Key {FAL_KEY}"}
SMALL = {"width": 48, "height": 32}  # pure-Python PNG drawing: keep images small and tests fast
DEADLINE = 10.0  # seconds any poll may take before the test fails

# --- helpers ----------------------------------------------------------------------------------


def run(gw: FakeGateway, app: str, method: str = "POST", **kwargs: Any) -> httpx.Response:
    """Path mode: ``<gateway>/fal/<app>`` is ``https://fal.run/<app>``."""
    headers = {**KEY, **kwargs.pop("headers", {})}
    return gw.client.request(method, f"{PREFIX}/{app}", headers=headers, **kwargs)


def call(gw: FakeGateway, method: str, target: str, **kwargs: Any) -> httpx.Response:
    """Target mode: the bare ``<gateway>/fal`` URL with ``x-fal-target-url``."""
    headers = {**KEY, "x-fal-target-url": target, **kwargs.pop("headers", {})}
    return gw.client.request(method, PREFIX, headers=headers, **kwargs)


def fetch(url: str) -> httpx.Response:
    """GET an absolute URL the emulator handed out, as a browser would: no credentials."""
    return httpx.get(url, trust_env=False)


def png_size(data: bytes) -> tuple[int, int]:
    """Check ``data`` is a well-formed 8-bit RGB PNG (signature, chunk CRCs, pixel data
    length) and return its IHDR ``(width, height)``."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks[kind] = body
        pos += 12 + length
    assert list(chunks) == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2)
    assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + 3 * width)
    return width, height


def sse_events(response: httpx.Response) -> Iterator[tuple[str | None, Any]]:
    """``(event name, parsed data)`` for each SSE event, as it arrives."""
    name, data = None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].strip())
        elif not line and data:
            yield name, json.loads("\n".join(data))
            name, data = None, []


def wait_until(check: Any, what: str) -> Any:
    """Poll ``check()`` until it returns something truthy; fail after ``DEADLINE``."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


def submit(gw: FakeGateway, app: str = "fal-ai/flux/dev", data: Any = None) -> dict[str, Any]:
    r = call(
        gw,
        "POST",
        f"https://queue.fal.run/{app}",
        json=data or {"prompt": "cat", "image_size": SMALL},
    )
    assert r.status_code == 200, r.text
    return r.json()


def hold(gw: FakeGateway) -> None:
    """Queue jobs submitted from now on wait for :func:`release` (the fixture's clear ends it)."""
    assert gw.client.post("/_emulator/queue/hold").json() == {"holding": True}


def release(gw: FakeGateway) -> dict[str, str]:
    """Move every held job on by one stop: ``{request id: its status now}``."""
    answer = gw.client.post("/_emulator/queue/release")
    assert answer.status_code == 200, answer.text
    released: dict[str, str] = answer.json()["released"]
    return released


def queue_states(gw: FakeGateway, status_url: str) -> list[str]:
    """Poll a queue status URL until COMPLETED; the distinct states seen, in order."""
    seen: list[str] = []

    def completed() -> bool:
        state = call(gw, "GET", status_url).json()["status"]
        if not seen or seen[-1] != state:
            seen.append(state)
        return state == "COMPLETED"

    wait_until(completed, f"{status_url} to complete")
    return seen


def token_for(gw: FakeGateway, *apps: str) -> str:
    r = call(
        gw,
        "POST",
        "https://rest.fal.ai/tokens/",
        json={"allowed_apps": list(apps), "token_expiration": 120},
    )
    assert r.status_code == 201, r.text
    return r.json()


def ws_url(gw: FakeGateway, app: str = "fal-ai/fast-lcm-diffusion", query: str = "") -> str:
    return f"ws://127.0.0.1:{gw.port}{PREFIX}/{app}/realtime{query}"


def ws_connect(url: str, headers: dict[str, str] | None = None) -> ClientConnection:
    return connect(url, additional_headers=headers, proxy=None, open_timeout=5)


def assert_ws_refused(url: str, headers: dict[str, str] | None = None) -> None:
    """The handshake is refused (403), or the socket is closed with 4001 before any answer."""
    try:
        with ws_connect(url, headers) as ws:
            ws.send(msgpack.packb({"prompt": "cat", "image_size": SMALL}))
            ws.recv(timeout=5)
    except InvalidStatus as exc:
        assert exc.response.status_code == 403
    except ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code == 4001
    else:
        pytest.fail("the realtime socket answered without valid credentials")


@pytest.fixture(scope="module")
def cf_gateway() -> Iterator[FakeGateway]:
    """An authenticated gateway: ``cf-aig-authorization: Bearer cf-right`` required."""
    gateway = start_fake_gateway("--cf-token", "cf-right")
    yield gateway
    gateway.stop()


# --- gateway: URL modes, authentication, headers ------------------------------------------------


def test_path_mode_runs_the_app_on_fal_run(fake_gateway: FakeGateway) -> None:
    """``/v1/<any account>/<any gateway>/fal/<app>`` is ``https://fal.run/<app>``."""
    r = fake_gateway.client.post(
        "/v1/other-acct/other-gw/fal/emulator/echo", json={"a": 1}, headers=KEY
    )
    assert (r.status_code, r.json()) == (200, {"input": {"a": 1}})
    assert fake_gateway.only_request()["target_url"] is None


@pytest.mark.parametrize(
    ("target", "check"),
    [
        pytest.param(
            "https://fal.run/emulator/echo", lambda body: body == {"input": {"a": 1}}, id="fal.run"
        ),
        pytest.param(
            "https://queue.fal.run/emulator/echo",
            lambda body: body["status"] == "IN_QUEUE",
            id="queue.fal.run",
        ),
        pytest.param(
            "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3",
            lambda body: {"upload_url", "file_url"} <= set(body),
            id="rest.fal.ai",
        ),
    ],
)
def test_target_mode_reaches_each_fal_host(
    fake_gateway: FakeGateway, target: str, check: Any
) -> None:
    """The bare ``/fal`` URL plus ``x-fal-target-url`` reaches fal.run, queue.fal.run,
    rest.fal.ai."""
    r = call(fake_gateway, "POST", target, json={"a": 1})
    assert r.status_code == 200 and check(r.json()), r.text
    assert fake_gateway.only_request()["target_url"] == target


def test_target_mode_with_a_path_after_fal_is_400(fake_gateway: FakeGateway) -> None:
    r = fake_gateway.client.post(
        f"{PREFIX}/emulator/echo",
        json={},
        headers={**KEY, "x-fal-target-url": "https://fal.run/emulator/echo"},
    )
    assert r.status_code == 400 and "bare /fal" in r.json()["detail"]


@pytest.mark.parametrize(
    "target",
    [
        "https://example.com/emulator/echo",
        "http://fal.run/emulator/echo",
        "https://fal.run.evil.example/emulator/echo",
        "https://queue.fal.run:8443/emulator/echo",
        "wss://fal.run/emulator/echo",
        "not a url",
    ],
)
def test_a_non_fal_target_is_400(fake_gateway: FakeGateway, target: str) -> None:
    r = call(fake_gateway, "POST", target, json={})
    assert r.status_code == 400 and "fal URL" in r.json()["detail"]


@pytest.mark.parametrize("authorization", [None, "Key wrong", f"Bearer {FAL_KEY}", "Key", FAL_KEY])
def test_a_missing_or_wrong_fal_key_is_a_fal_style_401(
    fake_gateway: FakeGateway, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    r = fake_gateway.client.post(f"{PREFIX}/emulator/echo", json={}, headers=headers)
    assert r.status_code == 401
    assert isinstance(r.json()["detail"], str)


@pytest.mark.parametrize("cf_header", [None, "Bearer cf-wrong", "cf-right", "Bearer  cf-right"])
def test_authenticated_gateway_refuses_a_missing_or_wrong_cf_token_with_2009(
    cf_gateway: FakeGateway, cf_header: str | None
) -> None:
    """Cloudflare's own 401, before fal is asked: the fal key being right does not help."""
    headers = {} if cf_header is None else {"cf-aig-authorization": cf_header}
    r = run(cf_gateway, "emulator/echo", json={}, headers=headers)
    assert r.status_code == 401
    body = r.json()
    assert body["success"] is False and body["error"][0]["code"] == 2009
    assert r.headers["cf-aig-log-id"] and r.headers["cf-aig-cache-status"] == "MISS"
    assert "x-fal-request-id" not in r.headers  # fal was never reached


def test_the_gateways_own_400_has_gateway_headers_but_no_fal_request_id(
    fake_gateway: FakeGateway,
) -> None:
    r = call(fake_gateway, "POST", "https://example.com/")
    assert r.status_code == 400
    assert r.headers["cf-aig-log-id"] and "x-fal-request-id" not in r.headers


def test_authenticated_gateway_passes_the_right_cf_token(cf_gateway: FakeGateway) -> None:
    right = {"cf-aig-authorization": "Bearer cf-right"}
    r = run(cf_gateway, "emulator/echo", json={"a": 1}, headers=right)
    assert (r.status_code, r.json()) == (200, {"input": {"a": 1}})
    # past the gateway, the fal key is still checked, and answered fal's way
    r = cf_gateway.client.post(
        f"{PREFIX}/emulator/echo", json={}, headers={**right, "authorization": "Key x"}
    )
    assert r.status_code == 401 and isinstance(r.json()["detail"], str)


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(lambda gw: run(gw, "emulator/echo", json={}), id="sync-200"),
        pytest.param(lambda gw: run(gw, "fal-ai/flux/dev", json={}), id="validation-422"),
        pytest.param(lambda gw: run(gw, "fal-ai/nope", json={}), id="unknown-app-404"),
        pytest.param(
            lambda gw: call(gw, "POST", "https://queue.fal.run/emulator/echo", json={}),
            id="queue-submit",
        ),
        pytest.param(
            lambda gw: call(
                gw, "POST", "https://rest.fal.ai/tokens/", json={"allowed_apps": ["x"]}
            ),
            id="token-201",
        ),
        pytest.param(lambda gw: run(gw, "emulator/status/503"), id="fault-503"),
        pytest.param(
            lambda gw: run(gw, "emulator/echo", headers={"authorization": "Key wrong"}),
            id="fal-key-401",
        ),
    ],
)
def test_every_answer_from_fal_carries_request_and_log_ids(
    fake_gateway: FakeGateway, request_: Any
) -> None:
    r = request_(fake_gateway)
    assert r.headers["x-fal-request-id"]
    assert r.headers["cf-aig-log-id"]
    assert r.headers["cf-aig-cache-status"] == "MISS"


# --- fal.run: sync runs ------------------------------------------------------------------------


@pytest.mark.parametrize("app", ["fal-ai/fast-sdxl", "fal-ai/flux/dev", "fal-ai/flux/schnell"])
def test_text_to_image_returns_real_pngs_served_by_the_emulator(
    fake_gateway: FakeGateway, app: str
) -> None:
    r = run(fake_gateway, app, json={"prompt": "a red fox", "image_size": SMALL, "num_images": 2})
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert len(images) == 2
    for image in images:
        file = fetch(image["url"])
        assert (
            file.status_code == 200
            and file.headers["content-type"] == image["content_type"] == "image/png"
        )
        assert png_size(file.content) == (image["width"], image["height"]) == (48, 32)


def test_a_named_image_size_sets_the_png_dimensions(fake_gateway: FakeGateway) -> None:
    image = run(
        fake_gateway, "fal-ai/flux/schnell", json={"prompt": "cat", "image_size": "landscape_16_9"}
    ).json()["images"][0]
    assert png_size(fetch(image["url"]).content) == (image["width"], image["height"]) == (512, 288)


def test_images_follow_prompt_and_seed(fake_gateway: FakeGateway) -> None:
    """Same prompt and seed: the same bytes; another prompt or seed: other bytes."""

    def image(prompt: str, seed: int) -> bytes:
        body = run(
            fake_gateway,
            "fal-ai/fast-sdxl",
            json={"prompt": prompt, "seed": seed, "image_size": SMALL},
        )
        return fetch(body.json()["images"][0]["url"]).content

    first = image("cat", 5)
    assert image("cat", 5) == first
    assert image("dog", 5) != first
    assert image("cat", 6) != first


def test_echo_app_returns_its_input(fake_gateway: FakeGateway) -> None:
    for data in ({"any": ["thing", 1, None]}, [1, 2], "text"):
        r = run(fake_gateway, "emulator/echo", json=data)
        assert (r.status_code, r.json()) == (200, {"input": data})


def test_get_run_takes_its_input_from_the_query(fake_gateway: FakeGateway) -> None:
    """``fal.run(id, {method: "get"})`` sends ``GET …/<app>?prompt=cat&num_images=2``."""
    r = run(
        fake_gateway,
        "fal-ai/flux/schnell",
        "GET",
        params={"prompt": "cat", "num_images": "2", "image_size": json.dumps(SMALL)},
    )
    assert r.status_code == 200, r.text
    assert r.json()["prompt"] == "cat" and len(r.json()["images"]) == 2


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        pytest.param(b"{}", ["body", "prompt"], id="missing-prompt"),
        pytest.param(b'{"prompt": "  "}', ["body", "prompt"], id="empty-prompt"),
        pytest.param(
            b'{"prompt": "cat", "image_size": "huge"}', ["body", "image_size"], id="bad-image-size"
        ),
        pytest.param(
            b'{"prompt": "cat", "image_size": {"width": 4, "height": 4}}',
            ["body", "image_size"],
            id="tiny-image-size",
        ),
        pytest.param(
            b'{"prompt": "cat", "num_images": 9}', ["body", "num_images"], id="too-many-images"
        ),
        pytest.param(b'{"prompt": "cat",', ["body"], id="bad-json"),
        pytest.param(b'["cat"]', ["body"], id="not-an-object"),
    ],
)
def test_invalid_input_is_422_in_fals_shape(
    fake_gateway: FakeGateway, body: bytes, loc: list[str]
) -> None:
    r = run(
        fake_gateway, "fal-ai/flux/dev", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["loc"] == loc and error["msg"] and error["type"]


@pytest.mark.parametrize("app", ["fal-ai/does-not-exist", "someone/else", "emulator/no-such-fault"])
def test_an_unknown_app_is_404(fake_gateway: FakeGateway, app: str) -> None:
    r = run(fake_gateway, app, json={"prompt": "cat"})
    assert r.status_code == 404 and "not found" in r.json()["detail"]


# --- fal.run: /stream -----------------------------------------------------------------------------


def test_app_stream_sends_progress_events_over_time_then_the_result(
    fake_gateway: FakeGateway,
) -> None:
    """The first progress event arrives well before the result: the stream is not buffered."""
    arrivals: list[tuple[float, Any]] = []
    # the default 512x512 image takes the emulator a few hundred ms to draw after the last step
    with fake_gateway.client.stream(
        "POST",
        f"{PREFIX}/fal-ai/flux/schnell/stream",
        json={"prompt": "cat"},
        headers={**KEY, "accept": "text/event-stream"},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for _, data in sse_events(r):
            arrivals.append((time.monotonic(), data))
    first, last = arrivals[0][1], arrivals[-1][1]
    assert (first["status"], first["step"], first["steps"]) == ("IN_PROGRESS", 1, 7)
    assert [data.get("step") for _, data in arrivals[:-1]] == list(range(1, 8))
    assert "images" not in first and png_size(fetch(last["images"][0]["url"]).content) == (512, 512)
    # 6 steps of ~14 ms plus the drawing separate the first and last event on the server side
    assert arrivals[-1][0] - arrivals[0][0] > 0.05


def test_app_stream_validates_before_streaming(fake_gateway: FakeGateway) -> None:
    r = run(fake_gateway, "fal-ai/flux/schnell/stream", json={"prompt": ""})
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"


# --- queue.fal.run -----------------------------------------------------------------------------


def test_queue_submit_returns_the_request_urls(fake_gateway: FakeGateway) -> None:
    r = call(fake_gateway, "POST", "https://queue.fal.run/fal-ai/flux/dev", json={"prompt": "cat"})
    body = r.json()
    rid = body["request_id"]
    base = (
        f"https://queue.fal.run/fal-ai/flux/requests/{rid}"  # owner/alias: the sub-path is dropped
    )
    assert r.headers["x-fal-request-id"] == rid and body["status"] == "IN_QUEUE"
    assert (body["status_url"], body["response_url"], body["cancel_url"]) == (
        f"{base}/status",
        base,
        f"{base}/cancel",
    )


ORDER = ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]


def test_queue_status_moves_from_in_queue_to_in_progress_to_completed(
    fake_gateway: FakeGateway,
) -> None:
    """On the clock: a poller may miss a state (the hold below shows each one), never reorder."""
    job = submit(fake_gateway)
    states = queue_states(fake_gateway, job["status_url"])
    assert states == sorted(states, key=ORDER.index) and states[-1] == "COMPLETED"


def test_a_held_job_moves_on_only_when_released(fake_gateway: FakeGateway) -> None:
    early = submit(fake_gateway)  # before the hold: on the clock
    hold(fake_gateway)
    job = submit(fake_gateway)
    status, result = job["status_url"] + "?logs=1", job["response_url"]
    # The early job has run its whole course meanwhile; the held one has not moved.
    assert queue_states(fake_gateway, early["status_url"])[-1] == "COMPLETED"
    for _ in range(3):
        body = call(fake_gateway, "GET", status).json()
        assert (body["status"], body["logs"], body["queue_position"]) == ("IN_QUEUE", [], 0)
    assert call(fake_gateway, "GET", result).status_code == 400
    # First stop passed: running, before its first log line, until the next release.
    assert release(fake_gateway) == {job["request_id"]: "IN_PROGRESS"}
    for _ in range(3):
        body = call(fake_gateway, "GET", status).json()
        assert (body["status"], body["logs"]) == ("IN_PROGRESS", [])
    assert call(fake_gateway, "GET", result).status_code == 400
    # Second: on the clock from there, its log lines coming as it runs.
    assert release(fake_gateway) == {job["request_id"]: "IN_PROGRESS"}
    assert queue_states(fake_gateway, job["status_url"])[-1] == "COMPLETED"
    assert len(call(fake_gateway, "GET", status).json()["logs"]) == 7
    assert call(fake_gateway, "GET", result).status_code == 200
    assert release(fake_gateway) == {}  # nothing held any more
    # Not holding new jobs: on the clock again.
    assert fake_gateway.client.delete("/_emulator/queue/hold").json() == {"holding": False}
    late = submit(fake_gateway)
    assert queue_states(fake_gateway, late["status_url"])[-1] == "COMPLETED"
    assert release(fake_gateway) == {}


def test_a_held_jobs_status_stream_sends_each_state_as_it_is_released(
    fake_gateway: FakeGateway,
) -> None:
    early = submit(fake_gateway)  # before the hold: on the clock
    hold(fake_gateway)
    job = submit(fake_gateway)
    headers = {**KEY, "x-fal-target-url": job["status_url"] + "/stream?logs=1"}
    with fake_gateway.client.stream("GET", PREFIX, headers=headers) as r:
        events = sse_events(r)
        _, first = next(events)
        assert (first["status"], first["logs"]) == ("IN_QUEUE", [])
        # The early job's whole course later, the held one is where it was.
        assert queue_states(fake_gateway, early["status_url"])[-1] == "COMPLETED"
        assert call(fake_gateway, "GET", job["status_url"]).json()["status"] == "IN_QUEUE"
        release(fake_gateway)
        _, second = next(events)
        assert (second["status"], second["logs"]) == ("IN_PROGRESS", [])
        release(fake_gateway)
        rest = [data for _, data in events]
    assert rest[-1]["status"] == "COMPLETED"
    assert len([line for data in rest for line in data["logs"]]) == 7


def test_clearing_the_recorder_ends_the_hold_and_lets_held_jobs_go(
    fake_gateway: FakeGateway,
) -> None:
    hold(fake_gateway)
    held = submit(fake_gateway)
    fake_gateway.clear()
    assert queue_states(fake_gateway, held["status_url"])[-1] == "COMPLETED"
    fresh = submit(fake_gateway)
    assert queue_states(fake_gateway, fresh["status_url"])[-1] == "COMPLETED"
    assert release(fake_gateway) == {}


def test_queue_status_has_logs_only_when_asked_else_null(fake_gateway: FakeGateway) -> None:
    job = submit(fake_gateway)
    queue_states(fake_gateway, job["status_url"])
    with_logs = call(fake_gateway, "GET", job["status_url"] + "?logs=1").json()
    assert [line["message"] for line in with_logs["logs"]][-1] == "Decoding image"
    for line in with_logs["logs"]:  # dated by the wall clock, in UTC
        stamp = calendar.timegm(time.strptime(line["timestamp"], "%Y-%m-%dT%H:%M:%S"))
        assert line["level"] == "INFO" and abs(stamp - time.time()) < 60
    for query in ("", "?logs=0"):  # present and null, as fal answers (fal-client reads it)
        assert call(fake_gateway, "GET", job["status_url"] + query).json()["logs"] is None


def test_queue_status_stream_is_sse_ending_with_completed(fake_gateway: FakeGateway) -> None:
    job = submit(fake_gateway)
    headers = {
        **KEY,
        "x-fal-target-url": job["status_url"] + "/stream?logs=1",
        "accept": "application/json, text/event-stream",
    }
    with fake_gateway.client.stream("GET", PREFIX, headers=headers) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        statuses = [data for _, data in sse_events(r)]
    order = ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    states = [s["status"] for s in statuses]
    assert states == sorted(states, key=order.index) and states[-1] == "COMPLETED"
    # Each event carries only the lines that are new since the previous one (the SDK adds
    # them up), so together they are every line, once.
    lines = [line["message"] for status in statuses for line in status["logs"]]
    assert len(lines) == 7 and len(set(lines)) == 7


def test_queue_result_returns_the_images_once_completed(fake_gateway: FakeGateway) -> None:
    job = submit(fake_gateway)
    queue_states(fake_gateway, job["status_url"])
    r = call(fake_gateway, "GET", job["response_url"])
    assert r.status_code == 200 and r.headers["x-fal-request-id"] == job["request_id"]
    [image] = r.json()["images"]
    assert png_size(fetch(image["url"]).content) == (48, 32)
    assert call(fake_gateway, "GET", job["response_url"]).json() == r.json()  # produced once


def test_queue_result_before_completion_is_400(fake_gateway: FakeGateway) -> None:
    hold(fake_gateway)
    job = submit(fake_gateway)
    r = call(fake_gateway, "GET", job["response_url"])
    assert r.status_code == 400 and "in progress" in r.json()["detail"]


def test_queue_cancel_then_cancel_again_after_completion(fake_gateway: FakeGateway) -> None:
    hold(fake_gateway)  # still in the queue when the cancel comes
    job = submit(fake_gateway)
    r = call(fake_gateway, "PUT", job["cancel_url"])
    assert (r.status_code, r.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    assert call(fake_gateway, "GET", job["status_url"]).json()["status"] == "COMPLETED"
    assert call(fake_gateway, "GET", job["response_url"]).status_code == 400
    r = call(fake_gateway, "PUT", job["cancel_url"])
    assert (r.status_code, r.json()) == (400, {"status": "ALREADY_COMPLETED"})


def test_queue_cancel_after_normal_completion_is_400(fake_gateway: FakeGateway) -> None:
    job = submit(fake_gateway, "emulator/echo", {"x": 1})
    queue_states(fake_gateway, job["status_url"])
    r = call(fake_gateway, "PUT", job["cancel_url"])
    assert (r.status_code, r.json()) == (400, {"status": "ALREADY_COMPLETED"})


def test_queue_unknown_request_or_app_is_404(fake_gateway: FakeGateway) -> None:
    job = submit(fake_gateway)
    unknown = "https://queue.fal.run/fal-ai/flux/requests/00000000-0000-4000-8000-000000000000"
    assert call(fake_gateway, "GET", unknown + "/status").status_code == 404
    assert call(fake_gateway, "GET", unknown).status_code == 404
    wrong_app = job["status_url"].replace("/fal-ai/flux/", "/fal-ai/other/")
    assert call(fake_gateway, "GET", wrong_app).status_code == 404
    assert (
        call(fake_gateway, "POST", "https://queue.fal.run/fal-ai/nope/x", json={}).status_code
        == 404
    )


@pytest.mark.parametrize(
    ("app_id", "expected"),
    [
        ("fal-ai/flux/dev", "fal-ai/flux"),
        ("fal-ai/fast-sdxl", "fal-ai/fast-sdxl"),
        ("workflows/fal-ai/sdxl-sticker", "workflows/fal-ai/sdxl-sticker"),
        ("comfy/owner/app/extra", "comfy/owner/app"),
    ],
)
def test_queue_owner_alias_keeps_a_workflows_namespace(app_id: str, expected: str) -> None:
    """The rule itself, for namespaces the catalogue has no app for (``comfy/``)."""
    assert owner_alias(app_id) == expected


def test_a_workflow_app_runs_through_the_queue_with_its_namespace(
    fake_gateway: FakeGateway,
) -> None:
    job = submit(fake_gateway, "workflows/fal-ai/sdxl-sticker")
    assert job["status_url"].startswith(
        "https://queue.fal.run/workflows/fal-ai/sdxl-sticker/requests/"
    )


# --- rest.fal.ai: storage and tokens ------------------------------------------------------------


def test_single_upload_serves_the_bytes_once_put(fake_gateway: FakeGateway) -> None:
    r = call(
        fake_gateway,
        "POST",
        "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3",
        json={"content_type": "text/plain", "file_name": "note.txt"},
    )
    urls = r.json()
    origin = f"http://127.0.0.1:{fake_gateway.port}/_emulator/"
    assert urls["upload_url"].startswith(origin + "uploads/") and urls["file_url"].startswith(
        origin + "files/"
    )
    assert fetch(urls["file_url"]).status_code == 404  # nothing uploaded yet
    put = httpx.put(
        urls["upload_url"],
        content=b"hello, fal",
        headers={"content-type": "text/plain"},
        trust_env=False,
    )
    assert put.status_code == 200
    file = fetch(urls["file_url"])
    assert (file.content, file.headers["content-type"]) == (b"hello, fal", "text/plain")
    assert httpx.put(urls["upload_url"], content=b"again", trust_env=False).status_code == 404
    uploads = fake_gateway.requests("upload")
    assert [(u["method"], u["body"]) for u in uploads] == [
        ("PUT", b"hello, fal"),
        ("PUT", b"again"),
    ]
    assert "authorization" not in uploads[0]["header_map"]


@pytest.mark.parametrize(
    "initiate_body",
    [
        pytest.param({"file_name": "my photo.png", "content_type": "image/png"}, id="space"),
        pytest.param({"file_name": "café #1?.txt"}, id="non-ascii-hash-question-mark"),
        pytest.param([1], id="not-an-object"),
    ],
)
def test_upload_file_url_works_for_any_file_name(
    fake_gateway: FakeGateway, initiate_body: Any
) -> None:
    """The SDK sends the user's own file name; the file URL must still reach the bytes."""
    urls = call(
        fake_gateway,
        "POST",
        "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3",
        json=initiate_body,
    ).json()
    assert httpx.put(urls["upload_url"], content=b"bytes", trust_env=False).status_code == 200
    assert fetch(urls["file_url"]).content == b"bytes"


def test_multipart_upload_serves_the_parts_joined(fake_gateway: FakeGateway) -> None:
    """Parts go to ``{origin}{pathname}/{n}{search}``, then ``{pathname}/complete{search}``."""
    urls = call(
        fake_gateway,
        "POST",
        "https://rest.fal.ai/storage/upload/initiate-multipart?storage_type=fal-cdn-v3",
        json={"content_type": "application/octet-stream", "file_name": "big.bin"},
    ).json()
    upload = httpx.URL(urls["upload_url"])
    assert upload.query  # the signature the SDK must keep after the part number

    def at(suffix: str) -> httpx.URL:
        return upload.copy_with(path=f"{upload.path}/{suffix}")

    blobs = [b"A" * 70_000, b"B" * 10]
    parts = []
    for number, blob in enumerate(blobs, 1):
        answer = httpx.put(at(str(number)), content=blob, trust_env=False)
        assert (
            answer.status_code == 200
            and answer.json()["partNumber"] == number
            and answer.json()["etag"]
        )
        parts.append(answer.json())
    assert fetch(urls["file_url"]).status_code == 404  # not until completed
    done = httpx.post(at("complete"), json={"parts": parts}, trust_env=False)
    assert done.status_code == 200
    assert fetch(urls["file_url"]).content == b"".join(blobs)
    assert [u["path"].rsplit("/", 1)[-1] for u in fake_gateway.requests("upload")] == [
        "1",
        "2",
        "complete",
    ]
    assert all(u["query"] == upload.query.decode() for u in fake_gateway.requests("upload"))


def test_tokens_endpoint_returns_a_json_string_token(fake_gateway: FakeGateway) -> None:
    r = call(
        fake_gateway,
        "POST",
        "https://rest.fal.ai/tokens/",
        json={"allowed_apps": ["fast-lcm-diffusion"], "token_expiration": 120},
    )
    assert r.status_code == 201
    assert isinstance(r.json(), str) and r.json()
    for invalid in ({}, {"allowed_apps": ["x"], "token_expiration": "soon"}):
        assert (
            call(fake_gateway, "POST", "https://rest.fal.ai/tokens/", json=invalid).status_code
            == 422
        )


# --- realtime WebSocket ---------------------------------------------------------------------------


def test_realtime_msgpack_frame_gets_a_msgpack_result(fake_gateway: FakeGateway) -> None:
    url = ws_url(
        fake_gateway, query=f"?fal_jwt_token={token_for(fake_gateway, 'fast-lcm-diffusion')}"
    )
    with ws_connect(url) as ws:
        ws.send(msgpack.packb({"prompt": "cat", "image_size": SMALL}))
        reply = msgpack.unpackb(ws.recv(timeout=5))
    assert png_size(fetch(reply["images"][0]["url"]).content) == (48, 32)
    [record] = fake_gateway.requests("websocket")
    assert record["path"] == f"{PREFIX}/fal-ai/fast-lcm-diffusion/realtime"


def test_realtime_json_text_frame_gets_a_json_reply(fake_gateway: FakeGateway) -> None:
    with ws_connect(ws_url(fake_gateway), KEY) as ws:
        ws.send(json.dumps({"prompt": "cat", "image_size": SMALL}))
        reply = ws.recv(timeout=5)
    assert isinstance(reply, str) and json.loads(reply)["prompt"] == "cat"


def test_realtime_invalid_input_gets_an_error_message_not_a_close(
    fake_gateway: FakeGateway,
) -> None:
    with ws_connect(ws_url(fake_gateway), KEY) as ws:
        ws.send(msgpack.packb({"prompt": ""}))
        invalid = msgpack.unpackb(ws.recv(timeout=5))
        ws.send(b"\xc1")  # not msgpack
        undecodable = msgpack.unpackb(ws.recv(timeout=5))
        ws.send(msgpack.packb({"prompt": "still open", "image_size": SMALL}))
        assert "images" in msgpack.unpackb(ws.recv(timeout=5))
    assert (invalid["type"], invalid["error"]) == ("x-fal-error", "INVALID_INPUT")
    assert json.loads(invalid["reason"])[0]["loc"] == ["body", "prompt"]
    assert (undecodable["type"], undecodable["error"]) == ("x-fal-error", "INVALID_MESSAGE")


def test_realtime_key_header_authenticates(fake_gateway: FakeGateway) -> None:
    with ws_connect(ws_url(fake_gateway), {"Authorization": f"Key {FAL_KEY}"}) as ws:
        ws.send(msgpack.packb({"prompt": "cat", "image_size": SMALL}))
        assert "images" in msgpack.unpackb(ws.recv(timeout=5))


@pytest.mark.parametrize(
    "case", ["no-credentials", "bad-token", "wrong-key", "token-for-another-app"]
)
def test_realtime_refuses_without_valid_credentials(fake_gateway: FakeGateway, case: str) -> None:
    query, headers = "", None
    if case == "bad-token":
        query = "?fal_jwt_token=emu.forged"
    elif case == "wrong-key":
        headers = {"Authorization": "Key wrong"}
    elif case == "token-for-another-app":
        query = f"?fal_jwt_token={token_for(fake_gateway, 'fast-sdxl')}"
    assert_ws_refused(ws_url(fake_gateway, query=query), headers)


# --- fal's own names (what a TLS front mapping fal.run to the emulator hands over) -------------


def as_fal_run(gw: FakeGateway, path: str, **headers: str) -> httpx.Response:
    """A request on the emulator's port addressed to ``fal.run`` itself (``Host: fal.run``)."""
    return gw.client.post(
        path, headers={"host": "fal.run", **headers}, json={"prompt": "cat", "image_size": SMALL}
    )


def test_a_request_addressed_to_fal_run_is_fal_runs_own(fake_gateway: FakeGateway) -> None:
    answer = as_fal_run(fake_gateway, "/fal-ai/flux/schnell", **KEY)
    assert answer.status_code == 200, answer.text
    (image,) = answer.json()["images"]
    # Its file URL is on fal's name, over TLS; the emulator's own paths stay its own there.
    assert image["url"].startswith("https://fal.run/_emulator/files/"), image
    file = fake_gateway.client.get(
        image["url"].removeprefix("https://fal.run"), headers={"host": "fal.run"}
    )
    assert png_size(file.content) == (48, 32)
    (record,) = fake_gateway.requests("direct")  # fal itself: no gateway in front
    assert (record["path"], record["target_url"]) == (
        "/fal-ai/flux/schnell",
        "https://fal.run/fal-ai/flux/schnell",
    )
    assert as_fal_run(fake_gateway, "/fal-ai/flux/schnell").status_code == 401  # fal's key
    # Any other name (or fal's name on another port) is the emulator's own routing.
    for host in ("127.0.0.1", "fal.run:8080", "fal.run.example"):
        other = fake_gateway.client.post(
            "/fal-ai/flux/schnell", headers={"host": host, **KEY}, json={"prompt": "cat"}
        )
        assert other.status_code == 404, (host, other.text)


def test_a_socket_addressed_to_fal_run_takes_a_token_and_no_gateway(
    fake_gateway: FakeGateway,
) -> None:
    """As the JS SDK opens it: ``wss://fal.run/<app>/realtime?fal_jwt_token=…``."""

    def to_fal_run(query: str) -> ClientConnection:
        sock = socket.create_connection(("127.0.0.1", fake_gateway.port), timeout=5)
        url = f"ws://fal.run/fal-ai/fast-lcm-diffusion/realtime{query}"
        return connect(url, sock=sock, proxy=None, open_timeout=5)

    token = token_for(fake_gateway, "fast-lcm-diffusion")
    with to_fal_run(f"?fal_jwt_token={token}") as ws:
        ws.send(msgpack.packb({"prompt": "cat", "image_size": SMALL}))
        reply = msgpack.unpackb(ws.recv(timeout=5))
    assert reply["images"][0]["url"].startswith("https://fal.run/_emulator/files/"), reply
    (record,) = fake_gateway.requests("direct-websocket")
    assert (record["path"], record["query"]) == (
        "/fal-ai/fast-lcm-diffusion/realtime",
        f"fal_jwt_token={token}",
    )
    assert ["host", "fal.run"] in record["headers"]
    for query in ("", "?fal_jwt_token=emu.forged"):  # refused at the handshake
        with pytest.raises(InvalidStatus) as refused:
            to_fal_run(query).close()
        assert refused.value.response.status_code == 403, query


# --- recorder and control paths ------------------------------------------------------------------


def test_recorder_lists_what_was_received_and_delete_clears_it(fake_gateway: FakeGateway) -> None:
    body = b'{"prompt":  "cat"}'
    target = "https://queue.fal.run/emulator/echo?fal_webhook=x"
    call(fake_gateway, "POST", target, content=body, headers={"x-custom": "v"})
    run(fake_gateway, "emulator/echo", "GET", params={"a": "1"})
    queued, got = fake_gateway.client.get("/_emulator/requests").json()
    assert (queued["kind"], queued["method"], queued["path"], queued["query"]) == (
        "gateway",
        "POST",
        PREFIX,
        "",
    )
    assert ["x-custom", "v"] in queued["headers"] and ["authorization", f"Key {FAL_KEY}"] in queued[
        "headers"
    ]
    assert (queued["body_len"], queued["body_sha256"]) == (
        len(body),
        hashlib.sha256(body).hexdigest(),
    )
    assert queued["target_url"] == target
    assert (got["method"], got["path"], got["query"], got["body_len"]) == (
        "GET",
        f"{PREFIX}/emulator/echo",
        "a=1",
        0,
    )
    assert fake_gateway.client.delete("/_emulator/requests").json() == {"cleared": True}
    assert fake_gateway.client.get("/_emulator/requests").json() == []


def test_health_and_root_describe_the_emulator(fake_gateway: FakeGateway) -> None:
    assert fake_gateway.client.get("/_emulator/health").json() == {"status": "ok"}
    root = fake_gateway.client.get("/").json()
    assert "emulator" in root and root["gateway_url"].startswith(
        f"http://127.0.0.1:{fake_gateway.port}/v1/"
    )
    assert {"fal-ai/fast-sdxl", "fal-ai/flux/dev", "fal-ai/flux/schnell", "emulator/echo"} <= set(
        root["apps"]
    )
    assert fake_gateway.client.get("/_emulator/nope").status_code == 404
    assert fake_gateway.client.get("/not-the-gateway").json()["error"][0]["code"] == 7003


# --- determinism --------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_ids() -> None:
    """Two emulators with one ``--seed`` answer the same first request with the same ids."""
    emulators = [start_fake_gateway("--seed", seed) for seed in ("42", "42", "43")]
    try:
        answers = [run(gw, "emulator/echo", json={"a": 1}).headers for gw in emulators]
        tokens = [token_for(gw, "fast-lcm-diffusion") for gw in emulators]
    finally:
        for gw in emulators:
            gw.stop()
    same, also_same, other = ((h["x-fal-request-id"], h["cf-aig-log-id"]) for h in answers)
    assert same == also_same and other[0] != same[0]
    assert tokens[0] == tokens[1] != tokens[2]


# --- fault apps (emulator/…) --------------------------------------------------------------------

SINK_BODY = bytes(range(256)) * 40


@pytest.mark.parametrize(
    ("fault", "request_kwargs", "status", "headers", "expected"),
    [
        pytest.param("status/500", {}, 500, {}, {"detail": "boom"}, id="status-500"),
        pytest.param(
            "status/422",
            {},
            422,
            {},
            {
                "detail": [
                    {
                        "loc": ["body", "prompt"],
                        "msg": "field required",
                        "type": "value_error.missing",
                    }
                ]
            },
            id="status-422",
        ),
        pytest.param(
            "status/504",
            {},
            504,
            {"x-fal-request-timeout-type": "user"},
            {"detail": "boom"},
            id="status-504",
        ),
        pytest.param(
            "text404", {}, 404, {"content-type": "text/plain"}, b"no such app", id="text404"
        ),
        pytest.param(
            "gzip",
            {},
            200,
            {"content-encoding": "gzip"},
            {"compressed": True, "pad": "x" * 2000},
            id="gzip",
        ),
        pytest.param(
            "bytes?size=300000",
            {},
            200,
            {"content-length": "300000"},
            (pattern_block() * 2)[:300_000],
            id="bytes",
        ),
        pytest.param(
            "sink",
            {"content": SINK_BODY},
            200,
            {},
            {"len": len(SINK_BODY), "sha256": hashlib.sha256(SINK_BODY).hexdigest()},
            id="sink",
        ),
        pytest.param(
            "cookie",
            {"headers": {"cookie": "a=1"}},
            200,
            {"set-cookie": "session=secret-from-upstream; Path=/"},
            {"cookie_seen": "a=1"},
            id="cookie",
        ),
        pytest.param(
            "hop",
            {},
            200,
            {"x-custom-hop": "1", "keep-alive": "timeout=5", "x-end-to-end": "kept"},
            {"ok": True},
            id="hop",
        ),
        pytest.param(
            "notmodified",
            {},
            304,
            {"etag": '"v1"', "content-length": "1234"},
            b"",
            id="notmodified",
        ),
    ],
)
def test_fault_app_answers_as_documented(
    fake_gateway: FakeGateway,
    fault: str,
    request_kwargs: dict[str, Any],
    status: int,
    headers: dict[str, str],
    expected: Any,
) -> None:
    # A client of its own: emulator/cookie sets a cookie, and uvicorn ends the connection after
    # emulator/notmodified (its 304 announces a body it never sends).
    with httpx.Client(base_url=fake_gateway.client.base_url, trust_env=False) as client:
        r = client.post(
            f"{PREFIX}/emulator/{fault}",
            content=request_kwargs.get("content"),
            headers={**KEY, **request_kwargs.get("headers", {})},
        )
    assert r.status_code == status
    assert {name: r.headers.get(name) for name in headers} == headers
    assert (r.content if isinstance(expected, bytes) else r.json()) == expected


def test_fault_flaky_fails_then_succeeds(fake_gateway: FakeGateway) -> None:
    answers = [run(fake_gateway, "emulator/flaky", params={"fail": "2"}) for _ in range(3)]
    assert [r.status_code for r in answers] == [503, 503, 200]
    assert answers[-1].json() == {"attempt": 3}


def test_fault_sse_sends_each_event_only_when_its_gate_opens(fake_gateway: FakeGateway) -> None:
    """Reading event k before releasing gate ``sse-k+1`` proves each event is sent on its own."""
    with fake_gateway.client.stream("POST", f"{PREFIX}/emulator/sse?n=3", headers=KEY) as r:
        events = sse_events(r)
        assert next(events) == (None, {"n": 1})
        fake_gateway.release("sse-2")
        assert next(events) == (None, {"n": 2})
        fake_gateway.release("sse-3")
        assert next(events) == ("done", {"n": 3})
        assert next(events, None) is None


def test_fault_hang_answers_when_released_and_notes_a_client_that_left(
    fake_gateway: FakeGateway,
) -> None:
    def hang_recorded() -> bool:
        return any(r["path"].endswith("/emulator/hang") for r in fake_gateway.requests())

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(run, fake_gateway, "emulator/hang")
        wait_until(hang_recorded, "the hang request to arrive")
        fake_gateway.release("hang")
        assert pending.result(timeout=DEADLINE).json() == {"released": True}
    fake_gateway.clear()  # closes the gate again
    with pytest.raises(httpx.ReadTimeout):
        run(fake_gateway, "emulator/hang", timeout=httpx.Timeout(5, read=0.3))
    event = wait_until(
        lambda: [e for e in fake_gateway.events() if e.startswith("disconnected:hang:")],
        "the disconnect event",
    )
    assert len(event) == 1


def test_fault_stall_sends_one_event_then_waits_for_its_gate(fake_gateway: FakeGateway) -> None:
    with fake_gateway.client.stream("POST", f"{PREFIX}/emulator/stall", headers=KEY) as r:
        events = sse_events(r)
        assert next(events) == (None, {"n": 1})
        fake_gateway.release("stall")
        assert next(events, None) is None


def test_fault_die_drops_the_connection_mid_body(fake_gateway: FakeGateway) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        run(fake_gateway, "emulator/die")


def test_fault_noread_never_reads_the_body(fake_gateway: FakeGateway) -> None:
    """A big upload stalls on full buffers, since the emulator never takes the bytes."""
    chunks = (b"x" * (1 << 20) for _ in range(256))
    try:
        with pytest.raises(httpx.WriteTimeout):
            run(
                fake_gateway, "emulator/noread", content=chunks, timeout=httpx.Timeout(5, write=0.5)
            )
    finally:
        fake_gateway.release("noread")


def test_authenticated_gateway_wants_its_token_on_websockets_too(cf_gateway: FakeGateway) -> None:
    url = ws_url(cf_gateway)
    key = {"authorization": f"Key {FAL_KEY}"}
    assert_ws_refused(url, key)
    with ws_connect(url, {**key, "cf-aig-authorization": "Bearer cf-right"}) as ws:
        ws.send(json.dumps({"prompt": "cat", "image_size": {"width": 16, "height": 16}}))
        assert "images" in json.loads(ws.recv(timeout=10))
