"""Comparing runs at the service level: two real tiny jobs run by ``python -m jobs sweep --local``,
compared through ``service.compare`` (the table, the best cells, the curves, size vs quality, CSV)."""
import csv
from pathlib import Path

import pytest

from jobs import compare as compare_mod
from jobs import service
from jobs import cli
from storage import db, repo

STEPS = 4


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two tiny jobs, 2 and 4 bits, run to the end in this process; yields (ids, printed output)."""
    home = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QALORA_HOME", str(home / "home"))
        mp.delenv("QALORA_DB_URL", raising=False)
        import io
        from contextlib import redirect_stdout

        out = io.StringIO()
        with redirect_stdout(out):
            code = cli.main(["sweep", "--base", "tiny-random", "--bits", "2,4", "--group-size", "32", "--rank", "4",
                             "--lr", "1e-3", "--steps", str(STEPS), "--batch-size", "2", "--data", "builtin:contacts",
                             "--exports", "gguf", "--name", "cmp", "--local"])
        assert code == 0, out.getvalue()
        ids = sorted(j["id"] for j in service.list_jobs())
        yield ids, out.getvalue()


def test_the_cli_sweep_runs_both_jobs_here_and_prints_the_table(sweep):
    ids, printed = sweep
    assert "**" not in printed.splitlines()[0] and printed.startswith("2 jobs will be queued (bits 2, 4 × group "
                                                                        "size 32 × rank 4 × learning rate 0.001).")
    assert [line for line in printed.splitlines() if line.startswith("job #")] == [f"job #{i}: succeeded" for i in ids]
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| job | name | status | bits | group size | rank | lr | eval loss: quantized base |")
    assert table[0].endswith("| method | steps | base | sweep |")
    assert [row.split(" | ")[1] for row in table[1:]] == ["cmp-2bit-g32-r4", "cmp-4bit-g32-r4"]


def test_the_table_holds_each_jobs_settings_and_outcomes_and_marks_the_best(sweep):
    ids, _ = sweep
    result = service.compare(ids)
    rows = {r["id"]: r for r in result["rows"]}
    for job_id, bits in zip(ids, (2, 4)):
        job, r = service.get_job(job_id), rows[job_id]
        report = job["report"]
        # each bit width with its preset's clip search and learned scales, named as it ran
        from qalora.config import method_label
        assert r["method"] == method_label(job["spec"]["quant"], job["spec"]["adapter"]) == report["method_name"]
        assert r["method"] == ("QA-LoRA + learned scales (RTN + clip search)" if bits == 2 else "QA-LoRA (RTN)")
        assert (r["bits"], r["group_size"], r["rank"], r["steps"], r["lr"]) == (bits, 32, 4, STEPS, 1e-3)
        assert r["sweep"] == job["sweep_id"] and r["sweep"].startswith("cmp-") and r["status"] == "succeeded"
        assert r["eval_base"] == report["eval_loss_quantized_base"]
        assert r["eval_trained"] == report["eval_loss_adapter"] and r["eval_merged"] == report["eval_loss_merged"]
        assert r["merge_diff"] == report["merge_max_abs_logit_diff"] < 1e-4
        assert r["mc_score"] == report["multiple_choice"]["accuracy"]
        merged = Path(job["artifact_dir"]) / "merged"
        assert r["native_mb"] * 1e6 == pytest.approx(sum(f.stat().st_size for f in merged.rglob("*") if f.is_file()))
        gguf = Path(job["artifact_dir"]) / report["exports"]["gguf"]["path"]  # relative to the job's folder
        assert r["gguf_mb"] * 1e6 == gguf.stat().st_size
        params = report["model_params"]  # the 16-bit model's: its size and each file's bits per parameter
        assert r["f16_mb"] == 2 * params / 1e6 and r["gguf_bpp"] == 8 * gguf.stat().st_size / params
        assert r["native_bpp"] == pytest.approx(8 * r["native_mb"] * 1e6 / params)
        assert r["tokens_per_s"] == report["tokens_per_s"] and r["peak_rss_mb"] == report["peak_rss_mb"]
        assert r["wall_s"] == job["run_s"] == (job["finished_at"] - job["started_at"]).total_seconds() > 0
    # 2-bit codes are smaller than 4-bit ones; the 2-bit model's loss is the higher one
    two, four = (rows[i] for i in ids)
    assert two["native_mb"] < four["native_mb"] and two["gguf_mb"] == four["gguf_mb"]  # GGUF Q4_1 holds both
    assert result["best"]["native_mb"] == [two["id"]]
    for key, better in (("eval_merged", min), ("tokens_per_s", max), ("wall_s", min)):
        top = better(r[key] for r in rows.values())
        assert result["best"][key] == [i for i in ids if rows[i][key] == top]
    assert "eval_base" not in result["best"] and "bits" not in result["best"]  # a baseline, a setting: no marks
    headers = [h for _, h, _ in result["columns"]]
    assert "GGUF MB" in headers and "torchao MB" not in headers and "peak GPU MB" not in headers  # none has them
    md = compare_mod.markdown_table(result)
    best_loss = f"**{compare_mod.cell_text('eval_merged', rows[result['best']['eval_merged'][0]]['eval_merged'])}**"
    assert best_loss in md


def _tokens_per_step(job) -> list[int]:
    """Real tokens seen after each step, counted from the spec's data as the training loop orders it."""
    import itertools

    from jobs.spec import JobSpec
    from qalora.data import records as data
    from qalora.models.model import open_base
    from qalora.training.loop import _Order, micro_batches

    spec = JobSpec.from_dict(job["spec"])
    cfg = spec.train
    train_records, _ = data.split_records(data.load_records(spec.data), cfg.eval_fraction, cfg.seed)
    examples = data.tokenize_records(train_records, open_base(spec.base).tokenizer, cfg.seq_len)
    order = _Order(len(examples), cfg.seed)
    per_step = [sum(int(b["attention_mask"].sum()) for b in micro_batches(order, examples, cfg,
                                                                          k * cfg.batch_size * cfg.grad_accum, 0))
                for k in range(cfg.steps)]
    return list(itertools.accumulate(per_step))


