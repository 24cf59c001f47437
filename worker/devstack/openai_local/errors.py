"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

The SDK picks its exception class from the status (401 AuthenticationError, 404
NotFoundError, 429 RateLimitError, 5xx InternalServerError) and reads the body.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from aiohttp import web


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(error_body(message, type_, param, code)),
        content_type="application/json",
        headers=headers,
    )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return error_response(400, message, "invalid_request_error", param, code)


def invalid_api_key(key: str) -> web.Response:
    shown = f"{key[:3]}...{key[-4:]}" if len(key) > 8 else "***"
    return error_response(
        401,
        f"Incorrect API key provided: {shown}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        code="invalid_api_key",
    )


def rate_limited(retry_after_s: float) -> web.Response:
    # Retry-After in whole seconds as the standard wants, and the exact wait in
    # retry-after-ms, which the openai SDK prefers.
    headers = {
        "retry-after": str(math.ceil(retry_after_s)),
        "retry-after-ms": str(round(retry_after_s * 1000)),
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "0",
    }
    return error_response(
        429,
        "Rate limit reached for requests (local server, on request). "
        f"Please try again in {retry_after_s:g}s.",
        "requests",
        code="rate_limit_exceeded",
        headers=headers,
    )


def server_error() -> web.Response:
    return error_response(
        500,
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
    )


def not_found(response_id: str) -> web.Response:
    return error_response(
        404, f"Response with id '{response_id}' not found.", "invalid_request_error"
    )


def failure_response(mode: str, retry_after_s: float) -> web.Response:
    """The HTTP error a `local_fail` of 429, 500 or 401 asks for."""
    if mode == "429":
        return rate_limited(retry_after_s)
    if mode == "401":
        return invalid_api_key("sk-local-fail-on-request")
    return server_error()
