"""TLS settings: certificate files on the URLs are checked at start-up and reach both broker clients."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.broker.tls import tls_context, tls_files, without_tls_query
from shared.errors import BrokerError, SettingsError
from shared.settings import AdminSettings, ConsumerSettings, load_settings


def test_a_missing_ca_file_on_the_amqp_url_stops_start_up_naming_it(tmp_path: Path) -> None:
    url = f"amqps://u:secret@broker:5671/?cafile={tmp_path / 'nope.crt'}"
    with pytest.raises(SettingsError) as raised:
        load_settings(AdminSettings, amqp_url=url)
    message = str(raised.value)
    assert message.startswith("DETFLEET_AMQP_URL: cafile ")
    assert "nope.crt is not a readable file" in message
    assert "secret" not in message


def test_a_missing_client_key_on_the_database_url_stops_start_up_naming_it(tmp_path: Path) -> None:
    url = f"postgresql://u:secret@db/detfleet?sslmode=verify-full&sslkey={tmp_path / 'client.key'}"
    with pytest.raises(SettingsError, match=r"^DETFLEET_DATABASE_URL: sslkey .*client.key is not a readable"):
        load_settings(ConsumerSettings, database_url=url)


def test_present_certificate_files_are_accepted(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("not parsed at start-up")
    settings = AdminSettings(
        amqp_url=f"amqps://u:p@broker/?cafile={ca}",
        database_url=f"postgresql://u@db/detfleet?sslmode=verify-full&sslrootcert={ca}",
    )
    assert tls_files(settings.amqp_url) == {"cafile": str(ca)}


def test_pika_gets_the_url_without_the_certificate_parameters_and_keeps_the_rest() -> None:
    url = "amqps://u:p@broker:5671/fleet?cafile=/c/ca.crt&heartbeat=30&certfile=/c/a.crt&keyfile=/c/a.key"
    assert without_tls_query(url) == "amqps://u:p@broker:5671/fleet?heartbeat=30"


def test_plain_amqp_has_no_tls_context() -> None:
    assert tls_context("amqp://u:p@broker/?cafile=/ignored") is None


def test_an_amqps_context_verifies_the_broker_and_its_name() -> None:
    context = tls_context("amqps://u:p@broker/")
    assert context is not None
    assert context.check_hostname


def test_an_unreadable_certificate_is_a_broker_error_naming_the_masked_url(tmp_path: Path) -> None:
    bad = tmp_path / "ca.crt"
    bad.write_text("not a certificate")
    with pytest.raises(BrokerError, match=r"amqps://u:\*\*\*\*@broker/.*TLS certificate files unusable"):
        tls_context(f"amqps://u:secret@broker/?cafile={bad}")
