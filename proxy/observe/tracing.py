"""OpenTelemetry tracing, opt-in: spans over OTLP/HTTP when the standard ``OTEL_*`` variables
name an endpoint, nothing at all otherwise.

On only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set
(and ``OTEL_SDK_DISABLED`` is not ``true``). The official SDK reads every other variable
itself (sampler, headers, timeout, compression, resource); ``OTEL_SERVICE_NAME`` defaults to
``fal-gateway-proxy``. The SDK is the ``tracing`` extra, imported only when tracing is on:
off, this module imports nothing of it and the transports hold ``None`` (one ``is None``
test per phase of a call, no span objects, no context attached).

One call is a :class:`CallTrace`: a server span (``fal-gateway-proxy <route>``, kind
SERVER; the client's W3C ``traceparent``/``tracestate`` continued) with one child per phase,
one after the other: ``admission`` → ``upstream`` (the request sent, until the answer's
head: first byte; or the socket's handshake) → ``relay`` (the answer streamed back; or the
frames both ways). The upstream request carries the ``upstream`` span as its parent
(:func:`proxy.policy.headers.trace_headers`), so the gateway's own spans join the trace.
Spans carry the canonical log line's fields, never a secret: the caller only as its keyed
hash (the ``cf-aig-metadata`` tag), never its id, address or credential.

Spans go out in batches from the SDK's own export thread (``BatchSpanProcessor``); a
receiver that is down or slow drops spans, never delays or fails a call, and is reported
with one warning. Flushed, bounded, when the server shuts down.

May import: errors, policy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from .. import __version__
from ..policy.headers import trace_headers
from ..policy.metadata import CallerTags

if TYPE_CHECKING:  # the SDK is only imported when tracing is on
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

INSTALL_HINT = "pip install 'fal-gateway-proxy[tracing]'"
SERVICE_NAME = "fal-gateway-proxy"
SHUTDOWN_SECONDS = 3.0  # the most a shutdown waits for the last spans to go out

# The canonical line's fields under the names their spans use; the others as fal_proxy.<name>.
# caller and client_ip are left out: the caller travels only as its tag.
_RENAMED = {
    "method": "http.request.method",
    "status": "http.response.status_code",
    "fal_request_id": "fal.request_id",
    "cf_aig_log_id": "cf_aig_log_id",
    "error": "error.type",
}
_LEFT_OUT = frozenset({"caller", "client_ip"})


class TracingUnavailable(Exception):
    """An OTLP endpoint is set but the SDK is not installed (the ``tracing`` extra)."""


def endpoint_from_env(env: Mapping[str, str]) -> str | None:
    """Where spans go (the traces URL the SDK will post to), or None: tracing off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return traces
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if base:
        return base.rstrip("/") + "/v1/traces"
    return None


def endpoint_problem(url: str) -> str | None:
    """Why ``url`` cannot be an OTLP/HTTP endpoint at all (a start-up error naming the
    variable), or None. One that parses but answers nothing, or 404, only loses spans."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError as exc:
        return f"OTEL_EXPORTER_OTLP_ENDPOINT: not a URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return (f"OTEL_EXPORTER_OTLP_ENDPOINT: expected http(s)://host[:port], got "
                f"{shown_endpoint(url)!r}")  # fmt: skip
    return None


def shown_endpoint(url: str) -> str:
    """The endpoint as logs and ``check`` show it: no user info, no query (a token there)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port is not None else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "(an endpoint URL that does not parse)"


def header_secrets(env: Mapping[str, str]) -> list[str]:
    """The values of ``OTEL_EXPORTER_OTLP_HEADERS`` (and its traces form): API keys, often, to
    be redacted from every log line (:func:`proxy.observe.redaction.register_secret`)."""
    values = []
    for name in ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"):
        for item in env.get(name, "").split(","):
            _, eq, value = item.partition("=")
            if eq and value.strip():
                values += [value.strip(), unquote(value.strip())]
    return values


def describe(env: Mapping[str, str]) -> str:
    """One line for ``check``: on or off, and where to (the URL only, never the headers)."""
    endpoint = endpoint_from_env(env)
    if endpoint is None:
        return "tracing: off (set OTEL_EXPORTER_OTLP_ENDPOINT to export spans over OTLP/HTTP)"
    service = env.get("OTEL_SERVICE_NAME", "").strip() or SERVICE_NAME
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip() or "parentbased_always_on"
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    return (f"tracing: on, OTLP/HTTP to {shown_endpoint(endpoint)} (service {service}, "
            f"sampler {sampler}{' ' + arg if arg else ''})")  # fmt: skip


