"""The worker against the real library (tiny-random base), on a real SQLite file and PostgreSQL server.

Cancel within one step, readable failures, crash recovery from a SIGKILLed worker process,
graceful hand-back on SIGTERM, and stale-heartbeat recovery.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from helpers import free_port
from jobs import service
from jobs.pipeline import describe_error
from jobs.spec import JobSpec
from jobs.worker import Worker, acquire_slot
from qalora.config import AdapterConfig, QuantConfig, TrainConfig
from storage import Job, db, get_settings, repo, utcnow

ROOT = Path(__file__).resolve().parents[1]
RECORDS = 40
SAVE_EVERY = 5


def tiny_data(path: Path) -> str:
    path.write_text("".join(json.dumps({"instruction": f"Add {i} and {i % 7}.", "output": str(i + i % 7)}) + "\n"
                            for i in range(RECORDS)))
    return str(path)


def tiny_spec(data: str, steps: int, **train) -> JobSpec:
    cfg = {**dict(steps=steps, batch_size=2, seq_len=64, warmup_steps=2, eval_every=10, save_every=SAVE_EVERY,
                  eval_batches=1), **train}
    return JobSpec(base="tiny-random", data=data, quant=QuantConfig(4, 32), adapter=AdapterConfig(rank=4, alpha=8),
                   train=TrainConfig(**cfg))


def wait_for(predicate, timeout=120.0, every=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


def steps_of(job_id: int) -> list[int]:
    return [m["step"] for m in service.get_job(job_id)["metrics"]]


def test_cancel_mid_training_stops_within_one_step(store, tmp_path):
    job_id = service.submit(tiny_spec(tiny_data(tmp_path / "d.jsonl"), steps=300))
    worker = Worker()
    thread = threading.Thread(target=worker.run, kwargs={"max_jobs": 1})
    thread.start()
    try:
        seen = wait_for(lambda: (j := service.get_job(job_id))["step"] >= 3 and j)
        assert seen["status"] == "running" and seen["eta_s"] > 0 and seen["stage"] == "train"
        at_cancel = service.cancel(job_id)
        assert at_cancel["status"] == "running" and at_cancel["cancel_requested"]
    finally:
        thread.join(timeout=120)
    job = service.get_job(job_id)
    # the step running when cancel arrived may finish; no later step starts
    assert job["status"] == "canceled" and at_cancel["step"] <= job["step"] <= at_cancel["step"] + 1
    assert steps_of(job_id) == list(range(1, job["step"] + 1))
    assert (Path(job["artifact_dir"]) / "checkpoints" / f"step-{job['step']:06d}.safetensors").is_file()
    assert "canceled" in service.read_log(job_id, tail=3)


def test_bad_dataset_fails_readably_and_the_worker_goes_on(store, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "no reply here"}\n')
    bad_id = service.submit(tiny_spec(str(bad), steps=3))
    good_id = service.submit(tiny_spec(tiny_data(tmp_path / "d.jsonl"), steps=3))
    assert Worker().run(burst=True) == 2
    bad_job, good_job = service.get_job(bad_id), service.get_job(good_id)
    assert bad_job["status"] == "failed" and bad_job["error"].startswith("bad.jsonl row 2 (line 2)")
    assert "output" in bad_job["error"]
    log = service.read_log(bad_id)
    assert "Traceback (most recent call last)" in log and "DataError" in log
    assert good_job["status"] == "succeeded" and steps_of(good_id) == [1, 2, 3]
    # the page's log panel: the one-paragraph reason, no traceback, no server path
    shown = service.readable_log(bad_id, 14)
    assert "failed: bad.jsonl row 2 (line 2)" in shown
    assert "Traceback" not in shown and "File \"" not in shown
    assert bad_job["artifact_dir"] not in shown and str(tmp_path) not in shown
    assert shown.endswith("(the full traceback is in the downloadable log: Download → job log)")
    assert "Traceback (most recent call last)" in service.log_path(bad_id).read_text()  # the download has it


def test_out_of_memory_is_reported_with_the_fix(store, tmp_path, monkeypatch):
    import torch

    import qalora.training.finetune

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(qalora.training.finetune, "finetune", oom)
    job_id = service.submit(tiny_spec(tiny_data(tmp_path / "d.jsonl"), steps=3, batch_size=8))
    Worker().run(burst=True)
    job = service.get_job(job_id)
    assert job["status"] == "failed" and "batch_size=8, seq_len=64" in job["error"]
    assert "reduce batch size or sequence length" in job["error"]
    assert "OutOfMemoryError" in service.read_log(job_id)
    cpu_oom = describe_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ..."),
                             tiny_spec("x", 1))
    assert "reduce batch size or sequence length" in cpu_oom


def _worker_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.worker", *args], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_worker_leaves_a_job_that_is_resumed_without_repeating_steps(store, tmp_path):
    total = 30
    job_id = service.submit(tiny_spec(tiny_data(tmp_path / "d.jsonl"), steps=total))
    victim = _worker_process()
    wait_for(lambda: service.get_job(job_id)["step"] >= 2 * SAVE_EVERY + 2)  # past the step-10 checkpoint
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    orphan = service.get_job(job_id)
    assert orphan["status"] == "running" and orphan["attempts"] == 1  # nobody has noticed yet

    assert Worker().run(burst=True) == 1  # finds the dead worker's job, interrupts and resumes it
    job = service.get_job(job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert job["step"] == total and job["report"]["steps"] == total
    assert job["report"]["resumed_from_step"] in (10, 15)  # the last checkpoint before the kill
    assert steps_of(job_id) == list(range(1, total + 1))  # every step once, none twice
    log = service.read_log(job_id, tail=10_000)
    assert f"interrupted: worker {orphan['worker_id']} died" in log
    # TensorBoard, read with its own reader: each attempt is its own run; the killed one holds every
    # step up to its checkpoint (flushed at each step), the resumed one every step after it, and
    # together they are the database's curve
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    root = Path(job["artifact_dir"]) / "tensorboard"
    assert sorted(p.name for p in root.iterdir()) == ["attempt-1", "attempt-2"]
    runs = {}
    for name in ("attempt-1", "attempt-2"):
        runs[name] = EventAccumulator(str(root / name))
        runs[name].Reload()
    resumed = job["report"]["resumed_from_step"]
    first = [(e.step, e.value) for e in runs["attempt-1"].Scalars("train/loss")][:resumed]
    second = [(e.step, e.value) for e in runs["attempt-2"].Scalars("train/loss")]
    assert [step for step, _ in first + second] == list(range(1, total + 1)), (first, second)
    metrics = service.get_job(job_id)["metrics"]
    assert all(abs(value - m["train_loss"]) <= 1e-6 * max(1.0, abs(m["train_loss"]))
               for (_, value), m in zip(first + second, metrics))
    board = runs["attempt-2"]
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "eval/loss"} <= \
        set(board.Tags()["scalars"])
    assert [e.step for e in board.Scalars("eval/loss")] == \
        [m["step"] for m in metrics if m["eval_loss"] is not None and m["step"] > resumed]
    assert all(e.value > 0 for e in board.Scalars("train/grad_norm"))


def test_stopping_worker_hands_its_job_back_to_resume_later_in_the_same_mlflow_run(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "probe")
    total = 20
    job_id = service.submit(tiny_spec(tiny_data(tmp_path / "d.jsonl"), steps=total))
    worker = Worker()
    thread = threading.Thread(target=worker.run)
    thread.start()
    wait_for(lambda: service.get_job(job_id)["step"] >= 3)
    worker.stop.set()  # what SIGTERM / Ctrl-C does in `python -m jobs.worker`
    thread.join(timeout=120)
    handed_back = service.get_job(job_id)
    assert handed_back["status"] == "queued" and 3 <= handed_back["step"] < total
    ckpt = Path(handed_back["artifact_dir"]) / "checkpoints" / f"step-{handed_back['step']:06d}.safetensors"
    assert ckpt.is_file() and "shutting down" in service.read_log(job_id)

    assert Worker().run(burst=True) == 1
    job = service.get_job(job_id)
    assert (job["status"], job["attempts"], job["report"]["resumed_from_step"]) == ("succeeded", 2,
                                                                                    handed_back["step"])
    assert steps_of(job_id) == list(range(1, total + 1))
    # MLflow, read with its own client: one run for both attempts, every step once, the outcomes
    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("probe").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == job["name"]
    assert run.data.tags["qalora.job_id"] == str(job_id)
    assert (run.data.params["quant.bits"], run.data.params["adapter.rank"], run.data.params["train.steps"]) == \
        ("4", "4", str(total))
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert history == [(m["step"], m["train_loss"]) for m in job["metrics"]]
    assert run.data.metrics["final/eval_loss_merged"] == job["report"]["eval_loss_merged"]
    assert run.data.metrics["final/merge_max_abs_logit_diff"] == job["report"]["merge_max_abs_logit_diff"]


def test_worker_whose_job_was_taken_over_stops_without_writing_to_it(store, tmp_path):
    job_id = service.submit(tiny_spec(tiny_data(tmp_path / "d.jsonl"), steps=300))
    worker = Worker()
    thread = threading.Thread(target=worker.run, kwargs={"max_jobs": 1})
    thread.start()
    wait_for(lambda: service.get_job(job_id)["step"] >= 3)
    with db() as s:  # what another worker's recovery does when this one looks dead
        repo.interrupt(s, job_id, worker.id, reason="presumed dead")
        repo.requeue(s, job_id)
        repo.claim(s, "elsewhere:1:abc", job_id)
        taken_at = repo.get_job(s, job_id).step
    thread.join(timeout=120)
    job = service.get_job(job_id)
    assert (job["status"], job["worker_id"], job["step"]) == ("running", "elsewhere:1:abc", taken_at)
    assert steps_of(job_id) == list(range(1, taken_at + 1))
    assert "taken over" in service.read_log(job_id, tail=3)
    # and it wrote no checkpoint into the new owner's folder (it saved one on stopping)
    from qalora.training.loop import checkpoints
    assert [s for s, _ in checkpoints(Path(job["artifact_dir"]) / "checkpoints") if s > taken_at] == []


def test_stale_heartbeat_recovery_requeues_until_max_attempts(store, monkeypatch):
    monkeypatch.setenv("QALORA_MAX_ATTEMPTS", "2")
    old = utcnow() - timedelta(seconds=get_settings().stale_s + 5)
    ids = [service.submit(JobSpec(base="tiny-random")) for _ in range(3)]
    with db() as s:
        for job_id, attempts in zip(ids, (1, 2, 1)):
            repo.claim(s, "elsewhere:1:abc", job_id)
            s.execute(update(Job).where(Job.id == job_id).values(attempts=attempts, heartbeat_at=old))
        repo.heartbeat(s, ids[2], "elsewhere:1:abc")  # this one is alive
    assert Worker().recover() == [ids[0]]
    jobs = [service.get_job(i) for i in ids]
    assert [j["status"] for j in jobs] == ["queued", "interrupted", "running"]
    assert "sent no heartbeat" in jobs[1]["error"] and "started 2 times" in jobs[1]["error"]
    assert "requeued to resume" in service.read_log(ids[0])


def test_worker_slots_cap_workers_per_machine(store):
    held = acquire_slot(store)
    try:
        assert held is not None and acquire_slot(store) is None
        extra = _worker_process("--burst")
        out, _ = extra.communicate(timeout=60)
        assert extra.returncode == 0 and "worker slot(s)" in out and "are taken" in out
    finally:
        held.close()
    again = acquire_slot(store)
    assert again is not None
    again.close()


KILL_STAGES = ("load", "data", "quantize", "train", "merge", "verify", "save", "export")


# SQLite only: two minutes of killing and resuming in each stage; the database's part of it (a dead
# worker's job recovered and resumed) runs on both in test_killed_worker_leaves_a_job_...
@pytest.mark.sqlite_only(reason="slow (~2 min) and about the pipeline's stages, not the database")
def test_a_worker_killed_in_any_stage_resumes_to_the_same_bytes(store, tmp_path):
    """SIGKILL the worker once on entering each stage; a new worker resumes the job, and the final
    merged model (and GGUF export) are byte-identical to an uninterrupted run's."""
    data = tiny_data(tmp_path / "d.jsonl")
    spec = tiny_spec(data, steps=2 * SAVE_EVERY + 2).to_dict() | {"exports": ["gguf"]}
    reference = service.submit(spec)
    assert Worker().run(burst=True) == 1
    ref_dir = Path(service.get_job(reference)["artifact_dir"])
    expected = (ref_dir / "merged" / "model.safetensors").read_bytes()
    expected_gguf = (ref_dir / "exports" / "model-q4_1.gguf").read_bytes()
    for stage in KILL_STAGES:
        job_id = service.submit(spec)
        victim = subprocess.run([sys.executable, "-m", "jobs.worker", "--burst"], cwd=ROOT, timeout=300,
                                env={**os.environ, "QALORA_FAULT_STAGE": stage}, capture_output=True)
        assert victim.returncode == -signal.SIGKILL, (stage, victim.stdout[-2000:])
        killed = service.get_job(job_id)
        assert (killed["status"], killed["stage"]) == ("running", stage)
        assert Worker().run(burst=True) == 1  # sees the dead worker, requeues, resumes
        job = service.get_job(job_id)
        assert (job["status"], job["attempts"]) == ("succeeded", 2), (stage, job["error"])
        folder = Path(job["artifact_dir"])
        assert (folder / "merged" / "model.safetensors").read_bytes() == expected, stage
        assert (folder / "exports" / "model-q4_1.gguf").read_bytes() == expected_gguf, stage
        assert steps_of(job_id) == list(range(1, 2 * SAVE_EVERY + 3)), stage
        assert not [p.name for p in folder.rglob(".partial-*")], stage


