"""``make demo``: the main job end to end on this machine, as far as the fleet is built.

The foundation stage sets up what every part needs (``make setup`` ran before this): the topology on the
default vhost and the database. It then shows the broker-side state an operator would look at first.
"""

from __future__ import annotations

import asyncio

from rich.console import Console
from rich.table import Table

from shared.broker.aio import Broker
from shared.settings import AdminSettings, load_settings, mask_url
from shared.topology import Topology


async def queue_depths(settings: AdminSettings) -> dict[str, int]:
    broker = await Broker.connect(settings.amqp_url, "detfleet-demo", robust=False)
    try:
        return {q.name: await broker.queue_depth(q.name) for q in Topology.from_settings(settings).queues}
    finally:
        await broker.close()


def main() -> int:
    settings = load_settings(AdminSettings)
    console = Console()
    depths = asyncio.run(queue_depths(settings))
    table = Table(title=f"detfleet queues on {mask_url(settings.amqp_url)}")
    table.add_column("queue")
    table.add_column("ready", justify="right")
    for name, depth in depths.items():
        table.add_row(name, str(depth))
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
