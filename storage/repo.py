"""Job repository: one function per status transition, plus the reads the UI needs.

Fine-tunes and exports are rows of one queue (``Job.kind``): one claim, one heartbeat, one recovery.

Every transition is a single compare-and-set ``UPDATE ... WHERE status IN (allowed)``: it is
atomic on any database, so two workers (or a worker and the UI) can race on one row and at
most one wins. The loser sees zero rows changed and gets an ``IllegalTransition`` (or ``None``
from ``claim``). Functions take the session from ``storage.db.db()`` and never commit.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from .models import KIND_BENCHMARK, KIND_EXPORT, KIND_FINETUNE, Artifact, Job, Metric, utcnow
from .status import TRANSITIONS, IllegalTransition, JobStateError, JobStatus

S = JobStatus


def _transition(s: Session, job_id: int, target: JobStatus, *, owner: str | None = None,
                extra_where=(), **values) -> None:
    allowed = [st.value for st in TRANSITIONS[target]]
    where = [Job.id == job_id, Job.status.in_(allowed), *extra_where]
    # a running job is moved on only by naming the worker that claimed it (its own worker, or
    # the recovery that found that worker dead), never by a caller that just saw it running
    where.append(Job.status != S.RUNNING.value if owner is None
                 else or_(Job.status != S.RUNNING.value, Job.worker_id == owner))
    changed = s.execute(update(Job).where(*where).values(status=target.value, **values)
                        .execution_options(synchronize_session=False)).rowcount
    if changed != 1:
        row = s.execute(select(Job.status, Job.worker_id).where(Job.id == job_id)).first()
        current = S(row.status) if row else None
        raise IllegalTransition(job_id, current, target,
                                owner=row.worker_id if current == S.RUNNING else None)


# ---- transitions -------------------------------------------------------------------------

def create_job(s: Session, *, name: str, spec: dict, total_steps: int, sweep_id: str | None = None,
               devices: int = 1) -> int:
    """A new queued job; its folder is named ``job-<id>``, which every machine resolves under its own
    ``QALORA_ARTIFACTS`` mount."""
    job = Job(name=name, spec=spec, total_steps=total_steps, status=S.QUEUED.value, sweep_id=sweep_id,
              devices=devices)
    s.add(job)
    s.flush()
    job.artifact_dir = f"job-{job.id:05d}"
    job.queue_position = job.id
    return job.id


def _hold(s: Session, *rows) -> None:
    """Serialize this transaction with others that read, then write, the same ``rows`` of jobs:
    PostgreSQL locks them (``FOR UPDATE``); SQLite takes its write lock first (in WAL mode a
    transaction that read and then writes fails if another wrote in between)."""
    if s.get_bind().dialect.name == "sqlite":
        s.execute(update(Job).where(Job.id == -1).values(queue_position=None)
                  .execution_options(synchronize_session=False))
    else:
        s.execute(select(Job.id).where(*rows).with_for_update()).all()


def _queue_order():
    return func.coalesce(Job.queue_position, Job.id), Job.created_at, Job.id


def queued_ids(s: Session) -> list[int]:
    """Queued fine-tunes in the order workers will claim them."""
    return list(s.scalars(select(Job.id).where(Job.status == S.QUEUED.value, Job.kind == KIND_FINETUNE)
                          .order_by(*_queue_order())))


def move_queued(s: Session, job_id: int, direction: str) -> list[int]:
    """Swap queued job ``job_id`` with the queued job before it (``up``) or after it (``down``);
    returns the new queue order. At either end it stays. A job that is not queued raises."""
    if direction not in ("up", "down"):
        raise ValueError(f"direction {direction!r}: use 'up' or 'down'.")
    _hold(s, Job.status == S.QUEUED.value, Job.kind == KIND_FINETUNE)  # the queue, while read and written
    order = queued_ids(s)
    if job_id not in order:
        status = s.scalar(select(Job.status).where(Job.id == job_id))
        raise JobStateError(f"Job {job_id} is {status or 'unknown'}, not queued: only queued jobs can be moved.")
    i = order.index(job_id)
    j = i - 1 if direction == "up" else i + 1
    if 0 <= j < len(order):
        other = order[j]
        # positions start as ids and are only ever swapped, so they stay distinct
        pos = dict(s.execute(select(Job.id, func.coalesce(Job.queue_position, Job.id))
                             .where(Job.id.in_([job_id, other]))).all())
        for a, b in ((job_id, other), (other, job_id)):
            s.execute(update(Job).where(Job.id == a).values(queue_position=pos[b])
                      .execution_options(synchronize_session=False))
        order[i], order[j] = order[j], order[i]
    return order


def claim(s: Session, worker_id: str, job_id: int | None = None, max_devices: int | None = None,
          kind: str | tuple[str, ...] = KIND_FINETUNE) -> int | None:
    """queued -> running for ``job_id``, or for the first queued row of ``kind`` (or of any of several
    kinds); returns the id claimed.

    First by queue position (the id unless moved), so a resumed job goes before the jobs
    submitted after it.
    Without ``job_id``, returns ``None`` when nothing is queued (a lost race moves on to the
    next candidate); with ``max_devices``, only jobs asking for at most that many devices count. With ``job_id``, a job that is not queued raises ``IllegalTransition``.
    """
    now = utcnow()
    values = dict(worker_id=worker_id, started_at=now, heartbeat_at=now, progress_at=now, finished_at=None,
                  cancel_requested=False, error=None, attempts=Job.attempts + 1)
    if job_id is not None:
        _transition(s, job_id, S.RUNNING, earlier_run_s=_ran_before(s, job_id), **values)
        return job_id
    while True:
        fits = () if max_devices is None else (func.coalesce(Job.devices, 1) <= max_devices,)
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        stmt = (select(Job.id).where(Job.status == S.QUEUED.value, Job.kind.in_(kinds), *fits)
                .order_by(*_queue_order()).limit(1))
        if s.get_bind().dialect.name == "postgresql":
            # a row another worker is claiming is locked: skip it rather than wait for its commit and
            # lose the compare-and-set anyway (SQLite serializes writers; it has no row locks)
            stmt = stmt.with_for_update(skip_locked=True)
        candidate = s.scalar(stmt)
        if candidate is None:
            return None
        try:
            _transition(s, candidate, S.RUNNING, earlier_run_s=_ran_before(s, candidate), **values)
            return candidate
        except IllegalTransition:
            continue


def _ran_before(s: Session, job_id: int) -> float | None:
    """Seconds the job's attempts so far ran, each from its start to its last sign of life (its last
    heartbeat or progress: a worker killed outright stops there, not when its death was noticed)."""
    row = s.execute(select(Job.started_at, Job.heartbeat_at, Job.progress_at, Job.finished_at, Job.earlier_run_s)
                    .where(Job.id == job_id)).first()
    if row is None or row.started_at is None:
        return row.earlier_run_s if row else None
    return (row.earlier_run_s or 0.0) + attempt_seconds(row.started_at, row.heartbeat_at, row.progress_at,
                                                        row.finished_at)


def attempt_seconds(started_at: datetime, *ends: datetime | None) -> float:
    """An attempt's length: from its start to the latest of ``ends`` (none given: 0)."""
    last = max((t for t in ends if t is not None), default=started_at)
    return max((last - started_at).total_seconds(), 0.0)


