"""fal storage, emulated: upload initiation (single and multipart), the signed-URL PUTs,
and the file URLs that serve the bytes back. Realtime tokens live here too: like upload
URLs, they are short-lived credentials the emulator hands out and later checks."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from .apps import Files

MIME_SUFFIX = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "audio/mpeg": ".mp3",
    "video/mp4": ".mp4",
    "application/json": ".json",
    "text/plain": ".txt",
}


@dataclass
class Upload:
    content_type: str
    file_name: str
    multipart: bool
    parts: dict[int, bytes] = field(default_factory=dict)


class Storage:
    def __init__(self, files: Files, rng: random.Random) -> None:
        self.files = files
        self.rng = rng
        self.uploads: dict[str, Upload] = {}
        self.tokens: dict[str, tuple[list[str], float]] = {}

    def initiate(self, body: bytes, base_url: str, *, multipart: bool) -> dict[str, str]:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        content_type = str(data.get("content_type") or "application/octet-stream")
        file_name = str(data.get("file_name") or "upload.bin")
        token = self._hex(8)
        self.uploads[token] = Upload(content_type, file_name, multipart)
        # The file URL is fixed now; it serves 404 until the bytes arrive. Percent-encoded, so a
        # name with a space, "#", "?" or non-ASCII is one path segment that matches as requested.
        name = quote(f"{token}-{file_name.rsplit('/', 1)[-1]}", safe="")
        self.uploads[token].file_name = name
        return {
            "upload_url": f"{base_url}/_emulator/uploads/{token}?signature=emulated",
            "file_url": f"{base_url}/_emulator/files/{name}",
        }

    def put(self, token: str, data: bytes) -> bool:
        upload = self.uploads.get(token)
        if upload is None or upload.multipart:
            return False
        self.files.items[upload.file_name] = (upload.content_type, data)
        del self.uploads[token]
        return True

    def put_part(self, token: str, number: int, data: bytes) -> dict[str, Any] | None:
        upload = self.uploads.get(token)
        if upload is None or not upload.multipart:
            return None
        upload.parts[number] = data
        return {"partNumber": number, "etag": f'"{self._hex(6)}"'}

    def complete(self, token: str, body: bytes) -> bool:
        upload = self.uploads.get(token)
        if upload is None or not upload.multipart:
            return False
        try:
            numbers = [int(p["partNumber"]) for p in json.loads(body)["parts"]]
        except (ValueError, KeyError, TypeError):
            return False
        if sorted(numbers) != sorted(upload.parts):
            return False
        data = b"".join(upload.parts[n] for n in sorted(numbers))
        self.files.items[upload.file_name] = (upload.content_type, data)
        del self.uploads[token]
        return True

    def _hex(self, nbytes: int) -> str:
        return f"{self.rng.getrandbits(8 * nbytes):0{2 * nbytes}x}"

    def issue_token(self, apps: list[str], lifetime: float) -> str:
        token = "emu." + self._hex(24)
        now = time.time()
        self.tokens = {t: v for t, v in self.tokens.items() if v[1] > now}  # drop expired ones
        self.tokens[token] = (apps, now + lifetime)
        return token

    def check_token(self, token: str, alias: str) -> bool:
        entry = self.tokens.get(token)
        return entry is not None and entry[1] > time.time() and alias in entry[0]