def test_a_save_over_the_file_size_limit_fails_cleanly_and_resumes(store, tmp_path):
    """RLIMIT_FSIZE in the worker process: the 17 MB merged model cannot be written. The job fails
    with a disk-space message, no half model is left, and after the limit is lifted it resumes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qalora.models.tiny import TINY_DIMS, byte_tokenizer

    tok = byte_tokenizer()
    base = tmp_path / "wide-vocab"
    config = LlamaConfig(vocab_size=128000, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=False, **TINY_DIMS)
    LlamaForCausalLM(config).save_pretrained(base)  # embeddings + head: 16.4M parameters, 17 MB in 8 bits
    tok.save_pretrained(base)
    spec = tiny_spec(tiny_data(tmp_path / "d.jsonl"), steps=SAVE_EVERY).to_dict() | {"base": str(base)}
    job_id = service.submit(spec)
    limit = 10 * 2 ** 20
    code = (f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY)); "
            "from jobs.worker import main; raise SystemExit(main(['--burst']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]  # the worker itself survived
    job = service.get_job(job_id)
    assert job["status"] == "failed" and job["error"].startswith("Out of disk space (or over a file-size limit)")
    folder = Path(job["artifact_dir"])
    assert not (folder / "merged").exists()  # no half model under the final name
    assert not [p.name for p in folder.iterdir() if p.name.startswith((".partial-", ".old-"))]
    assert (folder / "checkpoints" / f"step-{SAVE_EVERY:06d}.safetensors").is_file()  # training is kept

    service.resume(job_id)
    assert Worker().run(burst=True) == 1  # no limit here
    job = service.get_job(job_id)
    assert job["status"] == "succeeded" and job["report"]["resumed_from_step"] == SAVE_EVERY
    assert (folder / "merged" / "model.safetensors").stat().st_size > limit


def test_every_finishing_stage_reports_progress_and_the_eta_covers_them(store, tmp_path, monkeypatch):
    """After the last step the job row still moves: each stage's (done, total) is written, the
    overall ETA during training already counts the finishing stages, and the report keeps each
    stage's time so the next job on the same base estimates from it."""
    from jobs import pipeline
    from qalora.evaluation.heldout import GENERATION_REPLIES

    writes = []
    real = repo.heartbeat

    def spy(s, job_id, worker_id, **values):
        if values:
            writes.append(dict(values))
        return real(s, job_id, worker_id, **values)

    monkeypatch.setattr(repo, "heartbeat", spy)
    spec = tiny_spec("builtin:contacts", steps=4, eval_every=2, seq_len=256)
    spec.exports = ("native", "adapter", "gguf")
    job_id = service.submit(spec)
    assert pipeline.run_job(job_id) == "succeeded", service.get_job(job_id)["error"]
    progress = {}
    for w in writes:
        if w.get("stage_total"):
            progress.setdefault(w["stage"], []).append((w["stage_done"], w["stage_total"]))
    for stage in ("quantize", "merge", "verify", "save", "export gguf", "evaluate"):
        assert progress[stage][-1][0] == progress[stage][-1][1] > 0, (stage, progress.get(stage))
    total = pipeline.MC_QUESTIONS + GENERATION_REPLIES  # the questions, then the held-out replies
    assert progress["evaluate"][-1] == (total, total) and (pipeline.MC_QUESTIONS, total) in progress["evaluate"]
    gen = service.get_job(job_id)["report"]["generation"]
    assert (gen["data"], gen["n"], gen["exact"]) == ("builtin:contacts", GENERATION_REPLIES, 0)  # 4 random steps
    # during training, the ETA is the steps left plus an estimate of merge..evaluate (> 0 at the last step)
    train_etas = [w["eta_s"] for w in writes if w.get("step") == 4]
    assert train_etas and train_etas[0] > 0
    # entering each finishing stage resets its counters and stamps its start
    entered = [w["stage"] for w in writes if "stage_started_at" in w]
    assert entered[-7:] == ["merge", "verify", "save", "export", "export gguf", "evaluate", "done"]
    report = service.get_job(job_id)["report"]
    assert set(report["stage_s"]) >= {"load", "quantize", "train", "merge", "verify", "save", "export gguf",
                                      "evaluate"}
    assert all(v >= 0 for v in report["stage_s"].values())
    # the next job on the same base estimates each finishing stage from these measured times
    assert pipeline.stage_history("tiny-random") == report["stage_s"]
    assert pipeline.estimate_stage("evaluate", 10.0, report["stage_s"]) == report["stage_s"]["evaluate"]
    assert pipeline.estimate_stage("evaluate", 10.0, {}) == pipeline.FINISH_STEPS["evaluate"] * 10.0


