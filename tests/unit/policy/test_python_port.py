"""The Python client's port, its pure parts: paths → targets, the caller's credential, the
queue URLs it rewrites (and those it must not), the encodings it decodes, its settings."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from pathlib import Path

import pytest

from proxy.config.envvars import SettingsError
from proxy.config.python_port import FAL_KEY_PLACEHOLDER, PythonSdkSettings, env_lines
from proxy.config.settings import Settings
from proxy.errors import BadGateway
from proxy.policy.python_port import (
    MAX_GZIP_MEMBERS,
    MAX_REWRITTEN_BYTES,
    PythonSdkListener,
    decoded,
    key_credential,
    proxied_url,
    queue_target,
    rewrite_queue_urls,
)
from proxy.policy.targets import Target, resolve_target

ORIGIN = "https://localhost:8443"
GATEWAY = "https://gateway.example/v1/a/g/fal"


@pytest.mark.parametrize(
    ("path", "query", "expected"),
    [
        ("/fal-ai/fast-sdxl", "", None),  # a run: fal.run-shaped, as on the main port
        ("/queue.fal.run/fal-ai/fast-sdxl", "", "https://queue.fal.run/fal-ai/fast-sdxl"),
        ("/queue.fal.run/fal-ai/x/requests/1/status", "logs=true",
         "https://queue.fal.run/fal-ai/x/requests/1/status?logs=true"),
        ("/queue.fal.run", "", "https://queue.fal.run/"),
        ("/queue.fal.runner/x", "", None),  # only the whole segment
        ("/queue.fal.run.evil.com/x", "", None),
        ("/QUEUE.fal.run/x", "", None),
        ("/queue.fal.run/%2e%2e/x", "", "https://queue.fal.run/%2e%2e/x"),  # refused below
    ],
)  # fmt: skip
def test_queue_target(path: str, query: str, expected: str | None) -> None:
    assert queue_target(path, query) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/queue.fal.run/../fal-ai/x",
        "/queue.fal.run/%2e%2e/x",
        "/queue.fal.run//evil.example/x",
        "/queue.fal.run/%2F%2Fevil.example/x",
        "/queue.fal.run/x\\y",
        "/queue.fal.run/x y",
        "/queue.fal.run/x#y",
        "/queue.fal.run",
    ],
)
def test_hostile_queue_paths_are_refused_by_target_resolution(path: str) -> None:
    """The queue URL a path names goes through the one resolver (the SDK header's rules)."""
    from proxy.errors import ProxyError

    target = queue_target(path, "")
    with pytest.raises(ProxyError) as refused:
        resolve_target(path, "", target, gateway_url=GATEWAY, proxy_route="/api/fal/proxy")
    assert refused.value.status in (400, 403)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("Key abc:def", "abc:def"),
        ("key   tok-123  ", "tok-123"),
        ("KEY tok", "tok"),
        ("Bearer jwt.x.y", "Bearer jwt.x.y"),  # left for the caller auth's own "Bearer " rule
        ("tok", "tok"),
        ("Key ", ""),
    ],
)
def test_key_credential(header: str | None, expected: str | None) -> None:
    assert key_credential(header) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://queue.fal.run/fal-ai/x/requests/1/status",
         f"{ORIGIN}/queue.fal.run/fal-ai/x/requests/1/status"),
        ("https://fal.run/fal-ai/x", f"{ORIGIN}/fal-ai/x"),
        # The same URLs written otherwise: still fal's, still pointed here.
        ("https://queue.fal.run:443/a/requests/1", f"{ORIGIN}/queue.fal.run/a/requests/1"),
        ("HTTPS://QUEUE.FAL.RUN/a/requests/1?x=1", f"{ORIGIN}/queue.fal.run/a/requests/1?x=1"),
        ("https://queue.falrun.com/a/requests/1", f"{ORIGIN}/queue.fal.run/a/requests/1"),
        ("https://queue.fal.run", f"{ORIGIN}/queue.fal.run/"),
        # Anything else is not handed on (the client would follow it with its credential).
        ("https://rest.fal.ai/tokens/", None),
        ("https://queue.fal.run.evil.example/x", None),
        ("http://queue.fal.run/x", None),
        ("https://queue.fal.run:8443/x", None),
        ("https://user@queue.fal.run/x", None),
        ("https://queue.fal.run:99999/x", None),
        ("https://evil.example/https://queue.fal.run/x", None),
        ("/relative/status", None),
        ("", None),
    ],
)  # fmt: skip
def test_proxied_url(url: str, expected: str | None) -> None:
    assert proxied_url(url, ORIGIN) == expected


