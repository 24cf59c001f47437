"""`worker watch CHANNEL`: what a browser would render, in the terminal.

It subscribes with the real SDK (rewinding to show recent answers first) and keeps one
text per response, exactly as a front end should: create starts it, append adds the
fragment, update replaces it. In a terminal the answers redraw live; piped, each answer
prints as one line when it closes.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ably.types.channeloptions import ChannelOptions
from ably.types.message import MessageAction

from worker.settings import AblySettings
from worker.transport import contract
from worker.transport.client import quiet_sdk_logs, realtime_client

SHOWN = 6  # answers on screen at once


@dataclass
class Answer:
    response_id: str
    text: str = ""
    status: str = "streaming"
    model: str = ""


class Transcript:
    """Answers as the channel delivers them: message per response by message serial
    (create starts, append adds, update replaces), message per token by responseId
    (`start` resets, `token` adds, `stop` carries the whole text and the status)."""

    TOKEN_NAMES = (contract.TOKEN_START, contract.TOKEN, contract.TOKEN_STOP)

    def __init__(self, on_closed: Callable[[Answer], None] | None = None) -> None:
        self.answers: dict[str, Answer] = {}
        self.on_closed = on_closed

    def on_message(self, message: Any) -> None:
        if message.name == contract.RESPONSE and message.serial:
            answer = self.answers.setdefault(message.serial, Answer(response_id=message.serial))
            if message.action == MessageAction.MESSAGE_APPEND:
                answer.text += message.data or ""
            elif message.data is not None:
                answer.text = message.data
        elif message.name in self.TOKEN_NAMES:
            response_id = contract.header(message, "responseId")
            if not response_id:
                return
            answer = self.answers.setdefault(f"token:{response_id}", Answer(response_id))
            if message.name == contract.TOKEN_START:
                answer.text = ""
            elif message.name == contract.TOKEN:
                answer.text += message.data or ""
            elif message.data is not None:
                answer.text = message.data
        else:
            return
        headers = (message.extras or {}).get("headers") or {}
        answer.response_id = headers.get("responseId", answer.response_id)
        answer.model = headers.get("model", answer.model)
        was_open = answer.status == contract.Status.STREAMING
        answer.status = headers.get("status", answer.status)
        if was_open and answer.status != contract.Status.STREAMING and self.on_closed:
            self.on_closed(answer)


async def watch_channel(
    settings: AblySettings,
    channel_name: str,
    *,
    rewind: int = 10,
    until: asyncio.Event | None = None,
    connect_timeout_s: float = 15.0,
) -> None:
    """Render `channel_name` until `until` is set (or forever). A refused key or an
    endpoint that does not answer raises `StartupError` rather than waiting silently."""
    from worker.app import wait_connected  # the worker's own check: refused key, no answer

    quiet_sdk_logs()
    client = realtime_client(settings.ably_api_key.get_secret_value(), settings.ably_endpoint)
    live = sys.stdout.isatty()
    transcript = Transcript(on_closed=None if live else _print_closed)
    params = {"rewind": str(rewind)} if rewind > 0 else None
    channel = client.channels.get(channel_name, ChannelOptions(params=params))
    try:
        await wait_connected(client, connect_timeout_s)
        await channel.subscribe(transcript.on_message)
        if not live:  # stdout carries only answers; say on stderr that they will come
            print(f"watching {channel_name} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        if live:
            await _render_live(transcript, channel_name, until)
        else:
            await (until.wait() if until else asyncio.Event().wait())
    finally:
        await client.close()


def _print_closed(answer: Answer) -> None:
    print(f"[{answer.status}] {answer.response_id}: {answer.text}", flush=True)


async def _render_live(
    transcript: Transcript, channel_name: str, until: asyncio.Event | None
) -> None:
    from rich.console import Group
    from rich.live import Live
    from rich.panel import Panel

    colours = {"streaming": "cyan", "complete": "green", "cancelled": "yellow"}

    def view() -> Group:
        recent = list(transcript.answers.values())[-SHOWN:]
        if not recent:
            return Group(Panel(f"waiting for answers on {channel_name} ...", border_style="dim"))
        return Group(*[
            Panel(a.text or "…", title=f"{a.response_id} · {a.model}", subtitle=a.status,
                  border_style=colours.get(a.status, "red"))
            for a in recent
        ])  # fmt: skip

    with Live(view(), refresh_per_second=12) as screen:
        while until is None or not until.is_set():
            screen.update(view())
            await asyncio.sleep(1 / 12)
        screen.update(view())
