"""Settings table: each bad value gives its own message, naming the variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.config.envvars import Secret
from proxy.config.settings import DOCUMENTED_VARIABLES, Settings, SettingsError

GW = {"FAL_PROXY_GATEWAY_URL": "http://127.0.0.1:9000/v1/acct/gw/fal"}
ACCOUNT = "0123456789abcdef0123456789abcdef"


def test_minimal_settings() -> None:
    s = Settings.from_env({"FAL_KEY": "k", **GW})
    assert s.fal_key.reveal() == "k"
    assert s.gateway_url == "http://127.0.0.1:9000/v1/acct/gw/fal"
    assert (s.host, s.port, s.proxy_route) == ("127.0.0.1", 8787, "/api/fal/proxy")
    assert s.cf_aig_token is None


def test_gateway_url_built_from_account_and_gateway() -> None:
    s = Settings.from_env(
        {"FAL_KEY": "k", "CF_ACCOUNT_ID": ACCOUNT.upper(), "CF_GATEWAY_ID": "my-gw"}
    )
    assert s.gateway_url == f"https://gateway.ai.cloudflare.com/v1/{ACCOUNT}/my-gw/fal"


def test_key_id_and_secret_make_one_key() -> None:
    s = Settings.from_env({"FAL_KEY_ID": "id", "FAL_KEY_SECRET": "sec", **GW})
    assert s.fal_key.reveal() == "id:sec"


def test_key_and_token_files(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("file-key\n")
    (tmp_path / "tok").write_text(" tok \n")
    s = Settings.from_env(
        {"FAL_KEY_FILE": str(tmp_path / "key"), "CF_AIG_TOKEN_FILE": str(tmp_path / "tok"), **GW}
    )
    assert s.fal_key.reveal() == "file-key"
    assert s.cf_aig_token is not None and s.cf_aig_token.reveal() == "tok"


def test_secrets_never_show_in_repr() -> None:
    s = Settings.from_env(
        {"FAL_KEY": "super-secret-key", "CF_AIG_TOKEN": "super-secret-token", **GW}
    )
    assert "super-secret" not in repr(s)
    assert "super-secret" not in str(s.fal_key) and "super-secret" not in f"{s.cf_aig_token}"
    assert Secret("a") == Secret("a")


JWT = {"FAL_KEY": "k", **GW, "FAL_PROXY_AUTH": "jwt"}
PEM = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEF\n-----END PUBLIC KEY-----\n"
BAD = [
    ({**GW}, "FAL_KEY"),
    ({"FAL_KEY": "  ", **GW}, "FAL_KEY"),
    ({"FAL_KEY_ID": "id", **GW}, "FAL_KEY_SECRET"),
    ({"FAL_KEY_SECRET": "s", **GW}, "FAL_KEY_ID"),
    ({"FAL_KEY_FILE": "/nonexistent/key", **GW}, "FAL_KEY_FILE"),
    ({"FAL_KEY": "bad\nkey", **GW}, "FAL_KEY"),
    ({"FAL_KEY": "k"}, "CF_ACCOUNT_ID"),
    ({"FAL_KEY": "k", "CF_ACCOUNT_ID": "123", "CF_GATEWAY_ID": "g"}, "CF_ACCOUNT_ID"),
    ({"FAL_KEY": "k", "CF_ACCOUNT_ID": "z" * 32, "CF_GATEWAY_ID": "g"}, "CF_ACCOUNT_ID"),
    ({"FAL_KEY": "k", "CF_ACCOUNT_ID": ACCOUNT}, "CF_GATEWAY_ID"),
    ({"FAL_KEY": "k", "CF_ACCOUNT_ID": ACCOUNT, "CF_GATEWAY_ID": "Bad/Gateway"}, "CF_GATEWAY_ID"),
    ({"FAL_KEY": "k", "FAL_PROXY_GATEWAY_URL": "ftp://x/y"}, "FAL_PROXY_GATEWAY_URL"),
    ({"FAL_KEY": "k", "FAL_PROXY_GATEWAY_URL": "http://h:99999/x"}, "FAL_PROXY_GATEWAY_URL"),
    ({"FAL_KEY": "k", "FAL_PROXY_GATEWAY_URL": "http://h/x?a=1"}, "FAL_PROXY_GATEWAY_URL"),
    ({"FAL_KEY": "k", "FAL_PROXY_GATEWAY_URL": "not a url"}, "FAL_PROXY_GATEWAY_URL"),
    ({"FAL_KEY": "k", "CF_AIG_TOKEN": "a\rb", **GW}, "CF_AIG_TOKEN"),
    ({"FAL_KEY": "k", "CF_AIG_TOKEN_FILE": "/nonexistent", **GW}, "CF_AIG_TOKEN_FILE"),
    ({"FAL_KEY": "k", "FAL_PROXY_PORT": "http", **GW}, "FAL_PROXY_PORT"),
    ({"FAL_KEY": "k", "FAL_PROXY_PORT": "70000", **GW}, "FAL_PROXY_PORT"),
    ({"FAL_KEY": "k", "FAL_PROXY_ROUTE": "api", **GW}, "FAL_PROXY_ROUTE"),
    ({"FAL_KEY": "k", "FAL_PROXY_ROUTE": "/healthz", **GW}, "FAL_PROXY_ROUTE"),
    ({"FAL_KEY": "k", "FAL_PROXY_CONNECT_TIMEOUT": "soon", **GW}, "FAL_PROXY_CONNECT_TIMEOUT"),
    ({"FAL_KEY": "k", "FAL_PROXY_FIRST_BYTE_TIMEOUT": "0", **GW}, "FAL_PROXY_FIRST_BYTE_TIMEOUT"),
    ({"FAL_KEY": "k", "FAL_PROXY_IDLE_TIMEOUT": "-1", **GW}, "FAL_PROXY_IDLE_TIMEOUT"),
    ({"FAL_KEY": "k", "FAL_PROXY_IDLE_TIMEOUT": "nan", **GW}, "FAL_PROXY_IDLE_TIMEOUT"),
    ({"FAL_KEY": "k", "FAL_PROXY_MAX_BODY_BYTES": "1e6", **GW}, "FAL_PROXY_MAX_BODY_BYTES"),
    (
        {"FAL_KEY": "k", "FAL_PROXY_UPSTREAM_CONNECTIONS": "-5", **GW},
        "FAL_PROXY_UPSTREAM_CONNECTIONS",
    ),
    ({"FAL_KEY": "k", "FAL_PROXY_LOG_FORMAT": "xml", **GW}, "FAL_PROXY_LOG_FORMAT"),
    ({"FAL_KEY": "k", "FAL_PROXY_LOG_LEVEL": "loud", **GW}, "FAL_PROXY_LOG_LEVEL"),
    ({"FAL_KEY": "k", "FAL_PROXY_WORKERS": "0", **GW}, "FAL_PROXY_WORKERS"),
    (
        {"FAL_KEY": "k", "FAL_PROXY_WORKERS": "2", "FAL_PROXY_METRICS_PORT": "9100", **GW},
        "FAL_PROXY_METRICS_PORT",
    ),
    ({"FAL_KEY": "k", "FAL_PROXY_HEADER_TIMEOUT": "0", **GW}, "FAL_PROXY_HEADER_TIMEOUT"),
    ({"FAL_KEY": "k", "FAL_PROXY_HEADER_TIMEOUT": "inf", **GW}, "FAL_PROXY_HEADER_TIMEOUT"),
    (
        {"FAL_KEY": "k", "FAL_PROXY_ALLOWED_HOSTS": "ok.example,a/b", **GW},
        "FAL_PROXY_ALLOWED_HOSTS",
    ),
    ({"FAL_KEY": "k", "FAL_PROXY_ALLOWED_HOSTS": "a.*.example", **GW}, "FAL_PROXY_ALLOWED_HOSTS"),
    ({"FAL_KEY": "k", "FAL_PROXY_ALLOWED_HOSTS": "[zz]", **GW}, "FAL_PROXY_ALLOWED_HOSTS"),
    ({"FAL_KEY": "k", "FAL_PROXY_METRICS_HOST": "ops.internal", **GW}, "FAL_PROXY_METRICS_HOST"),
    (
        {"FAL_KEY": "k", "FAL_PROXY_PRICES_FILE": "/nonexistent/prices.toml", **GW},
        "FAL_PROXY_PRICES_FILE",
    ),
    ({"FAL_KEY": "k", "FAL_PROXY_METRICS_HOST": "10.0.0.300", **GW}, "FAL_PROXY_METRICS_HOST"),
    ({"FAL_KEY": "k", "FAL_PROXY_HOST": "0.0.0.0", **GW}, "FAL_PROXY_ALLOW_UNAUTHENTICATED"),
    ({"FAL_KEY": "k", "FAL_PROXY_HOST": "::", **GW}, "FAL_PROXY_AUTH"),
    ({"FAL_KEY": "k", "FAL_PROXY_HOST": "10.1.2.3", **GW}, "FAL_PROXY_AUTH"),
    ({"FAL_KEY": "k", "FAL_PROXY_HOST": "proxy.internal", **GW}, "FAL_PROXY_AUTH"),
    (
        {
            "FAL_KEY": "k",
            "FAL_PROXY_HOST": "0.0.0.0",
            "FAL_PROXY_ALLOW_UNAUTHENTICATED": "no",
            **GW,
        },
        "FAL_PROXY_ALLOW_UNAUTHENTICATED",
    ),
    # PyJWT refuses a key that looks like a JWK or a PEM key as an HS256 secret: said at
    # start-up, not as every caller's 401.
    (
        {**JWT, "FAL_PROXY_JWT_SECRET": '{"kty": "oct", "k": "c2VjcmV0LXNlY3JldA"}'},
        "FAL_PROXY_JWT_SECRET",
    ),
    ({**JWT, "FAL_PROXY_JWT_SECRET": PEM}, "FAL_PROXY_JWT_SECRET"),
    ({**JWT, "FAL_PROXY_JWT_SECRET": "s" * 32 + "\udcff"}, "FAL_PROXY_JWT_SECRET"),  # not UTF-8
    # A JWKS is public: a password in its URL could only leak (into an error message).
    (
        {**JWT, "FAL_PROXY_JWT_JWKS_URL": "https://user:pw@id.example/jwks"},
        "FAL_PROXY_JWT_JWKS_URL",
    ),
]


@pytest.mark.parametrize(("env", "variable"), BAD, ids=[f"{v}-{i}" for i, (_, v) in enumerate(BAD)])
def test_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    message = str(info.value)
    assert variable in message
    assert "\n" not in message
    for secret in ("bad\nkey", "a\rb"):
        assert secret not in message


def _doc_rows() -> dict[str, str]:
    """Variable → its Default cell, from every ``| `NAME` … | default | meaning |`` row of the
    configuration doc (docs/configuration.md, generated from the declarations)."""
    doc = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"
    readme = doc.read_text(encoding="utf-8")
    rows: dict[str, str] = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]):
                rows.setdefault(name, cells[1])
    return rows


def _plain(default: str) -> str:
    """`600` → 600, required¹ → required, `104857600` (100 MiB) → 104857600, (all) → all."""
    default = re.sub(r"\\(.)", r"\1", default)  # markdown escapes: \~ is ~
    return re.sub(r"[`¹²()]| \(.*\)$", "", re.sub(r" \(.*\)$", "", default)).strip()


def test_the_configuration_doc_lists_every_variable_with_its_default() -> None:
    rows = _doc_rows()
    for names, default, _meaning in DOCUMENTED_VARIABLES:
        for name in re.split(r", | / ", names):
            assert name in rows, f"{name} has no row in docs/configuration.md"
            assert _plain(rows[name]) == _plain(default), (name, rows[name], default)


class _Recording(dict[str, str]):
    """An environment that remembers every variable the settings code asks for."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.asked: set[str] = set()

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return super().__contains__(key)


