"""Data-parallel training: ``python -m qalora train --nproc 2`` (torchrun, gloo on this CPU) against one
process with the same global batch: the same losses and the same merged model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qalora.config import TrainConfig
from qalora.training.loop import _Order, micro_batches

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
LOSS_RTOL = 1e-5   # per step, relative (the bound); measured ~1e-7: only summation order differs
LOGIT_ATOL = 1e-4  # merged models' logits


def _data(path: Path) -> str:
    path.write_text("".join(json.dumps({"instruction": f"Add {i} and {i % 7}.", "output": str(i + i % 7)}) + "\n"
                            for i in range(60)))
    return str(path)


def _train(data: str, out: Path, nproc: int, batch: int, steps: int = STEPS, extra=()) -> dict:
    cmd = [sys.executable, "-m", "qalora", "train", "--base", "tiny-random", "--data", data, "--out", str(out),
           "--steps", str(steps), "--batch-size", str(batch), "--seq-len", "64", "--lr", "1e-3", "--dropout", "0",
           "--warmup-steps", "1", "--eval-every", "3", "--save-every", "3", "--rank", "4", "--nproc", str(nproc),
           *extra]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "QALORA_DEVICE": "cpu", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


def _logits(run_dir: Path) -> torch.Tensor:
    from qalora.deployment.export.native import load_quantized

    model, _ = load_quantized(run_dir / "merged")
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    data = _data(tmp_path / "d.jsonl")
    one = _train(data, tmp_path / "one", nproc=1, batch=4)
    two = _train(data, tmp_path / "two", nproc=2, batch=2)
    assert (one["world_size"], one["global_batch"], two["world_size"], two["global_batch"]) == (1, 4, 2, 4)
    rel = [abs(a - b) / abs(a) for a, b in zip(one["train_losses"], two["train_losses"])]
    assert len(rel) == STEPS and max(rel) <= LOSS_RTOL, rel
    diff = (_logits(tmp_path / "one") - _logits(tmp_path / "two")).abs().max().item()
    assert diff <= LOGIT_ATOL
    assert two["merge_max_abs_logit_diff"] < 1e-4  # rank 0 merged and verified as a single process does
    print(f"max relative loss difference {max(rel):.2e}, max merged logit difference {diff:.2e}")
    (tmp_path / "measured.json").write_text(json.dumps({"loss_rel": max(rel), "logit": diff}))
    # only rank 0 wrote: one report, one merged model, one set of checkpoints
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-000003.safetensors",
                                                                                 "step-000006.safetensors"]


def test_a_run_resumes_with_another_number_of_processes_where_it_stopped(tmp_path):
    """Two processes train 6 steps; the run is put back to its step-3 checkpoint (as if it died there)
    and resumed by one process: it goes on from example 12 of the order with its own global batch."""
    from safetensors import safe_open

    data = _data(tmp_path / "d.jsonl")
    first = _train(data, tmp_path / "run", nproc=2, batch=2)
    (tmp_path / "run" / "checkpoints" / "step-000006.safetensors").unlink()
    resumed = _train(data, tmp_path / "run", nproc=1, batch=2, extra=["--resume"])
    assert (resumed["resumed_from_step"], resumed["world_size"], resumed["global_batch"]) == (3, 1, 2)
    assert resumed["train_losses"][:3] == first["train_losses"][:3]  # kept from the checkpoint
    with safe_open(str(tmp_path / "run" / "checkpoints" / "step-000006.safetensors"), framework="pt") as f:
        state = json.loads(f.metadata()["state"])
    assert state["position"] == 3 * 4 + 3 * 2  # 3 steps of 4 examples (2 ranks x 2), then 3 of 2


@pytest.mark.parametrize("world, accum", [(2, 1), (2, 3), (4, 2)])
def test_the_ranks_share_out_exactly_the_one_process_batch(world, accum):
    examples = [{"input_ids": [i + 3], "labels": [i + 3]} for i in range(50)]
    order = _Order(len(examples), seed=1)
    cfg = TrainConfig(batch_size=2, grad_accum=accum)
    one = micro_batches(order, examples, TrainConfig(batch_size=2 * world * accum), 8, pad_id=0)
    parts = [micro_batches(order, examples, cfg, 8, 0, rank, world) for rank in range(world)]
    seen = sorted(int(t) for rank in parts for b in rank for t in b["input_ids"][:, 0])
    assert seen == sorted(int(t) for t in one[0]["input_ids"][:, 0])  # the same examples, none twice
