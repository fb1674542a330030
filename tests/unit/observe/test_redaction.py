"""Redaction of every log line: exact secrets and credential shapes, from any logger."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from proxy.observe.logs import configure_logging, get_logger
from proxy.observe.redaction import redact, register_header_names, register_secret

FAL = "fal-unit-SENTINEL:abcdef123"
register_secret(FAL, "Bearer cf-unit-SENTINEL-42")
register_header_names(["x-my-auth"])


@pytest.mark.parametrize(
    "line",
    [
        f"> authorization: Key {FAL}",
        "> cf-aig-authorization: Bearer cf-unit-SENTINEL-42",
        "> Sec-WebSocket-Protocol: proxy-authorization.caller-SECRET-1, v1",
        "> sec-websocket-protocol: Fal-Api-Key.caller-SECRET-1",
        "> x-my-auth: caller-SECRET-1",
        "> x-proxy-authorization: Bearer caller-SECRET-1",
        '127.0.0.1:5 - "WebSocket /fal-ai/x/realtime?fal_jwt_token=caller-SECRET-1&a=1" [accepted]',
        "GET /x?FAL_JWT_TOKEN=caller-SECRET-1 HTTP/1.1",
        "GET /x?fal%5Fjwt%5Ftoken=caller-SECRET-1 HTTP/1.1",
        "headers=[('authorization', 'Key caller-SECRET-1')]",
        "the raw key cf-unit-SENTINEL-42 in a message",
        f"the raw key {FAL} in a message",
        "GET /x?"
        + "keyk" * 4000
        + "&api_key=caller-SECRET-1 HTTP/1.1",  # long, hostile, still linear
    ],
)
def test_secrets_and_credential_shapes_are_redacted(line: str) -> None:
    out = redact(line)
    assert "SECRET" not in out and "SENTINEL" not in out, out
    assert "[redacted]" in out


def test_ordinary_lines_are_left_alone() -> None:
    line = '127.0.0.1:5 - "WebSocket /fal-ai/x/realtime?max_buffering=5" [accepted]'
    assert redact(line) == line


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_every_logger_and_traceback_is_redacted(fmt: str) -> None:
    # JSON lines go to the stream's bytes buffer, stdlib records to its text side.
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    stream.isatty = lambda: False  # type: ignore[method-assign]
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]  # process-wide: put back afterwards
    configure_logging(fmt, "debug", stream)
    try:
        logging.getLogger("websockets.client").debug("> %s: %s", "authorization", f"Key {FAL}")
        logging.getLogger("uvicorn.error").info(
            '"WebSocket /a?fal_jwt_token=%s" [accepted]', "caller-SECRET-2"
        )
        try:
            raise RuntimeError(f"failed with Key {FAL}")
        except RuntimeError:
            logging.getLogger("aiohttp.client").exception("boom")
            get_logger("proxy").exception("internal_error")
        get_logger("proxy").info("request", target_path=f"/x/{FAL}")
        logging.getLogger("uvicorn.error").error(
            "ASGI callable returned without completing response."
        )
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)
    text = stream.buffer.getvalue().decode()  # type: ignore[attr-defined]
    assert "SENTINEL" not in text and "caller-SECRET" not in text, text
    assert text.count("[redacted]") >= 5
    assert "without completing response" not in text  # expected, and logged on the request's line
    if fmt == "json":
        assert all(json.loads(line) for line in text.splitlines() if line.startswith("{"))
