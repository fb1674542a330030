"""``fal-gateway-proxy python-env``: what points an unmodified fal-client at a running proxy's
TLS port, checked against what that port serves.

It reads only what identifies the proxy (``FAL_PROXY_PYTHON_SDK_PORT`` and ``_HOST``,
``FAL_PROXY_HOST``, ``FAL_PROXY_STATE_DIR``, the TLS files, ``FAL_PROXY_AUTH`` for the key
placeholder), never a fal key, so it works from any shell. It never makes a CA: it prints the
bundle the proxy made, and only after a TLS handshake with the running port has verified the
certificate it serves against that bundle under the name it prints. Otherwise one line says
why and it exits 2: fal-client would retry for a minute and fail with
``CERTIFICATE_VERIFY_FAILED``.

May import: config.
"""

from __future__ import annotations

import socket
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path

from .config.envvars import SettingsError
from .config.python_port import PythonSdkSettings, env_lines
from .config.settings import local_address

PROG = "fal-gateway-proxy"
HANDSHAKE_TIMEOUT = 5.0


def client_env(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """The variables, once the running port has shown it serves what they trust; raises
    SettingsError naming what to change."""
    python = PythonSdkSettings.from_env(environ)
    listen = (environ.get("FAL_PROXY_HOST") or "127.0.0.1").strip()
    auth = (environ.get("FAL_PROXY_AUTH") or "none").strip().lower()
    pairs = python.client_env(listen, caller_auth=auth != "none", make=False)
    bundle = dict(pairs).get("SSL_CERT_FILE")
    if bundle is not None:  # the proxy's own CA (an operator's certificate is theirs to trust)
        assert python.port is not None
        verify_served(local_address(listen), python.port, python.host_name, bundle)
    return pairs


def verify_served(host: str, port: int, name: str, bundle: str) -> None:
    """A TLS handshake with ``host:port`` that trusts only ``bundle`` and checks ``name``;
    SettingsError if nothing answers or what answers is not trusted."""
    context = ssl.create_default_context(cafile=bundle)
    where = f"{host}:{port}"
    try:
        with (
            socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=name),
        ):
            return
    except ssl.SSLCertVerificationError as exc:
        raise SettingsError(
            f"FAL_PROXY_STATE_DIR: the proxy on {where} serves a certificate that "
            f"{Path(bundle)} does not trust for {name} ({exc.verify_message}): this shell sees "
            "another state directory or user than the proxy; run python-env as the proxy's "
            "user or with its FAL_PROXY_STATE_DIR (and FAL_PROXY_PYTHON_SDK_HOST)"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(
            f"FAL_PROXY_PYTHON_SDK_PORT: no TLS answer on {where} "
            f"({getattr(exc, 'strerror', None) or exc}): start the proxy first (python-env "
            "checks the certificate the running port serves)"
        ) from None


def run(environ: Mapping[str, str], *, export: bool) -> int:
    try:
        pairs = client_env(environ)
    except SettingsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(env_lines(pairs, export=export))
    return 0
