"""The HTTP gateway's tokens, scopes and rate limits, and its command's one-line failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detfleet.cli import main
from producer.http.auth import (
    Authenticator,
    Identity,
    RateLimiter,
    hash_token,
    read_tokens_file,
    retry_after_header,
)
from shared.errors import SettingsError
from shared.settings import GatewayToken


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_known_token_is_its_identity_and_an_unknown_one_nobody() -> None:
    auth = Authenticator([GatewayToken(name="cam", sha256=hash_token("secret"), publish=("line-1/*",))])
    identity = auth.identify("secret")
    assert identity == Identity("cam", ("line-1/*",), False)
    assert auth.identify("other") is None
    assert auth.identify(None) is None


def test_publish_scopes_are_site_camera_globs() -> None:
    identity = Identity("cam", ("line-1/cam-*", "line-2/cam-9"), False)
    assert identity.may_publish("line-1", "cam-3")
    assert identity.may_publish("line-2", "cam-9")
    assert not identity.may_publish("line-2", "cam-3")
    assert not identity.may_publish("line-10", "cam-3")


def test_without_tokens_the_gateway_refuses_to_start_unless_auth_is_disabled_on_purpose() -> None:
    with pytest.raises(SettingsError, match="no bearer tokens"):
        Authenticator([])
    assert Authenticator([], disabled=True).identify(None) is not None


def test_the_bucket_allows_the_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0  # buckets are per identity
    clock.now += 0.5
    assert limiter.take("a") == 0.0
    assert retry_after_header(0.2) == "1"
    assert retry_after_header(2.1) == "3"


def test_a_tokens_file_is_read_and_a_bad_one_named(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"name": "a", "sha256": hash_token("x"), "read": True}]}))
    assert read_tokens_file(path)[0].read is True
    path.write_text(json.dumps([{"name": "a", "sha256": "not-hex"}]))
    with pytest.raises(SettingsError, match=r"DETFLEET_GATEWAY_TOKENS_FILE: .*token 0.sha256"):
        read_tokens_file(path)


def test_hash_token_prints_an_entry_for_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gateway", "hash-token", "--name", "cam-3", "--token", "abc", "--publish", "line-1/*"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry == {"name": "cam-3", "sha256": hash_token("abc"), "publish": ["line-1/*"], "read": False}
    GatewayToken.model_validate(entry)


def test_hash_token_makes_a_token_when_given_none(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gateway", "hash-token", "--name", "dashboard", "--read"]) == 0
    captured = capsys.readouterr()
    token = captured.err.strip().rsplit(" ", 1)[1]
    assert json.loads(captured.out)["sha256"] == hash_token(token)
    assert len(token) >= 40


def test_the_gateway_without_tokens_stops_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DETFLEET_GATEWAY_TOKENS", raising=False)
    monkeypatch.delenv("DETFLEET_GATEWAY_TOKENS_FILE", raising=False)
    assert main(["gateway", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no bearer tokens configured" in err