def test_rewrite_changes_only_the_three_strings_byte_for_byte() -> None:
    """Numbers, escapes (a lone surrogate an app logged), spacing, member order and repeated
    members are the gateway's bytes, unchanged; each URL member is replaced where it stands."""
    body = (
        b'{ "request_id":"r1", "metrics":{"inference_time":1e400,"seed":1.10},'
        b' "logs":[{"message":"bad \\ud800 byte \\u00e9"}],"request_id":"r2",'
        b'"status_url" :  "https:\\/\\/queue.fal.run\\/a\\/requests\\/r2\\/status",'
        b'"big":12345678901234567890.5}\n'
    )
    out = rewrite_queue_urls(body, ORIGIN)
    assert out == body.replace(
        b'"https:\\/\\/queue.fal.run\\/a\\/requests\\/r2\\/status"',
        f'"{ORIGIN}/queue.fal.run/a/requests/r2/status"'.encode(),
    )


@pytest.mark.parametrize(
    "url", ["https://evil.example/x", "http://queue.fal.run/x", "https://rest.fal.ai/tokens/"]
)
def test_a_url_member_outside_fal_is_refused_not_passed(url: str) -> None:
    body = json.dumps({"request_id": "r1", "status_url": f"{QUEUE_URL}/status", "cancel_url": url})
    with pytest.raises(BadGateway) as refused:
        rewrite_queue_urls(body.encode(), ORIGIN)
    assert refused.value.status == 502 and "cancel_url" in refused.value.detail


QUEUE_URL = "https://queue.fal.run/fal-ai/x/requests/r1"


def test_rewrite_points_the_three_urls_here_and_keeps_everything_else() -> None:
    base = "https://queue.fal.run/fal-ai/x/requests/r1"
    answer = {
        "request_id": "r1",
        "status": "IN_QUEUE",
        "queue_position": 3,
        "status_url": f"{base}/status",
        "response_url": base,
        "cancel_url": f"{base}/cancel",
        "logs": [{"message": "see https://queue.fal.run/other and é"}],
        "metrics": {"status_url": f"{base}/status"},  # nested: not the client's, untouched
        "image_url": "https://v3.fal.media/files/x.png",
        "big": 12345678901234567890,
        "ratio": 0.1,
    }
    out = json.loads(rewrite_queue_urls(json.dumps(answer).encode(), ORIGIN) or b"")
    here = f"{ORIGIN}/queue.fal.run/fal-ai/x/requests/r1"
    assert out == {
        **answer,
        "status_url": f"{here}/status",
        "response_url": here,
        "cancel_url": f"{here}/cancel",
    }
    assert list(out) == list(answer)  # member order kept


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'"https://queue.fal.run/x"',
        b'{"status": "COMPLETED"}',
        b'{"response_url": null}',
        b'{"status_url": "https://queue.fal.run/x"',  # not JSON for json.loads either
        b'{"status_url": "https://evil.example/\xff"}',  # not UTF-8: json.loads refuses too
        b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # deep, but no URL member
        b'{"n": ' + b"9" * 5000 + b"}",
        b'{"status_url": "https://queue.fal.run/x"} trailing',
        b'{"status_url": "https://queue.fal.run/x",}',
    ],
)
def test_nothing_to_rewrite(body: bytes) -> None:
    assert rewrite_queue_urls(body, ORIGIN) is None


EVIL = "https://evil.example/steal"


def as_the_client_reads(body: bytes) -> object:
    """What fal-client makes of an answer: httpx's ``response.json()`` is ``json.loads``."""
    return json.loads(body)


def served(body: bytes) -> bytes:
    """What the relay sends for ``body`` on a rewritten route (BadGateway propagates)."""
    return rewrite_queue_urls(body, ORIGIN) or body


