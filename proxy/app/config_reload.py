"""Files re-read while the proxy runs: one watcher per process, one interval, and SIGHUP.

The callers' tokens file (``FAL_PROXY_CLIENT_TOKENS_FILE``), the JWKS file
(``FAL_PROXY_JWT_JWKS_FILE``), the plans file (``FAL_PROXY_PLANS_FILE``), the prices file
(``FAL_PROXY_PRICES_FILE``) and the secret files
(``FAL_KEY_FILE``, ``CF_AIG_TOKEN_FILE``: :mod:`proxy.app.secrets_reload`) are each a
:class:`WatchedFile`. Every ``FAL_PROXY_SECRET_RELOAD_SECONDS`` (the reload interval), and at
once on SIGHUP, the :class:`Reloader` checks them all:

* **A check is one ``stat``** of the path (followed through symlinks: Kubernetes updates a
  mounted ConfigMap or Secret by swapping a symlink, which changes the inode seen here).
  Only when (device, inode, size, mtime, ctime) changed is the file read; only when its
  SHA-256 differs from the last content seen is it parsed. So a poll costs the same whatever
  the number of callers, and a change costs one read and one parse.
* **A write in the same tick as the last read** could leave all five equal on a file system
  with coarse timestamps. As git does with its "racy" index entries, a file whose mtime was
  within :data:`RACY_NS` of its read is read (and hashed) again at the next check, until its
  mtime is old enough to trust.
* **Swapping**: the parsed result replaces the old one with one assignment (the install
  function of each file). Requests in flight keep the objects they already hold.
* **A file that no longer parses** (or cannot be read, or is empty: taken for a write caught
  halfway) keeps the last good version and logs one warning per change, naming the
  variable, the file and, when the parser says it, the line. SIGHUP says it again.
  A good version after it logs the usual reload line.

The first check runs when the app starts (:meth:`Reloader.start`), quietly: a worker started
by ``--workers`` long after the supervisor read its settings serves the files as they are
now, not as they were then.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

from ..admission import Admission
from ..admission.callers import JwtAuth, load_jwks
from ..admission.gate import warn_unpriced_budgets
from ..config.settings import Settings
from ..limits.prices import VARIABLE, Prices, parse_prices
from ..limits.quotas import parse_plans
from ..observe.logs import get_logger
from ..policy.callers import TokenAuth, load_tokens

log = get_logger("proxy.reload")

T = TypeVar("T")
# A file whose mtime is this close to when it was read may change without changing its
# signature (coarse timestamps): it is read again at the next check.
RACY_NS = 2_000_000_000
# The most of a watched file read: far above any real one (100,000 callers' tokens are ~8 MB),
# and a bound on what one check reads and hashes on the event loop.
MAX_FILE_BYTES = 64 * 1024 * 1024
_LINE = re.compile(r"\bline (\d+)")


class Signature(NamedTuple):
    """What a ``stat`` says of a file: any change in it means "read it again"."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