def _app_process(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").is_file() and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def _pid(worker_id: str) -> int:
    return int(worker_id.split(":")[1])


@pytest.mark.sqlite_only("two app processes start and die in turn; claims and recovery are the same code on "
                         "PostgreSQL, tested there by test_postgres and the tests above")
def test_no_job_is_left_running_without_a_worker(store, tmp_path):
    """An orphaned worker (its app gone) holds the slot while a new app starts; killed, the new app's
    waiting worker takes the job over at once. Then the app is killed with -9: its worker stops with
    it and hands the job back; a restarted app resumes it. No job shows "running" without a worker,
    and no second restart is needed."""
    job_id = service.submit(tiny_spec(tiny_data(tmp_path / "d.jsonl"), steps=100_000, save_every=5))
    orphan = _worker_process()
    apps = []
    try:
        running = wait_for(lambda: (j := service.get_job(job_id))["step"] >= 5 and j)
        apps.append(_app_process(free_port()))
        wait_for(lambda: "waiting for one" in (store.home / "workers" / "worker-0.log").read_text()
                 if (store.home / "workers" / "worker-0.log").is_file() else False, timeout=120)
        orphan.kill()
        orphan.wait()
        taken = wait_for(lambda: (j := service.get_job(job_id))["status"] == "running"
                         and j["worker_id"] != running["worker_id"] and j["step"] > running["step"] and j,
                         timeout=60)
        apps[0].kill()  # the app dies hard: no finally, no SIGTERM to its workers from it
        apps[0].wait()
        handed = wait_for(lambda: (j := service.get_job(job_id))["status"] == "queued" and j, timeout=60)
        wait_for(lambda: not _alive(_pid(taken["worker_id"])), timeout=30)
        assert "worker shutting down" in service.read_log(job_id)  # handed back by its SIGTERM, not recovered
        apps.append(_app_process(free_port()))
        wait_for(lambda: (j := service.get_job(job_id))["status"] == "running" and j["step"] > handed["step"],
                 timeout=120)
    finally:
        for proc in (orphan, *apps):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=120)
    job = service.get_job(job_id)
    assert job["status"] == "queued"  # the last app's SIGTERM handed it back too
    steps = steps_of(job_id)
    assert steps == list(range(1, steps[-1] + 1))  # three workers, one history: no step missing or twice


