"""The command itself: --help, and start-up refusing bad configuration with one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from proxy.settings import DOCUMENTED_VARIABLES
from tests.conftest import ROOT, child_env


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_help_documents_every_setting() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for names, _, _ in DOCUMENTED_VARIABLES:
        for name in names.split(", "):
            assert name in out.stdout
    assert "--host" in out.stdout and "--port" in out.stdout


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
