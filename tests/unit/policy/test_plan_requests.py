"""Request policy per plan, as tables: each field pinned, capped, stripped or passed through,
against what hostile callers send."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.policy.plan_requests import (
    KEYS,
    RequestPolicy,
    apply_request_policy,
    cap_queue_length,
    for_target,
    parse_request_policy,
    with_query,
)
from proxy.policy.targets import resolve_target

GW = "https://gw/v1/a/g/fal"
ROUTE = "/api/fal/proxy"
FREE = RequestPolicy(
    queue_priority="low",
    runner_hint="strip",
    store_io=False,
    no_retry=True,
    object_expiration_max_seconds=3600,
    request_start_timeout_max_seconds=30.0,
    max_queue_length=10,
)


def apply(policy: RequestPolicy, headers: list[tuple[str, str]], query: str = ""):
    raw = [(n.encode(), v.encode()) for n, v in headers]
    out, query, changed = apply_request_policy(policy, raw, query)
    return [(n.decode(), v.decode()) for n, v in out], query, changed


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name]


# --- pins ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sent",
    [
        [],
        [("x-fal-queue-priority", "normal")],
        [("X-Fal-Queue-Priority", "HIGH")],  # odd case, a value fal does not know
        [("x-fal-queue-priority", "normal"), ("x-fal-queue-priority", "normal")],
        [("x-fal-queue-priority", "low"), ("X-FAL-QUEUE-PRIORITY", "normal")],
        [("x-fal-queue-priority", "")],
        [("x-fal-queue-priority", "low\r\nx-evil: 1")],  # cannot arrive; replaced anyway
        [("x-fal-queue-priority", "ｌｏｗ")],
    ],
)
def test_a_pinned_priority_is_the_only_one_that_leaves(sent: list[tuple[str, str]]) -> None:
    out, _, _ = apply(RequestPolicy(queue_priority="low"), [("accept", "*/*"), *sent])
    assert [(n, v) for n, v in out if n.lower() == "x-fal-queue-priority"] == [
        ("x-fal-queue-priority", "low")
    ]
    assert ("accept", "*/*") in out


@pytest.mark.parametrize(
    ("policy", "name", "sent", "expected"),
    [
        (RequestPolicy(runner_hint="strip"), "x-fal-runner-hint", ["lora:a", "h2"], []),
        (RequestPolicy(runner_hint="strip"), "x-fal-runner-hint", [], []),
        (RequestPolicy(runner_hint="pool-free"), "x-fal-runner-hint", ["vip"], ["pool-free"]),
        (RequestPolicy(runner_hint="pool-free"), "x-fal-runner-hint", [], ["pool-free"]),
        (RequestPolicy(store_io=False), "x-fal-store-io", ["1", "1"], ["0"]),
        (RequestPolicy(store_io=False), "x-fal-store-io", [], ["0"]),
        (RequestPolicy(store_io=True), "x-fal-store-io", ["0"], ["1"]),
        (RequestPolicy(no_retry=True), "x-fal-no-retry", [], ["1"]),
        (RequestPolicy(no_retry=True), "x-fal-no-retry", ["no"], ["1"]),
        (RequestPolicy(no_retry=False), "x-fal-no-retry", ["yes", "true"], []),
        (RequestPolicy(queue_priority="normal"), "x-fal-queue-priority", ["low"], ["normal"]),
    ],
)
def test_pins_and_strips(
    policy: RequestPolicy, name: str, sent: list[str], expected: list[str]
) -> None:
    headers = [(name.upper() if i % 2 else name, v) for i, v in enumerate(sent)]
    out, _, changed = apply(policy, headers)
    assert values(out, name) == expected
    field = next(k for k in KEYS if getattr(policy, k) is not None)
    assert changed == ((field,) if sorted(v for v in sent) != expected else ())


def test_an_empty_policy_passes_everything_through_untouched() -> None:
    sent = [
        ("X-Fal-Queue-Priority", "HIGH"),
        ("x-fal-request-timeout", "nan"),
        ("x-fal-object-lifecycle-preference", "{not json"),
        ("x-fal-runner-hint", "h"),
    ]
    assert apply(RequestPolicy(), sent, "fal_max_queue_length=9999") == (
        sent,
        "fal_max_queue_length=9999",
        (),
    )


def test_what_a_policy_does_not_name_passes_through() -> None:
    sent = [("x-fal-runner-hint", "h"), ("x-fal-store-io", "0"), ("x-fal-request-timeout", "900")]
    out, query, changed = apply(RequestPolicy(queue_priority="low"), sent, "a=1")
    assert out[:3] == sent and query == "a=1"
    assert changed == ("queue_priority",)


# --- the start timeout: a cap, under both names ----------------------------------------------


@pytest.mark.parametrize(
    ("sent", "expected", "changed"),
    [
        ([("x-fal-request-timeout", "10")], "10", False),  # the JS SDK's form
        ([("x-fal-request-timeout", "10.0")], "10", False),  # the Python SDK's
        ([("x-fal-request-timeout", "12.5")], "12.5", False),
        ([("x-fal-request-timeout", "30")], "30", False),
        ([("x-fal-request-timeout", "300")], "30", True),
        ([("x-fal-request-start-timeout", "300")], "30", True),
        ([("X-Fal-Request-Start-Timeout", "5"), ("x-fal-request-timeout", "20")], "5", False),
        ([("x-fal-request-timeout", "5"), ("x-fal-request-timeout", "500")], "5", False),
        ([], "30", True),  # no header: no deadline at all, over any cap
        ([("x-fal-request-timeout", "99999999999999999999999")], "30", True),
        ([("x-fal-request-timeout", "-5")], "30", True),
        ([("x-fal-request-timeout", "0")], "30", True),
        ([("x-fal-request-timeout", "0.1")], "30", True),  # fal: "> 0.1 seconds"
        ([("x-fal-request-timeout", "NaN")], "30", True),
        ([("x-fal-request-timeout", "inf")], "30", True),
        ([("x-fal-request-timeout", "1e1")], "30", True),
        ([("x-fal-request-timeout", "1_0")], "30", True),  # float() would read 10
        ([("x-fal-request-timeout", "ten")], "30", True),
        ([("x-fal-request-timeout", "")], "30", True),
        ([("x-fal-request-timeout", "5"), ("x-fal-request-timeout", "x")], "30", True),
        ([("x-fal-request-timeout", " 7 ")], "7", False),
    ],
)
def test_the_start_timeout_is_capped_under_both_names(
    sent: list[tuple[str, str]], expected: str, changed: bool
) -> None:
    policy = RequestPolicy(request_start_timeout_max_seconds=30.0)
    out, _, fields = apply(policy, sent)
    assert values(out, "x-fal-request-timeout") == [expected]
    assert values(out, "x-fal-request-start-timeout") == [expected]
    assert fields == (("request_start_timeout_max_seconds",) if changed else ())


def test_a_fractional_cap_is_written_plainly() -> None:
    out, _, _ = apply(RequestPolicy(request_start_timeout_max_seconds=2.5), [])
    assert values(out, "x-fal-request-timeout") == ["2.5"]


# --- the object lifecycle: a cap of the expiration ----------------------------------------------

PREFERENCE = "x-fal-object-lifecycle-preference"
CAPPED = {"expiration_duration_seconds": 3600}


@pytest.mark.parametrize(
    ("sent", "expected", "changed"),
    [
        ([], CAPPED, True),  # no header: the account's default, maybe forever
        ([json.dumps({"expiration_duration_seconds": 60})], {"expiration_duration_seconds": 60},
         False),
        ([json.dumps({"expiration_duration_seconds": 86400})], CAPPED, True),
        ([json.dumps({"expiration_duration_seconds": 10**30})], CAPPED, True),
        ([json.dumps({"expiration_duration_seconds": 0})], CAPPED, True),  # 0: never expires
        ([json.dumps({"expiration_duration_seconds": -1})], CAPPED, True),
        ([json.dumps({"expiration_duration_seconds": 60.5})], CAPPED, True),
        ([json.dumps({"expiration_duration_seconds": "60"})], CAPPED, True),
        ([json.dumps({"expiration_duration_seconds": True})], CAPPED, True),
        (['{"expiration_duration_seconds": NaN}'], CAPPED, True),
        (['{"expiration_duration_seconds": Infinity}'], CAPPED, True),
        # initial_acl kept as sent, the expiration capped (or set: none was sent)
        ([json.dumps({"expiration_duration_seconds": 99999, "initial_acl": {"default": "forbid"}})],
         {**CAPPED, "initial_acl": {"default": "forbid"}}, True),
        ([json.dumps({"initial_acl": {"default": "allow"}})],
         {**CAPPED, "initial_acl": {"default": "allow"}}, True),
        # keys the proxy does not know are not vouched for: dropped
        ([json.dumps({"expiration_duration_seconds": 60, "expiration_duration_days": 9999})],
         {"expiration_duration_seconds": 60}, True),
        ([json.dumps({"expiration_duration_seconds": 60, "initial_acl": "public"})],
         {"expiration_duration_seconds": 60}, True),
        # the last of two equal keys is what Python reads: one key goes out either way
        (['{"expiration_duration_seconds": 1, "expiration_duration_seconds": 99999}'], CAPPED,
         True),
        # malformed: replaced by the cap (removing it would mean no limit)
        (["{not json"], CAPPED, True),
        (["[3600]"], CAPPED, True),
        (["3600"], CAPPED, True),
        (["null"], CAPPED, True),
        ([""], CAPPED, True),
        (["\udcff"], CAPPED, True),
        # sent twice: which one fal reads is a guess; the cap alone
        ([json.dumps({"expiration_duration_seconds": 5})] * 2, CAPPED, True),
    ],
)  # fmt: skip
def test_the_lifecycle_expiration_is_capped(
    sent: list[str], expected: dict[str, object], changed: bool
) -> None:
    policy = RequestPolicy(object_expiration_max_seconds=3600)
    raw = [(PREFERENCE.encode(), v.encode("utf-8", "surrogateescape")) for v in sent]
    out, _, fields = apply_request_policy(policy, raw, "")
    lifecycles = [v for n, v in out if n == PREFERENCE.encode()]
    assert len(lifecycles) == 1
    assert json.loads(lifecycles[0]) == expected
    assert lifecycles[0].isascii()
    assert fields == (("object_expiration_max_seconds",) if changed else ())


def test_the_upload_lifecycle_header_is_capped_when_sent_never_added() -> None:
    policy = RequestPolicy(object_expiration_max_seconds=3600)
    out, _, _ = apply(policy, [("X-Fal-Object-Lifecycle", '{"expiration_duration_seconds": 9e9}')])
    assert json.loads(values(out, "x-fal-object-lifecycle")[0]) == CAPPED
    out, _, _ = apply(policy, [])
    assert values(out, "x-fal-object-lifecycle") == []
    assert json.loads(values(out, PREFERENCE)[0]) == CAPPED


# --- fal_max_queue_length: a cap in the query string ---------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", "fal_max_queue_length=10"),
        ("fal_webhook=https%3A%2F%2Fx%2Fh%3Fa%3Db",
         "fal_webhook=https%3A%2F%2Fx%2Fh%3Fa%3Db&fal_max_queue_length=10"),
        ("fal_max_queue_length=5", "fal_max_queue_length=5"),  # lower: the caller's own
        ("fal_max_queue_length=10", "fal_max_queue_length=10"),
        ("fal_max_queue_length=11", "fal_max_queue_length=10"),
        ("a=1&fal_max_queue_length=999&b=%20x", "a=1&fal_max_queue_length=10&b=%20x"),
        ("fal_max_queue_length=3&fal_max_queue_length=999", "fal_max_queue_length=3"),
        ("fal_max_queue_length=999&a=1&fal_max_queue_length=3", "fal_max_queue_length=3&a=1"),
        ("fal%5Fmax%5Fqueue%5Flength=999", "fal_max_queue_length=10"),
        ("FAL_MAX_QUEUE_LENGTH=999&a=1", "fal_max_queue_length=10&a=1"),
        ("fal_max_queue_length", "fal_max_queue_length=10"),
        ("fal_max_queue_length=", "fal_max_queue_length=10"),
        ("fal_max_queue_length=-1", "fal_max_queue_length=10"),
        ("fal_max_queue_length=1e3", "fal_max_queue_length=10"),
        ("fal_max_queue_length=%35", "fal_max_queue_length=5"),
        ("fal_max_queue_length=5%26x%3D1", "fal_max_queue_length=10"),
        ("fal_max_queue_length=99999999999999999999999", "fal_max_queue_length=10"),
        ("fal_max_queue_length=2&fal_max_queue_length=nan", "fal_max_queue_length=10"),
        ("a=1&&b=2", "a=1&&b=2&fal_max_queue_length=10"),  # an empty part kept as it came
    ],
)  # fmt: skip
def test_the_queue_length_is_capped_in_the_query(query: str, expected: str) -> None:
    assert cap_queue_length(query, 10) == expected
    _, applied, changed = apply(RequestPolicy(max_queue_length=10), [], query)
    assert applied == expected
    assert changed == (() if expected == query else ("max_queue_length",))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a=1", "b=%26", "fal_max_queue_length=7",
                                 "fal_max_queue_length=70", "fal%5fmax_queue_length=x", "c"]),
                max_size=6))  # fmt: skip
def test_any_query_leaves_with_one_capped_queue_length(parts: list[str]) -> None:
    out = cap_queue_length("&".join(parts), 10).split("&")
    governed = [p for p in out if p.startswith("fal_max_queue_length=")]
    assert len(governed) == 1 and int(governed[0].split("=")[1]) <= 10
    assert [p for p in out if p not in governed] == [
        p for p in parts if not p.lower().replace("%5f", "_").startswith("fal_max_queue_length")
    ]


# --- every field at once; which requests ----------------------------------------------------------


def test_a_free_plan_on_a_queue_submit() -> None:
    sent = [
        ("content-type", "application/json"),
        ("x-fal-queue-priority", "normal"),
        ("x-fal-runner-hint", "h1"),
        ("x-fal-request-timeout", "600"),
        ("x-custom", "v"),
    ]
    out, query, changed = apply(FREE, sent, "fal_webhook=https%3A%2F%2Fx")
    assert sorted(out) == sorted(
        [
            ("content-type", "application/json"),
            ("x-custom", "v"),
            ("x-fal-queue-priority", "low"),
            ("x-fal-store-io", "0"),
            ("x-fal-no-retry", "1"),
            ("x-fal-request-timeout", "30"),
            ("x-fal-request-start-timeout", "30"),
            (PREFERENCE, '{"expiration_duration_seconds":3600}'),
        ]
    )
    assert query == "fal_webhook=https%3A%2F%2Fx&fal_max_queue_length=10"
    assert set(changed) == set(KEYS)


def target(url: str):
    return resolve_target(ROUTE, "", url, gateway_url=GW, proxy_route=ROUTE)


@pytest.mark.parametrize(
    ("method", "url", "applies"),
    [
        ("POST", "https://queue.fal.run/fal-ai/flux/dev", "all"),
        ("GET", "https://queue.fal.run/fal-ai/flux/dev", "all"),  # a GET submit starts one too
        ("POST", "https://fal.run/fal-ai/flux/dev", "headers"),
        ("GET", "https://fal.run/fal-ai/flux/dev?prompt=x", "headers"),  # query = the input
        ("POST", "https://fal.run/fal-ai/flux/dev/stream", "headers"),
        ("POST", "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3", "expiry"),
        ("GET", "https://queue.fal.run/fal-ai/flux/requests/r1/status?logs=1", "none"),
        ("GET", "https://queue.fal.run/fal-ai/flux/requests/r1", "none"),
        ("PUT", "https://queue.fal.run/fal-ai/flux/requests/r1/cancel", "none"),
        ("POST", "https://rest.fal.ai/tokens/", "none"),
        ("POST", "https://wma.fal.run/session", "none"),
    ],
)
def test_which_requests_a_policy_applies_to(method: str, url: str, applies: str) -> None:
    expected = {
        "all": FREE,
        "headers": RequestPolicy(**{k: getattr(FREE, k) for k in KEYS if k != "max_queue_length"}),
        "expiry": RequestPolicy(object_expiration_max_seconds=3600),
        "none": RequestPolicy(),
    }[applies]
    assert for_target(FREE, method, target(url)) == expected


@pytest.mark.parametrize(
    ("url", "query", "upstream_url", "target_url"),
    [
        ("https://fal.run/fal-ai/x?a=1", "a=1&q=2", f"{GW}/fal-ai/x?a=1&q=2", None),
        ("https://fal.run/fal-ai/x", "q=2", f"{GW}/fal-ai/x?q=2", None),
        ("https://fal.run/fal-ai/x?a=1", "", f"{GW}/fal-ai/x", None),
        ("https://queue.fal.run/fal-ai/x", "q=2", GW, "https://queue.fal.run/fal-ai/x?q=2"),
        ("https://queue.fal.run/fal-ai/x?a=1", "", GW, "https://queue.fal.run/fal-ai/x"),
    ],
)
def test_a_new_query_is_where_resolve_target_would_put_it(
    url: str, query: str, upstream_url: str, target_url: str | None
) -> None:
    moved = with_query(target(url), query)
    assert (moved.query, moved.upstream_url, moved.target_url) == (query, upstream_url, target_url)
    base = url.split("?")[0]
    assert moved == target(f"{base}?{query}" if query else base)


# --- the TOML table ----------------------------------------------------------------------------


def test_every_key_parses() -> None:
    table = {
        "queue_priority": "low",
        "runner_hint": "strip",
        "store_io": False,
        "no_retry": True,
        "object_expiration_max_seconds": 3600,
        "request_start_timeout_max_seconds": 30,
        "max_queue_length": 10,
    }
    assert parse_request_policy(table, "F") == FREE
    assert parse_request_policy({}, "F") == RequestPolicy() and RequestPolicy().empty
    assert parse_request_policy({"runner_hint": "pool:a"}, "F").runner_hint == "pool:a"
    assert parse_request_policy({"max_queue_length": 0}, "F").max_queue_length == 0
    assert parse_request_policy({"request_start_timeout_max_seconds": 2.5}, "F") == RequestPolicy(
        request_start_timeout_max_seconds=2.5
    )


@pytest.mark.parametrize(
    ("table", "names"),
    [
        ({"priority": "low"}, "priority"),
        ({"queue_priority": "high"}, "queue_priority"),
        ({"queue_priority": "LOW"}, "queue_priority"),
        ({"runner_hint": ""}, "runner_hint"),
        ({"runner_hint": "a b"}, "runner_hint"),
        ({"runner_hint": "a\r\nx-evil: 1"}, "runner_hint"),
        ({"runner_hint": True}, "runner_hint"),
        ({"store_io": 0}, "store_io"),
        ({"store_io": "false"}, "store_io"),
        ({"no_retry": 1}, "no_retry"),
        ({"object_expiration_max_seconds": 0}, "object_expiration_max_seconds"),
        ({"object_expiration_max_seconds": 1.5}, "object_expiration_max_seconds"),
        ({"object_expiration_max_seconds": True}, "object_expiration_max_seconds"),
        ({"request_start_timeout_max_seconds": 0.5}, "request_start_timeout_max_seconds"),
        ({"request_start_timeout_max_seconds": float("nan")}, "request_start_timeout_max_seconds"),
        ({"request_start_timeout_max_seconds": float("inf")}, "request_start_timeout_max_seconds"),
        ({"request_start_timeout_max_seconds": "30"}, "request_start_timeout_max_seconds"),
        ({"max_queue_length": -1}, "max_queue_length"),
        ({"max_queue_length": "10"}, "max_queue_length"),
    ],
)
def test_a_bad_table_names_its_source_and_key(table: dict[str, object], names: str) -> None:
    with pytest.raises(ValueError, match=rf"^plans\.toml \[requests\.free\]: .*{names}") as exc:
        parse_request_policy(table, "plans.toml [requests.free]")
    if names == "priority":  # an unknown key: the valid ones are listed
        assert all(key in str(exc.value) for key in KEYS)


def test_a_table_that_is_not_a_table() -> None:
    with pytest.raises(ValueError, match=r"^S: must be a table"):
        parse_request_policy(5, "S")  # type: ignore[arg-type]
