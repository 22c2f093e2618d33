"""The UI's view: the service API, and one end-to-end job through a real worker process."""
import json
import time
from pathlib import Path

import pytest

from jobs import service
from jobs.spec import JobSpec
from qalora.config import AdapterConfig, QuantConfig, TrainConfig
from qalora.errors import ConfigError
from storage import ACTIVE, IllegalTransition, JobStateError, db, repo
from helpers import count_validations

MERGE_BOUND = 1e-4   # fp32 merge of a 2-layer model: observed ~1e-6
STEPS = 12


def _data(tmp_path) -> str:
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Add {i} and 3.", "output": str(i + 3)}) + "\n"
                            for i in range(40)))
    return str(path)


def _spec(data: str, **train) -> JobSpec:
    cfg = {**dict(steps=STEPS, batch_size=2, seq_len=64, lr=1e-3, warmup_steps=2, eval_every=6, save_every=6,
                  eval_batches=2), **train}
    return JobSpec(base="tiny-random", data=data, quant=QuantConfig(4, 32), adapter=AdapterConfig(rank=4, alpha=8),
                   train=TrainConfig(**cfg), name="sums")


def _eval_loss_of_saved_model(model_dir: Path, spec: dict, path: str) -> float:
    """Recompute the report's merged eval loss from the files on disk, in this process, on the
    same layer path (int4 kernel or dequantize) the report names."""
    from qalora.data import records as data_mod
    from qalora.evaluation.heldout import eval_loss
    from qalora.deployment.export.native import load_quantized

    model, tok = load_quantized(model_dir, use_kernel=path == "int4 kernel")
    train = spec["train"]
    _, eval_records = data_mod.split_records(data_mod.load_records(spec["data"]), train["eval_fraction"],
                                             train["seed"])
    examples = data_mod.tokenize_records(eval_records, tok, train["seq_len"])
    return eval_loss(model, examples, train["batch_size"], tok.pad_token_id, train["eval_batches"])


def test_submit_run_in_a_worker_process_and_find_the_merged_model(store, tmp_path):
    job_id = service.submit(_spec(_data(tmp_path)))
    procs = service.start_worker_process()
    try:
        deadline = time.monotonic() + 120
        while service.get_job(job_id)["status"] in ACTIVE and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for p in procs:
            p.terminate()
    assert [p.wait(timeout=60) for p in procs] == [0]
    job = service.get_job(job_id)
    assert job["status"] == "succeeded", job["error"]
    report = job["report"]
    assert report["merge_max_abs_logit_diff"] < MERGE_BOUND
    assert report["eval_loss_merged"] < report["eval_loss_quantized_base"]  # training helped
    assert [m["step"] for m in job["metrics"]] == list(range(1, STEPS + 1))
    assert [m["step"] for m in job["metrics"] if m["eval_loss"] is not None] == [6, 12]
    assert {a["kind"] for a in job["artifacts"]} == {"merged", "adapter", "report", "log"}

    (model,) = service.list_models()
    assert (model["job_id"], model["bits"], model["group_size"], model["rank"]) == (job_id, 4, 32, 4)
    loss = _eval_loss_of_saved_model(Path(model["path"]), job["spec"], report["eval_merged_path"])
    assert abs(loss - report["eval_loss_merged"]) < 1e-4  # the saved files are the verified model

    tail = service.read_log(job_id, tail=2).splitlines()
    assert len(tail) == 2 and "succeeded" in tail[-1]
    service.delete(job_id)
    assert not Path(job["artifact_dir"]).exists() and service.list_models() == []
    with pytest.raises(JobStateError, match="does not exist"):
        service.get_job(job_id)


def test_bad_spec_is_refused_before_anything_is_stored(store, tmp_path):
    with pytest.raises(ConfigError, match="group_size=48"):
        service.submit(_spec(_data(tmp_path)).to_dict() | {"quant": {"group_size": 48}})
    with pytest.raises(ConfigError, match="lr=-1"):
        service.submit({"base": "tiny-random", "train": {"lr": -1}})
    assert service.list_jobs() == []


