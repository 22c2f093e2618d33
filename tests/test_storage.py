"""Job store on a real SQLite file and a real PostgreSQL server: the status machine, atomic claims,
metrics, migrations. Each test that takes ``store`` runs on both (``db_url`` in conftest.py)."""
import multiprocessing as mp
import os
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from qalora.errors import ConfigError
from storage import IllegalTransition, JobStateError, JobStatus, db, get_engine, get_settings, repo, utcnow
from storage.models import Base, Job

S = JobStatus
RACE_ROUNDS = 25
# Written out by hand (not read from storage.status) so the test checks the table, not itself.
LEGAL = {(S.QUEUED, S.RUNNING), (S.QUEUED, S.CANCELED), (S.RUNNING, S.SUCCEEDED), (S.RUNNING, S.FAILED),
         (S.RUNNING, S.CANCELED), (S.RUNNING, S.INTERRUPTED), (S.INTERRUPTED, S.QUEUED),
         (S.INTERRUPTED, S.CANCELED), (S.FAILED, S.QUEUED), (S.CANCELED, S.QUEUED)}


@pytest.fixture
def store(job_store):
    return job_store


def _head() -> str:
    from alembic.script import ScriptDirectory

    from storage.db import _alembic_config
    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


def _new_job(s, store, steps=10) -> int:
    return repo.create_job(s, name="t", spec={"k": 1}, total_steps=steps)


def _job_in(store, status: JobStatus, worker="w1") -> int:
    """A job brought to ``status`` through legal transitions only."""
    with db() as s:
        job_id = _new_job(s, store)
    with db() as s:
        if status != S.QUEUED:
            repo.claim(s, worker, job_id)
        if status == S.SUCCEEDED:
            repo.succeed(s, job_id, worker, {})
        elif status == S.FAILED:
            repo.fail(s, job_id, worker, "boom")
        elif status == S.CANCELED:
            repo.cancel(s, job_id, worker)
        elif status == S.INTERRUPTED:
            repo.interrupt(s, job_id, worker, reason="gone")
    return job_id


def _move(s, job_id: int, target: JobStatus, worker="w1") -> None:
    {S.RUNNING: lambda: repo.claim(s, "w2", job_id),
     S.SUCCEEDED: lambda: repo.succeed(s, job_id, worker, {"ok": 1}),
     S.FAILED: lambda: repo.fail(s, job_id, worker, "boom"),
     S.CANCELED: lambda: repo.cancel(s, job_id, worker),
     S.INTERRUPTED: lambda: repo.interrupt(s, job_id, worker, reason="gone"),
     S.QUEUED: lambda: repo.requeue(s, job_id)}[target]()


@pytest.mark.parametrize("current", list(S))
def test_every_transition_is_allowed_or_raises(store, current):
    for target in S:
        job_id = _job_in(store, current)
        if (current, target) in LEGAL:
            with db() as s:
                _move(s, job_id, target)
            with db() as s:
                assert repo.get_job(s, job_id).status == target.value
        else:
            with pytest.raises(IllegalTransition) as err, db() as s:
                _move(s, job_id, target)
            assert err.value.current == current and f"it is {current.value}" in str(err.value)
            with db() as s:
                assert repo.get_job(s, job_id).status == current.value  # nothing half-applied


def test_running_job_is_moved_only_by_its_own_worker(store):
    job_id = _job_in(store, S.RUNNING, worker="w1")
    for move in (lambda s: repo.succeed(s, job_id, "w2"), lambda s: repo.cancel(s, job_id),
                 lambda s: repo.interrupt(s, job_id, "w2", reason="x")):
        with pytest.raises(IllegalTransition, match="running on worker w1"), db() as s:
            move(s)
    with db() as s:
        assert repo.request_cancel(s, job_id) and repo.get_job(s, job_id).cancel_requested
        assert not repo.heartbeat(s, job_id, "w2")
        repo.cancel(s, job_id, "w1")
    with db() as s:
        job = repo.get_job(s, job_id)
        assert (job.status, job.attempts, job.finished_at is not None) == ("canceled", 1, True)
        assert not repo.request_cancel(s, job_id)


