"""Every value in ``hostile_targets.txt`` is refused: by ``resolve_target``, and end to end
by the running proxy, which then sends nothing to the gateway."""

from __future__ import annotations

import json
import re

import pytest

from proxy.errors import ProxyError
from proxy.policy.targets import resolve_target
from tests.conftest import CF_TOKEN, FAL_KEY, FakeGateway, RunningProxy
from tests.security import RawHTTP, decode_value, load_corpus, parse_corpus

GW = "https://gateway.ai.cloudflare.com/v1/acct/gw/fal"
ROUTE = "/api/fal/proxy"
CORPUS = load_corpus()


def resolve(target: str | None, path: str = ROUTE, query: str = ""):
    return resolve_target(path, query, target, gateway_url=GW, proxy_route=ROUTE)


def refused(value: str) -> bool:
    try:
        resolve(value)
    except ProxyError as exc:
        return 400 <= exc.status < 500
    return False


# --- the corpus itself ---------------------------------------------------------------------


def test_corpus_has_at_least_100_distinct_entries() -> None:
    assert len(CORPUS) >= 100
    values = [case.value for case in CORPUS]
    duplicates = {v for v in values if values.count(v) > 1}
    assert not duplicates


def test_corpus_escapes_decode_as_documented() -> None:
    assert decode_value(r"a\\b\tc\rd\ne") == "a\\b\tc\rd\ne"
    assert decode_value(r"\x20\x23\x00\x7f") == " #\x00\x7f"
    assert decode_value(r"f\u0430l\uff0erun") == "f\u0430l\uff0erun"
    assert decode_value(r"\e") == ""
    assert decode_value(r"x\*3{ab}y") == "xabababy"
    for bad in ("a#b", "a b", "caf\u00e9", r"\q", r"\x4", r"\u12", "\x7f"):
        with pytest.raises(ValueError):
            decode_value(bad)
    cases = parse_corpus("# comment\n\n  https://x/\\x20  # a comment\nhttps://y/\n")
    assert [(c.value, c.comment, c.line) for c in cases] == [
        ("https://x/ ", "a comment", 3),
        ("https://y/", "", 4),
    ]
    with pytest.raises(ValueError, match="line 1"):
        parse_corpus("https://x/ trailing words\n")


def test_corpus_entries_stay_hostile_as_the_http_parser_delivers_them() -> None:
    """The two rules of the corpus header, so the end-to-end test means something.

    An HTTP parser strips a header value's leading and trailing spaces and tabs; and a
    client that writes CR LF in a value has really sent two header lines. Neither may turn
    an entry into a clean, allowed request."""
    header_line = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+:.*")
    for case in CORPUS:
        assert refused(case.value.strip(" \t")), case
        if "\r\n" in case.value:
            before, after = case.value.split("\r\n", 1)
            next_line = after.split("\r\n", 1)[0]
            assert refused(before.strip(" \t")) or (
                next_line and not header_line.fullmatch(next_line)
            ), case


# --- unit: resolve_target ------------------------------------------------------------------


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_resolve_target_refuses_hostile_target(case) -> None:
    # Same call shape as tests/unit/test_targets.py; on the SDK route and on a
    # fal.run-shaped path (any path carrying the header is the SDK protocol).
    for path in (ROUTE, "/fal-ai/fast-sdxl"):
        with pytest.raises(ProxyError) as info:
            resolve(case.value, path)
        error = info.value
        assert 400 <= error.status < 500, (case, error.status)
        assert error.message and error.detail


# --- end to end: the running proxy ---------------------------------------------------------

# Characters the HTTP parser itself refuses in a header value (tab is allowed).
_PARSER_REFUSES = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def test_hostile_targets_are_refused_end_to_end_and_nothing_reaches_the_gateway(
    proxy: RunningProxy, fake_gateway: FakeGateway
) -> None:
    failures: list[str] = []
    parser_refusals = 0
    with RawHTTP(proxy.url) as http:
        for case in CORPUS:
            value = case.value.encode("utf-8")
            for method, path in (("POST", ROUTE), ("GET", "/fal-ai/fast-sdxl?x=1")):
                body = b'{"prompt": "cat"}' if method == "POST" else b""
                headers = [(b"content-type", b"application/json"), (b"x-fal-target-url", value)]
                r = http.request(method, path, headers, body)
                where = f"{case.id} ({method} {path}): {r.status} {r.body[:200]!r}"
                if FAL_KEY.encode() in r.raw or CF_TOKEN.encode() in r.raw:
                    failures.append(f"secret in response: {where}")
                if r.from_http_parser:
                    # Only for values no client can send as one header value.
                    if not _PARSER_REFUSES.search(case.value):
                        failures.append(f"unexpected HTTP parser refusal: {where}")
                    parser_refusals += 1
                    continue
                if not 400 <= r.status < 500:
                    failures.append(f"not refused: {where}")
                    continue
                try:
                    payload = json.loads(r.body)
                except ValueError:
                    failures.append(f"refusal is not JSON: {where}")
                    continue
                if not (
                    isinstance(payload, dict) and payload.get("message") and payload.get("detail")
                ):
                    failures.append(f"refusal lacks message/detail: {where}")
                if r.header(b"content-type") != b"application/json" or not r.header(
                    b"x-proxy-request-id"
                ):
                    failures.append(f"refusal headers: {where}")
    assert not failures, "\n".join(failures)
    assert parser_refusals < len(CORPUS)  # most entries reach the proxy's own checks
    recorded = fake_gateway.client.get("/_emulator/requests").json()
    assert recorded == [], f"the gateway received {len(recorded)} request(s): {recorded[:3]}"
    assert fake_gateway.requests() == []
    log_text = "\n".join(proxy.process.lines)
    assert FAL_KEY not in log_text and CF_TOKEN not in log_text
