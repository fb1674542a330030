"""Fault-injection apps under ``emulator/…``: the awkward upstreams an app (or a proxy)
must survive, on demand. All are sync runs on ``fal.run`` paths.

==============================  =========================================================
``emulator/status/<code>``      answers ``<code>`` with a fal-shaped JSON error (422: a
                                ``ValidationError`` body; 504: a user timeout)
``emulator/text404``            404 with a ``text/plain`` body
``emulator/flaky?fail=N``       503 for the first N calls (per path; reset with the
                                recorder), then 200 ``{"attempt": k}``
``emulator/sse?n=3&gated=1``    SSE; event k > 1 is sent only once gate ``sse-k`` is
                                released; the last one is named ``done``
``emulator/audio?chunks=3``     ``audio/mpeg`` without content-length: chunk k is
                                :func:`audio_chunk` ``(k)``; unless ``gated=0``, chunk
                                k > 1 is sent only once gate ``audio-k`` is released
``emulator/bytes?size=N``       N bytes (a repeating 256 KiB pattern), with content-length
``emulator/sink``               reads the body, answers ``{"len", "sha256"}``
``emulator/gzip``               a gzip-compressed JSON body with content-encoding
``emulator/cookie``             sets a cookie; reports the cookie it received
``emulator/hop``                hop-by-hop response headers next to an end-to-end one
``emulator/notmodified``        304 that announces a content-length
``emulator/hang``               no answer until gate ``hang`` or the client leaves
``emulator/stall``              one SSE event, then nothing until gate ``stall`` or the
                                client leaves
``emulator/die``                promises 1000 bytes, sends 10, drops the connection
``emulator/noread``             never reads the request body (the sender's buffers fill)
==============================  =========================================================

A client leaving a waiting behaviour is noted as event ``disconnected:<gate>:<id>``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

from starlette.types import Receive, Send

from .asgi import end_body, send_json, send_raw, start_sse
from .recorder import Recorder

PATTERN = bytes(range(256)) * 1024  # 256 KiB


def pattern_block() -> bytes:
    """The block ``emulator/bytes`` repeats."""
    return PATTERN


# One MPEG-1 Layer III frame at 128 kbit/s, 44.1 kHz, no padding: a 4-byte header, 417 bytes in all.
MP3_FRAME_HEADER = b"\xff\xfb\x90\x64"
MP3_FRAME_BYTES = 417


def audio_chunk(index: int) -> bytes:
    """Chunk ``index`` (from 1) of ``emulator/audio``: one MP3-shaped frame whose payload (every
    byte value, shifted by the index) tells the chunks apart."""
    payload = bytes((index * 37 + k) % 256 for k in range(MP3_FRAME_BYTES - len(MP3_FRAME_HEADER)))
    return MP3_FRAME_HEADER + payload


async def until_released_or_gone(
    recorder: Recorder, gate: str, receive: Receive, request_id: str
) -> None:
    release = asyncio.ensure_future(recorder.gates[gate].wait())
    gone = asyncio.ensure_future(receive())
    done, pending = await asyncio.wait({release, gone}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    if gone in done:
        recorder.events.append(f"disconnected:{gate}:{request_id}")


async def serve_fault(
    name: str,
    args: dict[str, str],
    record: dict[str, Any],
    recorder: Recorder,
    receive: Receive,
    send: Send,
    headers: list[tuple[bytes, bytes]],
    request_id: str,
) -> bool:
    """Serve fault app ``name`` (the path after ``emulator/``); False if there is none."""
    kind, _, rest = name.partition("/")
    if kind == "status" and rest.isdigit():
        code = int(rest)
        detail: Any = "boom"
        if code == 422:
            detail = [
                {"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}
            ]
        extra = [(b"x-fal-request-timeout-type", b"user")] if code == 504 else []
        await send_json(send, code, {"detail": detail}, headers + extra)
    elif kind == "text404":
        await send_raw(send, 404, b"no such app", [(b"content-type", b"text/plain"), *headers])
    elif kind == "flaky":
        recorder.calls[record["path"]] += 1
        attempt = recorder.calls[record["path"]]
        if attempt <= int(args.get("fail", "2")):
            await send_json(send, 503, {"detail": "temporarily unavailable"}, headers)
        else:
            await send_json(send, 200, {"attempt": attempt}, headers)
    elif kind == "sse":
        count, gated = int(args.get("n", "3")), args.get("gated", "1") == "1"
        await start_sse(send, headers)
        for i in range(1, count + 1):
            if gated and i > 1:
                await recorder.gates[f"sse-{i}"].wait()
            name_line = "event: done\n" if i == count else ""
            await send(
                {
                    "type": "http.response.body",
                    "body": f'{name_line}data: {{"n": {i}}}\n\n'.encode(),
                    "more_body": True,
                }
            )
        await end_body(send)
    elif kind == "audio":
        count, gated = int(args.get("chunks", "3")), args.get("gated", "1") == "1"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"audio/mpeg"), *headers],
            }
        )
        for i in range(1, count + 1):
            if gated and i > 1:
                await recorder.gates[f"audio-{i}"].wait()
            await send({"type": "http.response.body", "body": audio_chunk(i), "more_body": True})
        await end_body(send)
    elif kind == "bytes":
        await _bytes(int(args.get("size", "0")), send, headers)
    elif kind == "sink":
        await send_json(
            send, 200, {"len": record["body_len"], "sha256": record["body_sha256"]}, headers
        )
    elif kind == "gzip":
        data = gzip.compress(json.dumps({"compressed": True, "pad": "x" * 2000}).encode())
        await send_raw(
            send,
            200,
            data,
            [(b"content-type", b"application/json"), (b"content-encoding", b"gzip"), *headers],
        )
    elif kind == "cookie":
        cookie = next((v for k, v in record["headers"] if k == "cookie"), "")
        await send_json(
            send,
            200,
            {"cookie_seen": cookie},
            [*headers, (b"set-cookie", b"session=secret-from-upstream; Path=/")],
        )
    elif kind == "hop":
        await send_json(
            send,
            200,
            {"ok": True},
            [
                *headers,
                (b"connection", b"x-custom-hop"),
                (b"x-custom-hop", b"1"),
                (b"keep-alive", b"timeout=5"),
                (b"alt-svc", b'h3=":443"'),
                (b"x-end-to-end", b"kept"),
            ],
        )
    elif kind == "notmodified":
        await send(
            {
                "type": "http.response.start",
                "status": 304,
                "headers": [(b"content-length", b"1234"), (b"etag", b'"v1"'), *headers],
            }
        )
        await end_body(send)
    elif kind == "hang":
        await until_released_or_gone(recorder, "hang", receive, request_id)
        await send_json(send, 200, {"released": True}, headers)
    elif kind == "stall":
        await start_sse(send, headers)
        await send({"type": "http.response.body", "body": b'data: {"n": 1}\n\n', "more_body": True})
        await until_released_or_gone(recorder, "stall", receive, request_id)
        await end_body(send)
    elif kind == "die":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"content-length", b"1000"),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
        raise ConnectionAbortedError("emulator/die: dropping the connection mid-body, as asked")
    else:
        return False
    return True


async def _bytes(size: int, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(size).encode()),
                *headers,
            ],
        }
    )
    sent = 0
    while sent < size:
        chunk = PATTERN[: min(len(PATTERN), size - sent)]
        sent += len(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": sent < size})
    if size == 0:
        await end_body(send)
