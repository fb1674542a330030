"""The unmodified fal JS SDK (``@fal-ai/client`` 1.10.1, pinned in tests/sdk) through the proxy.

Each test runs ``node tests/sdk/scenarios.mjs <proxy> <scenario>``: a real SDK client
configured the way an app outside a browser configures it
(``proxyUrl: {url: <proxy>/api/fal/proxy, when: "always"}``, no credentials), then
checks both sides: what the SDK returned (data, requestId, error classes) and what the
gateway recorded (auth, path mode vs target mode, headers, bodies).

Upstream is the product's own offline emulator (the ``fake_gateway`` fixture, see
tests/conftest.py and proxy/emulator): ``emulator/*`` apps for echo and faults, and a
real queue (``fal-ai/flux/dev``) whose jobs progress on the emulator's scaled clock. A
scenario that must see a queue state holds the emulator's queue and releases each state once
the SDK has reported it (``/_emulator/queue/hold`` and ``/release``): no window to hit.

Traffic that the SDK sends past the proxy by design is checked from both ends too: the
signed-URL upload PUTs (and multipart parts) reach the emulator directly
(``fake_gateway.requests("upload")``), the realtime WebSocket is opened on a stub that
records its ``wss://fal.run`` URL, and a *string* ``proxyUrl`` in Node is ignored by the
SDK (a canned fetch stands in for fal, and nothing reaches the proxy).

The SDK is installed with ``npm ci --prefix tests/sdk``; without it these tests fail
(never skip), so a CI that forgot the step cannot go green by accident.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.sync.client import connect as ws_connect

from proxy.emulator.apps import CATALOGUE
from proxy.emulator.faults import MP3_FRAME_BYTES, audio_chunk
from proxy.emulator.queue import QUEUE_WAIT
from tests.conftest import (
    FAL_KEY,
    PREFIX,
    ROOT,
    TIME_SCALE,
    FakeGateway,
    RunningProxy,
    child_env,
)

SDK_DIR = ROOT / "tests" / "sdk"
SCRIPT = SDK_DIR / "scenarios.mjs"
SDK_VERSION = "1.10.1"
UA = f"@fal-ai/client/{SDK_VERSION}"
SERVER_AUTH = f"Key {FAL_KEY}"
NODE_TIMEOUT = 60
INSTALL_HINT = "run `npm ci --prefix tests/sdk` (needs node >= 20 and npm)"
# The emulator's request ids are uuid4s, like fal's.
REQUEST_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
QUEUE_APP = "fal-ai/flux/dev"
QUEUE = "https://queue.fal.run"
# The SDK drops the "/dev" sub-path for status/result/cancel: <QUEUE>/fal-ai/flux/requests/<id>.
QUEUE_REQUESTS = f"{QUEUE}/fal-ai/flux/requests"
# Submit to COMPLETED on the emulator's clock (queue wait + generation), plus slack for timers.
QUEUE_JOB_MS = round((QUEUE_WAIT + CATALOGUE[QUEUE_APP].duration) * float(TIME_SCALE) * 1000) + 50
JOB_LOGS = CATALOGUE[QUEUE_APP].log_lines({})
WORKFLOW = "workflows/fal-ai/sdxl-sticker"  # the SDK keeps the namespace in every queue URL
INITIATE = "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3"
INITIATE_MULTIPART = "https://rest.fal.ai/storage/upload/initiate-multipart?storage_type=fal-cdn-v3"
MiB = 1024 * 1024
MULTIPART_ABOVE = 90 * MiB  # storage.js: `file.size > 90 * 1024 * 1024` goes multipart...
PART_BYTES = 10 * MiB  # ...in parts of 10 MiB
TOKENS = "https://rest.fal.ai/tokens/"
REALTIME_APP = "fal-ai/fast-lcm-diffusion/image-to-image"
EMULATOR_TOKEN = r"emu\.[0-9a-f]{48}"  # what the emulator's /tokens/ issues


def require_sdk(sdk_dir: Path = SDK_DIR) -> str:
    """Return the node binary, or fail the test saying how to install the SDK."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            f"node is not on PATH; install Node.js >= 20, then {INSTALL_HINT}", pytrace=False
        )
    manifest = sdk_dir / "node_modules" / "@fal-ai" / "client" / "package.json"
    if not manifest.is_file():
        pytest.fail(
            f"{sdk_dir / 'node_modules'} is missing the fal JS SDK: {INSTALL_HINT}", pytrace=False
        )
    version = json.loads(manifest.read_text(encoding="utf-8")).get("version")
    if version != SDK_VERSION:
        pytest.fail(
            f"tests/sdk has @fal-ai/client {version}, the tests are written for {SDK_VERSION}: "
            f"{INSTALL_HINT}",
            pytrace=False,
        )
    return node


def emulator_origin(fake_gateway: FakeGateway) -> str:
    return f"http://127.0.0.1:{fake_gateway.port}"


