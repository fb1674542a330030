"""The local CA for the TLS listener: real TLS handshakes on loopback, file modes, reuse."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import certifi
import pytest
from cryptography import x509

from proxy.tls_certs import ensure_certificates


def handshake(files_cert: Path, files_key: Path, cafile: Path, server_name: str) -> str:
    """Serve one TLS handshake with the proxy's certificate on 127.0.0.1; connect as a
    client that trusts only ``cafile`` and checks ``server_name``; return what it read."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files_cert, files_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hello over tls")
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(cafile))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            return tls.recv(100).decode()
    finally:
        thread.join(10)
        listener.close()


def test_a_client_trusting_the_bundle_verifies_every_name(tmp_path: Path) -> None:
    names = ["localhost", "proxy.internal", "127.0.0.1", "::1"]
    files = ensure_certificates(tmp_path / "state", names)
    for name in ("localhost", "proxy.internal", "127.0.0.1"):
        assert handshake(files.cert, files.key, files.bundle, name) == "hello over tls"
    with pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch|doesn.t match"):
        handshake(files.cert, files.key, files.bundle, "other.example")
    # Only the public roots: the local CA is what makes it verify.
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(files.cert, files.key, Path(certifi.where()), "localhost")


def test_the_bundle_keeps_the_public_roots(tmp_path: Path) -> None:
    files = ensure_certificates(tmp_path, ["localhost"])
    bundle = files.bundle.read_bytes()
    roots = Path(certifi.where()).read_bytes()
    public = roots.count(b"-----BEGIN CERTIFICATE-----")
    assert public > 50
    assert bundle.count(b"-----BEGIN CERTIFICATE-----") == public + 1
    assert files.ca.read_bytes() in bundle


def test_private_keys_are_0600_and_the_ca_signs_only_end_entities(tmp_path: Path) -> None:
    files = ensure_certificates(tmp_path / "s", ["localhost"])
    for key in (files.key, tmp_path / "s" / "ca-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]


def test_reused_while_right_reissued_when_the_names_change(tmp_path: Path) -> None:
    first = ensure_certificates(tmp_path, ["localhost"])
    cert, ca = first.cert.read_bytes(), first.ca.read_bytes()
    again = ensure_certificates(tmp_path, ["localhost"])
    assert (again.cert.read_bytes(), again.ca.read_bytes()) == (cert, ca)
    renamed = ensure_certificates(tmp_path, ["localhost", "proxy.internal"])
    assert renamed.cert.read_bytes() != cert and renamed.ca.read_bytes() == ca  # same CA
    assert (
        handshake(renamed.cert, renamed.key, renamed.bundle, "proxy.internal") == "hello over tls"
    )


def test_a_broken_state_is_made_again(tmp_path: Path) -> None:
    files = ensure_certificates(tmp_path, ["localhost"])
    (tmp_path / "ca-key.pem").write_bytes(b"not a key")
    os.chmod(tmp_path / "ca-key.pem", 0o600)
    remade = ensure_certificates(tmp_path, ["localhost"])
    assert (
        remade.ca.read_bytes() != b""
        and handshake(remade.cert, remade.key, remade.bundle, "localhost") == "hello over tls"
    )
    assert files.ca == remade.ca
