"""The ``fal-gateway-proxy`` command: settings from the environment, flags on top, uvicorn."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from . import __version__
from .settings import DOCUMENTED_VARIABLES, Settings, SettingsError

PROG = "fal-gateway-proxy"


def _parser() -> argparse.ArgumentParser:
    width = max(len(name) for name, _, _ in DOCUMENTED_VARIABLES)
    table = "\n".join(
        f"  {name:<{width}}  {meaning}"
        + (f" ({default})" if default.startswith("(") else f" (default {default})" if default else "")
        for name, default, meaning in DOCUMENTED_VARIABLES
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Forward fal requests (fal.run-shaped paths and the fal JS SDK's proxyUrl protocol) "
            "through Cloudflare AI Gateway, adding the fal key server-side."
        ),
        epilog=f"settings (environment variables):\n{table}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", help="address to listen on (env FAL_PROXY_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on, 0 = any free port (env FAL_PROXY_PORT, default 8787)")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def load_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    env = dict(environ)
    if args.host is not None:
        env["FAL_PROXY_HOST"] = args.host
    if args.port is not None:
        env["FAL_PROXY_PORT"] = str(args.port)
    return Settings.from_env(env)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args, os.environ if environ is None else environ)
    except SettingsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    serve(settings)
    return 0


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


def serve(settings: Settings) -> None:
    """Run the proxy under uvicorn until interrupted."""
    import uvicorn

    from .app import create_app
    from .logs import configure_logging, get_logger

    configure_logging(settings.log_format, settings.log_level)
    log = get_logger("proxy")

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            tune_gc()
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    # Tests and scripts read the bound port (with --port 0) from this line.
                    log.info("listening", host=host, port=port, url=f"http://{host}:{port}",
                             proxy_route=settings.proxy_route, version=__version__)

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=None,  # structlog owns logging
        access_log=False,  # the forwarder writes its own canonical line
        server_header=False,  # the upstream's headers pass through, not ours
        date_header=False,
        proxy_headers=False,  # X-Forwarded-For is not trusted by default
        timeout_graceful_shutdown=10,
    )
    Server(config).run()
