"""Host synchronisations and operator counts per training step, this checkout against an earlier one.

Runs ``qalora.training.loop.train`` on the default model (4-bit g32, rank 16, dropout 0.05, batch
``--batch`` of the built-in records) and profiles two steps after ``--warmup`` steps (which
compile, where compiling is on) with ``torch.profiler``, each implementation in its own child
process (``--before-ref``: the code before the fast training step, checked out in a temporary git
worktree). Per step it counts:

- host synchronisations: ops that read a device value back (``item``, ``is_nonzero``,
  ``nonzero``; on CUDA each waits for the GPU), leaving out reads of host tensors: the
  optimizer's step counts (CPU tensors, or read inside fused AdamW's kernel) and the batch's
  counts taken on the CPU labels (``host_batch``). The step's one read for the log
  (``tolist``) is no aten op on the CPU, so it is not counted here;
- operators: every ``aten::`` call, and the calls of compiled graphs;
- the step's wall time.

    python bench/step_profile.py [--batch 4] [--warmup 3] [--before-ref e9bb3ae] [--compile 0|1|both]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE_REF = "e9bb3ae"  # the last commit before the fast training step
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero")


def child(batch: int, warmup: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from qalora.data import records as data
    from qalora.config import AdapterConfig, QuantConfig, TrainConfig
    from qalora.models.model import inject_qalora, load_quantized_base, open_base
    from qalora.training.loop import train

    src = open_base("default")
    records = data.load_records("builtin:default")
    examples = data.tokenize_records(records, src.tokenizer, 256)
    adapter = AdapterConfig(rank=16)
    model, q = load_quantized_base(src, QuantConfig(4, 32), adapter.targets, "cpu", torch.float32)
    inject_qalora(model, q, adapter)
    prof = profile(activities=[ProfilerActivity.CPU])
    seconds = []

    def on_step(info):
        if info.step > warmup:
            seconds.append(info.elapsed_s)
        if info.step == warmup:
            prof.start()
            seconds.append(info.elapsed_s)

    steps = warmup + 2
    cfg = TrainConfig(steps=steps, batch_size=batch, eval_every=10 ** 6, save_every=10 ** 6, warmup_steps=0)
    train(model, examples, [], cfg, src.tokenizer.pad_token_id, on_step=on_step)
    prof.stop()
    events = prof.events()
    # reads that are host work on host tensors, not waits for a device: the optimizer's own step
    # counts (CPU tensors, or read inside the fused kernel) and the batch's counts (this checkout's
    # host_batch, on the CPU labels)
    host = [e for e in events if e.name.startswith("Optimizer.step") or e.name == "host_batch"]

    def on_host(e):
        return any(a.time_range.start <= e.time_range.start and e.time_range.end <= a.time_range.end for a in host)

    syncs = [e.name for e in events if e.name in SYNC_OPS and not on_host(e)]
    # every read of a value passes through _local_scalar_dense (item, bool, float); nonzero reads its count
    calls = sum(e.name in ("aten::_local_scalar_dense", "aten::nonzero") and not on_host(e) for e in events)
    return {"syncs": calls / 2, "sync_ops": sorted(set(syncs)),
            "aten_ops": sum(e.name.startswith("aten::") for e in events) / 2,
            "graphs": sum(e.name.startswith("Torch-Compiled Region") for e in events) / 2,
            "s_per_step": (seconds[-1] - seconds[0]) / 2}


def run_child(code_root: Path, args, compile_env: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "QALORA_COMPILE": compile_env}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(args.batch), str(args.warmup)]
    proc = subprocess.run(cmd, cwd=code_root, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(child(int(sys.argv[2]), int(sys.argv[3]))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--before-ref", default=BEFORE_REF)
    p.add_argument("--compile", choices=["0", "1", "both"], default="both")
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(before), args.before_ref],
                       check=True)
        try:
            rows[f"before ({args.before_ref})"] = run_child(before, args, "0")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    for value in (["0", "1"] if args.compile == "both" else [args.compile]):
        rows[f"this checkout, QALORA_COMPILE={value}"] = run_child(ROOT, args, value)
    print(f"\nOne training step of the default model (fp32, CPU), batch {args.batch} of the built-in records, "
          f"dropout 0.05, two steps profiled after {args.warmup}\n")
    print("| code | host syncs / step | which | aten ops / step | compiled graph calls / step | s / step |")
    print("|---|---:|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['syncs']:.0f} | {', '.join(s.removeprefix('aten::') for s in r['sync_ops']) or '-'} | "
              f"{r['aten_ops']:,.0f} | {r['graphs']:.0f} | {r['s_per_step']:.2f} |")


if __name__ == "__main__":
    main()
