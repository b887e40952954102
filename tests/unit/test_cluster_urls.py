"""Cluster-aware settings and connects: several AMQP node URLs, multi-host Postgres URLs, masking."""

from __future__ import annotations

import pytest

from shared.broker.nodes import first_that_answers
from shared.errors import (
    BrokerError,
    BrokerRefusedError,
    BrokerUnavailableError,
    PublishTimeoutError,
    SettingsError,
)
from shared.settings import (
    ConsumerSettings,
    ProducerSettings,
    amqp_node_urls,
    database_hosts,
    load_settings,
    mask_url,
)
from shared.topology import vhost_of

NODES = "amqp://fleet:s3cret@a:5672/prod,amqp://fleet:s3cret@b:5673/prod"
STANDBY_URL = "postgresql://fleet:pw@db1:5432,db2:5433/detfleet?target_session_attrs=read-write"


def test_an_amqp_setting_lists_its_nodes_in_order() -> None:
    assert amqp_node_urls(" amqp://a/ , amqp://b/,") == ["amqp://a/", "amqp://b/"]
    assert amqp_node_urls("amqp://a/") == ["amqp://a/"]


def test_several_node_urls_are_accepted_and_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETFLEET_AMQP_URL", NODES)
    settings = load_settings(ProducerSettings)
    assert settings.masked()["amqp_url"] == "amqp://fleet:****@a:5672/prod,amqp://fleet:****@b:5673/prod"
    assert vhost_of(settings.amqp_url) == "prod"


def test_node_urls_must_share_one_vhost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETFLEET_AMQP_URL", "amqp://a:5672/one,amqp://b:5672/two")
    with pytest.raises(SettingsError, match="DETFLEET_AMQP_URL: every node URL must name the same vhost"):
        load_settings(ProducerSettings)


def test_every_node_url_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETFLEET_AMQP_URL", "amqp://a:5672/,http://b:5672/")
    with pytest.raises(SettingsError, match="DETFLEET_AMQP_URL: expected a URL like amqp://"):
        load_settings(ProducerSettings)


def test_a_multi_host_database_url_is_accepted_and_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETFLEET_DATABASE_URL", STANDBY_URL)
    settings = load_settings(ConsumerSettings)
    assert database_hosts(settings.database_url) == ["db1:5432", "db2:5433"]
    assert settings.masked()["database_url"] == STANDBY_URL.replace(":pw@", ":****@")


def test_several_database_hosts_need_a_read_write_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETFLEET_DATABASE_URL", "postgresql://fleet:pw@db1:5432,db2:5433/detfleet")
    with pytest.raises(SettingsError) as caught:
        load_settings(ConsumerSettings)
    assert "target_session_attrs=read-write" in str(caught.value)
    assert "pw" not in str(caught.value)


def test_mask_url_still_masks_one_url() -> None:
    assert mask_url("amqp://u:p@h:5672/v") == "amqp://u:****@h:5672/v"
    assert mask_url("postgresql://postgres@db:5432/detfleet") == "postgresql://postgres@db:5432/detfleet"


async def test_the_first_node_that_answers_wins() -> None:
    tried: list[str] = []

    async def connect(url: str) -> str:
        tried.append(url)
        if url.startswith("amqp://a"):
            raise BrokerUnavailableError(f"{url}: unreachable")
        return url

    assert await first_that_answers("amqp://a/,amqp://b/,amqp://c/", connect) == "amqp://b/"
    assert tried == ["amqp://a/", "amqp://b/"]


async def test_no_node_answering_names_them_all() -> None:
    async def connect(url: str) -> str:
        raise BrokerUnavailableError(f"{url}: unreachable")

    with pytest.raises(BrokerUnavailableError, match="no node of 2 answers: amqp://a/: .*amqp://b/"):
        await first_that_answers("amqp://a/,amqp://b/", connect)


async def test_a_refusal_stops_the_walk() -> None:
    tried: list[str] = []

    async def connect(url: str) -> str:
        tried.append(url)
        raise BrokerRefusedError(f"{url}: login refused")

    with pytest.raises(BrokerRefusedError):
        await first_that_answers("amqp://a/,amqp://b/", connect)
    assert tried == ["amqp://a/"]


async def test_one_node_keeps_its_own_error() -> None:
    async def connect(url: str) -> str:
        raise BrokerUnavailableError("amqp://a/: unreachable (refused)")

    with pytest.raises(BrokerUnavailableError, match=r"^amqp://a/: unreachable \(refused\)$"):
        await first_that_answers("amqp://a/", connect)


async def test_a_node_that_fails_part_way_is_passed_over() -> None:
    async def connect(url: str) -> str:
        if url.startswith("amqp://a"):
            raise PublishTimeoutError(f"{url}: no answer from the broker in time")
        return url

    assert await first_that_answers("amqp://a/,amqp://b/", connect) == "amqp://b/"


async def test_when_every_node_fails_a_cause_other_than_unavailability_is_kept() -> None:
    async def connect(url: str) -> str:
        if url.startswith("amqp://a"):
            raise BrokerUnavailableError(f"{url}: unreachable")
        raise BrokerError(f"{url}: exchange 'detfleet.frames' not found")

    with pytest.raises(BrokerError, match="not found") as caught:
        await first_that_answers("amqp://a/,amqp://b/", connect)
    assert not isinstance(caught.value, BrokerUnavailableError)
