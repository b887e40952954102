"""``detfleet produce`` argument handling and errors that need no broker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from detfleet.cli import main
from producer.cli import Pacer, build_parser


def test_an_unreadable_source_exits_2_with_one_line_of_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"

    code = main(["produce", "--source", str(missing), "--site", "s1", "--camera", "c1"])

    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"detfleet produce: error: {missing}: no such file or folder"


def test_a_site_that_would_break_routing_exits_2_before_anything_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["produce", "--source", str(tmp_path), "--site", "site.a", "--camera", "c1"])

    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "site must match" in err
    assert len(err.splitlines()) == 1


def test_options_parse_with_the_documented_defaults() -> None:
    args = build_parser().parse_args(["--source", "x", "--site", "s", "--camera", "c"])

    assert (args.lane, args.fps, args.limit, args.loop, args.json, args.metrics_port) == (
        None,
        None,
        None,
        False,
        False,
        None,
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--source", "x", "--site", "s", "--camera", "c", "--fps", "0"])


async def test_the_pacer_holds_a_loop_to_its_frame_rate() -> None:
    pacer = Pacer(fps=200)
    started = time.monotonic()
    for _ in range(11):
        await pacer.wait()

    # Ten intervals of 5 ms at least; the upper bound only catches a pacer that waits far too long.
    assert 0.045 <= time.monotonic() - started < 2.0
