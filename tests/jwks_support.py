"""A JWKS endpoint on loopback for the JWT tests: serves ``keys`` (or a raw ``body``), both
changeable while it runs, and counts its fetches. Plain http, or https with a certificate
from a local CA (``tls_folder``: the CA's PEM is written there as ``ca_file``)."""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme


class JwksServer:
    def __init__(self, tls_folder: Path | None = None) -> None:
        self.keys: list[dict[str, Any]] = []
        self.body: bytes | None = None  # served instead of ``keys`` when set
        self.redirect: str | None = None  # answered with a 302 to this URL when set
        self.raw: bytes | None = None  # when set: written as the whole answer, then closed
        # When set: a byte every 20 ms of an answer that never ends, in its "body" or while
        # still in its "headers".
        self.drip: str | None = None
        self.stopped = threading.Event()
        # When set: each fetch, once counted and ``arrived`` set, waits for this gate before
        # it is answered (the test opens it).
        self.gate: threading.Event | None = None
        self.arrived = threading.Event()
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.fetches += 1
                server.arrived.set()
                if server.gate is not None:
                    server.gate.wait()
                if server.raw is not None:
                    self.wfile.write(server.raw)
                    self.close_connection = True
                    return
                if server.redirect is not None:
                    self.send_response(302)
                    self.send_header("location", server.redirect)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                if server.drip is not None:
                    self.send_response(200)
                    if server.drip == "body":
                        self.send_header("content-length", str(1 << 20))
                        self.end_headers()
                        self.wfile.write(b'{"keys": [')
                    else:
                        self.flush_headers()
                        self.wfile.write(b"x-slow: ")
                    while not server.stopped.wait(0.02):  # until the server stops or the
                        try:  # client leaves
                            self.wfile.write(b" ")
                            self.wfile.flush()
                        except OSError:
                            return
                    return
                body = server.body or json.dumps({"keys": server.keys}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        port = self.httpd.server_address[1]
        self.ca_file: Path | None = None
        if tls_folder is None:
            self.url = f"http://127.0.0.1:{port}/jwks.json"
        else:
            ca = trustme.CA()
            self.ca_file = tls_folder / "jwks-ca.pem"
            ca.cert_pem.write_to_path(str(self.ca_file))
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1").configure_cert(context)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.url = f"https://127.0.0.1:{port}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.gate is not None:
            self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()
