"""Running a server: uvicorn configured as the proxy needs it, one process.

The guarded HTTP protocol (:mod:`proxy.serve.protocol`), uvloop, the WebSocket settings,
the drain on SIGTERM (bridged sockets closed with 1001, ``/readyz`` answering 503), the
listening line, a cheaper garbage collector and the open-files limit. :mod:`proxy.serve.workers`
runs several of these under one supervisor.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import gc
import os
import signal
import socket
import ssl
import sys
import warnings
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from .. import __version__
from ..config.settings import Settings

PROG = "fal-gateway-proxy"
# Longest wait for a TLS client's close_notify once its answer is sent (asyncio's default: 30 s).
TLS_SHUTDOWN_SECONDS = 5.0


# The collector's thresholds (tune_gc). Generation 0 is collected after 5,000 more tracked
# objects allocated than freed, generation 1 after 4 of those, generation 2 (the whole heap)
# after 400 of the latter (and only once the objects promoted since the last full collection
# exceed a quarter of the heap): the same 8 million net allocations between full collections
# as the former (20_000, 20, 20), with a generation 1 of at most 20,000 survivors, not 400,000.
GC_THRESHOLDS = (5_000, 4, 400)


def tune_gc() -> None:
    """Make the cyclic garbage collector cheaper for a long-running proxy.

    Everything alive after start-up (modules, the app, the session) is moved out of
    the collector's sight, and the youngest generation is collected less often than by
    default: each request allocates a few hundred short-lived objects, and the default
    threshold of 700 ran a collection every couple of requests (about 7% of CPU under
    load, measured with py-spy; see bench/). Reference counting still frees almost
    everything at once.

    A collection walks every tracked object of its generations that is still alive, and
    while streams open, their objects all are: a pause grows with the generation's size.
    With (20_000, 20, 20), opening 8,000 SSE streams ran generation-1 collections of
    up to 400,000 objects, 290-410 ms each, every event of every open stream waiting
    behind them; with ``GC_THRESHOLDS`` the longest was 32 ms (docs/design.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def raise_open_files_limit(log: Any) -> None:
    """Raise the soft open-files limit to the hard one and say, in one line, how many
    concurrent streams that allows (:mod:`proxy.serve.open_files`)."""
    from .open_files import log_open_files, raise_open_files

    log_open_files(log, raise_open_files())


def bind_socket(
    host: str, port: int, *, shared: bool = False, setting: str | None = None
) -> socket.socket:
    """Bind before building the app, so the port (with --port 0) is known to it.

    ``shared``: for several workers, with SO_REUSEPORT (where the system has it), so that
    each worker can listen on a socket of its own on that port (:func:`worker_socket`).
    Never for one process: a second proxy started by mistake on the same port would
    quietly take half of the connections instead of failing to start. ``setting``: the
    variable that chose the address, named in the one-line error.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared and hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        named = f" ({setting})" if setting else ""
        busy = (
            ": another process listens there; stop it or choose another port"
            if exc.errno == errno.EADDRINUSE
            else ""
        )
        print(
            f"{PROG}: error: cannot listen on {host}:{port}{named}: {exc.strerror or exc}{busy}",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    sock.set_inheritable(True)
    return sock


class ProxyServer(uvicorn.Server):
    """uvicorn's server with the proxy's start and shutdown steps."""

    def __init__(
        self, config: uvicorn.Config, app: ASGIApp, on_listening: Any,
        tls: tuple[int, ssl.SSLContext, float] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(config)
        self.proxy_app = app
        self.on_listening = on_listening
        # (port, context, handshake timeout): the one socket served with TLS
        self.tls = tls

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        from ..observe.logs import LineWriter

        LineWriter.attach_current(asyncio.get_running_loop())  # log lines: a write per turn
        try:
            await super().serve(sockets)
        finally:
            LineWriter.detach_current()

    async def shutdown(self, sockets: Any = None) -> None:
        # uvicorn would fail open sockets with 1012; bridged sessions get a proper 1001.
        from ..app.routing import ProxyApp

        app = self.proxy_app
        if isinstance(app, ProxyApp):
            app.draining.set()  # /readyz answers 503 from now on
            await app.close_sockets()
        await super().shutdown(sockets)
        from ..observe.tracing import active

        if (tracing := active()) is not None:  # the last spans out, bounded (3 s)
            await asyncio.to_thread(tracing.shutdown)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's ssl setting would apply to every socket: the TLS one is served here, by
        # the same protocol, app and lifespan (so one drain covers it).
        tls_port = self.tls[0] if self.tls is not None else None
        plain = [s for s in sockets or [] if s.getsockname()[1] != tls_port]
        secure = [s for s in sockets or [] if s.getsockname()[1] == tls_port]
        await super().startup(plain if sockets is not None else None)
        if secure and self.tls is not None and not self.should_exit:
            config = self.config
            protocol = functools.partial(
                config.http_protocol_class,  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
            )
            loop = asyncio.get_running_loop()
            for sock in secure:
                server = await loop.create_server(
                    protocol, sock=sock, ssl=self.tls[1], backlog=config.backlog,
                    # A client that connects and never finishes the handshake is a slow
                    # header sender too: the same deadline (else asyncio's 60 s).
                    ssl_handshake_timeout=self.tls[2],
                    # And one that never answers our close_notify after its answer: asyncio
                    # would hold the connection (socket, buffers, a drain slot) 30 s; the
                    # answer is already delivered, so a short bound loses nothing.
                    ssl_shutdown_timeout=min(self.tls[2], TLS_SHUTDOWN_SECONDS),
                )  # fmt: skip
                self.servers.append(server)
        tune_gc()
        for server in self.servers:
            for bound in server.sockets:
                host, bound_port = bound.getsockname()[:2]
                self.on_listening(host, bound_port)


def uvicorn_server(
    app: ASGIApp,
    settings_host: str,
    port: int,
    on_listening: Any,
    ws_max_bytes: int = 16 * 1024 * 1024,
    drain_seconds: float = 10.0,
    header_timeout: float | None = None,
) -> ProxyServer:
    """The server every process runs: the proxy (alone or as each worker), demo, emulator."""
    from .protocol import guarded_protocol

    # The "websockets" implementation is deprecated, but its replacement (websockets-sansio,
    # uvicorn 0.54) logs an error after every refused upgrade: see the ws= setting below. Say
    # so once here rather than warn every operator at every start.
    warnings.filterwarnings("ignore", message="The `websockets` implementation is deprecated")

    config = uvicorn.Config(
        app,
        host=settings_host,
        port=port,
        loop="uvloop",
        # The proxy's own servers refuse malformed heads and slow header senders.
        http=guarded_protocol(header_timeout) if header_timeout is not None else "httptools",
        lifespan="on",
        log_config=None,  # structlog owns logging
        access_log=False,  # the forwarder writes its own canonical line
        server_header=False,  # the upstream's headers pass through, not ours
        date_header=False,
        proxy_headers=False,  # X-Forwarded-For is not trusted by default
        # On SIGTERM: stop accepting, let in-flight requests and streams finish for up to this
        # long (uvicorn closes idle keep-alive connections at once), then cut what is left.
        # uvicorn annotates it int, but hands it to asyncio.wait_for, which takes seconds as a
        # float: FAL_PROXY_DRAIN_SECONDS=2.5 means 2.5 s.
        timeout_graceful_shutdown=drain_seconds,  # type: ignore[arg-type]
        # The legacy implementation, deprecated: "websockets-sansio" (uvicorn 0.54) logs an error
        # after every refusal sent as websocket.http.response, which the bridge relies on.
        ws="websockets",
        ws_max_size=ws_max_bytes,  # the same limit the bridge sets on the upstream side
        ws_ping_interval=20,
        ws_ping_timeout=20,
    )
    return ProxyServer(config, app, on_listening)


def exit_cleanly_on_signals() -> None:
    # uvicorn handles SIGTERM/SIGINT itself (graceful shutdown), then re-raises the signal to
    # whatever handler was there before; make that a clean exit, so a drained shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)


def ignore_sighup() -> None:
    """SIGHUP asks the proxy to re-read its files (:mod:`proxy.app.config_reload`, whose handler
    the app installs when it starts); until then it is ignored, not the default exit."""
    import threading

    if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def run_uvicorn(
    app: ASGIApp,
    settings_host: str,
    sock: socket.socket | None,
    port: int,
    on_listening: Any,
    ws_max_bytes: int = 16 * 1024 * 1024,
    drain_seconds: float = 10.0,
    header_timeout: float | None = None,
) -> None:
    server = uvicorn_server(
        app, settings_host, port, on_listening, ws_max_bytes, drain_seconds, header_timeout
    )
    exit_cleanly_on_signals()
    server.run(sockets=[sock] if sock is not None else None)


def _exit_cleanly(_signum: int, _frame: Any) -> None:
    raise SystemExit(0)


def proxy_sockets(settings: Settings, *, shared: bool = False) -> list[socket.socket]:
    """The sockets the server listens on, bound here before anything starts (a busy port is
    one line naming the setting, exit 2, not uvicorn's traceback after "startup complete"):
    the public port, then ``FAL_PROXY_METRICS_PORT`` and ``FAL_PROXY_PYTHON_SDK_PORT`` if
    set (the app tells them apart by the local port). ``shared``: for several workers.

    The metrics port listens on ``FAL_PROXY_METRICS_HOST`` (loopback by default), not on the
    public address: it answers any caller's plan and usage."""
    metrics, python = settings.metrics_port, settings.python_sdk.port
    sockets = [bind_socket(settings.host, settings.port, shared=shared,
                           setting="FAL_PROXY_PORT / FAL_PROXY_HOST")]  # fmt: skip
    if metrics is not None:
        sockets.append(bind_socket(settings.metrics_host, metrics, shared=shared,
                                   setting="FAL_PROXY_METRICS_HOST"))  # fmt: skip
    if python is not None:
        sockets.append(bind_socket(settings.host, python, shared=shared,
                                   setting="FAL_PROXY_PYTHON_SDK_PORT"))  # fmt: skip
    return sockets


def worker_socket(shared: socket.socket) -> socket.socket:
    """A worker's own socket on the address of ``shared`` (bound by the supervisor with
    SO_REUSEPORT, never listened on), which it then closes.

    On one socket shared by every worker, the kernel wakes them all for a new connection
    and the first awake (uvloop accepts until the queue is empty) takes the whole burst:
    64 connections opened at once all went to one of two workers, and the second core sat
    idle (bench/scaling.py). With a listening socket each, the kernel spreads connections
    between them by their addresses. Where SO_REUSEPORT is missing, the shared one is used.
    """
    if not hasattr(socket, "SO_REUSEPORT") or not shared.getsockopt(
        socket.SOL_SOCKET, socket.SO_REUSEPORT
    ):
        return shared
    own = socket.socket(shared.family, socket.SOCK_STREAM)
    own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        own.bind(shared.getsockname()[:2])
    except OSError:
        own.close()
        return shared
    shared.close()
    return own


def start_tracing(log: Any) -> None:
    """OpenTelemetry, when the standard ``OTEL_*`` variables name an endpoint
    (:mod:`proxy.observe.tracing`); in each process that serves (each worker: the SDK's
    export thread does not survive a fork). Without the SDK: SettingsError, one line."""
    from ..config.envvars import SettingsError
    from ..observe.tracing import TracingUnavailable, start

    try:
        start(os.environ, log)
    except TracingUnavailable as exc:
        raise SettingsError(str(exc)) from None


def proxy_server(settings: Settings) -> ProxyServer:
    """The proxy's server for ``settings``: what the single process, or each worker, runs.
    Raises SettingsError when the Python client's TLS port cannot get its certificate."""
    from ..app.assemble import create_app
    from ..observe.logs import get_logger
    from .protocol import on_client_lost
    from .uvicorn_internals import body_in_hand, check_uvicorn

    check_uvicorn()
    ignore_sighup()
    log = get_logger("proxy")
    start_tracing(log)  # before the app: its transports take the tracer (or None) as built

    def listening(host: str, port: int) -> None:
        if port == settings.metrics_port:  # the second socket: /metrics and /usage only
            shown = f"[{host}]" if ":" in host else host
            log.info("metrics", host=host, port=port, url=f"http://{shown}:{port}/metrics",
                     setting="FAL_PROXY_METRICS_HOST")  # fmt: skip
            return
        if port == python.port:  # the TLS socket for fal's Python client
            log.info("python_sdk", host=host, port=port, url=python.origin, pid=os.getpid(),
                     setup=f"{PROG} python-env")  # fmt: skip
            return
        # Tests and scripts read the bound port (with --port 0) from this line.
        log.info(
            "listening",
            role="proxy",
            host=host,
            port=port,
            url=f"http://{host}:{port}",
            proxy_route=settings.proxy_route,
            version=__version__,
            pid=os.getpid(),
        )

    python = settings.python_sdk
    server = uvicorn_server(
        create_app(settings, body_in_hand=body_in_hand, on_client_lost=on_client_lost),
        settings.host,
        settings.port,
        listening,
        settings.ws_max_bytes,
        settings.drain_seconds,
        settings.header_timeout,
    )
    if python.port is not None:
        server.tls = (python.port, python.ssl_context(settings.host), settings.header_timeout)
    return server
