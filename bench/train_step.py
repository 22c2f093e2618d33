"""Training step time and peak memory: QA-LoRA on the packed 4-bit base vs PEFT LoRA on the bf16 base.

Same model, same 7 target projections, rank, batch (``--batch`` x ``--seq`` tokens, every token
supervised), optimizer (fused AdamW) and compute dtype (bf16). Each row runs in its own child
process so that its peak memory is its own; the parent prints one table with ratios.

- **PEFT LoRA**: what a PEFT user runs: ``get_peft_model`` on the bf16 base, ``model(labels=...).loss``
  (full-vocabulary logits), bf16 autocast on CUDA as the HF Trainer's ``bf16=True`` does.
- **QA-LoRA**: the studio's own step, ``qalora.training.loop.optimizer_step`` (adapter folded into the
  dequantized weight, loss in vocabulary chunks, two activations kept per gated MLP), decoder
  layers compiled and freed heap released as a job does (``QALORA_COMPILE``; its first steps,
  which compile, are warm-up steps and are not timed).
- **QA-LoRA, eager**: the same with ``QALORA_COMPILE=0`` (``--no-eager`` leaves it out).
- **QA-LoRA + learned scales**: the same step with every layer's per-group scales trained too
  (``AdapterConfig(train_scales=True)``; their gradient is one more matmul per layer, and the layer's
  input is kept for it); the line under the table gives its time and memory against plain QA-LoRA.

Memory is the peak during the timed steps: resident memory (``VmHWM``) on the CPU, the CUDA
allocator's peak on a GPU. Shapes (``--shape``): the embedded default model, or random weights of
SmolLM2-135M's or TinyLlama-1.1B's shape (``bench/shapes.py``). On a CPU without native bf16
(no AVX512-BF16 or AMX) ``--dtype auto`` runs both in fp32.

    python bench/train_step.py [--device cpu|cuda] [--shape default|smollm2-135m|tinyllama-1.1b]
                               [--steps 5] [--batch 4] [--seq 256] [--rank 16] [--dtype auto]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

WARMUP = 2  # steps before timing: the allocator, the optimizer's state, compiling


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak(device: str) -> None:
    """Return freed heap to the OS, then restart the peak counters (VmHWM; CUDA's allocator)."""
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")


def _peak_mb(device: str) -> float:
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return _status_kb("VmHWM") / 1024


def native_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _peft_step(model, ids, opt, autocast):
    with autocast:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def child(method: str, args) -> dict:
    import torch

    import shapes
    from qalora.config import DEFAULT_TARGETS, AdapterConfig, QuantConfig

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model, vocab = shapes.build(args.shape, dtype, device)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if method == "peft":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                 target_modules=list(DEFAULT_TARGETS)))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        model.train()
        step = lambda: _peft_step(model, ids, opt, autocast)  # noqa: E731
        compiled_layers = nullcontext(0)
    else:
        from qalora import compiled
        from qalora.config import TrainConfig
        from qalora.models.model import inject_qalora, quantize_model
        from qalora.training.loop import host_batch, optimizer_step

        adapter = AdapterConfig(rank=args.rank, alpha=2 * args.rank, dropout=0.0, train_scales=args.train_scales)
        inject_qalora(model, quantize_model(model, QuantConfig(4, 32), adapter.targets), adapter)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        cfg = TrainConfig(steps=1000, batch_size=args.batch, seq_len=args.seq)
        cpu_ids = ids.cpu()
        batch = host_batch({"input_ids": cpu_ids, "labels": cpu_ids, "attention_mask": torch.ones_like(cpu_ids)},
                           pin=device.type == "cuda")
        model.train()
        step = lambda: optimizer_step(model, [batch], params, opt, sched, cfg, autocast)  # noqa: E731
        compiled_layers = compiled.decoder_layers_compiled(model, device, cfg.steps)  # as a job of cfg.steps
    from qalora.memory import released_between_layers
    trimming = released_between_layers(model, device) if method == "qalora" else nullcontext()
    with compiled_layers as n_compiled, trimming:
        t = time.perf_counter()
        for _ in range(WARMUP):
            step()
        sync()
        warmup_s = time.perf_counter() - t
        _reset_peak(args.device)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
    s_per_step = sorted(times)[len(times) // 2]
    return {"method": method, "s_per_step": s_per_step, "tokens_per_s": args.batch * args.seq / s_per_step,
            "peak_mb": _peak_mb(args.device), "trainable": sum(p.numel() for p in params),
            "threads": torch.get_num_threads(), "warmup_s": warmup_s, "compiled_layers": n_compiled,
            "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"}


ROWS = (("peft", "PEFT LoRA, bf16 base", {}),
        ("qalora", "QA-LoRA, 4-bit g32 packed base", {}),
        ("qalora-scales", "QA-LoRA + learned scales", {}),
        ("qalora-eager", "QA-LoRA, eager (QALORA_COMPILE=0)", {"QALORA_COMPILE": "0"}))


def run(args) -> dict:
    rows = {}
    for key, _, env in ROWS:
        if key == "qalora-eager" and args.no_eager:
            continue
        cmd = [sys.executable, __file__, "--child", key.split("-")[0], "--device", args.device, "--shape", args.shape,
               "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
               "--rank", str(args.rank), "--dtype", args.dtype] + ["--train-scales"] * (key == "qalora-scales")
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", **env})
        if out.returncode:
            sys.exit(f"{key} failed:\n{out.stderr[-3000:]}")
        rows[key] = json.loads(out.stdout.strip().splitlines()[-1])
    return rows


def table(rows: dict, args) -> str:
    import shapes
    p = rows["peft"]
    memory = "peak GPU memory (MiB)" if args.device == "cuda" else "peak RSS during steps (MiB)"
    lines = [f"Training step, {shapes.resolve(args.shape)} on {p['device_name']}, 7 projections, rank {args.rank}, "
             f"batch {args.batch} x {args.seq}, {args.dtype}, {p['threads']} threads, median of {args.steps} steps",
             "", f"| method | s/step | tokens/s | {memory} | trainable params | vs PEFT: time | vs PEFT: memory |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label, _ in ROWS:
        if key not in rows:
            continue
        r = rows[key]
        note = f" ({r['compiled_layers']} layers compiled, warm-up {r['warmup_s']:.0f} s)" if r["compiled_layers"] else ""
        lines.append(f"| {label}{note} | {r['s_per_step']:.3f} | {r['tokens_per_s']:,.0f} | {r['peak_mb']:,.0f} | "
                     f"{r['trainable']:,} | {r['s_per_step'] / p['s_per_step']:.2f}x | {r['peak_mb'] / p['peak_mb']:.2f}x |")
    if "qalora-scales" in rows:
        q, s = rows["qalora"], rows["qalora-scales"]
        lines += ["", f"Learned scales against plain QA-LoRA: time {s['s_per_step'] / q['s_per_step']:.2f}x, "
                      f"memory {s['peak_mb'] / q['peak_mb']:.2f}x (targets: at most 1.5x and 1.2x)."]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shape", choices=["default", "smollm2-135m", "tinyllama-1.1b", "tiny"], default="default")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    ap.add_argument("--no-eager", action="store_true", help="leave out the eager QA-LoRA row")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--child", choices=["qalora", "peft"])
    ap.add_argument("--train-scales", action="store_true", help="(child) learned scales too")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" or native_bf16() else "float32"
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows = run(args)
    print("\n" + table(rows, args))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
