"""A job that asks for several devices: the worker that claimed it runs it as ``torchrun`` with
one rank per device it owns (``jobs.rank``), and waits.

The worker's stop (SIGTERM/Ctrl-C) goes to torchrun, which passes it to the ranks: rank 0
checkpoints after the current step and hands the job back, as a one-device job does. torchrun
dies with the worker (Linux parent-death signal) and the ranks die with torchrun, so a
SIGKILLed worker leaves no rank behind and its job is recovered like any other. A job left
running when torchrun ends (a rank crashed before rank 0 could record it) is marked failed with
the ranks' last log lines.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from qalora.training.distributed import die_with_parent
from storage import IllegalTransition, JobStatus, db, repo

from .pipeline import note

RANKS_LOG = "ranks.log"


# How long torchrun waits, after passing on a stop, before it kills the ranks: long enough for rank 0
# to reach its next step or stage boundary in the longest stage (quantizing a large base with GPTQ)
# and hand the job back. torchrun's own default is 30 s, after which a stopped job was marked failed.
SHUTDOWN_S = int(os.environ.get("QALORA_RANKS_SHUTDOWN_S", "1800"))


def command(job_id: int, worker_id: str, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--shutdown-timeout={SHUTDOWN_S}", "-m", "jobs.rank", str(job_id), worker_id]


def run_distributed(job_id: int, worker_id: str, nproc: int, artifact_dir: str | Path,
                    shutdown: threading.Event, gpus: list[str] | None = None) -> str:
    """Run claimed job ``job_id`` on ``nproc`` ranks (GPUs ``gpus`` when given); returns its status."""
    folder = Path(artifact_dir)
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                    os.environ.get("PYTHONPATH")]))}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[:nproc])
    else:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    note(job_id, folder, f"running on {nproc} processes ({'GPUs ' + ','.join(gpus[:nproc]) if gpus else 'gloo, CPU'})"
                         f" with torchrun; the ranks' output is in {RANKS_LOG}")
    with open(folder / RANKS_LOG, "ab") as out:
        proc = subprocess.Popen(command(job_id, worker_id, nproc), env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)  # runs in the child, before exec
        asked = False
        while proc.poll() is None:
            if shutdown.wait(0.5) and not asked:
                proc.send_signal(signal.SIGTERM)  # torchrun passes it on; rank 0 stops after its step
                asked = True
        code = proc.wait()
    with db() as s:
        job = repo.get_job(s, job_id)
        status, owner = job.status, job.worker_id
    if status == JobStatus.RUNNING.value and owner == worker_id:
        with open(folder / RANKS_LOG, encoding="utf-8", errors="replace") as f:
            tail = "".join(deque(f, maxlen=8)).strip()
        message = (f"a rank of the {nproc}-process run ended without recording the job (torchrun exit code {code}); "
                   f"last lines of {RANKS_LOG}: {tail[-1500:]}")
        try:
            with db() as s:
                repo.fail(s, job_id, worker_id, message)
        except IllegalTransition:
            pass
        note(job_id, folder, f"failed: {message}")
        return JobStatus.FAILED.value
    return status
