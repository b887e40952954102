"""The cluster soak and the disaster-recovery drill: a 3-node RabbitMQ cluster with quorum queues and a
Postgres primary with a streaming standby, all private, failing in turn while frames flow.

It is the chaos soak (:mod:`tests.chaos.soak`) on other servers and with other events. The clients are
given every node (``DETFLEET_AMQP_URL=a,b,c``) and both database hosts with
``target_session_attrs=read-write``; nothing stands between them and the servers. The events:

- ``kill_lane_leader``: kill -9 of the node leading ``detfleet.bulk`` (restarted once the fleet recovered);
- ``stop_node``: a graceful stop of a node that leads nothing we know of, restarted after recovery;
- ``kill_consumer``: kill -9 of a consumer replica (restarted at once);
- ``database_failover``: the primary fails (kill -9 of all its processes by default), the standby is
  promoted; ``database_switchover`` the same after a graceful stop (``pg_ctl stop -m fast``). In the soak
  the old primary comes back as the new standby (``pg_basebackup`` from the new primary).

Each event's recovery time runs from the failure to the next row committed after it. The accounting is the
chaos soak's: every confirmed task has exactly one row, every failed row one DLQ entry.

    python -m tests.chaos.cluster --drill                          # make drill: under five minutes
    python -m tests.chaos.cluster --duration 300 --tasks 3000      # make soak's cluster part
    python -m tests.chaos.cluster --drill --replication async      # the asynchronous comparison
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import asyncpg
from rich.console import Console
from rich.table import Table

from shared.settings import AdminSettings
from shared.topology import QUEUE_BULK
from tests.chaos.nodes import LOOPBACK, NodeError, PrivateCluster, PrivatePostgres
from tests.chaos.soak import Replica, Soak, SoakConfig, SoakReport, console, replica_env
from tests.support.onnx_graphs import write_bright_square_model

Replication = Literal["sync", "async"]
DatabaseFailure = Literal["kill", "stop"]

DRILL_EVENTS = ("kill_lane_leader", "database_failover")
SOAK_EVENTS = (
    "kill_lane_leader",
    "kill_consumer",
    "stop_node",
    "database_failover",
    "kill_consumer",
    "kill_lane_leader",
    "database_switchover",
)
RECOVERY_LIMIT_S = 120.0  # a bound against a fleet that never recovers, far above the seconds it takes
COMMIT_PROBE_S = 0.1
# completed_at is the consumer's clock at the end of the batch: the harness runs on the same machine.
_PROBE_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
# captured_at is the frame's planned capture time, set by the soak's gateways just before they publish it.
_SINCE = (
    "SELECT count(*) FILTER (WHERE completed_at > $1) AS completed,"
    " count(*) FILTER (WHERE captured_at > $1) AS captured FROM detfleet_results"
)


class ClusterServers:
    """A private 3-node RabbitMQ cluster and a Postgres primary with one streaming standby."""

    def __init__(self, replication: Replication) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="detfleet-cluster-"))
        self.root.chmod(0o755)  # the postgres user must reach its data directories
        self.replication = replication
        self.cluster = PrivateCluster(self.root / "rabbit")
        self.primary = PrivatePostgres(self.root / "postgres-a")
        self.standby = PrivatePostgres(self.root / "postgres-b")
        for server in (self.primary, self.standby):
            server.fsync = "on"  # commit costs are measured here: a flush must be a real one

    @property
    def database_url(self) -> str:
        hosts = ",".join(f"{LOOPBACK}:{p.port}" for p in (self.primary, self.standby))
        return f"postgresql://postgres@{hosts}/{self.primary.database}?target_session_attrs=read-write"

    def __enter__(self) -> Self:
        try:
            self.primary.init()
            self.primary.start()
            self.attach_standby()
            self.cluster.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def attach_standby(self) -> None:
        """(Re)build the standby from the primary; synchronous replication is then switched on at the
        primary only, so a promoted standby does not wait for a standby it does not have."""
        if self.standby.data.exists():
            shutil.rmtree(self.standby.data)
        self.standby.init_standby_of(self.primary)
        self.standby.start()
        if self.replication == "sync":
            self.primary.configure(synchronous_standby_names="*", synchronous_commit="on")
            self.primary.reload()

    def fail_over(self, how: DatabaseFailure) -> None:
        """The primary fails, the standby is promoted; the roles swap (the old primary stays down)."""
        if how == "kill":
            self.primary.crash()
        else:
            self.primary.stop()
        # A standby rebuilt from a synchronous primary copied its standby names: alone, it would wait.
        self.standby.configure(synchronous_standby_names="")
        self.standby.reload()
        self.standby.promote()
        self.primary, self.standby = self.standby, self.primary

    def close(self) -> None:
        self.cluster.close()
        for server in (self.primary, self.standby):
            try:
                server.stop()
            except NodeError:
                server.kill()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class ClusterConfig:
    soak: SoakConfig
    events: tuple[str, ...]
    replication: Replication = "sync"
    database_failure: DatabaseFailure = "kill"
    rebuild_standby: bool = True  # after a failover, the old primary comes back as the standby


@dataclass(frozen=True)
class Strike:
    """One event, aimed: what it hits, the failure (run in a thread), and how the target comes back."""

    target: str
    fail: Callable[[], None]
    restore: Callable[[], None] | None = None  # in a thread, while traffic goes on (a server's restart)
    respawn: Callable[[], None] | None = None  # on the event loop's thread at once (a replica: its death
    # signal is tied to the thread that spawned it)


@dataclass
class Event:
    kind: str
    at_s: float  # since publishing began
    target: str
    recovery_s: float | None  # failure to the next committed row; None: none within the bound
    new_frame_s: float | None  # failure to the row of the first frame captured after it


@dataclass
class ClusterReport:
    soak: SoakReport
    events: list[Event]
    replication: Replication
    drill: bool

    @property
    def passed(self) -> bool:
        return self.soak.passed and all(None not in (e.recovery_s, e.new_frame_s) for e in self.events)


class ClusterSoak(Soak):
    def __init__(self, config: ClusterConfig, servers: ClusterServers, work_dir: Path) -> None:
        super().__init__(config.soak, servers, work_dir)  # type: ignore[arg-type]
        self.cluster_config = config
        self.cluster_servers = servers
        self.events: list[Event] = []
        self._began = time.monotonic()
        self._background: list[asyncio.Task[None]] = []

    @property
    def amqp_url(self) -> str:
        return self.cluster_servers.cluster.amqp_url

    @property
    def events_queue_arguments(self) -> dict[str, Any]:
        # A classic queue lives on one node: events routed while that node is down would never reach it.
        return {"x-queue-type": "quorum"}

    @property
    def database_url(self) -> str:
        return self.cluster_servers.database_url

    @property
    def admin_settings(self) -> AdminSettings:
        seed = self.cluster_servers.cluster.nodes[0]
        return AdminSettings(
            amqp_url=self.amqp_url,
            management_url=seed.management_url,
            database_url=self.database_url,
            queue_type="quorum",
        )

    async def _start_fleet(self, model: Path) -> None:
        log_dir = self.config.log_dir or self.work_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._began = time.monotonic()
        for index in range(self.config.replicas):
            name = f"replica-{index + 1}"
            replica = Replica(name, self._cluster_env(name, model), log_dir / f"{name}.log", self.work_dir)
            replica.start()
            self.replicas.append(replica)

    def _cluster_env(self, name: str, model: Path) -> dict[str, str]:
        return replica_env(
            name,
            model,
            DETFLEET_AMQP_URL=self.amqp_url,
            DETFLEET_DATABASE_URL=self.database_url,
            DETFLEET_QUEUE_TYPE="quorum",
        )

    def _schedule(self) -> list[tuple[float, str]]:
        """The events in the order given, spread evenly over the publishing window."""
        kinds = self.cluster_config.events
        span = self.config.duration_s
        return [(span * (i + 1) / (len(kinds) + 1), kind) for i, kind in enumerate(kinds)]

    async def _chaos_loop(self) -> None:
        """One event at a time: each waits for the fleet's recovery from the one before."""
        loop = asyncio.get_running_loop()
        begin = loop.time()
        for at, kind in self._schedule():
            await asyncio.sleep(max(0.0, begin + at - loop.time()))
            console.print(f"[yellow]{loop.time() - begin:6.1f} s  event: {kind}[/]")
            self.chaos[kind] += 1
            await self._strike(kind)
        await asyncio.gather(*self._background)

    async def _strike(self, kind: str) -> None:
        """Aim, fail, and time the recovery: the watch starts with the failure, so a slow action (a graceful
        stop, a promotion) counts only as long as the fleet really committed nothing."""
        strike = await self._aim(kind)
        failed_at, failed_wall = time.monotonic(), _now()
        watch = asyncio.create_task(self._next_commit(failed_at, failed_wall))
        await asyncio.to_thread(strike.fail)
        if strike.respawn is not None:
            strike.respawn()
        recovery, new_frames = await watch
        shown = "none" if recovery is None else f"{recovery:.1f} s"
        console.print(f"           {kind} of {strike.target}: next committed row after {shown}")
        self.events.append(Event(kind, failed_at - self._began, strike.target, recovery, new_frames))
        if strike.restore is not None:  # the failed server comes back while traffic goes on
            self._background.append(asyncio.create_task(asyncio.to_thread(strike.restore)))

    async def _aim(self, kind: str) -> Strike:
        servers = self.cluster_servers
        if kind == "kill_lane_leader":
            node = await asyncio.to_thread(servers.cluster.leader_of, QUEUE_BULK)
            return Strike(node.name, node.kill, restore=node.start)
        if kind == "stop_node":
            leader = await asyncio.to_thread(servers.cluster.leader_of, QUEUE_BULK)
            node = next(n for n in reversed(servers.cluster.running()) if n is not leader)
            return Strike(node.name, node.stop, restore=node.start)
        if kind == "kill_consumer":
            replica = self.replicas[await self._busy_replica()]
            self.kills.append(_now())
            return Strike(replica.name, replica.kill, respawn=replica.start)
        if kind in ("database_failover", "database_switchover"):  # a crash, or a planned stop
            how: DatabaseFailure = (
                "stop" if kind == "database_switchover" else self.cluster_config.database_failure
            )
            restore = servers.attach_standby if self.cluster_config.rebuild_standby else None
            return Strike(f"primary on port {servers.primary.port}", lambda: servers.fail_over(how), restore)
        raise ValueError(f"unknown event {kind!r}")

    async def _rows_since(self, wall: datetime) -> tuple[int, int] | None:
        """Committed rows of batches completed after ``wall``, and of frames captured after it (None: no
        primary answers)."""
        # A primary that dies under the probe can leave asyncpg reporting its half-read reply oddly.
        with contextlib.suppress(*_PROBE_ERRORS):
            conn = await asyncpg.connect(self.database_url, timeout=2)
            try:
                record = await conn.fetchrow(_SINCE, wall)
                return (int(record["completed"]), int(record["captured"])) if record else None
            finally:
                await conn.close()
        return None

    async def _next_commit(
        self, failed_at: float, failed_wall: datetime
    ) -> tuple[float | None, float | None]:
        """Seconds from the failure until a row of a batch completed after it is committed, and until the
        row of a frame captured after it is (polled every 0.1 s). The first is the fleet's pause (a batch
        already on its way when the failure struck does not count); the second the whole path's, gateways'
        reconnects included."""
        first_commit: float | None = None
        while time.monotonic() - failed_at < RECOVERY_LIMIT_S:
            counts = await self._rows_since(failed_wall)
            elapsed = time.monotonic() - failed_at
            if counts is not None and counts[0] and first_commit is None:
                first_commit = elapsed
            if counts is not None and counts[1]:
                return first_commit if first_commit is not None else elapsed, elapsed
            await asyncio.sleep(COMMIT_PROBE_S)
        return first_commit, None


