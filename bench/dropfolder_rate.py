"""Confirmed frames per second: the drop-folder gateway (``--watch``) against the plain folder source.

Both publish the same distinct ~50 KB JPEG files to the bulk lane of a throw-away vhost in the same run;
rounds alternate and the queue is purged between runs. The plain folder reads the files and leaves them;
the drop folder also waits for each confirm and then moves the file to a done folder (and back, between
rounds). Prints one JSON object with the medians and their ratio.

    .venv/bin/python -m bench.dropfolder_rate --frames 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from bench.publish_rate import make_frames, purge
from bench.publishing import CAMERA, SITE
from shared import admin
from shared.management import Management
from shared.settings import DEFAULT_AMQP_URL, DEFAULT_MANAGEMENT_URL, AdminSettings


def produce(amqp_url: str, folder: Path, frames: int, *extra: str) -> float:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")},
        "DETFLEET_AMQP_URL": amqp_url,
        "DETFLEET_LOG_LEVEL": "WARNING",
    }
    argv = [sys.executable, "-m", "detfleet", "produce", "--source", str(folder), "--site", SITE]
    argv += ["--camera", CAMERA, "--lane", "bulk", "--deterministic-ids", "--json", *extra]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"detfleet produce failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if summary["confirmed"] != frames:
        raise SystemExit(f"detfleet produce confirmed {summary['confirmed']} of {frames}")
    return float(summary["frames_per_s"])


def restore(done: Path, folder: Path) -> None:
    for path in done.iterdir():
        shutil.move(path, folder / path.name)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    vhost = "detfleet-bench-" + uuid.uuid4().hex[:8]
    amqp_url = DEFAULT_AMQP_URL.rstrip("/") + "/" + vhost
    folder_rates, drop_rates = [], []
    async with Management(DEFAULT_MANAGEMENT_URL) as api:
        await api.create_vhost(vhost)
        await api.grant(vhost, "guest")
        try:
            await admin.apply_topology(AdminSettings(amqp_url=amqp_url))
            with tempfile.TemporaryDirectory() as root:
                folder, done = Path(root) / "drop", Path(root) / "done"
                folder.mkdir()
                bodies = make_frames(folder, args.frames, args.frame_bytes)
                watch = ["--watch", "--after", "move", "--done", str(done), "--limit", str(args.frames)]
                for _ in range(args.rounds):
                    folder_rates.append(await asyncio.to_thread(produce, amqp_url, folder, args.frames))
                    await purge(api, vhost)
                    drop_rates.append(await asyncio.to_thread(produce, amqp_url, folder, args.frames, *watch))
                    await purge(api, vhost)
                    restore(done, folder)
        finally:
            await api.delete_vhost(vhost)
    folder_rate, drop_rate = statistics.median(folder_rates), statistics.median(drop_rates)
    return {
        "frames": args.frames,
        "frame_bytes": round(statistics.mean(len(b) for b in bodies)),
        "rounds": args.rounds,
        "folder_per_s": round(folder_rate, 1),
        "drop_folder_per_s": round(drop_rate, 1),
        "ratio": round(drop_rate / folder_rate, 3),
        "folder_runs": [round(r, 1) for r in folder_rates],
        "drop_folder_runs": [round(r, 1) for r in drop_rates],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--frames", type=int, default=2000, help="distinct files per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--frame-bytes", type=int, default=50_000, help="approximate JPEG size")
    print(json.dumps(asyncio.run(bench(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
