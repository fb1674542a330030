"""The command itself: --help, and start-up refusing bad configuration with one line."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, child_env
from tests.redis_support import free_port


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def variables_read_by_the_code() -> set[str]:
    """Every environment variable name the settings code spells out (not the help table):
    every module of proxy/config/, where all settings are declared and read."""
    names: set[str] = set()
    for module in sorted((ROOT / "proxy" / "config").glob("*.py")):
        source = module.read_text(encoding="utf-8")
        names |= set(re.findall(r'"((?:FAL|CF)_[A-Z0-9_]+)"', source))
    # Written, not read: what python-env tells fal-client (its own variables), and the prefix
    # that sorts the test-only variables into their own section of docs/configuration.md.
    return names - {"FAL_RUN_HOST", "FAL_QUEUE_RUN_HOST", "FAL_PROXY_TEST_"}


def test_help_and_docs_document_every_variable_the_code_reads() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    readme = "\n".join(path.read_text(encoding="utf-8") for path in docs)
    read = variables_read_by_the_code()
    assert len(read) > 40  # the scan found the settings (it cannot pass on an empty set)
    for name in sorted(read):
        if name.startswith("FAL_PROXY_TEST_"):  # for tests only: in docs/testing.md, not --help
            assert name not in out.stdout, f"{name} is for tests, yet in --help"
        else:
            assert name in out.stdout, f"{name} is read but not in --help"
        assert f"`{name}" in readme, f"{name} is read but not in the README or docs/"
    assert "--host" in out.stdout and "--port" in out.stdout


@pytest.mark.parametrize("columns", ["80", "100", "250"])
def test_help_fits_100_columns_whatever_the_terminal(columns: str) -> None:
    out = run_cli("--help", COLUMNS=columns)
    assert out.returncode == 0
    wide = [line for line in out.stdout.splitlines() if len(line) > 100]
    assert not wide, wide


def test_a_busy_port_stops_the_proxy_and_the_demo_with_one_line() -> None:
    """Bound before anything starts: exit 2 and one line naming the setting, never uvicorn's
    "startup complete" followed by its own error."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proxy = run_cli("--port", port, FAL_KEY="sekrit-value",
                        FAL_PROXY_GATEWAY_URL="http://127.0.0.1:9/v1/a/g/fal")  # fmt: skip
        demo = run_cli("demo", "--port", port)
    for out, setting in ((proxy, "FAL_PROXY_PORT"), (demo, 'DEMO_ARGS="--port N"')):
        assert out.returncode == 2, out
        (line,) = out.stderr.strip().splitlines()
        assert f"cannot listen on 127.0.0.1:{port}" in line and setting in line, line
        assert "another process listens there" in line
        assert "startup complete" not in out.stdout + out.stderr


def test_check_says_what_an_empty_setting_means_and_shows_plans_readably() -> None:
    out = run_cli("check", FAL_KEY="sekrit-value", FAL_PROXY_GATEWAY_URL="http://h/v1/a/g/fal",
                  FAL_PROXY_QUOTAS="fal-ai/flux/*=50/day, *=500/month",
                  FAL_PROXY_RATE_LIMIT_RPM="0")  # fmt: skip
    assert out.returncode == 0, out
    text = out.stdout
    assert "access.allowed_apps = all fal apps (FAL_PROXY_ALLOWED_APPS unset)" in text
    assert "access.allowed_hosts = any Host" in text
    assert "access.plans = default: fal-ai/flux/*=50/day, *=500/month" in text
    assert "access.requests_per_minute = 0 (unlimited)" in text
    assert "(none)" not in text and "Plans(" not in text and "= None" not in text


def test_check_shows_prices_readably_and_a_bad_prices_file_stops_it(tmp_path: Path) -> None:
    env = {"FAL_KEY": "sekrit-value", "FAL_PROXY_GATEWAY_URL": "http://h/v1/a/g/fal"}
    out = run_cli("check", **env)
    assert out.returncode == 0 and "access.prices = none: spend is not counted" in out.stdout
    prices = tmp_path / "prices.toml"
    prices.write_text('[prices]\n"*" = 0.01\n"fal-ai/flux/dev" = 0.025\n', encoding="utf-8")
    out = run_cli("check", **env, FAL_PROXY_PRICES_FILE=str(prices))
    assert out.returncode == 0, out
    assert (
        f"access.prices = 2 patterns from {prices} (fal-ai/flux/dev $0.025/unit, * $0.01/unit)"
        in out.stdout
    )
    prices.write_text('[prices]\n"fal-ai/flux/dev" = -0.025\n', encoding="utf-8")
    for command in (("check",), ()):
        out = run_cli(*command, **env, FAL_PROXY_PRICES_FILE=str(prices))
        assert out.returncode == 2 and out.stdout == ""
        lines = out.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("fal-gateway-proxy: error: ")
        assert "FAL_PROXY_PRICES_FILE" in lines[0] and "fal-ai/flux/dev" in lines[0]


