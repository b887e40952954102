"""The live page in headless Chromium (Debian's chromium, driven by Playwright with the system browser): it
connects, and a frame POSTed during the test appears in its camera's tile with its boxes drawn."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, async_playwright

from consumer.detector import DetectorConfig, load_detector
from shared.settings import AdminSettings, shipped_model_path
from tests.integration.consumer_support import consumer_settings, run_until_idle
from tests.integration.http_gateway_support import READER_TOKEN, bearer, gateway_settings, scene_jpeg, serving

PAGE_LIMIT_MS = 30_000  # bound against a hang
SITE, CAMERA = "site-a", "cam-7"


def system_chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is missing: run scripts/tools.sh (Debian's chromium package)"
    return found


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        launched = await playwright.chromium.launch(
            executable_path=system_chromium(), headless=True, args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.mark.timeout(120)
async def test_a_posted_frame_appears_in_its_tile_with_its_boxes(
    browser: Browser, topology_settings: AdminSettings, results_db: str, tmp_path: Path
) -> None:
    detector = load_detector(DetectorConfig(model_path=shipped_model_path(), device="cpu"))
    async with serving(gateway_settings(topology_settings.amqp_url, results_db)) as http:
        page = await browser.new_page(viewport={"width": 1000, "height": 700})
        await page.goto(f"{http.url}/#token={READER_TOKEN}")
        await page.wait_for_selector('body[data-live="1"]', timeout=PAGE_LIMIT_MS)

        async with (
            aiohttp.ClientSession() as client,
            client.post(
                f"{http.url}/v1/frames?site={SITE}&camera={CAMERA}",
                data=scene_jpeg(seed=21),
                headers={"Content-Type": "image/jpeg", **bearer()},
            ) as response,
        ):
            assert response.status == 202
            task_id = uuid.UUID((await response.json())["task_id"])
        # A real consumer writes the frame's row and publishes its result event, which the page receives.
        await run_until_idle(consumer_settings(topology_settings, results_db), detector)
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"{http.url}/v1/tasks/{task_id}", headers=bearer()) as response,
        ):
            detections = (await response.json())["detections"]
        assert detections

        tile = f'section[data-camera="{SITE}/{CAMERA}"][data-drawn-task="{task_id}"]'
        await page.wait_for_selector(tile, timeout=PAGE_LIMIT_MS)
        assert await page.get_attribute(tile, "data-boxes") == str(len(detections))
        first = detections[0]
        assert f"{first['label']} {round(first['score'] * 100)}%" in await page.inner_text(tile)
        drawn = await page.eval_on_selector(f"{tile} canvas", "c => [c.width, c.height]")
        assert drawn == [640, 480]
        await page.wait_for_function(
            "document.getElementById('fleet-consumers').textContent !== '-'", timeout=PAGE_LIMIT_MS
        )
        screenshot = tmp_path / "live-page.png"
        await page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 0
