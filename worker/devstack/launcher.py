"""`worker dev`: the whole product on one machine, streaming demo answers you can watch.

Starts a real redis-server, the local Ably (Sockudo) and the local OpenAI-compatible
server on free ports, runs a worker against them, enqueues a few prompts and renders the
answers live. It also serves the demo chat page (`worker.devstack.demo_server`, printed as
`DEMO_URL=`; `DEMO_PORT` fixes its port), where the demo answers show as the demo user's
first conversation. With `OPENAI_API_KEY` set and no `OPENAI_BASE_URL`, the answers come
from OpenAI itself. Ctrl-C drains the worker and stops everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from worker.app import make_queue, serve
from worker.devstack.ably import LocalAbly
from worker.devstack.demo_server import DEFAULT_USER, DemoServer
from worker.devstack.openai_local import MODEL_SLOW, OpenAILocalServer
from worker.devstack.redis_server import LocalRedis
from worker.jobs import Job
from worker.logs import configure_logging, get_logger
from worker.settings import Settings, load_settings
from worker.watch import watch_channel

DEMO_PROMPTS = [
    "Explain in a few sentences why streaming answers token by token feels faster.",
    "Write a short note on what happens to a stream when a worker restarts.",
    "Describe a café in Kyōto at dawn, with a line of 日本語 and an emoji or two.",
    "Summarise why a queue should acknowledge a job only after its answer is closed.",
    "List three things an operator reads first in a worker's logs.",
]

log = get_logger("worker.dev")


async def run_dev(
    prompts: int = 3, channel: str = "demo:conversation", exit_when_done: bool = False
) -> None:
    use_openai = bool(os.environ.get("OPENAI_API_KEY")) and not os.environ.get("OPENAI_BASE_URL")
    async with contextlib.AsyncExitStack() as stack:
        redis = await stack.enter_async_context(LocalRedis())
        ably = await stack.enter_async_context(LocalAbly())
        if use_openai:
            openai = {"openai_api_key": os.environ["OPENAI_API_KEY"], "openai_base_url": None}
        else:
            local = await stack.enter_async_context(OpenAILocalServer())
            openai = {"openai_api_key": local.api_key, "openai_base_url": local.base_url,
                      "openai_model": MODEL_SLOW}  # fmt: skip
        settings = load_settings(
            Settings, redis_url=redis.url, ably_api_key=ably.key, ably_endpoint=ably.endpoint,
            worker_id="dev-worker", log_format="console", **openai,
        )  # fmt: skip
        configure_logging(settings.log_format, settings.log_level)
        # The page's conversations are served because each starts with an enqueue, which
        # opens its session on the worker (no LISTEN_CHANNELS needed).
        demo = DemoServer(settings, port=int(os.environ.get("DEMO_PORT") or 0))
        await stack.enter_async_context(demo)
        await demo.add_conversation(DEFAULT_USER, channel, "Demo: answers enqueued by worker dev")
        _print_banner(settings, channel, demo.url)
        stop = asyncio.Event()
        worker = asyncio.create_task(serve(settings, stop))
        job_ids = await _enqueue_demo(settings, channel, prompts)
        done = (
            asyncio.create_task(_stop_when_done(settings, job_ids, stop))
            if exit_when_done
            else None
        )
        try:
            await watch_channel(settings, channel, rewind=0, until=stop)
        finally:
            stop.set()
            await worker
            if done is not None:
                done.cancel()


async def _enqueue_demo(settings: Settings, channel: str, count: int) -> list[str]:
    queue = make_queue(settings)
    try:
        await queue.ensure_group()
        jobs = [
            Job(
                channel=channel,
                input=DEMO_PROMPTS[i % len(DEMO_PROMPTS)],
                metadata={"demo": str(i + 1)},
                user_client_id=DEFAULT_USER,  # the page's demo user may stop them
            )
            for i in range(count)
        ]
        for job in jobs:
            await queue.enqueue(job)
        return [job.id for job in jobs]
    finally:
        await queue.redis.aclose()


async def _stop_when_done(settings: Settings, job_ids: list[str], stop: asyncio.Event) -> None:
    queue = make_queue(settings)
    finished = {"completed", "dead", "cancelled"}
    try:
        while not stop.is_set():
            states = [(await queue.status(j) or {}).get("state") for j in job_ids]
            if all(s in finished for s in states):
                log.info("dev.demo_finished", jobs=len(job_ids), states=states)
                stop.set()
            await asyncio.sleep(0.2)
    finally:
        await queue.redis.aclose()


def _print_banner(settings: Settings, channel: str, demo_url: str) -> None:
    key = settings.ably_api_key.get_secret_value()  # the local dev key, not a real one
    print(
        "local stack up. The chat page (open it in a browser):\n"
        f"DEMO_URL={demo_url}\n"
        "In another terminal, with these variables:\n"
        f"  export REDIS_URL={settings.redis_url} ABLY_ENDPOINT={settings.ably_endpoint} "
        f"ABLY_API_KEY={key}\n"
        f'  uv run worker enqueue --channel {channel} "your prompt"   # more answers\n'
        f"  uv run worker watch {channel}   # another viewer\n"
        "  uv run worker status   # queue figures\n"
        "Ctrl-C drains the worker and stops everything.\n",
        flush=True,
    )
