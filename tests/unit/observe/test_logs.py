from __future__ import annotations

import pytest

from proxy.observe.logs import redact_query


@pytest.mark.parametrize(
    ("query", "shown"),
    [
        ("", ""),
        ("logs=1", "logs=1"),
        ("storage_type=fal-cdn-v3", "storage_type=fal-cdn-v3"),
        ("fal_jwt_token=eyJabc", "fal_jwt_token=[redacted]"),
        (
            "fal_webhook=https%3A%2F%2Fx.com%2Fh%3Fsecret%3D1&logs=0",
            "fal_webhook=[redacted]&logs=0",
        ),
        ("prompt=a%20private%20thing&flag", "prompt=[redacted]&flag"),
    ],
)
def test_query_values_are_redacted_except_harmless_ones(query: str, shown: str) -> None:
    assert redact_query(query) == shown


class _Recorder:
    """A binary file that keeps each write() apart."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.writes.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


def test_the_timestamp_is_structlogs_iso_utc_text_to_the_microsecond(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time as real_time
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from proxy.observe import logs

    clock = iter([1_790_000_000.25, 1_790_000_000.999999, 1_790_000_001.0, 1_790_000_061.5])
    fake = SimpleNamespace(time=lambda: next(clock), strftime=real_time.strftime,
                           gmtime=real_time.gmtime)  # fmt: skip
    monkeypatch.setattr(logs, "time", fake)
    monkeypatch.setattr(logs, "_second", [-1, ""])
    stamps = [logs.stamp_utc(None, "info", {})["timestamp"] for _ in range(4)]
    # Read back by the stdlib, every one is the instant it was given (the cached second
    # changes with the clock, minutes included).
    seen = [datetime.fromisoformat(stamp).timestamp() for stamp in stamps]
    assert seen == pytest.approx([1_790_000_000.25, 1_790_000_000.999999, 1_790_000_001.0,
                                  1_790_000_061.5], abs=1e-6)  # fmt: skip
    assert stamps[2] == "2026-09-21T14:13:21.000000Z"
    assert all(s.endswith("Z") and len(s) == len("2026-09-21T14:13:21.000000Z") for s in stamps)
    monkeypatch.setattr(logs, "time", real_time)
    now = datetime.now(UTC).timestamp()
    assert datetime.fromisoformat(logs.stamp_utc(None, "info", {})["timestamp"]).timestamp() == (
        pytest.approx(now, abs=0.5)
    )


def test_lines_logged_in_one_turn_of_the_loop_go_out_in_one_write() -> None:
    import asyncio
    import threading

    from proxy.observe.logs import LineWriter

    file = _Recorder()
    writer = LineWriter(file)  # type: ignore[arg-type]
    writer.msg(b"before the loop")  # at once: nothing would flush it
    assert file.writes == [b"before the loop\n"]

    async def main() -> None:
        writer._loop, writer._thread = asyncio.get_running_loop(), threading.get_ident()
        writer.info(b"a")
        writer.warning(b"b")
        assert file.writes == [b"before the loop\n"]  # not yet: the turn is not over
        other = threading.Thread(target=writer.msg, args=(b"from a thread",))
        other.start()
        other.join()
        assert file.writes[-1] == b"from a thread\n"  # other threads: at once
        await asyncio.sleep(0)
        assert file.writes[-1] == b"a\nb\n"
        writer.msg(b"c")
        writer._loop = writer._thread = None
        writer.flush()  # as detach_current
        assert file.writes[-1] == b"c\n"

    asyncio.run(main())
    loop = asyncio.new_event_loop()
    loop.close()
    writer._loop, writer._thread = loop, threading.get_ident()
    writer.msg(b"after the loop closed")  # at once, not lost in a closed loop
    assert file.writes[-1] == b"after the loop closed\n"
    assert b"".join(file.writes).count(b"\n") == 6


def test_only_the_request_lines_wait_for_the_turn_others_are_written_at_once() -> None:
    # A lifecycle line (gateway_bypassed, say) logged before an answer must be out before it.
    import asyncio
    import io

    from proxy.observe.logs import LineWriter, configure_logging, get_logger

    stream = io.TextIOWrapper(io.BytesIO(), write_through=True)
    configure_logging("json", "info", stream=stream)

    async def main() -> tuple[bytes, bytes]:
        LineWriter.attach_current(asyncio.get_running_loop())
        try:
            get_logger("proxy.request").info("request", status=200)
            get_logger("proxy.fallback").warning("gateway_bypassed", state="open")
            during = stream.buffer.getvalue()  # type: ignore[attr-defined]
            await asyncio.sleep(0)
            return during, stream.buffer.getvalue()  # type: ignore[attr-defined]
        finally:
            LineWriter.detach_current()

    during, after = asyncio.run(main())
    assert b"gateway_bypassed" in during and b'"request"' not in during
    assert after.index(b"gateway_bypassed") < after.index(b'"event":"request"')


def test_a_request_line_still_pending_is_written_at_exit_or_when_logging_is_set_again() -> None:
    import asyncio
    import io
    import subprocess
    import sys

    from proxy.observe.logs import LineWriter, configure_logging, get_logger

    # Logged on a loop that never runs again (a crash, sys.exit): the exit writes it.
    code = (
        "import asyncio, sys\n"
        "from proxy.observe.logs import LineWriter, configure_logging, get_logger\n"
        "configure_logging('json', stream=sys.stdout)\n"
        "LineWriter.attach_current(asyncio.new_event_loop())\n"
        "get_logger('proxy.request').info('request', pending=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0 and b'"pending":true' in done.stdout, done

    # Configured again (as tests do): the last writer's pending line goes to its stream.
    first = io.TextIOWrapper(io.BytesIO(), write_through=True)
    configure_logging("json", "info", stream=first)
    loop = asyncio.new_event_loop()
    try:
        LineWriter.attach_current(loop)
        get_logger("proxy.request").info("request", pending=True)
        configure_logging("json", "info", stream=io.TextIOWrapper(io.BytesIO()))
    finally:
        loop.close()
    assert b'"pending":true' in first.buffer.getvalue()  # type: ignore[attr-defined]


def test_httpx_request_lines_are_not_logged_even_at_debug() -> None:
    """httpx's per-request INFO line holds the whole URL: a JWKS URL's query can carry a
    signature under a name redaction does not know ("sig")."""
    import io
    import logging

    from proxy.observe.logs import configure_logging

    for level in ("debug", "info"):
        configure_logging("json", level, io.TextIOWrapper(io.BytesIO(), write_through=True))
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO), level
        assert logging.getLogger("httpx").isEnabledFor(logging.WARNING), level
