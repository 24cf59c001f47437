"""Admitting a create request: its options, its attempt counted, its failure decided."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from worker.devstack.openai_local.errors import failure_response
from worker.devstack.openai_local.inputs import input_tokens
from worker.devstack.openai_local.options import resolve
from worker.devstack.openai_local.plan import Plan, make_plan
from worker.devstack.openai_local.state import ServerState

HTTP_FAILURES = ("429", "500", "401")


def admit(
    state: ServerState, body: dict[str, Any], model: str, prompt: str, max_tokens: int | None
) -> Plan | web.Response:
    """The plan for this attempt, or the HTTP error it was asked to fail with."""
    options = resolve(state.config, model, body.get("metadata"))
    state.ledger.record_attempt(prompt)
    state.ledger.record_request(prompt, body)
    fails = state.ledger.should_fail(prompt, options)
    if fails and options.fail in HTTP_FAILURES:
        return failure_response(options.fail, options.retry_after_s)
    return make_plan(prompt, model, options, max_tokens, fails, input_tokens(body))
