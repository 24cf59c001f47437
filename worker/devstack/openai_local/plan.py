"""A plan for one create request: the deltas it will stream and how it will end."""

from __future__ import annotations

from dataclasses import dataclass

from worker.devstack.openai_local.options import FailMode, RequestOptions
from worker.devstack.openai_local.text import answer_tokens, delta_groups


@dataclass(frozen=True)
class Plan:
    prompt: str
    model: str
    options: RequestOptions
    deltas: list[str]
    delta_tokens: list[int]
    capped: bool  # the natural answer is longer than the request's token cap
    fail: FailMode | None  # the failure this attempt gets (after local_fail_times)
    input_tokens: int

    @property
    def fail_after(self) -> int:
        """Deltas sent before a break, failure or early stop: as asked, else half."""
        after = self.options.fail_after
        if after is None:
            after = len(self.deltas) // 2
        return min(after, len(self.deltas))

    @property
    def stops_early(self) -> bool:
        return self.fail in ("failed", "incomplete")

    @property
    def streamed(self) -> tuple[list[str], list[int]]:
        """The deltas actually generated: all, or those before a failure or early stop."""
        end = self.fail_after if self.stops_early else len(self.deltas)
        return self.deltas[:end], self.delta_tokens[:end]


def make_plan(
    prompt: str,
    model: str,
    options: RequestOptions,
    max_tokens: int | None,
    fails: bool,
    input_tokens: int,
) -> Plan:
    groups = delta_groups(prompt, options.tokens, max_tokens)
    natural = len(answer_tokens(prompt, options.tokens))
    return Plan(
        prompt=prompt,
        model=model,
        options=options,
        deltas=["".join(group) for group in groups],
        delta_tokens=[len(group) for group in groups],
        capped=max_tokens is not None and max_tokens < natural,
        fail=options.fail if fails else None,
        input_tokens=input_tokens,
    )
