"""fal's Python client (``fal-client``, pinned in the test extras), unmodified, in its own
process: ``python scenarios.py <scenario> [app]`` runs one scenario and prints one JSON line
of what the client returned or raised.

It is run by tests/e2e/test_python_sdk.py with nothing in its environment but ``PATH``,
an empty ``HOME`` and the lines ``fal-gateway-proxy python-env`` printed (plus a caller's
``FAL_KEY`` when the test says so): whatever reaches fal must come through the proxy.

The queue scenarios that must see a state get ``EMULATOR_URL`` too, for the emulator's own
control paths (never fal's): the test holds the queue (``POST /_emulator/queue/hold``), and
the scenario releases each held state once the client has seen it, so every state is seen
whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.request
from typing import Any

import fal_client
from fal_client.client import FalClientHTTPError

APP = "fal-ai/fast-sdxl"
STREAM_APP = "fal-ai/flux/dev"
REALTIME_APP = "fal-ai/fast-lcm-diffusion"
INPUT = {"prompt": "a cat"}


def status_name(status: Any) -> str:
    return type(status).__name__


def emulator(path: str, method: str = "POST") -> Any:
    """A control call to the emulator (``EMULATOR_URL``), straight, not through the proxy."""
    url = f"{os.environ['EMULATOR_URL']}/_emulator/{path}"
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as answer:
        return json.loads(answer.read())


def run() -> dict[str, Any]:
    return {"result": fal_client.run(APP, arguments=INPUT)}


def run_path() -> dict[str, Any]:
    # fal-ai/flux is the app, dev its path: https://fal.run/fal-ai/flux/dev
    return {"result": fal_client.run("fal-ai/flux", arguments=INPUT, path="dev")}


def subscribe() -> dict[str, Any]:
    """The job is held (by the test): released from Queued, then from InProgress, each once
    the client has reported it; ``released`` is what each release moved."""
    updates: list[dict[str, Any]] = []
    released: list[dict[str, str]] = []

    def on_update(status: Any) -> None:
        name = status_name(status)
        updates.append({"status": name, "logs": getattr(status, "logs", None)})
        if name in ("Queued", "InProgress") and [u["status"] for u in updates].count(name) == 1:
            released.append(emulator("queue/release")["released"])

    result = fal_client.subscribe(APP, arguments=INPUT, with_logs=True, on_queue_update=on_update)
    return {"result": result, "updates": updates, "released": released}


def submit_status_result() -> dict[str, Any]:
    handle = fal_client.submit(APP, arguments=INPUT)
    urls = {"status_url": handle.status_url, "response_url": handle.response_url,
            "cancel_url": handle.cancel_url}  # fmt: skip
    statuses = [status_name(s) for s in handle.iter_events(with_logs=True, interval=0.05)]
    last = handle.status(with_logs=True)
    result = handle.get()
    # The same request again, by id: the client builds these URLs from FAL_QUEUE_RUN_HOST.
    again = fal_client.result(APP, handle.request_id)
    return {"request_id": handle.request_id, "urls": urls, "statuses": statuses,
            "logs": last.logs, "result": result, "again": again}  # fmt: skip


def cancel() -> dict[str, Any]:
    handle = fal_client.submit(APP, arguments=INPUT)
    handle.cancel()
    status = handle.status()
    by_id = fal_client.status(APP, handle.request_id)
    return {"request_id": handle.request_id, "status": status_name(status),
            "by_id": status_name(by_id)}  # fmt: skip


def stream() -> dict[str, Any]:
    return {"events": list(fal_client.stream(STREAM_APP, arguments=INPUT))}


def realtime() -> dict[str, Any]:
    with fal_client.realtime(REALTIME_APP, use_jwt=False) as connection:
        connection.send(INPUT)
        first = connection.recv()
        connection.send({"prompt": 7})  # not a string: an x-fal-error frame comes back
        second = connection.recv()
    return {"result": first, "second": second}


def ws_connect() -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        import msgpack

        client = fal_client.AsyncClient()
        async with client.ws_connect(REALTIME_APP, use_jwt=False, path="/realtime") as ws:
            await ws.send(msgpack.packb(INPUT))
            return {"result": msgpack.unpackb(await ws.recv())}

    return asyncio.run(go())


def async_calls() -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        client = fal_client.AsyncClient()
        ran = await client.run(APP, arguments=INPUT)
        updates: list[str] = []
        subscribed = await client.subscribe(
            APP, arguments=INPUT, with_logs=True,
            on_queue_update=lambda status: updates.append(status_name(status)),
        )  # fmt: skip
        handle = await client.submit(APP, arguments=INPUT)
        statuses = [status_name(s) async for s in handle.iter_events(with_logs=True)]
        result = await handle.get()
        emulator("queue/hold")  # still in the queue when the cancel comes, however slow
        cancelled = await client.submit(APP, arguments=INPUT)
        emulator("queue/hold", "DELETE")
        await cancelled.cancel()
        cancelled_status = status_name(await cancelled.status())
        events = [event async for event in client.stream(STREAM_APP, arguments=INPUT)]
        async with client.realtime(REALTIME_APP, use_jwt=False) as connection:
            await connection.send(INPUT)
            realtime = await connection.recv()
        return {"run": ran, "subscribe": subscribed, "updates": updates,
                "statuses": statuses, "result": result, "events": len(events),
                "status_url": handle.status_url, "realtime": realtime,
                "cancelled": cancelled_status}  # fmt: skip

    return asyncio.run(go())


def invalid_input() -> dict[str, Any]:
    fal_client.run(APP, arguments={"prompt": 12})  # fal answers 422
    return {}


def refused_app() -> dict[str, Any]:
    fal_client.run(sys.argv[2], arguments=INPUT)
    return {}


SCENARIOS = {
    name: function
    for name, function in globals().items()
    if callable(function) and function.__module__ == __name__ and name not in (
        "status_name", "emulator", "main")
}  # fmt: skip


def main() -> None:
    try:
        out = SCENARIOS[sys.argv[1]]()
    except FalClientHTTPError as exc:
        out = {"http_error": exc.status_code, "message": exc.message,
               "request_id": exc.response_headers.get("x-proxy-request-id")}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
