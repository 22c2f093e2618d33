"""jobs.stage_done / stage_total / stage_started_at: progress inside the current stage (layers
quantized, layers merged, questions scored), so every stage shows how far it is and an ETA.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stage_done', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('stage_total', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('stage_started_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('stage_started_at')
        batch_op.drop_column('stage_total')
        batch_op.drop_column('stage_done')
