"""Running a server: uvicorn configured as the proxy needs it, one process.

The guarded HTTP protocol (:mod:`proxy.server_protocol`), uvloop, the WebSocket settings,
the drain on SIGTERM (bridged sockets closed with 1001, ``/readyz`` answering 503), the
listening line, a cheaper garbage collector and the open-files limit. :mod:`proxy.workers`
runs several of these under one supervisor.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import warnings
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from . import __version__
from .settings import Settings

PROG = "fal-gateway-proxy"


def tune_gc() -> None:
    """Make the cyclic garbage collector cheaper for a long-running proxy.

    Everything alive after start-up (modules, the app, the session) is moved out of
    the collector's sight, and the youngest generation is collected less often: each
    request allocates a few hundred short-lived objects, and the default threshold of
    700 ran a collection every couple of requests (about 7% of CPU under load, measured
    with py-spy; see bench/). Reference counting still frees almost everything at once.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def raise_open_files_limit(log: Any) -> None:
    """Raise the soft open-files limit to the hard one, and say both.

    Every proxied request holds two sockets (client and gateway) and a WebSocket two more;
    the usual soft limit of 1024 would cap a proxy at a few hundred streams while the
    hard limit (often 1,048,576 in containers) allows far more.
    """
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = soft
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            raised = target
        except (ValueError, OSError):
            pass
    log.info(
        "open_files_limit",
        soft_before=soft,
        soft=raised,
        hard=-1 if hard == resource.RLIM_INFINITY else hard,
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before building the app, so the port (with --port 0) is known to it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        print(f"{PROG}: error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(2) from None
    sock.set_inheritable(True)
    return sock


class ProxyServer(uvicorn.Server):
    """uvicorn's server with the proxy's start and shutdown steps."""

    def __init__(self, config: uvicorn.Config, app: ASGIApp, on_listening: Any) -> None:
        super().__init__(config)
        self.proxy_app = app
        self.on_listening = on_listening

    async def shutdown(self, sockets: Any = None) -> None:
        # uvicorn would fail open sockets with 1012; bridged sessions get a proper 1001.
        from .app import ProxyApp

        app = self.proxy_app
        draining = app.draining if isinstance(app, ProxyApp) else None
        if draining is not None:
            draining.set()  # /readyz answers 503 from now on
        bridge = app.bridge if isinstance(app, ProxyApp) else None
        if bridge is not None:
            await bridge.close_all()
        await super().shutdown(sockets)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
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
    from .server_protocol import guarded_protocol

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


def proxy_sockets(settings: Settings) -> list[socket.socket] | None:
    """With ``FAL_PROXY_METRICS_PORT``, the two sockets the one server listens on: the
    public port and the metrics port (the app tells them apart by the local port). Else
    None: uvicorn binds the public port itself."""
    if settings.metrics_port is None:
        return None
    return [
        bind_socket(settings.host, settings.port),
        bind_socket(settings.host, settings.metrics_port),
    ]


def proxy_server(settings: Settings) -> ProxyServer:
    """The proxy's server for ``settings``: what the single process, or each worker, runs."""
    from .app import create_app
    from .logs import get_logger

    log = get_logger("proxy")

    def listening(host: str, port: int) -> None:
        if port == settings.metrics_port:  # the second socket: /metrics and /usage only
            log.info("metrics", url=f"http://{host}:{port}/metrics")
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

    return uvicorn_server(
        create_app(settings),
        settings.host,
        settings.port,
        listening,
        settings.ws_max_bytes,
        settings.drain_seconds,
        settings.header_timeout,
    )
