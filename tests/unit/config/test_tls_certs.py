"""The local CA for the TLS listener: real TLS handshakes on loopback, file modes, reuse."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import certifi
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.config.tls_certs import MAX_FILE_BYTES, UntrustedStateDir, ensure_certificates


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
    # A new CA too: each CA is constrained to exactly the names it was made for.
    assert renamed.cert.read_bytes() != cert and renamed.ca.read_bytes() != ca
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


# --- attacks on the state directory (found by a review) -------------------------------------

NAMES = ["localhost", "127.0.0.1", "::1"]


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _serve_once(cert: Path, key: Path) -> int:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def accept() -> None:
        conn, _ = server.accept()
        try:
            with context.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass
        server.close()

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1]


def test_the_local_ca_is_good_for_the_proxys_names_only(tmp_path: Path) -> None:
    """SSL_CERT_FILE makes a whole client process trust the CA: whoever got its key must not
    be able to impersonate another site (rest.fal.ai here) to that process."""
    files = ensure_certificates(tmp_path, NAMES)
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    ca_key = serialization.load_pem_private_key((tmp_path / "ca-key.pem").read_bytes(), None)
    assert ca.extensions.get_extension_for_class(x509.NameConstraints).critical
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rest.fal.ai")]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(7)
        .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("rest.fal.ai")]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )  # fmt: skip
    (tmp_path / "forged.pem").write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "forged-key.pem").write_bytes(_pem_key(key))
    port = _serve_once(tmp_path / "forged.pem", tmp_path / "forged-key.pem")
    client = ssl.create_default_context(cafile=str(files.bundle))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        client.wrap_socket(raw, server_hostname="rest.fal.ai")
    # ...while the proxy's own certificate, for each of its names, still verifies.
    for name in NAMES:
        assert handshake(files.cert, files.key, files.bundle, name) == "hello over tls"


def test_a_planted_ca_with_a_readable_key_is_not_adopted(tmp_path: Path) -> None:
    """Whoever can write a shared state directory plants a CA of their own; the proxy must
    make its own instead of trusting files it did not make private."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    evil_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker CA")])
    now = dt.datetime.now(dt.UTC)
    evil_ca = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(evil_key.public_key()).serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=9))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(evil_key, hashes.SHA256())
    )  # fmt: skip
    (state / "ca.pem").write_bytes(evil_ca.public_bytes(serialization.Encoding.PEM))
    (state / "ca-key.pem").write_bytes(_pem_key(evil_key))
    (state / "ca-key.pem").chmod(0o644)
    # Trusted as a volume only the pod's containers share (else refused outright, below):
    # what is in it is still never adopted unless it is the proxy's own.
    files = ensure_certificates(state, NAMES, trusted_volume=True)
    used = x509.load_pem_x509_certificate(files.ca.read_bytes())
    assert used.subject != name
    assert stat.S_IMODE((state / "ca-key.pem").stat().st_mode) == 0o600


def test_no_planted_symlink_receives_a_key(tmp_path: Path) -> None:
    """The file written aside has a random name, made exclusively: a symlink planted under
    any predictable name (the old '.<name>.<pid>.tmp') receives nothing."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    loot = tmp_path / "attacker-owned.txt"
    loot.write_text("")
    for name in ("ca-key.pem", "server-key.pem"):
        (state / f".{name}.{os.getpid()}.tmp").symlink_to(loot)
    ensure_certificates(state, NAMES, trusted_volume=True)  # a shared volume, trusted
    assert loot.read_bytes() == b""
    # A symlink in place of a key is not followed when reading either: made again.
    (state / "server-key.pem").unlink()
    (state / "server-key.pem").symlink_to(loot)
    files = ensure_certificates(state, NAMES, trusted_volume=True)
    assert not files.key.is_symlink() and loot.read_bytes() == b""


@pytest.mark.parametrize(
    ("mode", "parent_mode", "words"),
    [
        (0o777, 0o755, "writable by group or others"),
        (0o770, 0o755, "writable by group or others"),
        (0o700, 0o777, "no sticky bit"),  # renamed away and replaced by whoever writes above
    ],
)
def test_a_state_directory_others_can_change_is_refused(
    tmp_path: Path, mode: int, parent_mode: int, words: str
) -> None:
    parent = tmp_path / "above"
    state = parent / "state"
    state.mkdir(parents=True)
    state.chmod(mode)
    parent.chmod(parent_mode)
    with pytest.raises(UntrustedStateDir, match=words):
        ensure_certificates(state, NAMES)
    assert not (state / "ca.pem").exists()  # nothing made there
    # A private directory under a sticky world-writable one (like /tmp) is fine.
    parent.chmod(0o1777)
    state.chmod(0o700)
    assert ensure_certificates(state, NAMES).bundle.exists()


def test_a_link_in_place_of_the_state_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(real)
    with pytest.raises(UntrustedStateDir, match="not a directory"):
        ensure_certificates(tmp_path / "state", NAMES)


@pytest.mark.parametrize("plant", ["fifo", "dev-zero", "huge"])
def test_planted_files_neither_hang_nor_exhaust_the_start(tmp_path: Path, plant: str) -> None:
    """A FIFO as ca.pem (an open that would block forever), ca-bundle.pem linked to
    /dev/zero (a read without end), or a file past the size cap: none is read as ours; the
    proxy makes its own."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    if plant == "fifo":
        os.mkfifo(state / "ca.pem")
    elif plant == "dev-zero":
        (state / "ca-bundle.pem").symlink_to("/dev/zero")
    else:
        (state / "ca-bundle.pem").write_bytes(b"x" * (MAX_FILE_BYTES + 1))
    files = ensure_certificates(state, NAMES)
    assert files.ca.is_file() and not files.bundle.is_symlink()
    assert files.bundle.stat().st_size < MAX_FILE_BYTES
