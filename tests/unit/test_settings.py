"""Settings: defaults, one-line errors naming the variable, unknown variables, masked passwords."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import SettingsError
from shared.settings import (
    AdminSettings,
    ConsumerSettings,
    ProducerSettings,
    known_variables,
    load_settings,
    mask_url,
)


def test_defaults_point_at_the_local_services() -> None:
    settings = load_settings(AdminSettings)
    assert settings.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/detfleet"
    assert settings.management_url == "http://guest:guest@127.0.0.1:15672/"
    assert settings.retry_delays_ms == (1_000, 10_000, 60_000)


def test_an_invalid_value_names_the_variable_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETFLEET_MAX_BATCH", "lots")
    with pytest.raises(SettingsError) as caught:
        load_settings(ConsumerSettings)
    message = str(caught.value)
    assert message.startswith("DETFLEET_MAX_BATCH: ")
    assert "lots" in message
    assert "\n" not in message


def test_a_url_of_the_wrong_kind_is_refused_with_its_password_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETFLEET_AMQP_URL", "http://user:hunter2@broker:5672/")
    with pytest.raises(SettingsError, match="^DETFLEET_AMQP_URL: ") as caught:
        load_settings(ProducerSettings)
    assert "hunter2" not in str(caught.value)


def test_an_unknown_variable_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETFLEET_MAX_BACTH", "8")
    with pytest.raises(SettingsError, match="^DETFLEET_MAX_BACTH: unknown setting"):
        load_settings(ProducerSettings)


def test_a_variable_of_another_process_is_not_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    # One .env may serve the whole fleet: the producer tolerates the consumer's variables.
    monkeypatch.setenv("DETFLEET_MAX_BATCH", "8")
    assert load_settings(ProducerSettings).lane == "bulk"


def test_dotenv_is_read_and_scanned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("DETFLEET_MAX_BATCH=32\n")
    assert load_settings(ConsumerSettings).max_batch == 32
    (tmp_path / ".env").write_text("DETFLEET_MAX_BATCH=32\nDETFLEET_TYPO=1\n")
    with pytest.raises(SettingsError, match="^DETFLEET_TYPO: unknown setting"):
        load_settings(ConsumerSettings)


def test_passwords_are_masked_in_repr_and_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETFLEET_AMQP_URL", "amqp://fleet:s3cret@rabbit:5672/prod")
    monkeypatch.setenv("DETFLEET_OPS_PASSWORD", "0psS3cret")
    settings = load_settings(AdminSettings)
    assert settings.amqp_url == "amqp://fleet:s3cret@rabbit:5672/prod"
    for shown in (repr(settings), str(settings.masked())):
        assert "s3cret" not in shown
        assert "0psS3cret" not in shown
    assert settings.masked()["amqp_url"] == "amqp://fleet:****@rabbit:5672/prod"


def test_mask_url_leaves_urls_without_password_alone() -> None:
    assert mask_url("postgresql://postgres@db:5432/detfleet") == "postgresql://postgres@db:5432/detfleet"


def test_retry_delays_must_increase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETFLEET_RETRY_DELAYS_MS", "[10000, 1000]")
    with pytest.raises(SettingsError, match="^DETFLEET_RETRY_DELAYS_MS: retry delays must be"):
        load_settings(AdminSettings)


def test_bulk_prefetch_covers_the_batches_in_flight() -> None:
    settings = ConsumerSettings(max_batch=16, batches_in_flight=2)
    assert settings.bulk_prefetch == 16 * 3
    assert ConsumerSettings(prefetch=7).bulk_prefetch == 7


def test_bootstrap_passwords_come_from_variables_or_secret_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "detfleet-consumer").write_text("from-file\n")
    monkeypatch.setenv("DETFLEET_PRODUCER_PASSWORD", "from-env")
    monkeypatch.setenv("DETFLEET_SECRETS_DIR", str(tmp_path))
    settings = load_settings(AdminSettings)
    assert settings.password_for("detfleet-producer") == "from-env"
    assert settings.password_for("detfleet-consumer") == "from-file"
    assert settings.password_for("detfleet-ops") is None


def test_every_field_is_a_known_variable() -> None:
    assert {
        "DETFLEET_AMQP_URL",
        "DETFLEET_MAX_BATCH",
        "DETFLEET_LANE",
        "DETFLEET_QUEUE_TYPE",
    } <= known_variables()