def signature(path: str) -> Signature:
    """The file's signature, through symlinks (raises OSError)."""
    st = os.stat(path)
    return Signature(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_bounded(path: str) -> bytes:
    """The file's bytes, at most :data:`MAX_FILE_BYTES`. It runs on the event loop, so a
    path that is no regular file (a symlink swapped to ``/dev/zero``, a FIFO: a read that
    never ends or never returns) or a file past the bound is refused (OSError) unread."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise OSError(f"{path} is not a regular file")
        data = file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    return data


def line_of(problem: str) -> int | None:
    """The line a parser's message names (``line 3``, ``at line 3, column 7``), if any."""
    found = _LINE.search(problem)
    return int(found.group(1)) if found else None


@dataclass(eq=False)
class WatchedFile(Generic[T]):
    """One file re-read when it changes.

    ``load`` parses the text (raising on anything start-up would refuse; its message names
    the variable, never a credential); ``install`` swaps the result in with one assignment
    and returns the fields of the reload line (counts, never values), or None when nothing
    changed that is worth a line.
    """

    variable: str
    path: str
    load: Callable[[str], T]
    install: Callable[[T], dict[str, Any] | None]
    reloaded_event: str = "config_reloaded"
    unusable_event: str = "config_file_unusable"
    _seen: Signature | None = field(default=None, init=False)
    _digest: bytes | None = field(default=None, init=False)  # of the last content seen
    _racy: bool = field(default=True, init=False)
    _problem: str | None = field(default=None, init=False)  # what the last warning said

    def check(self, *, force: bool = False, quiet: bool = False) -> bool:
        """Re-read the file if it changed (``force``: whatever its signature says); whether
        a new version was installed. ``quiet``: no reload line (the first check)."""
        try:
            seen = signature(self.path)
            if seen == self._seen and not self._racy and not force:
                return False
            data = read_bounded(self.path)
        except OSError as exc:
            self._seen = self._digest = None  # whatever comes back is read and parsed
            self._refuse(f"{self.variable}: cannot read {self.path}: {exc.strerror or exc}", force)
            return False
        self._seen = seen
        self._racy = abs(time.time_ns() - seen.mtime_ns) < RACY_NS
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:  # touched, or written again with the same content
            if force and self._problem is not None:
                self._warn(self._problem)  # asked again (SIGHUP): said again
            return False
        self._digest = digest
        try:
            text = data.decode("utf-8")
            if not text.strip():
                raise ValueError(f"{self.variable}: {self.path} is empty")
            parsed = self.load(text)
        except Exception as exc:  # whatever the parser trips on: keep the last good version
            problem = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            self._refuse(problem, force=True)
            return False
        fields = self.install(parsed)
        self._problem = None
        if fields is not None and not quiet:
            log.info(self.reloaded_event, variable=self.variable, file=self.path, **fields,
                     pid=os.getpid())  # fmt: skip
        return True

    def _refuse(self, problem: str, force: bool) -> None:
        """Keep the last good version; warn unless this very problem was just said."""
        if force or problem != self._problem:
            self._warn(problem)
        self._problem = problem

    def _warn(self, problem: str) -> None:
        line = line_of(problem)
        log.warning(
            self.unusable_event,
            variable=self.variable,
            file=self.path,
            **({"line": line} if line is not None else {}),
            problem=problem,
            keeping="the last good version",
        )


class Reloader:
    """Checks every watched file each ``interval`` seconds, and at once on SIGHUP."""

    def __init__(self, files: Sequence[WatchedFile[Any]], interval: float) -> None:
        self.files = list(files)
        self.interval = interval
        self.asked = asyncio.Event()
        self._task: asyncio.Future[None] | None = None
        self._signal = False

    def check(self, *, force: bool = False, quiet: bool = False) -> None:
        for file in self.files:
            try:
                file.check(force=force, quiet=quiet)
            except Exception:  # an install that failed: the watcher itself must go on
                log.exception("config_reload_error", variable=file.variable, file=file.path)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.asked.wait(), self.interval)
            except TimeoutError:
                pass
            forced = self.asked.is_set()
            self.asked.clear()
            self.check(force=forced)

    def ask(self) -> None:
        """SIGHUP: check every file now, whatever its signature says."""
        log.info("config_reload_requested", signal="SIGHUP", files=len(self.files), pid=os.getpid())
        self.asked.set()

    def start(self) -> None:
        """(In the app's lifespan.) The first, quiet check; then the loop, and SIGHUP."""
        if self.files:
            self.check(force=True, quiet=True)
            self._task = asyncio.ensure_future(self.run())
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.ask)
            self._signal = True
        except (NotImplementedError, RuntimeError, ValueError, AttributeError):
            pass  # no SIGHUP (Windows), or not the main thread (an app under test)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._signal:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # not the default (exit) while ending
            self._signal = False


def config_files(settings: Settings, admission: Admission) -> list[WatchedFile[Any]]:
    """The access files this configuration reads: tokens, JWKS, plans, prices."""
    access = settings.access
    files: list[WatchedFile[Any]] = []
    auth = admission.auth
    if access.tokens_file is not None and isinstance(auth, TokenAuth):
        tokens = auth

        def install_tokens(entries: list[tuple[bytes, str]]) -> dict[str, Any]:
            tokens.callers = dict(entries)  # one assignment: the next lookup sees the new set
            return {"tokens": len(entries), "callers": len({c for _, c in entries})}

        files.append(WatchedFile("FAL_PROXY_CLIENT_TOKENS_FILE", access.tokens_file,
                                 lambda text: load_tokens(text, "FAL_PROXY_CLIENT_TOKENS_FILE"),
                                 install_tokens))  # fmt: skip
    jwks_file = access.jwt.jwks_file if access.jwt is not None else None
    if jwks_file is not None and isinstance(auth, JwtAuth):
        jwt_auth = auth

        def install_jwks(jwks: Any) -> dict[str, Any]:
            jwt_auth.use_jwks(jwks)
            return {"keys": len(jwks.keys)}

        files.append(WatchedFile("FAL_PROXY_JWT_JWKS_FILE", jwks_file,
                                 lambda text: load_jwks(text, "FAL_PROXY_JWT_JWKS_FILE"),
                                 install_jwks))  # fmt: skip
    if access.plans_file is not None:
        default = access.plans.default  # FAL_PROXY_QUOTAS: from the environment, fixed

        def install_plans(plans: Any) -> dict[str, Any]:
            admission.plans = plans  # one assignment: admitted calls keep their quotas
            warn_unpriced_budgets(plans, admission.prices)
            return {"plans": len(plans.plans), "callers": len(plans.callers)}

        files.append(WatchedFile("FAL_PROXY_PLANS_FILE", access.plans_file,
                                 lambda text: parse_plans(text, "FAL_PROXY_PLANS_FILE", default),
                                 install_plans))  # fmt: skip
    prices = prices_file(settings, admission)
    if prices is not None:
        files.append(prices)
    return files


def prices_file(settings: Settings, admission: Admission) -> WatchedFile[Any] | None:
    """``FAL_PROXY_PRICES_FILE`` (:mod:`proxy.limits.prices`), swapped in where admission
    holds the prices: a call admitted before keeps the estimate it reserved."""
    path = settings.access.prices_file
    if path is None:
        return None

    def install_prices(prices: Prices) -> dict[str, Any]:
        admission.prices = prices  # one assignment
        warn_unpriced_budgets(admission.plans, prices)
        return {"prices": len(prices)}

    return WatchedFile(VARIABLE, path, lambda text: parse_prices(text, VARIABLE), install_prices)
