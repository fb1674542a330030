"""``api.fal.ai``, emulated: fal's platform API, the two reads ``fal-gateway-proxy prices``
makes. Reached as fal itself (``/_fal/api.fal.ai/…`` or ``Host: api.fal.ai``), never through
the gateway, with fal's key (``authorization: Key …``), as every direct host.

* ``GET /v1/models``: ``{"models": [{"endpoint_id", "metadata": {…}}], "next_cursor",
  "has_more"}``, the emulator's apps (:data:`proxy.emulator.apps.CATALOGUE`), optionally only
  the ``endpoint_id`` values asked for (repeated, or comma-separated).
* ``GET /v1/models/pricing?endpoint_id=…`` (1 to 50 ids): ``{"prices": [{"endpoint_id",
  "unit_price", "unit", "currency"}], "next_cursor", "has_more"}`` from
  :data:`proxy.emulator.apps.PRICES`; an id without a price is left out.

Both page by ``limit`` and ``cursor`` (base64 of the page number, as fal's ``"Mg=="``). A page
holds at most :data:`PAGE_MAX` items, fewer than fal's, so that a client's paging is
exercised with the emulator's few apps.
"""

from __future__ import annotations

import base64
import binascii
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from .apps import CATALOGUE, PRICES
from .asgi import send_json
from .context import Call

PAGE_MAX = 4
MAX_IDS = 50


def _error(message: str, kind: str = "validation_error") -> dict[str, Any]:
    return {"error": {"type": kind, "message": message}}


async def serve_platform(ctx: Call, method: str, path: str, query: str) -> None:
    """A request for ``https://api.fal.ai<path>?<query>``."""
    if path.rstrip("/") not in ("/v1/models", "/v1/models/pricing"):
        await send_json(ctx.send, 404, _error("Not Found", "not_found"), ctx.headers)
        return
    if method != "GET":
        await send_json(
            ctx.send, 405, _error("Method Not Allowed", "method_not_allowed"), ctx.headers
        )
        return
    params = parse_qsl(query, keep_blank_values=True)
    ids = [i for k, v in params if k == "endpoint_id" for i in v.split(",") if i]
    args = dict(params)
    try:
        limit = min(int(args.get("limit", PAGE_MAX)), PAGE_MAX)
        page = int(base64.b64decode(args["cursor"], validate=True)) if "cursor" in args else 1
    except (ValueError, binascii.Error):
        await send_json(ctx.send, 400, _error("bad limit or cursor"), ctx.headers)
        return
    if limit < 1 or page < 1:
        await send_json(ctx.send, 400, _error("limit and cursor must be positive"), ctx.headers)
        return
    if path.rstrip("/") == "/v1/models":
        found = [i for i in CATALOGUE if not ids or i in ids]
        items: list[dict[str, Any]] = [_model(i) for i in found]
        key = "models"
    else:
        if not 1 <= len(ids) <= MAX_IDS:
            message = f"endpoint_id is required: 1 to {MAX_IDS} endpoint ids"
            await send_json(ctx.send, 400, _error(message), ctx.headers)
            return
        items = [_price(i) for i in dict.fromkeys(ids) if i in PRICES]
        key = "prices"
    start = (page - 1) * limit
    more = start + limit < len(items)
    cursor = base64.b64encode(str(page + 1).encode()).decode() if more else None
    answer = {key: items[start : start + limit], "next_cursor": cursor, "has_more": more}
    await send_json(ctx.send, 200, answer, ctx.headers)


def _model(endpoint_id: str) -> dict[str, Any]:
    return {
        "endpoint_id": endpoint_id,
        "metadata": {
            "display_name": endpoint_id.rsplit("/", 1)[-1],
            "category": "text-to-image" if endpoint_id != "emulator/echo" else "other",
            "status": "active",
            "model_url": f"https://fal.run/{endpoint_id}",
        },
    }


def _price(endpoint_id: str) -> dict[str, Any]:
    price, unit, currency = PRICES[endpoint_id]
    # A JSON number, as fal sends it (json.dumps writes a float's shortest text: 0.025).
    return {
        "endpoint_id": endpoint_id,
        "unit_price": float(Decimal(price)),
        "unit": unit,
        "currency": currency,
    }