def _now() -> datetime:
    return datetime.now(UTC)


async def run_cluster(config: ClusterConfig) -> ClusterReport:
    """Start the private cluster and database pair, run, account, and stop everything (also on failure)."""
    with ClusterServers(config.replication) as servers:
        work_dir = Path(tempfile.mkdtemp(prefix="work-", dir=servers.root))
        model = config.soak.model or write_bright_square_model(
            work_dir / "stand-in.onnx", input_size=(320, 320)
        )
        soak = ClusterSoak(replace(config, soak=replace(config.soak, model=model)), servers, work_dir)
        report = await soak.run()
        return ClusterReport(report, soak.events, config.replication, config.events == DRILL_EVENTS)


# ---- replication: what a primary's crash loses, what a synchronous standby costs -------------------


@dataclass(frozen=True)
class Trial:
    replication: Replication
    committed: int  # inserts the client saw commit on the primary before it was killed
    lost: int  # of those, missing on the promoted standby
    commits_per_s: float


async def _write_until_killed(url: str, writers: int, seconds: float, kill: Any) -> tuple[set[int], float]:
    """``writers`` connections insert one row per transaction as fast as they can; after ``seconds`` the
    primary is killed mid-stream. Returns the ids whose commit the client saw succeed, and the rate."""
    committed: set[int] = set()
    counter = iter(range(1, 10**9))
    began = time.monotonic()
    stop_at = began + seconds

    async def writer() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            while True:
                row = next(counter)
                await conn.execute("INSERT INTO drill_rows (id) VALUES ($1)", row)
                committed.add(row)
        except _PROBE_ERRORS:
            return  # the primary died under it
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    tasks = [asyncio.create_task(writer()) for _ in range(writers)]
    await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
    rate = len(committed) / (time.monotonic() - began)
    await asyncio.to_thread(kill)
    await asyncio.gather(*tasks)
    return committed, rate


