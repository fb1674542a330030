"""proxy.serve.protocol.GatheredWrites: a response's writes in one turn of the loop go out
together, in order, and nothing is left behind when the connection ends."""

from __future__ import annotations

import asyncio

from proxy.serve.protocol import GATHER_LIMIT, GatheredWrites


class FakeTransport:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def writelines(self, data: list[bytes]) -> None:
        self.calls.append(("writelines", list(data)))

    def close(self) -> None:
        self.calls.append(("close", None))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str) -> str:
        return f"extra {name}"


def test_a_head_and_a_body_in_one_turn_are_one_write_at_its_end() -> None:
    async def main() -> list[tuple[str, object]]:
        transport = FakeTransport()
        gathered = GatheredWrites(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        gathered.write(b"HTTP/1.1 200 OK\r\n\r\n")
        gathered.write(b"body")
        assert transport.calls == []  # held until the turn ends
        await asyncio.sleep(0)
        assert transport.calls == [("writelines", [b"HTTP/1.1 200 OK\r\n\r\n", b"body"])]
        gathered.write(b"a later chunk")  # a streamed body: a turn at a time, as before
        await asyncio.sleep(0)
        assert gathered.get_extra_info("peername") == "extra peername"
        return transport.calls

    assert asyncio.run(main())[-1] == ("write", b"a later chunk")


def test_close_and_the_limit_write_at_once_in_order() -> None:
    async def main() -> None:
        transport = FakeTransport()
        gathered = GatheredWrites(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        big = b"x" * GATHER_LIMIT
        gathered.write(b"head")
        gathered.write(big)  # past the limit: no waiting
        assert transport.calls == [("writelines", [b"head", big])]
        gathered.write(b"last")
        gathered.close()  # a connection: close answer: its last bytes first
        assert transport.calls[1:] == [("write", b"last"), ("close", None)]
        gathered.write(b"after the client left")  # dropped, as the transport would
        await asyncio.sleep(0)
        assert len(transport.calls) == 3

    asyncio.run(main())