def succeed(s: Session, job_id: int, worker_id: str, report: dict | None = None) -> None:
    _transition(s, job_id, S.SUCCEEDED, owner=worker_id, finished_at=utcnow(), report=report,
                stage="done", eta_s=0.0)


def fail(s: Session, job_id: int, worker_id: str, error: str) -> None:
    _transition(s, job_id, S.FAILED, owner=worker_id, finished_at=utcnow(), error=error, eta_s=None)


def cancel(s: Session, job_id: int, worker_id: str | None = None) -> None:
    """queued | interrupted -> canceled (from the UI), or running -> canceled (by its worker).

    The UI stops a running job with ``request_cancel``; its worker then calls this.
    """
    _transition(s, job_id, S.CANCELED, owner=worker_id, finished_at=utcnow(), eta_s=None)


def interrupt(s: Session, job_id: int, worker_id: str | None = None, *, reason: str,
              stale_before: datetime | None = None) -> None:
    """running -> interrupted; with ``stale_before``, only while the heartbeat is that old."""
    extra = ()
    if stale_before is not None:
        extra = (or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before),)
    _transition(s, job_id, S.INTERRUPTED, owner=worker_id, extra_where=extra, error=reason, eta_s=None)


def requeue(s: Session, job_id: int) -> None:
    """interrupted | failed | canceled -> queued; the next run resumes from the last checkpoint."""
    _transition(s, job_id, S.QUEUED, error=None, finished_at=None, cancel_requested=False,
                worker_id=None, eta_s=None)


