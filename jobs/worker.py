"""The worker: recovers orphaned jobs, claims the next queued one, runs it, repeats.

    python -m jobs.worker            # run until SIGTERM / Ctrl-C
    python -m jobs.worker --burst    # exit once the queue is empty

Each worker process holds one of ``QALORA_WORKERS`` slot locks under ``QALORA_HOME/workers``
(default one: one job at a time per device); a worker started when every slot is held exits
at once (``--wait-for-slot``: waits until one frees), so nothing double-books the device. A job's
failure is recorded on the job and the loop goes on (huey's ``Worker.loop``).

The app starts its workers with ``--die-with-parent --wait-for-slot``: a worker gets SIGTERM when
the app dies, however it dies (Linux's parent-death signal), so it hands its job back after the
current step instead of training on as an orphan; and a worker of a restarted app waits for the
slot a dying orphan still holds, then recovers the job at once (its owner's process is gone).
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import threading
from datetime import timedelta
from typing import IO

from sqlalchemy.engine import make_url

from storage import KIND_EXPORT, TASK_KINDS, IllegalTransition, Settings, db, get_settings, repo, utcnow

from .identity import gone as worker_gone, new_worker_id
from .pipeline import note, run_job

log = logging.getLogger("qalora.worker")


def acquire_slot(settings: Settings, wait: threading.Event | None = None, every_s: float = 0.5) -> IO | None:
    """An exclusively locked slot file (released by the OS when this process dies), or None.

    ``wait``: keep trying every ``every_s`` seconds until a slot frees or ``wait`` is set.
    """
    folder = settings.home / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for i in range(settings.workers):
            handle = open(folder / f"slot-{i}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            return handle
        if wait is None or wait.wait(every_s):
            return None


def die_with_parent() -> None:
    """SIGTERM when the process that started this one dies (Linux): the job is handed back after its
    current step. Exits at once if that process is already gone."""
    parent = os.getppid()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent or parent == 1:  # it died before the signal was armed
        raise SystemExit(0)


def recover_orphans(recoverer: str | None = None) -> list[int]:
    """Mark running rows (fine-tunes and exports: one queue) whose worker died (gone from this
    host, or silent past ``QALORA_STALE_S`` on any host) interrupted and requeue them. Any worker, or
    the app, may call it: whoever notices first. Returns the requeued rows.

    The next run resumes from the job's last checkpoint. A job that has already been started
    ``QALORA_MAX_ATTEMPTS`` times stays interrupted for a human to look at.
    """
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.stale_s)
    with db() as s:
        running = [(j.id, j.worker_id, j.heartbeat_at, j.attempts, j.folder) for j in repo.running_jobs(s)]
    requeued = []
    for job_id, owner, beat, attempts, artifact_dir in running:
        gone = owner != recoverer and worker_gone(owner)
        if not gone and beat is not None and beat >= cutoff:
            continue
        why = (f"worker {owner} died" if gone else
               f"worker {owner} sent no heartbeat for over {settings.stale_s:g} s")
        retry = attempts < settings.max_attempts
        if not retry:
            why += (f"; the job has been started {attempts} times, so it is left for you: read its log, "
                    "then resume it (if the worker was killed for memory, reduce batch size or "
                    "sequence length)")
        try:
            with db() as s:
                repo.interrupt(s, job_id, owner, reason=why, stale_before=None if gone else cutoff)
                if retry:
                    repo.requeue(s, job_id)
        except IllegalTransition:
            continue  # it finished, or heartbeated, or another worker recovered it first
        note(job_id, artifact_dir, f"interrupted: {why}" + ("; requeued to resume from the last checkpoint"
                                                             if retry else ""))
        log.warning("job %d interrupted: %s", job_id, why)
        if retry:
            requeued.append(job_id)
    return requeued


class Worker:
    def __init__(self, worker_id: str | None = None):
        from .devices import capacity, visible_gpus

        self.id = worker_id or new_worker_id()
        # the devices this worker owns: jobs asking for more are left to a bigger worker
        self.gpus, self.capacity = visible_gpus(), capacity()
        self.stop = threading.Event()

    def recover(self) -> list[int]:
        """:func:`recover_orphans`, as this worker."""
        return recover_orphans(self.id)

    def run_tasks(self) -> int:
        """Run the queued tasks asked of finished jobs (exports, benchmarks), oldest first, until a
        job is queued; returns how many ran."""
        from .pipeline import run_benchmark, run_export

        ran = 0
        while not self.stop.is_set():
            with db() as s:
                if repo.queued_ids(s):
                    return ran  # training jobs go first
                task_id = repo.claim(s, self.id, kind=TASK_KINDS)
                kind = task_id and repo.get_job(s, task_id).kind
            if task_id is None:
                return ran
            run = run_export if kind == KIND_EXPORT else run_benchmark
            log.info("%s task %d: %s", kind, task_id, run(task_id, self.id))
            ran += 1
        return ran

    def run_one(self, job_id: int) -> str:
        """Run a job this worker claimed: in this process, or as torchrun when it asks for several devices."""
        with db() as s:
            job = repo.get_job(s, job_id)
            wanted, folder = int(job.devices or 1), job.folder
        if wanted > 1:
            from .distributed_job import run_distributed
            return run_distributed(job_id, self.id, wanted, folder, self.stop, self.gpus)
        return run_job(job_id, self.id, shutdown=self.stop)

    def run(self, *, burst: bool = False, max_jobs: int | None = None) -> int:
        """Loop until ``stop`` is set (or the queue is empty with ``burst``); returns jobs run."""
        settings = get_settings()
        ran = 0
        log.info("worker %s watching %s", self.id, make_url(settings.db_url).render_as_string(hide_password=True))
        while not self.stop.is_set():
            try:
                self.recover()
                with db() as s:
                    job_id = repo.claim(s, self.id, max_devices=self.capacity)
            except Exception:
                log.exception("cannot reach the job database; retrying in %g s", settings.poll_s)
                self.stop.wait(settings.poll_s)
                continue
            if job_id is None:
                if self.run_tasks():
                    continue  # exports and benchmarks asked of ended jobs run while no job waits
                if burst:
                    break
                self.stop.wait(settings.poll_s)
                continue
            log.info("running job %d", job_id)
            try:
                status = self.run_one(job_id)
                log.info("job %d ended %s", job_id, status)
            except Exception:
                log.exception("job %d: unexpected error outside the job; going on", job_id)
            ran += 1
            if max_jobs is not None and ran >= max_jobs:
                break
        return ran


def run_here(job_id: int) -> str:
    """Run queued job ``job_id`` in this process now (``python -m jobs sweep --local``); returns its
    status. Ctrl-C stops it after its current step and puts it back in the queue (``queued``)."""
    worker = Worker()
    with db() as s:
        repo.claim(s, worker.id, job_id)
    previous = signal.signal(signal.SIGINT, lambda *_: worker.stop.set())
    try:
        return worker.run_one(job_id)
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--burst", action="store_true", help="exit when no job is queued")
    parser.add_argument("--max-jobs", type=int, default=None, help="exit after running this many jobs")
    parser.add_argument("--wait-for-slot", action="store_true", help="wait for a free slot instead of exiting")
    parser.add_argument("--die-with-parent", action="store_true",
                        help="stop (handing the job back) when the process that started this one dies")
    args = parser.parse_args(argv)
    if args.die_with_parent:
        die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(process)d %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per migration step is noise here
    logging.getLogger("torchao").setLevel(logging.ERROR)  # optional GPU kernels it cannot load: noise
    settings = get_settings()
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    slot = acquire_slot(settings)
    if slot is None and args.wait_for_slot:
        log.info("all %d worker slot(s) for %s are taken (QALORA_WORKERS=%d); waiting for one",
                 settings.workers, settings.home, settings.workers)
        slot = acquire_slot(settings, wait=stopping)
    if slot is None:
        log.info("all %d worker slot(s) for %s are taken (QALORA_WORKERS=%d); exiting",
                 settings.workers, settings.home, settings.workers)
        return 0
    from qalora.memory import limit_heap_retention
    limit_heap_retention()  # a worker process runs job after job: keep freed temporaries out of its heap
    # A file-size limit (RLIMIT_FSIZE) makes a write fail with EFBIG, failing the job with a
    # disk-space message, instead of killing the worker with SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    worker = Worker()
    worker.stop = stopping  # SIGTERM/Ctrl-C: the running job checkpoints after its current step and goes back
    try:
        worker.run(burst=args.burst, max_jobs=args.max_jobs)
    finally:
        slot.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
