"""Alembic migrations for the job store; applied automatically by ``storage.db.migrate``."""
