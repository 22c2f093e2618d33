"""One rank of a multi-device job: ``torchrun --nproc-per-node N -m jobs.rank JOB_ID WORKER_ID``,
started by the worker that claimed the job (``jobs.distributed_job``).

Rank 0 runs the job as a one-device job runs (``pipeline.run_job``: heartbeat, metrics, log,
cancel, outcome); the other ranks only train their share. A stop (cancel, or SIGTERM from the
worker via torchrun) is rank 0's decision, which every rank follows after the current step, so
the other ranks ignore SIGTERM. A failed job exits non-zero, so torchrun ends the other ranks.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    job_id, worker_id = (argv or sys.argv[1:])[:2]
    job_id = int(job_id)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    if rank == 0:
        from .pipeline import run_job

        shutdown = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: shutdown.set())
        signal.signal(signal.SIGINT, lambda *_: shutdown.set())
        status = run_job(job_id, worker_id, shutdown=shutdown)
        logging.info("job %d: %s", job_id, status)
        return 1 if status == "failed" else 0
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 decides when to stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from storage import db, repo

    from .spec import JobSpec

    with db() as s:
        job = repo.get_job(s, job_id)
        spec, folder = JobSpec.from_dict(job.spec), job.folder
    from qalora.training.finetune import TrainingStopped, finetune

    try:
        finetune(spec.base, spec.data, folder, spec.quant, spec.adapter, spec.train, resume=True,
                 columns=spec.columns, max_samples=spec.max_samples)
    except TrainingStopped:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
