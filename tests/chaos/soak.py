"""The chaos soak: producers publish on both lanes while replicas, links and servers fail at random.

Everything runs on this machine's loopback against a private RabbitMQ node and a private Postgres that the
soak starts itself (:mod:`tests.chaos.nodes`); the shared servers are never touched. Consumer replicas are
``detfleet consume`` subprocesses that reach the broker and the database through TCP proxies the soak owns,
so a link can be cut without touching a server. A seeded chaos loop, bounded in count and time, kills
replicas with SIGKILL (restarted at once), cuts the replica-broker and replica-Postgres links, and restarts
the RabbitMQ node and Postgres. When publishing ends the fleet drains, stops gracefully, and the accounting
(:mod:`tests.chaos.accounting`) holds every confirmed task to exactly one row.

    python -m tests.chaos.soak --duration 90 --tasks 2000      # the short version
    python -m tests.chaos.soak --duration 600 --tasks 10000    # the long version (make soak)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import aiohttp
import asyncpg
import psutil
from rich.console import Console
from rich.table import Table

from producer.publisher import AsyncPublisher
from shared import admin, db
from shared.broker.aio import Broker
from shared.errors import BrokerError, DetfleetError
from shared.events import ResultEvent
from shared.schema import H_FAILED_AT, H_REASON, deterministic_task_id, parse_time
from shared.settings import AdminSettings, Lane, ProducerSettings, shipped_model_path
from shared.topology import (
    EXCHANGE_RESULTS,
    QUEUE_BULK,
    QUEUE_DLQ,
    QUEUE_INTAKE,
    QUEUE_REALTIME,
    QUEUE_RETRY_READY,
    Topology,
)
from tests.chaos.accounting import Account, DlqEntry, Ledger, Row, Unsure, account
from tests.chaos.nodes import PrivateServers, free_port
from tests.support.frames import jpeg_bytes
from tests.support.onnx_graphs import write_bright_square_model
from tests.support.proxy import TcpProxy

logger = logging.getLogger("detfleet.soak")
console = Console(stderr=True)

EVENTS_QUEUE = "soak.result-events"  # the soak's own subscriber, on its private node
CHAOS_KINDS = (
    "kill_replica",
    "cut_broker_link",
    "cut_database_link",
    "restart_rabbitmq",
    "restart_postgres",
)
# Relative weights of the events drawn after each kind has happened once: restarts cost the most time.
CHAOS_WEIGHTS = (3.0, 3.0, 3.0, 1.0, 1.5)
AIM_S = 3.0  # how long a kill or a cut waits for a replica that holds deliveries
_PROBE = aiohttp.ClientTimeout(total=1.0)
FRAME_SIZE = (320, 240)
DISTINCT_FRAMES = 24
SITE = "soak"
POLL_S = 0.5
STOP_GRACE_S = 60.0  # bounds against a hang, far above a normal graceful stop
PUBLISH_CLOSE_S = 60.0


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 90.0  # how long producers publish and the chaos loop runs
    tasks: int = 2000
    seed: int = 2026
    replicas: int = 2
    producers: int = 3  # the first one publishes on realtime, the others on bulk
    bad_frame_rate: float = 0.01  # frames published undecodable on purpose (the failed + DLQ path)
    model: Path | None = None  # None: the shipped detector where it exists, else a stand-in graph
    log_dir: Path | None = None  # where replica logs go (kept); None: a temporary folder
    drain_limit_s: float = 180.0
    chaos_every_s: float = 5.0  # the mean time between chaos events

    @property
    def chaos_events(self) -> int:
        return max(len(CHAOS_KINDS), round(self.duration_s / self.chaos_every_s))


@dataclass
class Crash:
    replica: str
    exit_code: int | None
    log_tail: str


@dataclass
class SoakReport:
    config: SoakConfig
    account: Account
    chaos: Counter[str]
    crashes: list[Crash]
    stop_codes: dict[str, int | None]
    peak_rss_mb: dict[str, float]
    errors_logged: dict[str, int]
    refused: Counter[str]
    drained: bool
    seconds: float
    aimed: int = 0  # kills and cuts that landed on a replica holding deliveries
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            self.account.passed
            and self.drained
            and not self.crashes
            and all(code == 0 for code in self.stop_codes.values())
        )

    def problems(self) -> list[str]:
        found = list(self.account.problems())
        if not self.drained:
            found.append("the fleet did not drain within the limit")
        found += [f"{c.replica} exited by itself with {c.exit_code}" for c in self.crashes]
        found += [f"{r} stopped with {code}" for r, code in self.stop_codes.items() if code != 0]
        return found


# ---- replicas ---------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the soak process dies, however it dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Replica:
    """One ``detfleet consume`` subprocess behind its own broker and database proxies."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self.peak_rss = 0
        self.starts = 0
        self._log: IO[bytes] | None = None
        self._killing = False

    def start(self) -> None:
        # Called on the event loop's thread: PR_SET_PDEATHSIG fires when the spawning thread ends.
        self._log = self._log or self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "detfleet", "consume"],
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        self.starts += 1

    async def held(self) -> int:
        """Deliveries the replica holds unacked now (``detfleet_in_flight``); 0 when it does not answer."""
        url = f"http://127.0.0.1:{self.env['DETFLEET_HEALTH_PORT']}/metrics"
        try:
            async with aiohttp.ClientSession() as session, session.get(url, timeout=_PROBE) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return 0
        for line in text.splitlines():
            if line.startswith("detfleet_in_flight "):
                return int(float(line.split()[1]))
        return 0

    def kill(self) -> None:
        """kill -9, as a node failure would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def exited_by_itself(self) -> int | None:
        """The exit code when the process ended without being asked to; None while it runs."""
        if self.process is None:
            return None
        return self.process.poll()

    def sample_rss(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(psutil.Error):
            self.peak_rss = max(self.peak_rss, psutil.Process(self.process.pid).memory_info().rss)

    async def stop(self) -> int | None:
        """SIGTERM and wait (bounded) for the graceful exit; SIGKILL past the bound (returns None)."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
        try:
            return await asyncio.to_thread(process.wait, STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return None

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def errors_logged(self) -> int:
        """ERROR lines of detfleet's own loggers (the AMQP library logs a broker shutdown as an error)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return sum(
            1 for line in text.splitlines() if '"level": "ERROR"' in line and '"logger": "aio' not in line
        )

    def unsure_copies(self) -> set[uuid.UUID]:
        """Task ids whose DLQ copy this replica could not confirm or record: a second copy may follow."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        found: set[uuid.UUID] = set()
        for line in text.splitlines():
            if "Could not publish the" not in line and "Could not record the DLQ copy" not in line:
                continue
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                found.add(uuid.UUID(json.loads(line).get("task_id")))
        return found

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Link:
    """A replica's two proxies: its way to the broker and its way to Postgres."""

    broker: TcpProxy
    database: TcpProxy


# ---- the soak ---------------------------------------------------------------------------------------


class Soak:
    def __init__(self, config: SoakConfig, servers: PrivateServers, work_dir: Path) -> None:
        self.config = config
        self.servers = servers
        self.work_dir = work_dir
        self.rng = random.Random(config.seed)
        self.ledger = Ledger()
        self.chaos: Counter[str] = Counter()
        self.crashes: list[Crash] = []
        self.replicas: list[Replica] = []
        self.links: list[Link] = []
        self.notes: list[str] = []
        self.aimed = 0  # kills and cuts that landed on a replica holding deliveries
        self.kills: list[datetime] = []
        self._monitoring = True
        self._restarting = {"rabbitmq": asyncio.Lock(), "postgres": asyncio.Lock()}

    @property
    def amqp_url(self) -> str:
        """Where producers and the soak's own checks reach the broker (a cluster soak lists every node)."""
        return self.servers.rabbit.amqp_url

    @property
    def database_url(self) -> str:
        """Where the soak reads rows (a cluster soak names the primary and its standby)."""
        return self.servers.postgres.url

    @property
    def events_queue_arguments(self) -> dict[str, Any]:
        """The soak's own result-events queue: classic on one node (a cluster soak replicates it)."""
        return {}

    @property
    def admin_settings(self) -> AdminSettings:
        return AdminSettings(
            amqp_url=self.amqp_url,
            management_url=self.servers.rabbit.management_url,
            database_url=self.database_url,
        )

    async def run(self) -> SoakReport:
        started = time.monotonic()
        await admin.apply_topology(self.admin_settings)
        await self._watch_events()
        await db.migrate(self.database_url)
        model = self._model()
        await self._start_fleet(model)
        monitor = asyncio.create_task(self._monitor())
        try:
            producers = asyncio.gather(*self._producers())
            await asyncio.gather(producers, self._chaos_loop())
            drained = await self._wait_drained()
        finally:
            self._monitoring = False
            await monitor
            stop_codes = await self._stop_fleet()
        unsure = Unsure(frozenset().union(*(r.unsure_copies() for r in self.replicas)), tuple(self.kills))
        events = await self._events()
        account_ = account(self.ledger, await self._rows(), await self._dlq(), unsure, events)
        return SoakReport(
            config=self.config,
            account=account_,
            chaos=self.chaos,
            crashes=self.crashes,
            stop_codes=stop_codes,
            peak_rss_mb={r.name: r.peak_rss / 2**20 for r in self.replicas},
            errors_logged={r.name: r.errors_logged() for r in self.replicas},
            refused=self.ledger.unconfirmed,
            drained=drained,
            seconds=time.monotonic() - started,
            aimed=self.aimed,
            notes=self.notes,
        )

    def _model(self) -> Path:
        if self.config.model is not None:
            return self.config.model
        shipped = shipped_model_path()
        if shipped.exists():
            return shipped
        self.notes.append("model: a stand-in graph (the shipped detector is not there)")
        return write_bright_square_model(self.work_dir / "stand-in.onnx", input_size=(320, 320))

    # ---- the fleet ----------------------------------------------------------------------------------

    async def _start_fleet(self, model: Path) -> None:
        log_dir = self.config.log_dir or self.work_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        for index in range(self.config.replicas):
            link = Link(
                await TcpProxy(port=self.servers.rabbit.amqp_port).start(),
                await TcpProxy(port=self.servers.postgres.port).start(),
            )
            name = f"replica-{index + 1}"
            env = self._replica_env(name, link, model)
            replica = Replica(name, env, log_dir / f"{name}.log", self.work_dir)
            replica.start()
            self.links.append(link)
            self.replicas.append(replica)

    def _replica_env(self, name: str, link: Link, model: Path) -> dict[str, str]:
        return replica_env(
            name,
            model,
            DETFLEET_AMQP_URL=link.broker.amqp_url(self.servers.rabbit.amqp_url),
            DETFLEET_DATABASE_URL=self._database_url_via(link.database),
        )

    def _database_url_via(self, proxy: TcpProxy) -> str:
        return self.servers.postgres.url.replace(f":{self.servers.postgres.port}/", f":{proxy.port}/")

    async def _monitor(self) -> None:
        """Restart a replica that died by itself (counted as a crash) and sample memory."""
        while self._monitoring:
            for replica in self.replicas:
                code = replica.exited_by_itself()
                if code is not None:
                    self.crashes.append(Crash(replica.name, code, replica.log_tail()))
                    console.print(f"[red]{replica.name} exited by itself with {code}; restarting it[/]")
                    replica.start()
                replica.sample_rss()
            await asyncio.sleep(POLL_S)

    async def _stop_fleet(self) -> dict[str, int | None]:
        codes = await asyncio.gather(*(r.stop() for r in self.replicas))
        for replica in self.replicas:
            replica.close_log()
        for link in self.links:
            await link.broker.close()
            await link.database.close()
        return {r.name: code for r, code in zip(self.replicas, codes, strict=True)}

    # ---- producers ----------------------------------------------------------------------------------

    def _producers(self) -> list[Any]:
        count = self.config.producers
        shares = [
            self.config.tasks // count + (1 if i < self.config.tasks % count else 0) for i in range(count)
        ]
        frames = [
            jpeg_bytes(*FRAME_SIZE, seed=self.config.seed + i, quality=80) for i in range(DISTINCT_FRAMES)
        ]
        bad = [frame[: len(frame) // 2] for frame in frames[:4]]  # truncated: header fine, data cut short
        lanes: list[Lane] = ["realtime" if i == 0 else "bulk" for i in range(count)]
        return [
            self._produce(f"cam-{i + 1}", lanes[i], shares[i], frames, bad, random.Random(self.rng.random()))
            for i in range(count)
        ]

    async def _produce(
        self, camera: str, lane: Lane, count: int, frames: list[bytes], bad: list[bytes], rng: random.Random
    ) -> None:
        settings = ProducerSettings(amqp_url=self.amqp_url, producer_name=f"soak-{camera}", lane=lane)
        interval = self.config.duration_s / max(count, 1)
        loop = asyncio.get_running_loop()
        begin, wall = loop.time(), datetime.now(UTC)
        pending: list[tuple[uuid.UUID, asyncio.Future[uuid.UUID]]] = []
        async with AsyncPublisher(settings, deterministic_ids=True) as publisher:
            for index in range(count):
                await asyncio.sleep(max(0.0, begin + index * interval - loop.time()))
                # The capture time is the planned one, a millisecond apart at least: ids stay distinct.
                captured = wall + timedelta(milliseconds=index * max(1, round(interval * 1000)))
                task_id = deterministic_task_id(SITE, camera, captured)
                is_bad = rng.random() < self.config.bad_frame_rate
                body = rng.choice(bad if is_bad else frames)
                self.ledger.submit(task_id, is_bad)
                try:
                    outcome = await publisher.submit(body, camera=camera, site=SITE, captured_at=captured)
                except DetfleetError as error:
                    self.ledger.refuse(type(error).__name__)
                    continue
                pending.append((task_id, outcome))
            await publisher.close(timeout=PUBLISH_CLOSE_S)
        for task_id, outcome in pending:
            self._record(task_id, lane, outcome)

    def _record(self, task_id: uuid.UUID, lane: Lane, outcome: asyncio.Future[uuid.UUID]) -> None:
        if outcome.cancelled():
            self.ledger.refuse("cancelled")
        elif (error := outcome.exception()) is not None:
            self.ledger.refuse(type(error).__name__)
        else:
            assert outcome.result() == task_id, "the publisher confirmed another id than the one planned"
            self.ledger.confirm(task_id, lane)

    # ---- chaos --------------------------------------------------------------------------------------

    def _schedule(self) -> list[tuple[float, str]]:
        """When and what: every kind once, then weighted draws; times spread over the publishing window."""
        extra = self.config.chaos_events - len(CHAOS_KINDS)
        kinds = list(CHAOS_KINDS) + self.rng.choices(CHAOS_KINDS, CHAOS_WEIGHTS, k=extra)
        self.rng.shuffle(kinds)
        span = self.config.duration_s
        times = sorted(self.rng.uniform(0.05 * span, 0.9 * span) for _ in kinds)
        return list(zip(times, kinds, strict=True))

    async def _chaos_loop(self) -> None:
        """Strike on schedule; a server restart runs beside the next events (one restart per server at
        a time), so a kill or a cut can land while a server is still coming back."""
        loop = asyncio.get_running_loop()
        begin = loop.time()
        strikes = []
        for at, kind in self._schedule():
            await asyncio.sleep(max(0.0, begin + at - loop.time()))
            console.print(f"[yellow]{loop.time() - begin:6.1f} s  chaos: {kind}[/]")
            strikes.append(asyncio.create_task(self._strike(kind)))
            self.chaos[kind] += 1
        await asyncio.gather(*strikes)

    async def _busy_replica(self) -> int:
        """A replica holding deliveries now, so a kill or a cut lands on batches in flight (what the
        promises are about); polled for up to :data:`AIM_S`, else any replica."""
        deadline = time.monotonic() + AIM_S
        while time.monotonic() < deadline:
            held = [await replica.held() for replica in self.replicas]
            busy = [i for i, n in enumerate(held) if n > 0]
            if busy:
                self.aimed += 1
                return self.rng.choice(busy)
            await asyncio.sleep(0.05)
        return self.rng.randrange(len(self.replicas))

    async def _strike(self, kind: str) -> None:
        aimed = kind in ("kill_replica", "cut_broker_link", "cut_database_link")
        index = await self._busy_replica() if aimed else self.rng.randrange(len(self.replicas))
        if kind == "kill_replica":
            self.kills.append(datetime.now(UTC))
            self.replicas[index].kill()
            self.replicas[index].start()
        elif kind == "cut_broker_link":
            self.links[index].broker.cut()
        elif kind == "cut_database_link":
            self.links[index].database.cut()
        elif kind == "restart_rabbitmq":
            async with self._restarting["rabbitmq"]:
                await asyncio.to_thread(self.servers.rabbit.restart)
        elif kind == "restart_postgres":
            async with self._restarting["postgres"]:
                await asyncio.to_thread(self.servers.postgres.restart)
        else:
            raise ValueError(f"unknown chaos kind {kind!r}")

    # ---- drain and read-back ------------------------------------------------------------------------

    async def _wait_drained(self) -> bool:
        """Until every confirmed task has a row and the work queues stay empty (bounded)."""
        deadline = time.monotonic() + self.config.drain_limit_s
        settled_polls = 0
        console.print(f"publishing done: {len(self.ledger.confirmed)} confirmed; draining")
        while time.monotonic() < deadline:
            if await self._all_rows_written() and await self._work_queues_empty():
                settled_polls += 1
                if settled_polls >= 3:  # a retry or a requeue in flight shows up within a few polls
                    return True
            else:
                settled_polls = 0
            await asyncio.sleep(1.0)
        return False

    async def _all_rows_written(self) -> bool:
        try:
            done = {r.task_id for r in await self._rows()}
        except (OSError, asyncpg.PostgresError):
            return False
        return set(self.ledger.confirmed) <= done

    async def _work_queues_empty(self) -> bool:
        queues = [QUEUE_REALTIME, QUEUE_BULK, QUEUE_RETRY_READY, QUEUE_INTAKE]
        queues += list(Topology.from_settings(self.admin_settings).retry_levels)
        try:
            broker = await Broker.connect(self.amqp_url, "soak-inspect", robust=False)
        except BrokerError:
            return False
        try:
            for queue in queues:
                if await broker.queue_depth(queue):
                    return False
            return True
        except BrokerError:
            return False
        finally:
            await broker.close()

    async def _rows(self) -> list[Row]:
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:
            records = await conn.fetch("SELECT task_id, status, lane, redeliveries FROM detfleet_results")
        finally:
            await conn.close()
        return [Row(r["task_id"], r["status"], r["lane"], r["redeliveries"]) for r in records]

    async def _watch_events(self) -> None:
        """A durable queue of the soak's own keeps every result event the fleet publishes (they are
        persistent), through broker restarts, until the accounting reads them back."""
        broker = await Broker.connect(self.amqp_url, "soak-events", robust=False)
        try:
            await broker.bind(EXCHANGE_RESULTS, ["#"], EVENTS_QUEUE, self.events_queue_arguments)
        finally:
            await broker.close()

    async def _events(self) -> list[uuid.UUID]:
        broker = await Broker.connect(self.amqp_url, "soak-events", robust=False)
        task_ids = []
        try:
            async with broker.reading(EVENTS_QUEUE) as reader:
                while (delivery := await reader.get(timeout=5)) is not None:
                    task_ids.append(ResultEvent.from_json(delivery.envelope.body).task_id)
                    await delivery.ack()
        finally:
            await broker.close()
        return task_ids

    async def _dlq(self) -> list[DlqEntry]:
        broker = await Broker.connect(self.amqp_url, "soak-dlq", robust=False)
        entries = []
        try:
            async with broker.reading(QUEUE_DLQ) as reader:
                while (delivery := await reader.get(timeout=5)) is not None:
                    envelope = delivery.envelope
                    reason = envelope.headers.get(H_REASON)
                    failed_at = envelope.headers.get(H_FAILED_AT)
                    entries.append(
                        DlqEntry(
                            _uuid_or_none(envelope.message_id),
                            str(reason) if reason else None,
                            parse_time(str(failed_at)) if failed_at else None,
                        )
                    )
                    await delivery.ack()
        finally:
            await broker.close()
        return entries


def replica_env(name: str, model: Path, **settings: str) -> dict[str, str]:
    """The environment of a soak replica: no inherited DETFLEET_ variable, a small footprint, ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")}
    return env | {
        "DETFLEET_CONSUMER_ID": name,
        "DETFLEET_MODEL_PATH": str(model),
        "DETFLEET_DEVICE": "cpu",
        "DETFLEET_HEALTH_PORT": str(free_port()),
        "DETFLEET_INTRA_OP_THREADS": "1",
        "DETFLEET_DECODE_THREADS": "1",
        "DETFLEET_LOG_LEVEL": "WARNING",
        "DETFLEET_SHUTDOWN_GRACE_S": "20",
        **settings,
    }


def _uuid_or_none(text: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(text))
    except ValueError:
        return None


async def run_soak(config: SoakConfig) -> SoakReport:
    """Start the private servers, soak, account, and stop everything (also on failure)."""
    with PrivateServers() as servers:
        work_dir = Path(tempfile.mkdtemp(prefix="work-", dir=servers.root))
        return await Soak(config, servers, work_dir).run()


# ---- report -----------------------------------------------------------------------------------------


def report_table(report: SoakReport) -> Table:
    acc = report.account
    table = Table(title=f"detfleet chaos soak: {'PASSED' if report.passed else 'FAILED'}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows: list[tuple[str, object]] = [
        ("tasks confirmed", acc.confirmed),
        *((f"  confirmed on {lane}", n) for lane, n in sorted(acc.confirmed_by_lane.items())),
        *((f"not confirmed: {why}", n) for why, n in sorted(report.refused.items())),
        *((f"rows {status}", n) for status, n in sorted(acc.rows_by_status.items())),
        ("lost (confirmed, no row)", len(acc.lost)),
        ("rows of unknown tasks", len(acc.strangers)),
        ("failed rows without DLQ entry", len(acc.failed_without_dlq)),
        ("bulk tasks shed", len(acc.shed_on_bulk)),
        ("DLQ entries", acc.dlq_entries),
        ("duplicate DLQ entries", acc.duplicate_dlq_entries),
        ("  outside the documented windows", len(acc.unexplained_duplicates)),
        ("redeliveries absorbed", acc.redeliveries_absorbed),
        ("result events", acc.events),
        ("rows without a result event", len(acc.rows_without_event)),
        ("  repeated events (at least once)", acc.repeated_events),
        *((f"chaos: {kind}", report.chaos[kind]) for kind in CHAOS_KINDS),
        ("kills and cuts that hit held batches", report.aimed),
        ("consumer crashes", len(report.crashes)),
        *((f"graceful stop of {name}", code) for name, code in report.stop_codes.items()),
        *((f"errors logged by {name}", n) for name, n in report.errors_logged.items()),
        *((f"peak RSS of {name} (MiB)", f"{mb:.0f}") for name, mb in report.peak_rss_mb.items()),
        ("drained", report.drained),
        ("duration (s)", f"{report.seconds:.0f}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def print_report(report: SoakReport) -> None:
    for note in report.notes:
        console.print(f"note: {note}")
    console.print(report_table(report))
    for crash in report.crashes:
        console.print(f"[red]{crash.replica} crash (exit {crash.exit_code}), log tail:[/]\n{crash.log_tail}")
    for problem in report.problems():
        console.print(f"[red]problem: {problem}[/]")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of publishing and chaos")
    parser.add_argument("--tasks", type=int, default=2000, help="frames published in all")
    parser.add_argument("--seed", type=int, default=2026, help="seeds the chaos schedule and the frames")
    parser.add_argument("--replicas", type=int, default=2, help="consumer replicas")
    parser.add_argument("--producers", type=int, default=3, help="producers (the first on realtime)")
    parser.add_argument("--model", type=Path, help="ONNX model (default: the shipped one, else a stand-in)")
    parser.add_argument("--chaos-every", type=float, default=5.0, help="mean seconds between chaos events")
    parser.add_argument("--log-dir", type=Path, help="keep the replicas' logs here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = SoakConfig(
        duration_s=args.duration,
        tasks=args.tasks,
        seed=args.seed,
        replicas=args.replicas,
        producers=args.producers,
        model=args.model,
        log_dir=args.log_dir,
        chaos_every_s=args.chaos_every,
        drain_limit_s=max(180.0, args.duration / 2),
    )
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("aiormq", "aio_pika"):  # every reconnect attempt while the node restarts
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    # SIGTERM ends the soak through its finally blocks: the private servers stop, their folders go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = asyncio.run(run_soak(config))
    print_report(report)
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