def missing_sdk(env: Mapping[str, str]) -> str | None:
    """Why tracing, asked for, cannot start (the SDK not installed), or None."""
    if endpoint_from_env(env) is None:
        return None
    import importlib.util

    for module in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return (f"OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not "
                    f"installed ({module}): {INSTALL_HINT}")  # fmt: skip
    return None


class _OneWarning(logging.Handler):
    """Where the SDK's own log records go (not to the root logger): the first warning becomes
    one line of ours, every later one is dropped (a receiver that is down would otherwise
    log once per batch, with a traceback). Spans are lost meanwhile; calls are not."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(logging.WARNING)
        self.endpoint = endpoint
        self.warned = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.warned:
            return
        self.warned = True
        from .logs import get_logger

        try:
            reason = record.getMessage()[:300]
        except Exception:
            reason = record.msg if isinstance(record.msg, str) else "unknown"
        get_logger("proxy.tracing").warning(
            "tracing_export_failed", endpoint=self.endpoint, reason=reason,
            hint="spans are dropped until the OTLP receiver answers; calls are not affected; "
            "this is said once",
        )  # fmt: skip


class Tracing:
    """Tracing on: the SDK's tracer and provider, and how a caller is tagged."""

    def __init__(self, provider: TracerProvider, tracer: Tracer, endpoint: str) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = tracer
        self.endpoint = endpoint
        self.tags: CallerTags | None = None  # the callers' keyed hashes (use_tags)
        self._propagator = TraceContextTextMapPropagator()
        self._in_context = trace.set_span_in_context
        self._server = SpanKind.SERVER
        self._client = SpanKind.CLIENT
        self._internal = SpanKind.INTERNAL

    def call(self, headers: Sequence[tuple[bytes, bytes]], name: str = SERVICE_NAME) -> CallTrace:
        """A call's trace: its server span, the client's ``traceparent`` continued."""
        carrier: dict[str, str] = {}
        for raw_name, value in headers:
            lname = raw_name.lower()
            if lname == b"traceparent" or lname == b"tracestate":
                carrier[lname.decode()] = value.decode("latin-1")
        parent = self._propagator.extract(carrier) if carrier else None
        span = self.tracer.start_span(name, context=parent, kind=self._server)
        trace = CallTrace(self, span)
        trace.phase("admission")
        return trace

    def use_tags(self, tags: CallerTags) -> None:
        """Tag callers as ``cf-aig-metadata`` does (the same keyed hash, so a span and the
        gateway's log rows match), except that ``FAL_PROXY_METADATA_CALLER=raw`` still gives
        spans only the hash: a trace never carries a caller's id. ``off``: no tag."""
        self.tags = None if tags.mode == "off" else CallerTags("hash", tags.key)

    def caller_tag(self, key: str | None) -> str | None:
        return None if key is None or self.tags is None else self.tags.tag(key)

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> None:
        """Send what is left, then stop the export thread; at most ``timeout`` seconds."""
        import threading

        done = threading.Thread(target=self._shutdown, args=(timeout,), daemon=True)
        done.start()
        done.join(timeout)

    def _shutdown(self, timeout: float) -> None:
        try:
            self.provider.force_flush(int(timeout * 1000))
            self.provider.shutdown()
        except Exception:  # spans lost at exit: never a failed shutdown
            pass


