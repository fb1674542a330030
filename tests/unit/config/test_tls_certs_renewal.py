"""The local certificate for the Python client's TLS port is re-issued when it nears its end
(proxy/config/tls_certs.py: "renewed 30 days before the end"), and kept until then. The
clock is the module's ``dt.datetime.now``, replaced by an explicit "now"."""

from __future__ import annotations

import datetime as dt
import types
from pathlib import Path

import pytest
from cryptography import x509

from proxy.config import tls_certs
from proxy.config.tls_certs import SERVER_DAYS, ensure_certificates

NAMES = ["localhost", "127.0.0.1"]


def at(monkeypatch: pytest.MonkeyPatch, now: dt.datetime) -> None:
    """Make ``now`` the time tls_certs sees."""

    class FrozenDatetime(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> FrozenDatetime:
            return cls.fromtimestamp(now.timestamp(), tz)

    clock = types.SimpleNamespace(datetime=FrozenDatetime, timedelta=dt.timedelta, UTC=dt.UTC)
    monkeypatch.setattr(tls_certs, "dt", clock)


def server_cert(state: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((state / "server.pem").read_bytes())  # the first one


@pytest.mark.parametrize(
    ("left", "renewed"),
    [
        (dt.timedelta(days=31), False),  # 31 days left: kept
        (dt.timedelta(days=29), True),  # 29 days left: re-issued
        (dt.timedelta(days=-1), True),  # expired yesterday: re-issued
    ],
)
def test_the_certificate_is_reissued_within_30_days_of_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, left: dt.timedelta, renewed: bool
) -> None:
    state = tmp_path / "state"
    issued = dt.datetime(2026, 1, 15, 12, 0, tzinfo=dt.UTC)
    at(monkeypatch, issued)
    ensure_certificates(state, NAMES)
    first = server_cert(state)
    assert first.not_valid_after_utc == issued + dt.timedelta(days=SERVER_DAYS)
    ca = (state / "ca.pem").read_bytes()

    later = first.not_valid_after_utc - left
    at(monkeypatch, later)
    files = ensure_certificates(state, NAMES)
    second = server_cert(state)
    if not renewed:
        assert second.serial_number == first.serial_number
        return
    assert second.serial_number != first.serial_number
    assert second.not_valid_before_utc <= later < second.not_valid_after_utc
    assert second.not_valid_after_utc == later + dt.timedelta(days=SERVER_DAYS)
    # The same CA signed it (clients keep trusting the bundle they were given).
    assert (state / "ca.pem").read_bytes() == ca
    second.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))
    assert files.cert == state / "server.pem"
