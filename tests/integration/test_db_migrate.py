"""`detfleet db migrate`: creates the database, applies each migration once, refuses edited history."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shared import db
from shared.errors import DatabaseError


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE first_table (id int PRIMARY KEY);")
    (tmp_path / "0002_second.sql").write_text("ALTER TABLE first_table ADD COLUMN name text;")
    return tmp_path


@pytest.fixture
async def missing_database_url(database_url: str) -> str:
    """The URL of a database that does not exist yet (the fixture drops it after the test)."""
    await db.drop_database(database_url)
    return database_url


async def test_migrate_creates_the_database_and_applies_each_migration_once(
    missing_database_url: str, migrations: Path
) -> None:
    applied = await db.migrate(missing_database_url, migrations)
    assert [m.version for m in applied] == [1, 2]
    assert await db.migrate(missing_database_url, migrations) == []
    assert await db.applied_versions(missing_database_url) == [1, 2]

    conn = await db.connect(missing_database_url)
    try:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM information_schema.columns WHERE table_name='first_table'"
            )
            == 2
        )
    finally:
        await conn.close()


async def test_replicas_migrating_together_apply_each_migration_once(
    database_url: str, migrations: Path
) -> None:
    results = await asyncio.gather(*(db.migrate(database_url, migrations) for _ in range(4)))
    assert sorted(m.version for applied in results for m in applied) == [1, 2]


async def test_an_edited_migration_is_refused(database_url: str, migrations: Path) -> None:
    await db.migrate(database_url, migrations)
    (migrations / "0001_first.sql").write_text("CREATE TABLE first_table (id bigint PRIMARY KEY);")
    with pytest.raises(DatabaseError, match="0001_first changed after it was applied"):
        await db.migrate(database_url, migrations)


async def test_a_failing_migration_leaves_no_trace(database_url: str, migrations: Path) -> None:
    (migrations / "0003_broken.sql").write_text("ALTER TABLE no_such_table ADD COLUMN x int;")
    with pytest.raises(DatabaseError, match="no_such_table"):
        await db.migrate(database_url, migrations)
    assert await db.applied_versions(database_url) == [1, 2]


def test_badly_named_migrations_are_refused(tmp_path: Path) -> None:
    (tmp_path / "1_first.sql").write_text("SELECT 1;")
    with pytest.raises(DatabaseError, match="NNNN_lower_snake.sql"):
        db.discover(tmp_path)


async def test_an_unreachable_database_is_one_readable_error() -> None:
    with pytest.raises(DatabaseError, match=r"cannot connect to postgresql://postgres:\*\*\*\*@127.0.0.1:1/"):
        await db.migrate("postgresql://postgres:pw@127.0.0.1:1/x")
