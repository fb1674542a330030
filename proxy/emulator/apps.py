"""The emulator's fal apps: what a run of an endpoint id does.

* Text to image (``fal-ai/fast-sdxl``, ``fal-ai/flux/dev``, ``fal-ai/flux/schnell``,
  ``fal-ai/fast-lcm-diffusion``, and the workflow ``workflows/fal-ai/sdxl-sticker``, whose
  queue URLs keep the ``workflows/`` namespace): needs a non-empty ``prompt``; returns real
  PNGs drawn from the prompt and seed, served from the emulator's own ``/_emulator/files/``
  URLs.
* Echo (``emulator/echo``): returns its input as ``{"input": ...}``.

An unknown app answers 404 as fal does. Invalid input answers 422 with fal's
``{"detail": [{"loc", "msg", "type"}]}`` body, which the SDK turns into a
``ValidationError`` with ``fieldErrors``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any

from .png import render

IMAGE_SIZES = {
    "square": (512, 512),
    "square_hd": (512, 512),  # kept small: the emulator draws in pure Python
    "portrait_4_3": (384, 512),
    "portrait_16_9": (288, 512),
    "landscape_4_3": (512, 384),
    "landscape_16_9": (512, 288),
}


MAX_FILES = 1000


class InvalidInput(Exception):
    """Input that fails validation; ``errors`` are fal's ``detail`` items."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("invalid input")
        self.errors = errors


