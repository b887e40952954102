"""The Grafana dashboard: the committed JSON is what deploy/grafana/dashboard.py generates, it queries the
provisioned data source, and every detfleet metric it or the alert rules read is one the consumer or the
producer exports. tests/integration/test_prometheus.py checks the same names on a live Prometheus."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType
from typing import Any

import yaml

from consumer.metrics import ConsumerMetrics
from producer.metrics import ProducerMetrics
from tests.support.promql import DASHBOARD_JSON, DEPLOY, metric_names, shipped_metric_names

GRAFANA = DEPLOY / "grafana"
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboard", GRAFANA / "dashboard.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text())
    return board


def exported_names() -> set[str]:
    """The sample names the consumer's and the producer's registries expose."""
    names: set[str] = set()
    for registry in (ConsumerMetrics().registry, ProducerMetrics().registry):
        for family in registry.collect():
            names |= {family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",))}
    return names


def test_the_committed_json_is_the_generators_output() -> None:
    assert DASHBOARD_JSON.read_text() == generator().render(), "run make dashboard and commit the JSON"


def test_every_query_reads_the_provisioned_data_source() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [source] = provisioned["datasources"]
    panels = [panel for panel in committed()["panels"] if panel["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]


def test_panel_ids_and_query_ids_are_unique() -> None:
    panels = committed()["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert all(refs), panel["title"]
        assert len(set(refs)) == len(refs), panel["title"]


def test_the_provisioned_provider_loads_the_dashboards_folder() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "detfleet.yml").read_text())
    [entry] = provider["providers"]
    assert entry["type"] == "file"
    assert entry["options"]["path"]


def test_every_detfleet_metric_read_is_exported_by_the_consumer_or_the_producer() -> None:
    detfleet = {name for name in shipped_metric_names() if name.startswith("detfleet_")}
    assert detfleet - exported_names() == set()
    assert "detfleet_end_to_end_seconds_bucket" in detfleet  # the reading found the histogram queries


def test_metric_names_skips_functions_labels_and_keywords() -> None:
    expr = (
        'sum by (vhost, queue) (rabbitmq_queue_messages_ready{queue=~"detfleet\\\\.(bulk)"}) > 0 and '
        "histogram_quantile(0.95, sum by (le) (rate(detfleet_sink_seconds_bucket[5m]))) or count(up == 1)"
    )
    assert metric_names(expr) == {"rabbitmq_queue_messages_ready", "detfleet_sink_seconds_bucket", "up"}


def test_the_end_to_end_panel_draws_the_alerts_threshold() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    [slow] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "DetfleetEndToEndSlow"]
    alert_threshold = float(str(slow["expr"]).rsplit(">", 1)[1])
    [panel] = [p for p in committed()["panels"] if p["title"].startswith("End to end")]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == alert_threshold
