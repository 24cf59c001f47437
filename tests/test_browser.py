"""The demo page (web/) in a real browser: headless Chromium driven by Playwright.

Debian's `chromium` (on PATH; `scripts/setup.sh` installs it with apt-get) is launched by
Playwright for Python through `executable_path`: no browser is downloaded, ever. The page
runs against the demo server (`worker.devstack.demo_server`, in this process) and a real
worker, the local Ably (Sockudo, as `worker dev` runs it: open to the page's origin), a
real redis-server and the local OpenAI server paced at 30 tokens/s, so an answer streams
for about four seconds: long enough to reload or stop it in the middle.

Each test waits for what the page shows (Playwright's `expect`), never for a fixed time.
`test_send...` also takes a picture of the page mid-stream; with `UPDATE_SCREENSHOT=1` (or
when it is missing) it becomes docs/screenshot.png, the README's picture, so an ordinary
run leaves the work tree as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jwt
import pytest
from playwright.async_api import async_playwright, expect

from tests.worker_harness import Stack, running_worker
from worker.devstack.demo_server import ABLY_BUNDLE, WEB_DIR, DemoServer
from worker.devstack.openai_local import OpenAILocalServer, answer_text
from worker.settings import Settings
from worker.transport.client import rest_client

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "screenshot.png"
USER = "alice"
ANSWER_MS = 15_000  # longest wait for one answer to finish (they take about 4 s)
SHOWN_MS = 10_000  # longest wait for anything else to show (Playwright counts in ms)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "chromium is not on PATH: the browser tests need Debian's chromium "
            "(scripts/setup.sh installs it: apt-get install chromium)",
            pytrace=False,
        )
    return path


def _ably_bundle() -> None:
    """web/node_modules (ably-js's browser bundle), installed from the lock file if missing."""
    if ABLY_BUNDLE.exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is not on PATH: it installs ably-js for the demo page", pytrace=False)
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"], cwd=WEB_DIR, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"npm ci in {WEB_DIR} failed:\n{done.stdout}\n{done.stderr}", pytrace=False)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    _ably_bundle()
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=_chromium(), headless=True)
        yield chromium
        await chromium.close()


@pytest.fixture(scope="module")
async def paced_openai() -> AsyncIterator[OpenAILocalServer]:
    """Answers of about 120 tokens at 30 tokens/s: about four seconds each."""
    async with OpenAILocalServer(tokens_per_second=30, first_token_ms=50) as server:
        yield server


@pytest.fixture
def settings(local_redis: Any, local_ably: Any, paced_openai: Any, queue_prefix: str) -> Settings:
    stack = Stack(local_redis, local_ably, paced_openai, queue_prefix)
    # A short session lease: the worker takes a new conversation's session within a second.
    return stack.settings(session_lease_seconds=3)


@pytest.fixture
async def demo(settings: Settings) -> AsyncIterator[DemoServer]:
    async with DemoServer(settings) as server:
        yield server


@pytest.fixture
async def page(browser: Any, demo: DemoServer) -> AsyncIterator[Any]:
    """A fresh page on the demo, signed in as alice; fails the test on a script error."""
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    await page.goto(f"{demo.url}?user={USER}")
    await expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=SHOWN_MS)
    yield page
    await context.close()
    assert not errors, "\n".join(errors)


async def _send(page: Any, prompt: str) -> None:
    await page.fill("#prompt", prompt)
    await page.click("#send")
    await expect(page.locator(".prompt .text", has_text=prompt)).to_have_count(1, timeout=SHOWN_MS)


async def _streaming_with_text(answer: Any, chars: int) -> str:
    """Wait until the answer streams and shows at least `chars` characters; its text then."""
    await expect(answer).to_have_attribute("data-status", "streaming", timeout=SHOWN_MS)
    await expect(answer.locator(".text")).to_have_text(re.compile(f"^.{{{chars},}}", re.S),
                                                       timeout=SHOWN_MS)  # fmt: skip
    return str(await answer.locator(".text").text_content())


async def _responses(settings: Settings, page: Any) -> list[Any]:
    """The `response` messages in the open conversation's channel history (REST)."""
    channel = parse_qs(urlsplit(page.url).query)["c"][0]
    rest = rest_client(settings.ably_api_key.get_secret_value(), settings.ably_endpoint)
    history = await rest.channels.get(channel).history()
    return [m for m in history.items if m.name == "response"]


def _screenshot_path(tmp_path: Path) -> Path:
    if os.environ.get("UPDATE_SCREENSHOT") == "1" or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(exist_ok=True)
        return SCREENSHOT
    return tmp_path / SCREENSHOT.name


async def test_send_shows_the_models_answer_complete_then_a_follow_up_on_the_channel(
    page: Any, settings: Settings, tmp_path: Path
) -> None:
    """The first prompt goes through the server (one enqueue), the follow-up on the channel
    as a `prompt` message; each answer ends as the model's exact text, status complete."""
    first = "Why do answers that stream token by token feel faster?"
    follow_up = "And what does a reader see when the worker restarts mid-answer?"
    async with running_worker(settings):
        await _send(page, first)
        answers = page.locator(".answer")
        await expect(answers.nth(0)).to_have_attribute("data-status", "complete", timeout=ANSWER_MS)
        await expect(answers.nth(0).locator(".text")).to_have_text(answer_text(first))
        await expect(answers.nth(0).locator(".status")).to_have_text("complete")

        await _send(page, follow_up)
        await _streaming_with_text(answers.nth(1), 120)
        await page.screenshot(path=str(_screenshot_path(tmp_path)))
        await expect(answers.nth(1)).to_have_attribute("data-status", "complete", timeout=ANSWER_MS)
        await expect(answers.nth(1).locator(".text")).to_have_text(answer_text(follow_up))
        # Each answer right after the prompt it answers.
        items = page.locator("#transcript > li")
        assert await items.evaluate_all("els => els.map(e => e.className)") == [
            "prompt", "answer", "prompt", "answer",
        ]  # fmt: skip


