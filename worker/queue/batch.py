"""Script calls made at the same moment, sent to Redis together in one pipeline.

Hundreds of answers starting or ending at once each make a fenced call (the response's
serial saved, the job completed), and a producer may gather hundreds of enqueues. One
`EVALSHA` each costs a round trip and about 0.1 ms of the event loop's time in redis-py
(a pooled connection taken and given back, a reply read); queued in one pipeline they
share one write and one read. A call waits at most for the current turn of the event
loop to end, so a lone call is barely later than before.

Each script still runs atomically on its own: a pipeline without MULTI, as the calls were
independent before. Scripts go by their SHA; one that Redis does not know (flushed by a
restart) is loaded and its calls sent again, as redis-py's `Script` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import NoScriptError


@dataclass
class _Call:
    script: Any  # redis-py's AsyncScript: `sha`, `script`
    keys: Sequence[Any]
    args: Sequence[Any]
    done: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ScriptBatch:
    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._queued: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()  # referenced until done

    async def __call__(self, script: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """`script(keys=, args=)`, sent with the other calls of this moment."""
        call = _Call(script, keys, args)
        self._queued.append(call)
        if len(self._queued) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return await call.done

    def _flush(self) -> None:
        calls, self._queued = self._queued, []
        task = asyncio.ensure_future(self._send(calls))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, calls: list[_Call]) -> None:
        try:
            replies = await self._execute(calls)
            unknown = [c for c, r in zip(calls, replies, strict=True) if _no_script(r)]
            if unknown:  # Redis restarted since the scripts were loaded
                for script in {id(c.script): c.script for c in unknown}.values():
                    await self.redis.script_load(script.script)
                again = iter(await self._execute(unknown))
                replies = [next(again) if _no_script(r) else r for r in replies]
        except Exception as exc:  # Redis away: every call of the batch fails with it
            for call in calls:
                if not call.done.done():
                    call.done.set_exception(exc)
            return
        for call, reply in zip(calls, replies, strict=True):
            if call.done.done():  # its caller was cancelled
                continue
            if isinstance(reply, Exception):
                call.done.set_exception(reply)
            else:
                call.done.set_result(reply)

    async def _execute(self, calls: list[_Call]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            return list(await pipe.execute(raise_on_error=False))


def _no_script(reply: Any) -> bool:
    return isinstance(reply, NoScriptError)
