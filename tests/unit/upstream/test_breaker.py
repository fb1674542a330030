"""The gateway breaker's state machine on a fake clock, and its pure helpers."""

from __future__ import annotations

import aiohttp
import pytest

from proxy.upstream.breaker import (
    CLOSED,
    DIRECT,
    GATEWAY,
    HALF_OPEN,
    OPEN,
    Attempt,
    Breaker,
    direct_headers,
    direct_url,
    gateway_failed,
    never_left,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(failures: int = 3, window: float = 10.0, open_seconds: float = 30.0):
    clock, changes = Clock(), []
    made = Breaker(failures, window, open_seconds, clock=clock,
                   on_change=lambda old, new: changes.append((old, new)))  # fmt: skip
    return made, clock, changes


def test_n_failures_in_a_row_within_the_window_open_it_once() -> None:
    b, _, changes = breaker()
    for _ in range(2):
        b.failure(b.route())
    assert b.state == CLOSED
    b.failure(b.route())
    assert b.state == OPEN and changes == [(CLOSED, OPEN)]
    assert b.route() == DIRECT
    b.failure(GATEWAY)  # a call sent before it opened, failing late: no second change
    assert changes == [(CLOSED, OPEN)]


def test_a_success_in_between_or_a_slow_series_does_not_open_it() -> None:
    b, clock, _ = breaker()
    b.failure(b.route())
    b.failure(b.route())
    b.success(b.route())  # the run is broken
    b.failure(b.route())
    b.failure(b.route())
    assert b.state == CLOSED
    b, clock, _ = breaker()
    for _ in range(3):
        b.failure(b.route())
        clock.now += 6  # 3 failures over 12 s > the 10 s window
    assert b.state == CLOSED
    b.failure(b.route())  # the last 3 within 12 s still: no; a faster one would
    assert b.state == CLOSED


def test_after_open_seconds_one_probe_goes_and_decides() -> None:
    b, clock, changes = breaker()
    for _ in range(3):
        b.failure(b.route())
    clock.now += 29.9
    assert b.route() == DIRECT
    clock.now += 0.2
    probe = b.route()
    assert not probe.direct and probe.probe and b.state == HALF_OPEN
    assert b.route() == DIRECT  # only one probe at a time
    b.failure(probe)
    assert b.state == OPEN  # reopened, for open_seconds again
    clock.now += 30
    probe = b.route()
    b.success(probe)
    assert b.state == CLOSED and b.route() == GATEWAY
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN),
                       (HALF_OPEN, CLOSED)]  # fmt: skip


def test_an_abandoned_probe_hands_its_turn_on() -> None:
    b, clock, _ = breaker()
    for _ in range(3):
        b.failure(b.route())
    clock.now += 31
    first = b.route()
    b.abandon(first)  # the client left mid-probe: no verdict
    second = b.route()
    assert second.probe and not second.direct
    b.success(DIRECT)  # direct calls say nothing of the gateway
    assert b.state == HALF_OPEN


def test_the_helpers() -> None:
    key = aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None)
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))
    connecting, queued = Attempt(), Attempt()
    connecting.connecting = True
    assert never_left(refused, queued) and never_left(refused, connecting)
    assert never_left(aiohttp.ConnectionTimeoutError(), connecting)
    assert not never_left(aiohttp.ConnectionTimeoutError(), queued)  # the proxy's own pool
    assert not never_left(aiohttp.ServerDisconnectedError(), connecting)
    assert not never_left(aiohttp.ClientPayloadError(), connecting)
    assert gateway_failed(502, {}) and gateway_failed(520, {"cf-ray": "x"})
    assert not gateway_failed(500, {"x-fal-request-id": "r"}) and not gateway_failed(429, {})
    # A slow run timed out by the gateway or the edge: the caller's doing, not an outage.
    assert not gateway_failed(504, {}) and not gateway_failed(524, {"cf-ray": "x"})
    assert direct_url("fal.run", "/fal-ai/x", "a=1", None) == "https://fal.run/fal-ai/x?a=1"
    assert (direct_url("queue.fal.run", "/a/requests/1", "", "http://127.0.0.1:9/_fal")
            == "http://127.0.0.1:9/_fal/queue.fal.run/a/requests/1")  # fmt: skip
    headers = [("authorization", "Key k"), ("cf-aig-authorization", "Bearer t"),
               ("cf-aig-metadata", "{}"), ("x-fal-target-url", "https://queue.fal.run/a"),
               ("content-type", "application/json")]  # fmt: skip
    assert direct_headers(headers) == [("authorization", "Key k"),
                                       ("content-type", "application/json")]  # fmt: skip


@pytest.mark.parametrize("failures", [1, 2, 5])
def test_failures_setting(failures: int) -> None:
    b, _, _ = breaker(failures=failures)
    for _ in range(failures - 1):
        b.failure(b.route())
    assert b.state == CLOSED
    b.failure(b.route())
    assert b.state == OPEN
