"""A tiny PNG writer for the emulator's text-to-image apps.

The images are a deterministic pattern derived from the prompt and seed: enough for a
person to see that different prompts give different pictures, and for tests to check
real PNG bytes. Written with the standard library's zlib (a PNG is a signature plus
three chunks) rather than pulling an imaging library into the product for this.
"""

from __future__ import annotations

import hashlib
import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(width: int, height: int, rgb_rows: list[bytes]) -> bytes:
    """Encode 8-bit RGB rows (each ``3 * width`` bytes) as a PNG file."""
    raw = b"".join(b"\x00" + row for row in rgb_rows)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )


def render(prompt: str, seed: int, width: int, height: int) -> bytes:
    """A picture for ``prompt``: two blended colour gradients and soft rings, from a hash."""
    h = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    c1, c2, c3 = h[0:3], h[3:6], h[6:9]
    cx, cy = width * (0.2 + h[9] / 400), height * (0.2 + h[10] / 400)
    ring = 8 + h[11] % 24
    rows = []
    for y in range(height):
        row = bytearray(3 * width)
        for x in range(width):
            t = (x + y) / (width + height)
            d = int(((x - cx) ** 2 + (y - cy) ** 2) ** 0.5) // ring
            mix = c3 if d % 2 == 0 else (0, 0, 0)
            for i in range(3):
                base = c1[i] * (1 - t) + c2[i] * t
                row[3 * x + i] = int(base * 0.75 + mix[i] * 0.25) & 0xFF
        rows.append(bytes(row))
    return encode_png(width, height, rows)
