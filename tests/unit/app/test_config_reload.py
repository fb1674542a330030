"""WatchedFile (proxy/app/config_reload.py): what counts as a change, and what is said once.

The log is replaced by a recorder; files are real files in a temporary folder.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.app import config_reload
from proxy.app.config_reload import RACY_NS, Reloader, WatchedFile, line_of, signature


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append(("info", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event, fields))

    def exception(self, event: str, **fields: Any) -> None:
        self.lines.append(("exception", event, fields))

    def events(self, level: str | None = None) -> list[str]:
        return [e for lvl, e, _ in self.lines if level is None or lvl == level]


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(config_reload, "log", recorder)
    return recorder


def parse_lines(text: str) -> list[str]:
    """Non-empty lines; a line 'bad' is refused with its number, as the parsers do."""
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if line == "bad":
            raise ValueError(f"TEST_FILE line {number}: bad entry")
    return [line for line in lines if line]


class Watched:
    """A WatchedFile over ``path`` with parses counted and installs recorded."""

    def __init__(self, path: Path) -> None:
        self.parses = 0
        self.installed: list[list[str]] = []

        def load(text: str) -> list[str]:
            self.parses += 1
            return parse_lines(text)

        def install(value: list[str]) -> dict[str, Any]:
            self.installed.append(value)
            return {"entries": len(value)}

        self.file = WatchedFile("TEST_FILE", str(path), load, install)


def age(path: Path, seconds: float = 10.0) -> None:
    """Make the file's mtime old enough to trust its signature (no racy re-read)."""
    old = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(old, old))