# ---- what a running job writes ----------------------------------------------------------

def _owned(job_id: int, worker_id: str):
    return (Job.id == job_id, Job.status == S.RUNNING.value, Job.worker_id == worker_id)


def heartbeat(s: Session, job_id: int, worker_id: str, **values) -> bool:
    """Refresh the heartbeat (and any job columns given); False if the job is no longer ours.

    Any column given (a step, a stage) is progress too; a bare heartbeat is not.
    """
    now = utcnow()
    if values:
        values.setdefault("progress_at", now)
    stmt = update(Job).where(*_owned(job_id, worker_id)).values(heartbeat_at=now, **values)
    return s.execute(stmt.execution_options(synchronize_session=False)).rowcount == 1


def record_step(s: Session, job_id: int, worker_id: str, *, step: int, train_loss: float | None,
                eval_loss: float | None, lr: float | None, tokens_per_s: float | None,
                elapsed_s: float | None, eta_s: float | None, tokens_seen: int | None = None) -> bool:
    """Store one step's metrics and progress; False (nothing written) if the job is not ours.

    A resumed run re-trains the steps after its checkpoint, so rows from ``step`` on are
    replaced: the table never holds a step twice, and never a step from an abandoned run.
    """
    if not heartbeat(s, job_id, worker_id, step=step, loss=train_loss, eta_s=eta_s):
        return False
    s.execute(delete(Metric).where(Metric.job_id == job_id, Metric.step >= step))
    s.execute(insert(Metric).values(job_id=job_id, step=step, train_loss=train_loss, eval_loss=eval_loss, lr=lr,
                                    tokens_per_s=tokens_per_s, elapsed_s=elapsed_s, tokens_seen=tokens_seen,
                                    created_at=utcnow()))
    return True


def request_cancel(s: Session, job_id: int) -> bool:
    """Ask a running job's worker to stop after its current step; False if it is not running."""
    stmt = update(Job).where(Job.id == job_id, Job.status == S.RUNNING.value).values(cancel_requested=True)
    return s.execute(stmt.execution_options(synchronize_session=False)).rowcount == 1


def add_artifact(s: Session, job_id: int, kind: str, path: Path, folder: Path | None = None) -> None:
    """Record a file or folder the job wrote, with its size; stored relative to the job's ``folder``."""
    path = Path(path)
    size = (sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir()
            else path.stat().st_size if path.exists() else 0)
    s.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.kind == kind))
    s.add(Artifact(job_id=job_id, kind=kind, path=relative(path, folder), size_bytes=size))


def relative(path, folder: Path | None) -> str:
    """``path`` relative to ``folder`` when inside it (resolve again with ``folder / path``), else as is."""
    path = Path(path)
    if folder is not None and path.is_absolute() and path.is_relative_to(folder):
        return str(path.relative_to(folder))
    return str(path)


# ---- what is asked of a job after it ended: rows of kind "export" or "benchmark", run by a worker ----

def request_task(s: Session, job_id: int, kind: str, spec: dict, name: str, what: str) -> Job:
    """The job's queued or running task of ``kind`` asking for ``spec``, else a new queued one (one at
    a time: two callers asking together get the same row). ``what`` ends the refusal of a job that
    has not finished ("exports are made from a finished model")."""
    _hold(s, Job.id == job_id)
    job = s.get(Job, job_id)
    if job is None or job.kind != KIND_FINETUNE:
        raise JobStateError(f"Job {job_id} does not exist; refresh the job list.")
    if job.status != S.SUCCEEDED.value:
        raise JobStateError(f"Job {job_id} is {job.status}; {what}.")
    active = (S.QUEUED.value, S.RUNNING.value, S.INTERRUPTED.value)
    task = next((t for t in reversed(tasks_of(s, job_id, kind)) if t.spec == spec and t.status in active), None)
    if task is None:
        task = Job(name=name, spec=spec, total_steps=0, status=S.QUEUED.value, kind=kind, parent_id=job_id,
                   artifact_dir=job.artifact_dir, devices=1)
        s.add(task)
        s.flush()
        task.queue_position = task.id
    return task


