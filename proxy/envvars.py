"""Reading settings from environment variables: each problem names its variable."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _read_secret_file(env: Mapping[str, str], name: str) -> str:
    return read_secret_file(name, env[name].strip())


def read_secret_file(name: str, file: str) -> str:
    """The secret in ``file`` (named by variable ``name``), checked as start-up checks it.

    The one reader for start-up and for rotation (:mod:`proxy.secrets_reload`), so a rotated
    value gets the same header-safety check. Raises SettingsError naming ``name``.
    """
    path = Path(file)
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{name}: {path} is not UTF-8 text") from None
    if not value:
        raise SettingsError(f"{name}: {path} is empty")
    _check_header_safe(name, value)
    return value


def _check_header_safe(name: str, value: str) -> None:
    # A key with a newline or non-ASCII byte would break (or smuggle) the upstream header.
    if not value.isascii() or any(c in value for c in "\r\n\0") or not value.isprintable():
        raise SettingsError(f"{name} holds characters that cannot go in an HTTP header")


def _int(
    env: Mapping[str, str], name: str, default: int, *, low: int, high: int | None = None
) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise SettingsError(f"{name} must be {bound}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise SettingsError(f"{name} must be a positive number of seconds")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (_get(env, name) or default).lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of: {', '.join(choices)}")
    return value
