"""Training step time and peak memory: QA-LoRA on the packed 4-bit base vs PEFT LoRA on the bf16 base.

Same model (the embedded SmolLM2-135M), same 7 target projections, rank, batch (4 x 256 tokens),
optimizer and dtype. Each method runs in its own child process so that its peak memory is its
own; the parent prints one table with ratios.

It runs on the CPU. The dtype is bf16 where the CPU computes it natively (AVX512-BF16 or AMX);
on other CPUs PyTorch emulates bf16 matmuls at a small fraction of fp32 speed, so both
methods run in fp32 there (the base is then fp32 for PEFT, packed 4-bit for QA-LoRA).
``--dtype bfloat16`` forces it.

    python bench/train_step.py [--steps 5] [--batch 4] [--seq 256] [--rank 16] [--dtype auto]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "data" / "cache" / "smollm2-135m-bf16"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Return freed heap to the OS, then restart the kernel's peak-RSS counter (VmHWM)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")


def native_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def prepare_cache() -> None:
    """Write the default model once as bf16 safetensors, so neither child pays the fp32 GGUF load."""
    if (CACHE / "config.json").is_file():
        return
    import torch
    from qalora.model import load_base
    model, tok = load_base("default", dtype=torch.bfloat16)
    model.save_pretrained(CACHE)
    tok.save_pretrained(CACHE)


def build(method: str, rank: int, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    from qalora.config import DEFAULT_TARGETS, AdapterConfig, QuantConfig
    from qalora.model import inject_qalora, quantize_model

    model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=getattr(torch, dtype))
    if method == "qalora":
        adapter = AdapterConfig(rank=rank, alpha=2 * rank, dropout=0.0)
        inject_qalora(model, quantize_model(model, QuantConfig(4, 32), adapter.targets), adapter)
    else:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                 target_modules=list(DEFAULT_TARGETS)))
    return model


def child(method: str, steps: int, batch: int, seq: int, rank: int, dtype: str) -> dict:
    import torch

    torch.manual_seed(0)
    model = build(method, rank, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up: allocator, optimizer state
    _reset_peak()
    rss_before = _status_kb("VmRSS")
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"method": method, "s_per_step": sorted(times)[len(times) // 2], "peak_mb": _status_kb("VmHWM") / 1024,
            "rss_before_mb": rss_before / 1024, "trainable": sum(p.numel() for p in params),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    ap.add_argument("--child", choices=["qalora", "peft"])
    args = ap.parse_args()
    if args.dtype == "auto":
        args.dtype = "bfloat16" if native_bf16() else "float32"
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.seq, args.rank, args.dtype)))
        return
    prepare_cache()
    rows = {}
    for method in ("peft", "qalora"):
        cmd = [sys.executable, __file__, "--child", method, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq), "--rank", str(args.rank), "--dtype", args.dtype]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
    p, q = rows["peft"], rows["qalora"]
    print(f"\nTraining step, SmolLM2-135M, 7 projections, rank {args.rank}, batch {args.batch} x {args.seq}, "
          f"{args.dtype}, {q['threads']} threads, median of {args.steps} steps")
    print("| method | s/step | peak RSS during steps (MB) | trainable params |")
    print("|---|---:|---:|---:|")
    print(f"| PEFT LoRA, {args.dtype} base | {p['s_per_step']:.2f} | {p['peak_mb']:.0f} | {p['trainable']:,} |")
    print(f"| QA-LoRA, 4-bit g32 packed base | {q['s_per_step']:.2f} | {q['peak_mb']:.0f} | {q['trainable']:,} |")
    print(f"| ratio QA-LoRA / PEFT | {q['s_per_step'] / p['s_per_step']:.2f}x | {q['peak_mb'] / p['peak_mb']:.2f}x | "
          f"{q['trainable'] / p['trainable']:.2f}x |")


if __name__ == "__main__":
    main()
