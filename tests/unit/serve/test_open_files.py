"""The open-files limit: raised to the hard one at start-up, and what it allows, in one line."""

from __future__ import annotations

from typing import Any

from proxy.serve.open_files import (
    LOW_STREAMS,
    OpenFiles,
    log_open_files,
    raise_open_files,
    read_open_files,
    streams_allowed,
)

INF = 2**63 - 1  # stands for RLIM_INFINITY


class Limits:
    def __init__(self, soft: int, hard: int, fail: bool = False) -> None:
        self.soft, self.hard, self.fail = soft, hard, fail
        self.set_calls: list[tuple[int, int]] = []

    def get(self) -> tuple[int, int]:
        return self.soft, self.hard

    def set(self, limits: tuple[int, int]) -> None:
        self.set_calls.append(limits)
        if self.fail:
            raise ValueError("not allowed")
        self.soft = limits[0]


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append(("info", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event, fields))


def test_two_descriptors_per_stream_after_a_reserve() -> None:
    assert streams_allowed(1024) == 480
    assert streams_allowed(20_000) == 9_968
    assert streams_allowed(10) == 0


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    limits = Limits(1024, 65_536)
    got = raise_open_files(limits.get, limits.set, INF)
    assert limits.set_calls == [(65_536, 65_536)]
    assert got == OpenFiles(1024, 65_536, 65_536)
    assert got.raised and not got.low
    assert got.streams == 32_736
    text = got.sentence()
    assert "about 32,736 concurrent streams" in text and "two descriptors each" in text
    assert "raised from 1,024 to the hard limit" in text


def test_an_infinite_hard_limit_raises_to_2_20_and_says_no_limit() -> None:
    limits = Limits(1024, INF)
    got = raise_open_files(limits.get, limits.set, INF)
    assert limits.set_calls == [(1 << 20, INF)]
    assert got is not None and got.soft == 1 << 20 and got.hard == -1
    assert "(hard no limit)" in got.sentence()


def test_already_at_the_hard_limit_nothing_is_set() -> None:
    limits = Limits(20_000, 20_000)
    got = raise_open_files(limits.get, limits.set, INF)
    assert limits.set_calls == []
    assert got is not None and not got.raised and "raised" not in got.sentence()


def test_a_refused_raise_is_said_and_a_low_limit_warns() -> None:
    limits = Limits(1024, 4096, fail=True)
    got = raise_open_files(limits.get, limits.set, INF)
    assert got is not None and got.soft == 1024 and got.error == "not allowed" and got.low
    log = Log()
    log_open_files(log, got)
    [(level, event, fields)] = log.lines
    assert (level, event) == ("warning", "open_files_limit")
    assert fields["streams"] == 480 < LOW_STREAMS
    assert "ulimit -n" in fields["detail"] and "nofile" in fields["detail"]
    assert "could not raise" in fields["detail"]


def test_a_low_hard_limit_warns_even_once_raised() -> None:
    limits = Limits(256, 1024)
    log = Log()
    log_open_files(log, raise_open_files(limits.get, limits.set, INF))
    [(level, _, fields)] = log.lines
    assert level == "warning" and fields["soft_before"] == 256 and fields["soft"] == 1024


def test_enough_is_one_info_line() -> None:
    limits = Limits(1024, 1 << 20)
    log = Log()
    log_open_files(log, raise_open_files(limits.get, limits.set, INF))
    [(level, event, fields)] = log.lines
    assert (level, event) == ("info", "open_files_limit")
    assert fields["raised"] is True and fields["streams"] == ((1 << 20) - 64) // 2
    assert "setting" not in fields


def test_read_changes_nothing() -> None:
    limits = Limits(1024, 4096)
    got = read_open_files(limits.get, INF)
    assert got == OpenFiles(1024, 1024, 4096) and not got.raised


def test_the_real_limit_reads() -> None:
    got = read_open_files()
    assert got is not None and (got.soft == -1 or got.soft > 0)
