"""Job store: SQLAlchemy tables, the job status machine, and the ``db()`` session scope."""
from . import repo
from .db import db, get_engine, migrate
from .models import Artifact, ExportTask, Job, Metric, utcnow
from .settings import Settings, get_settings
from .status import ACTIVE, TRANSITIONS, IllegalTransition, JobStateError, JobStatus

__all__ = ["repo", "db", "get_engine", "migrate", "Artifact", "ExportTask", "Job", "Metric", "utcnow", "Settings",
           "get_settings", "ACTIVE", "TRANSITIONS", "IllegalTransition", "JobStateError", "JobStatus"]
