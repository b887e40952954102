"""The README's configuration table lists every setting a process reads."""

from __future__ import annotations

from pathlib import Path

from shared.settings import known_variables

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_readme() -> None:
    text = README.read_text()
    missing = sorted(name for name in known_variables() if f"`{name}`" not in text)
    assert missing == []


def test_the_readme_shows_the_two_commands_at_the_top() -> None:
    head = README.read_text()[:1500]
    assert "make demo" in head
    assert "make test" in head
