"""Making ably-python clients for an endpoint: Ably itself, or the local Sockudo.

Every Ably client in the project is made here, so the SDK corrections (`sdk_quirks`) and
the client options that the local server needs are applied in one place.
"""

from __future__ import annotations

import logging
from typing import Any

from ably import AblyRealtime, AblyRest

from worker.transport import sdk_quirks
from worker.transport.endpoint import Endpoint


def quiet_sdk_logs(level: int = logging.WARNING) -> None:
    """ably-python logs every append at INFO: keep that off the hot path."""
    logging.getLogger("ably").setLevel(level)


def _transport_params(params: dict[str, Any] | None) -> dict[str, str]:
    # Sockudo's query parser rejects Python's `True`/`False`: send Ably's `true`/`false`.
    def text(value: Any) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return {name: text(value) for name, value in (params or {}).items()}


def client_options(
    key: str | None,
    endpoint: str = "",
    transport_params: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Options for either client. With a key, token auth: the SDK refuses Basic auth over
    plain HTTP (40103), and a token the SDK renews is what production should use. Without
    one, pass `token=`, `auth_callback=` or the like in `extra`."""
    sdk_quirks.apply()
    options: dict[str, Any] = {"key": key, "use_token_auth": True} if key else {}
    options.update(Endpoint.parse(endpoint).client_options())
    if key and extra.get("client_id"):
        # ably-python's realtime Auth leaves the configured clientId out of the token
        # requests it signs, then refuses its own token (40102) and retries 15 s later.
        options["default_token_params"] = {"client_id": extra["client_id"]}
    if transport_params:
        options["transport_params"] = _transport_params(transport_params)
    options.update(extra)
    return options


def realtime_client(key: str | None, endpoint: str = "", **extra: Any) -> AblyRealtime:
    return AblyRealtime(**client_options(key, endpoint, **extra))


def rest_client(key: str | None, endpoint: str = "", **extra: Any) -> AblyRest:
    return AblyRest(**client_options(key, endpoint, **extra))
