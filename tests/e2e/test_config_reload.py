"""The access files change without a restart (proxy/app/config_reload.py): the tokens file,
the JWKS file and the plans file are re-read when they change, every
``FAL_PROXY_SECRET_RELOAD_SECONDS`` and at once on SIGHUP; a file that no longer parses keeps
the last good version and says so once.

Each test waits on the proxy's own log lines (``config_reloaded``, ``config_file_unusable``),
never on a sleep. Files are replaced as Kubernetes replaces a mounted one: whole, by a rename.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import FakeGateway, RunningProxy, token_callers
from tests.e2e.test_workers import running_workers

ECHO = "/emulator/echo"
TOKENS = {
    "alice": "alice-token-0123456789",
    "bob": "bob-token-0123456789ab",
    "carol": "carol-token-0123456789",
}
FAST = "0.1"  # the reload interval of most tests: seconds
NEVER = "3600"  # the interval of the SIGHUP tests: only the signal can explain a reload


def replace(path: Path, text: str) -> None:
    """Write ``path`` whole, by a rename (as a ConfigMap update does)."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(text, encoding="utf-8")
    os.replace(fresh, path)


def tokens_text(*callers: str) -> str:
    return "".join(f"{c} {TOKENS[c]}\n" for c in callers)


def as_caller(caller: str) -> dict[str, str]:
    return {"x-proxy-authorization": f"Bearer {TOKENS[caller]}"}


def post(proxy: RunningProxy, path: str, headers: dict[str, str]) -> httpx.Response:
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=20) as c:
        return c.post(path, json={"prompt": "a lighthouse"}, headers=headers)


def matching(proxy: RunningProxy, event: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        line
        for line in proxy.logs()
        if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
    ]


class Next:
    """The next line of ``event`` (with ``fields``) after those logged so far: taken when
    made, before the change, so the line the change causes is the one waited for."""

    def __init__(self, proxy: RunningProxy, event: str, **fields: Any) -> None:
        self.proxy, self.event, self.fields = proxy, event, fields
        self.before = len(matching(proxy, event, **fields))

    def wait(self, timeout: float = 10) -> dict[str, Any]:
        count = 0

        def seen(line: dict[str, Any]) -> bool:
            nonlocal count
            if line.get("event") == self.event and all(
                line.get(k) == v for k, v in self.fields.items()
            ):
                count += 1
            return count > self.before

        return self.proxy.process.wait_for_json(seen, timeout=timeout)


def test_a_removed_token_is_refused_and_an_added_one_works_without_a_restart(
    start_proxy: Any, tmp_path: Path
) -> None:
    settings = token_callers(tmp_path, {c: TOKENS[c] for c in ("alice", "bob")})
    proxy = start_proxy(**settings, FAL_PROXY_SECRET_RELOAD_SECONDS=FAST)
    path = Path(settings["FAL_PROXY_CLIENT_TOKENS_FILE"])
    assert post(proxy, ECHO, as_caller("alice")).status_code == 200
    assert post(proxy, ECHO, as_caller("carol")).status_code == 401

    reloaded = Next(proxy, "config_reloaded", variable="FAL_PROXY_CLIENT_TOKENS_FILE")
    replace(path, tokens_text("bob", "carol"))  # alice revoked, carol added
    line = reloaded.wait()
    assert (line["tokens"], line["callers"], line["file"]) == (2, 2, str(path))

    refused = post(proxy, ECHO, as_caller("alice"))
    assert refused.status_code == 401
    assert post(proxy, ECHO, as_caller("bob")).status_code == 200
    assert post(proxy, ECHO, as_caller("carol")).status_code == 200
    proxy.lines_of([refused])
    text = "\n".join(proxy.process.lines)
    assert not any(token in text for token in TOKENS.values())  # counts only, never tokens


