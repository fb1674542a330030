from __future__ import annotations

import pytest

from proxy.logs import redact_query


@pytest.mark.parametrize(
    ("query", "shown"),
    [
        ("", ""),
        ("logs=1", "logs=1"),
        ("storage_type=fal-cdn-v3", "storage_type=fal-cdn-v3"),
        ("fal_jwt_token=eyJabc", "fal_jwt_token=[redacted]"),
        (
            "fal_webhook=https%3A%2F%2Fx.com%2Fh%3Fsecret%3D1&logs=0",
            "fal_webhook=[redacted]&logs=0",
        ),
        ("prompt=a%20private%20thing&flag", "prompt=[redacted]&flag"),
    ],
)
def test_query_values_are_redacted_except_harmless_ones(query: str, shown: str) -> None:
    assert redact_query(query) == shown
