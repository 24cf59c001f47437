"""WORKER_PROCESSES' default (the usable cores) and the supervisor's restart rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.settings import (
    Settings,
    SettingsError,
    cgroup_cpu_quota,
    default_worker_processes,
    load_settings,
)
from worker.supervisor import (
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    SUPERVISED_ENV,
    child_env,
    is_start_failure,
    next_backoff,
)

AFFINITY = len(os.sched_getaffinity(0))
REQUIRED = {"ably_api_key": "app.key:secret", "openai_api_key": "sk-test"}


def cpu_max(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpu.max"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "quota"),
    [("max 100000\n", None), ("50000 100000\n", 1), ("100000 100000", 1),
     ("150000 100000\n", 2), ("250000 100000", 3), ("garbage", None), ("", None)],
)  # fmt: skip
def test_the_cgroup_quota_in_whole_cores_rounded_up(tmp_path: Path, text: str, quota: int) -> None:
    assert cgroup_cpu_quota(cpu_max(tmp_path, text)) == quota


def test_the_default_is_the_affinity_lowered_by_a_quota(tmp_path: Path) -> None:
    assert default_worker_processes(tmp_path / "absent") == AFFINITY  # no cgroup v2
    assert default_worker_processes(cpu_max(tmp_path, "max 100000")) == AFFINITY
    assert default_worker_processes(cpu_max(tmp_path, "10000 100000")) == 1  # a tenth: 1
    assert default_worker_processes(cpu_max(tmp_path, "6400000 100000")) == min(AFFINITY, 64)


def test_worker_processes_is_validated_and_named() -> None:
    assert 1 <= load_settings(Settings, **REQUIRED).worker_processes <= 64
    assert load_settings(Settings, **REQUIRED, worker_processes="3").worker_processes == 3
    for bad in ("0", "65", "many"):
        with pytest.raises(SettingsError, match="WORKER_PROCESSES"):
            load_settings(Settings, **REQUIRED, worker_processes=bad)


def test_a_child_that_keeps_dying_quickly_waits_longer_each_time() -> None:
    waits = [BACKOFF_FIRST_S]
    for _ in range(6):
        waits.append(next_backoff(waits[-1], lived_s=1))
    assert waits == [0.5, 1, 2, 4, 8, 10, 10] and max(waits) == BACKOFF_MAX_S
    assert next_backoff(0, lived_s=1) == BACKOFF_FIRST_S  # its first death
    assert next_backoff(BACKOFF_MAX_S, lived_s=31) == BACKOFF_FIRST_S  # it lived 30 s: reset


def test_only_a_quick_first_start_with_status_1_or_2_is_a_start_failure() -> None:
    assert is_start_failure(True, 1, 2.0) and is_start_failure(True, 2, 0.5)
    assert not is_start_failure(False, 1, 2.0)  # a restart: backoff, not the end
    assert not is_start_failure(True, 1, 120.0)  # it ran: a crash
    assert not is_start_failure(True, -9, 1.0)  # SIGKILLed (OOM): restarted


def test_children_run_one_process_each_and_know_their_supervisor() -> None:
    env = child_env({"WORKER_PROCESSES": "4", "REDIS_URL": "redis://x"})
    assert env["WORKER_PROCESSES"] == "1" and env["REDIS_URL"] == "redis://x"
    assert env[SUPERVISED_ENV] == str(os.getpid())