def test_an_unchanged_file_is_neither_read_again_nor_parsed(
    tmp_path: Path, log: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    path.write_text("a\nb\n")
    age(path)
    watched = Watched(path)
    assert watched.file.check(quiet=True)
    assert watched.installed == [["a", "b"]] and log.lines == []  # the first check: quiet
    reads: list[str] = []
    real = Path.read_bytes

    def counted(self: Path) -> bytes:
        reads.append(str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", counted)
    for _ in range(5):
        assert not watched.file.check()
    assert reads == [] and watched.parses == 1  # one stat per check, nothing more


def test_a_changed_file_is_parsed_once_and_installed_with_a_line(
    tmp_path: Path, log: Recorder
) -> None:
    path = tmp_path / "f"
    path.write_text("a\n")
    watched = Watched(path)
    watched.file.check(quiet=True)
    path.write_text("a\nb\nc\n")
    assert watched.file.check()
    assert watched.installed[-1] == ["a", "b", "c"]
    [(level, event, fields)] = log.lines
    assert (level, event, fields["variable"], fields["file"], fields["entries"]) == (
        "info", "config_reloaded", "TEST_FILE", str(path), 3,
    )  # fmt: skip
    assert fields["pid"] == os.getpid()


def test_the_same_content_written_again_is_not_parsed_again(tmp_path: Path, log: Recorder) -> None:
    path = tmp_path / "f"
    path.write_text("a\n")
    watched = Watched(path)
    watched.file.check(quiet=True)
    path.write_text("a\n")
    os.utime(path, ns=(time.time_ns() + 5_000_000_000,) * 2)  # a new signature for sure
    assert not watched.file.check()
    assert watched.parses == 1 and log.lines == []


def test_a_rewrite_that_keeps_size_and_mtime_is_caught_while_the_mtime_is_recent(
    tmp_path: Path, log: Recorder
) -> None:
    """A coarse file system: the rewrite in the same tick leaves the signature but the
    inode and ctime alike; caught because a recent mtime is never trusted."""
    path = tmp_path / "f"
    path.write_text("a\n")
    stamp = time.time_ns()
    os.utime(path, ns=(stamp, stamp))
    watched = Watched(path)
    watched.file.check(quiet=True)
    path.write_text("b\n")  # same size
    os.utime(path, ns=(stamp, stamp))  # same mtime
    watched.file._seen = signature(str(path))  # and, as on such a system, the same signature
    assert watched.file.check()
    assert watched.installed[-1] == ["b"]


def test_an_old_mtime_is_trusted(tmp_path: Path, log: Recorder) -> None:
    path = tmp_path / "f"
    path.write_text("a\n")
    age(path, seconds=RACY_NS / 1e9 + 5)
    watched = Watched(path)
    watched.file.check(quiet=True)
    assert not watched.file._racy


def test_a_symlink_swap_is_a_change(tmp_path: Path, log: Recorder) -> None:
    """Kubernetes: <file> → ..data/<file>, ..data → ..<timestamp>; an update swaps ..data."""
    first, second = tmp_path / "..v1", tmp_path / "..v2"
    first.mkdir()
    second.mkdir()
    (first / "f").write_text("a\n")
    (second / "f").write_text("b\n")
    for folder in (first, second):
        age(folder / "f")
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "f").symlink_to("..data/f")
    watched = Watched(tmp_path / "f")
    watched.file.check(quiet=True)
    assert not watched.file.check()
    (tmp_path / "..data_tmp").symlink_to(second.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert watched.file.check()
    assert watched.installed[-1] == ["b"]


def test_a_broken_file_keeps_the_last_good_version_and_warns_once_per_change(
    tmp_path: Path, log: Recorder
) -> None:
    path = tmp_path / "f"
    path.write_text("a\n")
    watched = Watched(path)
    watched.file.check(quiet=True)
    path.write_text("a\nbad\n")
    for _ in range(5):
        assert not watched.file.check()
    assert watched.installed == [["a"]]
    [(level, event, fields)] = log.lines
    assert (level, event, fields["variable"], fields["file"], fields["line"]) == (
        "warning", "config_file_unusable", "TEST_FILE", str(path), 2,
    )  # fmt: skip
    assert fields["keeping"] == "the last good version"

    path.write_text("a\nx\nbad\n")  # another broken version: one more warning
    for _ in range(3):
        watched.file.check()
    assert log.events("warning") == ["config_file_unusable"] * 2
    assert log.lines[-1][2]["line"] == 3

    assert not watched.file.check(force=True)  # asked (SIGHUP): said again
    assert log.events("warning") == ["config_file_unusable"] * 3

    path.write_text("a\nc\n")  # fixed: installed, with the reload line
    assert watched.file.check()
    assert watched.installed[-1] == ["a", "c"] and log.lines[-1][1] == "config_reloaded"


def test_an_empty_or_missing_file_keeps_the_last_good_version(
    tmp_path: Path, log: Recorder
) -> None:
    path = tmp_path / "f"
    path.write_text("a\n")
    watched = Watched(path)
    watched.file.check(quiet=True)
    path.write_text("  \n")  # a write caught halfway
    watched.file.check()
    watched.file.check()
    assert watched.parses == 1  # never handed to the parser
    assert log.lines[-1][2]["problem"] == f"TEST_FILE: {path} is empty"
    path.unlink()
    for _ in range(3):
        watched.file.check()
    assert log.events() == ["config_file_unusable"] * 2
    assert "cannot read" in log.lines[-1][2]["problem"] and "line" not in log.lines[-1][2]
    path.write_text("a\n")  # back, as it was: still worth saying it is in use again
    assert watched.file.check()
    assert log.events() == ["config_file_unusable"] * 2 + ["config_reloaded"]
    assert watched.installed == [["a"], ["a"]]


def test_a_parser_that_trips_on_something_else_is_a_warning_too(
    tmp_path: Path, log: Recorder
) -> None:
    path = tmp_path / "f"
    path.write_text("a\n")

    def load(text: str) -> str:
        raise KeyError("kty")

    file = WatchedFile("TEST_FILE", str(path), load, lambda value: {})
    assert not file.check()
    assert log.lines[0][2]["problem"] == "KeyError: 'kty'"


@pytest.mark.parametrize(
    ("problem", "line"),
    [
        ("FAL_PROXY_PLANS_FILE: not valid TOML: Illegal character (at line 3, column 15)", 3),
        ("FAL_PROXY_CLIENT_TOKENS_FILE line 12: expected '<caller-id> <token>'", 12),
        ("FAL_PROXY_JWT_JWKS_FILE: not a usable JWKS: Expecting value: line 2 column 1", 2),
        ("FAL_PROXY_PLANS_FILE: caller 'x' names no plan of [plans]", None),
    ],
)
def test_the_line_is_taken_from_the_parsers_message(problem: str, line: int | None) -> None:
    assert line_of(problem) == line


def test_sighup_checks_every_file_at_once(tmp_path: Path, log: Recorder) -> None:
    """The reloader's loop: nothing before the interval, unless asked; asked, it re-reads."""
    path = tmp_path / "f"
    path.write_text("a\n")
    age(path)
    watched = Watched(path)

    async def scenario() -> None:
        reloader = Reloader([watched.file], interval=3600)
        reloader.start()
        try:
            assert watched.installed == [["a"]]  # the first check, at start
            path.write_text("b\n")
            age(path)
            await asyncio.sleep(0)  # the loop is waiting on its interval: nothing read
            assert watched.installed == [["a"]]
            reloader.ask()
            for _ in range(100):
                if len(watched.installed) == 2:
                    break
                await asyncio.sleep(0)
            assert watched.installed[-1] == ["b"]
        finally:
            reloader.stop()

    before = signal.getsignal(signal.SIGHUP)
    try:
        asyncio.run(scenario())
    finally:
        signal.signal(signal.SIGHUP, before)
    assert log.events() == ["config_reload_requested", "config_reloaded"]
