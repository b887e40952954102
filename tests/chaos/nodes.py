"""Private RabbitMQ and Postgres servers a harness starts, breaks and stops by itself.

Each one gets its own ports (found free on the loopback interface) and its own data directory under a
temporary folder, so nothing a harness does can touch the shared servers of the machine. Both must run as
root here: RabbitMQ directly (``/usr/lib/rabbitmq/bin``, not the ``/usr/sbin`` wrapper, which switches user
and directory) and Postgres as the ``postgres`` user. Use them as context managers: the servers are
stopped and their folders removed on the way out, even when the harness failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import psutil

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
LOOPBACK = "127.0.0.1"
START_LIMIT_S = 120  # bounds against a server that never comes up, far above a normal start
STOP_LIMIT_S = 60


class NodeError(RuntimeError):
    """A private server did not start or stop as asked."""


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def _run(command: list[str], env: dict[str, str] | None = None, timeout: float = STOP_LIMIT_S) -> str:
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
        raise NodeError(f"{command[0]} took longer than {timeout:g} s") from error
    if done.returncode != 0:
        raise NodeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


@dataclass(frozen=True)
class ServerTls:
    """What a server needs for TLS: the CA its clients' certificates must chain to, its certificate, key."""

    ca: Path
    cert: Path
    key: Path


class PrivateRabbit:
    """One RabbitMQ node with the management plugin, on ports of its own, data in ``root``.

    With ``tls`` the node also listens for ``amqps`` on ``amqps_port`` and requires a client certificate
    signed by ``tls.ca`` there (``fail_if_no_peer_cert``).
    """

    def __init__(self, root: Path, tls: ServerTls | None = None, cookie: str | None = None) -> None:
        self.root = root
        self.tls = tls
        self.cookie = cookie  # the Erlang cookie nodes of one cluster share; None: the node makes its own
        self.amqps_port = free_port()
        self.name = f"soak-{os.getpid()}-{root.name[-6:]}@localhost"
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.management_port = free_port()
        self.prometheus_port = free_port()
        self._env = self._environment()
        self.started = False

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@{LOOPBACK}:{self.amqp_port}/"

    @property
    def management_url(self) -> str:
        return f"http://guest:guest@{LOOPBACK}:{self.management_port}/"

    def _environment(self) -> dict[str, str]:
        for folder in ("home", "mnesia", "log"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        if self.cookie is not None:  # rabbitmq-server and rabbitmqctl both read it from $HOME
            cookie = self.root / "home" / ".erlang.cookie"
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)
        config = self.root / "rabbitmq.conf"
        config.write_text(self._config_text())
        plugins = self.root / "enabled_plugins"
        plugins.write_text(self._plugins_text())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return env | {
            "HOME": str(self.root / "home"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_PID_FILE": str(self.root / "node.pid"),
            "ERL_EPMD_ADDRESS": LOOPBACK,
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _config_text(self) -> str:
        # Mirrors the repository's rabbitmq/rabbitmq.conf, with this node's own loopback listeners.
        return (
            f"listeners.tcp.local = {LOOPBACK}:{self.amqp_port}\n"
            f"management.tcp.ip = {LOOPBACK}\n"
            f"management.tcp.port = {self.management_port}\n"
            f"prometheus.tcp.ip = {LOOPBACK}\n"
            f"prometheus.tcp.port = {self.prometheus_port}\n"
            "consumer_timeout = 1800000\n"
            "max_message_size = 16777216\n"
            "vm_memory_high_watermark.relative = 0.6\n"
            "disk_free_limit.absolute = 50MB\n"
        ) + self._tls_config_text()

    def _tls_config_text(self) -> str:
        if self.tls is None:
            return ""
        return (
            f"listeners.ssl.default = {LOOPBACK}:{self.amqps_port}\n"
            f"ssl_options.cacertfile = {self.tls.ca}\n"
            f"ssl_options.certfile = {self.tls.cert}\n"
            f"ssl_options.keyfile = {self.tls.key}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = true\n"
        )

    def _plugins_text(self) -> str:
        return "[rabbitmq_management].\n"

    def ctl(self, *args: str, timeout: float = STOP_LIMIT_S) -> str:
        """``rabbitmqctl -n`` this node with ``args``; its stdout."""
        return _run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name, *args], self._env, timeout)

    def start(self) -> None:
        _run([str(RABBIT_BIN / "rabbitmq-server"), "-detached"], self._env)
        self.started = True
        self._await_startup()
        self._wait_for_management()

    def _await_startup(self) -> None:
        """``await_startup`` fails at once while the node has not registered with epmd yet: poll it."""
        deadline = time.monotonic() + START_LIMIT_S
        while True:
            try:
                self.ctl("await_startup", "--timeout", "30", timeout=40)
                return
            except NodeError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    def _wait_for_management(self) -> None:
        """await_startup returns before the management listener takes connections; topology needs it."""
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                probe.settimeout(1)
                if probe.connect_ex((LOOPBACK, self.management_port)) == 0:
                    return
            time.sleep(0.2)
        raise NodeError(f"management API of {self.name} did not open in {START_LIMIT_S} s")

    def stop(self) -> None:
        """A real node stop (not stop_app): every connection drops, durable queues stay on disk."""
        if self.started:
            # Given the pid file, ``stop`` returns once the VM has exited: the name is free to start again.
            self.ctl("stop", str(self.root / "node.pid"), timeout=STOP_LIMIT_S)
            self.started = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """kill -9 the node's Erlang VM (the harness's last resort at clean-up)."""
        pid_file = self.root / "node.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        self.started = False


