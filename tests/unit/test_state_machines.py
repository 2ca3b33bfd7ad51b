"""The job and task state machines allow exactly the documented transitions."""

from __future__ import annotations

import pytest

from marketplace.jobs.states import JOB_TRANSITIONS, TASK_TRANSITIONS, JobStatus, TaskStatus, sources_of


@pytest.mark.parametrize("final", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_a_finished_job_never_changes_again(final: str) -> None:
    assert JOB_TRANSITIONS[final] == frozenset()


def test_a_job_succeeds_only_from_running() -> None:
    assert sources_of(JOB_TRANSITIONS, JobStatus.SUCCEEDED) == [JobStatus.RUNNING]


def test_a_task_is_requeued_only_from_leased() -> None:
    assert sources_of(TASK_TRANSITIONS, TaskStatus.QUEUED) == [TaskStatus.LEASED]


def test_every_state_has_a_transition_entry() -> None:
    assert set(JOB_TRANSITIONS) == set(JobStatus.values)
    assert set(TASK_TRANSITIONS) == set(TaskStatus.values)
