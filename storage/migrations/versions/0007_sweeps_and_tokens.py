"""jobs.sweep_id: the jobs queued together by one sweep (cancelled together, compared together);
metrics.tokens_seen: training tokens seen up to a step, for loss curves by tokens.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""
from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sweep_id', sa.String(length=64), nullable=True))
        batch_op.create_index('ix_jobs_sweep_id', ['sweep_id'], unique=False)
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tokens_seen', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.drop_column('tokens_seen')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_sweep_id')
        batch_op.drop_column('sweep_id')