def _documented_names() -> set[str]:
    return {name for doc in DOCUMENTED_VARIABLES for name in re.split(r", | / ", doc.names)}


def test_every_variable_the_settings_read_is_documented(tmp_path: Path) -> None:
    """Read the settings through every branch and compare what was asked with the table."""
    tokens = tmp_path / "tokens"
    tokens.write_text("alice " + "t" * 32 + "\n", encoding="utf-8")
    key_file = tmp_path / "key"
    key_file.write_text("k" * 32, encoding="utf-8")
    envs = [
        {"FAL_KEY": "k", "CF_ACCOUNT_ID": ACCOUNT, "CF_GATEWAY_ID": "g"},
        {"FAL_KEY_ID": "i", "FAL_KEY_SECRET": "s", **GW, "FAL_PROXY_AUTH": "token"}
        | {"FAL_PROXY_CLIENT_TOKENS_FILE": str(tokens)},
        {"FAL_KEY_FILE": str(key_file), **GW, "FAL_PROXY_AUTH": "jwt"}
        | {"FAL_PROXY_JWT_SECRET_FILE": str(key_file)},
        {"FAL_KEY": "k", **GW, "FAL_PROXY_AUTH": "jwt", "FAL_PROXY_JWT_SECRET": "s" * 32},
    ]
    asked: set[str] = set()
    for values in envs:
        env = _Recording(values)
        Settings.from_env(env)
        asked |= env.asked
    assert asked - _documented_names() == set(), "read but not documented"
    assert _documented_names() - asked == set(), "documented but never read"


