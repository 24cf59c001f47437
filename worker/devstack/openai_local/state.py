"""What the handlers share: the server's config, its ledger and its response store."""

from __future__ import annotations

from dataclasses import dataclass

from worker.devstack.openai_local.ledger import Ledger
from worker.devstack.openai_local.options import ServerConfig
from worker.devstack.openai_local.store import ResponseStore


@dataclass
class ServerState:
    config: ServerConfig
    ledger: Ledger
    store: ResponseStore

    @classmethod
    def of(cls, config: ServerConfig) -> ServerState:
        return cls(config=config, ledger=Ledger(), store=ResponseStore(config.store_size))

    @property
    def batch_interval_s(self) -> float:
        return self.config.batch_interval_ms / 1000