def run_sdk(proxy: RunningProxy, fake_gateway: FakeGateway, scenario: str) -> dict[str, Any]:
    """Run one scenario of scenarios.mjs against ``proxy``; return its outcome."""
    node = require_sdk()
    # child_env keeps only PATH/HOME/LANG/...: no FAL_KEY can reach the SDK process.
    env = child_env(
        EMULATOR_URL=emulator_origin(fake_gateway),
        QUEUE_JOB_MS=str(QUEUE_JOB_MS),
        AUDIO_CHUNK_BYTES=str(MP3_FRAME_BYTES),
    )
    assert not {"FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET"} & env.keys()
    completed = subprocess.run(
        [node, str(SCRIPT), proxy.url, scenario],
        cwd=SDK_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, f"node exited {completed.returncode}:\n{completed.stderr}"
    try:
        report = json.loads(completed.stdout)
    except ValueError:
        raise AssertionError(
            f"no JSON on stdout:\n{completed.stdout}\n{completed.stderr}"
        ) from None
    outcome = report[scenario]
    assert outcome["ok"], json.dumps(outcome["error"], indent=2)
    return outcome


# --- what the SDK sent to the proxy --------------------------------------------------------


def assert_sent_via_proxy(
    outcome: dict[str, Any], proxy: RunningProxy, *targets: tuple[str, str]
) -> None:
    """The SDK sent exactly ``targets`` ((method, x-fal-target-url) pairs) to the proxy route."""
    sent = outcome["sent"]
    assert [(s["method"], s["headers"].get("x-fal-target-url")) for s in sent] == list(targets)
    for request in sent:
        assert request["url"] == f"{proxy.url}/api/fal/proxy"
        assert request["headers"]["user-agent"] == UA


def assert_sent_without_credentials(outcome: dict[str, Any]) -> None:
    for request in outcome["sent"]:
        assert "authorization" not in request["headers"]


def assert_sent_direct(
    sent: dict[str, Any], record: dict[str, Any], fake_gateway: FakeGateway
) -> None:
    """A request the SDK sent straight to a signed upload URL (``record``), not to the proxy."""
    assert sent["method"] == record["method"]
    assert sent["url"] == f"{emulator_origin(fake_gateway)}{record['path']}?{record['query']}"
    assert "x-fal-target-url" not in sent["headers"]
    assert "authorization" not in sent["headers"]
    # And it did not pass through the proxy on the way: none of the headers the proxy adds.
    names = {name for name, _ in record["headers"]}
    assert not names & {
        "authorization",
        "x-fal-target-url",
        "x-fal-client-proxy",
        "cf-aig-event-id",
    }, names
    assert record["path"].startswith("/_emulator/uploads/")
    assert record["query"] == "signature=emulated"  # the signed URL's query, kept by the SDK


# --- what the gateway (the emulator) received -------------------------------------------


def assert_upstream_common(record: dict[str, Any]) -> None:
    """Headers every SDK call must carry upstream, whatever the mode."""
    headers = record["header_map"]
    assert [v for k, v in record["headers"] if k == "authorization"] == [SERVER_AUTH]
    assert headers["user-agent"] == UA
    assert headers["content-type"] == "application/json"
    assert headers["x-fal-client-proxy"].startswith("fal-gateway-proxy/")
    for name in headers:
        assert not name.startswith("sec-"), name
        assert name not in ("cookie", "origin", "host-override"), name


def assert_path_mode(record: dict[str, Any], method: str, fal_path: str, query: str = "") -> None:
    """A fal.run target: sent to <gateway><path>?<query>, no x-fal-target-url."""
    assert_upstream_common(record)
    assert record["method"] == method
    assert record["path"] == PREFIX + fal_path
    assert record["query"] == query
    assert record["target_url"] is None
    assert "x-fal-target-url" not in record["header_map"]


def assert_target_mode(record: dict[str, Any], method: str, target_url: str) -> None:
    """A queue.fal.run target: sent to the bare gateway URL with x-fal-target-url, never cached
    or retried."""
    assert_upstream_common(record)
    assert record["method"] == method
    assert record["path"] == PREFIX
    assert record["query"] == ""
    assert [v for k, v in record["headers"] if k == "x-fal-target-url"] == [target_url]
    assert record["header_map"]["cf-aig-skip-cache"] == "true"
    assert record["header_map"]["cf-aig-max-attempts"] == "1"


def assert_queue_sequence(
    outcome: dict[str, Any],
    proxy: RunningProxy,
    fake_gateway: FakeGateway,
    expected: list[tuple[str, str]],
) -> list[dict[str, Any]]:
    """The SDK sent exactly ``expected`` (method, target) through the proxy, and the gateway
    received the same calls in target mode, in order. Returns the gateway's records."""
    assert_sent_via_proxy(outcome, proxy, *expected)
    records = fake_gateway.requests()
    assert len(records) == len(expected)
    for record, (method, target) in zip(records, expected, strict=True):
        assert_target_mode(record, method, target)
    return records


def assert_initiated(
    record: dict[str, Any], target: str, content_type: str, extension: str
) -> None:
    """An upload initiation: through the gateway in target mode, with what the SDK names the
    file."""
    assert_target_mode(record, "POST", target)
    body = json.loads(record["body"])
    assert body["content_type"] == content_type
    assert re.fullmatch(rf"\d{{13}}\.{extension}", body["file_name"]), body  # <epoch ms>.<type>


def assert_serves(fake_gateway: FakeGateway, file_url: str, data: bytes) -> None:
    """``file_url`` is on the emulator and serves ``data``."""
    assert file_url.startswith(f"{emulator_origin(fake_gateway)}/_emulator/files/")
    served = fake_gateway.client.get(file_url)
    assert served.status_code == 200 and served.content == data


def assert_generated_image(result: dict[str, Any], fake_gateway: FakeGateway) -> None:
    """A text-to-image result for prompt "cat" whose image the emulator really serves."""
    (image,) = result["images"]
    origin = f"http://127.0.0.1:{fake_gateway.port}"
    assert image["url"].startswith(f"{origin}/_emulator/files/") and image["url"].endswith(".png")
    assert (image["width"], image["height"], image["content_type"]) == (512, 512, "image/png")
    assert result["prompt"] == "cat"
    assert isinstance(result["seed"], int)
    png = fake_gateway.client.get(image["url"].removeprefix(origin))
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG\r\n\x1a\n")


def statuses(updates: list[str]) -> list[str]:
    """Consecutive repeats collapsed: the states a job went through, in order."""
    return [s for i, s in enumerate(updates) if i == 0 or updates[i - 1] != s]


# --- the guard itself ----------------------------------------------------------------------


def test_missing_sdk_install_fails_with_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match=re.escape("npm ci --prefix tests/sdk")):
        require_sdk(tmp_path)


