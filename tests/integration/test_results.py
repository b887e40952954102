"""``detfleet results``: rows read back with filters, live events with --follow, and its usage errors.

Real broker and Postgres, each test its own vhost and database; the command runs as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from datetime import timedelta
from typing import Any

import pytest

from consumer.detector.fake import FakeDetector
from detfleet import cli
from detfleet.results import RowFilters, read_rows
from shared.broker.aio import Broker
from shared.events import ResultEvent
from shared.settings import AdminSettings
from shared.topology import EXCHANGE_RESULTS
from tests.integration.consumer_support import consumer_settings, jpeg, make_task, publish, run_until_idle
from tests.integration.results_support import (
    BOUND_S,
    cli_env,
    collect,
    insert_rows,
    make_event,
    publish_events,
    run_cli,
    start_cli,
    wait_until_subscribed,
)


async def test_follow_bound_to_failures_prints_only_failures_and_ctrl_c_exits_0(
    broker: Broker, topology_settings: AdminSettings
) -> None:
    # Everything routes somewhere (publishes are mandatory): a catch-all subscriber sees every event.
    everything, catch_all = await collect(broker, EXCHANGE_RESULTS, ["#"])
    process = await start_cli(cli_env(topology_settings.amqp_url), "--follow", "--status", "failed", "--json")
    try:
        await wait_until_subscribed(process)
        events = [
            make_event("ok", camera="cam-1"),
            make_event("failed", camera="cam-1"),
            make_event("shed", camera="cam-2", site="line-2"),
            make_event("failed", camera="cam-2", site="line-2"),
            make_event("ok", camera="cam-3"),
            make_event("failed", camera="cam-3", reason="inference failed: CUDA out of memory"),
        ]
        await publish_events(broker, events)
        failed = [e for e in events if e.status == "failed"]
        assert process.stdout is not None
        # One queue keeps publish order: once the last failure is printed, nothing else can be on its way.
        lines = [await asyncio.wait_for(process.stdout.readline(), BOUND_S) for _ in failed]
        process.send_signal(signal.SIGINT)
        rest, err = await asyncio.wait_for(process.communicate(), BOUND_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    assert (rest, err) == (b"", b"")  # Ctrl-C is quiet
    assert [ResultEvent.from_json(line) for line in lines] == failed
    assert len(await everything.wait_for(len(events))) == len(events)
    await catch_all.close()


async def test_follow_without_json_prints_a_line_per_event_and_limit_ends_it(
    broker: Broker, topology_settings: AdminSettings
) -> None:
    everything, catch_all = await collect(broker, EXCHANGE_RESULTS, ["#"])
    process = await start_cli(
        cli_env(topology_settings.amqp_url),
        "--follow",
        "--camera",
        "cam-7",
        "--site",
        "line-1",
        "--limit",
        "2",
    )
    try:
        await wait_until_subscribed(process)
        events = [
            make_event("ok", camera="cam-6"),
            make_event("ok", camera="cam-7"),
            make_event("failed", camera="cam-7"),
        ]
        await publish_events(broker, events)
        out, _ = await asyncio.wait_for(process.communicate(), BOUND_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    header, *lines = out.decode().splitlines()
    assert header.split("  ")[:3] == ["completed at", "status", "site"]
    assert len(lines) == 2
    assert str(events[1].task_id) in lines[0]
    assert "line-1/cam-7" in lines[0]
    assert "1 scratch" in lines[0]
    assert str(events[2].task_id) in lines[1]
    assert "reason: failed: a reason" in lines[1]
    await everything.wait_for(3)
    await catch_all.close()


async def test_rows_read_back_as_a_table_and_as_event_json_with_filters(
    topology_settings: AdminSettings, results_db: str
) -> None:
    events = [
        make_event("ok", camera="cam-1", age=timedelta(minutes=5)),
        make_event("failed", camera="cam-1", age=timedelta(minutes=4)),
        make_event("ok", camera="cam-2", site="line-2", age=timedelta(minutes=3)),
        make_event("shed", camera="cam-2", site="line-2", age=timedelta(minutes=2), detections=None),
        make_event("failed", camera="cam-1", age=timedelta(hours=3)),
        make_event("ok", camera="cam-1", age=timedelta(minutes=1), detections=[]),
    ]
    await insert_rows(results_db, events)
    env = cli_env(topology_settings.amqp_url, results_db)

    async def ids(**filters: Any) -> list[uuid.UUID]:
        return [e.task_id for e in await read_rows(results_db, RowFilters(**filters))]

    # The filters, through the command's own query (in-process: eight commands would cost seconds each).
    newest_first = sorted(events, key=lambda e: e.completed_at, reverse=True)
    assert await ids() == [e.task_id for e in newest_first]
    assert await ids(status="failed") == [events[1].task_id, events[4].task_id]
    assert await ids(camera="cam-1", since=timedelta(hours=1)) == [
        events[5].task_id,
        events[1].task_id,
        events[0].task_id,
    ]
    assert await ids(site="line-2", status="shed") == [events[3].task_id]
    assert await ids(limit=2) == [events[5].task_id, events[3].task_id]
    assert await ids(camera="cam-9") == []
    assert await read_rows(results_db, RowFilters()) == newest_first  # every field comes back

    code, out, err = await run_cli(env, "--json", "--status", "ok", "--site", "line-2")
    assert (code, err) == (0, "")
    assert [ResultEvent.from_json(line.encode()) for line in out.splitlines()] == [
        events[2]  # the whole event, every field
    ]
    first = json.loads(out.splitlines()[0])
    assert first["version"] == 1
    assert first["detections"][0]["label"] == "scratch"

    wide = env | {"COLUMNS": "250"}  # rich folds a table to 80 columns where stdout is no terminal
    code, out, err = await run_cli(wide, "--camera", "cam-1", "--limit", "10")
    assert (code, err) == (0, "")
    assert "results: 4 shown" in out
    for event in (events[0], events[1], events[4], events[5]):
        assert str(event.task_id) in out
    assert "line-2" not in out


USAGE_ERRORS = [
    ("--status", "lost"),
    ("--limit", "0"),
    ("--since", "3 parsecs"),
    ("--camera", "cam.1"),
    ("--site", "*"),
    ("--follow", "--since", "1h"),
    ("--frobnicate",),
    ("forward",),
    ("forward", "--webhook", "ftp://example.invalid/hook"),
    ("forward", "--webhook", "http://127.0.0.1:9/hook", "--name", "a.b"),
    ("forward", "--webhook", "http://127.0.0.1:9/hook"),  # no secret
    ("forward", "--webhook", "http://127.0.0.1:9/hook", "--secret-env", "NO_SUCH_VARIABLE_SET"),
]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=" ".join)
def test_bad_arguments_exit_2_with_an_error_line(
    args: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = cli.main(["results", *args])
    except SystemExit as stop:  # argparse's own usage errors
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert "error:" in err.strip().splitlines()[-1]


async def test_the_exit_codes_are_those_of_the_real_command(topology_settings: AdminSettings) -> None:
    """As a process: a usage error exits 2, an unreachable broker or database 1, each with one line."""
    runs = [
        (cli_env(topology_settings.amqp_url), ("--status", "lost"), 2),
        (cli_env("amqp://guest:guest@127.0.0.1:1/"), ("--follow",), 1),
        (cli_env(topology_settings.amqp_url, "postgresql://postgres@127.0.0.1:1/nowhere"), (), 1),
    ]
    results = await asyncio.gather(*(run_cli(env, *args) for env, args, _ in runs))
    for (_, args, expected), (code, out, err) in zip(runs, results, strict=True):
        assert code == expected, (args, err)
        assert out == ""
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("detfleet results: error:")
    for code, _, err in results:
        if code == 1:
            assert len(err.strip().splitlines()) == 1


async def test_follow_prints_the_events_of_frames_a_real_consumer_settles_as_their_rows_commit(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    """End to end: frames through an in-process consumer; ``--follow`` prints each committed row's event,
    and ``detfleet results --json`` reads the same events back from the rows."""
    good = [make_task(camera=f"cam-{i % 2}") for i in range(6)]
    bad = [make_task(camera="cam-9") for _ in range(2)]
    env = cli_env(topology_settings.amqp_url, results_db)
    process = await start_cli(env, "--follow", "--json")
    try:
        await wait_until_subscribed(process)
        for n, task in enumerate(good):
            await publish(broker, task, jpeg(n))
        for task in bad:
            await publish(broker, task, b"this is not an image")
        await run_until_idle(consumer_settings(topology_settings, results_db), FakeDetector())
        wanted = {t.task_id for t in good + bad}
        printed: dict[uuid.UUID, ResultEvent] = {}
        assert process.stdout is not None
        while set(printed) != wanted:  # at least once: a repeat of a task is absorbed by its id
            event = ResultEvent.from_json(await asyncio.wait_for(process.stdout.readline(), BOUND_S))
            printed[event.task_id] = event
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.communicate(), BOUND_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    assert {e.task_id for e in printed.values() if e.status == "ok"} == {t.task_id for t in good}
    assert {e.task_id for e in printed.values() if e.status == "failed"} == {t.task_id for t in bad}
    assert all(printed[t.task_id].camera_id == t.camera_id for t in good + bad)
    code, out, err = await run_cli(env, "--json", "--limit", "100")
    assert (code, err) == (0, "")
    stored = {e.task_id: e for e in map(ResultEvent.from_json, out.encode().splitlines())}
    assert stored == printed  # the live event is the committed row
