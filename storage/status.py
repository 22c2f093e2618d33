"""The job lifecycle as data: which status may follow which (rq's ``JobStatus``, ``job_lifecycle``).

    queued ──claim──> running ──> succeeded | failed | canceled
       │                 └──worker died──> interrupted ──resume──> queued
       └──cancel──> canceled              (failed and canceled may also be resumed)
"""
from __future__ import annotations

from enum import Enum

from qalora.errors import QALoRAError


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    INTERRUPTED = "interrupted"

    def __str__(self) -> str:
        return self.value


S = JobStatus
# target status -> the statuses it may be reached from
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.RUNNING: frozenset({S.QUEUED}),
    S.SUCCEEDED: frozenset({S.RUNNING}),
    S.FAILED: frozenset({S.RUNNING}),
    S.CANCELED: frozenset({S.QUEUED, S.RUNNING, S.INTERRUPTED}),
    S.INTERRUPTED: frozenset({S.RUNNING}),
    S.QUEUED: frozenset({S.INTERRUPTED, S.FAILED, S.CANCELED}),
}
# statuses that change without anyone acting: the UI keeps polling a job while it is in one
ACTIVE = frozenset({S.QUEUED, S.RUNNING})

_VERB = {S.RUNNING: "start", S.SUCCEEDED: "mark as succeeded", S.FAILED: "mark as failed",
         S.CANCELED: "cancel", S.INTERRUPTED: "mark as interrupted", S.QUEUED: "resume"}


class JobStateError(QALoRAError):
    """The job is missing or not in a state that allows what was asked."""


class IllegalTransition(JobStateError):
    """A job was asked to move to a status its current status does not lead to."""

    def __init__(self, job_id: int, current: JobStatus | None, target: JobStatus, owner: str | None = None):
        self.job_id, self.current, self.target, self.owner = job_id, current, target, owner
        if current is None:
            msg = f"Job {job_id} does not exist; refresh the job list."
        elif current in TRANSITIONS[target] and owner is not None:
            msg = (f"Cannot {_VERB[target]} job {job_id}: it is running on worker {owner}, "
                   "which alone may finish it.")
        else:
            allowed = " or ".join(sorted(s.value for s in TRANSITIONS[target]))
            msg = (f"Cannot {_VERB[target]} job {job_id}: it is {current.value}, "
                   f"and only a job that is {allowed} can be.")
        super().__init__(msg)


# An export row's status as the Jobs tab, the download and the publish speak of it.
EXPORT_STATUS = {"queued": "queued", "interrupted": "queued", "running": "running", "succeeded": "done",
                 "failed": "failed", "canceled": "failed"}