def field_error(name: str, msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", name], "msg": msg, "type": kind}


@dataclass
class Files:
    """Bytes the emulator serves at ``/_emulator/files/<name>``: generated images, uploads."""

    items: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def add(self, data: bytes, content_type: str, suffix: str) -> str:
        # Named by content and order: the same seed and inputs give the same URLs.
        name = f"{next(self.counter):06d}-{hashlib.sha256(data).hexdigest()[:12]}{suffix}"
        self.items[name] = (content_type, data)
        while len(self.items) > MAX_FILES:  # a long-running emulator forgets the oldest
            del self.items[next(iter(self.items))]
        return name


class App:
    """An emulated fal app. ``duration`` is its generation time at time scale 1."""

    duration = 1.0

    def validate(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise InvalidInput(
                [
                    {
                        "loc": ["body"],
                        "msg": "the input must be a JSON object",
                        "type": "type_error.dict",
                    }
                ]
            )
        return data

    def log_lines(self, data: dict[str, Any]) -> list[str]:
        return ["Starting", "Done"]

    async def run(
        self, data: dict[str, Any], files: Files, base_url: str, seed: int
    ) -> dict[str, Any]:
        raise NotImplementedError


class TextToImage(App):
    duration = 2.0

    def validate(self, raw: Any) -> dict[str, Any]:
        data = super().validate(raw)
        errors = []
        prompt = data.get("prompt")
        if prompt is None:
            errors.append(field_error("prompt", "field required", "value_error.missing"))
        elif not isinstance(prompt, str) or not prompt.strip():
            errors.append(
                field_error("prompt", "the prompt must be a non-empty string", "value_error")
            )
        size = data.get("image_size", "square")
        if isinstance(size, dict):
            w, h = size.get("width"), size.get("height")
            if not (
                isinstance(w, int) and isinstance(h, int) and 16 <= w <= 1024 and 16 <= h <= 1024
            ):
                errors.append(
                    field_error("image_size", "width and height must be 16-1024", "value_error")
                )
        elif size not in IMAGE_SIZES:
            errors.append(
                field_error(
                    "image_size", f"must be one of {', '.join(IMAGE_SIZES)}", "value_error.const"
                )
            )
        count = data.get("num_images", 1)
        if not isinstance(count, int) or not 1 <= count <= 4:
            errors.append(
                field_error("num_images", "must be an integer from 1 to 4", "value_error")
            )
        if "seed" in data and not isinstance(data["seed"], int):
            errors.append(field_error("seed", "must be an integer", "type_error.integer"))
        if errors:
            raise InvalidInput(errors)
        return data

    def log_lines(self, data: dict[str, Any]) -> list[str]:
        return [
            "Loading model (emulated)",
            "Encoding prompt",
            "Denoising step 1/4",
            "Denoising step 2/4",
            "Denoising step 3/4",
            "Denoising step 4/4",
            "Decoding image",
        ]

    async def run(
        self, data: dict[str, Any], files: Files, base_url: str, seed: int
    ) -> dict[str, Any]:
        size = data.get("image_size", "square")
        width, height = (
            (size["width"], size["height"]) if isinstance(size, dict) else IMAGE_SIZES[size]
        )
        seed = data.get("seed", seed)
        images = []
        for i in range(data.get("num_images", 1)):
            # Pure-Python drawing takes a few hundred ms: keep it off the event loop.
            png = await asyncio.to_thread(render, data["prompt"], seed + i, width, height)
            name = files.add(png, "image/png", ".png")
            images.append(
                {
                    "url": f"{base_url}/_emulator/files/{name}",
                    "width": width,
                    "height": height,
                    "content_type": "image/png",
                }
            )
        return {
            "images": images,
            "seed": seed,
            "prompt": data["prompt"],
            "has_nsfw_concepts": [False] * len(images),
            "timings": {"inference": self.duration},
        }


class Echo(App):
    duration = 0.5

    def validate(self, data: Any) -> Any:
        return data  # anything goes, even a non-object

    async def run(self, data: Any, files: Files, base_url: str, seed: int) -> dict[str, Any]:
        return {"input": data}


_TEXT_TO_IMAGE = TextToImage()
CATALOGUE: dict[str, App] = {
    "fal-ai/fast-sdxl": _TEXT_TO_IMAGE,
    "fal-ai/flux/dev": _TEXT_TO_IMAGE,
    "fal-ai/flux/schnell": _TEXT_TO_IMAGE,
    "fal-ai/fast-lcm-diffusion": _TEXT_TO_IMAGE,
    "workflows/fal-ai/sdxl-sticker": _TEXT_TO_IMAGE,
    "emulator/echo": Echo(),
}
# What fal's pricing API (api.fal.ai/v1/models/pricing, :mod:`proxy.emulator.fal_platform`)
# says a unit of each app costs: (unit price, unit, currency). The echo app is priced in EUR,
# to show a price that is not in US dollars.
PRICES: dict[str, tuple[str, str, str]] = {
    "fal-ai/fast-sdxl": ("0.01", "image", "USD"),
    "fal-ai/flux/dev": ("0.025", "megapixels", "USD"),
    "fal-ai/flux/schnell": ("0.003", "megapixels", "USD"),
    "fal-ai/fast-lcm-diffusion": ("0.0025", "image", "USD"),
    "workflows/fal-ai/sdxl-sticker": ("0.04", "image", "USD"),
    "emulator/echo": ("0.001", "request", "EUR"),
}


def find_app(path: str) -> tuple[str, App, str] | None:
    """``/fal-ai/flux/dev/stream`` → ``("fal-ai/flux/dev", app, "/stream")``; longest id wins."""
    parts = path.strip("/").split("/")
    for n in range(min(len(parts), 4), 1, -1):
        app_id = "/".join(parts[:n])
        if app_id in CATALOGUE:
            rest = "/".join(parts[n:])
            return app_id, CATALOGUE[app_id], f"/{rest}" if rest else ""
    return None


def find_queue_app(owner_alias: str) -> tuple[str, App] | None:
    """The SDK drops the sub-path on queue status calls: ``fal-ai/flux`` stands for
    ``fal-ai/flux/*``."""
    for app_id, app in CATALOGUE.items():
        if app_id == owner_alias or app_id.startswith(owner_alias + "/"):
            return app_id, app
    return None
