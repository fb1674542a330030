"""proxy.serve.protocol.GatheredWrites: a response's head goes out with its body's first
write, in one call, a body's writes at once, in order, and nothing is left behind when
the connection ends."""

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


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n"


def test_a_head_goes_out_with_its_bodys_first_write_in_one_call() -> None:
    async def main() -> None:
        transport = FakeTransport()
        gathered = GatheredWrites(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        gathered.write(HEAD)
        assert transport.calls == []  # held for its body
        gathered.write(b"body")
        assert transport.calls == [("writelines", [HEAD, b"body"])]  # at once, together
        await asyncio.sleep(0)  # the turn's end finds nothing left
        assert len(transport.calls) == 1
        assert gathered.get_extra_info("peername") == "extra peername"

    asyncio.run(main())


def test_a_head_alone_waits_for_the_turns_end_and_a_streamed_body_never_waits() -> None:
    async def main() -> None:
        transport = FakeTransport()
        gathered = GatheredWrites(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        gathered.write(head)
        await asyncio.sleep(0)  # no body in this turn (an SSE stream's first event is later)
        assert transport.calls == [("write", head)]
        gathered.write(b"5\r\nevent\r\n")  # each event: written when relayed, not at the turn's end
        gathered.write(b"5\r\nnext!\r\n")
        assert transport.calls[1:] == [("write", b"5\r\nevent\r\n"), ("write", b"5\r\nnext!\r\n")]

    asyncio.run(main())


def test_close_and_the_limit_write_at_once_in_order() -> None:
    async def main() -> None:
        transport = FakeTransport()
        gathered = GatheredWrites(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        big_head = b"HTTP/1.1 200 OK\r\nx-big: " + b"x" * GATHER_LIMIT + b"\r\n\r\n"
        gathered.write(big_head)  # past the limit: not held
        assert transport.calls == [("write", big_head)]
        gathered.write(b"last")
        gathered.close()  # a connection: close answer: its last bytes first
        assert transport.calls[1:] == [("write", b"last"), ("close", None)]
        gathered.write(b"after the client left")  # dropped, as the transport would
        await asyncio.sleep(0)
        assert len(transport.calls) == 3

    asyncio.run(main())
