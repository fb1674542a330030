"""What the emulator's behaviours share: its state (:class:`EmulatorState`: configuration,
recorder, files, queue, storage and the seeded id source) and one gateway request's context
(:class:`Call`), as handed from the gateway to the fal host that answers it."""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

from starlette.types import Receive, Scope, Send

from .apps import Files
from .asgi import Headers, base_url
from .config import EmulatorConfig
from .queue import Queue
from .recorder import Recorder
from .storage import Storage

BAD_JSON = object()  # what Call.json() returns for a body that is not JSON


class EmulatorState:
    """Everything the emulator keeps between requests. Ids follow ``config.seed``."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.recorder = Recorder(config.record_limit)
        self.files = Files()
        self.queue = Queue(config.seed + 2, config.time_scale)
        self.storage = Storage(self.files, random.Random(config.seed + 1))
        self.outage: int | None = None  # /_emulator/outage: the gateway's 5xx for every call

    def new_request_id(self) -> str:
        """fal's ``x-fal-request-id``: a UUID4 drawn from the seeded generator."""
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def new_log_id(self) -> str:
        """The gateway's ``cf-aig-log-id``, drawn from the same generator."""
        return f"01{self.rng.getrandbits(100):025X}"


class Call:
    """One gateway request's context, handed to the fal host behaviours."""

    __slots__ = ("base", "body", "headers", "receive", "record", "request_id", "send", "state")

    def __init__(
        self,
        state: EmulatorState,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: Headers,
        request_id: str,
        record: dict[str, Any],
        body: bytes,
    ) -> None:
        self.state, self.receive, self.send, self.headers = state, receive, send, headers
        self.request_id, self.record, self.body = request_id, record, body
        self.base = base_url(scope, state.config.public_url)

    def json(self) -> Any:
        """The body as JSON: ``{}`` when empty, :data:`BAD_JSON` when it is not JSON."""
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError:
            return BAD_JSON


def invalid_json_errors() -> list[dict[str, Any]]:
    """fal's 422 ``detail`` for a body that is not JSON."""
    return [{"loc": ["body"], "msg": "invalid JSON", "type": "value_error.jsondecode"}]
