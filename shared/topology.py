"""Every exchange, queue, binding, policy and user of detfleet: the one place their names and arguments live.

``detfleet topology apply`` declares this over AMQP and sets the policies over the management API;
``rabbitmq/definitions.json`` is :func:`definitions` of the defaults, and a test holds the two equal.

Limits operators tune (TTL, max-length, overflow, dead-letter exchange) are policies, never x-arguments:
x-arguments would override policies for overflow and DLX, and the lower TTL/length would silently win.
Only one policy applies to a queue, so each queue gets one policy carrying all of its keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from shared.settings import TopologySettings, amqp_node_urls

EXCHANGE_FRAMES = "detfleet.frames"
QUEUE_REALTIME = "detfleet.realtime"
QUEUE_BULK = "detfleet.bulk"
QUEUE_INTAKE = "detfleet.intake"
QUEUE_RETRY_READY = "detfleet.retry.ready"
QUEUE_DLQ = "detfleet.dlq"
# What a consumer takes work from, realtime first: the lanes, returning retries, and the broker's drops.
WORK_QUEUES = (QUEUE_REALTIME, QUEUE_BULK, QUEUE_RETRY_READY, QUEUE_INTAKE)
# The exchanges that feed the intake, the retry return path and the DLQ are fanouts named after their
# queue: a fanout keeps the original routing key, which dead-lettering then preserves too.
EXCHANGE_INTAKE = QUEUE_INTAKE
EXCHANGE_RETRY_READY = QUEUE_RETRY_READY
EXCHANGE_DLQ = QUEUE_DLQ
# One event per committed result row, routed by ``<status>.<site>.<camera>`` (docs/results.md). No queue of
# ours is bound to it: subscribers bind their own.
EXCHANGE_RESULTS = "detfleet.results"
# ``detfleet results forward --webhook``: a durable queue per forwarder name, and a parking lot beside it (a
# fanout exchange and a queue, both named ``<queue>.parked``) for the events the endpoint never took.
WEBHOOK_QUEUE_PREFIX = EXCHANGE_RESULTS + ".webhook."
PARKED_SUFFIX = ".parked"
POLICY_PRIORITY = 10
POLICY_PREFIX = "detfleet-"


def retry_level_name(delay_ms: int) -> str:
    """``detfleet.retry.1s`` for 1000 ms, ``detfleet.retry.250ms`` for 250 ms."""
    unit = f"{delay_ms // 1000}s" if delay_ms % 1000 == 0 else f"{delay_ms}ms"
    return f"detfleet.retry.{unit}"


def vhost_of(amqp_url: str) -> str:
    """The vhost an AMQP URL names: its path without the leading slash, ``/`` when empty (the first node's,
    for a list of node URLs: settings hold them all to the same vhost)."""
    path = urlsplit((amqp_node_urls(amqp_url) or [amqp_url])[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: str


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BindingSpec:
    exchange: str
    queue: str
    routing_key: str = ""


@dataclass(frozen=True)
class PolicySpec:
    name: str
    queue: str
    definition: dict[str, Any]

    @property
    def pattern(self) -> str:
        return "^" + self.queue.replace(".", r"\.") + "$"


@dataclass(frozen=True)
class UserSpec:
    """A broker user: tags and permissions only; passwords come from ``detfleet broker bootstrap``."""

    name: str
    tags: str
    configure: str
    write: str
    read: str


# Each role gets what it needs and no more (docs/deployment.md says what each may and may not do). RabbitMQ's
# read permission also allows purging a queue, and topology changes go through an administrator, not these.
USERS = (
    # Gateways publish frames and nothing else.
    UserSpec("detfleet-producer", "", configure="^$", write=r"^detfleet\.frames$", read="^$"),
    # The HTTP gateway publishes frames like any gateway, and binds a server-named queue of its own per open
    # result stream to detfleet.results (configure, write, read on amq.gen-*; read on the exchange to bind).
    UserSpec(
        "detfleet-gateway",
        "",
        configure=r"^amq\.gen-.*$",
        write=r"^(detfleet\.frames|amq\.gen-.*)$",
        read=r"^(detfleet\.results|amq\.gen-.*)$",
    ),
    # Consumers take from the lanes, the intake and the retry return path; they publish retries, DLQ entries,
    # quarantined copies (to retry.ready) and result events; never frames.
    UserSpec(
        "detfleet-consumer",
        "",
        configure="^$",
        write=r"^detfleet\.(dlq|retry\..+|results)$",
        read=r"^detfleet\.(realtime|bulk|intake|retry\.ready)$",
    ),
    # Operators read (and so may purge) the DLQ and replay its entries to the frames exchange.
    UserSpec(
        "detfleet-ops", "management", configure="^$", write=r"^detfleet\.frames$", read=r"^detfleet\.dlq$"
    ),
    # Scrapers and KEDA read queue figures from the management API; no message passes through them.
    UserSpec("detfleet-monitoring", "monitoring", configure="^$", write="^$", read="^$"),
    # Result subscribers (detfleet results --follow and forward, MQTT clients, programs of their own) bind
    # queues of their own to the results exchange: server-named ones, detfleet.results.<anything> (the
    # forwarders' queues and parking lots) and the MQTT plugin's. Never a frame, a lane or the DLQ.
    UserSpec(
        "detfleet-subscriber",
        "",
        configure=r"^(amq\.gen-.*|detfleet\.results\..+|mqtt-subscription-.*)$",
        write=r"^(amq\.gen-.*|detfleet\.results\..+|mqtt-subscription-.*)$",
        read=r"^(amq\.gen-.*|detfleet\.results(\..+)?|mqtt-subscription-.*)$",
    ),
)


def webhook_queue(name: str) -> str:
    """The durable queue of the webhook forwarder called ``name``: ``detfleet.results.webhook.<name>``."""
    return WEBHOOK_QUEUE_PREFIX + name


def parked_queue(queue: str) -> str:
    """Where a forwarder of ``queue`` parks what it could not deliver (an exchange and a queue)."""
    return queue + PARKED_SUFFIX


@dataclass(frozen=True)
class Topology:
    """The whole broker-side layout for one set of tunables."""

    exchanges: tuple[ExchangeSpec, ...]
    queues: tuple[QueueSpec, ...]
    bindings: tuple[BindingSpec, ...]
    policies: tuple[PolicySpec, ...]
    retry_levels: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: TopologySettings | None = None) -> Topology:
        s = settings or TopologySettings()
        levels = tuple(retry_level_name(d) for d in s.retry_delays_ms)
        arguments = _queue_arguments(s)
        queue_names = (QUEUE_REALTIME, QUEUE_BULK, QUEUE_INTAKE, *levels, QUEUE_RETRY_READY, QUEUE_DLQ)
        return cls(
            exchanges=(
                ExchangeSpec(EXCHANGE_FRAMES, "topic"),
                ExchangeSpec(EXCHANGE_INTAKE, "fanout"),
                *(ExchangeSpec(level, "fanout") for level in levels),
                ExchangeSpec(EXCHANGE_RETRY_READY, "fanout"),
                ExchangeSpec(EXCHANGE_DLQ, "fanout"),
                ExchangeSpec(EXCHANGE_RESULTS, "topic"),
            ),
            queues=tuple(QueueSpec(name, dict(arguments)) for name in queue_names),
            bindings=(
                BindingSpec(EXCHANGE_FRAMES, QUEUE_REALTIME, "realtime.#"),
                BindingSpec(EXCHANGE_FRAMES, QUEUE_BULK, "bulk.#"),
                BindingSpec(EXCHANGE_INTAKE, QUEUE_INTAKE),
                *(BindingSpec(level, level) for level in levels),
                BindingSpec(EXCHANGE_RETRY_READY, QUEUE_RETRY_READY),
                BindingSpec(EXCHANGE_DLQ, QUEUE_DLQ),
            ),
            policies=_policies(s, levels),
            retry_levels=levels,
        )

    @classmethod
    def parking_lot(cls, queue: str) -> Topology:
        """The parking lot of a forwarder's ``queue``: a fanout exchange into a durable queue, one name.

        The forwarder itself declares it (it is not part of ``topology apply``): forwarders come and go."""
        name = parked_queue(queue)
        return cls(
            exchanges=(ExchangeSpec(name, "fanout"),),
            queues=(QueueSpec(name),),
            bindings=(BindingSpec(name, name),),
            policies=(),
            retry_levels=(),
        )

    def retry_level_for(self, attempt: int) -> str:
        """The delay queue for a task about to make ``attempt`` (2 = first retry); the last level repeats."""
        index = min(max(attempt - 2, 0), len(self.retry_levels) - 1)
        return self.retry_levels[index]


def _queue_arguments(s: TopologySettings) -> dict[str, Any]:
    # x-queue-type cannot be set by a policy; changing it means drain, delete, recreate (docs/operations.md).
    if s.queue_type == "quorum":
        return {
            "x-queue-type": "quorum",
            # High on purpose: in 3.10 every requeue, kill -9 and drain counts toward it (a backstop).
            "x-delivery-limit": s.quorum_delivery_limit,
            # Replicas per queue, fixed at declaration (argument only): 3 survives the loss of any one node.
            # A cluster with fewer nodes gets one replica per node.
            "x-quorum-initial-group-size": s.quorum_initial_group_size,
        }
    return {"x-queue-type": "classic"}


def _lazy(s: TopologySettings) -> dict[str, Any]:
    """A night's backlog is deep: RabbitMQ 3.10's default classic mode keeps every body in RAM until memory
    pressure pages it out; lazy writes bodies to disk at once (docs/scaling.md). 3.12+ classic queues behave
    this way always. A quorum queue keeps its log on disk anyway, and RabbitMQ 3.10 does not apply a policy
    carrying the key to one at all, so quorum mode leaves it out."""
    return {"queue-mode": "lazy"} if s.queue_type == "classic" else {}


def _dead_lettering(s: TopologySettings) -> dict[str, Any]:
    """Policy keys that make a quorum queue dead-letter at least once (docs/disaster-recovery.md).

    RabbitMQ 3.10 dead-letters at most once by default: a message expired or dropped while the node moving
    it fails is gone. ``at-least-once`` keeps it in the source queue until the target confirms it, and is
    honoured only with ``overflow: reject-publish``; classic queues have only at-most-once."""
    if s.queue_type != "quorum":
        return {}
    return {"overflow": "reject-publish", "dead-letter-strategy": "at-least-once"}


def _policies(s: TopologySettings, levels: tuple[str, ...]) -> tuple[PolicySpec, ...]:
    lanes = (
        PolicySpec(
            POLICY_PREFIX + "realtime",
            QUEUE_REALTIME,
            {
                "message-ttl": s.realtime_ttl_ms,
                "max-length": s.realtime_max_length,
                # The newest frames win: a full realtime lane pushes its oldest into the intake. drop-head
                # rules out at-least-once dead-lettering on quorum queues: what a node failure can cost here
                # is in docs/disaster-recovery.md.
                "overflow": "drop-head",
                "dead-letter-exchange": EXCHANGE_INTAKE,
            },
        ),
        PolicySpec(
            POLICY_PREFIX + "bulk",
            QUEUE_BULK,
            {
                "message-ttl": s.bulk_ttl_ms,
                "max-length": s.bulk_max_length,
                # Publishers get a nack and back off: nothing is dropped silently.
                "overflow": "reject-publish",
                "dead-letter-exchange": EXCHANGE_INTAKE,
                **_lazy(s),
                **_dead_lettering(s),
            },
        ),
    )
    # A retry level holds a task only for its delay, then dead-letters it back: losing it there would lose a
    # task whose message was already acked, so on quorum queues that move is at-least-once too.
    retries = tuple(
        PolicySpec(
            POLICY_PREFIX + level.removeprefix("detfleet."),
            level,
            {"message-ttl": delay, "dead-letter-exchange": EXCHANGE_RETRY_READY, **_dead_lettering(s)},
        )
        for level, delay in zip(levels, s.retry_delays_ms, strict=True)
    )
    return lanes + retries


def definitions(topology: Topology, vhost: str = "/", with_users: bool = True) -> dict[str, Any]:
    """The RabbitMQ definitions document of ``topology`` (the format of ``rabbitmq/definitions.json``)."""
    doc: dict[str, Any] = {}
    if with_users:
        doc["users"] = [{"name": u.name, "password_hash": "", "tags": u.tags} for u in USERS]
        doc["vhosts"] = [{"name": vhost}]
        doc["permissions"] = [
            {"user": u.name, "vhost": vhost, "configure": u.configure, "write": u.write, "read": u.read}
            for u in USERS
        ]
    doc["exchanges"] = [
        {
            "name": e.name,
            "vhost": vhost,
            "type": e.type,
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {},
        }
        for e in topology.exchanges
    ]
    doc["queues"] = [
        {"name": q.name, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": q.arguments}
        for q in topology.queues
    ]
    doc["bindings"] = [
        {
            "source": b.exchange,
            "vhost": vhost,
            "destination": b.queue,
            "destination_type": "queue",
            "routing_key": b.routing_key,
            "arguments": {},
        }
        for b in topology.bindings
    ]
    doc["policies"] = [
        {
            "name": p.name,
            "vhost": vhost,
            "pattern": p.pattern,
            "apply-to": "queues",
            "priority": POLICY_PRIORITY,
            "definition": p.definition,
        }
        for p in topology.policies
    ]
    return doc
