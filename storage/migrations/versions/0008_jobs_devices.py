"""jobs.devices: how many devices a job trains on (one torchrun rank each); workers claim only the
jobs that fit the devices they own. Existing jobs asked for one.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""
from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('devices', sa.Integer(), nullable=True))
    op.execute("UPDATE jobs SET devices = 1")


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('devices')
