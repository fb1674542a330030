"""The ``fal-gateway-proxy`` command.

* ``fal-gateway-proxy [--host H] [--port P]``: the proxy, configured from the environment.
* ``fal-gateway-proxy emulator [--port 9000] ...``: the offline fal + gateway emulator alone.
* ``fal-gateway-proxy demo [--port 8787]``: proxy, emulator and demo page in one process.
  Demo mode is only ever entered by this explicit command, never as a fallback.
"""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import signal
import socket
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.types import ASGIApp

from . import __version__
from .envvars import SettingsError
from .settings import DOCUMENTED_VARIABLES, Settings

PROG = "fal-gateway-proxy"


def _parser() -> argparse.ArgumentParser:
    width = max(len(name) for name, _, _ in DOCUMENTED_VARIABLES)
    table = "\n".join(
        f"  {name:<{width}}  {meaning}"
        + (
            f" {default}"  # already in brackets: "(required)", "(all)"
            if default.startswith("(")
            else f" (default {default})"
            if default
            else ""
        )
        for name, default, meaning in DOCUMENTED_VARIABLES
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Forward fal requests (fal.run-shaped paths and the fal JS SDK's proxyUrl protocol) "
            "through Cloudflare AI Gateway, adding the fal key server-side."
        ),
        epilog=f"settings (environment variables):\n{table}\n\n"
        f"Try it with no account: {PROG} demo   (see '{PROG} demo --help')",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host", help="address to listen on (env FAL_PROXY_HOST, default 127.0.0.1)"
    )
    parser.add_argument(
        "--port",
        type=int,
        help="port to listen on, 0 = any free port (env FAL_PROXY_PORT, default 8787)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="processes sharing the port (env FAL_PROXY_WORKERS, default 1); "
        "use FAL_PROXY_REDIS_URL so they share the rate limits",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{emulator,demo,check}")

    emulator = commands.add_parser(
        "emulator",
        help="run the offline fal + Cloudflare AI Gateway emulator",
        description="Serve an offline emulator of Cloudflare AI Gateway in front of fal. "
        "Point a proxy at FAL_PROXY_GATEWAY_URL=http://HOST:PORT/v1/<account>/<gateway>/fal. "
        "No real fal call is ever made.",
    )
    emulator.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    emulator.add_argument(
        "--port", type=int, default=9000, help="port, 0 = any free port (default 9000)"
    )
    emulator.add_argument(
        "--key", default=None, help="fal key to require (default: accept any 'Key ...')"
    )
    emulator.add_argument(
        "--cf-token", default=None, help="act as an authenticated gateway with this token"
    )
    emulator.add_argument(
        "--seed", type=int, default=0, help="seed for ids, tokens and images (default 0)"
    )
    emulator.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply every emulated duration (default 1.0; 0.05 for fast tests)",
    )
    emulator.add_argument(
        "--public-url", default=None, help="origin for the file and upload URLs it hands out"
    )

    check = commands.add_parser(
        "check",
        help="validate the configuration and print it (secrets masked)",
        description="Load the settings from the environment, print them with secrets masked, "
        "and exit non-zero on a problem. With --probe, also ask the gateway (and Redis) "
        "whether they answer.",
    )
    check.add_argument("--probe", action="store_true", help="contact the gateway and Redis")

    demo = commands.add_parser(
        "demo",
        help="try the proxy with no account: proxy + emulator + a demo page",
        description="Run the proxy against the built-in offline emulator and serve a demo page. "
        "No real fal call is made; FAL_KEY and CF_* are ignored.",
    )
    demo.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    demo.add_argument(
        "--port", type=int, default=8787, help="port, 0 = any free port (default 8787)"
    )
    demo.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply emulated durations (default 1.0)"
    )
    return parser


def load_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    env = dict(environ)
    if args.host is not None:
        env["FAL_PROXY_HOST"] = args.host
    if args.port is not None:
        env["FAL_PROXY_PORT"] = str(args.port)
    if getattr(args, "workers", None) is not None:
        env["FAL_PROXY_WORKERS"] = str(args.workers)
    return Settings.from_env(env)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = os.environ if environ is None else environ
    if args.command == "emulator":
        return run_emulator(args, env)
    if args.command == "demo":
        return run_demo(args, env)
    try:
        settings = load_settings(args, env)
    except SettingsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        from .check import run_check

        return run_check(settings, args.probe)
    return serve(settings, settings.workers)


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


def _bind(host: str, port: int) -> socket.socket:
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


def _run_uvicorn(
    app: ASGIApp,
    settings_host: str,
    sock: socket.socket | None,
    port: int,
    on_listening: Any,
    ws_max_bytes: int = 16 * 1024 * 1024,
    drain_seconds: float = 10.0,
    header_timeout: float | None = None,
) -> None:
    import uvicorn

    from .server_protocol import guarded_protocol

    # The "websockets" implementation is deprecated, but its replacement (websockets-sansio,
    # uvicorn 0.54) logs an error after every refused upgrade: see the ws= setting below. Say
    # so once here rather than warn every operator at every start.
    warnings.filterwarnings("ignore", message="The `websockets` implementation is deprecated")

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            # uvicorn would fail open sockets with 1012; bridged sessions get a proper 1001.
            from .app import ProxyApp

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
                    on_listening(host, bound_port)

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
    # uvicorn handles SIGTERM/SIGINT itself (graceful shutdown), then re-raises the signal to
    # whatever handler was there before; make that a clean exit, so a drained shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    Server(config).run(sockets=[sock] if sock is not None else None)


