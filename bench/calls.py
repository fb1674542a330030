#!/usr/bin/env python3
"""Python calls per small request: the proxy against the bare aiohttp forwarder, counted.

CPU per request swings ±20% on a shared VM; the number of Python-level calls a request makes
does not. Each forwarder (``python -m proxy`` as ``bench/run.py`` runs it, and
``bench/baselines.py`` with aiohttp) runs under ``cProfile`` while ``wrk -t2 -c64`` POSTs
``{"prompt":"cat"}`` through it at ``bench/fast_gateway.py`` for ``--seconds``; then the
calls are divided by wrk's requests. A coroutine's every resumption counts as a call, in
both. Prints both totals and the functions the proxy calls most beyond the bare forwarder
(calls per request, the proxy's and the difference): where a cut pays.

Usage: ``.venv/bin/python bench/calls.py [--seconds S] [--top N]``. Needs ``wrk``; Linux.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench_common import GATEWAY_PREFIX, ROOT, proxy_row_env, start_child
from wrk import LOAD_CONNECTIONS, LOAD_THREADS, run_wrk, wrk_script

# Run as the child: profile the forwarder until SIGUSR1, then write the stats and exit.
CHILD = """
import cProfile, os, signal, sys
profile = cProfile.Profile()
def stop(*_):
    profile.disable()
    profile.dump_stats(os.environ["CALLS_OUT"])
    os._exit(0)
signal.signal(signal.SIGUSR1, stop)
sys.argv = [sys.argv[0], "--port", "0"]
profile.enable()
if os.environ["CALLS_WHICH"] == "proxy":
    from proxy.cli import main
else:
    sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
    from baselines import main
main()
"""


def count(which: str, gateway_url: str, script: Path, seconds: int, out: Path,
          stack: contextlib.ExitStack) -> tuple[int, dict[str, int]]:  # fmt: skip
    """(wrk's requests, calls per function) for one forwarder under the load."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "CF_"))}
    env |= {
        "CALLS_WHICH": which, "CALLS_OUT": str(out), "PYTHONUNBUFFERED": "1",
        "BENCH_GATEWAY_URL": gateway_url, "BENCH_CLIENT": "aiohttp",
    }  # fmt: skip
    env = proxy_row_env(env, gateway_url)  # as bench/run.py's proxy row (the bare one ignores it)
    child = start_child(which, [sys.executable, "-c", CHILD], env, stack)
    url = f"http://127.0.0.1:{child.port}/fal-ai/x"
    load = {"connections": LOAD_CONNECTIONS, "threads": LOAD_THREADS, "seconds": seconds}
    result = run_wrk(url, script, **load)
    os.kill(child.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while child.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    calls: dict[str, int] = {}
    stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    for (path, _line, name), (_primitive, n, *_rest) in stats.items():
        where = path.split("site-packages/")[-1].replace(f"{ROOT}/", "")
        where = where.split("/lib/python3")[-1] if "/lib/python3" in where else where
        calls[f"{where}:{name}"] = calls.get(f"{where}:{name}", 0) + n
    return result["requests"], calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="of load per forwarder")
    parser.add_argument("--top", type=int, default=30, help="functions listed")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fal-proxy-calls-")))
        script = tmp / "post.lua"
        script.write_text(wrk_script())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "CF_"))}
        gateway = start_child("fake gateway", [sys.executable, str(ROOT / "bench" /
                              "fast_gateway.py"), "--port", "0"], env, stack)  # fmt: skip
        gateway_url = f"http://127.0.0.1:{gateway.port}{GATEWAY_PREFIX}"
        per: dict[str, dict[str, float]] = {}
        for which in ("bare", "proxy"):
            requests, calls = count(which, gateway_url, script, args.seconds,
                                    tmp / f"{which}.prof", stack)  # fmt: skip
            per[which] = {name: n / requests for name, n in calls.items()}
            total = sum(calls.values()) / requests
            print(f"{which}: {total:.0f} Python calls per request ({requests} requests; "
                  "start-up included, spread over them)")  # fmt: skip
    bare, proxy = per["bare"], per["proxy"]
    extra = sorted(proxy, key=lambda name: bare.get(name, 0.0) - proxy[name])
    print("\n| calls per request (proxy) | beyond the bare forwarder | function |\n|---:|---:|---|")
    for name in extra[: args.top]:
        print(f"| {proxy[name]:.1f} | +{proxy[name] - bare.get(name, 0.0):.1f} | `{name}` |")


if __name__ == "__main__":
    main()
