"""deploy/: the Kubernetes manifests validate offline against the bundled schemas, and the
compose example validates against the Compose Specification's schema (tests/schemas/) and
wires the proxy sidecar, Redis, healthchecks, the key and gateway token as file secrets that
git ignores, and an offline demo profile. The standalone manifest ships its own Redis.
Both sidecar deployments put nginx (deploy/nginx/fal-proxy.conf) in front of the proxy on
loopback, and the proxy trusts loopback: each user of the site is a client of their own
(tests/e2e/test_sidecar_nginx.py runs that conf)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

K8S_VERSION = "1.30.0"
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
NGINX_CONF = ROOT / "deploy" / "nginx" / "fal-proxy.conf"
NGINX_CONF_PATH = "/etc/nginx/conf.d/default.conf"
LOOPBACK = "127.0.0.1/32,::1/128"
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
COMPOSE_SCHEMA = ROOT / "tests" / "schemas" / "compose-spec.json"
STANDALONE = ROOT / "deploy" / "k8s" / "standalone.yaml"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind_and_name(path: Path) -> dict[tuple[str, str], dict]:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in documents(path)}
    assert len(docs) == len(documents(path)), "two documents of one kind share a name"
    return docs


INTERPOLATION = re.compile(
    r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+]([^}]*))?\}|([A-Za-z_]\w*))"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, $VAR and $$ in every string value, as `docker
    compose config` would substitute them from ``env`` (unset: the default, else empty)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):

        def substitute(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name = m.group(1) or m.group(3)
            return env.get(name) or (m.group(2) or "")

        return INTERPOLATION.sub(substitute, value)
    return value


def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), {})


def test_manifests_exist() -> None:
    assert {p.name for p in MANIFESTS} >= {"sidecar-pod.yaml", "standalone.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_offline(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_standalone_has_the_production_pieces() -> None:
    docs = by_kind_and_name(STANDALONE)
    name = "fal-gateway-proxy"
    kinds = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert {(kind, name) for kind in kinds} <= set(docs)
    pod = docs["Deployment", name]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (proxy,) = pod["containers"]
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert proxy["resources"]["requests"] and proxy["resources"]["limits"]
    sc = proxy["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    assert env["FAL_KEY_FILE"].startswith(mounts["secrets"] + "/")
    assert env["CF_AIG_TOKEN_FILE"].startswith(mounts["secrets"] + "/")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["secrets"]["secret"]["secretName"]


def test_standalone_turns_caller_auth_on_and_lists_the_allowed_apps() -> None:
    """It listens on the pod's address (the image's 0.0.0.0): never an open proxy."""
    docs = by_kind_and_name(STANDALONE)
    pod = docs["Deployment", "fal-gateway-proxy"]["spec"]["template"]["spec"]
    (proxy,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    assert env.get("FAL_PROXY_HOST", "0.0.0.0") == "0.0.0.0"  # the image's
    assert env["FAL_PROXY_AUTH"] in ("token", "jwt")
    assert "FAL_PROXY_ALLOW_UNAUTHENTICATED" not in env
    if env["FAL_PROXY_AUTH"] == "token":
        mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
        assert env["FAL_PROXY_CLIENT_TOKENS_FILE"].startswith(mounts["secrets"] + "/")
    apps = [a.strip() for a in env["FAL_PROXY_ALLOWED_APPS"].split(",")]
    assert apps and "*" not in apps and all(a.count("/") >= 1 for a in apps)


def test_every_shipped_proxy_off_loopback_has_auth_or_the_opt_in() -> None:
    """Whatever a manifest or the compose file runs: loopback, or caller auth, or a deliberate
    FAL_PROXY_ALLOW_UNAUTHENTICATED (the proxy refuses to start otherwise). A scraper in
    another pod needs FAL_PROXY_METRICS_HOST set: the metrics port listens on loopback."""
    from proxy.config.settings import is_loopback

    envs: list[dict[str, str]] = []
    for path in MANIFESTS:
        for doc in documents(path):
            spec = doc.get("spec", {})
            pod = spec.get("template", {}).get("spec", spec)
            for c in [*pod.get("containers", []), *pod.get("initContainers", [])]:
                if str(c.get("image", "")).startswith("fal-gateway-proxy"):
                    envs.append({e["name"]: str(e.get("value")) for e in c.get("env", [])})
    for service in compose()["services"].values():
        if str(service.get("image", "")).startswith("fal-gateway-proxy"):
            if service.get("command", [""])[0] == "demo":
                # The demo opts itself in: its key is a throwaway one only its emulator takes.
                assert "secrets" not in service and "environment" not in service, service
                continue
            envs.append({k: str(v) for k, v in service.get("environment", {}).items()})
    assert len(envs) >= 3
    for env in envs:
        host = env.get("FAL_PROXY_HOST", "0.0.0.0")
        if env.get("FAL_PROXY_AUTH", "none") == "none" and not is_loopback(host):
            assert env.get("FAL_PROXY_ALLOW_UNAUTHENTICATED") == "true", env
        if "FAL_PROXY_METRICS_PORT" in env and not is_loopback(host):
            assert "FAL_PROXY_METRICS_HOST" in env, env


def test_compose_wires_sidecar_redis_and_secret() -> None:
    project = compose()
    services = project["services"]
    assert set(services) >= {"web", "fal-proxy", "redis"}
    for name in ("web", "fal-proxy", "redis"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    proxy = services["fal-proxy"]
    assert "/healthz" in " ".join(proxy["healthcheck"]["test"])
    assert proxy["secrets"] == ["fal_key", "cf_aig_token"]
    assert proxy["environment"]["FAL_KEY_FILE"] == "/run/secrets/fal_key"
    assert proxy["environment"]["FAL_PROXY_REDIS_URL"].startswith("redis://redis:")
    assert "FAL_KEY" not in proxy["environment"]
    assert project["secrets"]["fal_key"]["file"]
    assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_validates_against_the_compose_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # It declares draft-07 as "https://json-schema.org/draft-07/schema", an address
    # jsonschema does not recognise (it knows the "http://…#" spelling): name the draft.
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(
        schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
        for e in validator.iter_errors(compose())
    ]
    assert errors == [], "\n".join(errors)


def test_compose_passes_the_gateway_token_as_a_file_secret() -> None:
    project = compose()
    proxy = project["services"]["fal-proxy"]
    assert proxy["environment"]["CF_AIG_TOKEN_FILE"] == "/run/secrets/cf_aig_token"
    assert "CF_AIG_TOKEN" not in proxy["environment"]
    assert "cf_aig_token" in proxy["secrets"]
    # The header says what to do with a gateway that is not authenticated (no token).
    header = COMPOSE_FILE.read_text().split("services:")[0]
    assert "CF_AIG_TOKEN_FILE" in header and "not authenticated" in header


def test_compose_secret_files_are_under_deploy_secrets_which_git_ignores() -> None:
    files = [s["file"] for s in compose()["secrets"].values()]
    assert {(COMPOSE_FILE.parent / f).resolve() for f in files} == {
        ROOT / "deploy" / "secrets" / "fal-key",
        ROOT / "deploy" / "secrets" / "cf-aig-token",
    }
    paths = ["deploy/secrets/fal-key", "deploy/secrets/cf-aig-token"]
    ignored = subprocess.run(
        ["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert ignored.returncode == 0 and ignored.stdout.split() == paths, ignored
    # Only the README that explains them is committed there.
    tracked = subprocess.run(
        ["git", "ls-files", "deploy/secrets"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert tracked.stdout.split() == ["deploy/secrets/README.md"], tracked


def test_compose_demo_profile_needs_no_account_and_no_secret() -> None:
    services = compose()["services"]
    demo = services["demo"]
    assert demo["profiles"] == ["demo"]
    # The same image as the proxy, with `demo` as the command: its ENTRYPOINT is the CLI.
    assert demo["image"] == services["fal-proxy"]["image"]
    assert demo["build"] == services["fal-proxy"]["build"]
    assert demo["command"] == ["demo", "--host", "0.0.0.0"]
    (published,) = demo["ports"]
    assert published.rsplit(":", 2)[-2:] == ["8787", "8787"], published
    assert not {"secrets", "environment", "depends_on", "network_mode"} & set(demo), demo
    assert demo["read_only"] is True and demo["cap_drop"] == ["ALL"]
    # Nothing else runs under the demo profile, and the demo runs under no other.
    assert [n for n, s in services.items() if s.get("profiles")] == ["demo"]


def test_compose_puts_nginx_before_the_proxy_on_loopback() -> None:
    compose_file = COMPOSE_FILE
    services = compose()["services"]
    web, proxy = services["web"], services["fal-proxy"]
    assert web["image"].startswith("nginxinc/nginx-unprivileged:")
    assert web["ports"] == ["8080:8080"]
    assert "8080" in " ".join(web["healthcheck"]["test"])
    source, target, mode = web["volumes"][0].split(":")
    assert (compose_file.parent / source).resolve() == NGINX_CONF
    assert (target, mode) == (NGINX_CONF_PATH, "ro")
    # The proxy shares web's network namespace: nginx reaches it on 127.0.0.1, as in the pod.
    assert proxy["network_mode"] == "service:web"
    assert "ports" not in proxy and "networks" not in proxy
    assert proxy["environment"]["FAL_PROXY_HOST"] == "127.0.0.1"
    assert proxy["environment"]["FAL_PROXY_TRUSTED_PROXIES"] == LOOPBACK
    # web must not wait for the proxy: the proxy starts inside web's namespace (a cycle).
    assert "depends_on" not in web
    assert proxy["depends_on"]["web"]["condition"] == "service_started"


def test_sidecar_pod_puts_nginx_before_the_proxy_on_loopback() -> None:
    docs = {d["kind"]: d for d in documents(ROOT / "deploy" / "k8s" / "sidecar-pod.yaml")}
    pod = docs["Pod"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    web, proxy = containers["web"], containers["fal-proxy"]
    (mount,) = web["volumeMounts"]
    assert (mount["mountPath"], mount["readOnly"]) == (NGINX_CONF_PATH, True)
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_map = docs["ConfigMap"]
    assert volumes[mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
    # The ConfigMap is the shipped conf, byte for byte: the one the nginx test runs.
    assert config_map["data"][mount["subPath"]] == NGINX_CONF.read_text()
    assert "proxy_pass http://127.0.0.1:8787;" in NGINX_CONF.read_text()
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    assert env["FAL_PROXY_HOST"] == "127.0.0.1"
    assert env["FAL_PROXY_TRUSTED_PROXIES"] == LOOPBACK
    # Every security setting the pod had stays.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for container in (web, proxy):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True


def test_python_sidecar_gives_the_app_what_python_env_prints(tmp_path: Path) -> None:
    """The Python sidecar pod: the app's fal variables are exactly what ``python-env`` prints
    for the proxy's environment in that pod, its fal key is not a key, and it reads the
    proxy's state (the CA bundle) read-only after the proxy has started."""
    import subprocess
    import sys

    from tests.conftest import Process, child_env
    from tests.redis_support import free_port

    pod = documents(ROOT / "deploy" / "k8s" / "python-sidecar-pod.yaml")[0]["spec"]
    (proxy,) = pod["initContainers"]
    (app,) = pod["containers"]
    assert proxy["restartPolicy"] == "Always" and "startupProbe" in proxy  # up before the app
    proxy_env = {e["name"]: e["value"] for e in proxy["env"]}
    app_env = {e["name"]: e["value"] for e in app["env"]}
    state = proxy_env["FAL_PROXY_STATE_DIR"]
    # The proxy with the pod's settings (a real key file, a writable state dir and a free
    # port here), then python-env beside it, as the pod's app would be configured.
    key = tmp_path / "fal-key"
    key.write_text("fal-key-for-the-test")
    port = proxy_env["FAL_PROXY_PYTHON_SDK_PORT"]
    run_env = {**proxy_env, "FAL_KEY_FILE": str(key), "FAL_PROXY_STATE_DIR": str(tmp_path / "s"),
               "FAL_PROXY_PYTHON_SDK_PORT": str(free_port()), "FAL_PROXY_PORT": "0",
               "FAL_PROXY_LOG_FORMAT": "json"}  # fmt: skip
    running = Process([sys.executable, "-m", "proxy"], child_env(**run_env))
    try:
        running.wait_for_json(lambda r: r.get("event") == "python_sdk")
        printed = subprocess.run(
            [sys.executable, "-m", "proxy", "python-env"],
            env=child_env(**run_env), capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    finally:
        running.stop()
    expected = dict(line.split("=", 1) for line in printed.stdout.splitlines())
    expected["SSL_CERT_FILE"] = expected["SSL_CERT_FILE"].replace(str(tmp_path / "s"), state)
    for name in ("FAL_RUN_HOST", "FAL_QUEUE_RUN_HOST"):
        expected[name] = expected[name].replace(run_env["FAL_PROXY_PYTHON_SDK_PORT"], port)
    assert app_env == expected
    mounts = {m["name"]: m for m in app["volumeMounts"]}
    state_mount = mounts["proxy-state"]
    assert state_mount["mountPath"] == state and state_mount["readOnly"] is True
    assert not any(m["name"] == "secrets" for m in app["volumeMounts"])  # no key for the app
    assert proxy_env["FAL_PROXY_HOST"] == "127.0.0.1"
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True


def test_standalone_ships_the_redis_it_points_at() -> None:
    """FAL_PROXY_REDIS_URL names a Service in the same file, in front of a small Redis run
    like the proxy: non-root, read-only, no capabilities, limited; only the proxy's pods may
    connect, and the proxy's Service does not select Redis's pods."""
    from urllib.parse import urlsplit

    docs = by_kind_and_name(STANDALONE)
    proxy_pod = docs["Deployment", "fal-gateway-proxy"]["spec"]["template"]
    (proxy,) = proxy_pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    redis_url = urlsplit(env["FAL_PROXY_REDIS_URL"])
    service = docs["Service", redis_url.hostname]
    (port,) = service["spec"]["ports"]
    assert port["port"] == redis_url.port
    deployment = next(
        d
        for (kind, _), d in docs.items()
        if kind == "Deployment"
        and d["spec"]["template"]["metadata"]["labels"].items()
        >= service["spec"]["selector"].items()
    )
    pod = deployment["spec"]["template"]["spec"]
    (redis,) = pod["containers"]
    assert redis["image"].startswith("redis:")
    assert {p["name"]: p["containerPort"] for p in redis["ports"]}[port["targetPort"]] == 6379
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = redis["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert redis["resources"]["requests"] and redis["resources"]["limits"]
    assert "redis-cli" in redis["readinessProbe"]["exec"]["command"]
    # Nothing persisted, and its working directory is a volume (the root is read-only).
    args = redis["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert {m["mountPath"] for m in redis["volumeMounts"]} == {"/data"}
    # The proxy's Service and PodDisruptionBudget select the proxy only.
    redis_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        spec = docs[kind, "fal-gateway-proxy"]["spec"]
        selector = spec.get("selector", {})
        selector = selector.get("matchLabels", selector)
        assert not selector.items() <= redis_labels.items(), (kind, selector)
    # Only the proxy's pods reach Redis.
    (policy,) = [d for (kind, _), d in docs.items() if kind == "NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"]["matchLabels"] == proxy_pod["metadata"]["labels"]
    assert [p["port"] for p in rule["ports"]] == [6379]
