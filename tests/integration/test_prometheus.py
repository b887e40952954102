"""The shipped alerts and dashboard on a real Prometheus: the fleet-down alert fires when the last consumer
stops while work waits, and every metric the alerts and the Grafana dashboard read has a series.

Prometheus (Debian's package, installed by scripts/tools.sh) runs on loopback with deploy/prometheus's
configuration and rules as shipped; only the targets point at this test's consumer and the local broker,
and the scrape and evaluation intervals are shortened so the alert's own ``for: 1m`` is what the test waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
import yaml
from prometheus_client import start_http_server

from producer.metrics import ProducerMetrics
from producer.publisher import AsyncPublisher
from shared.broker.aio import Broker
from shared.errors import UnroutableError
from shared.management import Management
from shared.settings import DEFAULT_MANAGEMENT_URL, AdminSettings, ProducerSettings, shipped_model_path
from shared.topology import QUEUE_BULK, vhost_of
from tests.integration.consumer_support import consumer_process, jpeg, make_task, publish
from tests.integration.test_consumer_faults import eventually
from tests.integration.test_consumer_health import free_port
from tests.support.promql import dashboard_expressions, shipped_metric_names

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERT_WAIT_S = 180.0  # the rule's for: 1m plus scrapes and evaluations; a bound against hangs
RABBITMQ_PROMETHEUS_PORT = 15692


def config_for(consumer_port: int, producer_port: int | None = None) -> dict[str, Any]:
    """The shipped configuration with this test's targets and short intervals (no producer job without
    ``producer_port``)."""
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / "rules.yml")]
    broker_host = urlsplit(DEFAULT_MANAGEMENT_URL).hostname
    targets = {
        "detfleet-consumer": f"127.0.0.1:{consumer_port}",
        "rabbitmq": f"{broker_host}:{RABBITMQ_PROMETHEUS_PORT}",
        "rabbitmq-per-object": f"{broker_host}:{RABBITMQ_PROMETHEUS_PORT}",
    }
    if producer_port is not None:
        targets["detfleet-producer"] = f"127.0.0.1:{producer_port}"
    config["scrape_configs"] = [
        {
            **{k: v for k, v in job.items() if k != "dns_sd_configs"},
            "static_configs": [{"targets": [targets[job["job_name"]]]}],
        }
        for job in config["scrape_configs"]
        if job["job_name"] in targets
    ]
    return config


@contextlib.asynccontextmanager
async def prometheus(config: dict[str, Any], workdir: Path) -> AsyncIterator[str]:
    """A Prometheus server on a free loopback port; yields its base URL and stops it on the way out."""
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    with (workdir / "prometheus.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            "prometheus",
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=log,
            stderr=log,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                try:
                    async with http.get(f"{base}/-/ready") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(ready, "Prometheus is ready", 60)
        yield base
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def query(base: str, promql: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base}/api/v1/query", params={"query": promql}) as r,
    ):
        body = await r.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def alerts(base: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/api/v1/alerts") as response:
        body = await response.json()
    found: list[dict[str, Any]] = body["data"]["alerts"]
    return found


@pytest.mark.timeout(400)
async def test_the_fleet_down_alert_fires_when_the_last_consumer_stops_with_a_backlog(
    topology_settings: AdminSettings, results_db: str, tmp_path: Path
) -> None:
    vhost = vhost_of(topology_settings.amqp_url)
    consumer_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")} | {
        "DETFLEET_AMQP_URL": topology_settings.amqp_url,
        "DETFLEET_DATABASE_URL": results_db,
        "DETFLEET_HEALTH_PORT": str(consumer_port),
        "DETFLEET_CONSUMER_ID": "prometheus-test",
    }
    async with prometheus(config_for(consumer_port), tmp_path) as base:
        async with consumer_process(shipped_model_path(), env, tmp_path / "consumer.log") as consumer:

            async def fleet_seen() -> bool:
                ready = await query(base, 'detfleet_ready{job="detfleet-consumer"} == 1')
                consuming = await query(
                    base, f'rabbitmq_queue_consumers{{vhost="{vhost}",queue="{QUEUE_BULK}"}} > 0'
                )
                return bool(ready and consuming)

            await eventually(fleet_seen, "Prometheus sees a ready consumer on the bulk lane", 120)
            consumer.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(consumer.wait(), 60) == 0

        broker = await Broker.connect(topology_settings.amqp_url, "test:prometheus")
        try:
            for _ in range(20):
                await publish(broker, make_task(), jpeg(5))
        finally:
            await broker.close()

        async def fleet_down_fires() -> bool:
            return any(
                a["labels"].get("alertname") == "DetfleetNoConsumer"
                and a["labels"].get("vhost") == vhost
                and a["labels"].get("queue") == QUEUE_BULK
                and a["state"] == "firing"
                for a in await alerts(base)
            )

        await eventually(
            fleet_down_fires, "DetfleetNoConsumer fires for this vhost's bulk lane", ALERT_WAIT_S
        )
        [backlog] = await query(
            base, f'rabbitmq_queue_messages_ready{{vhost="{vhost}",queue="{QUEUE_BULK}"}}'
        )
        assert backlog["value"][1] == "20"


def consumer_env(topology_settings: AdminSettings, results_db: str, port: int, name: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")} | {
        "DETFLEET_AMQP_URL": topology_settings.amqp_url,
        "DETFLEET_DATABASE_URL": results_db,
        "DETFLEET_HEALTH_PORT": str(port),
        "DETFLEET_CONSUMER_ID": name,
    }


async def names_with_series(base: str, names: set[str]) -> set[str]:
    pattern = "|".join(sorted(names))
    found = await query(base, f'count by (__name__) ({{__name__=~"{pattern}"}})')
    return {series["metric"]["__name__"] for series in found}


async def rule_health(base: str) -> dict[str, str]:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/api/v1/rules") as response:
        body = await response.json()
    return {rule["name"]: rule["health"] for group in body["data"]["groups"] for rule in group["rules"]}


async def publish_frames(settings: ProducerSettings, metrics: ProducerMetrics, count: int) -> None:
    """``count`` frames the consumer settles, and one returned as unroutable (its exchange has no binding),
    so the producer's counters the dashboard and the alerts read all have a series."""
    async with AsyncPublisher(settings, metrics=metrics) as publisher:
        for seed in range(count):
            await publisher.publish(jpeg(seed), camera="cam-1", site="site-a")
    async with AsyncPublisher(settings, metrics=metrics, exchange="test.unbound") as unbound:
        with pytest.raises(UnroutableError):
            await unbound.publish(jpeg(), camera="cam-1", site="site-a")


