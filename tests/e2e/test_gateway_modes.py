"""Gateway-native modes end to end, against the emulator acting as an authenticated gateway
that stores a fal key (``--byok team=<key>``) and offers Unified Billing:

* BYOK: no ``Authorization`` upstream on any kind of call (run, queue, stream, socket), the
  proxy's alias and ``cf-aig-no-wholesale``, a caller's own alias dropped, an unknown alias's
  error relayed; Unified Billing: no key and no alias; key mode: ``cf-aig-no-wholesale``;
* ``cf-aig-metadata`` on every kind of call: caller (a keyed hash, the id, or nothing), app,
  request id and route, never more than 5 entries, a caller's own dropped;
* ``check --probe`` naming the mode and whether the gateway takes it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import (
    CF_TOKEN,
    FAL_KEY,
    FakeGateway,
    RunningProxy,
    child_env,
    start_fake_gateway,
)

QUEUE = "https://queue.fal.run"
BYOK = {"CF_AIG_BYOK_ALIAS": "team", "CF_AIG_TOKEN": CF_TOKEN, "FAL_KEY": ""}
HASH_KEY = "metadata-hash-key-0123456789"


@pytest.fixture(scope="module")
def fake_gateway() -> Iterator[FakeGateway]:
    gateway = start_fake_gateway(
        "--cf-token", CF_TOKEN, "--byok", f"team={FAL_KEY}", "--unified-billing"
    )
    yield gateway
    gateway.stop()


def header(record: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in record["headers"] if n.lower() == name]


def post(proxy: RunningProxy, path: str, body: Any = None, **headers: str) -> httpx.Response:
    return httpx.post(f"{proxy.url}{path}", json=body or {"prompt": "a cat"}, headers=headers,
                      trust_env=False, timeout=10)  # fmt: skip


def sdk(proxy: RunningProxy, method: str, target: str, **headers: str) -> httpx.Response:
    return httpx.request(
        method, f"{proxy.url}/api/fal/proxy", headers={"x-fal-target-url": target, **headers},
        json={"prompt": "a cat"} if method == "POST" else None, trust_env=False, timeout=10,
    )  # fmt: skip


def realtime(proxy: RunningProxy, **headers: str) -> dict[str, Any]:
    url = proxy.url.replace("http://", "ws://") + "/fal-ai/fast-lcm-diffusion/realtime"
    with ws_connect(url, additional_headers=headers) as socket:
        socket.send(msgpack.packb({"prompt": "a cat"}))
        return msgpack.unpackb(socket.recv(timeout=10))


def every_kind_of_call(proxy: RunningProxy, **headers: str) -> dict[str, str]:
    """A run, a stream, a queue submit/status/result/cancel, an upload initiation, a realtime
    token and a socket; the request id each got, by route."""
    ids: dict[str, str] = {}
    run = post(proxy, "/fal-ai/fast-sdxl", **headers)
    assert run.status_code == 200, run.text
    ids["run"] = run.headers["x-proxy-request-id"]
    stream = post(proxy, "/fal-ai/flux/dev/stream", **headers)
    assert stream.status_code == 200 and "data:" in stream.text
    ids["stream"] = stream.headers["x-proxy-request-id"]
    submit = sdk(proxy, "POST", f"{QUEUE}/fal-ai/flux/dev", **headers)
    assert submit.status_code == 200, submit.text
    ids["queue"] = submit.headers["x-proxy-request-id"]
    urls = submit.json()
    assert sdk(proxy, "GET", urls["status_url"], **headers).status_code == 200
    assert sdk(proxy, "PUT", urls["cancel_url"], **headers).status_code in (202, 400)
    assert sdk(proxy, "GET", urls["response_url"], **headers).status_code in (200, 400)
    upload = httpx.post(
        f"{proxy.url}/api/fal/proxy",
        headers={"x-fal-target-url": "https://rest.fal.ai/storage/upload/initiate", **headers},
        json={"content_type": "image/png", "file_name": "a.png"}, trust_env=False, timeout=10,
    )  # fmt: skip
    assert upload.status_code == 200, upload.text
    token = httpx.post(
        f"{proxy.url}/api/fal/proxy",
        headers={"x-fal-target-url": "https://rest.fal.ai/tokens/", **headers},
        json={"allowed_apps": ["fast-sdxl"], "token_expiration": 60}, trust_env=False, timeout=10,
    )  # fmt: skip
    assert token.status_code in (200, 201), token.text
    assert realtime(proxy, **headers)["images"]
    return ids


# --- who holds which credential ----------------------------------------------------------------


def test_byok_sends_no_key_anywhere_only_the_alias(
    start_proxy: Any, fake_gateway: FakeGateway
) -> None:
    proxy = start_proxy(**BYOK)
    # A caller trying to pick another stored key, or to send a key of its own:
    every_kind_of_call(proxy, **{"cf-aig-byok-alias": "someone-else", "authorization": "Key x",
                                 "x-api-key": "client-chosen-key"})  # fmt: skip
    records = fake_gateway.requests() + fake_gateway.requests("websocket")
    assert len(records) >= 8
    for record in records:
        assert header(record, "authorization") == [], record["path"]
        assert header(record, "x-api-key") == []  # the gateway would prefer it to the stored key
        assert header(record, "cf-aig-byok-alias") == ["team"]
        assert header(record, "cf-aig-no-wholesale") == ["true"]
        assert header(record, "cf-aig-authorization") == [f"Bearer {CF_TOKEN}"]
    assert any(r["target_url"] == f"{QUEUE}/fal-ai/flux/dev" for r in records)


def test_an_unknown_alias_gets_the_gateways_error_relayed(
    start_proxy: Any, fake_gateway: FakeGateway
) -> None:
    proxy = start_proxy(**{**BYOK, "CF_AIG_BYOK_ALIAS": "nobody"})
    response = post(proxy, "/fal-ai/fast-sdxl")
    assert response.status_code == 400
    assert "Configured BYOK credentials are unavailable" in response.text
    assert "x-fal-request-id" not in response.headers  # the gateway's own answer
    url = proxy.url.replace("http://", "ws://") + "/fal-ai/fast-lcm-diffusion/realtime"
    with pytest.raises(Exception, match=r"403|400|1008"), ws_connect(url) as socket:
        socket.recv(timeout=5)  # the socket is refused too


def test_unified_billing_sends_neither_key_nor_alias(
    start_proxy: Any, fake_gateway: FakeGateway
) -> None:
    proxy = start_proxy(FAL_PROXY_UNIFIED_BILLING="true", CF_AIG_TOKEN=CF_TOKEN, FAL_KEY="")
    assert post(proxy, "/fal-ai/fast-sdxl").status_code == 200
    (record,) = fake_gateway.requests()
    for name in ("authorization", "cf-aig-byok-alias", "cf-aig-no-wholesale"):
        assert header(record, name) == [], name


def test_key_mode_says_no_wholesale(start_proxy: Any, fake_gateway: FakeGateway) -> None:
    proxy = start_proxy(CF_AIG_TOKEN=CF_TOKEN)
    assert post(proxy, "/fal-ai/fast-sdxl").status_code == 200
    (record,) = fake_gateway.requests()
    assert header(record, "authorization") == [f"Key {FAL_KEY}"]
    assert header(record, "cf-aig-no-wholesale") == ["true"]
    assert header(record, "cf-aig-byok-alias") == []


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({**BYOK, "FAL_KEY": FAL_KEY}, "FAL_KEY"),
        ({**BYOK, "CF_AIG_TOKEN": ""}, "CF_AIG_TOKEN"),
        ({"FAL_PROXY_UNIFIED_BILLING": "true", "CF_AIG_TOKEN": CF_TOKEN}, "FAL_KEY"),
        ({**BYOK, "FAL_PROXY_FALLBACK": "direct"}, "FAL_PROXY_FALLBACK"),
    ],
)
def test_bad_mode_settings_stop_the_start_with_one_line(
    fake_gateway: FakeGateway, env: dict[str, str], named: str
) -> None:
    full = {"FAL_KEY": FAL_KEY, "FAL_PROXY_GATEWAY_URL": fake_gateway.gateway_url, **env}
    done = subprocess.run([sys.executable, "-m", "proxy"], env=child_env(**full),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("fal-gateway-proxy: error: ") and named in line
    assert FAL_KEY not in line and CF_TOKEN not in line


# --- check --probe -------------------------------------------------------------------------------


def probe(gateway: FakeGateway, **env: str) -> subprocess.CompletedProcess[str]:
    full = {"FAL_KEY": FAL_KEY, "FAL_PROXY_GATEWAY_URL": gateway.gateway_url, **env}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--probe"],
        env=child_env(**full), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_check_probe_names_the_mode_and_asks_the_gateway(fake_gateway: FakeGateway) -> None:
    byok = probe(fake_gateway, **BYOK)
    assert byok.returncode == 0, byok.stdout
    assert "credentials: the gateway's stored fal key 'team' (BYOK)" in byok.stdout
    assert "ok    gateway: took the credentials" in byok.stdout
    unknown = probe(fake_gateway, **{**BYOK, "CF_AIG_BYOK_ALIAS": "nobody"})
    assert unknown.returncode == 1 and "FAIL  gateway or fal refused" in unknown.stdout
    assert "Configured BYOK credentials are unavailable" in unknown.stdout
    key = probe(fake_gateway, CF_AIG_TOKEN=CF_TOKEN)
    assert key.returncode == 0 and "credentials: the proxy's fal key" in key.stdout
    wrong = probe(fake_gateway, CF_AIG_TOKEN="wrong-token-0123456789")
    assert wrong.returncode == 1 and "2009" in wrong.stdout
    # A 404 from something that is not the gateway (a typo in the URL) does not pass.
    elsewhere = probe(
        fake_gateway, FAL_PROXY_GATEWAY_URL=f"http://127.0.0.1:{fake_gateway.port}/nope"
    )
    assert elsewhere.returncode == 1 and "does not lead to an AI Gateway" in elsewhere.stdout
    for out in (byok, unknown, key, wrong):
        assert FAL_KEY not in out.stdout + out.stderr and CF_TOKEN not in out.stdout + out.stderr


# --- cf-aig-metadata ---------------------------------------------------------------------------


def metadata_of(record: dict[str, Any]) -> dict[str, Any]:
    (value,) = header(record, "cf-aig-metadata")
    data = json.loads(value)
    assert isinstance(data, dict) and 0 < len(data) <= 5
    assert all(isinstance(v, str | int | float | bool) for v in data.values())  # flat
    return data


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("alice@example.com alice-token-0123456789\n")
    return path


def test_metadata_on_every_kind_of_call(
    start_proxy: Any, fake_gateway: FakeGateway, tokens: Path
) -> None:
    proxy = start_proxy(
        CF_AIG_TOKEN=CF_TOKEN, FAL_PROXY_AUTH="token", FAL_PROXY_CLIENT_TOKENS_FILE=str(tokens),
        FAL_PROXY_METADATA_HASH_KEY=HASH_KEY,
    )  # fmt: skip
    crowded = json.dumps({f"k{i}": i for i in range(10)})  # a caller's own: dropped
    ids = every_kind_of_call(
        proxy, **{"x-proxy-authorization": "Bearer alice-token-0123456789",
                  "cf-aig-metadata": crowded},
    )  # fmt: skip
    tag = hmac.new(HASH_KEY.encode(), b"alice@example.com", hashlib.sha256).hexdigest()[:24]
    records = fake_gateway.requests() + fake_gateway.requests("websocket")
    routes = set()
    for record in records:
        data = metadata_of(record)
        assert data["caller"] == tag and "alice" not in json.dumps(data)
        assert set(data) <= {"caller", "app", "request_id", "route"}
        if data["route"] != "websocket":  # a handshake carries no event id
            assert [data["request_id"]] == header(record, "cf-aig-event-id")
        routes.add(data["route"])
        if data["route"] in ("run", "stream"):
            assert data["app"] in ("fal-ai/fast-sdxl", "fal-ai/flux")
    assert routes == {"run", "stream", "queue", "storage", "token", "websocket"}
    by_id = {metadata_of(r)["request_id"]: r for r in records}
    assert metadata_of(by_id[ids["run"]])["route"] == "run"
    assert metadata_of(by_id[ids["queue"]])["app"] == "fal-ai/flux"
    socket_line = proxy.process.wait_for_json(lambda r: r.get("event") == "websocket")
    (socket,) = fake_gateway.requests("websocket")
    assert metadata_of(socket)["request_id"] == socket_line["request_id"]
    assert metadata_of(socket)["app"] == "fal-ai/fast-lcm-diffusion"


@pytest.mark.parametrize(("mode", "caller"), [("raw", "alice@example.com"), ("off", None)])
def test_metadata_caller_raw_or_off(
    start_proxy: Any, fake_gateway: FakeGateway, tokens: Path, mode: str, caller: str | None
) -> None:
    proxy = start_proxy(
        CF_AIG_TOKEN=CF_TOKEN, FAL_PROXY_AUTH="token", FAL_PROXY_CLIENT_TOKENS_FILE=str(tokens),
        FAL_PROXY_METADATA_CALLER=mode,
    )  # fmt: skip
    post(proxy, "/fal-ai/fast-sdxl", **{"x-proxy-authorization": "alice-token-0123456789"})
    (record,) = fake_gateway.requests()
    assert metadata_of(record).get("caller") == caller


def test_without_callers_the_client_address_is_tagged(
    start_proxy: Any, fake_gateway: FakeGateway
) -> None:
    """Caller auth off: the hash stands for the client's address (its rate-limit bucket),
    the same for every call of that client, and never the address itself."""
    proxy = start_proxy(CF_AIG_TOKEN=CF_TOKEN)
    post(proxy, "/fal-ai/fast-sdxl")
    post(proxy, "/fal-ai/fast-sdxl")
    first, second = (metadata_of(r) for r in fake_gateway.requests())
    assert first["caller"] == second["caller"] and "127.0.0.1" not in json.dumps(first)