def test_claim_takes_oldest_queued_first_and_resume_clears_the_run(store):
    ids = [_job_in(store, S.QUEUED) for _ in range(3)]
    with db() as s:
        assert repo.claim(s, "w") == ids[0]
        repo.fail(s, ids[0], "w", "bad")
        assert repo.claim(s, "w") == ids[1]
        repo.requeue(s, ids[0])
    with db() as s:
        job = repo.get_job(s, ids[0])
        assert (job.status, job.error, job.worker_id, job.attempts) == ("queued", None, None, 1)
        # by creation time: a resumed job goes before jobs submitted after it
        assert [repo.claim(s, "w") for _ in range(3)] == [ids[0], ids[2], None]


def test_queued_jobs_move_up_and_down_and_workers_claim_in_the_new_order(store):
    ids = [_job_in(store, S.QUEUED) for _ in range(4)]
    with db() as s:
        assert repo.queued_ids(s) == ids
        assert repo.move_queued(s, ids[3], "up") == [ids[0], ids[1], ids[3], ids[2]]
        assert repo.move_queued(s, ids[3], "up") == [ids[0], ids[3], ids[1], ids[2]]
        assert repo.move_queued(s, ids[0], "up") == [ids[0], ids[3], ids[1], ids[2]]  # first already: stays
        assert repo.move_queued(s, ids[0], "down") == [ids[3], ids[0], ids[1], ids[2]]
    with db() as s:
        assert repo.queued_ids(s) == [ids[3], ids[0], ids[1], ids[2]]  # stored, not just returned
        assert repo.claim(s, "w") == ids[3]
        with pytest.raises(JobStateError, match=f"Job {ids[3]} is running, not queued: only queued jobs can be moved"):
            repo.move_queued(s, ids[3], "down")
        with pytest.raises(ValueError, match="use 'up' or 'down'"):
            repo.move_queued(s, ids[0], "sideways")
        repo.fail(s, ids[3], "w", "bad")
        repo.requeue(s, ids[3])  # a resumed job keeps the place it had
    with db() as s:
        assert [repo.claim(s, "w") for _ in range(5)] == [ids[3], ids[0], ids[1], ids[2], None]


def _claimer(barrier, results, rounds):
    """Child process with its own engine: one claim per round, in lock-step with the other."""
    worker = f"w{mp.current_process().pid}"
    for _ in range(rounds):
        barrier.wait(timeout=60)
        with db() as s:
            results.put(repo.claim(s, worker))


def test_two_processes_racing_for_one_job_never_both_claim_it(store):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(barrier, results, RACE_ROUNDS)) for _ in range(2)]
    for p in procs:
        p.start()
    rounds = []
    try:
        for _ in range(RACE_ROUNDS):
            with db() as s:
                job_id = _new_job(s, store)
            barrier.wait(timeout=60)
            rounds.append((job_id, sorted([results.get(timeout=60), results.get(timeout=60)], key=str)))
    finally:
        for p in procs:
            p.join(timeout=10)
            p.kill()
    assert [got for _, got in rounds] == [sorted([job_id, None], key=str) for job_id, _ in rounds]
    with db() as s:
        jobs = repo.list_jobs(s)
    assert len(jobs) == RACE_ROUNDS and all(j.status == "running" and j.attempts == 1 for j in jobs)


def test_record_step_keeps_one_row_per_step_across_a_rewind(store):
    job_id = _job_in(store, S.RUNNING, worker="w1")
    step = dict(eval_loss=None, lr=1e-3, tokens_per_s=100.0, elapsed_s=1.0, eta_s=5.0)
    with db() as s:
        for i in range(1, 9):
            assert repo.record_step(s, job_id, "w1", step=i, train_loss=10.0 - i, **step)
    with db() as s:  # a resumed run starts again after its step-5 checkpoint
        assert repo.record_step(s, job_id, "w1", step=6, train_loss=0.5, **step)
        assert not repo.record_step(s, job_id, "w2", step=7, train_loss=0.1, **step)
    with db() as s:
        rows = repo.metrics(s, job_id)
        assert [m.step for m in rows] == [1, 2, 3, 4, 5, 6] and rows[-1].train_loss == 0.5
        assert [m.step for m in repo.metrics(s, job_id, after_step=4)] == [5, 6]
        job = repo.get_job(s, job_id)
        assert (job.step, job.loss, job.eta_s) == (6, 0.5, 5.0)


def test_stale_heartbeat_can_be_interrupted_but_a_fresh_one_cannot(store):
    job_id = _job_in(store, S.RUNNING, worker="w1")
    with db() as s:
        with pytest.raises(IllegalTransition):
            repo.interrupt(s, job_id, "w1", reason="late", stale_before=utcnow() - timedelta(seconds=60))
    with db() as s:
        repo.interrupt(s, job_id, "w1", reason="late", stale_before=utcnow() + timedelta(seconds=1))
        assert repo.get_job(s, job_id).error == "late"


