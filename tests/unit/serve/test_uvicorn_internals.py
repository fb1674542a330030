"""serve/uvicorn_internals: what the proxy relies on in uvicorn is checked at start-up."""

from __future__ import annotations

import asyncio

import pytest
from uvicorn.protocols.http import httptools_impl

from proxy.config.envvars import SettingsError
from proxy.serve import uvicorn_internals
from proxy.serve.uvicorn_internals import body_in_hand, check_uvicorn, missing


def test_the_installed_uvicorn_has_everything_the_proxy_relies_on() -> None:
    assert missing() == []
    check_uvicorn()  # does not raise


class CycleWithoutMoreBody:
    """A request cycle as a uvicorn that renamed ``more_body`` would have it."""

    def __init__(self) -> None:
        self.transport = self.response_complete = self.disconnected = self.flow = None
        self.message_event = asyncio.Event()
        self.body_complete = False

    async def receive(self) -> None:
        return None


def test_a_uvicorn_that_changed_stops_the_start_with_one_line_naming_what_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(uvicorn_internals, "RequestResponseCycle", CycleWithoutMoreBody)
    assert missing() == ["CycleWithoutMoreBody.more_body"]
    with pytest.raises(SettingsError) as info:
        check_uvicorn()
    message = str(info.value)
    assert "CycleWithoutMoreBody.more_body" in message and "uvicorn" in message
    assert "\n" not in message


def test_a_protocol_hook_that_is_gone_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    class Protocol(httptools_impl.HttpToolsProtocol):
        send_400_response = None  # type: ignore[assignment]

    monkeypatch.setattr(uvicorn_internals, "HttpToolsProtocol", Protocol)
    assert "Protocol.send_400_response" in missing()


def test_body_in_hand_only_for_a_uvicorn_cycle_whose_body_is_complete() -> None:
    cycle = object.__new__(httptools_impl.RequestResponseCycle)
    cycle.more_body = False
    assert body_in_hand(cycle.receive) is True
    cycle.more_body = True
    assert body_in_hand(cycle.receive) is False

    async def receive() -> dict[str, object]:  # another server's receive: always the timer
        return {}

    assert body_in_hand(receive) is False