def tasks_of(s: Session, job_id: int, kind: str) -> list[Job]:
    """The tasks of ``kind`` asked of job ``job_id`` after it ended, oldest first."""
    return list(s.scalars(select(Job).where(Job.kind == kind, Job.parent_id == job_id).order_by(Job.id)))


def request_export(s: Session, job_id: int, fmt: str) -> Job:
    return request_task(s, job_id, KIND_EXPORT, {"format": fmt}, f"export {fmt} of job #{job_id}",
                        "exports are made from a finished model")


def export_tasks(s: Session, job_id: int) -> list[Job]:
    """The exports asked for after job ``job_id`` ended, oldest first."""
    return tasks_of(s, job_id, KIND_EXPORT)


def request_benchmark(s: Session, job_id: int, settings: dict) -> Job:
    return request_task(s, job_id, KIND_BENCHMARK, {"benchmarks": settings}, f"benchmark of job #{job_id}",
                        "benchmarks are run on a finished model")


def benchmark_tasks(s: Session, job_id: int) -> list[Job]:
    """The benchmark runs asked for after job ``job_id`` ended, oldest first."""
    return tasks_of(s, job_id, KIND_BENCHMARK)


def set_report_value(s: Session, job_id: int, key: str, value) -> None:
    """Write one key of a finished job's report (what a task asked of it afterwards found)."""
    job = s.get(Job, job_id)
    job.report = {**(job.report or {}), key: value}


# ---- reads -------------------------------------------------------------------------------

def get_job(s: Session, job_id: int) -> Job | None:
    return s.get(Job, job_id)


def list_jobs(s: Session, statuses: list[JobStatus] | None = None, limit: int = 200) -> list[Job]:
    """Fine-tunes, newest first (exports are listed with their job: :func:`export_tasks`)."""
    stmt = select(Job).where(Job.kind == KIND_FINETUNE).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    if statuses:
        stmt = stmt.where(Job.status.in_([S(st).value for st in statuses]))
    return list(s.scalars(stmt))


def sweep_job_ids(s: Session, sweep_id: str) -> list[int]:
    """The jobs of one sweep, in the order they were queued."""
    return list(s.scalars(select(Job.id).where(Job.sweep_id == sweep_id).order_by(Job.id)))


def sweeps(s: Session, limit: int = 50) -> list[tuple[str, int, datetime]]:
    """(sweep id, job count, first job's creation time), newest sweep first."""
    stmt = (select(Job.sweep_id, func.count(Job.id), func.min(Job.created_at)).where(Job.sweep_id.is_not(None))
            .group_by(Job.sweep_id).order_by(func.min(Job.created_at).desc()).limit(limit))
    return [tuple(row) for row in s.execute(stmt)]


def running_jobs(s: Session) -> list[Job]:
    """Every running row, fine-tunes and exports alike (for recovery)."""
    return list(s.scalars(select(Job).where(Job.status == S.RUNNING.value)))


def metrics(s: Session, job_id: int, after_step: int = 0) -> list[Metric]:
    return list(s.scalars(select(Metric).where(Metric.job_id == job_id, Metric.step > after_step)
                          .order_by(Metric.step)))


def artifacts(s: Session, job_id: int) -> list[Artifact]:
    return list(s.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.kind)))


def delete_job(s: Session, job_id: int) -> None:
    """Remove a job that is not running, with its metrics and artifact rows (not its files)."""
    changed = s.execute(delete(Job).where(Job.id == job_id, Job.status != S.RUNNING.value)
                        .execution_options(synchronize_session=False)).rowcount
    if changed != 1:
        if s.get(Job, job_id) is None:
            raise JobStateError(f"Job {job_id} does not exist; refresh the job list.")
        raise JobStateError(f"Job {job_id} is running; cancel it and wait until it stops, then delete it.")