async def replication_trial(replication: Replication, seconds: float = 3.0, writers: int = 4) -> Trial:
    """One primary crash under write load on a fresh pair: kill -9 the primary, promote the standby, count
    the commits the client saw that the new primary does not have."""
    pair = await asyncio.to_thread(ClusterServersPair.started, replication)
    try:
        conn = await asyncpg.connect(pair.primary.url, timeout=10)
        try:
            await conn.execute("CREATE TABLE drill_rows (id bigint PRIMARY KEY)")
        finally:
            await conn.close()
        committed, rate = await _write_until_killed(pair.primary.url, writers, seconds, pair.primary.crash)
        await asyncio.to_thread(pair.promote_standby)
        conn = await asyncpg.connect(pair.standby.url, timeout=10)
        try:
            present = {r["id"] for r in await conn.fetch("SELECT id FROM drill_rows")}
        finally:
            await conn.close()
        return Trial(replication, len(committed), len(committed - present), rate)
    finally:
        await asyncio.to_thread(pair.close)


class ClusterServersPair:
    """Just a Postgres primary and its standby, in a folder of their own, for the replication trials."""

    def __init__(self, replication: Replication) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="detfleet-replication-"))
        self.root.chmod(0o755)  # the postgres user must reach its data directories
        self.primary = PrivatePostgres(self.root / "primary", database="postgres")
        self.standby = PrivatePostgres(self.root / "standby", database="postgres")
        self.replication = replication
        for server in (self.primary, self.standby):
            server.fsync = "on"

    @classmethod
    def started(cls, replication: Replication) -> ClusterServersPair:
        pair = cls(replication)
        try:
            pair.primary.init()
            pair.primary.start()
            pair.standby.init_standby_of(pair.primary)
            pair.standby.start()
            if replication == "sync":
                pair.primary.configure(synchronous_standby_names="*", synchronous_commit="on")
                pair.primary.reload()
        except BaseException:
            pair.close()
            raise
        return pair

    def promote_standby(self) -> None:
        self.standby.configure(synchronous_standby_names="")
        self.standby.reload()
        self.standby.promote()

    def close(self) -> None:
        for server in (self.primary, self.standby):
            try:
                server.stop()
            except NodeError:
                server.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def replication_table(trials: list[Trial]) -> Table:
    table = Table(title="primary killed under write load, standby promoted")
    for column in ("replication", "trial", "commits seen", "lost on the new primary", "commits/s"):
        table.add_column(column, justify="left" if column == "replication" else "right")
    for index, trial in enumerate(trials):
        table.add_row(
            trial.replication,
            str(index + 1),
            str(trial.committed),
            str(trial.lost),
            f"{trial.commits_per_s:.0f}",
        )
    return table


