"""The detfleet Grafana dashboard, as code: ``python deploy/grafana/dashboard.py`` (or ``make dashboard``)
writes ``deploy/grafana/dashboards/detfleet.json``, which Grafana's provisioning loads.

Built with grafana-foundation-sdk (Grafana's own typed builders, a ``dev`` extra) so a panel is checked by
mypy instead of hand-edited JSON; the runtime wheel never imports it. tests/unit/test_dashboard.py fails
when the committed JSON is not this module's output, and tests/integration/test_prometheus.py checks every
metric the dashboard queries has a series on a live Prometheus scraping a consumer and the broker.

Every query reads a metric that exists today: the consumer's (consumer/metrics.py), the producer's
(producer/metrics.py) and RabbitMQ's prometheus plugin, per-object endpoint (labels ``vhost`` and
``queue``). Per-camera series are capped per replica (``camera="other"`` holds the rest).
"""

from __future__ import annotations

import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import GraphThresholdsStyleMode
from grafana_foundation_sdk.models.dashboard import (
    Dashboard,
    DashboardCursorSync,
    DataSourceRef,
    Panel,
    Threshold,
    ThresholdsMode,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "detfleet.json"
UID = "detfleet"
# The uid deploy/grafana/provisioning/datasources/prometheus.yml gives the Prometheus data source.
DATASOURCE = DataSourceRef(type_val="prometheus", uid="detfleet-prometheus")
RATE = "$__rate_interval"  # Grafana's window: at least four scrape intervals, so rate() always has points
STAGES = ("queue_wait", "decode", "inference", "sink", "end_to_end")
# The outcomes that send a task to detfleet.dlq: the same list as the DetfleetDeadLettering alert.
DEAD_LETTER_KINDS = "bad_input|transient_exhausted|deadline_exceeded|dropped_by_broker"
DETFLEET_QUEUES = 'queue=~"detfleet\\\\..*"'
WIDTH = 24  # Grafana's grid is 24 columns wide
END_TO_END_TARGET_S = 10.0  # the DetfleetEndToEndSlow alert's threshold, drawn on the end-to-end panel
REF_IDS = "ABCDEFGH"  # a query's name within its panel; Grafana wants them unique


def query(expr: str, legend: str = "__auto") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def graph(title: str, unit: str, *queries: prometheus.Dataquery, width: int = 12) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).height(8).span(width)
    for ref, target in zip(REF_IDS, queries, strict=False):
        panel = panel.with_target(target.ref_id(ref))
    return panel


def single(title: str, unit: str, expr: str, width: int = 6) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(4)
        .span(width)
        .with_target(query(expr).instant().ref_id("A"))
    )


def quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket[{RATE}])))"


def p95(histogram: str) -> str:
    return quantile(0.95, histogram)


def throughput_panels() -> list[Builder[Panel]]:
    return [
        graph(
            "Frames received by queue",
            "reqps",
            query(f"sum by (queue) (rate(detfleet_received_total[{RATE}]))", "{{queue}}"),
        ),
        graph(
            "Tasks settled by outcome",
            "reqps",
            query(f"sum by (kind) (rate(detfleet_outcomes_total[{RATE}]))", "{{kind}}"),
        ),
        graph(
            "Frames published and confirmed by lane (producers)",
            "reqps",
            query(f"sum by (lane) (rate(detfleet_published_total[{RATE}]))", "published {{lane}}"),
            query(f"sum by (lane) (rate(detfleet_confirmed_total[{RATE}]))", "confirmed {{lane}}"),
        ),
        graph(
            "Frames settled by camera and status",
            "reqps",
            query(
                f"sum by (camera, status) (rate(detfleet_camera_frames_settled_total[{RATE}]))",
                "{{camera}} {{status}}",
            ),
        ),
        graph(
            "Seconds since each camera's last frame",
            "s",
            query("time() - max by (camera) (detfleet_camera_last_frame_timestamp_seconds)", "{{camera}}"),
            width=WIDTH,
        ),
    ]


def batch_panels() -> list[Builder[Panel]]:
    mean = f"sum(rate(detfleet_batch_size_sum[{RATE}])) / sum(rate(detfleet_batch_size_count[{RATE}]))"
    return [
        graph(
            "Batch size",
            "none",
            query(mean, "mean"),
            query(p95("detfleet_batch_size"), "p95"),
            query("min(detfleet_batch_limit)", "limit (smallest consumer)"),
        ),
        graph(
            "Held unacked by the consumers",
            "none",
            query("sum by (instance) (detfleet_in_flight)", "{{instance}}"),
        ),
    ]


