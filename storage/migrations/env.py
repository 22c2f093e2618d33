"""Alembic environment, driven from ``storage.db.migrate`` with an open connection (no alembic.ini).

To write a new revision after changing ``storage/models.py``, from the repository root:
``python -m storage.migrations.revise "what changed"``.
"""
from alembic import context

from storage.models import Base

connection = context.config.attributes["connection"]
# render_as_batch: SQLite cannot ALTER most column properties, batch mode copies the table instead
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
