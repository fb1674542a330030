"""fal's realtime msgpack frames cross the WebSocket bridge byte for byte, both ways.

The emulator's scripted socket (``emulator/ws/realtime``) echoes every frame verbatim,
keeping its type, so what the client gets back went client → proxy → emulator → proxy →
client unchanged. The frames are msgpack encodings a re-encoder would not reproduce
(non-minimal integer and length forms, float32, ext types, ``bin`` beside ``str``), so a
bridge that decoded and re-encoded, or sent them as text, would be caught.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack
from websockets.asyncio.client import connect

from tests.conftest import RunningProxy

SCRIPTED = "emulator/ws/realtime"
MiB = 1024 * 1024


def realtime_input(seed: int) -> bytes:
    """A frame shaped like fal's realtime input, as its JS client packs it."""
    return msgpack.packb({
        "request_id": f"3f2c9e4a-1b7d-4c55-9a0e-{seed:012d}",
        "prompt": "a photo of a cat wearing a tiny hat, studio lighting",
        "image_size": "square_hd",
        "num_inference_steps": 4,
        "seed": seed,
        "sync_mode": True,
    })  # fmt: skip


def unusual_frames() -> list[bytes]:
    return [
        b"\x80",  # {}
        b"\xd0\x01",  # int8 1: minimal would be the fixint 0x01
        b"\xcd\x00\x05",  # uint16 5
        b"\xd9\x03cat",  # str8 of 3 bytes: minimal would be fixstr
        b"\xde\x00\x01\xa1a\xca" + struct.pack(">f", 1.5),  # map16 of 1, float32
        b"\xc4\x04\x00\xff\x00\xff",  # bin8
        b"\xd6\x01" + b"\x00\x01\x02\x03",  # fixext4, type 1
        b"\xc7\x03\xff" + b"abc",  # ext8, type -1
        msgpack.packb({"image": bytes(range(256)) * 4096, "prompt": "x"}),  # 1 MiB bin32
    ]


def test_msgpack_frames_arrive_byte_for_byte(proxy: RunningProxy) -> None:
    url = proxy.url.replace("http://", "ws://", 1) + f"/{SCRIPTED}"
    frames = [realtime_input(i) for i in range(20)] + unusual_frames()

    async def go() -> list[Any]:
        async with connect(url, proxy=None, open_timeout=10, close_timeout=5,
                           max_size=4 * MiB) as ws:  # fmt: skip
            for frame in frames[:5]:  # one at a time
                await ws.send(frame)
                assert await asyncio.wait_for(ws.recv(), 10) == frame
            for frame in frames[5:]:  # then all in flight at once
                await ws.send(frame)
            return [await asyncio.wait_for(ws.recv(), 10) for _ in frames[5:]]

    back = asyncio.run(asyncio.wait_for(go(), 30))
    for sent, got in zip(frames[5:], back, strict=True):
        assert isinstance(got, bytes)  # still a binary frame
        assert got == sent  # the very bytes
    assert msgpack.unpackb(back[-1])["image"] == bytes(range(256)) * 4096
