"""The ``fal-gateway-proxy`` command.

* ``fal-gateway-proxy [--host H] [--port P]``: the proxy, configured from the environment.
* ``fal-gateway-proxy emulator [--port 9000] ...``: the offline fal + gateway emulator alone.
* ``fal-gateway-proxy demo [--port 8787]``: proxy, emulator and demo page in one process.
  Demo mode is only ever entered by this explicit command, never as a fallback.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import textwrap
from collections.abc import Mapping, Sequence

from . import __version__
from .config.envvars import SettingsError
from .config.settings import DOCUMENTED_VARIABLES, Settings, local_address
from .serve.server import (
    PROG,
    bind_socket,
    exit_cleanly_on_signals,
    proxy_server,
    proxy_sockets,
    raise_open_files_limit,
    run_uvicorn,
)
from .serve.workers import Supervisor

HELP_WIDTH = 100  # --help fits a 100-column terminal
_NAME_COLUMN = 32


def settings_help(width: int = HELP_WIDTH) -> str:
    """The settings a user sets, one per entry, wrapped to ``width`` columns (the test-only
    ``FAL_PROXY_TEST_*`` variables are in docs/testing.md, not here)."""
    indent = " " * (_NAME_COLUMN + 2)
    lines: list[str] = []
    for names, default, meaning in DOCUMENTED_VARIABLES:
        if names.startswith("FAL_PROXY_TEST_"):
            continue
        if default.startswith("("):  # already in brackets: "(required)", "(all)"
            meaning = f"{meaning} {default}"
        elif default:
            meaning = f"{meaning} (default {default})"
        body = textwrap.wrap(meaning, width - len(indent)) or [""]
        if len(names) <= _NAME_COLUMN - 2:
            lines.append(f"  {names:<{_NAME_COLUMN}}{body[0]}")
        else:  # a long name takes its own line
            lines += [f"  {names}", indent + body[0]]
        lines += [indent + rest for rest in body[1:]]
    return "\n".join(lines)


def _formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's own text wrapped to the terminal, but never wider than HELP_WIDTH."""
    width = min(shutil.get_terminal_size().columns, HELP_WIDTH)
    return argparse.RawDescriptionHelpFormatter(prog, width=width)


