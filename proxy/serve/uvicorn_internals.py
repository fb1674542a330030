"""Everything the proxy reads or wraps of uvicorn's internals, named in one place and checked
once at start-up, so that a uvicorn that changed them stops the proxy with one line (exit 2)
instead of failing mid-request.

Two optimisations rely on them, each measured (``make bench``, docs/benchmarks.md):

* **The body already in hand** (:func:`body_in_hand`): uvicorn's ``receive`` is its request
  cycle's bound method, and ``more_body`` is False once the whole body has arrived (the usual
  small JSON). Then the forwarder reads the body's first message without arming an idle
  timer (``asyncio.timeout``, ~6 µs of a small request's CPU). Without it the forwarder
  always arms the timer: right on any server, a little slower.
* **The guarded protocol** (:mod:`proxy.serve.protocol`): the request-head deadline, the
  refusal of malformed heads, and a response's writes gathered into one ``writev``
  (two ``send()`` syscalls were ~5 % of a small request's CPU each). It subclasses
  ``HttpToolsProtocol`` and reads or replaces attributes of it and of its request cycle;
  it also tells the forwarder when a client leaves mid-call
  (:func:`proxy.serve.protocol.on_client_lost`), which then needs no task per request
  waiting for ``http.disconnect``.
"""

from __future__ import annotations

import inspect
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from ..config.envvars import SettingsError

# Attributes their __init__ sets, and methods the proxy calls or overrides.
CYCLE_ATTRIBUTES = (
    "more_body", "transport", "response_complete", "disconnected", "message_event", "flow",
)  # fmt: skip
CYCLE_METHODS = ("receive",)
PROTOCOL_ATTRIBUTES = ("cycle", "parser", "url", "headers", "loop", "transport", "client")
PROTOCOL_METHODS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_headers_complete",
    "on_response_complete",
    "shutdown",
    "timeout_keep_alive_handler",
    "send_400_response",
)


def missing() -> list[str]:
    """What the proxy relies on that this uvicorn lacks ("Class.name"), empty when all is there."""
    gone = []
    for cls, attributes, methods in (
        (RequestResponseCycle, CYCLE_ATTRIBUTES, CYCLE_METHODS),
        (HttpToolsProtocol, PROTOCOL_ATTRIBUTES, PROTOCOL_METHODS),
    ):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):  # no source shipped: cannot tell, so do not trust it
            source = ""
        gone += [f"{cls.__name__}.{a}" for a in attributes if f"self.{a} =" not in source]
        gone += [f"{cls.__name__}.{m}" for m in methods if not callable(getattr(cls, m, None))]
    return gone


def check_uvicorn() -> None:
    """Raise SettingsError (the CLI exits 2 with its one line) if uvicorn changed what the
    proxy relies on."""
    gone = missing()
    if gone:
        raise SettingsError(
            f"uvicorn {uvicorn.__version__} lacks what the proxy relies on "
            f"({', '.join(gone)}): install the uvicorn version pyproject.toml pins"
        )


def body_in_hand(receive: Any) -> bool:
    """Whether uvicorn already holds the request's whole body, so ``receive()`` answers at
    once (checked by :func:`check_uvicorn` at start-up)."""
    cycle = getattr(receive, "__self__", None)
    return isinstance(cycle, RequestResponseCycle) and cycle.more_body is False
