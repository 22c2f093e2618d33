"""Benchmarks through lm-evaluation-harness, offline: task YAMLs written here over small local
data files (a multiple-choice and a log-likelihood task), the paper's task names resolved from
lm-eval's registry, and the per-request log-likelihoods checked against lm-eval's own ``hf``
backend."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qalora.evaluation import benchmarks
from qalora.errors import ConfigError
from qalora.deployment.export.native import save_quantized
from qalora.method.merge import merge_adapters
from qalora.models.tiny import tiny_random_llama
from tests.helpers import tiny_qalora

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # per-request log-likelihood, fp32 on both sides


@pytest.fixture(scope="module")
def tasks(lm_eval_tasks):
    return lm_eval_tasks


def _loglikelihoods(results: dict, task: str) -> list[float]:
    return [resp[0][0] for sample in results["samples"][task] for resp in sample["resps"]]


def test_the_papers_task_names_resolve_without_any_download():
    for preset in benchmarks.PRESETS.values():
        assert benchmarks.check_tasks(preset["tasks"]) == preset["tasks"]
    assert benchmarks.PRESETS["commonsense"]["tasks"] == ["hellaswag", "piqa", "winogrande", "arc_easy",
                                                          "arc_challenge", "boolq", "openbookqa"]
    with pytest.raises(ConfigError, match=r"no task or group named 'hellaswa'.*Did you mean hellaswag"):
        benchmarks.check_tasks(["hellaswa", "mmlu"])
    with pytest.raises(ConfigError, match="is not a folder"):
        benchmarks.check_tasks(["qa_mc"], include_path="/no/such/folder")


def test_a_transformers_folder_scores_as_lm_evals_own_hf_backend(tasks, tmp_path):
    """Fidelity: the same per-request log-likelihoods (<= 1e-4) and the same accuracy as lm-eval
    loading the folder itself."""
    from lm_eval import simple_evaluate

    model, tok = tiny_random_llama()
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    ours_model, ours_tok, what = benchmarks.open_model(str(tmp_path / "hf"), device="cpu")
    assert what.startswith("float model") and ours_model.dtype == torch.float32
    done = []
    ours = benchmarks.run(ours_model, ours_tok, ["qa_mc", "qa_ll"], include_path=tasks, batch_size=4,
                          log_samples=True, on_progress=lambda d, t: done.append((d, t)))
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu",
                             tasks=["qa_mc", "qa_ll"], task_manager=benchmarks.task_manager(tasks), batch_size=4,
                             log_samples=True)
    for task in ("qa_mc", "qa_ll"):
        a, b = _loglikelihoods(ours, task), _loglikelihoods(theirs, task)
        assert len(a) == len(b) == (24 if task == "qa_mc" else 6)
        assert max(abs(x - y) for x, y in zip(a, b)) <= TOLERANCE
        assert ours["results"][task]["acc,none"] == theirs["results"][task]["acc,none"]
    assert done[-1] == (30, 30)  # requests done / total: both tasks' log-likelihood requests together
    scores = benchmarks.scores(ours)
    assert scores["qa_mc"]["metric"] == "acc_norm" and scores["qa_ll"]["metric"] == "acc"
    assert scores["qa_mc"]["value"] == ours["results"]["qa_mc"]["acc_norm,none"]


def test_the_merged_low_bit_model_is_evaluated_as_it_deploys(tasks, tmp_path):
    """A run's merged/ folder is loaded by load_quantized and scores what the trained model
    (adapter unmerged, in memory) scores: the merge is exact under lm-eval too."""
    trained, tok = tiny_qalora(seed=5)
    trained_results = benchmarks.run(trained, tok, ["qa_mc"], include_path=tasks, batch_size=4, log_samples=True)
    save_quantized(merge_adapters(trained), tok, tmp_path / "run" / "merged")
    model, tok2, what = benchmarks.open_model(str(tmp_path / "run"), device="cpu")
    assert what.startswith("merged low-bit model merged")
    merged_results = benchmarks.run(model, tok2, ["qa_mc"], include_path=tasks, batch_size=4, log_samples=True)
    a, b = _loglikelihoods(trained_results, "qa_mc"), _loglikelihoods(merged_results, "qa_mc")
    assert max(abs(x - y) for x, y in zip(a, b)) <= TOLERANCE


def test_the_eval_command_runs_tasks_and_writes_lm_evals_json(tasks, tmp_path):
    model, tok = tiny_qalora(seed=2)
    save_quantized(merge_adapters(model), tok, tmp_path / "run" / "merged")
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, "-m", "qalora", "eval", str(tmp_path / "run"), "--tasks", "qa_mc,qa_ll",
                          "--include-path", str(tasks), "--limit", "4", "--batch-size", "2", "--output", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["results"]["qa_mc"]["sample_len"] == 4  # --limit: 4 documents per task
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines() if line.startswith("qa_"))
    assert lines["qa_mc"].startswith(f"acc_norm {results['results']['qa_mc']['acc_norm,none']:.4f}")
    assert lines["qa_ll"].startswith(f"acc {results['results']['qa_ll']['acc,none']:.4f}")
    bad = subprocess.run([sys.executable, "-m", "qalora", "eval", str(tmp_path / "run"), "--tasks", "nosuchtask"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "lm-eval knows no task or group named 'nosuchtask'" in bad.stderr
