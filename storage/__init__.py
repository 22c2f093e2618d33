"""Job store: SQLAlchemy tables, the job status machine, and the ``db()`` session scope."""
from . import repo
from .db import db, get_engine, migrate
from .models import KIND_BENCHMARK, KIND_EXPORT, KIND_FINETUNE, TASK_KINDS, Artifact, Job, Metric, utcnow
from .settings import Settings, get_settings
from .status import ACTIVE, EXPORT_STATUS, TRANSITIONS, IllegalTransition, JobStateError, JobStatus

__all__ = ["repo", "db", "get_engine", "migrate", "Artifact", "Job", "Metric", "KIND_FINETUNE", "KIND_EXPORT", "KIND_BENCHMARK", "TASK_KINDS", "utcnow",
           "Settings",
           "get_settings", "ACTIVE", "EXPORT_STATUS", "TRANSITIONS", "IllegalTransition", "JobStateError", "JobStatus"]