@pytest.mark.parametrize(
    "codec", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
)
@pytest.mark.parametrize("url", [EVIL, f"{QUEUE_URL}/status"])
def test_an_answer_json_reads_in_another_encoding_is_refused(codec: str, url: str) -> None:
    """UTF-8 with a BOM, UTF-16 and UTF-32 are JSON to json.loads (the client's parser): passed
    on unrewritten, the client would poll the status_url they name with the caller's token.
    fal answers in plain UTF-8: the others are refused, whatever URL they carry."""
    body = json.dumps({"request_id": "r1", "status_url": url}).encode(codec)
    assert as_the_client_reads(body) == {"request_id": "r1", "status_url": url}  # the threat
    with pytest.raises(BadGateway) as refused:
        rewrite_queue_urls(body, ORIGIN)
    assert refused.value.status == 502 and codec.split("-")[0] in refused.value.detail
    # Gzipped, the same: decoded first, then refused.
    with pytest.raises(BadGateway):
        rewrite_queue_urls(decoded(gzip.compress(body), "gzip"), ORIGIN)


@pytest.mark.parametrize(
    "body",
    [
        # json.loads keeps the last of duplicate members: every one is checked.
        f'{{"status_url":"{QUEUE_URL}/status","status_url":"{EVIL}"}}'.encode(),
        f'{{"status_url":"{EVIL}","status_url":"{QUEUE_URL}/status"}}'.encode(),
        # A key spelled with escapes is the same key to json.loads.
        f'{{"status\\u005furl":"{EVIL}"}}'.encode(),
        f'{{"\\u0063ancel_url":"{EVIL}"}}'.encode(),
        # The value spelled with escapes.
        b'{"status_url":"https:\\/\\/evil\\u002eexample/x"}',
        # Not a string: not the proxy's URL either.
        b'{"status_url": 5}',
        b'{"response_url": ["https://queue.fal.run/x"]}',
        b'{"cancel_url": {"url": "https://queue.fal.run/x"}}',
        b'{"status_url": true}',
        # Lone surrogates encoded in UTF-8: json.loads reads them (surrogatepass).
        f'{{"log":"\ud800","status_url":"{EVIL}"}}'.encode("utf-8", "surrogatepass"),
        # NaN, Infinity and huge numbers are JSON to json.loads.
        f'{{"a":NaN,"b":-Infinity,"c":1e999999,"status_url":"{EVIL}"}}'.encode(),
        # Past json's limits here (digits, depth), but another Python may read it: the URL
        # member after is found all the same.
        b'{"n":' + b"9" * 5000 + f',"status_url":"{EVIL}"}}'.encode(),
        b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + f',"status_url":"{EVIL}"}}'.encode(),
        b'{"a":'
        + b'{"b":[' * 50_000
        + b"1"
        + b"]}" * 50_000
        + f',"cancel_url":"{EVIL}"}}'.encode(),
        b'{"a":['
        + b'[1e5,-0.5,NaN,-Infinity,null,true,false,"s",{}],' * 3
        + b"{}], "
        + f'"response_url":"{EVIL}"}}'.encode(),
    ],
)
def test_hostile_spellings_are_refused(body: bytes) -> None:
    with pytest.raises(BadGateway) as refused:
        rewrite_queue_urls(body, ORIGIN)
    assert refused.value.status == 502


@pytest.mark.parametrize(
    "body",
    [
        f'{{"status_url":"{QUEUE_URL}/status","status_url":"{QUEUE_URL}/other"}}'.encode(),
        f'{{"status\\u005furl":"{QUEUE_URL}/status"}}'.encode(),
        f' \r\n\t{{"status_url":"{QUEUE_URL}/status","x":NaN}} \n'.encode(),
        f'{{"log":"\ud800","status_url":"{QUEUE_URL}/status"}}'.encode("utf-8", "surrogatepass"),
        f'{{"n":1e400,"cancel_url":null,"response_url":"{QUEUE_URL}"}}'.encode(),
        # Nested URLs and top-level arrays are not the client's: it reads the top level only.
        f'{{"metrics":{{"status_url":"{EVIL}"}},"status_url":"{QUEUE_URL}/status"}}'.encode(),
        f'[{{"status_url":"{EVIL}"}}]'.encode(),
    ],
)
def test_what_the_client_reads_points_here(body: bytes) -> None:
    """Whatever is served, json.loads finds only this port's URLs at the top level."""
    answer = as_the_client_reads(served(body))
    if isinstance(answer, dict):
        for key in ("status_url", "response_url", "cancel_url"):
            assert answer.get(key) is None or answer[key].startswith(ORIGIN + "/"), answer


