"""deploy/: the Kubernetes manifests validate offline against the bundled schemas, and the
compose example wires the proxy sidecar, Redis, healthchecks and the FAL_KEY file secret."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

K8S_VERSION = "1.30.0"
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


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
    assert services["web"]["depends_on"]["fal-proxy"]["condition"] == "service_healthy"
    assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"