async def test_reload_mid_answer_shows_the_same_answer_which_goes_on_live(
    page: Any, settings: Settings
) -> None:
    """Reloading while an answer streams: the page hydrates it from the channel (history up
    to the attach point), it continues live with no gap and no repeat, and the channel
    still holds one message for it."""
    prompt = "Tell me how a late joiner catches up with a streaming answer."
    async with running_worker(settings):
        await _send(page, prompt)
        before = await _streaming_with_text(page.locator(".answer").first, 20)
        await page.reload()
        answer = page.locator(".answer").first
        await expect(page.locator("#transcript")).to_have_attribute("data-hydrated", "true",
                                                                    timeout=SHOWN_MS)  # fmt: skip
        # Hydrated mid-answer: still streaming, holding at least what was shown before.
        await expect(answer).to_have_attribute("data-status", "streaming")
        assert (await answer.locator(".text").text_content() or "").startswith(before)
        await expect(answer).to_have_attribute("data-status", "complete", timeout=ANSWER_MS)
        await expect(answer.locator(".text")).to_have_text(answer_text(prompt))
        await expect(page.locator(".prompt .text")).to_have_text([prompt])
        response_id = await answer.get_attribute("data-response-id")
    responses = await _responses(settings, page)
    assert [m.extras["headers"]["responseId"] for m in responses] == [response_id]


async def test_stop_cancels_the_answer_and_keeps_its_partial_text(
    page: Any, settings: Settings
) -> None:
    """Stop publishes `cancel` for the answer: it ends `cancelled`, its text so far kept;
    the agent's load (presence data) shows the answer in flight meanwhile."""
    prompt = "Write a long essay on queues, leases and fencing."
    full = answer_text(prompt)
    async with running_worker(settings):
        await _send(page, prompt)
        answer = page.locator(".answer").first
        await _streaming_with_text(answer, 15)
        await expect(page.locator(f'#agent-list li[data-agent-id="{settings.worker_id}"] .load'))\
            .to_have_text(re.compile(r"^1/16$"))  # fmt: skip
        await answer.locator("button.stop").click()
        await expect(answer).to_have_attribute("data-status", "cancelled", timeout=SHOWN_MS)
        await expect(answer.locator(".status")).to_have_text("cancelled")
        await expect(answer.locator("button.stop")).to_be_hidden()
        partial = await answer.locator(".text").text_content() or ""
        assert partial and full.startswith(partial) and len(partial) < len(full)
        responses = await _responses(settings, page)
        assert [m.data for m in responses] == [partial]  # the closing update's text
        assert responses[0].extras["headers"]["status"] == "cancelled"


async def test_agents_presence_leaves_when_the_worker_stops_and_returns_when_it_starts(
    page: Any, settings: Settings
) -> None:
    agent = page.locator(f'#agent-list li[data-agent-id="{settings.worker_id}"]')
    async with running_worker(settings):
        await expect(agent).to_have_count(1, timeout=SHOWN_MS)
        await expect(agent.locator(".load")).to_have_text("0/16")
    await expect(agent).to_have_count(0, timeout=SHOWN_MS)  # it left on drain
    await expect(page.locator("#agent-list .none")).to_have_text("none online")
    async with running_worker(settings):
        await expect(agent).to_have_count(1, timeout=SHOWN_MS)


async def test_auth_gives_the_user_their_conversations_and_agents_presence_read_only(
    demo: DemoServer, settings: Settings
) -> None:
    """The page's token (no browser needed): the user's own channels with the user
    operations, the agents channel with `subscribe` alone, nobody else's conversation."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{demo.url}conversations?user=bob", json={"prompt": "Hi"}) as r:
            assert r.status == 200, await r.text()
            bobs = (await r.json())["channel"]
        async with http.post(f"{demo.url}conversations?user={USER}", json={"prompt": " "}) as r:
            assert r.status == 400  # a conversation starts with a prompt
        async with http.get(f"{demo.url}auth?user={USER}") as r:
            assert r.content_type == "application/jwt"
            alice_empty = jwt.decode(await r.text(), options={"verify_signature": False})
        async with http.get(f"{demo.url}auth?user=bob") as r:
            claims = jwt.decode(await r.text(), options={"verify_signature": False})
    agents = settings.presence_channel
    assert alice_empty["x-ably-clientId"] == USER
    assert json.loads(alice_empty["x-ably-capability"]) == {agents: ["subscribe"]}
    assert claims["x-ably-clientId"] == "bob"
    assert json.loads(claims["x-ably-capability"]) == {
        bobs: ["history", "presence", "publish", "subscribe"],
        agents: ["subscribe"],
    }