# ---- report -----------------------------------------------------------------------------------------


def events_table(report: ClusterReport) -> Table:
    acc = report.soak.account
    verdict = "PASSED" if report.passed else "FAILED"
    name = "drill" if report.drill else "cluster soak"
    table = Table(title=f"detfleet {name} ({report.replication} replication): {verdict}")
    table.add_column("event")
    table.add_column("at (s)", justify="right")
    table.add_column("target")
    table.add_column("recovery (s)", justify="right")
    table.add_column("first new frame (s)", justify="right")
    for event in report.events:
        recovery, new_frame = (
            "none" if value is None else f"{value:.1f}" for value in (event.recovery_s, event.new_frame_s)
        )
        table.add_row(event.kind, f"{event.at_s:.0f}", event.target, recovery, new_frame)
    duplicates = len(acc.strangers) + len(acc.unexplained_duplicates)
    table.add_section()
    lanes = ", ".join(f"{n} {lane}" for lane, n in sorted(acc.confirmed_by_lane.items()))
    table.add_row("tasks confirmed", "", "", f"{acc.confirmed} ({lanes})")
    table.add_row("rows", "", "", ", ".join(f"{n} {s}" for s, n in sorted(acc.rows_by_status.items())))
    table.add_row("lost (confirmed, no row)", "", "", str(len(acc.lost)))
    table.add_row("duplicates (unexplained)", "", "", str(duplicates))
    table.add_row("failed rows without DLQ entry", "", "", str(len(acc.failed_without_dlq)))
    table.add_row("redeliveries absorbed", "", "", str(acc.redeliveries_absorbed))
    table.add_row("duration (s)", "", "", f"{report.soak.seconds:.0f}")
    return table


