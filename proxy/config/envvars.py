"""Reading settings from environment variables: each problem names its variable."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


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

    Start-up and rotation (:mod:`proxy.app.secrets_reload`) check a value with the same
    :func:`secret_from_text`, so a rotated value gets the same header-safety check. Raises
    SettingsError naming ``name``.
    """
    path = Path(file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{name}: {path} is not UTF-8 text") from None
    return secret_from_text(name, file, text)


def secret_from_text(name: str, file: str, text: str) -> str:
    """The secret in ``text``, read from ``file``: stripped, checked as start-up checks it."""
    path, value = Path(file), text.strip()
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


# Declaring a setting once --------------------------------------------------------------
# Each setting is a dataclass field whose metadata holds how it is read from the environment
# and how it is documented, next to its default; ``read_fields`` builds the settings from
# those declarations and ``documented`` writes --help and docs/configuration.md from them.

Reader = Callable[[Mapping[str, str], Mapping[str, Any]], Any]
_READ, _DOCS = "proxy.read", "proxy.docs"


class Doc(NamedTuple):
    """One row of the settings table: variable name(s), default as shown, meaning."""

    names: str
    default: str
    meaning: str


def declared(read: Reader, *docs: Doc, default: T, secret: bool = False) -> T:
    """A field read by ``read(env, values read so far)``, documented by ``docs``.

    ``secret`` keeps the value out of the settings' ``repr`` (a token list, a Redis password).
    """
    return field(default=default, repr=not secret, metadata={_READ: read, _DOCS: docs})


def declared_required(read: Reader, *docs: Doc) -> Any:
    """A field with no default: ``read`` raises SettingsError when it is missing."""
    return field(metadata={_READ: read, _DOCS: docs})


def declared_factory(read: Reader, *docs: Doc, factory: Callable[[], T]) -> T:
    return field(default_factory=factory, metadata={_READ: read, _DOCS: docs})


def seconds(name: str, default: float, meaning: str) -> float:
    return declared(
        lambda env, _: _seconds(env, name, default),
        Doc(name, shown(default), meaning),
        default=default,
    )


def whole(name: str, default: int, meaning: str, *, low: int, high: int | None = None) -> int:
    return declared(
        lambda env, _: _int(env, name, default, low=low, high=high),
        Doc(name, shown(default), meaning),
        default=default,
    )


def choice(name: str, default: str, choices: tuple[str, ...], meaning: str) -> str:
    return declared(
        lambda env, _: _choice(env, name, default, choices),
        Doc(name, default, meaning),
        default=default,
    )


def text(name: str, default: str, meaning: str) -> str:
    return declared(
        lambda env, _: _get(env, name) or default, Doc(name, default, meaning), default=default
    )


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    return _choice(env, name, shown(default), ("true", "false", "1", "0")) in ("true", "1")


def flag(name: str, default: bool, meaning: str) -> bool:
    return declared(
        lambda env, _: _flag(env, name, default),
        Doc(name, shown(default), meaning),
        default=default,
    )


def shown(default: object) -> str:
    """A default as the table shows it: 10.0 → 10, True → true, None or () → empty."""
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, float):
        return f"{default:g}"
    if default is None or default == ():
        return ""
    return str(default)


def read_fields(cls: type[DataclassInstance], env: Mapping[str, str]) -> dict[str, Any]:
    """Every declared field of ``cls`` read from ``env``, in declaration order."""
    values: dict[str, Any] = {}
    for item in fields(cls):
        values[item.name] = item.metadata[_READ](env, values)
    return values


def documented(cls: type[DataclassInstance]) -> tuple[Doc, ...]:
    """The settings table of ``cls``, in declaration order."""
    return tuple(doc for item in fields(cls) for doc in item.metadata[_DOCS])
