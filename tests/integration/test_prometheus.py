"""The shipped alerts on a real Prometheus: the fleet-down alert fires when the last consumer stops while
work waits.

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
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from shared.broker.aio import Broker
from shared.settings import DEFAULT_MANAGEMENT_URL, AdminSettings, shipped_model_path
from shared.topology import QUEUE_BULK, vhost_of
from tests.integration.consumer_support import consumer_process, jpeg, make_task, publish
from tests.integration.test_consumer_faults import eventually
from tests.integration.test_consumer_health import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERT_WAIT_S = 180.0  # the rule's for: 1m plus scrapes and evaluations; a bound against hangs
RABBITMQ_PROMETHEUS_PORT = 15692


def config_for(consumer_port: int) -> dict[str, Any]:
    """The shipped configuration with this test's targets and short intervals."""
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / "rules.yml")]
    broker_host = urlsplit(DEFAULT_MANAGEMENT_URL).hostname
    targets = {
        "detfleet-consumer": f"127.0.0.1:{consumer_port}",
        "rabbitmq": f"{broker_host}:{RABBITMQ_PROMETHEUS_PORT}",
        "rabbitmq-per-object": f"{broker_host}:{RABBITMQ_PROMETHEUS_PORT}",
    }
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