@pytest.mark.timeout(300)
async def test_every_metric_the_dashboard_and_the_alerts_read_has_a_series(
    topology_settings: AdminSettings, results_db: str, management: Management, tmp_path: Path
) -> None:
    vhost = vhost_of(topology_settings.amqp_url)
    await management.request(
        "PUT", f"/exchanges/{quote(vhost, safe='')}/test.unbound", {"type": "topic", "durable": False}
    )
    consumer_port, producer_port = free_port(), free_port()
    env = consumer_env(topology_settings, results_db, consumer_port, "dashboard-test")
    # The producer's registry served as `detfleet produce --metrics-port` serves it.
    metrics = ProducerMetrics()
    server, thread = start_http_server(producer_port, addr="127.0.0.1", registry=metrics.registry)
    wanted = shipped_metric_names()
    try:
        async with (
            prometheus(config_for(consumer_port, producer_port), tmp_path) as base,
            consumer_process(shipped_model_path(), env, tmp_path / "consumer.log"),
        ):
            producer = ProducerSettings(
                amqp_url=topology_settings.amqp_url, producer_name="gateway-dashboard"
            )
            await publish_frames(producer, metrics, 8)

            async def every_name_has_a_series() -> bool:
                return await names_with_series(base, wanted) == wanted

            with contextlib.suppress(AssertionError):
                await eventually(every_name_has_a_series, "every queried metric has a series", 120)
            assert wanted - await names_with_series(base, wanted) == set()

            for expr in dashboard_expressions():
                await query(base, expr.replace("$__rate_interval", "1m"))  # asserts Prometheus accepts it

            async def every_rule_evaluated() -> bool:
                health = await rule_health(base)
                return bool(health) and "unknown" not in health.values()

            await eventually(every_rule_evaluated, "Prometheus evaluated every rule", 60)
            health = await rule_health(base)
            assert {name: h for name, h in health.items() if h != "ok"} == {}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
