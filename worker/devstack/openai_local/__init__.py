"""A local OpenAI-compatible server that the unmodified `openai` SDK streams from.

    python -m worker.devstack.openai_local --port 8787 [--tokens-per-second 60]

serves `/v1/responses` (streamed, whole, background with resume and cancel),
`/v1/chat/completions` and `/v1/models`. The answer is a deterministic function of
the prompt and length (`answer_text`, `answer_deltas`), so a test knows what a
subscriber must end up with. Pace and failures are set per server and per request
(`metadata` keys in `options`; models `local`, `local-fast`, `local-slow`).
"""

from worker.devstack.openai_local.options import (
    FAIL,
    FAIL_AFTER,
    FAIL_TIMES,
    FIRST_TOKEN_MS,
    MODEL_DEFAULT,
    MODEL_FAST,
    MODEL_SLOW,
    MODELS,
    RETRY_AFTER,
    TOKENS,
    TOKENS_PER_SECOND,
    ServerConfig,
)
from worker.devstack.openai_local.server import OpenAILocalServer, make_app
from worker.devstack.openai_local.text import (
    DEFAULT_TOKENS,
    answer_deltas,
    answer_text,
    answer_tokens,
    count_tokens,
)

__all__ = [
    "DEFAULT_TOKENS",
    "FAIL",
    "FAIL_AFTER",
    "FAIL_TIMES",
    "FIRST_TOKEN_MS",
    "MODELS",
    "MODEL_DEFAULT",
    "MODEL_FAST",
    "MODEL_SLOW",
    "RETRY_AFTER",
    "TOKENS",
    "TOKENS_PER_SECOND",
    "OpenAILocalServer",
    "ServerConfig",
    "answer_deltas",
    "answer_text",
    "answer_tokens",
    "count_tokens",
    "make_app",
]