class CallTrace:
    """One call's spans: the server span and its current phase (each phase a child span;
    starting one ends the one before)."""

    __slots__ = ("_context", "_phase", "_tracing", "server")

    def __init__(self, tracing: Tracing, server: Span) -> None:
        self._tracing = tracing
        self.server = server
        self._context: Context | None = None
        self._phase: Span | None = None

    def phase(self, name: str, client: bool = False) -> Span:
        """End the phase running, if any, and start ``name`` (``client``: kind CLIENT)."""
        tracing = self._tracing
        if self._phase is not None:
            self._phase.end()
        if self._context is None:
            self._context = tracing._in_context(self.server)
        kind = tracing._client if client else tracing._internal
        span = tracing.tracer.start_span(name, context=self._context, kind=kind)
        self._phase = span
        return span

    def upstream(self, gateway: bool = True) -> list[tuple[str, str]]:
        """Start the ``upstream`` phase; the headers that make it the upstream's parent."""
        span = self.phase("upstream", client=True)
        context = span.get_span_context()
        return trace_headers(
            context.trace_id, context.span_id, sampled=context.trace_flags.sampled,
            tracestate=context.trace_state.to_header(), gateway=gateway,
        )  # fmt: skip

    def answered(self, status: int) -> None:
        """The upstream's answer began (its head: the first byte): ``relay`` from now on."""
        if self._phase is not None and self._phase.is_recording():
            self._phase.set_attribute("http.response.status_code", status)
        self.phase("relay")

    def event(self, name: str) -> None:
        """A moment of the running phase (the upload done, the first byte)."""
        if self._phase is not None:
            self._phase.add_event(name)

    def end(self, fields: Mapping[str, Any], *, status: int | None, caller_key: str | None = None,
            app: str | None = None) -> None:  # fmt: skip
        """End the running phase and the server span, with the canonical line's ``fields``.
        ``status``: the answer's (a socket's refusal; None for a session that opened). An
        answer of 500 or more, or a failure with no answer, is the span's error."""
        from opentelemetry.trace import Status, StatusCode

        server, phase = self.server, self._phase
        error = fields.get("error")
        failed = (status is not None and status >= 500) or (
            status is None and error is not None and error != "client_gone"
        )
        if phase is not None:
            if failed:
                phase.set_status(Status(StatusCode.ERROR, str(error or status)))
            phase.end()
            self._phase = None
        if server.is_recording():
            if route := fields.get("route"):
                server.update_name(f"{SERVICE_NAME} {route}")
            server.set_attributes(span_attributes(fields))
            if (tag := self._tracing.caller_tag(caller_key)) is not None:
                server.set_attribute("fal_proxy.caller_tag", tag)
            if app is not None:
                server.set_attribute("fal_proxy.app_pattern", app)
            if failed:
                server.set_status(Status(StatusCode.ERROR, str(error or status)))
        server.end()


def span_attributes(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical line's ``fields`` as span attributes (None dropped; caller and client
    address left out). Pure."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if value is None or name in _LEFT_OUT:
            continue
        if isinstance(value, list | tuple):
            value = [str(v) for v in value]
        elif not isinstance(value, str | bool | int | float):
            value = str(value)
        out[_RENAMED.get(name, "fal_proxy." + name)] = value
    return out


_active: Tracing | None = None


def active() -> Tracing | None:
    """The process's tracing (None: off), for the transports built after :func:`start`."""
    return _active


def start(env: Mapping[str, str] | None = None, log: Any = None) -> Tracing | None:
    """Turn tracing on if the environment names an OTLP endpoint; None (and nothing imported)
    otherwise. Raises :class:`TracingUnavailable` without the SDK installed."""
    global _active
    env = os.environ if env is None else env
    endpoint = endpoint_from_env(env)
    if endpoint is None:
        _active = None
        return None
    from .redaction import register_secret

    register_secret(*header_secrets(env))  # before the SDK can log anything
    problem = endpoint_problem(endpoint)
    if problem is not None:
        raise TracingUnavailable(problem)
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(
            f"OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not installed "
            f"({exc.name}): {INSTALL_HINT}"
        ) from None
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()  # fmt: skip
    if protocol != "http/protobuf" and log is not None:
        log.warning("tracing_protocol_ignored", protocol=protocol, used="http/protobuf",
                    setting="OTEL_EXPORTER_OTLP_PROTOCOL")  # fmt: skip
    attributes: dict[str, str] = {"service.version": __version__}
    named = "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not env.get("OTEL_SERVICE_NAME", "").strip() and not named:
        attributes["service.name"] = SERVICE_NAME
    register_secret(urlsplit(endpoint).password)  # (http://user:password@host)
    one_warning = _OneWarning(shown_endpoint(endpoint))
    for name in ("opentelemetry", "urllib3"):  # the SDK's export thread, and its HTTP client
        sdk_log = logging.getLogger(name)
        sdk_log.handlers = [one_warning]
        sdk_log.propagate = False
    try:
        exporter = OTLPSpanExporter()
    except Exception as exc:  # a malformed variable the SDK refuses
        raise TracingUnavailable(
            f"the OTEL_* variables do not configure an OTLP exporter: {type(exc).__name__}"
        ) from None
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracing = Tracing(provider, provider.get_tracer("fal-gateway-proxy", __version__), endpoint)
    if log is not None:
        log.info("tracing", endpoint=shown_endpoint(endpoint), exporter="otlp/http")
    _active = tracing
    return tracing
