"""Who may do what at the HTTP gateway: bearer tokens stored as sha256 hashes, their scopes, and a token
bucket per identity.

Tokens are random and long (:func:`new_token` gives 32 bytes), so a plain sha256 of them is as good as a slow
password hash and costs nothing per request. The gateway never stores or logs a token, only its hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from shared.errors import SettingsError
from shared.settings import GatewaySettings, GatewayToken

# Identities with a bucket of their own; beyond it the least recently seen is forgotten (a full bucket).
MAX_BUCKETS = 10_000
ANONYMOUS = "anonymous"


def hash_token(token: str) -> str:
    """The stored form of a bearer token: its sha256, in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Identity:
    """The caller a request was authenticated as: a token's name and scopes, or everyone when auth is off."""

    name: str
    publish: tuple[str, ...]
    read: bool

    def may_publish(self, site: str, camera: str) -> bool:
        return any(fnmatchcase(f"{site}/{camera}", pattern) for pattern in self.publish)


OPEN = Identity(ANONYMOUS, ("*",), True)


def read_tokens_file(path: Path) -> tuple[GatewayToken, ...]:
    """A JSON file of tokens: a list of ``{"name", "sha256", "publish", "read"}`` or ``{"tokens": [...]}``."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SettingsError(f"DETFLEET_GATEWAY_TOKENS_FILE: cannot read {path}: {error}") from None
    if isinstance(document, dict):
        document = document.get("tokens", [])
    try:
        return tuple(TypeAdapter(list[GatewayToken]).validate_python(document))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise SettingsError(f"DETFLEET_GATEWAY_TOKENS_FILE: {path}: token {where}: {first['msg']}") from None


class Authenticator:
    """Maps a presented token to its :class:`Identity`; ``None`` when the token is missing or unknown."""

    def __init__(self, tokens: Iterable[GatewayToken], disabled: bool = False) -> None:
        self.disabled = disabled
        self._by_hash = {t.sha256: Identity(t.name, t.publish, t.read) for t in tokens}
        if not disabled and not self._by_hash:
            raise SettingsError(
                "DETFLEET_GATEWAY_TOKENS_FILE: no bearer tokens configured (set it or "
                "DETFLEET_GATEWAY_TOKENS; DETFLEET_GATEWAY_AUTH_DISABLED=true only for a local demo)"
            )

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Authenticator:
        tokens = list(settings.gateway_tokens)
        if settings.gateway_tokens_file is not None:
            tokens += read_tokens_file(settings.gateway_tokens_file)
        return cls(tokens, settings.gateway_auth_disabled)

    def identify(self, token: str | None) -> Identity | None:
        if self.disabled:
            return OPEN
        if not token:
            return None
        return self._by_hash.get(hash_token(token))


class RateLimiter:
    """A token bucket per identity: ``rate`` requests a second on average, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, identity: str) -> float:
        """Spend one request of ``identity``: 0 when allowed, else the seconds until one is available."""
        now = self._clock()
        tokens, last = self._buckets.pop(identity, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._remember(identity, tokens - 1.0, now)
            return 0.0
        self._remember(identity, tokens, now)
        return (1.0 - tokens) / self.rate

    def _remember(self, identity: str, tokens: float, now: float) -> None:
        self._buckets[identity] = (tokens, now)
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)


def retry_after_header(seconds: float) -> str:
    """Retry-After in whole seconds, at least 1 (the header takes no fractions)."""
    return str(max(1, math.ceil(seconds)))
