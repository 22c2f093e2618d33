"""The job queue on a PostgreSQL server shared by many workers: claims racing from several
processes, and a worker on another machine that dies mid-job (its pid means nothing here)."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from sqlalchemy import select, text

from jobs import service
from jobs.worker import Worker
from storage import Job, db, repo, utcnow
from test_worker import ROOT, SAVE_EVERY, steps_of, tiny_data, tiny_spec, wait_for

pytestmark = pytest.mark.postgresql_only

JOBS = 1_000
CLAIMERS = 4
STALE_S = 2
# One process: connect, say ready, wait for the go line on stdin, then claim until the queue is empty.
CLAIMER = """
import json, sys
from storage import db, get_engine, repo
get_engine()
print("ready", flush=True)
sys.stdin.readline()
claimed = []
while True:
    with db() as s:
        job_id = repo.claim(s, sys.argv[1])
    if job_id is None:
        break
    claimed.append(job_id)
print(json.dumps(claimed), flush=True)
"""


def test_processes_racing_for_a_thousand_jobs_claim_each_exactly_once(store):
    with db() as s:
        ids = [repo.create_job(s, name=f"j{i}", spec={"base": "tiny-random"}, total_steps=1) for i in range(JOBS)]
        # the claim is safe at the server's default isolation, not only at a stricter one
        assert s.execute(text("SHOW transaction_isolation")).scalar() == "read committed"
    workers = [f"racer-{n}" for n in range(CLAIMERS)]
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, w], cwd=ROOT, env=dict(os.environ), text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for w in workers]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * CLAIMERS
        start = time.monotonic()
        for p in procs:  # all at once: every process is connected and waiting
            p.stdin.write("go\n")
            p.stdin.flush()
        claimed = {w: json.loads(p.communicate(timeout=300)[0]) for w, p in zip(workers, procs)}
        took = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
    every = [job_id for got in claimed.values() for job_id in got]
    double = sum(n - 1 for n in Counter(every).values())
    lost = len(set(ids) - set(every))
    print(f"\n{JOBS} jobs, {CLAIMERS} processes: {double} claimed twice, {lost} lost, {took:.2f} s; "
          f"per process {[len(got) for got in claimed.values()]}")
    assert (double, lost, sorted(every)) == (0, 0, sorted(ids))
    assert all(claimed.values()), "every process got some: they really raced"
    owner = {job_id: w for w, got in claimed.items() for job_id in got}
    with db() as s:
        rows = s.execute(select(Job.id, Job.worker_id, Job.status, Job.attempts)).all()
    assert {r.id: r.worker_id for r in rows} == owner  # the row names the process that got it
    assert {(r.status, r.attempts) for r in rows} == {("running", 1)}


def test_a_worker_killed_on_another_host_is_recovered_when_its_heartbeat_goes_stale(store, tmp_path,
                                                                                    monkeypatch):
    total = 30
    job_id = service.submit(tiny_spec(tiny_data(tmp_path / "d.jsonl"), steps=total))
    with open(tmp_path / "victim.log", "w") as out:
        victim = subprocess.Popen([sys.executable, "-m", "jobs.worker"], cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT, env={**os.environ, "QALORA_HOSTNAME": "another-host"})
    try:
        wait_for(lambda: service.get_job(job_id)["step"] >= 2 * SAVE_EVERY + 2)  # past the step-10 checkpoint
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    orphan = service.get_job(job_id)
    assert orphan["status"] == "running" and orphan["worker_id"].startswith("another-host:")

    # Its pid is dead here, but it names another machine's process: only its silence counts.
    monkeypatch.setenv("QALORA_STALE_S", "600")
    assert Worker().recover() == []
    monkeypatch.setenv("QALORA_STALE_S", str(STALE_S))
    with db() as s:
        beat = repo.get_job(s, job_id).heartbeat_at
    time.sleep(max(0.0, STALE_S + 0.2 - (utcnow() - beat).total_seconds()))
    assert Worker().run(burst=True) == 1  # interrupts, requeues and resumes it from the checkpoint

    job = service.get_job(job_id)
    assert (job["status"], job["attempts"]) == ("succeeded", 2), job["error"]
    assert job["report"]["resumed_from_step"] in (10, 15)  # the last checkpoint before the kill
    assert steps_of(job_id) == list(range(1, total + 1))  # every step once, none twice
    log = service.read_log(job_id, tail=10_000)
    assert f"interrupted: worker {orphan['worker_id']} sent no heartbeat for over {STALE_S} s" in log
