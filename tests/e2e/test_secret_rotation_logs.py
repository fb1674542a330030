"""A rotated fal key and gateway token (``FAL_KEY_FILE``, ``CF_AIG_TOKEN_FILE``, re-read by
proxy/app/secrets_reload.py) are redacted from every log line after the rotation, at debug
level too (docs/security.md, "Logs": "registered again on rotation").

The new values are ones the proxy never saw at start-up, and the test puts them where a log
line would show them (a request's path), so only their registration on rotation keeps
them out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.conftest import FAL_KEY, FakeGateway, RunningProxy, launch_proxy

OLD_KEY = "fal-old-key-revoked:0000-1111"
OLD_TOKEN = "cf-old-token-revoked-2222"
NEW_KEY = FAL_KEY  # the emulator's key: calls work again once it is in use
NEW_TOKEN = "cf-ROTATED-token-5150-new"
DEADLINE = 15.0


@pytest.fixture(scope="module")
def rotating(
    fake_gateway: FakeGateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningProxy, Path, Path]]:
    folder = tmp_path_factory.mktemp("secrets")
    key_file, token_file = folder / "fal_key", folder / "cf_aig_token"
    key_file.write_text(OLD_KEY + "\n", encoding="utf-8")
    token_file.write_text(OLD_TOKEN + "\n", encoding="utf-8")
    proxy = launch_proxy(
        fake_gateway.gateway_url,
        FAL_KEY="",
        FAL_KEY_FILE=str(key_file),
        CF_AIG_TOKEN_FILE=str(token_file),
        FAL_PROXY_SECRET_RELOAD_SECONDS="0.1",
        FAL_PROXY_LOG_LEVEL="debug",
    )
    yield proxy, key_file, token_file
    proxy.process.stop()


def reloaded(proxy: RunningProxy) -> set[str]:
    return {name for line in proxy.logs() if line.get("event") == "secret_reloaded"
            for name in line["secrets"]}  # fmt: skip


def test_rotated_secrets_never_appear_in_a_log_line(
    rotating: tuple[RunningProxy, Path, Path], fake_gateway: FakeGateway
) -> None:
    proxy, key_file, token_file = rotating
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as c:
        assert c.post("/emulator/echo", json={}).status_code == 401  # the old key
        key_file.write_text(NEW_KEY + "\n", encoding="utf-8")
        token_file.write_text(NEW_TOKEN + "\n", encoding="utf-8")
        deadline = time.monotonic() + DEADLINE
        while reloaded(proxy) != {"fal_key", "cf_aig_token"}:
            assert time.monotonic() < deadline, "the new secrets were not read"
            time.sleep(0.02)  # poll interval; the reload's log line is what is waited for
        fake_gateway.clear()
        assert c.post("/emulator/echo", json={}).status_code == 200  # the new ones are in use
        sent = fake_gateway.only_request()["header_map"]
        assert sent["authorization"] == f"Key {NEW_KEY}"
        assert sent["cf-aig-authorization"] == f"Bearer {NEW_TOKEN}"
        # The new values where the proxy's own line shows what the client sent: the path.
        ids = [c.post(f"/fal-ai/{secret}/run", json={}).headers["x-proxy-request-id"]
               for secret in (NEW_KEY, NEW_TOKEN)]  # fmt: skip
    # A socket: at debug, the websockets library logs its upstream handshake's headers.
    url = proxy.url.replace("http://", "ws://") + "/fal-ai/fast-lcm-diffusion/realtime"
    with ws_connect(url) as socket_:
        socket_.send(msgpack.packb({"prompt": "a cat"}))
        assert msgpack.unpackb(socket_.recv(timeout=10))["images"]
    (handshake,) = fake_gateway.requests("websocket")
    assert ("authorization", f"Key {NEW_KEY}") in [(n.lower(), v) for n, v in handshake["headers"]]
    # And one whose path uvicorn's own (stdlib) line shows: fal has no such app.
    with pytest.raises(InvalidStatus):
        ws_connect(proxy.url.replace("http://", "ws://") + f"/fal-ai/{NEW_TOKEN}/realtime")
    lines = [proxy.wait_for_request_log(request_id) for request_id in ids]
    assert [line["target_path"] for line in lines] == ["/fal-ai/[redacted]/run"] * 2
    # The refused socket's own line, the last session's: every line above it is in.
    proxy.process.wait_for_json(lambda r: r.get("event") == "websocket" and "error" in r)
    assert any(line.get("level") == "debug" for line in proxy.logs())  # debug is on
    with proxy.process._cond:  # every line so far, JSON or not (stderr included)
        text = "\n".join(proxy.process.lines)
    assert NEW_KEY not in text and NEW_KEY.split(":")[1] not in text
    assert NEW_TOKEN not in text