def test_queue_controls_follow_the_status_machine(store, tmp_path):
    first, second = (service.submit(_spec(_data(tmp_path), steps=s)) for s in (3, 4))
    assert [j["id"] for j in service.list_jobs()] == [second, first]  # newest first
    assert service.cancel(first)["status"] == "canceled"
    with pytest.raises(IllegalTransition, match="it is canceled"):
        service.cancel(first)
    assert [j["id"] for j in service.list_jobs("queued")] == [second]
    resumed = service.resume(first)
    assert (resumed["status"], resumed["finished_at"], resumed["total_steps"]) == ("queued", None, 3)
    with pytest.raises(IllegalTransition, match="it is queued"):
        service.resume(first)

    with db() as s:
        repo.claim(s, "w1", second)
    running = service.cancel(second)  # a running job is asked, not forced
    assert running["status"] == "running" and running["cancel_requested"]
    with pytest.raises(JobStateError, match="is running; cancel it"):
        service.delete(second)
    with db() as s:
        repo.record_step(s, second, "w1", step=1, train_loss=2.0, eval_loss=None, lr=0.1, tokens_per_s=9.0,
                         elapsed_s=0.5, eta_s=1.5)
        repo.record_step(s, second, "w1", step=2, train_loss=1.5, eval_loss=1.7, lr=0.1, tokens_per_s=9.0,
                         elapsed_s=1.0, eta_s=1.0)
    job = service.get_job(second, metrics_after=1)
    assert job["progress"] == 0.5 and [(m["step"], m["eval_loss"]) for m in job["metrics"]] == [(2, 1.7)]
    assert service.read_log(second) == ""  # no log before the worker writes one


def test_a_job_that_beats_but_does_not_move_is_shown_stalled(store, tmp_path, monkeypatch):
    from datetime import timedelta

    from sqlalchemy import update

    from jobs.pipeline import note
    from storage import utcnow
    from storage.models import Job
    from ui import jobs as jobs_tab

    monkeypatch.setenv("QALORA_STALL_S", "600")
    job_id = service.submit(_spec(_data(tmp_path)))
    with db() as s:
        repo.claim(s, "w1", job_id)
        repo.record_step(s, job_id, "w1", step=3, train_loss=1.0, eval_loss=None, lr=1e-3, tokens_per_s=10.0,
                         elapsed_s=1.0, eta_s=5.0)
    note(job_id, service.get_job(job_id)["artifact_dir"], "step 3/12 loss 1.0000")
    assert service.get_job(job_id)["stalled_s"] is None
    with db() as s:  # 20 minutes later: heartbeats kept coming, no step did
        s.execute(update(Job).where(Job.id == job_id).values(progress_at=utcnow() - timedelta(minutes=20)))
        assert repo.heartbeat(s, job_id, "w1")  # a bare heartbeat is no progress
    job = service.get_job(job_id)
    assert 1190 < job["stalled_s"] < 1300 and job["last_log_line"].endswith("step 3/12 loss 1.0000")
    assert jobs_tab._job_rows([job]).iloc[0]["status"] == "running (stalled)"
    assert "**Stalled:** no progress for 20m" in jobs_tab._job_summary(job) and "step 3/12 loss 1.0000" in \
        jobs_tab._job_summary(job)
    with db() as s:  # the next step clears it
        repo.record_step(s, job_id, "w1", step=4, train_loss=0.9, eval_loss=None, lr=1e-3, tokens_per_s=10.0,
                         elapsed_s=2.0, eta_s=4.0)
    assert service.get_job(job_id)["stalled_s"] is None


def test_same_names_are_numbered_and_the_log_shows_each_stage_once(store, tmp_path):
    from jobs.worker import Worker

    spec = _spec(_data(tmp_path), steps=2, eval_every=2, save_every=2).to_dict() | {"exports": ["gguf"]}
    first, second = service.submit(spec), service.submit(spec)
    names = [service.get_job(j)["name"] for j in (first, second)]
    assert names == ["sums", "sums-2"]
    assert Worker().run(burst=True, max_jobs=1) == 1
    stages = [line.split("stage: ")[1] for line in service.read_log(first, tail=1000).splitlines()
              if "stage: " in line]
    assert stages == ["load", "data", "quantize", "train", "merge", "verify", "save", "export", "evaluate", "done"]
    path, note = service.download_log(first)  # the full log, its size stated as every download's
    assert note == f"`{path.name}`, {path.stat().st_size / 1e6:,.1f} MB. The job's full log, tracebacks included."


def test_a_spec_is_validated_once_per_submission_and_once_by_the_worker(store, monkeypatch):
    import qalora.training.finetune as library
    from jobs.forms import form_spec
    from jobs.pipeline import run_job

    calls = count_validations(monkeypatch)
    spec = form_spec(kind="built-in", builtin="builtin:contacts", upload=None, path=None, base="tiny-random",
                     bits=4, group_size=32, method="rtn", rank=4, alpha=8, lr=1e-3, steps=2, batch_size=2,
                     seq_len=256, name="once")
    job_id = service.submit(spec)  # the app's Launch: the form's spec, then the queue
    assert calls == ["once"], f"one form submission validated the spec {len(calls)} times"
    calls.clear()

    def stop(*args, **kwargs):  # the worker has loaded the stored spec; no training needed here
        raise ConfigError("stopped after loading the spec")
    monkeypatch.setattr(library, "finetune", stop)
    assert run_job(job_id) == "failed"
    assert service.get_job(job_id)["error"] == "stopped after loading the spec"
    assert calls == ["once"], f"the worker validated the stored spec {len(calls)} times"
