"""Who may cancel an answer: read from what Ably stamps, never from what a client wrote."""

from __future__ import annotations

from types import SimpleNamespace

from worker.transport import contract

ROLES = frozenset({"moderator"})


def cancel(client_id: str | None, extras: dict[str, object]) -> contract.UserMessage:
    message = SimpleNamespace(name="cancel", serial="s1", timestamp=1, client_id=client_id,
                              id="m1", data=None, extras=extras)  # fmt: skip
    read = contract.user_message(message)
    assert read is not None
    return read


def test_the_jobs_own_user_may_cancel_it() -> None:
    user = cancel("alice", {"headers": {"responseId": "j1"}})
    assert user.response_id == "j1"
    assert contract.may_cancel(user.client_id, user.user_claim, "alice", ROLES)


def test_another_user_may_not() -> None:
    user = cancel("mallory", {"headers": {"responseId": "j1"}})
    assert not contract.may_cancel(user.client_id, user.user_claim, "alice", ROLES)


def test_a_role_written_in_a_header_counts_for_nothing() -> None:
    user = cancel("mallory", {"headers": {"responseId": "j1", "userClaim": "moderator",
                                          "role": "moderator"}})  # fmt: skip
    assert user.user_claim is None
    assert not contract.may_cancel(user.client_id, user.user_claim, "alice", ROLES)


def test_a_verified_claim_with_an_allowed_role_may_cancel_anyones() -> None:
    user = cancel("moira", {"userClaim": "moderator", "headers": {"responseId": "j1"}})
    assert contract.may_cancel(user.client_id, user.user_claim, "alice", ROLES)
    assert not contract.may_cancel(user.client_id, user.user_claim, "alice", frozenset())


def test_a_job_without_a_user_is_cancelled_by_roles_only() -> None:
    anyone = cancel("alice", {"headers": {"responseId": "j1"}})
    assert not contract.may_cancel(anyone.client_id, anyone.user_claim, None, ROLES)
    nobody = cancel(None, {"headers": {"responseId": "j1"}})
    assert not contract.may_cancel(nobody.client_id, nobody.user_claim, None, ROLES)
