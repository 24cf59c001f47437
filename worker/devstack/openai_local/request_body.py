"""Reading a create request's JSON body, with OpenAI's 400 errors for bad fields."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from worker.devstack.openai_local.options import BadRequest


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise BadRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly.)"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("Missing required parameter: 'model'.", "model")
    return model


def token_cap(body: dict[str, Any], *keys: str) -> int | None:
    """The first of `keys` present: a cap on the answer's tokens."""
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadRequest(f"Invalid '{key}': expected an integer of at least 1.", key)
        return value
    return None


def flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"Invalid type for '{key}': expected a boolean.", key)
    return value