def _parser() -> argparse.ArgumentParser:
    table = settings_help()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Forward fal requests (fal.run-shaped paths and the fal JS SDK's proxyUrl\n"
            "protocol) through Cloudflare AI Gateway, adding the fal key server-side."
        ),
        epilog="settings (environment variables; all of them, with examples: "
        f"docs/configuration.md):\n{table}\n\n"
        f"Try it with no account: {PROG} demo   (see '{PROG} demo --help')",
        formatter_class=_formatter,
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
    commands = parser.add_subparsers(
        dest="command", metavar="{emulator,demo,check,python-env,prices}"
    )

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
    emulator.add_argument(
        "--byok",
        action="append",
        default=[],
        metavar="ALIAS=KEY",
        help="act as a gateway storing this fal key under ALIAS (repeatable; 'default' is "
        "used when a request names none)",
    )
    emulator.add_argument(
        "--unified-billing",
        action="store_true",
        help="pass keyless requests (the gateway pays fal) unless they say cf-aig-no-wholesale",
    )
    emulator.add_argument(
        "--gzip-queue",
        action="store_true",
        help="gzip queue answers for requests that accept gzip (as Cloudflare's edge may)",
    )

    check = commands.add_parser(
        "check",
        help="validate the configuration and print it (secrets masked)",
        description="Load the settings from the environment, print them with secrets masked, "
        "and exit non-zero on a problem. With --probe, also ask the gateway (and Redis) "
        "whether they answer.",
    )
    check.add_argument("--probe", action="store_true", help="contact the gateway and Redis")

    python_env = commands.add_parser(
        "python-env",
        help="print the variables that point fal's Python client at this proxy",
        description="Run while the proxy runs, with what identifies it (FAL_PROXY_PYTHON_SDK_PORT, "
        "and FAL_PROXY_PYTHON_SDK_HOST, FAL_PROXY_HOST, FAL_PROXY_STATE_DIR as the proxy has "
        "them; no fal key needed). Prints NAME=value lines that make an unmodified fal-client "
        "(pip install fal-client) in another process use this proxy: FAL_RUN_HOST, "
        "FAL_QUEUE_RUN_HOST, SSL_CERT_FILE (when the proxy made its own certificate: public "
        "roots plus its local CA, checked against what the running port serves) and, with "
        "FAL_PROXY_AUTH=none, a FAL_KEY placeholder (the client needs one; the proxy drops "
        "it). With caller auth on, set FAL_KEY to the caller's token or JWT instead.",
        epilog="Not through the proxy: fal_client.upload_file/upload (fixed URLs on "
        "rest.fal.ai and v3.fal.media) and realtime()/ws_connect() with use_jwt=True (the "
        "default; it asks rest.fal.ai for a token). Pass use_jwt=False to realtime() and "
        "ws_connect(); pass files inline (fal_client.encode_file(path) gives a data: URI "
        "that travels in the request body), or upload them from the browser through the JS "
        "SDK's proxyUrl.",
    )
    python_env.add_argument(
        "--export", action="store_true", help="print shell 'export NAME=value' lines"
    )

    prices = commands.add_parser(
        "prices",
        help="write a FAL_PROXY_PRICES_FILE from fal's pricing API (run by an operator)",
        description="Ask fal's platform API (https://api.fal.ai/v1/models and "
        "/v1/models/pricing) for the price of each app, with the fal key of the environment "
        "(FAL_KEY or FAL_KEY_FILE, sent as 'Authorization: Key ...'), and write them as a "
        "FAL_PROXY_PRICES_FILE in US dollars per billable unit. Run it by hand or on a "
        "schedule; the proxy never calls it. See docs/prices.md.",
    )
    from .prices_command import add_arguments as add_prices_arguments

    add_prices_arguments(prices)

    demo = commands.add_parser(
        "demo",
        help="try the proxy with no account: proxy + emulator + a demo page",
        description="Run the proxy against the built-in offline emulator and serve a demo page. "
        "No real fal call is made; FAL_KEY and CF_* are ignored.",
    )
    demo.add_argument(
        "--host",
        default=None,
        help="address to listen on (default $FAL_PROXY_HOST, else 127.0.0.1)",
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
    if args.command == "prices":  # an operator's tool: fal's key, none of the proxy's settings
        from .prices_command import run as run_prices

        return run_prices(args, env)
    if args.command == "python-env":  # needs no fal key: only what identifies the proxy
        from .python_env import run

        overrides = {"FAL_PROXY_HOST": args.host} if args.host is not None else {}
        return run({**env, **overrides}, export=args.export)
    try:
        settings = load_settings(args, env)
    except SettingsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        from .check import run_check

        return run_check(settings, args.probe)
    try:
        return serve(settings, settings.workers)
    except SettingsError as exc:  # no certificate for the TLS port, or an unsupported uvicorn
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def serve(settings: Settings, workers: int = 1) -> int:
    """Run the proxy under uvicorn until interrupted; with ``workers`` > 1, in that many
    processes listening on one port (SO_REUSEPORT: the kernel spreads connections evenly),
    under uvicorn's supervisor, which replaces a worker that dies (:class:`Supervisor`)."""
    from .observe.logs import configure_logging, get_logger
    from .serve.uvicorn_internals import check_uvicorn

    check_uvicorn()  # before any worker starts: one line, exit 2
    configure_logging(settings.log_format, settings.log_level)
    log = get_logger("proxy")
    raise_open_files_limit(log)  # the workers inherit the raised limit

    if workers <= 1:
        sockets = proxy_sockets(settings)  # first: a busy port is one line, nothing started
        server = proxy_server(settings)
        exit_cleanly_on_signals()
        server.run(sockets=sockets)
        return 0
    if settings.python_sdk.port is not None:
        settings.python_sdk.tls_files(settings.host)  # made once here, not raced by workers
    if settings.access.redis_url is None:
        log.warning(
            "several workers with in-memory rate limits: each worker counts on its own; "
            "set FAL_PROXY_REDIS_URL to share them",
            setting="FAL_PROXY_REDIS_URL",
        )
    sockets = proxy_sockets(settings, shared=True)
    supervisor = Supervisor(settings, sockets, workers)
    try:
        supervisor.run()
    except BaseException:  # the supervisor itself failed: never leave workers without it
        supervisor.should_exit.set()
        supervisor.terminate_all()
        supervisor.join_all()
        raise
    return supervisor.exit_code()


def run_emulator(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from .emulator import EmulatorConfig, create_emulator
    from .observe.logs import configure_logging, get_logger

    if not args.time_scale > 0:
        print(f"{PROG}: error: --time-scale must be positive", file=sys.stderr)
        return 2
    stored_keys = dict(item.split("=", 1) for item in args.byok if "=" in item)
    if len(stored_keys) != len(args.byok) or not all(stored_keys) or not all(stored_keys.values()):
        print(f"{PROG}: error: --byok takes ALIAS=KEY", file=sys.stderr)
        return 2
    configure_logging(environ.get("FAL_PROXY_LOG_FORMAT", "auto"), "info")
    log = get_logger("emulator")
    config = EmulatorConfig(
        fal_key=args.key,
        cf_token=args.cf_token,
        seed=args.seed,
        time_scale=args.time_scale,
        public_url=args.public_url,
        gzip_queue=args.gzip_queue,
        byok=stored_keys,
        unified_billing=args.unified_billing,
    )
    sock = bind_socket(args.host, args.port, setting="--host / --port")

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

    run_uvicorn(create_emulator(config), args.host, sock, args.port, listening)
    return 0


def run_demo(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Proxy + emulator + demo page on one port; the proxy reaches the emulator over loopback."""

    from .demo import create_demo_app
    from .emulator import EmulatorConfig
    from .observe.logs import configure_logging, get_logger

    if not args.time_scale > 0:
        print(f"{PROG}: error: --time-scale must be positive", file=sys.stderr)
        return 2
    log_format = environ.get("FAL_PROXY_LOG_FORMAT", "auto")
    configure_logging(log_format if log_format in ("auto", "json", "console") else "auto", "info")
    log = get_logger("proxy")
    # --host, else FAL_PROXY_HOST (the image sets 0.0.0.0: `docker run IMAGE demo` works).
    wanted = args.host or environ.get("FAL_PROXY_HOST", "").strip() or "127.0.0.1"
    # make demo passes its options in DEMO_ARGS: say so where the user will look.
    sock = bind_socket(wanted, args.port, setting='--port; make demo DEMO_ARGS="--port N"')
    host, port = sock.getsockname()[:2]
    # The proxy reaches the emulator, and the log tells the user to open, an address that
    # answers: loopback when listening on every address (0.0.0.0 or ::), not 0.0.0.0.
    reach = local_address(host)
    origin = f"http://[{reach}]:{port}" if ":" in reach else f"http://{reach}:{port}"
    key = secrets.token_urlsafe(16)  # a throwaway key shared by the two halves
    settings = Settings.from_env(
        {
            "FAL_KEY": key,
            "FAL_PROXY_GATEWAY_URL": f"{origin}/v1/demo/demo/fal",
            "FAL_PROXY_HOST": host,
            "FAL_PROXY_PORT": str(port),
            # The demo's key is a throwaway one that only the built-in emulator accepts, so
            # `demo --host 0.0.0.0` exposes no fal credit: it opts in to auth=none on any
            # address (the start-up warning still says so).
            "FAL_PROXY_ALLOW_UNAUTHENTICATED": "true",
            "FAL_PROXY_LOG_FORMAT": log_format
            if log_format in ("auto", "json", "console")
            else "auto",
        }
    )
    # public_url "/": the generated images' URLs are paths on the page's own origin, whatever
    # name or port the browser used (a container's published port, a LAN address).
    emulator = EmulatorConfig(fal_key=key, time_scale=args.time_scale, public_url="/")
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
        elsewhere = " (or this machine's address, or the container's published port)"
        log.info(
            f"demo page: open {origin}/ in a browser{elsewhere if reach != host else ''}",
            url=f"{origin}/",
        )

    run_uvicorn(
        create_demo_app(settings, emulator),
        host,
        sock,
        port,
        listening,
        header_timeout=settings.header_timeout,
    )
    return 0
