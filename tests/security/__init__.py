"""Security tests: a corpus of hostile targets and property-based tests of the pure policies.

``hostile_targets.txt`` holds the corpus; its header documents the line format and the
escaping scheme, which :func:`decode_value` implements.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Self

CORPUS_PATH = Path(__file__).with_name("hostile_targets.txt")

_ESCAPE = re.compile(
    r"\\(?:(?P<simple>[\\trne])|x(?P<x>[0-9a-fA-F]{2})|u(?P<u>[0-9a-fA-F]{4})"
    r"|\*(?P<count>[0-9]+)\{(?P<text>[^}]*)\})"
)
_SIMPLE = {"\\": "\\", "t": "\t", "r": "\r", "n": "\n", "e": ""}


@dataclass(frozen=True)
class Case:
    value: str  # the decoded header value
    comment: str
    line: int  # line number in the corpus file
    raw: str  # the value as written in the file

    @property
    def id(self) -> str:
        return f"L{self.line}:{self.raw[:60]}"


def decode_value(raw: str) -> str:
    """Decode one escaped corpus value (see the header of ``hostile_targets.txt``)."""
    out: list[str] = []
    pos = 0
    while pos < len(raw):
        char = raw[pos]
        if char == "\\":
            match = _ESCAPE.match(raw, pos)
            if match is None:
                raise ValueError(f"bad escape at column {pos + 1} in {raw!r}")
            if match["simple"] is not None:
                out.append(_SIMPLE[match["simple"]])
            elif match["x"] is not None:
                out.append(chr(int(match["x"], 16)))
            elif match["u"] is not None:
                out.append(chr(int(match["u"], 16)))
            else:
                out.append(match["text"] * int(match["count"]))
            pos = match.end()
            continue
        if char == "#" or not ("\x21" <= char <= "\x7e"):
            raise ValueError(f"unescaped {char!r} at column {pos + 1} in {raw!r}")
        out.append(char)
        pos += 1
    return "".join(out)


def parse_corpus(text: str) -> list[Case]:
    cases: list[Case] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip(" \t")
        if not stripped or stripped.startswith("#"):
            continue
        raw, _, rest = stripped.replace("\t", " ").partition(" ")
        rest = rest.strip(" ")
        if rest and not rest.startswith("#"):
            raise ValueError(f"line {number}: text after the value is not a '# comment': {line!r}")
        try:
            value = decode_value(raw)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        cases.append(Case(value, rest.lstrip("#").strip(), number, raw))
    return cases


def load_corpus() -> list[Case]:
    return parse_corpus(CORPUS_PATH.read_text(encoding="utf-8"))


# --- a raw HTTP/1.1 client --------------------------------------------------------------
# httpx and http.client refuse to send some of the corpus (CR, LF, NUL, non-ASCII): this
# one writes whatever bytes it is given, on one keep-alive connection.

# The server's answer to bytes its HTTP parser refuses (proxy/server_protocol.py; uvicorn's
# own plain-text one on servers without that protocol).
_SERVER_PARSER_400 = (
    b'{"message": "invalid HTTP request", "detail": "the request could not be parsed as HTTP/1.1"}',
    b"Invalid HTTP request received.",
)


@dataclass
class RawResponse:
    status: int
    head: bytes  # status line and headers, as received
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    @property
    def from_http_parser(self) -> bool:
        """uvicorn's own 400 for bytes its HTTP parser refuses (the app never saw them)."""
        return self.status == 400 and self.body in _SERVER_PARSER_400

    @property
    def raw(self) -> bytes:
        return self.head + b"\r\n\r\n" + self.body


class RawHTTP:
    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        hostport = base_url.split("://", 1)[1].rstrip("/")
        host, _, port = hostport.rpartition(":")
        self.address = (host, int(port))
        self.hostport = hostport.encode()
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.connections = 0  # how many connections were opened

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buffer = None, b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
    ) -> RawResponse:
        lines = [f"{method} {target} HTTP/1.1".encode(), b"host: " + self.hostport]
        lines += [name + b": " + value for name, value in headers]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(b"content-length: " + str(len(body)).encode())
        data = b"\r\n".join(lines) + b"\r\n\r\n" + body
        for attempt in (1, 2):
            fresh = self.sock is None
            if fresh:
                self.sock = socket.create_connection(self.address, timeout=self.timeout)
                self.connections += 1
            try:
                self.sock.sendall(data)
                response = self._read_response(method)
            except (ConnectionError, _Closed):
                self.close()
                if fresh or attempt == 2:  # a fresh connection failing is a real failure
                    raise
                continue  # the server closed an idle keep-alive connection: retry once
            if (response.header(b"connection") or b"").lower() == b"close":
                self.close()
            return response
        raise AssertionError("unreachable")

    def _fill(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise _Closed()
        self.buffer += chunk

    def _read_response(self, method: str) -> RawResponse:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.split(b"\r\n")
        status = int(status_line.split(b" ")[1])
        headers = []
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        response = RawResponse(status, head, headers, b"")
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return response
        length = response.header(b"content-length")
        if length is not None:
            while len(self.buffer) < int(length):
                self._fill()
            response.body, self.buffer = self.buffer[: int(length)], self.buffer[int(length) :]
        elif (response.header(b"transfer-encoding") or b"").lower() == b"chunked":
            response.body = self._read_chunked()
        else:  # delimited by the end of the connection
            try:
                while True:
                    self._fill()
            except _Closed:
                pass
            response.body, self.buffer = self.buffer, b""
            self.close()
        return response

    def _read_chunked(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buffer:
                self._fill()
            size_line, self.buffer = self.buffer.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(self.buffer) < size + 2:
                self._fill()
            body += self.buffer[:size]
            self.buffer = self.buffer[size + 2 :]
            if size == 0:  # (no trailers from these servers)
                return body


class _Closed(Exception):
    """The server closed the connection."""
