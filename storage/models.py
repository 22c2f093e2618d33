"""Tables: jobs (fine-tunes and the exports asked for after them), their per-step metrics, and the
files they produced.

Times are naive UTC ``datetime``s: SQLite has no time zones, so one convention everywhere.
The schema here and ``migrations/versions`` must agree; ``tests/test_storage.py`` checks that.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer,
                        String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .status import JobStatus


KIND_FINETUNE, KIND_EXPORT, KIND_BENCHMARK = "finetune", "export", "benchmark"
TASK_KINDS = (KIND_EXPORT, KIND_BENCHMARK)  # what is asked of a finished job, run while no job waits


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    spec: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    stage: Mapped[str | None] = mapped_column(String(32))
    # Progress inside the current stage (layers quantized, questions scored) and when it began.
    stage_done: Mapped[int | None] = mapped_column(Integer)
    stage_total: Mapped[int | None] = mapped_column(Integer)
    stage_started_at: Mapped[datetime | None] = mapped_column(DateTime)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    eta_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Last real progress (a step, a stage, a layer loaded): the heartbeat alone says the worker
    # lives, not that the job moves; a stuck CUDA call keeps beating but stops progressing.
    progress_at: Mapped[datetime | None] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Seconds the earlier attempts ran (each from its start to its last sign of life), added when
    # the job is claimed again: with the current attempt, the job's wall time over all attempts.
    earlier_run_s: Mapped[float | None] = mapped_column(Float)
    # Where a queued job stands: workers claim the lowest first. A new job takes its id (first
    # come, first served, and a resumed job keeps its place ahead of later ones); moving a job
    # up or down swaps it with its neighbour.
    queue_position: Mapped[int | None] = mapped_column(Integer)
    # The jobs one sweep queued share this id: listed, compared and canceled together.
    sweep_id: Mapped[str | None] = mapped_column(String(64), index=True)
    # Devices the job trains on (one rank each); a worker claims only jobs that fit what it owns.
    devices: Mapped[int | None] = mapped_column(Integer, default=1)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # What the row asks a worker to do: train ("finetune"), write an export of a finished job's
    # model ("export": ``parent_id`` is that job, the folder is its folder, the format is in the
    # spec and what the export measured in the report), or benchmark it ("benchmark": the settings
    # in the spec, the scores in the report). One queue, one claim, one recovery.
    kind: Mapped[str] = mapped_column(String(16), default=KIND_FINETUNE, server_default=KIND_FINETUNE)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # The job's folder, relative to QALORA_ARTIFACTS (``job-00042``), so every machine finds it
    # under its own mount of the shared folder; read it as ``folder``.
    artifact_dir: Mapped[str | None] = mapped_column(String(1024))
    report: Mapped[dict | None] = mapped_column(JSON)

    @property
    def folder(self):
        """The job's folder on this machine (``Path``), or ``None`` before it has one."""
        from .settings import get_settings
        return get_settings().job_folder(self.artifact_dir)

    metrics: Mapped[list[Metric]] = relationship(back_populates="job", cascade="all, delete-orphan",
                                                 passive_deletes=True, order_by="Metric.step")
    artifacts: Mapped[list[Artifact]] = relationship(back_populates="job", cascade="all, delete-orphan",
                                                     passive_deletes=True)

    # AUTOINCREMENT: SQLite never hands out the id of a deleted job again, so a new job can never
    # meet an old job's artifact folder (server databases' sequences never reuse ids anyway).
    __table_args__ = (Index("ix_jobs_status_created", "status", "created_at"), {"sqlite_autoincrement": True})


class Metric(Base):
    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    elapsed_s: Mapped[float | None] = mapped_column(Float)
    tokens_seen: Mapped[int | None] = mapped_column(BigInteger)  # training tokens up to this step
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="metrics")

    # a resumed job re-trains the steps after its last checkpoint; one row per step, ever
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_metrics_job_step"),)


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="artifacts")