def test_curves_by_step_and_by_tokens_and_the_size_quality_frontier(sweep):
    ids, _ = sweep
    result = service.compare(ids)
    for job_id in ids:
        job = service.get_job(job_id)
        points = [p for p in result["curves"] if p["series"].startswith(f"#{job_id} ")]
        train = [p for p in points if p["split"] == "train"]
        evals = [p for p in points if p["split"] == "eval"]
        assert [p["step"] for p in train] == list(range(1, STEPS + 1))
        assert [p["loss"] for p in train] == [m["train_loss"] for m in job["metrics"]]
        assert [p["step"] for p in evals] == [int(k) for k in job["report"]["eval_losses"]]
        # the tokens axis counts the real (unpadded) tokens each step trained on: recounted here from
        # the job's data, split and sample order, not from the figures the job reported
        assert [p["tokens"] for p in train] == _tokens_per_step(job)
    scatter = {p["job"]: p for p in result["scatter"]}
    assert len(scatter) == 2
    two, four = (scatter[compare_mod.label(service.get_job(i))] for i in ids)
    assert two["merged_mb"] < four["merged_mb"]
    # the smaller model is always on the frontier; the larger one only if its loss is lower
    assert two["eval_loss_frontier"] == "frontier"
    assert four["eval_loss_frontier"] == ("frontier" if four["eval_loss"] < two["eval_loss"] else "dominated")


def test_the_table_downloads_as_csv_with_full_precision_and_the_best_marks(sweep, tmp_path):
    ids, _ = sweep
    result = service.compare(ids)
    path = service.compare_csv(ids, tmp_path)
    assert path.name == f"qalora-compare-{ids[0]}-{ids[1]}.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["job"]) for r in rows] == ids
    for r, expected in zip(rows, result["rows"]):
        assert float(r["eval loss: merged"]) == expected["eval_merged"]  # not rounded
        assert r["bits"] == str(expected["bits"])
        marks = [h for k, h, _ in result["columns"] if expected["id"] in result["best"].get(k, ())]
        assert r["best at"] == "; ".join(marks)


