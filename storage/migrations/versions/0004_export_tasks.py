"""export_tasks: exports asked for after a job ended, written by a worker.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('export_tasks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('worker_id', sa.String(length=128), nullable=True),
    sa.Column('path', sa.String(length=1024), nullable=True),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('export_tasks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_export_tasks_job_id'), ['job_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('export_tasks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_export_tasks_job_id'))
    op.drop_table('export_tasks')
