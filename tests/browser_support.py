"""What the browser tests need: Debian's Chromium, node, and the pinned npm packages."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SDK_DIR = Path(__file__).resolve().parent / "sdk"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_HINT = (
    "install Debian's Chromium: `apt-get update && apt-get install -y chromium` (.ci/run does it)"
)
NPM_HINT = "run `npm ci --prefix tests/sdk` (needs node >= 20 and npm)"


def require_browser_tools(packages: tuple[str, ...] = ("playwright-core",)) -> str:
    """Return the node binary; fail (never skip) without Chromium, node or the npm ``packages``."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} not found: {CHROMIUM_HINT}", pytrace=False)
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not on PATH; install Node.js >= 20, then {NPM_HINT}", pytrace=False)
    modules = SDK_DIR / "node_modules"
    for package in packages:
        if not (modules / package / "package.json").is_file():
            pytest.fail(f"{modules} has no {package}: {NPM_HINT}", pytrace=False)
    return node
