"""export_tasks.result and .heartbeat_at: an export asked for after its job ended keeps what it
measured (the card and the download read it), and its worker's heartbeat, so an export orphaned on
another host is recovered as a job is. Existing rows get neither (a finished task needs none; a
running one is recovered by its worker's pid, as before, or by the missing heartbeat).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""
from alembic import op
import sqlalchemy as sa

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('export_tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('result', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('export_tasks', schema=None) as batch_op:
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('result')
