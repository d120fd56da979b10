"""examples/deploy/kubernetes: the manifests pass the Kubernetes API schemas (offline, no cluster), the
ConfigMap's procmqtt.toml loads as ``procmqtt run`` would load it in the pod, and the pod spec agrees
with it: probe paths and ports, the grace period, the Secret's file, the client id, -w."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from harness import ROOT
from test_deploy import DEPLOY, dockerfile_instructions

from procmqtt import config
from procmqtt.supervisor.operations import STOP_MARGIN

K8S = DEPLOY / "kubernetes"
API_VERSION = "1.28.0"  # the oldest the test extra's kubernetes-validate is sure to ship


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for doc in documents():
        assert doc["kind"] not in found, f"two {doc['kind']}s"
        found[doc["kind"]] = doc
    return found


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


@pytest.mark.unit
def test_manifests_pass_the_api_schemas_strictly():
    kinds = by_kind()
    assert set(kinds) == {"ConfigMap", "Secret", "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for doc in kinds.values():
        kubernetes_validate.validate(doc, API_VERSION, strict=True)
    broken = copy.deepcopy(kinds["Deployment"])  # the check bites: a misspelled field fails
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, API_VERSION, strict=True)


@pytest.mark.unit
def test_the_pod_agrees_with_its_procmqtt_toml(tmp_path: Path):
    kinds = by_kind()
    deployment, pod = kinds["Deployment"], kinds["Deployment"]["spec"]["template"]["spec"]
    c = container(deployment)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}

    # the ConfigMap's file is what -c names, and it loads as it would in the pod: the mounted Secret's
    # file stands in at a temporary path, the pod's environment and the image's are applied
    cm = kinds["ConfigMap"]
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert c["args"][c["args"].index("-c") + 1] == mounts["config"]["mountPath"]
    assert (ROOT / c["args"][0].split(":")[0]).exists()
    text = cm["data"][mounts["config"]["subPath"]]
    secret = kinds["Secret"]
    assert volumes["secret"]["secret"]["secretName"] == secret["metadata"]["name"]
    password_file = re.search(r'password_file = "([^"]+)"', text)
    assert password_file is not None
    mounted, key = password_file.group(1).rsplit("/", 1)
    assert mounted == mounts["secret"]["mountPath"] and key in secret["stringData"]
    (tmp_path / key).write_text(secret["stringData"][key] + "\n")
    path = tmp_path / "procmqtt.toml"
    path.write_text(text.replace(password_file.group(1), str(tmp_path / key)))
    image = dict(dockerfile_instructions((DEPLOY / "Dockerfile").read_text()))
    image_env = {k: v for k, v in re.findall(r"(\w+)=(\S+)", image["ENV"]) if k.startswith("PROCMQTT_")}
    assert image_env, "the image sets [health] port through the environment, which wins over the file"
    assert any(
        "[metrics]" in args
        for name, args in dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
        if name == "RUN"
    )
    pod_env = {k: v for k, v in env_of(c).items() if isinstance(v, str)}
    environ = {**image_env, **pod_env, "PROCMQTT_MQTT_CLIENT_ID": "procmqtt-sensors-7c9d-x2k4q"}
    cfg = config.resolve(str(path), environ=environ, workers=2)
    assert cfg.mqtt.password is not None and cfg.mqtt.share_group  # several pods share the stream
    assert config.load(str(path)).health == cfg.health, "the image's PROCMQTT_HEALTH_PORT overrides the file's"

    # SIGKILL comes after every handler could finish: graceful_timeout plus the supervisor's margin
    assert pod["terminationGracePeriodSeconds"] > cfg.workers.graceful_timeout + STOP_MARGIN

    # the probes ask [health] on the port it listens on, on every interface
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert cfg.health.port == ports["health"] and cfg.health.host == "0.0.0.0"
    assert (
        cfg.metrics.port
        == ports["metrics"]
        == int(deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
    )
    for probe, route in (("livenessProbe", "/livez"), ("startupProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        assert get["path"] == route and ports.get(get["port"], get["port"]) == cfg.health.port, probe
        assert c[probe]["timeoutSeconds"] >= 2, "the endpoint may take up to its connection deadline"

    # a client id per pod (the pod's name), and clean sessions since pod names do not come back
    env = env_of(c)
    assert env["PROCMQTT_MQTT_CLIENT_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert cfg.mqtt.clean_session is True

    # -w from the CPU limit, rounded up to whole CPUs
    w = c["args"][c["args"].index("-w") + 1]
    assert w == "$(PROCMQTT_CPUS)"
    source = env["PROCMQTT_CPUS"]["resourceFieldRef"]
    assert source == {"containerName": c["name"], "resource": "limits.cpu", "divisor": "1"}
    assert c["resources"]["limits"]["cpu"] and c["resources"]["requests"]["memory"]

    # the budget and the autoscaler act on these pods
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.timeout(60)
def test_kustomization_renders_every_manifest():
    """``kubectl kustomize`` needs no cluster (``kubectl apply --dry-run=client`` does: it asks the API server)."""
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=50, check=False)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert sorted(d["kind"] for d in rendered) == sorted(d["kind"] for d in documents())
