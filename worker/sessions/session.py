"""One conversation channel, held by this process: the resume routine, then live.

Every message the subscription delivers goes into one inbox, and one task processes
the inbox in order, so a session's messages are handled one at a time, in publish order.
That task first runs the resume routine (whenever the session is taken, and again when
Ably re-attaches the channel without resuming it): history back to the checkpoint, oldest
first, then what the inbox held meanwhile. Each serial is processed once.

A `prompt` becomes a job (id: its Ably message id). Prompts of one conversation are
answered one at a time: while an answer is active, later prompts wait (kept in Redis)
and are enqueued when it ends, chained to it (`previous_response_id`, or the transcript
with Chat Completions). A `cancel` from the job's user, or from a client whose verified
claim has a role in `CANCEL_ROLES`, stops the job whatever its state. After each user
message the checkpoint advances.

Ably AI Transport's client speaks here too (`transport.ait`): a user message is one
`ai-input` per part, published together, so the parts are gathered (consecutive, one
codec-message-id) and become one prompt, their texts joined, on the AI Transport wire.
Ably delivers one publish's messages together, but a server may send them one frame each
(the local Ably, Sockudo, splits about half of them), so the parts are complete once
`PARTS_QUIET_S` passes without another (or another message comes).
Its job id is the input's event-id (the invocation's `inputEventId`), so a backend that
enqueues the same input makes no second job. An `ai-cancel` names the run or the input
(codec-message-id); one whose job is not known yet is held a little while and applied
once it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from ably.types.channelstate import ChannelState

from worker.jobs import Job, JobError, Pattern, one_line, parse_job, valid_job_id
from worker.logs import get_logger
from worker.queue import Queue
from worker.sessions import conversation
from worker.sessions.resume import Checkpoint, missed_since
from worker.sessions.store import SessionState, SessionStore
from worker.transport import ait, contract, lookup
from worker.transport.ait_lifecycle import RunLifecycle, find_input
from worker.transport.channel_uses import ChannelUses
from worker.transport.contract import UserMessage

log = get_logger("worker.session")

FINISHED = ("completed", "cancelled", "dead")
POLL_S = 0.25  # how often a session with an active answer checks whether it has ended
SEEN_SERIALS = 10_000
PARTS_QUIET_S = 0.025  # an input's parts are all in once this passes without another
HOLD_CANCEL_S = 30.0  # an `ai-cancel` for a job not known yet waits this long for it
_RESUME = object()  # an inbox item: run the resume routine again
_WAKE = object()  # an inbox item: this process's answer on the channel has ended


@dataclass(frozen=True)
class SessionOptions:
    api: Literal["responses", "chat"] = "responses"
    cancel_roles: frozenset[str] = frozenset()
    transcript_chars: int = conversation.TRANSCRIPT_CHARS
    wire_protocol: Literal["seed", "ait"] = "seed"  # for jobs that name no `wire`


class Session:
    def __init__(
        self,
        name: str,
        client: Any,
        store: SessionStore,
        queue: Queue,
        options: SessionOptions,
        agent_ids: Callable[[], Awaitable[set[str]]],
        uses: ChannelUses,
        running_here: Callable[[str], bool] = lambda _job_id: False,
    ) -> None:
        self.name = name
        self.running_here = running_here
        self.uses = uses
        self.client = client
        self.store = store
        self.queue = queue
        self.options = options
        self.agent_ids = agent_ids
        self.channel: Any = None
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._first_live: str | None = None  # the first serial the subscription delivered
        self._task: asyncio.Task[None] | None = None
        self._parts: list[UserMessage] = []  # an AI Transport user message, being gathered
        self._parts_due = 0.0  # when the gathered parts are complete, unless another comes
        self._held: list[tuple[UserMessage, float]] = []  # `ai-cancel`s and their deadline
        self._inputs: OrderedDict[str, str] = OrderedDict()  # input codec-message-id: job id
        # Whether the last `_advance` left an answer of this session's to watch for its end
        # (or prompts waiting behind one). Only then does the session poll Redis: hundreds
        # of idle sessions polling 4 times a second cost a sixth of a busy worker's CPU.
        self._watching = True
        self._active: str | None = None  # the answer the last `_advance` found active

    # -- life --------------------------------------------------------------------------

    async def start(self) -> None:
        """Attach and subscribe (holding live messages), then resume in the background."""
        self.channel = self.uses.take(self.client, self.name)
        await self.uses.ready(self.client, self.name)

        def on_message(message: Any) -> None:
            if self._first_live is None:
                self._first_live = getattr(message, "serial", None)
            self._inbox.put_nowait(message)

        def on_attached(change: Any) -> None:
            # A re-attach Ably could not resume may have lost messages: catch up again.
            if not getattr(change, "resumed", True) and self._task is not None:
                self._first_live = None  # the next message delivered bounds this catch-up
                self._inbox.put_nowait(_RESUME)

        self._on_message = on_message
        self._on_attached = on_attached
        await self.channel.subscribe(on_message)
        self.channel.on(ChannelState.ATTACHED, on_attached)
        self.channel.on("update", on_attached)
        self._task = asyncio.create_task(self._run())

    def wake(self) -> None:
        """This process's answer on the channel ended: enqueue what waits behind it now."""
        self._inbox.put_nowait(_WAKE)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.channel is not None:
            with contextlib.suppress(Exception):
                self.channel.unsubscribe(self._on_message)
                self.channel.off(ChannelState.ATTACHED, self._on_attached)
                self.channel.off("update", self._on_attached)
            # Detached and released unless an answer on this connection still uses it.
            await self.uses.give_back(self.client, self.name)

    async def _run(self) -> None:
        await self._step(self._resume("taken"))
        while True:
            try:
                item = await asyncio.wait_for(self._inbox.get(), self._poll_s())
            except TimeoutError:
                await self._step(self._flush_parts())
                await self._step(self._advance())
                continue
            if item is _RESUME:
                await self._step(self._resume("reattached"))
            elif item is _WAKE:
                await self._step(self._advance())
            else:
                await self._step(self._handle(item))
            if self._parts and time.monotonic() >= self._parts_due:
                await self._step(self._flush_parts())

    def _poll_s(self) -> float | None:
        """How long to wait for a message before checking on the session's own work: for
        ever when there is none (nothing else changes its state), or when the active answer
        runs in this process (whose end wakes the session)."""
        if self._parts:
            return max(0.0, self._parts_due - time.monotonic())
        if self._held:
            return POLL_S
        if not self._watching or (self._active is not None and self.running_here(self._active)):
            return None
        return POLL_S

    async def _step(self, work: Awaitable[None]) -> None:
        """One step; a failure (Redis or Ably away) is logged and the session goes on."""
        try:
            await work
        except Exception as exc:
            log.warning(
                "session.step_failed", channel=self.name, error=f"{type(exc).__name__}: {exc}"
            )
            self._watching, self._active = True, None  # whatever it left half done: check
            await asyncio.sleep(POLL_S)

    # -- the resume routine -------------------------------------------------------------

    async def _resume(self, reason: str) -> None:
        started = time.monotonic()
        state = await self.store.state(self.name)
        checkpoint = Checkpoint(state.checkpoint_serial, state.checkpoint_at or state.opened_at)
        missed = await missed_since(self.channel, checkpoint, live_from=self._first_live)
        counts = {"prompts": 0, "cancels": 0, "skipped": 0}
        for message in missed.messages:
            kind = await self._process(message)
            counts[kind] += 1
        unchanged = not missed.messages and not self._parts
        await self._flush_parts()
        log.info("session.resumed", channel=self.name, reason=reason, pages=missed.pages,
                 held=self._inbox.qsize(), ms=round((time.monotonic() - started) * 1000),
                 **counts)  # fmt: skip
        # Nothing missed (the usual catch-up): the state read above is still the state.
        await self._advance(state if unchanged else None)

    # -- one message --------------------------------------------------------------------

    async def _handle(self, message: Any) -> None:
        await self._process(message)

    async def _process(self, message: Any) -> Literal["prompts", "cancels", "skipped"]:
        serial = getattr(message, "serial", None)
        if not isinstance(serial, str) or serial in self._seen:
            return "skipped"
        user = contract.user_message(message)
        if user is None:
            self._remember(serial)
            return "skipped"
        ignored = user.client_id is None or user.client_id in await self.agent_ids()
        if not ignored and user.wire == "ait" and user.kind == "prompt":
            return await self._gather(user)
        await self._flush_parts()  # a user message after an input's parts: they are all in
        if ignored:
            reason = "no clientId" if user.client_id is None else "from an agent"
            log.info("session.message_ignored", channel=self.name, kind=user.kind, reason=reason)
            kind: Literal["prompts", "cancels", "skipped"] = "skipped"
        elif user.kind == "prompt":
            kind = "prompts" if await self._prompt(user) else "skipped"
        else:
            await self._cancel(user)
            kind = "cancels"
        # Processed (enqueued, waiting in Redis, applied or refused): never again.
        await self.store.save(self.name, checkpoint_serial=serial, checkpoint_at=user.timestamp)
        await self.store.touch(self.name)
        self._remember(serial)
        return kind

    async def _gather(self, part: UserMessage) -> Literal["prompts", "skipped"]:
        """One part of an AI Transport user message: kept until its last part is in."""
        if self._parts and self._parts[0].input_codec_message_id != part.input_codec_message_id:
            await self._flush_parts()
        self._parts.append(part)
        self._parts_due = time.monotonic() + PARTS_QUIET_S
        self._remember(part.serial)
        return "prompts" if len(self._parts) == 1 else "skipped"

    async def _flush_parts(self) -> None:
        """The gathered parts as one prompt, their texts joined; then the checkpoint."""
        parts, self._parts = self._parts, []
        if not parts:
            return
        texts = [part.text for part in parts if part.text]
        first, last = parts[0], parts[-1]
        await self._prompt(replace(first, text="\n".join(texts) if texts else None))
        await self.store.save(self.name, checkpoint_serial=last.serial,
                              checkpoint_at=last.timestamp)  # fmt: skip
        await self.store.touch(self.name)

    def _remember(self, serial: str) -> None:
        self._seen[serial] = None
        while len(self._seen) > SEEN_SERIALS:
            self._seen.popitem(last=False)

    # -- prompts: one answer at a time ---------------------------------------------------

    async def _prompt(self, user: UserMessage) -> bool:
        fields: dict[str, Any] = {
            "id": conversation.job_id_for(user.message_id, user.serial),
            "channel": self.name,
            "input": user.text or "",
            "user_client_id": user.client_id,
        }
        if user.wire == "ait":  # answered on the wire it was asked on
            fields.update(id=_ait_job_id(user.input_event_id, user.input_codec_message_id),
                          wire="ait", input_codec_message_id=user.input_codec_message_id,
                          input_event_id=user.input_event_id)  # fmt: skip
            self._inputs[user.input_codec_message_id or ""] = fields["id"]
            while len(self._inputs) > SEEN_SERIALS:
                self._inputs.popitem(last=False)
            log.info("ait.input", channel=self.name, job_id=fields["id"],
                     event_id=user.input_event_id)  # fmt: skip
        if user.model:
            fields["model"] = user.model
        if user.pattern in {p.value for p in Pattern}:
            fields["pattern"] = user.pattern
        try:
            if user.text is None:
                what = "no text part" if user.wire == "ait" else "its data must be text"
                raise JobError(f"invalid prompt: {what}")
            parse_job(fields)
        except JobError as exc:
            reason = one_line(str(exc))
            log.warning("session.prompt_refused", channel=self.name, job_id=fields["id"],
                        reason=reason)  # fmt: skip
            if user.wire == "ait":
                await self._ait_refused(fields, reason)
            else:
                await self._answer_refused(fields["id"], reason)
            return False
        fields["_serial"] = user.serial  # where it stands in the channel, for the transcript
        state = await self.store.state(self.name)
        waiting = [w for w in state.waiting if w["id"] != fields["id"]]
        await self.store.save(self.name, waiting=[*waiting, fields])
        log.info("session.prompt", channel=self.name, job_id=fields["id"],
                 chars=len(user.text or ""), waiting=len(waiting) + 1)  # fmt: skip
        await self._advance()
        return True

    async def _answer_refused(self, job_id: str, reason: str) -> None:
        """The user hears why a prompt is refused: an answer closed `failed` with the
        reason (under the answer's usual message id: a replayed prompt makes no second)."""
        headers = contract.Headers(response_id=job_id, model="")
        try:
            async with asyncio.timeout(10):
                sent = await self.channel.publish(contract.response_create(headers))
                failed = headers.with_status(contract.Status.FAILED, reason)
                closing = contract.response_close(str(sent.serials[0]), failed)
                await self.channel.update_message(closing)
        except Exception as exc:
            log.warning("session.refusal_not_published", channel=self.name, job_id=job_id,
                        error=f"{type(exc).__name__}: {exc}")  # fmt: skip

    async def _ait_refused(self, fields: dict[str, Any], reason: str) -> None:
        """An AI Transport input that cannot become a job: its run starts, its answer is
        closed with no text, and the run ends `error` with the reason."""
        run = ait.AitRun(str(fields["id"]), fields.get("input_codec_message_id"),
                         fields.get("user_client_id"))  # fmt: skip
        headers = contract.Headers(response_id=run.job_id, model="", ait=run)
        lifecycle = RunLifecycle(self.channel, run, run.job_id)
        try:
            async with asyncio.timeout(10):
                await lifecycle.start()
                sent = await self.channel.publish(contract.response_create(headers))
                failed = headers.with_status(contract.Status.FAILED, reason)
                closing = contract.response_replace(str(sent.serials[0]), "", failed)
                await self.channel.update_message(closing)
                await lifecycle.end("error", reason)
        except Exception as exc:
            log.warning("session.refusal_not_published", channel=self.name, job_id=run.job_id,
                        error=f"{type(exc).__name__}: {exc}")  # fmt: skip

    async def _advance(self, state: SessionState | None = None) -> None:
        """If no answer is active, enqueue the next waiting prompt, chained to the last
        (`state`: the session's state as just read, if nothing changed it since)."""
        if self._held:
            await self._retry_held()
            state = None  # an applied cancel may have changed it
        if state is None:
            state = await self.store.state(self.name)
        self._watching = state.active is not None or bool(state.waiting)
        self._active = state.active
        if state.active is not None:
            record = await self.queue.status(state.active) or {}
            if record.get("state") not in FINISHED and record:
                return
            if record.get("state") == "completed" and record.get("model_response_id"):
                state.last_response_id = record["model_response_id"]
            await self.store.save(self.name, active=None, last_response_id=state.last_response_id)
            self._watching, self._active = bool(state.waiting), None
        if not state.waiting:
            return
        fields, rest = dict(state.waiting[0]), state.waiting[1:]
        serial = fields.pop("_serial", None)
        await self._chain(fields, state.last_response_id, serial)
        job = Job(**fields)
        new = await self.queue.enqueue(job)
        await self.store.save(self.name, active=job.id, waiting=rest)
        self._watching, self._active = True, job.id
        log.info("session.prompt_enqueued", channel=self.name, job_id=job.id, new=new,
                 chained=bool(job.previous_response_id) or isinstance(job.input, list))  # fmt: skip

    async def _chain(self, fields: dict[str, Any], last_response_id: str | None,
                     serial: str | None) -> None:  # fmt: skip
        if self.options.api == "responses":
            if last_response_id:
                fields["previous_response_id"] = last_response_id
            return
        turns = await conversation.transcript(
            self.channel, serial or "~", self.options.transcript_chars
        )
        if turns:
            fields["input"] = [*turns, {"role": "user", "content": fields["input"]}]

    # -- cancels -----------------------------------------------------------------------

    async def _cancel(self, user: UserMessage) -> None:
        if user.wire == "ait":
            if not await self._apply_cancel(user, await self._ait_target(user)):
                self._held.append((user, time.monotonic() + HOLD_CANCEL_S))
                log.info("ait.cancel_held", channel=self.name, run_id=user.run_id,
                         input_codec_message_id=user.input_codec_message_id)  # fmt: skip
            return
        if not await self._apply_cancel(user, user.response_id):
            log.info("job.cancel_refused", channel=self.name, job_id=user.response_id,
                     by=user.client_id, reason="no such job")  # fmt: skip

    async def _retry_held(self) -> None:
        """`ai-cancel`s whose job was not known: applied once it is, else dropped."""
        held, self._held = self._held, []
        for user, deadline in held:
            if await self._apply_cancel(user, await self._ait_target(user)):
                continue
            if time.monotonic() < deadline:
                self._held.append((user, deadline))
            else:
                log.info("ait.cancel_expired", channel=self.name, run_id=user.run_id,
                         input_codec_message_id=user.input_codec_message_id)  # fmt: skip

    async def _apply_cancel(self, user: UserMessage, job_id: str | None) -> bool:
        """Stop the job if the sender may; False when there is no such job (yet)."""
        # Not a job id: no such job (and nothing of it reaches Redis).
        target = job_id if valid_job_id(job_id or "") else None
        state = await self.store.state(self.name)
        waiting = next((w for w in state.waiting if w["id"] == target), None)
        record = await self.queue.status(target) if target else None
        owner = waiting.get("user_client_id") if waiting else _owner(record)
        if target is None or (waiting is None and not record):
            return False
        if not contract.may_cancel(
            user.client_id, user.user_claim, owner, self.options.cancel_roles
        ):
            log.warning("job.cancel_refused", channel=self.name, job_id=target, by=user.client_id,
                        reason="not the job's user and no allowed role")  # fmt: skip
            return True
        if waiting is not None:  # never enqueued: it simply never runs
            await self.store.save(self.name, waiting=[w for w in state.waiting if w is not waiting])
            outcome = "cancelled"
        else:
            outcome = await self.queue.cancel(target)
            if outcome == "cancelled" and record and record.get("response_serial"):
                await self._close_cancelled(target, record)
        log.info("job.cancel_applied", channel=self.name, job_id=target, by=user.client_id,
                 outcome=outcome)  # fmt: skip
        return True

    async def _close_cancelled(self, job_id: str, record: dict[str, str]) -> None:
        """A job cancelled between attempts: its message (left `interrupted`) is closed.
        On the AI Transport wire the close carries the text the message holds (the client
        takes an update without it for an empty text) and the run ends `cancelled`."""
        job = _job(record)
        run = None
        if job is not None and (job.wire or self.options.wire_protocol) == "ait":
            run = ait.AitRun(job.id, job.input_codec_message_id, job.user_client_id)
        headers = contract.Headers(response_id=job_id, model=record.get("model", ""), ait=run)
        cancelled = headers.with_status(contract.Status.CANCELLED)
        serial = record["response_serial"]
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                if run is None:
                    await self.channel.update_message(contract.response_close(serial, cancelled))
                    return
                found = await lookup.response_state(self.channel, serial)
                text = found.text if found is not None else ""
                closing = contract.response_replace(serial, text, cancelled)
                await self.channel.update_message(closing)
                await RunLifecycle(self.channel, run, job_id).end("cancelled")

    async def _ait_target(self, user: UserMessage) -> str | None:
        """The job an `ai-cancel` names: by its run (`run:J`), or by the input it answers
        (an input this session read, else the input found on the channel: its event-id
        makes the job id)."""
        if user.run_id:
            return ait.job_id_of_run(user.run_id)
        codec_message_id = user.input_codec_message_id
        if not codec_message_id:
            return None
        if codec_message_id in self._inputs:
            return self._inputs[codec_message_id]
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                found = await find_input(self.channel, codec_message_id=codec_message_id)
            if found is not None:
                self._inputs[codec_message_id] = _ait_job_id(found.event_id, codec_message_id)
                return self._inputs[codec_message_id]
        return None


def _ait_job_id(event_id: str | None, codec_message_id: str | None) -> str:
    """An AI Transport input's job id: its event-id, which a backend enqueueing the same
    input (from the invocation's `inputEventId`) uses too; else its codec-message-id."""
    key = event_id or codec_message_id or ""
    return conversation.job_id_for(key, key)


def _job(record: dict[str, str] | None) -> Job | None:
    if not record or not record.get("payload"):
        return None
    try:
        return parse_job(record["payload"])
    except JobError:
        return None


def _owner(record: dict[str, str] | None) -> str | None:
    job = _job(record)
    return job.user_client_id if job is not None else None
