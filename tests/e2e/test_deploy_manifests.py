"""deploy/: the Kubernetes manifests validate offline against the bundled schemas, and the
compose example wires the proxy sidecar, Redis, healthchecks and the FAL_KEY file secret.
Both sidecar deployments put nginx (deploy/nginx/fal-proxy.conf) in front of the proxy on
loopback, and the proxy trusts loopback: each user of the site is a client of their own
(tests/e2e/test_sidecar_nginx.py runs that conf)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

K8S_VERSION = "1.30.0"
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
NGINX_CONF = ROOT / "deploy" / "nginx" / "fal-proxy.conf"
NGINX_CONF_PATH = "/etc/nginx/conf.d/default.conf"
LOOPBACK = "127.0.0.1/32,::1/128"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_manifests_exist() -> None:
    assert {p.name for p in MANIFESTS} >= {"sidecar-pod.yaml", "standalone.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_offline(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_standalone_has_the_production_pieces() -> None:
    docs = {d["kind"]: d for d in documents(ROOT / "deploy" / "k8s" / "standalone.yaml")}
    assert set(docs) >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
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
    docs = {d["kind"]: d for d in documents(ROOT / "deploy" / "k8s" / "standalone.yaml")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
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
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        if str(service.get("image", "")).startswith("fal-gateway-proxy"):
            envs.append({k: str(v) for k, v in service.get("environment", {}).items()})
    assert len(envs) >= 3
    for env in envs:
        host = env.get("FAL_PROXY_HOST", "0.0.0.0")
        if env.get("FAL_PROXY_AUTH", "none") == "none" and not is_loopback(host):
            assert env.get("FAL_PROXY_ALLOW_UNAUTHENTICATED") == "true", env
        if "FAL_PROXY_METRICS_PORT" in env and not is_loopback(host):
            assert "FAL_PROXY_METRICS_HOST" in env, env


def test_compose_wires_sidecar_redis_and_secret() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"web", "fal-proxy", "redis"}
    for name in ("web", "fal-proxy", "redis"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    proxy = services["fal-proxy"]
    assert "/healthz" in " ".join(proxy["healthcheck"]["test"])
    assert proxy["secrets"] == ["fal_key"]
    assert proxy["environment"]["FAL_KEY_FILE"] == "/run/secrets/fal_key"
    assert proxy["environment"]["FAL_PROXY_REDIS_URL"].startswith("redis://redis:")
    assert "FAL_KEY" not in proxy["environment"]
    assert compose["secrets"]["fal_key"]["file"]
    assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_puts_nginx_before_the_proxy_on_loopback() -> None:
    compose_file = ROOT / "deploy" / "docker-compose.yml"
    services = yaml.safe_load(compose_file.read_text())["services"]
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