def test_delete_removes_metrics_and_artifacts_and_refuses_running(store, tmp_path):
    job_id = _job_in(store, S.RUNNING, worker="w1")
    (tmp_path / "f.bin").write_bytes(b"x" * 123)
    with db() as s:
        repo.record_step(s, job_id, "w1", step=1, train_loss=1.0, eval_loss=None, lr=0.1, tokens_per_s=1.0,
                         elapsed_s=1.0, eta_s=1.0)
        repo.add_artifact(s, job_id, "report", tmp_path / "f.bin")
        with pytest.raises(JobStateError, match="cancel it"):
            repo.delete_job(s, job_id)
        repo.fail(s, job_id, "w1", "x")
    with db() as s:
        assert repo.artifacts(s, job_id)[0].size_bytes == 123
        repo.delete_job(s, job_id)
    with db() as s:
        counts = [s.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in ("jobs", "metrics", "artifacts")]
        assert counts == [0, 0, 0]
        with pytest.raises(JobStateError, match="does not exist"):
            repo.delete_job(s, job_id)


@pytest.mark.sqlite_only(reason="the PRAGMAs and the default file are SQLite's own")
def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(store):
    with get_engine().connect() as conn:
        pragmas = [conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("journal_mode", "busy_timeout",
                                                                         "foreign_keys")]
    assert pragmas == ["wal", 30000, 1]
    assert get_settings().db_url == f"sqlite:///{store.home / 'qalora.db'}"


def test_migrations_match_the_models_and_keep_history(store, db_url, tmp_path, monkeypatch):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from storage.db import _engines, migrate

    url = db_url or f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("QALORA_DB_URL", url)
    with db() as s:
        job_id = _new_job(s, store)
    engine = get_engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn)
        assert ctx.get_current_revision() == _head()
        assert compare_metadata(ctx, Base.metadata) == []  # models.py and the migrations agree
    _engines.pop((os.getpid(), url))[0].dispose()  # a fresh process: migrating again must keep every row
    migrate(get_engine(url))
    with db() as s:
        assert repo.get_job(s, job_id).spec == {"k": 1}
    assert not (store.home / "qalora.db").exists()  # QALORA_DB_URL took precedence


def _open_store(barrier, url):
    barrier.wait(timeout=60)
    get_engine(url)


def test_processes_starting_together_on_a_new_database_migrate_it_once(db_url, tmp_path):
    url = db_url or f"sqlite:///{tmp_path / 'fresh.db'}"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_open_store, args=(barrier, url)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    with get_engine(url).connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == [_head()]


def test_settings_reject_bad_numbers(monkeypatch):
    monkeypatch.setenv("QALORA_WORKERS", "two")
    with pytest.raises(ConfigError, match="QALORA_WORKERS='two' is not a number"):
        get_settings()
    monkeypatch.setenv("QALORA_WORKERS", "0")
    with pytest.raises(ConfigError, match="must be positive"):
        get_settings()


# SQLite only: AUTOINCREMENT and the table rebuild are SQLite's (revision 0002 does nothing on a server
# database, whose sequences never hand out an id twice)
def test_job_ids_are_never_reused_and_the_upgrade_keeps_every_row(tmp_path, monkeypatch):
    """A database made before AUTOINCREMENT (revision 0001) is rebuilt without losing a metric or
    artifact row; afterwards the id of a deleted job is never handed out again."""
    from alembic import command
    from sqlalchemy import create_engine

    from storage.db import _alembic_config, _engines, _on_sqlite_connect, migrate
    from sqlalchemy import event

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    event.listen(old, "connect", _on_sqlite_connect)  # foreign keys on, as in production
    with old.begin() as conn:
        command.upgrade(_alembic_config(conn), "0001")
        for job_id in (1, 2):
            conn.exec_driver_sql(
                "INSERT INTO jobs (id, name, status, spec, created_at, step, total_steps, attempts, "
                f"cancel_requested) VALUES ({job_id}, 'j', 'succeeded', '{{}}', '2026-12-01', 3, 3, 1, 0)")
            for step in (1, 2, 3):
                conn.exec_driver_sql(f"INSERT INTO metrics (job_id, step, created_at) VALUES ({job_id}, {step}, "
                                     "'2026-12-01')")
            conn.exec_driver_sql(f"INSERT INTO artifacts (job_id, kind, path, size_bytes, created_at) VALUES "
                                 f"({job_id}, 'merged', '/x', 1, '2026-12-01')")
    migrate(old)
    with old.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM metrics").scalar() == 6
        assert conn.exec_driver_sql("SELECT count(*) FROM artifacts").scalar() == 2
        sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'jobs'").scalar()
        assert "AUTOINCREMENT" in sql
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # back on after migrating
    old.dispose()

    monkeypatch.setenv("QALORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QALORA_DB_URL", url)
    _engines.clear()
    with db() as s:
        repo.delete_job(s, 2)
    with db() as s:
        new_id = repo.create_job(s, name="n", spec={}, total_steps=1)
    assert new_id == 3  # not 2: the deleted job's id (and so its artifact folder name) stays retired


