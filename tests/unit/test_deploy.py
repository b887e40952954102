"""Deployment files parse, run as non-root and give the drain the time it needs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from shared.settings import ConsumerSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def documents(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_the_image_runs_as_a_non_root_user() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    user = [line for line in lines if line.startswith("USER ")]
    assert user
    assert user[-1].split()[1].split(":")[0] not in ("root", "0")


def test_kubernetes_gives_the_drain_more_time_than_the_grace_period() -> None:
    deployment = next(d for d in documents(DEPLOY / "k8s" / "consumer.yaml") if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > ConsumerSettings().shutdown_grace_s
    assert pod["securityContext"]["runAsNonRoot"] is True
    probes = pod["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/livez"


def test_compose_takes_passwords_from_the_environment() -> None:
    compose = documents(DEPLOY / "docker-compose.yml")[0]
    env = compose["services"]["setup"]["environment"]
    passwords = {k: v for k, v in env.items() if k.endswith("_PASSWORD")}
    assert passwords
    assert all(v.startswith("${") for v in passwords.values())


def test_prometheus_rules_parse_and_name_detfleet_metrics() -> None:
    [rules] = documents(DEPLOY / "prometheus" / "rules.yml")
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert any("detfleet_outcomes_total" in e for e in exprs)


def test_prometheus_rules_pass_promtool() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(DEPLOY / "prometheus" / "rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