def _exit_cleanly(_signum: int, _frame: Any) -> None:
    raise SystemExit(0)


def serve(settings: Settings, workers: int = 1) -> int:
    """Run the proxy under uvicorn until interrupted; with ``workers`` > 1, in that many
    processes sharing one listening socket (the kernel spreads connections between them)."""
    from .app import create_app
    from .logs import configure_logging, get_logger

    configure_logging(settings.log_format, settings.log_level)
    log = get_logger("proxy")
    raise_open_files_limit(log)

    def listening(host: str, port: int) -> None:
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

    def run(sock: socket.socket | None) -> None:
        _run_uvicorn(
            create_app(settings),
            settings.host,
            sock,
            settings.port,
            listening,
            settings.ws_max_bytes,
            settings.drain_seconds,
            settings.header_timeout,
        )

    if workers <= 1:
        run(None)
        return 0
    if settings.access.redis_url is None:
        log.warning(
            "several workers with in-memory rate limits: each worker counts on its own; "
            "set FAL_PROXY_REDIS_URL to share them",
            setting="FAL_PROXY_REDIS_URL",
        )
    sock = _bind(settings.host, settings.port)
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # a worker: serve on the shared socket, never return into the parent's code
            code = 0
            try:
                run(sock)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0
            finally:
                os._exit(code)
        children.append(pid)
    sock.close()

    def forward(signum: int, _frame: Any) -> None:  # the parent passes SIGTERM/SIGINT on
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    failed = 0
    for child in children:
        _, status = os.waitpid(child, 0)
        failed |= os.waitstatus_to_exitcode(status) != 0
    return 1 if failed else 0


def run_emulator(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from .emulator import EmulatorConfig, create_emulator
    from .logs import configure_logging, get_logger

    if not args.time_scale > 0:
        print(f"{PROG}: error: --time-scale must be positive", file=sys.stderr)
        return 2
    configure_logging(environ.get("FAL_PROXY_LOG_FORMAT", "auto"), "info")
    log = get_logger("emulator")
    config = EmulatorConfig(
        fal_key=args.key,
        cf_token=args.cf_token,
        seed=args.seed,
        time_scale=args.time_scale,
        public_url=args.public_url,
    )
    sock = _bind(args.host, args.port)

    def listening(host: str, port: int) -> None:
        log.info(
            "listening",
            role="emulator",
            host=host,
            port=port,
            url=f"http://{host}:{port}",
            gateway_url=f"http://{host}:{port}/v1/emulator/emulator/fal",
            note="offline emulator: no real fal call is made",
        )

    _run_uvicorn(create_emulator(config), args.host, sock, args.port, listening)
    return 0


def run_demo(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Proxy + emulator + demo page on one port; the proxy reaches the emulator over loopback."""
    from .demo import create_demo_app
    from .emulator import EmulatorConfig
    from .logs import configure_logging, get_logger

    if not args.time_scale > 0:
        print(f"{PROG}: error: --time-scale must be positive", file=sys.stderr)
        return 2
    log_format = environ.get("FAL_PROXY_LOG_FORMAT", "auto")
    configure_logging(log_format if log_format in ("auto", "json", "console") else "auto", "info")
    log = get_logger("proxy")
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    origin = f"http://{host}:{port}"
    key = secrets.token_urlsafe(16)  # a throwaway key shared by the two halves
    settings = Settings.from_env(
        {
            "FAL_KEY": key,
            "FAL_PROXY_GATEWAY_URL": f"{origin}/v1/demo/demo/fal",
            "FAL_PROXY_HOST": host,
            "FAL_PROXY_PORT": str(port),
            "FAL_PROXY_LOG_FORMAT": log_format
            if log_format in ("auto", "json", "console")
            else "auto",
        }
    )
    emulator = EmulatorConfig(fal_key=key, time_scale=args.time_scale, public_url=origin)
    log.warning(
        "DEMO MODE: the proxy forwards to the built-in offline emulator; no real fal call is made "
        "and FAL_KEY / CF_* are ignored. Run without 'demo' to use fal through Cloudflare "
        "AI Gateway.",
    )

    def listening(bound_host: str, bound_port: int) -> None:
        log.info(
            "listening",
            role="proxy",
            host=bound_host,
            port=bound_port,
            url=origin,
            proxy_route=settings.proxy_route,
            version=__version__,
        )
        log.info("listening", role="emulator", url=origin, gateway_url=settings.gateway_url)
        log.info(f"demo page: open {origin}/ in a browser", url=f"{origin}/")

    _run_uvicorn(
        create_demo_app(settings, emulator),
        host,
        sock,
        port,
        listening,
        header_timeout=settings.header_timeout,
    )
    return 0
