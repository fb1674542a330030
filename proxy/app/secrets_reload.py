"""Key rotation: ``FAL_KEY_FILE`` and ``CF_AIG_TOKEN_FILE`` are re-read when they change.

Kubernetes updates a mounted Secret in place (an atomic symlink swap), so an operator
rotates the fal key or the gateway token by updating the Secret. Both files are watched by
the one watcher of :mod:`proxy.app.config_reload` (every
``FAL_PROXY_SECRET_RELOAD_SECONDS``, and on SIGHUP): when a value changed the proxy builds
new injected headers and swaps them in with one assignment, and logs ``secret_reloaded``
(names only). Requests already in flight keep the headers they started with; the next ones
use the new value; nothing is dropped. A file that became unreadable or empty, or holds a
value start-up would refuse, keeps the old value and logs ``secret_file_unusable`` once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..config.envvars import Secret, secret_from_text
from ..config.settings import Settings, check_admin_token
from ..policy.headers import InjectedHeaders
from .config_reload import WatchedFile


def secret_files(
    settings: Settings, install: Callable[[InjectedHeaders], Any]
) -> list[WatchedFile[str]]:
    """The secret files this configuration reads, each installing new headers on change."""
    current = [settings]  # the settings whose headers are in use

    def watched(variable: str, field: str, path: str) -> WatchedFile[str]:
        def install_value(value: str) -> dict[str, Any] | None:
            old = getattr(current[0], field)
            if old is not None and old.reveal() == value:
                return None  # written again, same value: nothing to say
            changes: dict[str, Any] = {field: Secret(value)}
            current[0] = dataclasses.replace(current[0], **changes)
            install(current[0].injected_headers())
            return {"secrets": [field]}  # names only, never values

        return WatchedFile(variable, path, lambda text: secret_from_text(variable, path, text),
                           install_value, reloaded_event="secret_reloaded",
                           unusable_event="secret_file_unusable")  # fmt: skip

    return [
        watched(variable, field, path)
        for variable, field, path in (
            ("FAL_KEY_FILE", "fal_key", settings.fal_key_file),
            ("CF_AIG_TOKEN_FILE", "cf_aig_token", settings.cf_aig_token_file),
        )
        if path is not None
    ]


def admin_token_file(settings: Settings, install: Callable[[str], Any]) -> list[WatchedFile[str]]:
    """``FAL_PROXY_ADMIN_TOKEN_FILE``, re-read like the key files: a new token (checked as
    start-up checks it: header-safe, long enough) is given to ``install``; the old one stops
    working at once."""
    path = settings.admin_token_file
    if path is None or settings.admin_token is None:
        return []
    variable = "FAL_PROXY_ADMIN_TOKEN_FILE"
    current = [settings.admin_token.reveal()]

    def load(text: str) -> str:
        return check_admin_token(variable, secret_from_text(variable, path, text))

    def install_value(value: str) -> dict[str, Any] | None:
        if value == current[0]:
            return None
        current[0] = value
        install(value)
        return {"secrets": ["admin_token"]}  # the name only, never the value

    return [WatchedFile(variable, path, load, install_value, reloaded_event="secret_reloaded",
                        unusable_event="secret_file_unusable")]  # fmt: skip
