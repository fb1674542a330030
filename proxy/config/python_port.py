"""Settings of the TLS port for fal's Python client (``FAL_PROXY_PYTHON_SDK_PORT``).

fal's Python client (``fal-client``) has no ``proxyUrl``: it builds
``https://{FAL_RUN_HOST}/<app>`` and ``https://{FAL_QUEUE_RUN_HOST}/<app>`` itself. So the
proxy offers it a TLS port, and ``fal-gateway-proxy python-env`` prints the variables that
point an unmodified client there (:meth:`PythonSdkSettings.client_env`):

* ``FAL_RUN_HOST=<name>:<port>``: runs and streams, fal.run-shaped paths;
* ``FAL_QUEUE_RUN_HOST=<name>:<port>/queue.fal.run``: the client only formats it into a
  URL, so the path prefix tells queue calls from runs on the one port;
* ``SSL_CERT_FILE=<state dir>/ca-bundle.pem`` when the proxy made its own certificate
  (:mod:`proxy.config.tls_certs`): the public roots and the local CA, so every other HTTPS call of
  that Python process keeps working;
* ``FAL_KEY=…`` a placeholder when callers are not authenticated (the client refuses to
  start without one); else the caller's own credential goes there.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..policy.python_port import QUEUE_PREFIX
from .envvars import Doc, SettingsError, _get, _int, declared, flag, read_fields
from .tls_certs import (
    TlsFiles,
    UntrustedStateDir,
    default_state_dir,
    ensure_certificates,
    existing_certificates,
)

FAL_KEY_PLACEHOLDER = "not-a-fal-key:the-proxy-holds-it"
_WILDCARDS = ("0.0.0.0", "::", "")
_DNS_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class PythonSdkSettings:
    """The Python client's TLS port. Each field declares its variable once (see envvars)."""

    port: int | None = declared(  # None: no such port
        lambda env, _: _int(env, "FAL_PROXY_PYTHON_SDK_PORT", 0, low=0, high=65535) or None,
        Doc(
            "FAL_PROXY_PYTHON_SDK_PORT",
            "",
            "also serve fal's Python client (fal-client) with TLS on this port; "
            "see 'fal-gateway-proxy python-env'",
        ),
        default=None,
    )
    host_name: str = declared(
        lambda env, _: _host_name(env),
        Doc(
            "FAL_PROXY_PYTHON_SDK_HOST",
            "(FAL_PROXY_HOST, or localhost)",
            "the name Python clients reach that port by: python-env prints it, "
            "the generated certificate is for it",
        ),
        default="127.0.0.1",  # FAL_PROXY_HOST's default
    )
    cert_file: str | None = declared(
        lambda env, _: _get(env, "FAL_PROXY_TLS_CERT_FILE"),
        Doc(
            "FAL_PROXY_TLS_CERT_FILE",
            "",
            "certificate chain (PEM) for that port, e.g. from your internal CA; "
            "else a local CA makes one",
        ),
        default=None,
    )
    key_file: str | None = declared(
        lambda env, _: _get(env, "FAL_PROXY_TLS_KEY_FILE"),
        Doc("FAL_PROXY_TLS_KEY_FILE", "", "its private key (PEM); with FAL_PROXY_TLS_CERT_FILE"),
        default=None,
    )
    state_dir: str | None = declared(
        lambda env, _: _get(env, "FAL_PROXY_STATE_DIR"),
        Doc(
            "FAL_PROXY_STATE_DIR",
            "(~/.local/state/fal-gateway-proxy)",
            "where the local CA, the certificate and ca-bundle.pem are made, once "
            "(private keys 0600); $XDG_STATE_HOME is honoured",
        ),
        default=None,
    )
    # An emptyDir only the pod's own containers mount is root's and 0777: nobody else can
    # reach it, but check_state_dir cannot know that. The operator says so here.
    state_dir_trusted: bool = flag(
        "FAL_PROXY_STATE_DIR_TRUSTED",
        False,
        "true: trust FAL_PROXY_STATE_DIR although others may write it (a volume only this "
        "pod's containers mount); else it must be this user's and writable by nobody else",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PythonSdkSettings:
        settings = cls(**read_fields(cls, env))
        if (settings.cert_file is None) != (settings.key_file is None):
            missing = (
                "FAL_PROXY_TLS_KEY_FILE" if settings.key_file is None else "FAL_PROXY_TLS_CERT_FILE"
            )
            raise SettingsError(
                f"{missing} is not set (FAL_PROXY_TLS_CERT_FILE and FAL_PROXY_TLS_KEY_FILE go "
                "together)"
            )
        if settings.port is not None and settings.cert_file is not None:
            settings.ssl_context("")  # a bad certificate or key stops the start, named
        return settings

    @property
    def origin(self) -> str:
        """The URL root Python clients use: ``https://<name>:<port>``."""
        return f"https://{self.authority}"

    @property
    def authority(self) -> str:
        host = f"[{self.host_name}]" if ":" in self.host_name else self.host_name
        return f"{host}:{self.port}"

    def names(self, listen_host: str) -> list[str]:
        """What the generated certificate is for: the configured name, the listen address
        when it is a specific one, and the loopback names (a sidecar's clients use those)."""
        names = [self.host_name, "localhost", "127.0.0.1", "::1"]
        if listen_host not in _WILDCARDS:
            names.insert(1, listen_host)
        return list(dict.fromkeys(names))

    def tls_files(self, listen_host: str, *, make: bool = True) -> TlsFiles | None:
        """The generated certificate's files (made once, reused after; with ``make=False``
        only read: SettingsError when there are none), or None when the operator gave their
        own, or there is no such port. Raises SettingsError naming FAL_PROXY_STATE_DIR."""
        if self.cert_file is not None or self.port is None:
            return None
        state_dir = Path(self.state_dir) if self.state_dir else default_state_dir()
        try:
            if not make:
                found = existing_certificates(state_dir, trusted_volume=self.state_dir_trusted)
                if found is None:
                    raise SettingsError(
                        f"FAL_PROXY_STATE_DIR: no local CA in {state_dir}: start the proxy "
                        "first, and run this as its user or with its FAL_PROXY_STATE_DIR"
                    )
                return found
            return ensure_certificates(
                state_dir, self.names(listen_host), trusted_volume=self.state_dir_trusted
            )
        except UntrustedStateDir as exc:
            raise SettingsError(
                f"FAL_PROXY_STATE_DIR: {exc}; clients trust the CA made there, so only this "
                "user may be able to change it (or set FAL_PROXY_STATE_DIR_TRUSTED=true for a "
                "volume only this pod's containers mount)"
            ) from None
        except OSError as exc:
            raise SettingsError(
                f"FAL_PROXY_STATE_DIR: cannot make the TLS certificate in {state_dir}: "
                f"{exc.strerror or exc}"
            ) from None

    def ssl_context(self, listen_host: str) -> ssl.SSLContext:
        """The server side of the port: TLS 1.2 or later, HTTP/1.1."""
        generated = self.tls_files(listen_host)
        cert, key = (
            (str(generated.cert), str(generated.key))
            if generated is not None
            else (str(self.cert_file), str(self.key_file))
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(
                "FAL_PROXY_TLS_CERT_FILE / FAL_PROXY_TLS_KEY_FILE: cannot load the certificate "
                f"and key: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        return context

    def client_env(
        self, listen_host: str, *, caller_auth: bool, make: bool = True
    ) -> list[tuple[str, str]]:
        """The variables that make an unmodified fal-client in another process use the port
        (``make=False``: the proxy's CA must exist already; none is made)."""
        if self.port is None:
            raise SettingsError(
                "FAL_PROXY_PYTHON_SDK_PORT is not set: the Python client's TLS port is off"
            )
        lines = [
            ("FAL_RUN_HOST", self.authority),
            ("FAL_QUEUE_RUN_HOST", f"{self.authority}{QUEUE_PREFIX}"),
        ]
        generated = self.tls_files(listen_host, make=make)
        if generated is not None:
            lines.append(("SSL_CERT_FILE", str(generated.bundle)))
        if not caller_auth:
            lines.append(("FAL_KEY", FAL_KEY_PLACEHOLDER))
        return lines


def env_lines(pairs: list[tuple[str, str]], *, export: bool) -> str:
    """``NAME=value`` lines, or shell ``export NAME=value`` lines (quoted for the shell)."""
    if export:
        return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in pairs)
    return "".join(f"{name}={value}\n" for name, value in pairs)


def _host_name(env: Mapping[str, str]) -> str:
    name = _get(env, "FAL_PROXY_PYTHON_SDK_HOST")
    if name is None:
        listen = _get(env, "FAL_PROXY_HOST") or "127.0.0.1"
        return "localhost" if listen in _WILDCARDS else listen
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    if not _DNS_NAME.fullmatch(name):
        raise SettingsError(
            "FAL_PROXY_PYTHON_SDK_HOST must be a host name or an IP address, "
            "without scheme, port or path"
        )
    return name.lower()