def test_a_running_job_is_compared_with_its_curve_so_far_and_blank_outcomes(tmp_path, monkeypatch):
    monkeypatch.setenv("QALORA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QALORA_DB_URL", raising=False)
    with db() as s:
        job_id = repo.create_job(s, name="live", spec={"quant": {"bits": 3, "group_size": 64}, "train": {"steps": 9}},
                                 total_steps=9)
        repo.claim(s, "host:1:w", job_id)
    for step, loss, seen in ((1, 3.0, 480), (2, 2.5, 1010)):  # as counted, not rate x time
        with db() as s:
            repo.record_step(s, job_id, "host:1:w", step=step, train_loss=loss, eval_loss=None, lr=1e-3,
                             tokens_per_s=250.0, elapsed_s=2.0 * step, eta_s=10.0, tokens_seen=seen)
    result = service.compare([job_id])
    (row,) = result["rows"]
    assert row["status"] == "running" and row["bits"] == 3 and row["eval_merged"] is None
    assert row["tokens_per_s"] == 250.0 and row["wall_s"] > 0
    assert [(p["step"], p["tokens"], p["loss"]) for p in result["curves"]] == [(1, 480, 3.0), (2, 1010, 2.5)]
    assert result["scatter"] == [] and "eval_merged" not in result["best"]


def test_wall_time_counts_every_attempt_and_only_finished_jobs_are_marked_best(tmp_path, monkeypatch):
    """Regression: a resumed job's wall time was its last attempt's (102 s for a job that ran 172 s),
    and a running job's partial wall time was marked best."""
    from datetime import timedelta

    from sqlalchemy import update

    from storage import Job

    monkeypatch.setenv("QALORA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QALORA_DB_URL", raising=False)
    spec = {"quant": {"bits": 4, "group_size": 32}, "train": {"steps": 9}}

    def rewind(job_id, **ago):  # move the row's times into the past: seconds ago per column
        now = storage_now()
        with db() as s:
            s.execute(update(Job).where(Job.id == job_id).values(
                **{k: now - timedelta(seconds=v) for k, v in ago.items()}))

    from storage import utcnow as storage_now
    with db() as s:
        resumed = repo.create_job(s, name="resumed", spec=spec, total_steps=9)
        live = repo.create_job(s, name="live", spec=spec, total_steps=9)
        repo.claim(s, "host:1:w", resumed)
    rewind(resumed, started_at=300, heartbeat_at=230, progress_at=232)  # first attempt: 70 s, then killed
    with db() as s:
        repo.interrupt(s, resumed, "host:1:w", reason="worker died")
        repo.requeue(s, resumed)
    assert service.get_job(resumed)["run_s"] == pytest.approx(70.0, abs=0.01)  # waiting: its first attempt, to its last heartbeat
    with db() as s:
        repo.claim(s, "host:2:w", resumed)
    rewind(resumed, started_at=100)
    with db() as s:
        repo.succeed(s, resumed, "host:2:w", report={"eval_loss_merged": 1.5})
        repo.claim(s, "host:1:w", live)
    rewind(live, started_at=20)  # running for 20 s: a smaller wall time than the finished job's, not a result
    result = service.compare([resumed, live])
    rows = {r["id"]: r for r in result["rows"]}
    assert rows[resumed]["wall_s"] == pytest.approx(70.0 + 100.0, abs=1.0)  # both attempts
    assert 19.0 < rows[live]["wall_s"] < 60.0
    assert result["best"]["wall_s"] == [resumed] and result["best"]["eval_merged"] == [resumed]
    path = compare_mod.write_csv(result, tmp_path / "t.csv")
    with open(path, newline="") as f:
        marks = {int(r["job"]): r["best at"] for r in csv.DictReader(f)}
    assert marks[live] == "" and "wall s" in marks[resumed]


def test_the_frontier_keeps_what_no_other_point_beats_on_both_axes():
    points = [(1, 10.0, 2.0), (2, 20.0, 1.5), (3, 20.0, 2.5), (4, 5.0, 3.0), (5, 10.0, 2.0)]
    assert compare_mod.frontier(points, "min") == [1, 2, 4, 5]  # 3: beaten by 1 (smaller and lower)
    scores = [(1, 10.0, 0.5), (2, 20.0, 0.7), (3, 20.0, 0.4)]
    assert compare_mod.frontier(scores, "max") == [1, 2]


def test_the_comparison_of_old_rows_without_tokens_seen_counts_tokens_from_the_rate():
    job = {"id": 1, "name": "old", "metrics": [
        {"step": 1, "train_loss": 2.0, "eval_loss": None, "tokens_per_s": 100.0, "elapsed_s": 2.0, "tokens_seen": None},
        {"step": 2, "train_loss": 1.5, "eval_loss": 1.7, "tokens_per_s": 50.0, "elapsed_s": 3.0, "tokens_seen": None}]}
    assert [(p["split"], p["tokens"]) for p in compare_mod.curves(job)] == [("train", 200), ("train", 250),
                                                                           ("eval", 250)]