def test_defaults_in_the_table_are_the_defaults_the_settings_take() -> None:
    """A default written in the table is the value an unset variable gives."""
    settings = Settings.from_env({"FAL_KEY": "k", **GW})
    shown = {doc.names: doc.default for doc in DOCUMENTED_VARIABLES}
    assert shown["FAL_PROXY_IDLE_TIMEOUT"] == f"{settings.idle_timeout:g}"
    assert shown["FAL_PROXY_MAX_BODY_BYTES"] == str(settings.max_body_bytes)
    assert shown["FAL_PROXY_RATE_LIMIT_RPM"] == str(settings.access.requests_per_minute)
    assert shown["FAL_PROXY_ROUTE"] == settings.proxy_route
    assert shown["FAL_PROXY_REALTIME_DIRECT"] == "false" and not settings.realtime_direct
    assert shown["FAL_PROXY_AUTH_HEADER"] == settings.access.auth_header
    assert len(shown) == len(DOCUMENTED_VARIABLES)  # one row per variable


# --- where the proxy listens: open auth only on loopback unless opted in; the operator port -----


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "proxy.internal"])
def test_open_auth_off_loopback_is_refused_naming_auth_and_the_opt_in(host: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"FAL_KEY": "k", "FAL_PROXY_HOST": host, **GW})
    message = str(info.value)
    assert "FAL_PROXY_AUTH" in message and "FAL_PROXY_ALLOW_UNAUTHENTICATED" in message
    assert "\n" not in message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_open_auth_on_loopback_needs_no_opt_in(host: str) -> None:
    settings = Settings.from_env({"FAL_KEY": "k", "FAL_PROXY_HOST": host, **GW})
    assert settings.host == host and not settings.allow_unauthenticated