def print_report(report: ClusterReport, json_out: Path | None) -> None:
    for note in report.soak.notes:
        console.print(f"note: {note}")
    Console(width=140).print(events_table(report))  # stdout, wide enough for the node names
    for problem in report.soak.problems():
        console.print(f"[red]problem: {problem}[/]")
    if json_out is not None:
        acc = report.soak.account
        summary = {
            "replication": report.replication,
            "passed": report.passed,
            "events": [asdict(e) for e in report.events],
            "confirmed": acc.confirmed,
            "confirmed_by_lane": acc.confirmed_by_lane,
            "rows": acc.rows_by_status,
            "lost": len(acc.lost),
            "duplicates": len(acc.strangers) + len(acc.unexplained_duplicates),
            "redeliveries_absorbed": acc.redeliveries_absorbed,
            "seconds": report.soak.seconds,
            "refused": dict(Counter(report.soak.refused)),
        }
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(summary, indent=2) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos.cluster", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--drill", action="store_true", help="the short drill: leader kill, then failover")
    parser.add_argument("--duration", type=float, help="seconds of publishing (drill 60, soak 300)")
    parser.add_argument("--tasks", type=int, help="frames published in all (drill 600, soak 3000)")
    parser.add_argument("--replication", choices=("sync", "async"), default="sync")
    parser.add_argument("--database-failure", choices=("kill", "stop"), default="kill")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--log-dir", type=Path, help="keep the replicas' logs here")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument(
        "--replication-trials", type=int, metavar="N", help="instead: N primary crashes under load per mode"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.replication_trials:
        return _replication_trials(args.replication_trials, args.json)
    duration = args.duration or (60.0 if args.drill else 300.0)
    soak = SoakConfig(
        duration_s=duration,
        tasks=args.tasks or (600 if args.drill else 3000),
        seed=args.seed,
        replicas=2,
        producers=2,  # one realtime, one bulk
        log_dir=args.log_dir,
        drain_limit_s=120.0,
    )
    config = ClusterConfig(
        soak=soak,
        events=DRILL_EVENTS if args.drill else SOAK_EVENTS,
        replication=args.replication,
        database_failure=args.database_failure,
        rebuild_standby=not args.drill,
    )
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("aiormq", "aio_pika"):  # every reconnect attempt while a node is away
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    for telling in ("producer.publisher", "shared.broker.nodes", "shared.broker.publishing"):  # the walk
        logging.getLogger(telling).setLevel(logging.INFO)
    # SIGTERM ends the run through its finally blocks: the private servers stop, their folders go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = asyncio.run(run_cluster(config))
    print_report(report, args.json)
    return 0 if report.passed else 1


def _replication_trials(count: int, json_out: Path | None) -> int:
    async def all_trials() -> list[Trial]:
        return [await replication_trial(mode) for mode in ("sync", "async") for _ in range(count)]

    trials = asyncio.run(all_trials())
    Console(width=110).print(replication_table(trials))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps([asdict(t) for t in trials], indent=2) + "\n")
    return 0 if all(t.lost == 0 for t in trials if t.replication == "sync") else 1


if __name__ == "__main__":
    raise SystemExit(main())