def test_an_export_killed_on_another_host_is_recovered_by_its_silence_and_finishes(store, tmp_path, monkeypatch):
    """Export tasks have a heartbeat: one whose worker died on another machine (its pid means
    nothing here) goes back to the queue once it is silent for QALORA_STALE_S, and is written."""
    monkeypatch.setenv("QALORA_HEARTBEAT_S", "0.2")
    job_id = service.submit(tiny_spec(tiny_data(tmp_path / "d.jsonl"), steps=2))
    assert Worker().run(burst=True) == 1
    task_id = service.request_export(job_id, "gptq")["id"]
    victim = subprocess.Popen([sys.executable, "-m", "jobs.worker"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "QALORA_HOSTNAME": "another-host"})
    try:
        wait_for(lambda: service.export_tasks(job_id)[-1]["status"] == "running", every=0.01)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    with db() as s:
        owner = next(t for t in repo.export_tasks(s, job_id) if t.id == task_id).worker_id
    assert owner.startswith("another-host:")
    monkeypatch.setenv("QALORA_STALE_S", "600")  # not silent long enough yet: left alone
    assert Worker().recover() == [] and service.export_tasks(job_id)[-1]["status"] == "running"
    monkeypatch.setenv("QALORA_STALE_S", "1")
    time.sleep(1.3)
    assert Worker().run(burst=True) == 0  # recovered, then written by this worker
    (task,) = service.export_tasks(job_id)
    assert task["status"] == "done" and Path(task["path"]).is_dir() and task["result"]["format"] == "gptq"
    assert task["result"]["max_abs_logit_diff"] > 0