ANSWER = json.dumps({"status_url": "https://queue.fal.run/a/b/requests/1/status"}).encode()


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("", ANSWER),
        ("identity", ANSWER),
        ("gzip", gzip.compress(ANSWER, mtime=0)),
        ("x-gzip", gzip.compress(ANSWER, mtime=0)),
        (" GZIP ", gzip.compress(ANSWER, mtime=0)),
        ("deflate", zlib.compress(ANSWER)),  # zlib-wrapped, as RFC 9110 says
        ("deflate", zlib.compress(ANSWER)[2:-4]),  # raw deflate, as some servers send
        (
            "gzip",
            gzip.compress(ANSWER[:20], mtime=0) + gzip.compress(ANSWER[20:], mtime=0),
        ),  # two members
    ],
)
def test_decoded(encoding: str, body: bytes) -> None:
    assert decoded(body, encoding) == ANSWER


def test_an_empty_body_is_empty_whatever_its_label() -> None:
    assert decoded(b"", "gzip") == b"" == decoded(b"", "br")


@pytest.mark.parametrize(
    ("encoding", "body", "words"),
    [
        ("br", b"\x0b\x02\x80", "cannot rewrite"),
        ("zstd", b"(\xb5/\xfd", "cannot rewrite"),
        ("gzip, br", gzip.compress(ANSWER, mtime=0), "cannot rewrite"),
        ("gzip", b"not gzip", "does not decode"),
        ("gzip", gzip.compress(ANSWER, mtime=0)[:-12], "does not decode"),  # truncated
        ("deflate", b"\x78\x9cnot", "does not decode"),
        ("gzip", gzip.compress(ANSWER, mtime=0) + b"GARBAGE", "does not decode"),  # not dropped
        ("deflate", zlib.compress(ANSWER) + b"more", "does not decode"),
        # A bomb: 9 MiB of zeros in a few KiB. Refused after at most the limit is inflated.
        ("gzip", gzip.compress(b"0" * (MAX_REWRITTEN_BYTES + 1024 * 1024)), "too large"),
    ],
)
def test_decoded_refuses(encoding: str, body: bytes, words: str) -> None:
    with pytest.raises(BadGateway) as refused:
        decoded(body, encoding)
    assert refused.value.status == 502 and words in refused.value.message


def test_gzip_members_are_capped() -> None:
    """Many tiny members were decoded in quadratic time on the event loop (3.2 MB of 20-byte
    members: 9.5 s). fal sends one member: up to MAX_GZIP_MEMBERS are read, more refused."""
    text = ANSWER * 2
    pieces = [text[i : i + 1] for i in range(MAX_GZIP_MEMBERS)]
    assert decoded(b"".join(gzip.compress(p) for p in pieces), "gzip") == text[:MAX_GZIP_MEMBERS]
    for body in (
        b"".join(gzip.compress(p) for p in [*pieces, b"x"]),
        gzip.compress(b"") * (MAX_GZIP_MEMBERS + 1),
        gzip.compress(b"") * 160_000,  # 3.2 MB of 20-byte members
    ):
        with pytest.raises(BadGateway) as refused:
            decoded(body, "gzip")
        assert refused.value.status == 502 and f"{MAX_GZIP_MEMBERS} gzip members" in (
            refused.value.detail
        )


