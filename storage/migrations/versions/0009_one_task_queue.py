"""One task queue: jobs.kind and jobs.parent_id; export tasks become rows of jobs.

Fine-tunes and the exports asked for after a job ended are rows of one table, claimed with one
compare-and-set, with one heartbeat and one recovery (a stale worker on any host, a dead pid on
this one). An export's row has kind 'export', its job as parent, the parent's folder, the format in
its spec and what it measured in its report. Existing export tasks move over (their status mapped:
done -> succeeded); the export_tasks table goes.

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

STATUS = {"queued": "queued", "running": "queued", "done": "succeeded", "failed": "failed"}  # a running
# task's worker was stopped for the upgrade: queued again


def _jobs():
    return sa.table('jobs', sa.column('id', sa.Integer), sa.column('name', sa.String), sa.column('status', sa.String),
                    sa.column('spec', sa.JSON), sa.column('created_at', sa.DateTime),
                    sa.column('finished_at', sa.DateTime), sa.column('step', sa.Integer),
                    sa.column('total_steps', sa.Integer), sa.column('error', sa.Text),
                    sa.column('attempts', sa.Integer), sa.column('devices', sa.Integer),
                    sa.column('cancel_requested', sa.Boolean), sa.column('artifact_dir', sa.String),
                    sa.column('report', sa.JSON), sa.column('kind', sa.String), sa.column('parent_id', sa.Integer))


def upgrade() -> None:
    # on SQLite a foreign key means rebuilding the table (storage.db.migrate turns foreign keys off
    # around migrations, so the rows that reference jobs stay); AUTOINCREMENT is kept (0002)
    with op.batch_alter_table('jobs', schema=None, table_kwargs={'sqlite_autoincrement': True}) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), nullable=False, server_default='finetune'))
        batch_op.add_column(sa.Column('parent_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_parent_id'), ['parent_id'], unique=False)
        batch_op.create_foreign_key('fk_jobs_parent_id_jobs', 'jobs', ['parent_id'], ['id'], ondelete='CASCADE')
    conn = op.get_bind()
    rows = conn.execute(sa.text(
        "SELECT t.job_id, t.format, t.status, t.path, t.note, t.error, t.created_at, t.finished_at, j.artifact_dir "
        "FROM export_tasks t JOIN jobs j ON j.id = t.job_id ORDER BY t.id").columns(
            created_at=sa.DateTime, finished_at=sa.DateTime)).all()
    for r in rows:
        report = {"format": r.format, "path": r.path, "note": r.note} if r.path else None
        conn.execute(_jobs().insert().values(
            name=f"export {r.format} of job #{r.job_id}", status=STATUS.get(r.status, "failed"),
            spec={"format": r.format}, created_at=r.created_at, finished_at=r.finished_at, step=0, total_steps=0,
            error=r.error, attempts=1 if r.status in ("done", "failed") else 0, devices=1, cancel_requested=False,
            artifact_dir=r.artifact_dir, report=report, kind='export', parent_id=r.job_id))
    conn.execute(sa.text("UPDATE jobs SET queue_position = id WHERE queue_position IS NULL"))
    op.drop_index(op.f('ix_export_tasks_job_id'), table_name='export_tasks')
    op.drop_table('export_tasks')


def downgrade() -> None:
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
                    sa.PrimaryKeyConstraint('id'))
    op.create_index(op.f('ix_export_tasks_job_id'), 'export_tasks', ['job_id'], unique=False)
    conn = op.get_bind()
    back = {"succeeded": "done", "failed": "failed"}
    for r in conn.execute(sa.text("SELECT parent_id, spec, status, report, error, created_at, finished_at FROM jobs "
                                  "WHERE kind = 'export' ORDER BY id").columns(
            spec=sa.JSON, report=sa.JSON, created_at=sa.DateTime, finished_at=sa.DateTime)).all():
        spec, report = r.spec, r.report
        conn.execute(sa.text("INSERT INTO export_tasks (job_id, format, status, path, note, error, created_at, "
                             "finished_at) VALUES (:j, :f, :s, :p, :n, :e, :c, :d)"),
                     dict(j=r.parent_id, f=spec["format"], s=back.get(r.status, "queued"),
                          p=(report or {}).get("path"), n=(report or {}).get("note"), e=r.error, c=r.created_at,
                          d=r.finished_at))
    conn.execute(sa.text("DELETE FROM jobs WHERE kind = 'export'"))
    with op.batch_alter_table('jobs', schema=None, table_kwargs={'sqlite_autoincrement': True}) as batch_op:
        batch_op.drop_constraint('fk_jobs_parent_id_jobs', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_jobs_parent_id'))
        batch_op.drop_column('parent_id')
        batch_op.drop_column('kind')
