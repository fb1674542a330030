"""The open-files limit: how many streams it allows, raised at start-up, said in one line.

Every proxied call holds two descriptors while it runs (the client's socket and the
gateway's), an SSE stream for as long as it lasts, a bridged WebSocket the same two. The
usual soft limit of 1024 therefore caps a proxy at about 480 streams while the hard limit
(often 524,288 or 1,048,576 in containers) allows far more: like nginx's
``worker_rlimit_nofile``, the proxy raises its soft limit to the hard one at start-up and says
what that allows (``open_files_limit``: a warning when it is under :data:`LOW_STREAMS`). The
same words are in ``fal-gateway-proxy check``, which reads the limit without raising it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FDS_PER_STREAM = 2  # the client's socket and the gateway's
RESERVED_FDS = 64  # listening sockets, the log pipe, Redis, the OTLP exporter, TLS files...
LOW_STREAMS = 1000  # fewer allowed than this: a warning
UNLIMITED = -1  # RLIM_INFINITY, as shown
_ASSUMED_INFINITE = 1 << 20  # the soft limit set when the hard one is infinite


@dataclass(frozen=True)
class OpenFiles:
    """The limit before and after start-up; ``soft``/``hard`` -1 for no limit."""

    soft_before: int
    soft: int
    hard: int
    error: str = ""  # why raising failed, if it did

    @property
    def raised(self) -> bool:
        return self.soft != self.soft_before

    @property
    def streams(self) -> int:
        """Concurrent streams (or bridged WebSockets) the soft limit allows, about."""
        return streams_allowed(self.soft)

    @property
    def low(self) -> bool:
        return self.streams < LOW_STREAMS

    def sentence(self) -> str:
        """``about 9,968 concurrent streams (two descriptors each)...``"""
        limit = "no limit" if self.soft == UNLIMITED else f"{self.soft:,}"
        text = (
            f"open files: soft limit {limit} (hard {_shown(self.hard)}): about "
            f"{self.streams:,} concurrent streams or WebSockets (two descriptors each)"
        )
        if self.raised:
            text += f"; soft limit raised from {self.soft_before:,} to the hard limit"
        elif self.error:
            text += f"; could not raise the soft limit ({self.error})"
        if self.low:
            text += (
                f"; fewer than {LOW_STREAMS:,}: raise it (`ulimit -n` in the shell that starts "
                "the proxy, LimitNOFILE= in a systemd unit, the container's nofile ulimit, "
                "e.g. docker run --ulimit nofile=65536:65536)"
            )
        return text


def streams_allowed(soft: int) -> int:
    if soft == UNLIMITED:
        return streams_allowed(_ASSUMED_INFINITE)
    return max(0, (soft - RESERVED_FDS) // FDS_PER_STREAM)


def _norm(limit: int, infinity: int | None) -> int:
    return UNLIMITED if limit == infinity else limit


def _shown(limit: int) -> str:
    return "no limit" if limit == UNLIMITED else f"{limit:,}"


def _rlimit() -> tuple[Callable[[], tuple[int, int]], Callable[[tuple[int, int]], None], int]:
    import resource

    def get() -> tuple[int, int]:
        return resource.getrlimit(resource.RLIMIT_NOFILE)

    def set_(limits: tuple[int, int]) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)

    return get, set_, resource.RLIM_INFINITY


def read_open_files(
    get: Callable[[], tuple[int, int]] | None = None, infinity: int | None = None
) -> OpenFiles | None:
    """The limit as it is (``check``); None where there is no such limit (Windows)."""
    if get is None:
        try:
            get, _, infinity = _rlimit()
        except ImportError:
            return None
    soft, hard = get()
    return OpenFiles(_norm(soft, infinity), _norm(soft, infinity), _norm(hard, infinity))


def raise_open_files(
    get: Callable[[], tuple[int, int]] | None = None,
    set_: Callable[[tuple[int, int]], None] | None = None,
    infinity: int | None = None,
) -> OpenFiles | None:
    """Raise the soft limit to the hard one (to 2^20 under an infinite hard limit: an
    infinite soft limit would make some libraries loop over every possible descriptor)."""
    if get is None or set_ is None:
        try:
            get, set_, infinity = _rlimit()
        except ImportError:
            return None
    soft, hard = get()
    target = hard if hard != infinity else max(soft, _ASSUMED_INFINITE)
    if soft != infinity and soft < target:
        try:
            set_((target, hard))
        except (ValueError, OSError) as exc:
            error = str(exc) or type(exc).__name__
            return OpenFiles(soft, soft, _norm(hard, infinity), error=error)
        return OpenFiles(soft, target, _norm(hard, infinity))
    return OpenFiles(_norm(soft, infinity), _norm(soft, infinity), _norm(hard, infinity))


def log_open_files(log: Any, limits: OpenFiles | None) -> None:
    """One ``open_files_limit`` line: info, or a warning when it allows few streams."""
    if limits is None:
        return
    (log.warning if limits.low else log.info)(
        "open_files_limit",
        soft_before=limits.soft_before,
        soft=limits.soft,
        hard=limits.hard,
        raised=limits.raised,
        streams=limits.streams,
        detail=limits.sentence(),
        **({"setting": "ulimit -n / the container's nofile"} if limits.low else {}),
    )


def planned_open_files() -> OpenFiles | None:
    """What :func:`raise_open_files` would make of the limit, without changing it (``check``)."""
    try:
        get, _, infinity = _rlimit()
    except ImportError:
        return None
    return raise_open_files(get, lambda _limits: None, infinity)