def test_open_auth_off_loopback_starts_with_the_opt_in_or_with_caller_auth(
    tmp_path: Path,
) -> None:
    opted = Settings.from_env(
        {"FAL_KEY": "k", "FAL_PROXY_HOST": "0.0.0.0", "FAL_PROXY_ALLOW_UNAUTHENTICATED": "true",
         **GW}
    )  # fmt: skip
    assert opted.allow_unauthenticated and opted.access.auth == "none"
    tokens = tmp_path / "tokens"
    tokens.write_text("web " + "t" * 32 + "\n")
    with_auth = Settings.from_env(
        {"FAL_KEY": "k", "FAL_PROXY_HOST": "0.0.0.0", "FAL_PROXY_AUTH": "token",
         "FAL_PROXY_CLIENT_TOKENS_FILE": str(tokens), **GW}
    )  # fmt: skip
    assert with_auth.access.auth == "token" and not with_auth.allow_unauthenticated


def test_the_metrics_port_listens_on_loopback_unless_told() -> None:
    base = {"FAL_KEY": "k", "FAL_PROXY_METRICS_PORT": "9100", **GW}
    assert Settings.from_env(base).metrics_host == "127.0.0.1"
    for host in ("0.0.0.0", "::", "10.1.2.3", "localhost"):
        assert Settings.from_env({**base, "FAL_PROXY_METRICS_HOST": host}).metrics_host == host
