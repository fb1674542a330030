"""A local certificate authority for the proxy's TLS listener (fal's Python client).

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

Clients are told to trust ``ca-bundle.pem``, so nobody but the proxy's user may be able to
replace it: the directory must be this user's and writable by nobody else, and so must every
directory above it be, unless sticky (like ``/tmp``): whoever may rename the directory away
could plant their own (:func:`check_state_dir`). A volume only the pod's own containers mount
is trusted when the operator says so (``FAL_PROXY_STATE_DIR_TRUSTED``). Every file is opened
without following links or blocking, must be a regular file of this user's, and is read with
a size cap.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
import tempfile
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
MAX_FILE_BYTES = 1 << 20  # the largest file here is the bundle (~250 KiB of public roots)


class UntrustedStateDir(Exception):
    """The state directory could be changed by someone else; the message says why and what
    to change."""


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


def existing_certificates(state_dir: Path, *, trusted_volume: bool = False) -> TlsFiles | None:
    """The files a running proxy made in ``state_dir``, or None when it made none: read,
    never made (``python-env`` must not hand out a CA the proxy does not serve). Raises
    UntrustedStateDir as :func:`ensure_certificates` does."""
    if not state_dir.is_dir():
        return None
    if not trusted_volume:
        check_state_dir(state_dir)
    files = _files(state_dir)
    return files if files.bundle.is_file() and files.ca.is_file() else None


def _files(state_dir: Path) -> TlsFiles:
    return TlsFiles(
        cert=state_dir / "server.pem",
        key=state_dir / "server-key.pem",
        ca=state_dir / "ca.pem",
        bundle=state_dir / "ca-bundle.pem",
    )


def ensure_certificates(
    state_dir: Path, names: list[str], *, trusted_volume: bool = False
) -> TlsFiles:
    """The CA and a server certificate for ``names`` (DNS names and IP addresses) in
    ``state_dir``: reused when still right, made (or re-issued) otherwise. Raises
    UntrustedStateDir unless ``trusted_volume`` or :func:`check_state_dir` passes."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not trusted_volume:
        check_state_dir(state_dir)
    files = _files(state_dir)
    ca_key_path = state_dir / "ca-key.pem"
    now = dt.datetime.now(dt.UTC)
    ca_cert, ca_key = _load_ca(files.ca, ca_key_path, now, names)
    if ca_cert is None or ca_key is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _make_ca(ca_key, now, names)
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
    if _read_own(files.bundle) != bundle:
        _write(files.bundle, bundle)
    return files


def check_state_dir(state_dir: Path) -> None:
    """Raise UntrustedStateDir unless only this user can replace what is in ``state_dir``:
    the directory (not a link) is this user's and writable by no one else, and every
    directory above it belongs to this user or root and is writable by no one else unless
    sticky (then others cannot rename what is not theirs)."""
    if not hasattr(os, "getuid"):  # no POSIX owners (Windows): nothing to check against
        return
    uid = os.getuid()
    st = os.lstat(state_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedStateDir(f"{state_dir} is not a directory (a link is not followed)")
    if st.st_uid != uid:
        raise UntrustedStateDir(
            f"{state_dir} belongs to uid {st.st_uid}, not to this user (uid {uid})"
        )
    if st.st_mode & 0o022:
        raise UntrustedStateDir(
            f"{state_dir} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): "
            "chmod go-w it"
        )
    for parent in state_dir.resolve().parents:
        pst = os.stat(parent)
        if pst.st_uid not in (0, uid):
            raise UntrustedStateDir(
                f"{state_dir} is inside {parent}, which belongs to another user (uid {pst.st_uid})"
            )
        if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
            raise UntrustedStateDir(
                f"{state_dir} is inside {parent}, which others may write (no sticky bit): "
                "they could rename the directory away and plant their own"
            )


def _load_ca(
    cert_path: Path, key_path: Path, now: dt.datetime, names: list[str]
) -> tuple[x509.Certificate | None, ec.EllipticCurvePrivateKey | None]:
    """The CA in the state directory, if it is ours and still right; else (None, None)."""
    cert_pem, key_pem = _read_own(cert_path), _read_own(key_path, private=True)
    if cert_pem is None or key_pem is None:
        return None, None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except (ValueError, x509.ExtensionNotFound):
        return None, None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.not_valid_after_utc <= now:
        return None, None
    if not _same_key(cert, key):
        return None, None  # a CA key that is not the certificate's: start again
    if constraints != _constraints(names):
        return None, None  # other names: a CA good for exactly these
    return cert, key


def _read_own(path: Path, *, private: bool = False) -> bytes | None:
    """The file's bytes when this user owns it (and, ``private``, nobody else may read it);
    else None, and it is made again. In a state directory others can write, a file planted
    there (a CA of someone else's) is never adopted; read through the opened file, so it
    cannot be swapped between the check and the read, and never through a symlink."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)  # a FIFO planted here must not hang the start
    except OSError:
        return None
    with os.fdopen(fd, "rb") as file:
        st = os.fstat(file.fileno())
        if not stat.S_ISREG(st.st_mode):  # a FIFO, a device (/dev/zero), a directory
            return None
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            return None
        if private and st.st_mode & 0o077:
            return None
        data = file.read(MAX_FILE_BYTES + 1)
        return data if len(data) <= MAX_FILE_BYTES else None


def _server_is_current(
    cert_path: Path, key_path: Path, ca: x509.Certificate, names: list[str], now: dt.datetime
) -> bool:
    cert_pem, key_pem = _read_own(cert_path), _read_own(key_path, private=True)
    if cert_pem is None or key_pem is None:
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError:
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


def _make_ca(
    key: ec.EllipticCurvePrivateKey, now: dt.datetime, names: list[str]
) -> x509.Certificate:
    """A CA that may sign end-entity certificates (pathlen 0) for ``names`` only (critical
    name constraints, RFC 5280 §4.2.1.10): trusted through SSL_CERT_FILE by a whole client
    process, its key could otherwise mint a certificate for any site that process visits."""
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
        .add_extension(_constraints(names), critical=True)
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


def _constraints(names: list[str]) -> x509.NameConstraints:
    """Permitted: exactly ``names`` (a DNS name also covers its sub-domains, by RFC 5280; an
    address is a single-address network)."""
    subtrees: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            subtrees.append(x509.DNSName(name))
        else:
            subtrees.append(x509.IPAddress(ipaddress.ip_network(address)))
    return x509.NameConstraints(permitted_subtrees=subtrees, excluded_subtrees=None)


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
    """Write atomically; a private file is 0600 from its first byte. The file aside has a
    random name, made with O_EXCL (mkstemp): nothing planted in the directory (a symlink to
    somewhere else) can receive the bytes."""
    fd, aside = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            if not private:
                os.fchmod(out.fileno(), 0o644)
            out.write(data)
        os.replace(aside, path)
    except BaseException:
        Path(aside).unlink(missing_ok=True)
        raise
