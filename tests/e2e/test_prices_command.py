"""``fal-gateway-proxy prices``, the real command in its own process against the real
emulator's ``api.fal.ai`` (fal's platform API, offline): the file it writes, what it asked,
and one line with exit status 2 for each failure, never the key."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from proxy.emulator.apps import PRICES
from proxy.limits.prices import parse_prices
from tests.conftest import FAL_KEY, ROOT, FakeGateway, child_env
from tests.redis_support import free_port

USD = {app: Decimal(price) for app, (price, _, currency) in PRICES.items() if currency == "USD"}


def prices_command(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "prices", *args],
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def platform_url(gateway: FakeGateway) -> str:
    return f"http://127.0.0.1:{gateway.port}/_fal/api.fal.ai"


def test_writes_the_emulators_usd_prices_and_leaves_out_the_others(
    fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    output = tmp_path / "prices.toml"
    out = prices_command(
        "--base-url", platform_url(fake_gateway), "--output", str(output), FAL_KEY=FAL_KEY
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    text = output.read_text(encoding="utf-8")
    written = parse_prices(text, "written")
    assert dict(written.table) == USD
    assert "# unit: megapixels" in text and "127.0.0.1" in text.splitlines()[3]
    # emulator/echo is priced in EUR: left out, with a warning.
    assert out.stderr.splitlines() == ["warning: left out emulator/echo: priced in 'EUR', not USD"]
    # Every app listed page by page (the emulator's pages hold 4), then priced in one batch,
    # with fal's key, straight to fal (no gateway).
    calls = fake_gateway.requests("direct")
    assert [(c["method"], c["path"]) for c in calls] == [
        ("GET", "/_fal/api.fal.ai/v1/models"),
        ("GET", "/_fal/api.fal.ai/v1/models"),
        ("GET", "/_fal/api.fal.ai/v1/models/pricing"),
        ("GET", "/_fal/api.fal.ai/v1/models/pricing"),
    ]
    assert "cursor=Mg%3D%3D" in calls[1]["query"] and "cursor" not in calls[0]["query"]
    assert all(c["header_map"]["authorization"] == f"Key {FAL_KEY}" for c in calls)
    assert fake_gateway.requests() == []
    assert FAL_KEY not in out.stdout + out.stderr + text


def test_apps_restricts_the_file_by_pattern_or_by_id(fake_gateway: FakeGateway) -> None:
    url = platform_url(fake_gateway)
    out = prices_command("--base-url", url, "--apps", "FAL-AI/flux/*", FAL_KEY=FAL_KEY)
    assert out.returncode == 0, out.stderr
    flux = {k: v for k, v in USD.items() if k.startswith("fal-ai/flux/")}
    assert dict(parse_prices(out.stdout, "stdout").table) == flux and len(flux) == 2
    fake_gateway.clear()
    # Plain ids are priced as they are, with no listing; an unknown one is warned about.
    out = prices_command(
        "--base-url", url, "--apps", "fal-ai/fast-sdxl, nobody/nothing", FAL_KEY=FAL_KEY
    )
    assert out.returncode == 0, out.stderr
    assert dict(parse_prices(out.stdout, "stdout").table) == {
        "fal-ai/fast-sdxl": USD["fal-ai/fast-sdxl"]
    }
    assert out.stderr.splitlines() == ["warning: fal gave no USD price for nobody/nothing"]
    calls = fake_gateway.requests("direct")
    assert [c["path"] for c in calls] == ["/_fal/api.fal.ai/v1/models/pricing"]
    assert calls[0]["query"] == "endpoint_id=fal-ai%2Ffast-sdxl&endpoint_id=nobody%2Fnothing"


def test_the_emulator_answers_as_api_fal_ai_with_a_key_only(fake_gateway: FakeGateway) -> None:
    """``Host: api.fal.ai`` is the same API as ``/_fal/api.fal.ai``; no key is a 401; the
    gateway does not forward to it."""
    path = "/v1/models/pricing?endpoint_id=fal-ai/flux/dev,emulator/echo"
    asked = {"host": "api.fal.ai", "authorization": f"Key {FAL_KEY}"}
    r = fake_gateway.client.get(path, headers=asked)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "prices": [
            {"endpoint_id": "fal-ai/flux/dev", "unit_price": 0.025, "unit": "megapixels",
             "currency": "USD"},
            {"endpoint_id": "emulator/echo", "unit_price": 0.001, "unit": "request",
             "currency": "EUR"},
        ],
        "next_cursor": None,
        "has_more": False,
    }  # fmt: skip
    assert fake_gateway.client.get(path, headers={"host": "api.fal.ai"}).status_code == 401
    r = fake_gateway.client.get("/v1/models/pricing", headers=asked)
    assert r.status_code == 400 and "endpoint_id" in r.json()["error"]["message"]
    r = fake_gateway.client.get(
        "/v1/acct/gw/fal",
        headers={
            "authorization": f"Key {FAL_KEY}",
            "x-fal-target-url": f"https://api.fal.ai{path}",
        },
    )
    assert r.status_code == 400 and "fal URL" in r.json()["detail"]


def one_error_line(out: subprocess.CompletedProcess[str], *named: str) -> str:
    assert out.returncode == 2, out
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fal-gateway-proxy prices: error: "), lines
    assert "Traceback" not in out.stderr
    for word in named:
        assert word in lines[0], lines[0]
    return lines[0]


def test_a_wrong_key_is_one_line_naming_the_url_and_never_the_key(
    fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    wrong = "fal-SENTINEL-wrong-key-51c3:secret-0d9e"
    output = tmp_path / "prices.toml"
    out = prices_command("--base-url", platform_url(fake_gateway), "-o", str(output), FAL_KEY=wrong)
    url = f"{platform_url(fake_gateway)}/v1/models"
    line = one_error_line(out, url, "401", "FAL_KEY")
    assert wrong not in line and "SENTINEL" not in out.stderr
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []  # no half-written file either


def test_a_key_from_a_file_works_and_no_key_is_one_line(
    fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    key_file = tmp_path / "fal-key"
    key_file.write_text(FAL_KEY + "\n", encoding="utf-8")
    url = platform_url(fake_gateway)
    out = prices_command(
        "--base-url", url, "--apps", "fal-ai/fast-sdxl", FAL_KEY_FILE=str(key_file)
    )
    assert out.returncode == 0, out.stderr
    one_error_line(prices_command("--base-url", url), "FAL_KEY")
    one_error_line(
        prices_command("--base-url", url, FAL_KEY_FILE=str(tmp_path / "none")), "FAL_KEY_FILE"
    )


def test_an_unreachable_url_is_one_line_naming_it() -> None:
    base = f"http://127.0.0.1:{free_port()}/_fal/api.fal.ai"
    out = prices_command("--base-url", base, FAL_KEY="fal-SENTINEL-unused")
    one_error_line(out, f"{base}/v1/models", "cannot reach", "--base-url")
    assert "SENTINEL" not in out.stderr


def test_a_url_that_is_not_the_api_is_one_line(fake_gateway: FakeGateway) -> None:
    """Not fal's API (the emulator's own page answers 404 there; its root answers JSON that
    is not the shape): one line naming the URL."""
    root = f"http://127.0.0.1:{fake_gateway.port}"
    one_error_line(prices_command("--base-url", root, FAL_KEY=FAL_KEY), f"{root}/v1/models", "404")
    one_error_line(prices_command("--base-url", "ftp://example/x", FAL_KEY=FAL_KEY), "--base-url")
    one_error_line(
        prices_command("--base-url", root, "--apps", "bad app", FAL_KEY=FAL_KEY), "--apps"
    )
