"""Gateway-native settings: the credential modes, the metadata's caller, the fallback, and
every combination start-up refuses (each error names its variable)."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.envvars import SettingsError
from proxy.config.settings import Settings
from proxy.policy.headers import upstream_request_headers
from proxy.policy.metadata import MAX_ENTRIES, CallerTags, derived_key, metadata_header
from proxy.policy.targets import Target

GW = {"FAL_PROXY_GATEWAY_URL": "http://gw.example/v1/a/g/fal"}
TOKEN = {"CF_AIG_TOKEN": "cf-token-0123456789"}


def settings(**env: str) -> Settings:
    return Settings.from_env({**GW, **env})


def injected_names(config: Settings) -> list[tuple[str, str]]:
    target = Target("run", "fal.run", "/fal-ai/x", "", "http://gw/fal-ai/x", None)
    headers = upstream_request_headers(
        [(b"authorization", b"Key client"), (b"cf-aig-byok-alias", b"theirs"),
         (b"cf-aig-metadata", b'{"a":1}'), (b"cf-aig-no-wholesale", b"false")],
        target, config.injected_headers(), method="POST", request_id="r1",
        metadata='{"route":"run"}',
    )  # fmt: skip
    return [(n, v) for n, v in headers if n.startswith(("authorization", "cf-aig-"))]


def test_key_mode_sends_the_key_and_says_no_wholesale() -> None:
    config = settings(FAL_KEY="fal-key-1", **TOKEN)
    assert config.gateway.mode == "key"
    assert injected_names(config) == [
        ("authorization", "Key fal-key-1"),
        ("cf-aig-authorization", "Bearer cf-token-0123456789"),
        ("cf-aig-no-wholesale", "true"),
        ("cf-aig-metadata", '{"route":"run"}'),
        ("cf-aig-event-id", "r1"),
        ("cf-aig-max-attempts", "1"),
    ]


def test_byok_sends_no_authorization_and_only_its_own_alias() -> None:
    config = settings(CF_AIG_BYOK_ALIAS="team-a", **TOKEN)
    assert config.fal_key is None and config.gateway.mode == "byok"
    assert injected_names(config) == [
        ("cf-aig-authorization", "Bearer cf-token-0123456789"),
        ("cf-aig-byok-alias", "team-a"),
        ("cf-aig-no-wholesale", "true"),
        ("cf-aig-metadata", '{"route":"run"}'),
        ("cf-aig-event-id", "r1"),
        ("cf-aig-max-attempts", "1"),
    ]


def test_unified_billing_sends_no_key_and_allows_wholesale() -> None:
    config = settings(FAL_PROXY_UNIFIED_BILLING="true", **TOKEN)
    assert config.fal_key is None and config.gateway.mode == "unified"
    names = [n for n, _ in injected_names(config)]
    assert "authorization" not in names and "cf-aig-no-wholesale" not in names
    assert "cf-aig-byok-alias" not in names
    both = settings(CF_AIG_BYOK_ALIAS="team-a", FAL_PROXY_UNIFIED_BILLING="1", **TOKEN)
    assert [n for n, _ in injected_names(both)][:2] == ["cf-aig-authorization", "cf-aig-byok-alias"]
    assert "cf-aig-no-wholesale" not in dict(injected_names(both))


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CF_AIG_BYOK_ALIAS": "a", "FAL_KEY": "k", **TOKEN}, "FAL_KEY"),
        ({"CF_AIG_BYOK_ALIAS": "a", "FAL_KEY_ID": "i", "FAL_KEY_SECRET": "s", **TOKEN},
         "FAL_KEY_ID"),
        ({"FAL_PROXY_UNIFIED_BILLING": "true", "FAL_KEY_FILE": "/k", **TOKEN}, "FAL_KEY_FILE"),
        ({"CF_AIG_BYOK_ALIAS": "a"}, "CF_AIG_TOKEN"),
        ({"FAL_PROXY_UNIFIED_BILLING": "true"}, "CF_AIG_TOKEN"),
        ({"CF_AIG_BYOK_ALIAS": "a b", **TOKEN}, "CF_AIG_BYOK_ALIAS"),
        ({"CF_AIG_BYOK_ALIAS": "a/../b", **TOKEN}, "CF_AIG_BYOK_ALIAS"),
        ({"FAL_PROXY_UNIFIED_BILLING": "maybe", **TOKEN}, "FAL_PROXY_UNIFIED_BILLING"),
        ({"CF_AIG_BYOK_ALIAS": "a", "FAL_PROXY_REALTIME_DIRECT": "true", **TOKEN},
         "FAL_PROXY_REALTIME_DIRECT"),
        ({"CF_AIG_BYOK_ALIAS": "a", "FAL_PROXY_FALLBACK": "direct", **TOKEN},
         "FAL_PROXY_FALLBACK"),
        ({"FAL_KEY": "k", "FAL_PROXY_METADATA_CALLER": "plain"}, "FAL_PROXY_METADATA_CALLER"),
        ({"FAL_KEY": "k", "FAL_PROXY_METADATA_HASH_KEY": "short"}, "FAL_PROXY_METADATA_HASH_KEY"),
        ({"FAL_KEY": "k", "FAL_PROXY_METADATA_HASH_KEY_FILE": "/nope"},
         "FAL_PROXY_METADATA_HASH_KEY_FILE"),
        ({"FAL_KEY": "k", "FAL_PROXY_FALLBACK": "gateway"}, "FAL_PROXY_FALLBACK"),
        ({"FAL_KEY": "k", "FAL_PROXY_FALLBACK_FAILURES": "0"}, "FAL_PROXY_FALLBACK_FAILURES"),
        ({"FAL_KEY": "k", "FAL_PROXY_FALLBACK_SECONDS": "-1"}, "FAL_PROXY_FALLBACK_SECONDS"),
        ({"FAL_KEY": "k", "FAL_PROXY_TEST_FAL_ORIGIN": "https://fal.run"},
         "FAL_PROXY_TEST_FAL_ORIGIN"),
        ({"FAL_KEY": "k", "FAL_PROXY_TEST_FAL_ORIGIN": "http://10.0.0.1:9000"},
         "FAL_PROXY_TEST_FAL_ORIGIN"),
        ({"FAL_KEY": "k", "FAL_PROXY_TEST_FAL_ORIGIN": "http://[::1"}, "FAL_PROXY_TEST_FAL_ORIGIN"),
        ({"FAL_KEY": "k", "FAL_PROXY_TEST_FAL_ORIGIN": "http://127.0.0.1:abc"},
         "FAL_PROXY_TEST_FAL_ORIGIN"),
        ({"FAL_KEY": "k", "FAL_PROXY_TEST_FAL_ORIGIN": "http://u:p@127.0.0.1:9"},
         "FAL_PROXY_TEST_FAL_ORIGIN"),
        ({"FAL_KEY": "k", "FAL_PROXY_FALLBACK": "direct", "FAL_PROXY_FIRST_BYTE_TIMEOUT": "5",
          "FAL_PROXY_CONNECT_TIMEOUT": "5"}, "FAL_PROXY_FIRST_BYTE_TIMEOUT"),
    ],
)  # fmt: skip
def test_settings_errors_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as error:
        settings(**env)
    assert named in str(error.value) and "\n" not in str(error.value)
    for secret in ("cf-token-0123456789",):
        assert secret not in str(error.value)


def test_the_hash_key_is_a_secret_everywhere_it_is_shown() -> None:
    from proxy.check import describe

    config = settings(FAL_KEY="k", FAL_PROXY_METADATA_HASH_KEY="hash-key-0123456789-secret")
    assert "hash-key-0123456789-secret" not in repr(config)
    assert not [line for line in describe(config) if "hash-key-0123456789" in line]


def test_metadata_is_a_flat_object_of_at_most_five_strings() -> None:
    value = metadata_header(caller="c", app="fal-ai/flux", request_id="r", route="queue")
    data = json.loads(value)
    assert data == {"request_id": "r", "route": "queue", "app": "fal-ai/flux", "caller": "c"}
    assert len(data) <= MAX_ENTRIES and all(isinstance(v, str) for v in data.values())
    assert json.loads(metadata_header(caller=None, app=None, request_id="r", route="run")) == {
        "request_id": "r", "route": "run"}  # fmt: skip
    # A caller id with anything in it stays one ASCII header value.
    odd = metadata_header(caller='é"\r\n{}', app=None, request_id="r", route="run")
    assert odd.isascii() and "\r" not in odd and json.loads(odd)["caller"] == 'é"\r\n{}'


def test_caller_tags() -> None:
    key = derived_key("cf-token")
    assert key == hmac.new(b"cf-token", b"fal-gateway-proxy/cf-aig-metadata/caller",
                           hashlib.sha256).digest()  # fmt: skip
    hashed = CallerTags("hash", key)
    tag = hashed.tag("alice@example.com")
    assert tag == hmac.new(key, b"alice@example.com", hashlib.sha256).hexdigest()[:24]
    assert tag != hashed.tag("bob@example.com") and "alice" not in (tag or "")
    assert CallerTags("hash", derived_key("other")).tag("alice@example.com") != tag
    assert CallerTags("raw", key).tag("alice") == "alice"
    assert CallerTags("off", key).tag("alice") is None


@given(caller=st.text(), app=st.text(max_size=40) | st.none(), route=st.sampled_from(
    ["run", "stream", "queue", "storage", "token", "websocket"]))  # fmt: skip
def test_the_written_out_header_is_the_json_of_its_entries(
    caller: str, app: str | None, route: str
) -> None:
    value = metadata_header(caller=caller, app=app, request_id="0123456789abcdef", route=route)
    expected = {"request_id": "0123456789abcdef", "route": route, "caller": caller}
    if app is not None:
        expected["app"] = app
    assert value.isascii() and json.loads(value) == expected