class MqttRabbit(PrivateRabbit):
    """A private node with the MQTT plugin too, on an MQTT port of its own (never 1883: another broker's
    here), its topics mapped onto ``exchange`` (MQTT ``/`` levels are the routing key's ``.`` words)."""

    def __init__(self, root: Path, exchange: str) -> None:
        self.mqtt_port = free_port()
        self.mqtt_exchange = exchange
        super().__init__(root)

    def _config_text(self) -> str:
        return super()._config_text() + (
            f"mqtt.listeners.tcp.default = {LOOPBACK}:{self.mqtt_port}\n"
            f"mqtt.exchange = {self.mqtt_exchange}\n"
            "mqtt.allow_anonymous = false\n"
        )

    def _plugins_text(self) -> str:
        return "[rabbitmq_management,rabbitmq_mqtt].\n"


class ShippedRabbit(PrivateRabbit):
    """A node booted from the repository's ``rabbitmq.conf``, ``enabled_plugins`` and a definitions folder.

    Only what cannot be shared with the machine's own broker changes: the listeners move to this node's
    loopback ports and ``load_definitions`` to ``definitions``. Every rewritten key must be in the shipped
    file, so a changed file fails the harness instead of being silently replaced. With definitions there is
    no guest user: the URLs carry the administrator the boot definitions name.
    """

    def __init__(
        self, root: Path, conf: Path, plugins: Path, definitions: Path, admin: tuple[str, str]
    ) -> None:
        self.conf, self.plugins, self.definitions, self.admin = conf, plugins, definitions, admin
        super().__init__(root)

    @property
    def amqp_url(self) -> str:
        return f"amqp://{self.admin[0]}:{self.admin[1]}@{LOOPBACK}:{self.amqp_port}/"

    @property
    def management_url(self) -> str:
        return f"http://{self.admin[0]}:{self.admin[1]}@{LOOPBACK}:{self.management_port}/"

    def rewritten(self) -> dict[str, str]:
        return {
            "listeners.tcp.default": f"{LOOPBACK}:{self.amqp_port}",
            "management.tcp.port": str(self.management_port),
            "prometheus.tcp.port": str(self.prometheus_port),
            "load_definitions": str(self.definitions),
        }

    def _config_text(self) -> str:
        wanted, seen, lines = self.rewritten(), set[str](), []
        for line in self.conf.read_text().splitlines():
            key = line.split("=", 1)[0].strip()
            if key in wanted and not line.lstrip().startswith("#"):
                seen.add(key)
                line = f"{key} = {wanted[key]}"
            lines.append(line)
        if missing := set(wanted) - seen:
            raise NodeError(f"{self.conf} no longer sets {sorted(missing)}")
        lines += [f"management.tcp.ip = {LOOPBACK}", f"prometheus.tcp.ip = {LOOPBACK}"]
        return "\n".join(lines) + "\n"

    def _plugins_text(self) -> str:
        return self.plugins.read_text()


