"""Key rotation: ``FAL_KEY_FILE`` and ``CF_AIG_TOKEN_FILE`` are re-read when they change.

Kubernetes updates a mounted Secret in place (an atomic symlink swap), so an operator
rotates the fal key or the gateway token by updating the Secret: every
``FAL_PROXY_SECRET_RELOAD_SECONDS`` the proxy reads the files, and when a value changed it
builds new injected headers and swaps them in with one assignment. Requests already in
flight keep the headers they started with; the next ones use the new value; nothing is
dropped. A file that became unreadable or empty keeps the old value, with a warning.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from ..config.envvars import Secret, SettingsError, read_secret_file
from ..config.settings import Settings
from ..observe.logs import get_logger
from ..policy.headers import InjectedHeaders

log = get_logger("proxy.secrets")


def _read(name: str, path: str | None) -> str | None:
    """The file's value, checked as at start-up; None (and a warning) if it is not usable."""
    if path is None:
        return None
    try:
        return read_secret_file(name, path)
    except SettingsError as exc:  # the message names the variable and file, never the value
        log.warning("secret_file_unusable", problem=str(exc), keeping="the previous value")
        return None


async def watch_secret_files(settings: Settings, install: Callable[[InjectedHeaders], Any]) -> None:
    """Run forever: re-read the secret files and ``install`` new headers when they change."""
    if settings.fal_key_file is None and settings.cf_aig_token_file is None:
        return
    current = settings
    while True:
        await asyncio.sleep(settings.secret_reload_seconds)
        key = _read("FAL_KEY_FILE", settings.fal_key_file)
        token = _read("CF_AIG_TOKEN_FILE", settings.cf_aig_token_file)
        changes: dict[str, Any] = {}
        for name, path, value, old in (
            ("fal_key", settings.fal_key_file, key, current.fal_key),
            ("cf_aig_token", settings.cf_aig_token_file, token, current.cf_aig_token),
        ):
            if path is None:
                continue
            if value is None:
                continue  # (_read said why)
            if old is None or value != old.reveal():
                changes[name] = Secret(value)
        if changes:
            current = dataclasses.replace(current, **changes)
            install(current.injected_headers())
            log.info("secret_reloaded", secrets=sorted(changes))  # names only, never values
