"""The RabbitMQ management HTTP API: policies, vhosts, users, definitions and queue figures.

Policies, vhosts and users exist only there (AMQP cannot set them).
"""

from __future__ import annotations

import base64
import json
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp

from shared.errors import BrokerUnavailableError, ManagementError
from shared.settings import mask_url
from shared.topology import POLICY_PRIORITY, PolicySpec, UserSpec


def _q(name: str) -> str:
    return quote(name, safe="")


class Management:
    """An async client of the management API at ``url`` (credentials in the URL, masked in errors)."""

    def __init__(self, url: str, timeout_s: float = 15.0) -> None:
        parts = urlsplit(url)
        self._shown = mask_url(url)
        self._base = urlunsplit((parts.scheme, f"{parts.hostname}:{parts.port or 15672}", "/api", "", ""))
        credentials = f"{unquote(parts.username or 'guest')}:{unquote(parts.password or 'guest')}"
        auth = "Basic " + base64.b64encode(credentials.encode()).decode()
        self._session = aiohttp.ClientSession(
            headers={"Authorization": auth}, timeout=aiohttp.ClientTimeout(total=timeout_s)
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self._session.close()

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with self._session.request(method, self._base + path, json=body) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise BrokerUnavailableError(f"management API {self._shown} unreachable: {error!r}") from error
        if response.status >= 400:
            raise ManagementError(f"{method} {path} answered {response.status}: {text[:300]}")
        return json.loads(text) if text else None

    async def set_policy(self, vhost: str, policy: PolicySpec) -> None:
        body = {
            "pattern": policy.pattern,
            "definition": policy.definition,
            "priority": POLICY_PRIORITY,
            "apply-to": "queues",
        }
        await self.request("PUT", f"/policies/{_q(vhost)}/{_q(policy.name)}", body)

    async def policies(self, vhost: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.request("GET", f"/policies/{_q(vhost)}")
        return result

    async def delete_policy(self, vhost: str, name: str) -> None:
        await self.request("DELETE", f"/policies/{_q(vhost)}/{_q(name)}")

    async def create_vhost(self, vhost: str) -> None:
        await self.request("PUT", f"/vhosts/{_q(vhost)}")

    async def delete_vhost(self, vhost: str) -> None:
        await self.request("DELETE", f"/vhosts/{_q(vhost)}")

    async def grant(
        self, vhost: str, user: str, configure: str = ".*", write: str = ".*", read: str = ".*"
    ) -> None:
        body = {"configure": configure, "write": write, "read": read}
        await self.request("PUT", f"/permissions/{_q(vhost)}/{_q(user)}", body)

    async def put_user(self, user: UserSpec, password: str) -> None:
        await self.request("PUT", f"/users/{_q(user.name)}", {"password": password, "tags": user.tags})

    async def load_definitions(self, vhost: str, definitions: dict[str, Any]) -> None:
        await self.request("POST", f"/definitions/{_q(vhost)}", definitions)

    async def export_definitions(self, vhost: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/definitions/{_q(vhost)}")
        return result

    async def queue(self, vhost: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/queues/{_q(vhost)}/{_q(name)}")
        return result

    async def queues(self, vhost: str) -> list[dict[str, Any]]:
        """Every queue of ``vhost`` with its depths, consumer count and ``message_stats`` (rates)."""
        result: list[dict[str, Any]] = await self.request("GET", f"/queues/{_q(vhost)}")
        return result


def rate_of(queue: dict[str, Any], stat: str) -> float:
    """A queue's current rate of ``stat`` (``publish``, ``deliver_get``, ``ack``...), 0.0 when never seen.

    The management API leaves out ``message_stats`` (or one stat of it) until the queue has seen one.
    """
    details = queue.get("message_stats", {}).get(f"{stat}_details", {})
    return float(details.get("rate", 0.0))