def test_a_request_in_flight_when_its_token_is_revoked_completes(
    start_proxy: Any, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    settings = token_callers(tmp_path, {c: TOKENS[c] for c in ("alice", "bob")})
    proxy = start_proxy(**settings, FAL_PROXY_SECRET_RELOAD_SECONDS=FAST)
    held: list[httpx.Response] = []
    holder = threading.Thread(
        target=lambda: held.append(post(proxy, "/emulator/hang", as_caller("alice")))
    )
    holder.start()
    try:
        deadline = time.monotonic() + 10
        while not fake_gateway.requests():  # the gateway has the call: it is in flight
            assert time.monotonic() < deadline, "the held call never reached the gateway"
            time.sleep(0.02)  # poll interval; the gateway's record is what is waited for

        reloaded = Next(proxy, "config_reloaded", variable="FAL_PROXY_CLIENT_TOKENS_FILE")
        replace(Path(settings["FAL_PROXY_CLIENT_TOKENS_FILE"]), tokens_text("bob"))
        reloaded.wait()
        assert post(proxy, ECHO, as_caller("alice")).status_code == 401  # revoked for new calls
        assert holder.is_alive()  # ... while the one in flight still waits on the gateway
    finally:
        fake_gateway.release("hang")
        holder.join(20)
    assert [r.status_code for r in held] == [200]  # and completes


PLANS = """\
[plans]
free = "*=1/day"
pro = "*=5/day"

[callers]
alice = "{plan}"
"""


def usage(proxy: RunningProxy, caller: str) -> dict[str, Any]:
    with httpx.Client(base_url=proxy.url, trust_env=False, timeout=20) as c:
        answer = c.get("/api/fal/usage", headers=as_caller(caller))
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


@pytest.fixture
def plans_proxy(start_proxy: Any, tmp_path: Path) -> tuple[RunningProxy, Path]:
    plans = tmp_path / "plans.toml"
    plans.write_text(PLANS.format(plan="free"), encoding="utf-8")
    proxy = start_proxy(
        **token_callers(tmp_path, TOKENS),
        FAL_PROXY_PLANS_FILE=str(plans),
        FAL_PROXY_SECRET_RELOAD_SECONDS=FAST,
    )
    return proxy, plans


@pytest.mark.usefixtures("clear_of_window_edges")
def test_a_caller_moved_to_another_plan_gets_its_quotas(
    plans_proxy: tuple[RunningProxy, Path],
) -> None:
    proxy, plans = plans_proxy
    assert usage(proxy, "alice")["plan"] == "free"
    assert post(proxy, "/fal-ai/fast-sdxl", as_caller("alice")).status_code == 200
    assert post(proxy, "/fal-ai/fast-sdxl", as_caller("alice")).status_code == 429  # 1/day

    reloaded = Next(proxy, "config_reloaded", variable="FAL_PROXY_PLANS_FILE")
    replace(plans, PLANS.format(plan="pro"))
    line = reloaded.wait()
    assert (line["plans"], line["callers"]) == (2, 1)

    report = usage(proxy, "alice")
    assert report["plan"] == "pro"
    [day] = report["quotas"]
    assert (day["limit"], day["used"]) == (5, 1)  # what was used today still counts
    assert post(proxy, "/fal-ai/fast-sdxl", as_caller("alice")).status_code == 200


def test_a_broken_plans_file_keeps_the_old_plans_and_warns_once(
    plans_proxy: tuple[RunningProxy, Path], tmp_path: Path
) -> None:
    proxy, plans = plans_proxy
    tokens = tmp_path / "tokens"
    warned = Next(proxy, "config_file_unusable", variable="FAL_PROXY_PLANS_FILE")
    replace(plans, PLANS.format(plan="pro").replace('pro = "*=5/day"', 'pro = "*=5/day'))
    warning = warned.wait()
    assert warning["file"] == str(plans) and warning["line"] == 3, warning
    assert "FAL_PROXY_PLANS_FILE" in warning["problem"] and warning["level"] == "warning"
    assert usage(proxy, "alice")["plan"] == "free"  # the last good plans

    # Two more checks of every file (each shown by a change of the tokens file picked up
    # after the warning): the broken plans file is not warned about again.
    for callers in (("alice", "bob"), ("alice", "bob", "carol")):
        reloaded = Next(proxy, "config_reloaded", variable="FAL_PROXY_CLIENT_TOKENS_FILE")
        replace(tokens, tokens_text(*callers))
        reloaded.wait()
    assert len(matching(proxy, "config_file_unusable")) == 1
    assert not matching(proxy, "config_reloaded", variable="FAL_PROXY_PLANS_FILE")
    assert usage(proxy, "alice")["plan"] == "free"

    reloaded = Next(proxy, "config_reloaded", variable="FAL_PROXY_PLANS_FILE")
    replace(plans, PLANS.format(plan="pro"))  # fixed: picked up
    reloaded.wait()
    assert usage(proxy, "alice")["plan"] == "pro"


def test_sighup_reloads_at_once(start_proxy: Any, tmp_path: Path) -> None:
    settings = token_callers(tmp_path, {c: TOKENS[c] for c in ("alice", "bob")})
    proxy = start_proxy(**settings, FAL_PROXY_SECRET_RELOAD_SECONDS=NEVER)
    replace(Path(settings["FAL_PROXY_CLIENT_TOKENS_FILE"]), tokens_text("bob"))
    reloaded = Next(proxy, "config_reloaded", variable="FAL_PROXY_CLIENT_TOKENS_FILE")
    proxy.process.proc.send_signal(signal.SIGHUP)
    reloaded.wait()
    assert post(proxy, ECHO, as_caller("alice")).status_code == 401
    assert post(proxy, ECHO, as_caller("bob")).status_code == 200
    assert proxy.process.proc.poll() is None  # a reload, not the default exit


def jwks_text(keys: dict[str, rsa.RSAPrivateKey]) -> str:
    public = [
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "kid": kid}
        for kid, key in keys.items()
    ]
    return json.dumps({"keys": [{**k, "use": "sig"} for k in public]})