def test_moves_from_many_sessions_at_once_keep_every_position_distinct(store):
    """move_queued reads the queue, then writes two positions: moves racing in other sessions wait
    for it (row locks on PostgreSQL, the write lock taken first on SQLite), so no two jobs ever
    share a place and none is lost."""
    import random
    import threading

    ids = [_job_in(store, S.QUEUED) for _ in range(6)]
    errors = []

    def mover(seed):
        rng = random.Random(seed)
        for _ in range(25):
            try:
                with db() as s:
                    repo.move_queued(s, rng.choice(ids), rng.choice(("up", "down")))
            except Exception as exc:  # reported, not swallowed
                errors.append(repr(exc))

    threads = [threading.Thread(target=mover, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with db() as s:
        positions = s.execute(select(Job.queue_position).where(Job.id.in_(ids))).scalars().all()
        assert sorted(repo.queued_ids(s)) == ids
    assert len(set(p for p in positions if p is not None)) == len([p for p in positions if p is not None])


def test_the_upgrade_to_one_queue_carries_export_tasks_over(db_url, tmp_path, monkeypatch):
    """Revision 0009: the export tasks of a database at 0008 become rows of jobs (kind 'export', their
    job as parent, its folder, the format in the spec, the path and note in the report); a task left
    running is queued again; every other row stays, and a downgrade brings them back."""
    from alembic import command
    from sqlalchemy import create_engine

    from storage.db import _alembic_config, _engines, migrate

    url = db_url or f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    with old.begin() as conn:
        command.upgrade(_alembic_config(conn), "0008")
        conn.exec_driver_sql(
            "INSERT INTO jobs (id, name, status, spec, created_at, step, total_steps, attempts, cancel_requested, "
            "artifact_dir, queue_position, devices) VALUES (7, 'j', 'succeeded', '{}', '2026-12-01', 3, 3, 1, "
            "false, 'job-00007', 7, 1)")
        for fmt, status, path in (("gguf", "done", "exports/model-q4_1.gguf"), ("peft", "running", None)):
            conn.exec_driver_sql(
                "INSERT INTO export_tasks (job_id, format, status, worker_id, path, note, created_at) VALUES "
                f"(7, '{fmt}', '{status}', 'w:1:a', {repr(path) if path else 'NULL'}, 'the note', '2026-12-02')")
    migrate(old)
    monkeypatch.setenv("QALORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QALORA_DB_URL", url)
    _engines.clear()
    with db() as s:
        assert [j.id for j in repo.list_jobs(s)] == [7]  # exports are listed with their job, not as jobs
        tasks = repo.export_tasks(s, 7)
        assert [(t.kind, t.parent_id, t.spec, t.status, t.artifact_dir) for t in tasks] == [
            ("export", 7, {"format": "gguf"}, "succeeded", "job-00007"),
            ("export", 7, {"format": "peft"}, "queued", "job-00007")]
        assert tasks[0].report == {"format": "gguf", "path": "exports/model-q4_1.gguf", "note": "the note"}
        assert repo.claim(s, "w2", kind="export") == tasks[1].id  # the one left running is claimable again
    with old.begin() as conn:
        if conn.dialect.name == "sqlite":  # as storage.db.migrate runs migrations: rebuilding jobs cascades nothing
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        command.downgrade(_alembic_config(conn), "0008")
        rows = conn.exec_driver_sql("SELECT job_id, format, status, path FROM export_tasks ORDER BY id").all()
        assert [tuple(r) for r in rows] == [(7, "gguf", "done", "exports/model-q4_1.gguf"), (7, "peft", "queued", None)]
        assert conn.exec_driver_sql("SELECT count(*) FROM jobs").scalar() == 1
    old.dispose()
    _engines.clear()
