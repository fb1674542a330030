"""The close a session gets when the caller's limits refuse one of its messages."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.bridge.pump import refusal_close
from proxy.errors import LimiterUnavailable, ProxyError, QuotaExceeded, RateLimited


def test_a_used_up_quota_closes_1008_naming_it() -> None:
    refusal = QuotaExceeded(
        apps="fal-ai/flux/*", limit=50, period="day", described="50 generations per day for "
        "fal-ai/flux/*", resets_at="2026-12-08T00:00:00Z", retry_after=60,
    )  # fmt: skip
    assert refusal_close(refusal) == (
        1008,
        "quota exceeded: 50 generations per day for fal-ai/flux/*; resets at 2026-12-08T00:00:00Z",
    )


def test_an_unavailable_limit_store_closes_1013() -> None:
    code, reason = refusal_close(LimiterUnavailable("rate limiter unavailable", "retry later"))
    assert (code, reason) == (1013, "rate limiter unavailable: retry later")


@given(st.text(), st.text(), st.sampled_from([RateLimited, LimiterUnavailable, ProxyError]))
def test_the_reason_always_fits_a_close_frame(
    message: str, detail: str, kind: type[ProxyError]
) -> None:
    """A close frame's reason is at most 123 bytes of UTF-8, whatever the refusal says
    (a longer or undecodable one makes the server fail the close)."""
    code, reason = refusal_close(kind(message, detail))
    assert code in (1008, 1013)
    assert len(reason.encode("utf-8")) <= 123
    assert (message + ": " + detail if detail else message).startswith(reason)