def test_publish_waits_for_a_worker_and_one_export_is_written_once(store, tmp_path, monkeypatch):
    """Publishing never writes an export in the web process: it queues the one the job lacks (or joins
    the one queued) and waits for a worker; two callers asking at once get one task, one writer."""
    from jobs.publish import PublishError, worker_export

    job_id = service.submit(tiny_spec(tiny_data(tmp_path / "d.jsonl"), steps=2))
    assert Worker().run(burst=True) == 1
    job = service.get_job(job_id)
    got, steps = [], []
    callers = [threading.Thread(target=lambda: got.append(worker_export(job, "native", lambda f, m: steps.append(m),
                                                                        0.1, "native model")))
               for _ in range(2)]
    for c in callers:
        c.start()
    wait_for(lambda: len(steps) >= 2)
    assert [(t["format"], t["status"]) for t in service.export_tasks(job_id)] == [("native", "queued")]
    assert not (Path(job["artifact_dir"]) / "exports" / "native").exists()  # nobody wrote it yet
    assert steps[0] == "waiting for a worker to write the native model (queued)"
    assert Worker().run(burst=True) == 0
    for c in callers:
        c.join(timeout=60)
    assert len(got) == 2 and got[0]["path"] == got[1]["path"] and Path(got[0]["path"]).is_dir()
    assert len(service.export_tasks(job_id)) == 1
    monkeypatch.setenv("QALORA_PUBLISH_WAIT_S", "0.5")  # and with no worker: a message, not a hang
    with pytest.raises(PublishError, match="No worker wrote the GGUF file within 0.5 s"):
        worker_export(job, "gguf", lambda f, m: None, 0.1, "GGUF file")
