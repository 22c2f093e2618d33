"""Job ids are never reused: jobs gets SQLite's AUTOINCREMENT (the table is rebuilt, rows kept).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return  # server databases' sequences never reuse ids
    # storage.db.migrate turns foreign keys off around migrations, so rebuilding jobs keeps the
    # metrics and artifacts that reference it (with them on, dropping the old table would cascade).
    with op.batch_alter_table('jobs', recreate='always', table_kwargs={'sqlite_autoincrement': True}):
        pass


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table('jobs', recreate='always', table_kwargs={'sqlite_autoincrement': False}):
        pass