def test_a_key_removed_from_the_jwks_file_stops_verifying(start_proxy: Any, tmp_path: Path) -> None:
    keys = {kid: rsa.generate_private_key(public_exponent=65537, key_size=2048)
            for kid in ("k1", "k2")}  # fmt: skip
    path = tmp_path / "jwks.json"
    path.write_text(jwks_text(keys), encoding="utf-8")
    proxy = start_proxy(
        FAL_PROXY_AUTH="jwt",
        FAL_PROXY_JWT_JWKS_FILE=str(path),
        FAL_PROXY_SECRET_RELOAD_SECONDS=FAST,
    )
    claims = {"sub": "alice", "exp": int(time.time()) + 300}
    signed = {kid: {"x-proxy-authorization": "Bearer "
                    + jwt.encode(claims, key, "RS256", headers={"kid": kid})}
              for kid, key in keys.items()}  # fmt: skip
    assert post(proxy, ECHO, signed["k1"]).status_code == 200
    assert post(proxy, ECHO, signed["k2"]).status_code == 200

    reloaded = Next(proxy, "config_reloaded", variable="FAL_PROXY_JWT_JWKS_FILE")
    replace(path, jwks_text({"k2": keys["k2"]}))
    assert reloaded.wait()["keys"] == 1
    assert post(proxy, ECHO, signed["k1"]).status_code == 401
    assert post(proxy, ECHO, signed["k2"]).status_code == 200

    warned = Next(proxy, "config_file_unusable", variable="FAL_PROXY_JWT_JWKS_FILE")
    replace(path, '{"keys": [\n')  # cut off: the last good keys stay
    assert warned.wait()["line"] == 2
    assert post(proxy, ECHO, signed["k2"]).status_code == 200


def test_sighup_to_the_supervisor_reaches_every_worker(
    fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    settings = token_callers(tmp_path, {c: TOKENS[c] for c in ("alice", "bob")})
    with running_workers(fake_gateway, 2, **settings,
                         FAL_PROXY_SECRET_RELOAD_SECONDS=NEVER) as workers:  # fmt: skip
        proxy = RunningProxy(workers.process, workers.url)
        replace(Path(settings["FAL_PROXY_CLIENT_TOKENS_FILE"]), tokens_text("bob"))
        # The supervisor signals the workers that have answered a health check: signal it
        # until it has reached both (each forward is a line), then both have reloaded.
        deadline = time.monotonic() + 20
        while True:
            forwarded = Next(proxy, "reload_forwarded")
            workers.process.proc.send_signal(signal.SIGHUP)
            if len(forwarded.wait()["workers"]) == 2:
                break
            assert time.monotonic() < deadline, "the supervisor never reached both workers"
        for pid in workers.listening_pids():
            proxy.process.wait_for_json(
                lambda r, pid=pid: r.get("event") == "config_reloaded" and r.get("pid") == pid,
                timeout=10,
            )
        for _ in range(4):  # new connections each: whichever worker takes them refuses alice
            assert post(proxy, ECHO, as_caller("alice")).status_code == 401
            assert post(proxy, ECHO, as_caller("bob")).status_code == 200
        assert workers.process.proc.poll() is None


def test_a_new_price_counts_from_the_reload_on(start_proxy: Any, tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('[prices]\n"*" = 0.01\n', encoding="utf-8")
    proxy = start_proxy(
        **token_callers(tmp_path, TOKENS),
        FAL_PROXY_PRICES_FILE=str(prices),
        FAL_PROXY_SECRET_RELOAD_SECONDS=FAST,
    )
    assert post(proxy, "/fal-ai/fast-sdxl", as_caller("alice")).status_code == 200  # 1 unit

    reloaded = Next(proxy, "config_reloaded", variable="FAL_PROXY_PRICES_FILE")
    replace(prices, '[prices]\n"fal-ai/fast-sdxl" = 0.5\n"*" = 0.01\n')
    assert reloaded.wait()["prices"] == 2
    answer = post(proxy, "/fal-ai/fast-sdxl", as_caller("alice"))
    assert answer.status_code == 200
    proxy.lines_of([answer])  # its units are counted once its line is written
    spent = usage(proxy, "alice")["usage"]["apps"]["fal-ai/fast-sdxl"]
    assert (spent["generations"], spent["spend_usd"]) == (2, pytest.approx(0.51))

    warned = Next(proxy, "config_file_unusable", variable="FAL_PROXY_PRICES_FILE")
    replace(prices, '[prices]\n"*" = -1\n')  # refused as at start-up: the last good prices
    assert "FAL_PROXY_PRICES_FILE" in warned.wait()["problem"]


def test_prices_reloaded_without_a_price_for_a_budgets_apps_say_so(
    start_proxy: Any, tmp_path: Path
) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('[prices]\n"*" = 0.01\n', encoding="utf-8")
    proxy = start_proxy(
        **token_callers(tmp_path, TOKENS),
        FAL_PROXY_QUOTAS="*=$1/day",
        FAL_PROXY_PRICES_FILE=str(prices),
        FAL_PROXY_SECRET_RELOAD_SECONDS=FAST,
    )
    assert not [j for j in proxy.process.json_lines() if j.get("event") == "budget_unpriced_apps"]
    warned = Next(proxy, "budget_unpriced_apps")
    replace(prices, '[prices]\n"fal-ai/flux/*" = 0.01\n')  # "*" no longer priced
    line = warned.wait()
    assert line["budget"] == "*=$1/day" and "FAL_PROXY_PRICES_FILE" in line["note"]
