"""Jobs ask for devices, workers own devices: a 2-device job is claimed only by a worker that owns two,
runs as torchrun (2 gloo processes on this CPU), is canceled within a step, and a SIGKILLed worker
takes its ranks along and the job resumes from its checkpoint."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs import service
from jobs.devices import capacity, split, visible_gpus
from jobs.spec import JobSpec
from jobs.worker import Worker
from qalora.config import AdapterConfig, QuantConfig, TrainConfig
from qalora.errors import ConfigError
from storage import db, get_settings, repo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("QALORA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QALORA_DB_URL", raising=False)
    monkeypatch.setenv("QALORA_HEARTBEAT_S", "0.3")
    monkeypatch.setenv("QALORA_POLL_S", "0.1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # this machine's workers own CPU processes
    monkeypatch.setenv("QALORA_DEVICE", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return get_settings()


def _spec(tmp_path, steps: int, devices: int = 2) -> JobSpec:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and {i % 7}.", "output": str(i + i % 7)}) + "\n"
                            for i in range(40)))
    train = TrainConfig(steps=steps, batch_size=2, seq_len=64, warmup_steps=1, eval_every=50, save_every=4,
                        eval_batches=1)
    return JobSpec(base="tiny-random", data=str(data), quant=QuantConfig(4, 32),
                   adapter=AdapterConfig(rank=4, alpha=8, dropout=0.0), train=train, devices=devices)


def _wait(predicate, timeout=180.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s")


def _ranks_alive(job_id: int) -> list[str]:
    """Live processes running this job's ranks (torchrun's command line names them too)."""
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if f"jobs.rank {job_id} " in cmd and state != "Z":  # a zombie has exited
            alive.append(proc.name)
    return alive


def test_the_machine_s_gpus_are_split_among_its_workers():
    assert split(["0", "1", "2", "3", "4", "5", "6", "7"], 3) == [["0", "1", "2"], ["3", "4", "5"], ["6", "7"]]
    assert split(["0", "1"], 4) == [["0"], ["1"]]  # never a worker without a device
    assert split([], 2) == [[], []]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert capacity({"CUDA_VISIBLE_DEVICES": "2,3"}) == 2
    assert capacity({"CUDA_VISIBLE_DEVICES": "", "QALORA_WORKER_DEVICES": "3"}) == 3
    with pytest.raises(ConfigError, match="QALORA_WORKER_DEVICES='two' is not a whole number"):
        capacity({"CUDA_VISIBLE_DEVICES": "", "QALORA_WORKER_DEVICES": "two"})
    with pytest.raises(ConfigError, match="a job trains on 1 to 64 devices"):
        JobSpec(devices=0)


def test_a_worker_claims_only_jobs_that_fit_the_devices_it_owns(store, tmp_path):
    big = service.submit(_spec(tmp_path, 4, devices=2))
    small = service.submit(_spec(tmp_path, 4, devices=1))
    with db() as s:
        assert repo.claim(s, "host:1:one", max_devices=1) == small  # the 2-device job waits, first or not
        assert repo.claim(s, "host:1:one", max_devices=1) is None
        assert repo.claim(s, "host:2:two", max_devices=2) == big
    assert service.get_job(big)["spec"]["devices"] == 2


def test_a_two_device_job_runs_as_torchrun_and_a_killed_worker_takes_its_ranks_along(store, tmp_path, monkeypatch):
    monkeypatch.setenv("QALORA_WORKER_DEVICES", "2")
    total = 40
    job_id = service.submit(_spec(tmp_path, total))
    victim = subprocess.Popen([sys.executable, "-m", "jobs.worker"], cwd=ROOT, env=dict(os.environ),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: service.get_job(job_id)["step"] >= 6)  # past the step-4 checkpoint
    assert len(_ranks_alive(job_id)) == 3  # torchrun and its 2 ranks
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    _wait(lambda: not _ranks_alive(job_id), timeout=30)  # torchrun and both ranks died with the worker
    assert service.get_job(job_id)["status"] == "running"  # nobody has noticed yet
    assert Worker().run(burst=True) == 1  # sees the dead worker, requeues, resumes on 2 ranks again
    job = service.get_job(job_id)
    assert (job["status"], job["attempts"]) == ("succeeded", 2), job["error"]
    report = job["report"]
    assert (report["world_size"], report["global_batch"], report["steps"]) == (2, 4, total)
    assert report["resumed_from_step"] % 4 == 0 and 4 <= report["resumed_from_step"] < total and report["merge_max_abs_logit_diff"] < 1e-4
    assert [m["step"] for m in job["metrics"]] == list(range(1, total + 1))  # every step once
    log = service.read_log(job_id, tail=10_000)
    assert "running on 2 processes (gloo, CPU) with torchrun" in log and "died" in log
    assert (Path(job["artifact_dir"]) / "ranks.log").is_file()


def test_a_two_device_job_is_canceled_within_a_step_and_its_ranks_end(store, tmp_path, monkeypatch):
    monkeypatch.setenv("QALORA_WORKER_DEVICES", "2")
    job_id = service.submit(_spec(tmp_path, 400))
    worker = Worker()
    thread = threading.Thread(target=worker.run, kwargs={"max_jobs": 1})
    thread.start()
    _wait(lambda: service.get_job(job_id)["step"] >= 3)
    at = service.cancel(job_id)["step"]
    thread.join(timeout=120)
    job = service.get_job(job_id)
    assert job["status"] == "canceled" and job["step"] <= at + 2
    assert not _ranks_alive(job_id)


def test_the_app_gives_each_worker_its_share_of_the_gpus(store, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    monkeypatch.setenv("QALORA_WORKERS", "2")
    given, popen = [], subprocess.Popen  # what each worker process is started with (its environment)
    monkeypatch.setattr(service.subprocess, "Popen", lambda *a, **kw: given.append(kw["env"]) or popen(*a, **kw))
    procs = service.start_worker_process()
    try:
        assert [env["CUDA_VISIBLE_DEVICES"] for env in given] == ["0,1", "2"]
        for proc, env in zip(procs, given):  # and each live process runs with it (a zombie's environ reads empty)
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            if proc.poll() is None:
                assert f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}".encode() in environ
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)


@pytest.mark.parametrize("stage", ["load", "quantize"])
def test_a_two_device_job_canceled_in_any_stage_ends_every_rank(store, tmp_path, monkeypatch, stage):
    """Cancel while rank 0 is in a stage (held there by QALORA_PAUSE_STAGE): both ranks stop at the
    next stage boundary together (rank 0's decision is every rank's), none waits in a collective.
    Canceled within a training step: the test above."""
    monkeypatch.setenv("QALORA_WORKER_DEVICES", "2")
    monkeypatch.setenv("QALORA_PAUSE_STAGE", stage)
    job_id = service.submit(_spec(tmp_path, 400))
    worker = Worker()
    thread = threading.Thread(target=worker.run, kwargs={"max_jobs": 1})
    thread.start()
    _wait(lambda: service.get_job(job_id)["stage"] == stage and len(_ranks_alive(job_id)) == 3)
    service.cancel(job_id)
    thread.join(timeout=120)
    assert not thread.is_alive()
    job = service.get_job(job_id)
    assert (job["status"], job["step"]) == ("canceled", 0)
    assert not _ranks_alive(job_id)
    assert "canceled (stopped before stage" in service.read_log(job_id, tail=5)
    # every rank stopped by agreement: none was left to die on a collective whose peer was gone (on
    # gloo that is an error at once; NCCL waits for its timeout)
    ranks = (Path(job["artifact_dir"]) / "ranks.log").read_text()
    assert "Traceback" not in ranks and "Error" not in ranks, ranks[-3000:]


def test_a_stopping_worker_hands_a_two_device_job_back_whatever_its_stage(store, tmp_path, monkeypatch):
    """SIGTERM to the worker while the ranks are in a long stage: torchrun passes it on and waits
    (its shutdown timeout is the longest stage's, not 30 s), rank 0 stops at the next boundary and
    hands the job back; it is queued again, not failed."""
    monkeypatch.setenv("QALORA_WORKER_DEVICES", "2")
    monkeypatch.setenv("QALORA_PAUSE_STAGE", "quantize")
    job_id = service.submit(_spec(tmp_path, 400))
    worker = subprocess.Popen([sys.executable, "-m", "jobs.worker"], cwd=ROOT, env=dict(os.environ),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: service.get_job(job_id)["stage"] == "quantize" and len(_ranks_alive(job_id)) == 3)
        assert "--shutdown-timeout=1800" in " ".join(
            (Path("/proc") / p / "cmdline").read_bytes().replace(b"\0", b" ").decode() for p in _ranks_alive(job_id))
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=120) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    job = service.get_job(job_id)
    assert (job["status"], job["step"]) == ("queued", 0), job["error"]
    assert not _ranks_alive(job_id)
    assert "worker shutting down" in service.read_log(job_id, tail=10)
