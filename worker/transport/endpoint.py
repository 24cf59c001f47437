"""Where the Ably API is, as client options. No SDK import: settings validation uses it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Endpoint:
    """Where the Ably API is: `""` for Ably itself, or `http(s)://HOST[:PORT]`."""

    host: str | None = None
    port: int | None = None
    tls: bool = True

    @classmethod
    def parse(cls, endpoint: str) -> Endpoint:
        if not endpoint:
            return cls()
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected http(s)://HOST[:PORT], got {endpoint!r}")
        return cls(host=parts.hostname, port=parts.port, tls=parts.scheme == "https")

    def client_options(self) -> dict[str, Any]:
        if self.host is None:
            return {}
        options: dict[str, Any] = {"endpoint": self.host, "tls": self.tls}
        if self.port:
            options["tls_port" if self.tls else "port"] = self.port
        return options
