"""fal's queue, emulated: submit, status (polling and SSE), result, cancel.

A job waits in the queue, runs, then completes, on a clock scaled by
``EmulatorConfig.time_scale``. Its state is computed from elapsed time when asked, so
nothing runs in the background; the result is produced once, on first need.

A test that must see a state, whatever the machine's speed, holds the queue
(``POST /_emulator/queue/hold``): a job submitted while it holds stops twice, IN_QUEUE and
then IN_PROGRESS before its first log line, and moves on only when the test says so
(``POST /_emulator/queue/release``, one stop per call); its clock runs from its last release.
Cancelling a held job needs no release: it is COMPLETED at once, as any cancelled job.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .apps import App, Files

QUEUE_WAIT = 1.0  # seconds in IN_QUEUE at time scale 1
QUEUE_URL = "https://queue.fal.run"
MAX_JOBS = 10_000
HELD_IN_QUEUE, HELD_RUNNING = 2, 1  # Job.held: the stops a held job has still ahead


@dataclass
class Job:
    request_id: str
    app_id: str
    owner_alias: str  # the URL prefix the SDK uses for status/result/cancel
    app: App
    data: Any
    submitted: float
    wait: float
    run: float
    logs: list[tuple[float, str]]
    cancelled: bool = False
    held: int = 0  # HELD_IN_QUEUE, HELD_RUNNING, or 0: on the clock
    result: dict[str, Any] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Wall clock minus monotonic clock, taken at submit: dates the (monotonic) times above.
    wall_offset: float = field(default_factory=lambda: time.time() - time.monotonic())

    def urls(self) -> dict[str, str]:
        base = f"{QUEUE_URL}/{self.owner_alias}/requests/{self.request_id}"
        return {
            "status_url": f"{base}/status",
            "response_url": base,
            "cancel_url": f"{base}/cancel",
        }

    def elapsed(self, now: float) -> float:
        """Time on the job's clock: stopped where a hold stops it."""
        if self.held == HELD_IN_QUEUE:
            return 0.0
        if self.held == HELD_RUNNING:
            return self.wait  # running, before any log line
        return now - self.submitted

    def release(self, now: float, *, fully: bool = False) -> None:
        """Move on from the stop the job is held at (``fully``: from every stop); its clock
        goes on from where it stood."""
        if self.held:
            stood = self.elapsed(now)
            self.held = 0 if fully else self.held - 1
            if not self.held:
                self.submitted = now - stood

    def state(self, now: float) -> str:
        elapsed = self.elapsed(now)
        if self.cancelled or elapsed >= self.wait + self.run:
            return "COMPLETED"
        return "IN_QUEUE" if elapsed < self.wait else "IN_PROGRESS"

    def status(self, now: float, with_logs: bool) -> dict[str, Any]:
        state = self.state(now)
        body: dict[str, Any] = {"status": state, "request_id": self.request_id, **self.urls()}
        if state == "IN_QUEUE":
            body["queue_position"] = 0
        if with_logs:
            shown = self.elapsed(now) - self.wait
            started = self.wall_offset + self.submitted + self.wait  # wall-clock start of the run
            body["logs"] = (
                [
                    {
                        "message": message,
                        "level": "INFO",
                        "source": "user",
                        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started + at)),
                    }
                    for at, message in self.logs
                    if at <= shown or state == "COMPLETED"
                ]
                if not self.cancelled
                else []
            )
        elif state != "IN_QUEUE":
            body["logs"] = None  # as fal: present, null (fal's Python client reads the key)
        if state == "COMPLETED":
            body["metrics"] = {"inference_time": self.run}
        return body


def owner_alias(app_id: str) -> str:
    """``fal-ai/flux/dev`` → ``fal-ai/flux``; a ``workflows/``/``comfy/`` prefix is kept."""
    parts = app_id.split("/")
    keep = 3 if parts[0] in ("workflows", "comfy") else 2
    return "/".join(parts[:keep])


class Queue:
    def __init__(self, seed: int, time_scale: float) -> None:
        self.rng = random.Random(seed)
        self.time_scale = time_scale
        self.jobs: dict[str, Job] = {}
        self.holding = False  # POST /_emulator/queue/hold: new jobs are held

    def submit(self, app_id: str, app: App, data: Any) -> Job:
        request_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        run = app.duration * self.time_scale
        lines = app.log_lines(data)
        logs = [(run * (i + 0.5) / len(lines), line) for i, line in enumerate(lines)]
        job = Job(
            request_id,
            app_id,
            owner_alias(app_id),
            app,
            data,
            time.monotonic(),
            QUEUE_WAIT * self.time_scale,
            run,
            logs,
            held=HELD_IN_QUEUE if self.holding else 0,
        )
        self.jobs[request_id] = job
        while len(self.jobs) > MAX_JOBS:  # a long-running emulator forgets the oldest
            del self.jobs[next(iter(self.jobs))]
        return job

    def release(self, *, fully: bool = False) -> list[Job]:
        """Move every held job on by one stop (``fully``: put it back on the clock)."""
        now, moved = time.monotonic(), [job for job in self.jobs.values() if job.held]
        for job in moved:
            job.release(now, fully=fully)
        return moved

    def reset(self) -> None:
        """Hold nothing any more, and let every held job go (``DELETE /_emulator/requests``)."""
        self.holding = False
        self.release(fully=True)

    def find(self, owner_alias_path: str, request_id: str) -> Job | None:
        job = self.jobs.get(request_id)
        if job is None or not (
            job.owner_alias == owner_alias_path or job.app_id == owner_alias_path
        ):
            return None
        return job

    async def result(self, job: Job, files: Files, base_url: str, seed: int) -> dict[str, Any]:
        async with job.lock:  # produced once, even if several clients ask at the same time
            if job.result is None:
                job.result = await job.app.run(job.data, files, base_url, seed)
            return job.result

    async def wait_for_change(self, job: Job, last: str | None, with_logs: bool) -> dict[str, Any]:
        """Block until the job's status (or its log count) differs from ``last``."""
        step = max(0.01, min(0.25, (job.wait + job.run) / 20))
        while True:
            status = self.status_key(job, with_logs)
            if status != last:
                return job.status(time.monotonic(), with_logs)
            await asyncio.sleep(step)

    @staticmethod
    def status_key(job: Job, with_logs: bool) -> str:
        body = job.status(time.monotonic(), with_logs)
        return f"{body['status']}:{len(body.get('logs') or [])}"
