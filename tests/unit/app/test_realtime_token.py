"""The realtime token route's two pure halves: the request it turns into the proxied token
call, and fal's answer it turns into ``{"token", "expires_in"}``."""

from __future__ import annotations

import json

import pytest

from proxy.app.realtime_token import token_answer, token_request
from proxy.errors import BadRequest


@pytest.mark.parametrize(
    ("body", "cap", "apps", "expires"),
    [
        (b'{"app": "fal-ai/fast-lcm-diffusion/realtime"}', 300, ["fast-lcm-diffusion"], 120),
        (b'{"app": "fal-ai/fast-lcm-diffusion"}', 60, ["fast-lcm-diffusion"], 60),  # the cap
        (b'{"app": "me/my-app/image-to-image/realtime", "expires_in": 30}', 300, ["my-app"], 30),
        (b'{"app": "fal-ai/x", "expires_in": 9999}', 300, ["x"], 300),
    ],
)
def test_the_token_call_names_the_endpoints_alias(
    body: bytes, cap: int, apps: list[str], expires: int
) -> None:
    forwarded, life = token_request(body, cap)
    assert json.loads(forwarded) == {"allowed_apps": apps, "token_expiration": expires}
    assert life == expires


@pytest.mark.parametrize(
    "body",
    [
        b"", b"[]", b'"fal-ai/x"', b"{}", b'{"app": 1}', b'{"app": "fast-lcm-diffusion"}',
        b'{"app": "fal-ai/*"}', b'{"app": "fal-ai/x y"}', b'{"app": "/fal-ai/x"}',
        b'{"app": "fal-ai/x", "expires_in": 0}', b'{"app": "fal-ai/x", "expires_in": true}',
        b'{"app": "fal-ai/x", "expires_in": 1.5}', b"\xff\xfe", b'{"app": "fal-ai/\\u017fx"}',
    ],
)  # fmt: skip
def test_anything_else_is_a_400_saying_what_to_send(body: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        token_request(body, 300)
    assert "{" in info.value.detail or "seconds" in info.value.detail


@pytest.mark.parametrize(
    ("answer", "token"),
    [
        (b'"eyJ.abc"', "eyJ.abc"),  # fal's own: a JSON string
        (b'{"token": "eyJ.t"}', "eyJ.t"),
        (b'{"detail": "eyJ.d"}', "eyJ.d"),
        (b'""', None), (b"{}", None), (b'{"token": 5}', None), (b"not json", None), (b"", None),
    ],
)  # fmt: skip
def test_fals_answer_becomes_token_and_expiry(answer: bytes, token: str | None) -> None:
    shaped = token_answer(answer, 120)
    if token is None:
        assert shaped is None
    else:
        assert shaped is not None and json.loads(shaped) == {"token": token, "expires_in": 120}