def test_check_probe_names_what_it_could_not_reach() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/a/g/fal"
    out = run_cli("check", "--probe", FAL_KEY="sekrit-value", FAL_PROXY_GATEWAY_URL=url,
                  FAL_PROXY_REDIS_URL=f"redis://:hunter2-pass@127.0.0.1:{port}/0")  # fmt: skip
    assert out.returncode == 1, out
    assert f"FAIL  gateway: {url} not reachable (ConnectError" in out.stdout
    assert "check FAL_PROXY_GATEWAY_URL" in out.stdout
    assert f"FAIL  redis: redis://:********@127.0.0.1:{port}/0 not reachable" in out.stdout
    assert "hunter2-pass" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "FAL_KEY"),
        ({"FAL_KEY": "sekrit-value"}, "CF_ACCOUNT_ID"),
        (
            {"FAL_KEY": "sekrit-value", "CF_ACCOUNT_ID": "xyz", "CF_GATEWAY_ID": "g"},
            "CF_ACCOUNT_ID",
        ),
        (
            {
                "FAL_KEY": "sekrit-value",
                "FAL_PROXY_GATEWAY_URL": "http://h/x",
                "FAL_PROXY_PORT": "x",
            },
            "FAL_PROXY_PORT",
        ),
    ],
)
def test_bad_configuration_exits_2_with_one_line_naming_the_variable(
    env: dict[str, str], variable: str
) -> None:
    out = run_cli(**env)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and variable in lines[0]
    assert lines[0].startswith("fal-gateway-proxy: error: ")
    assert "sekrit" not in out.stderr


def test_port_flag_overrides_the_environment() -> None:
    out = run_cli(
        "--port", "99999", FAL_KEY="k", FAL_PROXY_GATEWAY_URL="http://h/x", FAL_PROXY_PORT="8000"
    )
    assert out.returncode == 2 and "FAL_PROXY_PORT" in out.stderr


OPEN = {"FAL_KEY": "sekrit-value", "FAL_PROXY_GATEWAY_URL": "http://127.0.0.1:9/v1/a/g/fal"}


@pytest.mark.parametrize("command", [[], ["check"], ["--host", "0.0.0.0"]])
def test_open_auth_on_a_public_address_refuses_to_start_with_one_line(
    command: list[str],
) -> None:
    env = {**OPEN, "FAL_PROXY_PYTHON_SDK_PORT": "18443"}
    if "--host" not in command:
        env["FAL_PROXY_HOST"] = "0.0.0.0"
    out = run_cli(*command, "--port", "0", **env) if not command else run_cli(*command, **env)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fal-gateway-proxy: error: ")
    assert "FAL_PROXY_AUTH" in lines[0] and "FAL_PROXY_ALLOW_UNAUTHENTICATED" in lines[0]
    assert "sekrit" not in out.stderr


def test_the_opt_in_lets_check_pass_with_open_auth_on_a_public_address() -> None:
    out = run_cli("check", FAL_PROXY_HOST="0.0.0.0", FAL_PROXY_ALLOW_UNAUTHENTICATED="true",
                  **OPEN)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "configuration: valid" in out.stdout


def test_the_demo_still_listens_on_a_public_address() -> None:
    """The demo's key is a throwaway one only its emulator accepts: it opts in itself."""
    import json

    from tests.conftest import Process

    process = Process(
        [sys.executable, "-m", "proxy", "demo", "--host", "0.0.0.0", "--port", "0",
         "--time-scale", "0.05"],
        child_env(FAL_PROXY_LOG_FORMAT="json"),
    )  # fmt: skip
    try:
        line = process.wait_for_json(
            lambda r: r.get("event") == "listening" and r.get("role") == "proxy"
        )
        import httpx

        got = httpx.get(f"http://127.0.0.1:{line['port']}/healthz", trust_env=False, timeout=10)
        assert got.status_code == 200, json.dumps(line)
    finally:
        process.stop()


@pytest.mark.parametrize("command", [[], ["python-env"]])
def test_a_state_directory_others_can_write_stops_the_start_with_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    """Clients are told to trust the CA in FAL_PROXY_STATE_DIR: a directory others may write
    (here 0777) is refused by the proxy and by python-env alike, naming the variable, unless
    the operator says it is a volume only the pod's containers share."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    env = {"FAL_KEY": "k", "FAL_PROXY_GATEWAY_URL": "http://127.0.0.1:9/v1/a/g/fal",
           "FAL_PROXY_PORT": str(free_port()), "FAL_PROXY_PYTHON_SDK_PORT": str(free_port()),
           "FAL_PROXY_STATE_DIR": str(state)}  # fmt: skip
    refused = run_cli(*command, **env)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "FAL_PROXY_STATE_DIR" in line and "FAL_PROXY_STATE_DIR_TRUSTED" in line
    assert not (state / "ca.pem").exists()
    if command == ["python-env"]:  # trusted, it goes on, and finds no CA: it makes none
        trusted = run_cli(*command, **env, FAL_PROXY_STATE_DIR_TRUSTED="true")
        assert trusted.returncode == 2, trusted.stdout
        (line,) = trusted.stderr.strip().splitlines()
        assert f"no local CA in {state}: start the proxy first" in line
        assert not (state / "ca.pem").exists()
