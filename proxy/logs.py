"""Logging: structlog, JSON lines off a terminal, readable console output on one.

The proxy writes one canonical line per request (event ``request``) and a few
lifecycle lines. Header values are never logged; target queries are logged with
their values redacted except for a few known-harmless parameters.
"""

from __future__ import annotations

import logging
import sys
from typing import Any
from urllib.parse import parse_qsl

import structlog

# Query parameters whose values carry no secret and help debugging.
_SAFE_QUERY_KEYS = frozenset({"logs", "storage_type"})


def configure_logging(log_format: str = "auto", level: str = "info", stream: Any = None) -> None:
    """Configure structlog (and route the stdlib loggers uvicorn uses through it)."""
    stream = stream or sys.stdout
    console = log_format == "console" or (log_format == "auto" and stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info if not console else _noop, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    # uvicorn and aiohttp log through the stdlib: give them the same format.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.getLevelName(level.upper()))


def _noop(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return event


def redact_query(query: str) -> str:
    """``a=1&fal_webhook=https…`` → ``a=[redacted]&fal_webhook=[redacted]``; keys kept."""
    if not query:
        return ""
    parts = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        shown = value if key in _SAFE_QUERY_KEYS and len(value) <= 16 else "[redacted]"
        parts.append(f"{key}={shown}" if value else key)
    return "&".join(parts)


def get_logger(name: str = "proxy") -> Any:
    return structlog.get_logger(name)
