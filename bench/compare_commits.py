#!/usr/bin/env python3
"""Compare the proxy's CPU per small request at two git revisions, in one run.

For a change that must not cost CPU (a reorganisation, say): "CPU per request within 5 %
of before", measured old and new side by side on the same host at the same moment.

Each revision is checked out with ``git worktree add --detach`` under /tmp (removed at the
end) and its proxy run from there (``PYTHONPATH=<worktree>``, ``python -P`` so that neither
the current directory nor the venv's editable install of /work/main wins; the child prints
``proxy.__file__`` first and the script checks it lies in that worktree). The load and the
configuration are those of ``bench/run.py``'s main "proxy" row: one process, JSON log line
per request, limits on in memory but never reached, default checks; ``wrk -t2 -c64``
POSTing ``{"prompt":"cat"}`` at the fast fake gateway of *this* checkout
(``bench/fast_gateway.py``). The proxies share CPU 0 (only the one under load is busy);
the gateway, ``wrk`` and this script run on the other CPU(s).

Every round starts both proxies afresh (2 s of warm-up load each) and stops them after:
one process per revision for the whole run would carry that process's own luck (hash
seed, memory layout) into every round (with ``--same-process``, which does that, one
commit against itself once came out 8.5 % apart in 12 rounds on the 2-core VM).
Rounds alternate old, new, old, new ...; each run is 1 s of warm-up load then
``--seconds`` measured, with the proxy's CPU time (utime + stime, /proc/<pid>/stat) over
wrk's request count. The table gives every round, then the medians, new/old, and the spread
(min-max of each side, and of the per-round ratios), a 90 % bootstrap interval of the
ratio, and a cross-check: the proxy's CPU over the fake gateway's, round by round.

How far to trust it: on the shared 2-core VM this was written on, single rounds swung by
±30 %, and whole 20-round runs of the same two commits gave new/old from 0.91 to 1.18.
One run does not settle a 5 % question there: run it several times (``--json``) and pool
the rounds, or count instructions (callgrind) for a figure the host's speed leaves alone.

Usage: ``.venv/bin/python bench/compare_commits.py [OLD [NEW]] [--rounds N] [--seconds S]
[--profile S] [--same-process] [--json PATH]`` (defaults: 6e329fd, HEAD, 10 rounds, 3 s:
about 3 minutes). ``--profile S`` afterwards samples each proxy with py-spy for S s under
the same load and prints the hottest frames of both (collapsed stacks in
/tmp/compare-<old|new>-<rev>.txt). Needs ``wrk``; Linux only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/ is sys.path[0]: run.py and its helpers are imported, not copied.
import run
from bench_common import (
    GATEWAY_PREFIX,
    ROOT,
    BenchError,
    Child,
    pin,
    proxy_row_env,
    start_child,
    step,
)
from wrk import LOAD_CONNECTIONS, LOAD_THREADS, run_wrk, small_load, wrk_script

DEFAULT_OLD = "6e329fd"
DEFAULT_NEW = "HEAD"
LIMIT = 0.05  # the acceptance rule: new within 5 % of old

# The child: say which ``proxy`` it imported, then run it as ``python -m proxy`` would.
CHILD = (
    "import json, runpy, proxy\n"
    "print(json.dumps({'event': 'compare_proxy_file', 'file': proxy.__file__}), flush=True)\n"
    "runpy.run_module('proxy', run_name='__main__', alter_sys=True)\n"
)


def git(*argv: str) -> str:
    out = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"git {' '.join(argv)}: {out.stderr.strip()}")
    return out.stdout.strip()


def add_worktree(rev: str, label: str, stack: contextlib.ExitStack) -> Path:
    """A detached worktree of ``rev`` under /tmp, removed when ``stack`` closes."""
    path = Path(tempfile.mkdtemp(prefix=f"fal-proxy-cmp-{label}-{rev[:8]}-"))
    path.rmdir()  # git worktree add wants to create it
    git("worktree", "add", "--detach", "--quiet", str(path), rev)

    def remove() -> None:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                       capture_output=True)  # fmt: skip
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)

    stack.callback(remove)
    return path


def start_proxy(label: str, tree: Path, env: dict[str, str], cpus: set[int],
                stack: contextlib.ExitStack) -> Child:  # fmt: skip
    """The proxy of ``tree`` (``--port 0``), pinned to ``cpus``, checked to import ``tree``."""
    child_env = dict(env, PYTHONPATH=str(tree))
    argv = [sys.executable, "-P", "-c", CHILD, "--port", "0"]
    child = start_child(f"proxy ({label})", argv, child_env, stack)
    pin(child.pid, cpus)
    imported = None
    for line in b"".join(child.tail).decode("utf-8", "replace").splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            record = json.loads(line)
            if record.get("event") == "compare_proxy_file":
                imported = Path(record["file"])
                break
    if imported is None or not imported.resolve().is_relative_to(tree.resolve()):
        raise BenchError(f"proxy ({label}) imported {imported}, not the worktree {tree}")
    step(f"proxy ({label}): pid {child.pid}, proxy.__file__ = {imported}")
    return child


def spread(values: list[float]) -> str:
    lo, hi, mid = min(values), max(values), statistics.median(values)
    return f"{lo:.0f}–{hi:.0f} (±{50 * (hi - lo) / mid:.1f}% of the median)"


def bootstrap_ratio(old: list[float], new: list[float], draws: int = 5000) -> tuple[float, float]:
    """A 90% interval of median(new) / median(old), resampling the rounds (old and new of a
    round together: they ran back to back, under the same spell of the host)."""
    rng = random.Random(0)
    pairs = list(zip(old, new, strict=True))
    ratios = []
    for _ in range(draws):
        sample = rng.choices(pairs, k=len(pairs))
        ratios.append(
            statistics.median(n for _, n in sample) / statistics.median(o for o, _ in sample)
        )
    ratios.sort()
    return ratios[int(0.05 * draws)], ratios[int(0.95 * draws) - 1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", nargs="?", default=DEFAULT_OLD, help="default %(default)s")
    parser.add_argument("new", nargs="?", default=DEFAULT_NEW, help="default %(default)s")
    parser.add_argument(
        "--rounds",
        type=int,
        default=10,
        metavar="N",
        help="runs of each revision, alternating (default 10, at least 4)",
    )
    parser.add_argument(
        "--seconds",
        type=int,
        default=3,
        metavar="S",
        help="measured seconds of load per run (default 3)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="S",
        help="afterwards, py-spy each proxy for S s under the same load",
    )
    parser.add_argument("--same-process", action="store_true",
                        help="one proxy process per revision for every round (default: fresh "
                             "processes each round, so that a process's own luck (hash seed, "
                             "memory layout) is averaged too)")  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results")
    args = parser.parse_args(argv)
    if args.rounds < 4:
        parser.error("--rounds must be at least 4")
    if args.seconds < 1:
        parser.error("--seconds must be at least 1")
    return args


def measure(args: argparse.Namespace, revs: dict[str, str], stack: contextlib.ExitStack
            ) -> dict[str, Any]:  # fmt: skip
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:  # as bench/run.py: the proxies on one CPU, the rest on the others
        proxy_cpus = {cpus[0]}
        os.sched_setaffinity(0, set(cpus[1:]))
        pinning = f"proxies on CPU {cpus[0]}; fake gateway, wrk on CPU {cpus[1:]}"
    else:
        proxy_cpus = set(cpus)
        pinning = "NOT pinned: one CPU"
    trees = {label: add_worktree(rev, label, stack) for label, rev in revs.items()}
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fal-proxy-cmp-")))
    script = tmp / "post.lua"
    script.write_text(wrk_script())

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FAL_", "CF_")) and k != "PYTHONPATH"}  # fmt: skip
    env["PYTHONUNBUFFERED"] = "1"
    gateway = start_child("fake gateway",
                          [sys.executable, str(ROOT / "bench" / "fast_gateway.py"), "--port", "0"],
                          env, stack)  # fmt: skip
    # The environment of bench/run.py's "proxy" row.
    proxy_env = proxy_row_env(env, f"http://127.0.0.1:{gateway.port}{GATEWAY_PREFIX}")

    def start_pair(within: contextlib.ExitStack) -> dict[str, Child]:
        """Both proxies, started afresh, each warmed up with 2 s of the load."""
        pair = {label: start_proxy(label, trees[label], proxy_env, proxy_cpus, within)
                for label in revs}  # fmt: skip
        time.sleep(0.5)
        for label, child in pair.items():
            step(f"{label} (pid {child.pid}): warm-up, 2 s")
            run_wrk(url(child), script, connections=LOAD_CONNECTIONS, threads=LOAD_THREADS,
                    seconds=2)  # fmt: skip
        return pair

    def url(child: Child) -> str:
        return f"http://127.0.0.1:{child.port}/fal-ai/x"

    proxies = start_pair(stack) if args.same_process else {}
    rounds: list[dict[str, Any]] = []
    for n in range(1, args.rounds + 1):
        with contextlib.ExitStack() as this_round:  # fresh processes: stopped after the round
            if not args.same_process:
                proxies = start_pair(this_round)
            row: dict[str, Any] = {"round": n}
            for label in revs:  # old, then new: alternating
                child = proxies[label]
                step(f"round {n}/{args.rounds}: {label} ({revs[label][:8]}), {args.seconds} s")
                stick = run.yardstick_ms(proxy_cpus)
                run_wrk(url(child), script, connections=LOAD_CONNECTIONS, threads=LOAD_THREADS,
                        seconds=1)  # fmt: skip
                result = small_load(url(child), script, {"proxy": child.pid,
                                                         "gateway": gateway.pid},
                                    connections=LOAD_CONNECTIONS, threads=LOAD_THREADS,
                                    seconds=args.seconds)  # fmt: skip
                result["yardstick_ms"] = stick
                result["pid"] = child.pid
                row[label] = result
                if child.proc.poll() is not None:
                    raise BenchError(f"proxy ({label}) exited:\n{child.output_tail()}")
            rounds.append(row)

    if args.profile and not args.same_process:
        proxies = start_pair(stack)
    profiles = {}
    if args.profile:
        for label in revs:
            step(f"profile: py-spy on the {label} proxy, {args.profile} s")
            try:
                profiles[label] = run.profile(
                    proxies[label],
                    url(proxies[label]),
                    script,
                    args.profile,
                    tmp.parent / f"compare-{label}-{revs[label][:8]}.txt",
                )
            except BenchError as exc:
                step(f"profile of {label} skipped: {exc}")
    return {"pinning": pinning, "rounds": rounds, "profiles": profiles,
            "files": {label: str(trees[label]) for label in revs}}  # fmt: skip


def report(args: argparse.Namespace, revs: dict[str, str], results: dict[str, Any]) -> int:
    rounds = results["rounds"]
    cpu = {label: [r[label]["proxy_cpu_us_per_req"] for r in rounds] for label in revs}
    rps = {label: [r[label]["req_per_s"] for r in rounds] for label in revs}
    ratios = [n / o for o, n in zip(cpu["old"], cpu["new"], strict=True)]
    med = {label: statistics.median(v) for label, v in cpu.items()}
    ratio = med["new"] / med["old"]
    subjects = {label: git("log", "-1", "--format=%h %s", revs[label])[:90] for label in revs}
    print(f"\n## Proxy CPU per small request: {revs['old'][:8]} (old) vs {revs['new'][:8]} (new)\n")
    print(f"- old: {subjects['old']}\n- new: {subjects['new']}")
    print(
        f'- wrk -t{LOAD_THREADS} -c{LOAD_CONNECTIONS}, POST {{"prompt":"cat"}}, '
        f"{args.seconds} s per run after 1 s of warm-up; "
        + (
            "one process per revision for all rounds"
            if args.same_process
            else "fresh proxy processes every round (2 s warm-up each)"
        )
        + f"; {results['pinning']}; "
        "bench/run.py's proxy row configuration (JSON log line, limits in memory).\n"
    )
    print(
        "| round | old µs/req | new µs/req | new/old | old req/s | new req/s "
        "| yardstick ms old / new |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r, q in zip(rounds, ratios, strict=True):
        o, n = r["old"], r["new"]
        print(f"| {r['round']} | {o['proxy_cpu_us_per_req']:.1f} | {n['proxy_cpu_us_per_req']:.1f} "
              f"| {q:.3f} | {o['req_per_s']:.0f} | {n['req_per_s']:.0f} "
              f"| {o['yardstick_ms']:.1f} / {n['yardstick_ms']:.1f} |")  # fmt: skip
    print(
        f"| **median** | **{med['old']:.1f}** | **{med['new']:.1f}** | **{ratio:.3f}** "
        f"| {statistics.median(rps['old']):.0f} | {statistics.median(rps['new']):.0f} | |"
    )
    verdict = abs(ratio - 1) <= LIMIT
    low, high = bootstrap_ratio(cpu["old"], cpu["new"])
    best = min(cpu["new"]) / min(cpu["old"])
    # A control: the fake gateway does the same work for both (same code, other CPU), so
    # the proxy's CPU over the gateway's, round by round, takes out a slow spell of the whole
    # VM (the two move together on a noisy host). Only a cross-check: the gateway's own CPU
    # per request also moves a little with the rate it is sent requests at.
    over_gw = {label: [r[label]["proxy_cpu_us_per_req"] / r[label]["gateway_cpu_us_per_req"]
                       for r in rounds] for label in revs}  # fmt: skip
    gw_ratio = statistics.median(over_gw["new"]) / statistics.median(over_gw["old"])
    gw_low, gw_high = bootstrap_ratio(over_gw["old"], over_gw["new"])
    if high <= 1 + LIMIT and low >= 1 - LIMIT:
        sure = "the whole interval is inside the limit"
    elif low > 1 + LIMIT or high < 1 - LIMIT:
        sure = "the whole interval is outside the limit"
    else:
        sure = "the interval reaches past the limit: more rounds, or a quieter host, to settle it"
    side = "" if verdict else (" (new is slower)" if ratio > 1 else " (new is faster)")
    print(
        f"\n- new/old of the medians: {ratio:.3f} ({100 * (ratio - 1):+.1f}%); 90% bootstrap "
        f"interval (rounds resampled in pairs) {low:.3f}–{high:.3f}; median of the per-round "
        f"ratios {statistics.median(ratios):.3f}, range {min(ratios):.3f}–{max(ratios):.3f}; "
        f"best round of each (noise only adds CPU): old {min(cpu['old']):.1f}, new "
        f"{min(cpu['new']):.1f}, new/old {best:.3f}."
        f"\n- cross-check, the proxy's CPU per request over the fake gateway's in the same run: "
        f"new/old {gw_ratio:.3f}, 90% interval {gw_low:.3f}–{gw_high:.3f}."
        f"\n- spread, µs/req: old {spread(cpu['old'])}; new {spread(cpu['new'])}."
        f"\n- within {100 * LIMIT:.0f}% (new/old of the medians): **{'yes' if verdict else 'NO'}**"
        f"{side}; {sure}."
    )
    for label, prof in results["profiles"].items():
        kind = "Python and native frames" if prof["native"] else "Python frames only"
        print(f"\n### py-spy, {label} ({revs[label][:8]}): {prof['samples']} samples, {kind}")
        for key in ("self", "total"):
            print(f"\n| # | {key} | % |\n|---:|---|---:|")
            for i, (frame, share) in enumerate(prof[key], 1):
                frame = frame.replace(results["files"][label] + "/", "")
                print(f"| {i} | `{frame}` | {share} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"revs": revs, "ratio": ratio, "interval": [low, high],
               "ratio_over_gateway": gw_ratio, "within_limit": verdict, **results}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        revs = {"old": git("rev-parse", "--verify", args.old + "^{commit}"),
                "new": git("rev-parse", "--verify", args.new + "^{commit}")}  # fmt: skip
    except BenchError as exc:
        print(f"compare_commits: {exc}", file=sys.stderr)
        return 2
    step(f"old {args.old} = {revs['old']}; new {args.new} = {revs['new']}")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # clean-up on these as on Ctrl-C
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    try:
        with contextlib.ExitStack() as stack:  # stops the children, removes the worktrees
            results = measure(args, revs, stack)
    except BenchError as exc:
        print(f"compare_commits: error: {exc}", file=sys.stderr)
        return 1
    return report(args, revs, results)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("compare_commits: interrupted", file=sys.stderr)
        sys.exit(130)