# --- fal.run ---------------------------------------------------------------------------------


def test_run_post(proxy: RunningProxy, fake_gateway: FakeGateway) -> None:
    outcome = run_sdk(proxy, fake_gateway, "run_post")

    assert outcome["data"] == {"input": {"prompt": "cat"}}
    assert REQUEST_ID.fullmatch(outcome["requestId"])
    assert_sent_via_proxy(outcome, proxy, ("POST", "https://fal.run/emulator/echo"))
    assert_sent_without_credentials(outcome)

    seen = fake_gateway.only_request()
    assert_path_mode(seen, "POST", "/emulator/echo")
    assert seen["body"] == b'{"prompt":"cat"}'
    assert seen["header_map"]["accept"] == "application/json"
    assert (
        seen["header_map"]["cf-aig-max-attempts"] == "1"
    )  # a POST is never retried by the gateway


def test_run_get_puts_the_input_in_the_query(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    outcome = run_sdk(proxy, fake_gateway, "run_get")

    # The emulated app read its input back from the query (n as a number, as fal does).
    assert outcome["data"] == {"input": {"prompt": "cat", "n": 2}}
    assert REQUEST_ID.fullmatch(outcome["requestId"])
    assert_sent_via_proxy(outcome, proxy, ("GET", "https://fal.run/emulator/echo?prompt=cat&n=2"))

    seen = fake_gateway.only_request()
    assert_path_mode(seen, "GET", "/emulator/echo", "prompt=cat&n=2")
    assert seen["body"] == b""


def test_run_with_query(proxy: RunningProxy, fake_gateway: FakeGateway) -> None:
    outcome = run_sdk(proxy, fake_gateway, "run_query")

    assert outcome["data"] == {"input": {"prompt": "cat"}}  # a POST's input is its body
    assert REQUEST_ID.fullmatch(outcome["requestId"])
    assert_sent_via_proxy(outcome, proxy, ("POST", "https://fal.run/emulator/echo?q=1"))

    seen = fake_gateway.only_request()
    assert_path_mode(seen, "POST", "/emulator/echo", "q=1")
    assert seen["body"] == b'{"prompt":"cat"}'


def test_run_with_path_and_query(proxy: RunningProxy, fake_gateway: FakeGateway) -> None:
    outcome = run_sdk(proxy, fake_gateway, "run_path")

    # The app itself answers that it has no such endpoint: the sub-path reached it intact.
    error = outcome["thrown"]
    assert outcome["result"] is None
    assert error["constructor"] == "ApiError"
    assert error["status"] == 404
    assert error["body"] == {"detail": "emulator/echo has no path '/custom'"}
    assert REQUEST_ID.fullmatch(error["requestId"])
    assert_sent_via_proxy(outcome, proxy, ("POST", "https://fal.run/emulator/echo/custom?q=1"))

    seen = fake_gateway.only_request()
    assert_path_mode(seen, "POST", "/emulator/echo/custom", "q=1")
    assert seen["body"] == b'{"prompt":"cat"}'


def test_gzip_response_is_decoded_by_the_sdk(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    outcome = run_sdk(proxy, fake_gateway, "gzip")

    assert outcome["data"] == {"compressed": True, "pad": "x" * 2000}
    assert REQUEST_ID.fullmatch(outcome["requestId"])
    assert_path_mode(fake_gateway.only_request(), "POST", "/emulator/gzip")


# --- queue -----------------------------------------------------------------------------------


def test_queue_submit_with_all_options(proxy: RunningProxy, fake_gateway: FakeGateway) -> None:
    outcome = run_sdk(proxy, fake_gateway, "queue_submit")

    target = f"{QUEUE}/{QUEUE_APP}?fal_webhook=https%3A%2F%2Fexample.com%2Fhook%3Fa%3Db"
    submitted = outcome["submitted"]
    request_id = submitted["request_id"]
    assert REQUEST_ID.fullmatch(request_id)
    assert submitted["status"] == "IN_QUEUE"
    assert submitted["status_url"] == f"{QUEUE_REQUESTS}/{request_id}/status"
    assert submitted["response_url"] == f"{QUEUE_REQUESTS}/{request_id}"
    assert submitted["cancel_url"] == f"{QUEUE_REQUESTS}/{request_id}/cancel"
    assert_sent_via_proxy(outcome, proxy, ("POST", target))

    seen = fake_gateway.only_request()
    assert_target_mode(seen, "POST", target)  # the webhook query kept byte for byte
    assert seen["body"] == b'{"prompt":"cat"}'
    headers = seen["header_map"]
    assert headers["x-fal-queue-priority"] == "low"
    assert headers["x-fal-runner-hint"] == "h1"
    assert headers["x-fal-request-timeout"] == "30"
    assert headers["x-custom"] == "v"


def test_queue_status_result_cancel(proxy: RunningProxy, fake_gateway: FakeGateway) -> None:
    outcome = run_sdk(proxy, fake_gateway, "queue_status_result_cancel")

    request_id, fresh_id = outcome["submitted"]["request_id"], outcome["fresh"]["request_id"]
    assert REQUEST_ID.fullmatch(request_id) and REQUEST_ID.fullmatch(fresh_id)
    assert request_id != fresh_id
    base, fresh = f"{QUEUE_REQUESTS}/{request_id}", f"{QUEUE_REQUESTS}/{fresh_id}"
    status = outcome["status"]
    assert (status["status"], status["request_id"]) == ("COMPLETED", request_id)
    assert [log["message"] for log in status["logs"]] == JOB_LOGS  # logs=1: every line, once
    now = datetime.now(UTC)
    for log in status["logs"]:  # UTC wall-clock times of this run
        stamp = datetime.strptime(log["timestamp"], "%Y-%m-%dT%H:%M:%S")
        assert abs(now - stamp.replace(tzinfo=UTC)) < timedelta(minutes=5), log
    assert outcome["result"]["requestId"] == request_id
    assert_generated_image(outcome["result"]["data"], fake_gateway)
    assert outcome["cancelled"] == "undefined"  # 202 CANCELLATION_REQUESTED; no return value
    submit, cancel = ("POST", f"{QUEUE}/{QUEUE_APP}"), ("PUT", f"{fresh}/cancel")
    expected = [submit, ("GET", f"{base}/status?logs=1"), ("GET", base), submit, cancel]
    assert_sent_via_proxy(outcome, proxy, *expected)

    records = fake_gateway.requests()
    assert len(records) == len(expected)
    for record, (method, target) in zip(records, expected, strict=True):
        assert_target_mode(record, method, target)
    _, status_seen, result_seen, fresh_seen, cancel_seen = records
    assert fresh_seen["body"] == b'{"prompt":"dog"}'
    for record in (status_seen, result_seen, cancel_seen):
        assert record["body"] == b""


def assert_held_and_released(outcome: dict[str, Any], request_id: str) -> None:
    """The scenario's job was held (its two releases each moved it), so the states the SDK
    saw were each kept for it until it reported them."""
    assert outcome["released"] == [{request_id: "IN_PROGRESS"}] * 2


def test_subscribe_polls_until_completed(proxy: RunningProxy, fake_gateway: FakeGateway) -> None:
    outcome = run_sdk(proxy, fake_gateway, "subscribe_polling")

    (request_id,) = outcome["enqueued"]
    assert REQUEST_ID.fullmatch(request_id)
    updates = outcome["updates"]
    # One update per poll (every 20 ms), each state held until seen: all of them, in order.
    assert statuses([u["status"] for u in updates]) == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert_held_and_released(outcome, request_id)
    # logs=1: the log lines arrive while the job runs; each poll has all of them so far.
    for before, after in itertools.pairwise(updates):
        assert after["logs"][: len(before["logs"])] == before["logs"]
    assert all(u["logs"] == [] for u in updates if u["status"] == "IN_QUEUE")
    assert updates[-1]["logs"] == JOB_LOGS
    assert outcome["requestId"] == request_id
    assert_generated_image(outcome["data"], fake_gateway)

    base = f"{QUEUE_REQUESTS}/{request_id}"
    expected = [
        ("POST", f"{QUEUE}/{QUEUE_APP}"),
        *[("GET", f"{base}/status?logs=1")] * len(updates),
        ("GET", base),
    ]
    assert_queue_sequence(outcome, proxy, fake_gateway, expected)


def test_subscribe_streaming_status(proxy: RunningProxy, fake_gateway: FakeGateway) -> None:
    outcome = run_sdk(proxy, fake_gateway, "subscribe_streaming")

    (request_id,) = outcome["enqueued"]
    assert REQUEST_ID.fullmatch(request_id)
    # One event per change of state, pushed by the emulator over the status stream.
    assert outcome["updates"] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert_held_and_released(outcome, request_id)
    assert outcome["requestId"] == request_id
    assert_generated_image(outcome["data"], fake_gateway)

    base = f"{QUEUE_REQUESTS}/{request_id}"
    expected = [
        ("POST", f"{QUEUE}/{QUEUE_APP}"),
        ("GET", f"{base}/status/stream?logs=0"),
        ("GET", base),
    ]
    _submit, status_stream, _result = assert_queue_sequence(outcome, proxy, fake_gateway, expected)
    assert "text/event-stream" in status_stream["header_map"]["accept"]


def test_workflow_subscribe_keeps_the_namespace(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    outcome = run_sdk(proxy, fake_gateway, "workflow_subscribe")

    (request_id,) = outcome["enqueued"]
    assert REQUEST_ID.fullmatch(request_id)
    assert statuses(outcome["updates"]) == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert_held_and_released(outcome, request_id)
    assert outcome["requestId"] == request_id
    assert_generated_image(outcome["data"], fake_gateway)

    # No sub-path to drop: status and result use the whole workflows/<owner>/<alias> id.
    base = f"{QUEUE}/{WORKFLOW}/requests/{request_id}"
    expected = [
        ("POST", f"{QUEUE}/{WORKFLOW}"),
        *[("GET", f"{base}/status?logs=0")] * len(outcome["updates"]),
        ("GET", base),
    ]
    records = assert_queue_sequence(outcome, proxy, fake_gateway, expected)
    assert records[0]["body"] == b'{"prompt":"cat"}'


# --- fal.stream ------------------------------------------------------------------------------


def test_stream_sse(proxy: RunningProxy, fake_gateway: FakeGateway) -> None:
    outcome = run_sdk(proxy, fake_gateway, "stream")

    # The last event is named "event: done" upstream; the SDK delivers it as data too.
    assert outcome["events"] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert outcome["done"] == {"n": 3}
    assert REQUEST_ID.fullmatch(outcome["requestId"])
    target = "https://fal.run/emulator/sse/stream?n=3&gated=0"  # the SDK appends /stream
    assert_sent_via_proxy(outcome, proxy, ("POST", target))

    seen = fake_gateway.only_request()
    assert_path_mode(seen, "POST", "/emulator/sse/stream", "n=3&gated=0")
    assert seen["body"] == b'{"prompt":"cat"}'
    assert "text/event-stream" in seen["header_map"]["accept"]
    assert seen["header_map"]["cf-aig-skip-cache"] == "true"
    assert seen["header_map"]["cf-aig-max-attempts"] == "1"


def test_stream_events_reach_the_sdk_one_by_one(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    # The emulator emits event i+1 only once the SDK process, having received event i,
    # releases the gate: a proxy that buffered the stream would deadlock (and time out).
    outcome = run_sdk(proxy, fake_gateway, "stream_incremental")

    assert [e["event"] for e in outcome["events"]] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert outcome["done"] == {"n": 3}
    assert outcome["releaseStatuses"] == [200, 200]
    assert REQUEST_ID.fullmatch(outcome["requestId"])
    assert_sent_via_proxy(outcome, proxy, ("POST", "https://fal.run/emulator/sse/stream?n=3"))

    seen = fake_gateway.only_request()
    assert_path_mode(seen, "POST", "/emulator/sse/stream", "n=3")
    assert "text/event-stream" in seen["header_map"]["accept"]


def test_stream_binary_chunks_reach_the_sdk_unchanged(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    # audio/mpeg, not SSE: the SDK emits raw Uint8Array chunks. Chunk i+1 leaves the emulator
    # only once the SDK process holds all of chunk i, so no chunk can span two upstream ones.
    outcome = run_sdk(proxy, fake_gateway, "stream_binary")

    chunks = [base64.b64decode(c["b64"]) for c in outcome["chunks"]]
    assert all(c["isUint8Array"] for c in outcome["chunks"])
    upstream = [audio_chunk(i) for i in (1, 2, 3)]
    assert b"".join(chunks) == b"".join(upstream)  # in order, byte for byte
    # Split, if at all, only within an upstream chunk: every upstream end is an SDK chunk end.
    ends = {sum(map(len, upstream[:i])) for i in (1, 2, 3)}
    assert ends <= {sum(map(len, chunks[:i])) for i in range(1, len(chunks) + 1)}
    assert outcome["done"] == outcome["chunks"][-1]  # done() resolves to the last chunk
    assert outcome["releaseStatuses"] == [200, 200]
    assert REQUEST_ID.fullmatch(outcome["requestId"])
    target = "https://fal.run/emulator/audio/stream?chunks=3"
    assert_sent_via_proxy(outcome, proxy, ("POST", target))

    seen = fake_gateway.only_request()
    assert_path_mode(seen, "POST", "/emulator/audio/stream", "chunks=3")
    assert seen["body"] == b'{"prompt":"cat"}'
    assert (
        seen["header_map"]["accept"] == "application/json, audio/mpeg"
    )  # the stream's `accept` option


def test_stream_abort_closes_the_upstream_request(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    outcome = run_sdk(proxy, fake_gateway, "stream_abort")

    assert outcome["events"] == [{"n": 1}]
    assert outcome["done"] == {"n": 1}  # done() resolves to the last event on abort
    request_id = outcome["requestId"]
    assert REQUEST_ID.fullmatch(request_id)
    assert_sent_via_proxy(outcome, proxy, ("POST", "https://fal.run/emulator/stall/stream"))
    assert_path_mode(fake_gateway.only_request(), "POST", "/emulator/stall/stream")
    # The emulator saw its client (the proxy) leave while the SDK process was still alive, so
    # the abort itself, not the process exiting, closed the upstream request.
    assert outcome["disconnectSeenAfterMs"] is not None, (
        "the upstream request was not closed within 10 s"
    )
    assert f"disconnected:stall:{request_id}" in fake_gateway.events()


# --- storage uploads -------------------------------------------------------------------------


def test_storage_upload_initiates_through_the_proxy_and_puts_the_bytes_directly(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    outcome = run_sdk(proxy, fake_gateway, "storage_upload")

    data = base64.b64decode(outcome["bytes"])
    initiate_sent, put_sent = outcome["sent"]
    assert_sent_via_proxy({"sent": [initiate_sent]}, proxy, ("POST", INITIATE))
    assert_sent_without_credentials(outcome)

    initiate = fake_gateway.only_request()  # the gateway saw the initiation only
    assert_initiated(initiate, INITIATE, "image/png", "png")
    assert "x-fal-object-lifecycle" not in initiate["header_map"]
    (upload,) = fake_gateway.requests("upload")
    assert_sent_direct(put_sent, upload, fake_gateway)
    assert upload["method"] == "PUT"
    assert upload["header_map"]["content-type"] == "image/png"
    assert upload["body"] == data
    assert_serves(fake_gateway, outcome["fileUrl"], data)


def test_storage_upload_lifecycle_header_reaches_the_gateway(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    outcome = run_sdk(proxy, fake_gateway, "storage_upload_lifecycle")

    initiate = fake_gateway.only_request()
    assert_initiated(initiate, INITIATE, "image/png", "png")
    assert [v for k, v in initiate["headers"] if k == "x-fal-object-lifecycle"] == [
        '{"expiration_duration_seconds":3600}'
    ]
    (upload,) = fake_gateway.requests("upload")
    assert_sent_direct(outcome["sent"][1], upload, fake_gateway)
    assert_serves(fake_gateway, outcome["fileUrl"], base64.b64decode(outcome["bytes"]))


def test_multipart_upload_initiates_through_the_proxy_and_sends_the_parts_directly(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    # fal's own server proxy refuses initiate-multipart (not in its allow-list); this one
    # forwards it. The SDK's file says it holds 90 MiB + 1 byte, the smallest it uploads in
    # parts; each slice the SDK asks for is a short line (no byte of it goes via the proxy).
    outcome = run_sdk(proxy, fake_gateway, "storage_upload_multipart")

    assert outcome["size"] == MULTIPART_ABOVE + 1
    slices = outcome["slices"]  # where the SDK cut the file: 9 full parts and a 1-byte one
    assert [(s["start"], s["end"]) for s in slices] == [
        (start, min(start + PART_BYTES, outcome["size"]))
        for start in range(0, outcome["size"], PART_BYTES)
    ]
    initiate_sent, *direct = outcome["sent"]
    assert_sent_via_proxy({"sent": [initiate_sent]}, proxy, ("POST", INITIATE_MULTIPART))
    assert_sent_without_credentials(outcome)

    initiate = fake_gateway.only_request()  # not one part went through the gateway
    assert_initiated(initiate, INITIATE_MULTIPART, "application/octet-stream", "octet")
    uploads = fake_gateway.requests("upload")
    assert len(uploads) == len(direct) == len(slices) + 1
    upload_path = uploads[0]["path"].rsplit("/", 1)[0]  # <upload_url path>/<n>?<its query>
    for number, (piece, record, sent) in enumerate(zip(slices, uploads, direct, strict=False), 1):
        assert_sent_direct(sent, record, fake_gateway)
        assert (record["method"], record["path"]) == ("PUT", f"{upload_path}/{number}")
        assert record["body"] == base64.b64decode(piece["b64"])
    complete = uploads[-1]
    assert_sent_direct(direct[-1], complete, fake_gateway)
    assert (complete["method"], complete["path"]) == ("POST", f"{upload_path}/complete")
    assert [p["partNumber"] for p in json.loads(complete["body"])["parts"]] == list(
        range(1, len(slices) + 1)
    )
    # The file URL serves the parts joined, in order.
    joined = b"".join(base64.b64decode(piece["b64"]) for piece in slices)
    assert_serves(fake_gateway, outcome["fileUrl"], joined)


def test_auto_upload_replaces_a_blob_input_by_its_file_url(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    outcome = run_sdk(proxy, fake_gateway, "auto_upload")

    data = base64.b64decode(outcome["bytes"])
    file_url = outcome["data"]["input"]["image_url"]
    assert outcome["data"] == {"input": {"prompt": "cat", "image_url": file_url}}
    assert REQUEST_ID.fullmatch(outcome["requestId"])
    initiate_sent, put_sent, run_sent = outcome["sent"]  # in this order: upload first, then run
    assert_sent_via_proxy(
        {"sent": [initiate_sent, run_sent]},
        proxy,
        ("POST", INITIATE),
        ("POST", "https://fal.run/emulator/echo"),
    )

    initiate, run = fake_gateway.requests()
    assert_initiated(initiate, INITIATE, "image/png", "png")
    (upload,) = fake_gateway.requests("upload")
    assert_sent_direct(put_sent, upload, fake_gateway)
    assert upload["body"] == data
    assert_path_mode(run, "POST", "/emulator/echo")
    assert json.loads(run["body"]) == {"prompt": "cat", "image_url": file_url}
    assert_serves(fake_gateway, file_url, data)


# --- realtime --------------------------------------------------------------------------------


def test_realtime_token_comes_through_the_proxy_and_the_socket_goes_to_fal(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    outcome = run_sdk(proxy, fake_gateway, "realtime_token")

    assert_sent_via_proxy(outcome, proxy, ("POST", TOKENS))
    assert outcome["sent"][0]["status"] == 201
    seen = fake_gateway.only_request()
    assert_target_mode(seen, "POST", TOKENS)
    # The alias only (second id segment), and the SDK's fixed 120 s.
    assert seen["body"] == b'{"allowed_apps":["fast-lcm-diffusion"],"token_expiration":120}'

    # The socket goes to fal.run itself, never to the proxy, with the token in the query.
    (opened,) = outcome["opened"]
    socket = rf"wss://fal\.run/{REALTIME_APP}/realtime\?fal_jwt_token=({EMULATOR_TOKEN})"
    url = re.fullmatch(socket, opened["url"])
    assert url, opened
    (frame,) = outcome["frames"]  # the input, as one msgpack binary frame
    assert frame["binary"] and msgpack.unpackb(base64.b64decode(frame["b64"])) == {"prompt": "cat"}
    assert outcome["results"] == [] and outcome["errors"] == []

    # That token is the one the emulator issued for the alias: its realtime socket accepts it.
    realtime = f"ws://127.0.0.1:{fake_gateway.port}{PREFIX}/fal-ai/fast-lcm-diffusion/realtime"
    with ws_connect(f"{realtime}?fal_jwt_token={url[1]}", proxy=None, open_timeout=5) as ws:
        ws.send(msgpack.packb({"prompt": "cat", "image_size": {"width": 32, "height": 32}}))
        assert msgpack.unpackb(ws.recv(timeout=5))["prompt"] == "cat"


@pytest.mark.parametrize(
    ("setting", "value", "reason"),
    [
        ("FAL_PROXY_ALLOWED_APPS", "fal-ai/flux/*", "app_refused"),
        ("FAL_PROXY_TOKEN_MAX_EXPIRATION", "60", "token_refused"),  # the SDK asks for 120 s
    ],
)
def test_realtime_token_refused_by_the_proxy_opens_no_socket(
    start_proxy: Any, fake_gateway: FakeGateway, setting: str, value: str, reason: str
) -> None:
    refusing = start_proxy(**{setting: value})
    outcome = run_sdk(refusing, fake_gateway, "realtime_token_refused")

    assert_sent_via_proxy(outcome, refusing, ("POST", TOKENS))
    assert outcome["sent"][0]["status"] == 403  # a policy refusal: the SDK does not retry it
    assert fake_gateway.requests() == []  # refused before anything went upstream
    line = refusing.process.wait_for_json(
        lambda r: r.get("event") == "request" and r.get("route") == "token"
    )
    assert (line["status"], line["error"]) == (403, reason)
    assert outcome["opened"] == [] and outcome["frames"] == []
    # @fal-ai/client 1.10.1 drops a failed token request silently (its state machine goes
    # back to idle): onError is NOT called, so an app sees nothing. Pinned here so a
    # change of SDK behaviour shows up.
    assert outcome["errors"] == [] and outcome["results"] == []


# --- a string proxyUrl: browser only -------------------------------------------------------


def test_string_proxy_url_is_ignored_in_node(start_proxy: Any, fake_gateway: FakeGateway) -> None:
    # A proxy of its own: nothing another test sent can still be arriving in its log.
    proxy = start_proxy()
    outcome = run_sdk(proxy, fake_gateway, "node_string_proxy_url")

    # The SDK went to fal itself (the canned fetch answered in its place)...
    (sent,) = outcome["sent"]
    assert (sent["method"], sent["url"]) == ("POST", "https://fal.run/emulator/echo")
    assert "x-fal-target-url" not in sent["headers"]
    assert sent["headers"]["user-agent"] == UA
    assert outcome["data"] == {"canned": True}
    assert outcome["requestId"] == "canned-request-id"
    # ...and the proxy and the gateway saw nothing.
    assert fake_gateway.requests() == []
    proxy.process.stop()  # (stdout is read to its end: every line it wrote is in)
    assert proxy.request_logs() == []


def test_string_proxy_url_is_used_in_a_browser(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    outcome = run_sdk(proxy, fake_gateway, "browser_string_proxy_url")

    assert outcome["data"] == {"input": {"prompt": "cat"}}
    assert REQUEST_ID.fullmatch(outcome["requestId"])
    # The relative proxyUrl, as given (the page resolves it); no SDK User-Agent in a browser.
    (sent,) = outcome["sent"]
    assert (sent["method"], sent["url"]) == ("POST", "/api/fal/proxy")
    assert sent["headers"]["x-fal-target-url"] == "https://fal.run/emulator/echo"
    assert "user-agent" not in sent["headers"] and "authorization" not in sent["headers"]

    seen = fake_gateway.only_request()
    assert (seen["method"], seen["path"], seen["query"]) == ("POST", f"{PREFIX}/emulator/echo", "")
    assert seen["target_url"] is None
    assert [v for k, v in seen["headers"] if k == "authorization"] == [SERVER_AUTH]
    assert seen["header_map"]["user-agent"] != UA  # the fetch implementation's own, if any
    assert seen["header_map"]["x-fal-client-proxy"].startswith("fal-gateway-proxy/")
    assert seen["body"] == b'{"prompt":"cat"}'


# --- errors and retries ----------------------------------------------------------------------


def test_422_becomes_a_validation_error(proxy: RunningProxy, fake_gateway: FakeGateway) -> None:
    outcome = run_sdk(proxy, fake_gateway, "error_422")

    error = outcome["thrown"]
    assert outcome["result"] is None
    assert error["constructor"] == "ValidationError"
    assert error["isValidationError"] and error["isApiError"]
    assert error["status"] == 422
    field_error = {
        "loc": ["body", "prompt"],
        "msg": "field required",
        "type": "value_error.missing",
    }
    assert error["body"] == {"detail": [field_error]}
    assert error["fieldErrors"] == [field_error]
    assert error["promptErrors"] == [field_error]
    assert REQUEST_ID.fullmatch(error["requestId"])

    seen = fake_gateway.only_request()  # a 422 is not retried
    assert_path_mode(seen, "POST", "/emulator/status/422")
    assert seen["body"] == b'{"foo":1}'


def test_500_becomes_an_api_error_with_the_body(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    outcome = run_sdk(proxy, fake_gateway, "error_500")

    error = outcome["thrown"]
    assert error["constructor"] == "ApiError"
    assert not error["isValidationError"]
    assert error["status"] == 500
    assert error["body"] == {"detail": "boom"}
    assert REQUEST_ID.fullmatch(error["requestId"])
    assert_path_mode(fake_gateway.only_request(), "POST", "/emulator/status/500")


def test_user_timeout_504_is_not_retried(proxy: RunningProxy, fake_gateway: FakeGateway) -> None:
    outcome = run_sdk(proxy, fake_gateway, "error_504_user_timeout")

    error = outcome["thrown"]
    assert error["constructor"] == "ApiError"
    assert error["status"] == 504
    assert error["timeoutType"] == "user"  # x-fal-request-timeout-type reached the SDK
    assert error["isUserTimeout"] is True

    seen = fake_gateway.only_request()  # exactly one attempt
    assert_path_mode(seen, "POST", "/emulator/status/504")
    assert seen["header_map"]["x-fal-request-timeout"] == "5"


def test_text_404_becomes_an_api_error(proxy: RunningProxy, fake_gateway: FakeGateway) -> None:
    outcome = run_sdk(proxy, fake_gateway, "error_text404")

    error = outcome["thrown"]
    assert error["constructor"] == "ApiError"
    assert not error["isValidationError"]
    assert error["status"] == 404
    assert error["message"] == "HTTP 404: Not Found"
    assert error["body"] is None  # not JSON: the SDK keeps no body
    assert REQUEST_ID.fullmatch(error["requestId"])
    assert_path_mode(fake_gateway.only_request(), "POST", "/emulator/text404")


def test_sdk_retries_upstream_503(proxy: RunningProxy, fake_gateway: FakeGateway) -> None:
    outcome = run_sdk(proxy, fake_gateway, "retry_503")

    assert outcome["data"] == {"attempt": 3}
    assert REQUEST_ID.fullmatch(outcome["requestId"])
    target = ("POST", "https://fal.run/emulator/flaky?fail=2")
    assert_sent_via_proxy(outcome, proxy, target, target, target)

    records = fake_gateway.requests()
    assert len(records) == 3  # the SDK retried; the gateway was told not to (max-attempts 1)
    for record in records:
        assert_path_mode(record, "POST", "/emulator/flaky", "fail=2")
        assert record["body"] == b'{"prompt":"cat"}'
        assert record["header_map"]["cf-aig-max-attempts"] == "1"


# --- credentials -----------------------------------------------------------------------------


def test_client_credentials_are_replaced_by_the_server_key(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    outcome = run_sdk(proxy, fake_gateway, "client_key")

    assert outcome["run"]["data"] == {"input": {"prompt": "cat"}}
    assert REQUEST_ID.fullmatch(outcome["submitted"]["request_id"])
    assert outcome["submitted"]["status"] == "IN_QUEUE"
    # The SDK did send its key to the proxy...
    assert_sent_via_proxy(
        outcome, proxy, ("POST", "https://fal.run/emulator/echo"), ("POST", f"{QUEUE}/{QUEUE_APP}")
    )
    for request in outcome["sent"]:
        assert request["headers"]["authorization"] == "Key client-key"

    # ...and the gateway saw only the server's (assert_upstream_common checks it is the only one).
    run, submit = fake_gateway.requests()
    assert_path_mode(run, "POST", "/emulator/echo")
    assert_target_mode(submit, "POST", f"{QUEUE}/{QUEUE_APP}")
    for record in (run, submit):
        assert b"client-key" not in json.dumps(record["headers"]).encode()