def test_decoding_is_linear_in_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes zlib is handed for a body are the body once (plus a slice per member), not
    the rest of the body once per member."""
    handed: list[int] = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self, wbits: int) -> None:
            self.inner = real(wbits)

        def decompress(self, data: memoryview, limit: int) -> bytes:
            handed.append(len(data))
            return self.inner.decompress(data, limit)

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    monkeypatch.setattr(zlib, "decompressobj", Counting)
    padding = json.dumps({"pad": random.Random(0).randbytes(100_000).hex()}).encode()
    members = [gzip.compress(ANSWER)] * (MAX_GZIP_MEMBERS - 1) + [gzip.compress(padding)]
    body = b"".join(members)
    assert decoded(body, "gzip") == ANSWER * (MAX_GZIP_MEMBERS - 1) + padding
    assert sum(handed) <= len(body) + MAX_GZIP_MEMBERS * 64 * 1024


def queue(path: str) -> Target:
    return Target("queue", "queue.fal.run", path, "", GATEWAY, f"https://queue.fal.run{path}")


@pytest.mark.parametrize(
    ("method", "target", "rewrites"),
    [
        ("POST", queue("/fal-ai/x"), True),  # submit
        ("POST", queue("/fal-ai/flux/dev"), True),
        ("GET", queue("/fal-ai/x/requests/1/status"), True),
        ("GET", queue("/fal-ai/x/requests/1/status/"), True),
        ("GET", queue("/fal-ai/x/requests/1"), False),  # the result: the app's own output
        ("GET", queue("/fal-ai/x/requests/1/status/stream"), False),
        ("PUT", queue("/fal-ai/x/requests/1/cancel"), False),
        ("POST", queue("/fal-ai/x/requests/1/status"), False),
        ("POST", Target("run", "fal.run", "/fal-ai/x", "", GATEWAY, None), False),
    ],
)
def test_which_answers_are_rewritten(method: str, target: Target, rewrites: bool) -> None:
    assert PythonSdkListener.rewrites(method, target) is rewrites


def test_read_headers_takes_the_key_as_credential_and_the_target_from_the_path() -> None:
    scope = {
        "headers": [
            (b"authorization", b"Key caller-token"),
            (b"x-proxy-authorization", b"Bearer other"),
            (b"x-fal-target-url", b"https://rest.fal.ai/tokens/"),  # ignored on this port
        ],
        "raw_path": b"/queue.fal.run/fal-ai/x",
        "path": "/queue.fal.run/fal-ai/x",
        "query_string": b"a=1",
    }
    seen = PythonSdkListener(ORIGIN).read_headers(scope)
    assert seen.credential == "caller-token"
    assert seen.target == "https://queue.fal.run/fal-ai/x?a=1"
    scope["raw_path"] = b"/fal-ai/x"
    assert PythonSdkListener(ORIGIN).read_headers(scope).target is None


# --- settings -----------------------------------------------------------------------------


def settings(**env: str) -> Settings:
    return Settings.from_env({"FAL_KEY": "k", "FAL_PROXY_GATEWAY_URL": "http://gw/x", **env})


def test_defaults_and_names(tmp_path: Path) -> None:
    assert settings().python_sdk == PythonSdkSettings()
    python = settings(FAL_PROXY_PYTHON_SDK_PORT="8443").python_sdk
    assert python.port == 8443 and python.host_name == "127.0.0.1"
    assert python.names("127.0.0.1") == ["127.0.0.1", "localhost", "::1"]
    # Off loopback with no caller auth needs the opt-in (what these tests look at is the port).
    open_ = {"FAL_PROXY_ALLOW_UNAUTHENTICATED": "true"}
    wild = settings(FAL_PROXY_PYTHON_SDK_PORT="8443", FAL_PROXY_HOST="0.0.0.0", **open_).python_sdk
    assert wild.host_name == "localhost" and wild.origin == "https://localhost:8443"
    assert wild.names("0.0.0.0") == ["localhost", "127.0.0.1", "::1"]
    named = settings(
        FAL_PROXY_PYTHON_SDK_PORT="8443", FAL_PROXY_PYTHON_SDK_HOST="Proxy.Internal",
        FAL_PROXY_HOST="10.0.0.5", **open_,
    ).python_sdk  # fmt: skip
    assert named.names("10.0.0.5") == [
        "proxy.internal",
        "10.0.0.5",
        "localhost",
        "127.0.0.1",
        "::1",
    ]
    six = settings(FAL_PROXY_PYTHON_SDK_PORT="8443", FAL_PROXY_PYTHON_SDK_HOST="::1").python_sdk
    assert six.origin == "https://[::1]:8443"


def test_client_env(tmp_path: Path) -> None:
    python = settings(
        FAL_PROXY_PYTHON_SDK_PORT="8443", FAL_PROXY_STATE_DIR=str(tmp_path)
    ).python_sdk
    pairs = python.client_env("127.0.0.1", caller_auth=False)
    assert pairs == [
        ("FAL_RUN_HOST", "127.0.0.1:8443"),
        ("FAL_QUEUE_RUN_HOST", "127.0.0.1:8443/queue.fal.run"),
        ("SSL_CERT_FILE", str(tmp_path / "ca-bundle.pem")),
        ("FAL_KEY", FAL_KEY_PLACEHOLDER),
    ]
    assert [name for name, _ in python.client_env("127.0.0.1", caller_auth=True)] == [
        "FAL_RUN_HOST", "FAL_QUEUE_RUN_HOST", "SSL_CERT_FILE"]  # fmt: skip
    assert env_lines([("A", "x y'z")], export=True) == "export A='x y'\"'\"'z'\n"
    assert env_lines([("A", "x")], export=False) == "A=x\n"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"FAL_PROXY_PYTHON_SDK_PORT": "70000"}, "FAL_PROXY_PYTHON_SDK_PORT"),
        ({"FAL_PROXY_PYTHON_SDK_PORT": "x"}, "FAL_PROXY_PYTHON_SDK_PORT"),
        ({"FAL_PROXY_PYTHON_SDK_PORT": "8787"}, "FAL_PROXY_PYTHON_SDK_PORT"),  # = FAL_PROXY_PORT
        ({"FAL_PROXY_PYTHON_SDK_PORT": "9100", "FAL_PROXY_METRICS_PORT": "9100"},
         "FAL_PROXY_PYTHON_SDK_PORT"),
        ({"FAL_PROXY_PYTHON_SDK_HOST": "https://proxy"}, "FAL_PROXY_PYTHON_SDK_HOST"),
        ({"FAL_PROXY_PYTHON_SDK_HOST": "proxy:8443"}, "FAL_PROXY_PYTHON_SDK_HOST"),
        ({"FAL_PROXY_PYTHON_SDK_HOST": "a/b"}, "FAL_PROXY_PYTHON_SDK_HOST"),
        ({"FAL_PROXY_TLS_CERT_FILE": "/c.pem"}, "FAL_PROXY_TLS_KEY_FILE"),
        ({"FAL_PROXY_TLS_KEY_FILE": "/k.pem"}, "FAL_PROXY_TLS_CERT_FILE"),
        ({"FAL_PROXY_PYTHON_SDK_PORT": "8443", "FAL_PROXY_TLS_CERT_FILE": "/nope/c.pem",
          "FAL_PROXY_TLS_KEY_FILE": "/nope/k.pem"}, "FAL_PROXY_TLS_CERT_FILE"),
    ],
)  # fmt: skip
def test_settings_errors_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as error:
        settings(**env)
    assert named in str(error.value)


def test_a_key_that_is_not_the_certificates_is_refused(tmp_path: Path) -> None:
    from proxy.config.tls_certs import ensure_certificates

    one = ensure_certificates(tmp_path / "one", ["localhost"])
    two = ensure_certificates(tmp_path / "two", ["localhost"])
    with pytest.raises(SettingsError) as error:
        settings(FAL_PROXY_PYTHON_SDK_PORT="8443", FAL_PROXY_TLS_CERT_FILE=str(one.cert),
                 FAL_PROXY_TLS_KEY_FILE=str(two.key))  # fmt: skip
    message = str(error.value)
    assert "FAL_PROXY_TLS_CERT_FILE" in message
    # The private key never reaches the message (it goes to logs and terminals): no line of
    # its PEM, header or base64 body.
    pem = [line for line in two.key.read_text().splitlines() if line.strip()]
    assert len(pem) >= 3 and not [line for line in pem if line in message], message
    given = settings(FAL_PROXY_PYTHON_SDK_PORT="8443", FAL_PROXY_TLS_CERT_FILE=str(one.cert),
                     FAL_PROXY_TLS_KEY_FILE=str(one.key)).python_sdk  # fmt: skip
    assert given.tls_files("127.0.0.1") is None  # the operator's: nothing generated
    assert [name for name, _ in given.client_env("127.0.0.1", caller_auth=True)] == [
        "FAL_RUN_HOST", "FAL_QUEUE_RUN_HOST"]  # fmt: skip


def test_an_unwritable_state_dir_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    python = settings(
        FAL_PROXY_PYTHON_SDK_PORT="8443", FAL_PROXY_STATE_DIR=str(blocker / "state")
    ).python_sdk
    with pytest.raises(SettingsError) as error:
        python.tls_files("127.0.0.1")
    assert str(error.value).startswith("FAL_PROXY_STATE_DIR: ")


def test_check_shows_the_ports_settings_under_their_own_name() -> None:
    from proxy.check import describe

    lines = describe(settings(FAL_PROXY_PYTHON_SDK_PORT="8443"))
    assert "python_sdk.port = 8443" in lines and "access.auth = none" in lines
    assert not any(line.startswith("access.port") for line in lines)
