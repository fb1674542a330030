"""``--workers N``: N proxy processes on one port, under uvicorn's supervisor.

The supervisor binds the port (SO_REUSEPORT, never listening); each worker listens on a
socket of its own on it (:func:`proxy.serve.server.worker_socket`), so the kernel spreads new
connections evenly between the workers.

uvicorn's ``Multiprocess`` starts each worker with multiprocessing's "spawn" and replaces a
worker that dies or stops answering; the subclasses here make each worker a full proxy
(:func:`proxy.serve.server.proxy_server`) and adjust what the proxy needs (see each class).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import socket
import threading
import time
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess
from uvicorn.supervisors.multiprocess import Process as UvicornWorker

from ..config.settings import Settings
from .server import (
    ProxyServer,
    exit_cleanly_on_signals,
    ignore_sighup,
    proxy_server,
    worker_socket,
)

# How long a new worker (a fresh interpreter) may take to answer its first health check.
WORKER_START_SECONDS = 60.0


class _Worker(UvicornWorker):
    """One worker under :class:`Supervisor`: uvicorn's worker process (a fresh interpreter,
    multiprocessing's "spawn", that answers the supervisor's health checks over a pipe),
    serving the proxy exactly as the single process does (:func:`_proxy_server`).

    uvicorn pickles this object into the new interpreter (``target`` is its bound method), so
    the settings travel with it; the app, the protocol class and uvicorn's config are built
    there, from them.
    """

    def __init__(
        self, config: uvicorn.Config, sockets: list[socket.socket], settings: Settings,
        restarts: Any = None,
    ) -> None:  # fmt: skip
        self.settings = settings  # before uvicorn's __init__, which captures this object
        # The supervisor's count of replaced workers, in shared memory: /metrics shows it.
        self.restarts = restarts
        self.proxy_server: ProxyServer | None = None
        # Supervisor side: has it answered a health check yet, and until when may it start.
        self.asked = self.answered = False
        self.start_deadline = 0.0
        super().__init__(config, sockets)

    def start(self) -> None:
        super().start()
        self.start_deadline = time.monotonic() + WORKER_START_SECONDS

    def healthy(self, timeout: float) -> bool:
        """(In the supervisor.) False when the worker is gone or hung: a health check not
        answered within ``timeout`` s, or none answered within WORKER_START_SECONDS of its start.

        uvicorn checks a starting worker as any other, with a blocking ping: a fresh interpreter
        still importing on a loaded machine would be killed as hung after 5 s (and started
        again, and killed again), and every check of it would hold up the whole supervisor.
        Until its first answer, a worker is only asked once and looked at without waiting.
        """
        if not self.process.is_alive():
            return False
        if self.answered:
            return self.ping(timeout)
        try:
            if not self.asked:
                self.parent_conn.send(b"ping")
                self.asked = True
            if self.parent_conn.poll(0):
                self.parent_conn.recv()
                self.answered = True
        except (OSError, EOFError, pickle.UnpicklingError):
            return False
        return self.answered or time.monotonic() < self.start_deadline

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # in the worker
        from ..observe.logs import configure_logging, get_logger

        configure_logging(self.settings.log_format, self.settings.log_level)
        exit_cleanly_on_signals()  # a SIGTERM before serving: nothing to drain, exit 0
        ignore_sighup()  # a reload asked before the app is up: it reads the files anyway
        if self.restarts is not None:
            from ..observe.runtime_stats import use_restart_count

            use_restart_count(self.restarts)  # fal_proxy_worker_restarts_total
        # Health checks are answered from now on, while the app is still being built.
        threading.Thread(target=self.always_pong, daemon=True).start()
        try:
            self.proxy_server = proxy_server(self.settings)
        except Exception:
            # Every replacement would fail the same way: make the supervisor stop, not loop.
            get_logger("proxy").exception("worker_start_failed", pid=os.getpid())
            raise SystemExit(STARTUP_FAILURE) from None
        self.proxy_server.run([worker_socket(s) for s in sockets or []])

    def pong(self) -> None:
        """Answer one health check: alive, and whether the server has started."""
        self.child_conn.recv()
        self.child_conn.send(self.proxy_server is not None and self.proxy_server.started)


class Supervisor(Multiprocess):
    """uvicorn's supervisor (``uvicorn.supervisors.Multiprocess``) running :class:`_Worker`.

    Every half second it health-checks each worker (:meth:`_Worker.healthy`); one that died
    (OOM, crash) or hung (no answer within ``timeout_worker_healthcheck``, 5 s, or a new one
    within WORKER_START_SECONDS: then killed) is replaced by a new worker on the same socket,
    except one that failed before serving (exit code 3): then the supervisor stops, since
    every replacement would fail alike. On SIGTERM or SIGINT it stops
    listening, sends SIGTERM to every worker (each drains as a single process does) and waits
    for them all.
    """

    def __init__(self, settings: Settings, sockets: list[socket.socket], workers: int) -> None:
        from ..observe.logs import get_logger

        # uvicorn reads the number of workers and the health-check timeout from this config and
        # hands it to each worker; the app named here is never loaded (see _Worker.target).
        config = uvicorn.Config("proxy.app.assemble:create_app", workers=workers, log_config=None)
        super().__init__(config, sockets)
        self.settings = settings
        self.log = get_logger("proxy")
        self.startup_failed = False
        # Workers replaced so far, shared with every worker (each reports it in /metrics as
        # fal_proxy_worker_restarts_total, whichever of them a scrape reaches).
        self.restarts = multiprocessing.get_context("spawn").RawValue("Q", 0)

    def start_worker(self) -> _Worker:
        worker = _Worker(self.config, self.sockets, self.settings, self.restarts)
        worker.start()
        self.log.info("worker_started", pid=worker.pid, supervisor_pid=os.getpid())
        return worker

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            self.processes.append(self.start_worker())

    def keep_subprocess_alive(self) -> None:
        # uvicorn's keep_subprocess_alive, with proxy workers and a structured line per event.
        if self.should_exit.is_set():
            return  # stopping: the workers are draining, not to be replaced
        for idx, process in enumerate(self.processes):
            assert isinstance(process, _Worker)
            if process.healthy(timeout=self.config.timeout_worker_healthcheck):
                continue
            hung = process.exitcode is None  # alive, but no answer to the health check
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                self.log.error(
                    "worker_failed_to_start",
                    pid=process.pid,
                    note="stopping: every replacement would fail the same way",
                )
                self.startup_failed = True
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            self.log.warning("worker_died", pid=process.pid, hung=hung, **_ending(process.exitcode))
            self.restarts.value += 1
            self.processes[idx] = self.start_worker()

    def terminate_all(self) -> None:
        # The parent's copy of the socket would keep it listening (connections queued, never
        # answered) while the workers drain: close it, so the last worker's close refuses them.
        for sock in self.sockets:
            sock.close()
        super().terminate_all()

    def _fixed(self, name: str) -> None:
        self.log.warning(
            "signal_ignored",
            signal=name,
            note="the number of workers is fixed (--workers); a worker is replaced when it dies",
        )

    def handle_hup(self) -> None:  # uvicorn: restart every worker; here: reload the files
        """SIGHUP: each worker re-reads its files (:mod:`proxy.app.config_reload`). Only
        workers that have answered a health check get it: one still starting could die of
        it before it ignores it, and it reads the files as they are when its app starts."""
        pids = []
        for process in self.processes:
            assert isinstance(process, _Worker)
            if process.answered and process.pid is not None and process.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)
                    pids.append(process.pid)
        self.log.info("reload_forwarded", signal="SIGHUP", workers=pids)

    def handle_ttin(self) -> None:  # uvicorn: one worker more
        self._fixed("SIGTTIN")

    def handle_ttou(self) -> None:  # uvicorn: one worker fewer
        self._fixed("SIGTTOU")

    def exit_code(self) -> int:
        """0 when every worker drained and exited cleanly, 1 otherwise."""
        failed = self.startup_failed
        for process in self.processes:
            # -SIGTERM: stopped before it set up its handlers, so with nothing to drain.
            if process.exitcode not in (0, -signal.SIGTERM):
                self.log.error("worker_failed", pid=process.pid, **_ending(process.exitcode))
                failed = True
        return 1 if failed else 0


def _ending(exitcode: int | None) -> dict[str, Any]:
    """A process's end for a log line: its exit code, or the signal that ended it."""
    if exitcode is not None and exitcode < 0:
        return {"signal": signal.Signals(-exitcode).name}
    return {"exitcode": exitcode}
