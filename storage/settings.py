"""Where the data lives and how the workers behave, read from the environment on every call.

Reading ``os.environ`` each time (instead of caching at import) lets a test point a whole
process, and the worker subprocesses it starts, at a temporary ``QALORA_HOME``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qalora.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    home: Path              # QALORA_HOME: database, worker slot locks, job artifacts by default
    artifacts: Path         # QALORA_ARTIFACTS: the jobs' folders (default home/jobs); may be a shared filesystem
    db_url: str             # QALORA_DB_URL: any SQLAlchemy URL; default a SQLite file in home
    workers: int            # QALORA_WORKERS: jobs run at once on this machine (one per device)
    heartbeat_s: float      # QALORA_HEARTBEAT_S: how often a running job proves its worker alive
    stale_s: float          # QALORA_STALE_S: silence after which a running job counts as orphaned
    poll_s: float           # QALORA_POLL_S: idle worker's wait between looks at the queue
    max_attempts: int       # QALORA_MAX_ATTEMPTS: automatic resumes before a job waits for a human
    stall_s: float          # QALORA_STALL_S: a running job with no progress this long is shown stalled

    @property
    def jobs_dir(self) -> Path:
        return self.artifacts

    def artifact_dir(self, job_id: int) -> Path:
        return self.artifacts / f"job-{job_id:05d}"

    def job_folder(self, stored: str | None) -> Path | None:
        """A job's folder on this machine: the stored name (``job-00042``) under ``QALORA_ARTIFACTS``.
        Rows from before ``QALORA_ARTIFACTS`` hold an absolute path, used as it is."""
        return None if not stored else self.artifacts / stored


def _number(name: str, default, cast):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number; unset it or give e.g. {name}={default}.") from None
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} must be positive; unset it or give e.g. {name}={default}.")
    return value


def get_settings() -> Settings:
    home = Path(os.environ.get("QALORA_HOME") or "./data").expanduser().resolve()
    url = os.environ.get("QALORA_DB_URL") or f"sqlite:///{home / 'qalora.db'}"
    artifacts = os.environ.get("QALORA_ARTIFACTS")
    return Settings(
        home=home,
        artifacts=Path(artifacts).expanduser().resolve() if artifacts else home / "jobs",
        db_url=url,
        workers=_number("QALORA_WORKERS", 1, int),
        heartbeat_s=_number("QALORA_HEARTBEAT_S", 5.0, float),
        stale_s=_number("QALORA_STALE_S", 60.0, float),
        poll_s=_number("QALORA_POLL_S", 1.0, float),
        max_attempts=_number("QALORA_MAX_ATTEMPTS", 3, int),
        stall_s=_number("QALORA_STALL_S", 1800.0, float),
    )
