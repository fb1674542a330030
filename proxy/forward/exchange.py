"""One forwarded request's state, and the fields of its canonical log line.

The forwarder (:mod:`proxy.forward.handler`), the upload (:mod:`proxy.forward.upload`) and
the response relay (:mod:`proxy.forward.relay`) each write what they learn here;
:meth:`Exchange.log_fields` turns it into the one line per request.
"""

from __future__ import annotations

import time
from typing import Any

from ..admission import Admitted
from ..errors import ProxyError
from ..limits.money import as_usd
from ..observe.logs import redact_query
from ..observe.tracing import CallTrace
from ..phases import Call
from ..policy.origins import cors_headers


class Exchange(Call):
    """One forwarded request's state, and the fields of its canonical log line."""

    __slots__ = (
        "billable_units",
        "body_error",
        "body_phase",
        "body_went_up",
        "bytes_in",
        "bytes_out",
        "cf_aig_log_id",
        "client_gone",
        "cors",
        "cost",
        "fal_request_id",
        "gateway_error",
        "generation",
        "host",
        "kind",
        "method",
        "path",
        "query",
        "request_policy",
        "response_done",
        "status",
        "trace",
        "ttfb",
        "units_counted",
        "upstream_seconds",
        "upstream_status",
    )  # fmt: skip

    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method
        self.kind: str | None = None
        self.host: str | None = None
        self.path: str | None = None
        self.query: str | None = None
        self.status: int | None = None
        self.upstream_status: int | None = None
        self.bytes_in = self.bytes_out = 0
        self.ttfb: float | None = None
        # The upstream round trip (request sent to last byte relayed), once it ran; None:
        # the call never went upstream (refused, or failed before).
        self.upstream_seconds: float | None = None
        self.fal_request_id: str | None = None
        self.cf_aig_log_id: str | None = None
        self.gateway_error: str | None = None
        self.body_error: ProxyError | None = None
        self.body_phase: str | None = None  # "receive" | "send" while a streamed body moves
        self.response_done = False
        self.client_gone = False
        # The whole request was handed to the upstream connection (fal may be running it,
        # answer or not): a budget keeps its estimate unless fal answers with a failure.
        self.body_went_up = False
        self.cors: list[tuple[bytes, bytes]] = []  # CORS headers for a listed cross-origin caller
        self.billable_units = 0.0  # fal's x-fal-billable-units on a success
        self.units_counted = False  # added to usage here (not a result fetched again)
        self.cost = 0  # what those units cost, in micro-dollars (0: no price)
        self.generation = False  # admitted as a call that can start a generation
        self.request_policy: list[str] | None = None  # what the plan's policy changed (names)
        self.trace: CallTrace | None = None  # its spans (OTEL_*): None, tracing off

    def record(self, admitted: Admitted) -> None:
        """Take what admission learned (the log line shows it even for a refusal)."""
        self.client_ip, self.caller, self.app = admitted.client_ip, admitted.caller, admitted.app
        self.cors = cors_headers(admitted.cors_origin) if admitted.cors_origin else []
        if (target := admitted.target) is not None:
            self.kind, self.host, self.path, self.query = (
                target.kind, target.host, target.path, target.query)  # fmt: skip

    def log_fields(self) -> dict[str, Any]:
        now = time.perf_counter()
        fields = {
            "request_id": self.request_id,
            "method": self.method,
            "route": self.kind,
            "target_host": self.host,
            "target_path": self.path,
            "target_query": redact_query(self.query) if self.query else None,
            "status": self.status,
            "upstream_status": self.upstream_status,
            "ttfb_ms": round(self.ttfb * 1000, 2) if self.ttfb is not None else None,
            "duration_ms": round((now - self.started) * 1000, 2),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }
        if self.billable_units:
            fields["billable_units"] = self.billable_units
        if self.cost:
            fields["cost_usd"] = as_usd(self.cost)
        for name in (
            "caller",
            "client_ip",
            "fal_request_id",
            "cf_aig_log_id",
            "error",
            "gateway_error",
            "request_policy",
            "via",
        ):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        return fields
