"""Run the proxy with the collector's pauses and the event loop's lag timed, for experiments.

``STREAMS_PROXY_ARGV='[".venv/bin/python", "bench/gc_probe.py", "--port", "0"]'
bench/streams.py ...`` runs it as the streams rows' proxy. Per second of the proxy's life
(``per_sec``: [max loop lag ms (a 1 ms sleep, how late), ms in the collector, involuntary
context switches, CPU s, lags over 2 ms, major page faults]), per generation (collections,
ms, max ms), and every pause over 2 ms. The figures are written from the loop once a second
(that write shows as a few ms of lag once a second: read the lag around it).

GC_PROBE_OUT: the JSON file, rewritten every second. GC_PROBE: "" (as shipped), "off" (the
collector disabled after start-up), "thr:a,b,c" (these thresholds after tune_gc).
"""

import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import proxy.serve.server as server

mode = os.environ.get("GC_PROBE", "")
out = os.environ.get("GC_PROBE_OUT", "/tmp/gc_probe.json")
orig = server.tune_gc


def tune() -> None:
    orig()
    if mode == "off":
        gc.disable()
    elif mode.startswith("thr:"):
        gc.set_threshold(*map(int, mode[4:].split(",")))
    gc.callbacks.append(cb)
    import asyncio

    asyncio.get_running_loop().create_task(lag())
    dump()


async def lag() -> None:
    import asyncio

    while True:
        t1 = time.perf_counter()
        await asyncio.sleep(0.001)
        late = (time.perf_counter() - t1 - 0.001) * 1e3
        sec = int(time.monotonic() - t0)
        row = per_sec.setdefault(sec, [0.0, 0.0, 0, 0.0, 0])
        row[0] = max(row[0], late)
        if late > 2:
            row[4] += 1


per_sec = {}

stats = {
    g: {"n": 0, "ms": 0.0, "max": 0.0, "collected": 0, "over5": 0, "over1": 0} for g in range(3)
}
pauses = []
t = [0.0]
t0 = time.monotonic()


def cb(phase, info):
    if phase == "start":
        t[0] = time.perf_counter()
    else:
        ms = (time.perf_counter() - t[0]) * 1e3
        s = stats[info["generation"]]
        s["n"] += 1
        s["ms"] += ms
        s["max"] = max(s["max"], ms)
        s["collected"] += info["collected"]
        s["over5"] += ms > 5
        s["over1"] += ms > 1
        row = per_sec.setdefault(int(time.monotonic() - t0), [0.0, 0.0, 0, 0.0, 0])
        row[1] += ms
        if ms > 2:
            pauses.append((round(time.monotonic() - t0, 2), info["generation"], round(ms, 1)))


server.tune_gc = tune


def dump() -> None:
    """Every second, on the event loop itself: a thread of its own would take the GIL from
    the loop for as long as it writes (an earlier version did, and its own stalls of up to
    8 ms a second, idle or not, showed up as the loop's lag)."""
    import asyncio

    prev: list[tuple[int, float]] = []

    def tick() -> None:
        asyncio.get_running_loop().call_later(1, tick)
        try:
            st = Path("/proc/self/status").read_text()
            nv = int(st.split("nonvoluntary_ctxt_switches:")[1].split()[0])
            cpu = sum(os.times()[:2])
            majflt = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[9])
            sec = int(time.monotonic() - t0) - 1
            if prev:
                row = per_sec.setdefault(sec, [0.0, 0.0, 0, 0.0, 0])
                row[2] = nv - prev[0][0]
                row[3] = round(cpu - prev[0][1], 2)
                row.append(majflt - prev[0][2])
            prev[:] = [(nv, cpu, majflt)]
            with open(out + ".tmp", "w") as f:
                json.dump(
                    {
                        "mode": mode,
                        "stats": stats,
                        "pauses": pauses[-400:],
                        "threshold": gc.get_threshold(),
                        "counts": gc.get_count(),
                        "frozen": gc.get_freeze_count(),
                        "per_sec": {
                            k: [round(v[0], 1), round(v[1], 1), *v[2:]]
                            for k, v in sorted(per_sec.items())
                        },
                    },
                    f,
                )
            os.replace(out + ".tmp", out)
        except Exception:
            pass

    asyncio.get_running_loop().call_later(1, tick)


from proxy.cli import main  # noqa: E402 (after the patch)

raise SystemExit(main())
