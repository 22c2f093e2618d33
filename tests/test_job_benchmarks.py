"""Benchmarks chosen at launch run in the job's worker: lm-eval on the merged model, and once per base
and settings on the 16-bit base and the quantized base (cached, so a sweep evaluates its base once);
the scores land in the report, the Compare table (best marked) and its CSV."""
import csv

import pytest

from jobs import service
from jobs.pipeline import run_job
from jobs.spec import JobSpec
from qalora.config import AdapterConfig, QuantConfig, TrainConfig

BENCH = {"tasks": ["qa_mc"], "num_fewshot": 0, "limit": 4}


@pytest.fixture
def home(tmp_path, monkeypatch, lm_eval_tasks):
    monkeypatch.setenv("QALORA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QALORA_DB_URL", raising=False)
    monkeypatch.setenv("QALORA_LM_EVAL_INCLUDE", str(lm_eval_tasks))
    return tmp_path / "home"


def _spec(rank: int) -> JobSpec:
    return JobSpec(base="tiny-random", data="builtin:contacts", quant=QuantConfig(4, 32),
                   adapter=AdapterConfig(rank=rank, alpha=2 * rank),
                   train=TrainConfig(steps=2, batch_size=2, seq_len=256, eval_every=2, save_every=2, eval_batches=1,
                                     warmup_steps=1), benchmarks=BENCH, name=f"bench-r{rank}")


def test_benchmarks_run_in_the_job_and_its_baselines_once_per_base(home, tmp_path):
    first = service.submit(_spec(4))
    assert run_job(first) == "succeeded"
    job = service.get_job(first)
    bench = job["report"]["benchmarks"]
    assert bench["settings"] == BENCH
    for which in ("merged", "base16", "quantized_base"):
        assert set(bench[which]) == {"qa_mc"} and bench[which]["qa_mc"]["metric"] == "acc_norm"
        assert 0.0 <= bench[which]["qa_mc"]["value"] <= 1.0
    assert job["report"]["stage_s"]["benchmark"] > 0
    cached = sorted((home / "cache" / "benchmarks").glob("*.json"))
    assert len(cached) == 2  # the 16-bit base and the quantized base
    second = service.submit(_spec(8))
    assert run_job(second) == "succeeded"
    again = service.get_job(second)["report"]["benchmarks"]
    assert again["base16"] == bench["base16"] and again["quantized_base"] == bench["quantized_base"]
    assert sorted((home / "cache" / "benchmarks").glob("*.json")) == cached  # nothing evaluated twice
    logs = [p.read_text() for p in (home).rglob("*.log")]
    assert sum("benchmarks of the base16: cached" in text for text in logs) == 1

    result = service.compare([first, second])
    keys = [k for k, _, _ in result["columns"]]
    assert ["bench:qa_mc", "bench-qbase:qa_mc", "bench-base16:qa_mc"] == [k for k in keys if k.startswith("bench")]
    headers = dict((k, h) for k, h, _ in result["columns"])
    assert headers["bench:qa_mc"] == "qa_mc acc_norm" and headers["bench-base16:qa_mc"] == "qa_mc: 16-bit base"
    values = {r["id"]: r["bench:qa_mc"] for r in result["rows"]}
    assert values == {first: bench["merged"]["qa_mc"]["value"], second: again["merged"]["qa_mc"]["value"]}
    top = max(values.values())
    assert sorted(result["best"]["bench:qa_mc"]) == sorted(i for i, v in values.items() if v == top)
    assert "bench-base16:qa_mc" not in result["best"]  # baselines are never ranked
    with open(service.compare_csv([first, second], tmp_path)) as f:
        table = list(csv.DictReader(f))
    assert [float(r["qa_mc acc_norm"]) for r in table] == [values[int(r["job"])] for r in table]


def test_the_model_card_carries_the_benchmarks_as_model_index():
    from huggingface_hub import ModelCard

    from jobs.publish import model_card

    bench = {"settings": BENCH, "merged": {"qa_mc": {"metric": "acc_norm", "value": 0.75, "stderr": 0.1}},
             "base16": {"qa_mc": {"metric": "acc_norm", "value": 1.0, "stderr": 0.0}},
             "quantized_base": {"qa_mc": {"metric": "acc_norm", "value": 0.5, "stderr": 0.1}}}
    job = {"id": 1, "name": "bench-card", "spec": {"base": "tiny-random"},
           "report": {"base": "tiny-random", "bits": 4, "group_size": 32, "benchmarks": bench}}
    text = model_card(job, "alice/bench-card", formats=["native"])
    card = ModelCard(text)
    (result,) = card.data.eval_results
    assert (result.dataset_name, result.metric_type, result.metric_value) == ("qa_mc", "acc_norm", 0.75)
    assert card.data.model_name == "alice/bench-card"
    assert "| qa_mc | acc_norm | 1.0000 | 0.5000 | 0.7500 |" in text


def test_a_finished_job_is_evaluated_later_as_a_worker_task(home, tmp_path):
    """The Evaluate action: a benchmark row for the worker, progress in requests, scores in the task
    and in the job's report (so the job page, Compare and the card show them); the same settings
    asked twice are one row; a stop asked for ends it canceled between requests."""
    from jobs.worker import Worker
    from storage import db, repo

    job_id = service.submit(JobSpec(base="tiny-random", data="builtin:contacts", quant=QuantConfig(4, 32),
                                    adapter=AdapterConfig(rank=4, alpha=8),
                                    train=TrainConfig(steps=2, batch_size=2, seq_len=256, eval_every=2, save_every=2,
                                                      eval_batches=1, warmup_steps=1), name="later"))
    with pytest.raises(Exception, match=r"is queued; benchmarks are run on a finished model"):
        service.request_benchmark(job_id, "custom", "qa_mc")
    assert run_job(job_id) == "succeeded"
    assert "benchmarks" not in service.get_job(job_id)["report"]
    with pytest.raises(Exception, match=r"lm-eval knows no task or group named 'qa_mcc'"):
        service.request_benchmark(job_id, "custom", "qa_mcc")
    task = service.request_benchmark(job_id, "custom", "qa_mc", 4)
    assert service.request_benchmark(job_id, "custom", " qa_mc ", 4)["id"] == task["id"]  # one row for both
    assert [t["status"] for t in service.benchmark_tasks(job_id)] == ["queued"]
    assert Worker().run(burst=True) == 0  # tasks run while no job waits (they are not jobs)
    (done,) = service.benchmark_tasks(job_id)
    assert done["status"] == "done" and done["done"] == done["total"] > 0
    scores = service.get_job(job_id)["report"]["benchmarks"]
    assert scores == done["scores"] and scores["settings"] == {"tasks": ["qa_mc"], "num_fewshot": None, "limit": 4}
    assert set(scores) == {"settings", "merged", "base16", "quantized_base"}
    row = next(r for r in service.compare([job_id])["rows"] if r["id"] == job_id)
    assert row["bench:qa_mc"] == scores["merged"]["qa_mc"]["value"]
    # asked again with a stop already requested: it ends canceled at its first request, nothing kept
    again = service.request_benchmark(job_id, "custom", "qa_mc", 2)
    with db() as s:
        repo.claim(s, "w:test", again["id"])
        repo.request_cancel(s, again["id"])
    from jobs.pipeline import run_benchmark
    assert run_benchmark(again["id"], "w:test") == "canceled"
    assert [t["status"] for t in service.benchmark_tasks(job_id)] == ["done", "canceled"]
    assert service.get_job(job_id)["report"]["benchmarks"] == scores
