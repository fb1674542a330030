"""A local certificate authority for the proxy's TLS listener (issue 13, Python clients).

fal's Python client builds ``https://{FAL_RUN_HOST}/...`` itself and cannot speak plain
HTTP to a proxy, so the proxy offers a TLS port. Without ``FAL_PROXY_TLS_CERT_FILE`` /
``FAL_PROXY_TLS_KEY_FILE``, it makes, once, in ``FAL_PROXY_STATE_DIR``:

* ``ca.pem`` / ``ca-key.pem``: a local CA (ECDSA P-256, ten years, may sign only
  end-entity certificates: ``pathlen=0``);
* ``server.pem`` / ``server-key.pem``: the proxy's certificate, for its host names and
  addresses (re-issued when the names change or it nears its end);
* ``ca-bundle.pem``: the public roots (certifi) **and** the local CA, so a client process
  pointed at it with ``SSL_CERT_FILE`` still reaches every other HTTPS site.

Private keys are written 0600, every file atomically (written aside, then renamed), so a
reader never sees half a key. Everything cryptographic is the ``cryptography`` library's.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import certifi
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 397  # what public CAs may issue; renewed 30 days before the end
RENEW_BEFORE = dt.timedelta(days=30)
ORGANISATION = "fal-gateway-proxy local CA"


@dataclass(frozen=True)
class TlsFiles:
    cert: Path  # the server certificate, then the CA's (a chain)
    key: Path
    ca: Path
    bundle: Path  # public roots + the local CA, for SSL_CERT_FILE


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/fal-gateway-proxy``, else ``~/.local/state/fal-gateway-proxy``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fal-gateway-proxy"


def ensure_certificates(state_dir: Path, names: list[str]) -> TlsFiles:
    """The CA and a server certificate for ``names`` (DNS names and IP addresses) in
    ``state_dir``: reused when still right, made (or re-issued) otherwise."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = TlsFiles(
        cert=state_dir / "server.pem",
        key=state_dir / "server-key.pem",
        ca=state_dir / "ca.pem",
        bundle=state_dir / "ca-bundle.pem",
    )
    ca_key_path = state_dir / "ca-key.pem"
    now = dt.datetime.now(dt.UTC)
    ca_cert, ca_key = _load_ca(files.ca, ca_key_path, now)
    if ca_cert is None or ca_key is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _make_ca(ca_key, now)
        _write(ca_key_path, _key_pem(ca_key), private=True)
        _write(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM))
        _write(files.cert, b"")  # a new CA: the old server certificate no longer verifies
    if not _server_is_current(files.cert, files.key, ca_cert, names, now):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _make_server(key, ca_cert, ca_key, names, now)
        _write(files.key, _key_pem(key), private=True)
        chain = cert.public_bytes(serialization.Encoding.PEM)
        _write(files.cert, chain + ca_cert.public_bytes(serialization.Encoding.PEM))
    roots = Path(certifi.where()).read_bytes()
    bundle = roots.rstrip(b"\n") + b"\n" + ca_cert.public_bytes(serialization.Encoding.PEM)
    if not files.bundle.exists() or files.bundle.read_bytes() != bundle:
        _write(files.bundle, bundle)
    return files


def _load_ca(
    cert_path: Path, key_path: Path, now: dt.datetime
) -> tuple[x509.Certificate | None, ec.EllipticCurvePrivateKey | None]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return None, None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.not_valid_after_utc <= now:
        return None, None
    if not _same_key(cert, key):
        return None, None  # a CA key that is not the certificate's: start again
    return cert, key


def _server_is_current(
    cert_path: Path, key_path: Path, ca: x509.Certificate, names: list[str], now: dt.datetime
) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return False
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _same_key(cert, key):
        return False
    if cert.not_valid_after_utc - RENEW_BEFORE <= now:
        return False
    try:
        cert.verify_directly_issued_by(ca)  # issuer name and signature
    except (ValueError, TypeError, InvalidSignature):
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san) == set(_alt_names(names))


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def _make_ca(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{ORGANISATION} {os.urandom(4).hex()}"),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _make_server(
    key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
    names: list[str], now: dt.datetime,
) -> x509.Certificate:  # fmt: skip
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "proxy")])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(_alt_names(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _alt_names(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # in order, once each
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write atomically; a private file is 0600 from its first byte."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(aside, path)
    except BaseException:
        aside.unlink(missing_ok=True)
        raise