class PrivatePostgres:
    """One Postgres 15 cluster (trust auth, user postgres) on a port of its own, data in ``root``."""

    def __init__(self, root: Path, database: str = "detfleet_soak") -> None:
        self.root = root
        self.database = database
        self.port = free_port()
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.fsync = "off"  # a harness measuring commit costs turns it on
        self.started = False
        root.mkdir(parents=True, exist_ok=True)
        shutil.chown(root, "postgres", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{self.database}"

    def _as_postgres(self, tool: str, *args: str, timeout: float = STOP_LIMIT_S) -> str:
        command = ["runuser", "-u", "postgres", "--", str(POSTGRES_BIN / tool), *args]
        return _run(command, timeout=timeout)

    def init(self) -> None:
        self._as_postgres("initdb", "-A", "trust", "-U", "postgres", "-D", str(self.data), "--no-sync")

    def init_standby_of(self, primary: PrivatePostgres) -> None:
        """Instead of :meth:`init`: a streaming standby of the running ``primary`` (``pg_basebackup -R``
        writes ``standby.signal`` and ``primary_conninfo``; initdb's pg_hba trusts loopback replication)."""
        self._as_postgres(
            "pg_basebackup", "-h", LOOPBACK, "-p", str(primary.port), "-U", "postgres",
            "-D", str(self.data), "-R", "-X", "stream", "-c", "fast", "--no-sync",
        )  # fmt: skip

    def configure(self, **settings: str) -> None:
        """Append ``postgresql.conf`` settings; a running server picks them up with :meth:`reload`."""
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = '{value}'\n" for key, value in settings.items())

    def reload(self) -> None:
        self._ctl("reload")

    def promote(self) -> None:
        """A standby becomes a primary (``pg_ctl promote -w`` returns once it accepts writes)."""
        self._ctl("promote")

    def require_passwords(self) -> None:
        """Between init and start: TCP logins of roles other than postgres must give their password."""
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all postgres {LOOPBACK}/32 trust\n"
            f"host all all {LOOPBACK}/32 scram-sha-256\n"
        )

    def require_client_certificates(self, tls: ServerTls) -> None:
        """Between init and start: TLS on, and every TCP login needs a client certificate signed by
        ``tls.ca`` whose common name is the role (``clientcert=verify-full``); plain TCP is refused."""
        for name, source in (("server.crt", tls.cert), ("server.key", tls.key), ("ca.crt", tls.ca)):
            target = self.data / name
            shutil.copyfile(source, target)
            target.chmod(0o600)
            shutil.chown(target, "postgres", "postgres")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
            conf.write("ssl_ca_file = 'ca.crt'\n")
        (self.data / "pg_hba.conf").write_text(
            f"local all all trust\nhostssl all all {LOOPBACK}/32 trust clientcert=verify-full\n"
        )

    def _ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses={LOOPBACK} -c fsync={self.fsync}"
        try:
            self._as_postgres(
                "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w",
                "-t", str(START_LIMIT_S), action, *extra, timeout=START_LIMIT_S + 10,
            )  # fmt: skip
        except NodeError as error:  # pg_ctl says "examine the log": the log goes away with the folder
            tail = self.log.read_text(errors="replace").strip().splitlines()[-5:] if self.log.exists() else []
            raise NodeError(f"{error}; log: {' | '.join(tail)}") from None

    def start(self) -> None:
        self._ctl("start")
        self.started = True

    def stop(self) -> None:
        if self.started:
            self._ctl("stop", "-m", "fast")
            self.started = False

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every session is terminated, committed rows stay."""
        self._ctl("restart", "-m", "fast")
        self.started = True

    def kill(self) -> None:
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError, IndexError, ProcessLookupError):
                os.kill(int(pid_file.read_text().splitlines()[0]), signal.SIGKILL)
        self.started = False

    def crash(self) -> None:
        """kill -9 of the postmaster and every process it started, together: what a machine loss does. (A
        backend outliving its postmaster could still commit, and its WAL would never reach a standby.)"""
        pid_file = self.data / "postmaster.pid"
        with contextlib.suppress(ValueError, IndexError, OSError, psutil.Error):
            postmaster = psutil.Process(int(pid_file.read_text().splitlines()[0]))
            processes = [postmaster, *postmaster.children(recursive=True)]
            for process in processes:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signal.SIGKILL)
            _wait_gone(processes)
        # A machine that died comes back with an empty /tmp: the socket and its lock file would otherwise make
        # the next server on this port refuse to start.
        for leftover in self.root.glob(f".s.PGSQL.{self.port}*"):
            leftover.unlink(missing_ok=True)
        self.started = False


def _wait_gone(processes: list[psutil.Process]) -> None:
    """Until every process has exited; a zombie counts (nothing may reap it here: PID 1 need not)."""
    deadline = time.monotonic() + STOP_LIMIT_S
    for process in processes:
        while time.monotonic() < deadline:
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)


class PrivateServers:
    """A private RabbitMQ and Postgres in one temporary folder; everything is gone after ``__exit__``."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="detfleet-chaos-"))
        self.root.chmod(0o755)  # the postgres user must reach its data directory
        self.rabbit = PrivateRabbit(self.root / "rabbit")
        self.postgres = PrivatePostgres(self.root / "postgres")

    def __enter__(self) -> Self:
        try:
            self.postgres.init()
            self.postgres.start()
            self.rabbit.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for node in (self.rabbit, self.postgres):
            try:
                node.stop()
            except NodeError:
                node.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateCluster:
    """Three (or ``size``) RabbitMQ nodes joined into one cluster: one Erlang cookie, a name, ports and a
    data directory each under ``root``. The first node is the seed the others ``join_cluster``."""

    def __init__(self, root: Path, size: int = 3) -> None:
        cookie = secrets.token_hex(20).upper()
        self.nodes = [PrivateRabbit(root / f"node{i}", cookie=cookie) for i in range(size)]

    @property
    def amqp_url(self) -> str:
        """Every node's URL, comma-separated: what ``DETFLEET_AMQP_URL`` holds for a cluster."""
        return ",".join(node.amqp_url for node in self.nodes)

    def node_named(self, name: str) -> PrivateRabbit:
        return next(node for node in self.nodes if node.name == name)

    def start(self) -> None:
        """Start every node (in parallel: a boot is mostly waiting), then join the others to the seed."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(PrivateRabbit.start, self.nodes))
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", seed.name)
            node.ctl("start_app")
        seed.ctl("await_online_nodes", str(len(self.nodes)))

    def running(self) -> list[PrivateRabbit]:
        return [node for node in self.nodes if node.started]

    def leader_of(self, queue: str, vhost: str = "/") -> PrivateRabbit:
        """The node that leads quorum queue ``queue`` now, as a running node reports it."""
        for asked in self.running():  # a node still booting does not answer yet: ask the next
            try:
                text = asked.ctl(
                    "list_queues", "-p", vhost, "name", "leader", "--formatter", "json", "--quiet"
                )
            except NodeError:
                continue
            for entry in json.loads(text):
                if entry["name"] == queue:
                    return self.node_named(str(entry["leader"]))
        raise NodeError(f"no running node names a leader of {queue}")

    def close(self) -> None:
        for node in self.nodes:
            try:
                node.stop()
            except NodeError:
                node.kill()
