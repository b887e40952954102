"""Postgres set-up: create the database if missing and apply versioned SQL migrations, once each.

Migrations are ``shared/migrations/NNNN_name.sql``, applied in order inside one transaction per file,
under a session advisory lock so replicas starting together cannot apply one twice. A migration already
applied whose text changed is an error: released migrations are never edited, a new one is added.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

from shared.errors import DatabaseError, DatabaseRefusedError
from shared.settings import mask_url

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x64657466  # "detf": serialises migrations across replicas

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS detfleet_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    sha256 text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_FILE.match(path.name)
        if not match:
            raise DatabaseError(f"{path.name}: migration files are named NNNN_lower_snake.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise DatabaseError(f"two migrations share a version in {directory}")
    return found


def database_name(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/")) or "postgres"


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


# Postgres answered and said no: the role, password or database is wrong, so waiting will not help.
_REFUSALS = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidCatalogNameError,
)


async def connect(url: str, timeout: float = 10.0) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=timeout)
    except _REFUSALS as error:
        raise DatabaseRefusedError(f"{mask_url(url)} refused: {error}") from error
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        raise DatabaseError(f"cannot connect to {mask_url(url)}: {error}") from error


async def ensure_database(url: str) -> bool:
    """Create the database ``url`` names if it does not exist; True when it was created."""
    name = database_name(url)
    admin = await connect(_with_database(url, "postgres"))
    try:
        if await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        try:
            await admin.execute(f'CREATE DATABASE "{name.replace(chr(34), chr(34) * 2)}"')
        except asyncpg.DuplicateDatabaseError:
            return False  # a replica starting beside us won the race
        logger.info("Created database %s", name)
        return True
    finally:
        await admin.close()


async def drop_database(url: str) -> None:
    """Drop the database ``url`` names, ending its other sessions (tests clean up with this)."""
    name = database_name(url)
    admin = await connect(_with_database(url, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name.replace(chr(34), chr(34) * 2)}" WITH (FORCE)')
    finally:
        await admin.close()


async def migrate(url: str, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Create the database if needed and apply pending migrations; returns those applied now."""
    migrations = discover(directory)
    await ensure_database(url)
    conn = await connect(url)
    try:
        # One migrator at a time across replicas; released when the session ends, even on a crash.
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        await conn.execute(_CREATE_TABLE)
        return [m for m in migrations if await _apply_one(conn, m)]
    except asyncpg.PostgresError as error:
        raise DatabaseError(f"migration failed: {error}") from error
    finally:
        await conn.close()


async def _apply_one(conn: asyncpg.Connection, migration: Migration) -> bool:
    async with conn.transaction():
        applied = await conn.fetchval(
            "SELECT sha256 FROM detfleet_migrations WHERE version = $1", migration.version
        )
        if applied is not None:
            if applied != migration.sha256:
                raise DatabaseError(
                    f"migration {migration.version:04d}_{migration.name} changed after it was applied"
                )
            return False
        await conn.execute(migration.sql)
        await conn.execute(
            "INSERT INTO detfleet_migrations (version, name, sha256) VALUES ($1, $2, $3)",
            migration.version,
            migration.name,
            migration.sha256,
        )
    logger.info("Applied migration %04d_%s", migration.version, migration.name)
    return True


async def applied_versions(url: str) -> list[int]:
    conn = await connect(url)
    try:
        rows = await conn.fetch("SELECT version FROM detfleet_migrations ORDER BY version")
        return [r["version"] for r in rows]
    finally:
        await conn.close()


# One batch: short transactions that never hold many row locks, so the consumers' writes go on meanwhile.
_PRUNE_BATCH = """
WITH doomed AS (
    SELECT task_id FROM detfleet_results
    WHERE completed_at < now() - $1::interval AND ($2::text IS NULL OR status = $2)
    LIMIT $3 FOR UPDATE SKIP LOCKED
)
DELETE FROM detfleet_results r USING doomed d WHERE r.task_id = d.task_id
"""


# The HTTP gateway's acceptances (migration 0005) matter only until their row exists: pruned by age alone.
_PRUNE_ACCEPTED_BATCH = """
WITH doomed AS (
    SELECT task_id FROM detfleet_gateway_tasks WHERE accepted_at < now() - $1::interval
    LIMIT $2 FOR UPDATE SKIP LOCKED
)
DELETE FROM detfleet_gateway_tasks g USING doomed d WHERE g.task_id = d.task_id
"""


async def prune_accepted(url: str, older_than: timedelta, batch: int = 5_000) -> int:
    """Delete the HTTP gateway's acceptances older than ``older_than``, in batches."""
    conn = await connect(url)
    removed = 0
    try:
        while True:
            count = int((await conn.execute(_PRUNE_ACCEPTED_BATCH, older_than, batch)).split()[-1])
            removed += count
            if count < batch:
                return removed
    except asyncpg.UndefinedTableError:
        return removed  # a database migrated before 0005 has no acceptances to prune
    except asyncpg.PostgresError as error:
        raise DatabaseError(f"prune failed: {error}") from error
    finally:
        await conn.close()


async def prune(url: str, older_than: timedelta, status: str | None = None, batch: int = 5_000) -> int:
    """Delete result rows completed before ``older_than`` ago (of one status, if given), in batches."""
    conn = await connect(url)
    removed = 0
    try:
        while True:
            result = await conn.execute(_PRUNE_BATCH, older_than, status, batch)
            count = int(result.split()[-1])
            removed += count
            if count < batch:
                return removed
            logger.info("Pruned %d rows so far", removed)
    except asyncpg.PostgresError as error:
        raise DatabaseError(f"prune failed: {error}") from error
    finally:
        await conn.close()