def latency_panels() -> list[Builder[Panel]]:
    return [
        graph(
            "Latency p95 by stage",
            "s",
            *(query(p95(f"detfleet_{stage}_seconds"), stage) for stage in STAGES),
        ),
        graph(
            "End to end (capture to committed row)",
            "s",
            *(
                query(quantile(q, "detfleet_end_to_end_seconds"), f"p{round(q * 100)}")
                for q in (0.5, 0.95, 0.99)
            ),
        )
        .thresholds(
            dashboard.ThresholdsConfig()
            .mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(None, "green"), Threshold(END_TO_END_TARGET_S, "red")])
        )
        .thresholds_style(common.GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.DASHED)),
    ]


def outcome_panels() -> list[Builder[Panel]]:
    return [
        single("Shed per second", "reqps", f'sum(rate(detfleet_outcomes_total{{kind="shed"}}[{RATE}]))'),
        single(
            "Dead-lettered per second",
            "reqps",
            f'sum(rate(detfleet_outcomes_total{{kind=~"{DEAD_LETTER_KINDS}"}}[{RATE}]))',
        ),
        single("In detfleet.dlq", "none", 'sum(rabbitmq_queue_messages_ready{queue="detfleet.dlq"})'),
        single(
            "Redeliveries absorbed per second",
            "reqps",
            f"sum(rate(detfleet_redeliveries_absorbed_total[{RATE}]))",
        ),
    ]


def broker_panels() -> list[Builder[Panel]]:
    by_queue = "{{vhost}} {{queue}}"
    return [
        graph(
            "Ready by queue",
            "none",
            query(f"sum by (vhost, queue) (rabbitmq_queue_messages_ready{{{DETFLEET_QUEUES}}})", by_queue),
        ),
        graph(
            "Unacked by queue",
            "none",
            query(f"sum by (vhost, queue) (rabbitmq_queue_messages_unacked{{{DETFLEET_QUEUES}}})", by_queue),
        ),
        graph(
            "Consumers by queue",
            "none",
            query(f"sum by (vhost, queue) (rabbitmq_queue_consumers{{{DETFLEET_QUEUES}}})", by_queue),
        ),
        graph(
            "Unroutable and blocked",
            "none",
            query(
                f"sum(rate(rabbitmq_global_messages_unroutable_dropped_total[{RATE}]))", "dropped by broker/s"
            ),
            query(f"sum(rate(detfleet_returned_total[{RATE}]))", "returned to producers/s"),
            query(f"sum(rate(detfleet_blocked_seconds_total[{RATE}]))", "producer blocked s/s"),
        ),
    ]


def fleet_panels() -> list[Builder[Panel]]:
    return [
        single("Consumers ready", "none", "sum(detfleet_ready)"),
        single("Consumers scraped", "none", 'count(up{job="detfleet-consumer"} == 1)'),
        table.Panel()
        .title("Model loaded by each consumer")
        .datasource(DATASOURCE)
        .height(4)
        .span(12)
        .with_target(query("detfleet_model_info").instant().format(PromQueryFormat.TABLE).ref_id("A")),
    ]


ROWS = (
    ("Throughput", throughput_panels),
    ("Batches", batch_panels),
    ("Latency", latency_panels),
    ("Outcomes and DLQ", outcome_panels),
    ("RabbitMQ", broker_panels),
    ("Fleet and model", fleet_panels),
)


def build() -> Dashboard:
    board = (
        dashboard.Dashboard("detfleet")
        .uid(UID)
        .tags(["detfleet"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR)
    )
    for title, panels in ROWS:
        board = board.with_row(dashboard.Row(title))
        for panel in panels():
            board = board.with_panel(panel)
    model = board.build()
    for number, element in enumerate(model.panels or [], start=1):
        element.id_val = number  # stable ids: links to a panel survive regeneration
    return model


def render() -> str:
    """The dashboard JSON, byte for byte what is committed."""
    return JSONEncoder(sort_keys=True, indent=2).encode(build()) + "\n"


def main() -> int:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
