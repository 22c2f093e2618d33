"""The prepared GPU check: everything the CPU cannot prove, in one run of at most 8 minutes.

On one CUDA GPU it runs, each step in its own process with its own time limit, most important
first (a step the budget no longer covers is reported as not run):

1. a smoke of the test suite on CUDA (``QALORA_TEST_DEVICE=cuda``, at most 2 minutes): the layer,
   loss, training step (no host synchronisation: ``torch.cuda.set_sync_debug_mode``), compiled
   layers, static-cache decoding with CUDA graphs, the padded int4 kernel and the tinygemm export
   (its packer against PyTorch's, its fidelity in stock transformers);
2. ``bench/train_step.py --device cuda`` on two shapes (SmolLM2-135M, TinyLlama-1.1B): QA-LoRA's
   tokens/s and peak GPU memory against PEFT LoRA on the bf16 base;
3. ``bench/decode.py --device cuda --rows core`` on the same two shapes: the merged INT4 model
   against the bf16 base, both with a static cache and a compiled step (CUDA graphs);
4. train -> merge -> verify -> chat of a 135M model in bf16 through ``python -m qalora``;
5. one layer, int4 kernel against dequantize-and-matmul, from 1 to 256 rows (where the kernel
   stops paying: ``qalora.method.kernels.KERNEL_MAX_ROWS``);

and prints one table. ``--dry-run`` runs the same plumbing on the CPU with the tests' 2-layer
model shape, a few steps and the device-tracing tests only: it proves the script, not the GPU.

    python bench/gpu_check.py [--dry-run] [--budget-s 480] [--json rows.json] [--log-dir DIR]

Where the embedded default model cannot travel (the device machine takes 64 MiB of files), the
shapes are random-weight models (``bench/shapes.py``) and the fine-tune writes a random SmolLM2
of the same shape; the table says so.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE_TESTS = ["tests/test_device.py", "tests/test_layer.py", "tests/test_loss.py", "tests/test_mlp.py",
               "tests/test_train.py", "tests/test_compiled.py", "tests/test_decode.py", "tests/test_infer.py",
               "tests/test_export_torchao.py", "tests/test_merge.py"]
SMOKE_S = 120
PROMPT = "Make a contact card: Ana Ruiz, 41, lives in Porto."


def _run(cmd: list[str], timeout: float, env: dict | None = None, stderr: bool = True) -> tuple[int, str, float]:
    """``(exit code, output, seconds)``; the output is stdout and stderr, or stdout alone."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
                              capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + (proc.stderr if stderr else ""), time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out + f"\n(timed out after {timeout:.0f} s)", time.perf_counter() - t0


def environment(device: str) -> dict:
    import torch

    row = {"torch": torch.__version__, "device": device}
    if device == "cuda":
        row["gpu"] = torch.cuda.get_device_name(0)
        row["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return row


def suite(device: str, dry: bool, timeout: float) -> dict:
    files = ["tests/test_device.py"] if dry else SMOKE_TESTS
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "not slow", *files]
    rc, out, secs = _run(cmd, timeout, {"QALORA_TEST_DEVICE": device})
    tail = [ln for ln in out.splitlines() if " passed" in ln or " failed" in ln or " error" in ln]
    return {"ok": rc == 0, "seconds": secs, "result": tail[-1].strip("= ") if tail else f"exit {rc}", "log": out}


def train_bench(shape: str, device: str, dry: bool, out: Path, timeout: float) -> dict:
    steps = "2" if dry else "5"
    cmd = [sys.executable, "bench/train_step.py", "--device", device, "--shape", shape, "--steps", steps,
           "--no-eager", "--json", str(out)]
    rc, log, secs = _run(cmd, timeout)
    if rc or not out.is_file():
        return {"ok": False, "seconds": secs, "result": f"exit {rc}", "log": log}
    rows = json.loads(out.read_text())
    p, q = rows["peft"], rows["qalora"]
    return {"ok": True, "seconds": secs, "log": log,
            "result": (f"QA-LoRA {q['tokens_per_s']:,.0f} tok/s vs PEFT LoRA {p['tokens_per_s']:,.0f} "
                       f"({q['tokens_per_s'] / p['tokens_per_s']:.2f}x); peak memory {q['peak_mb']:,.0f} vs "
                       f"{p['peak_mb']:,.0f} MiB ({q['peak_mb'] / p['peak_mb']:.2f}x); compile warm-up "
                       f"{q['warmup_s']:.0f} s")}


def decode_bench(shape: str, device: str, dry: bool, out: Path, timeout: float) -> dict:
    new = "8" if dry else "128"
    cmd = [sys.executable, "bench/decode.py", "--device", device, "--shape", shape, "--new-tokens", new,
           "--repeats", "2", "--rows", "core", "--json", str(out)]
    rc, log, secs = _run(cmd, timeout)
    if rc or not out.is_file():
        return {"ok": False, "seconds": secs, "result": f"exit {rc}", "log": log}
    base, int4, eager = json.loads(out.read_text())
    return {"ok": True, "seconds": secs, "log": log,
            "result": (f"merged INT4 {int4['tokens_per_s']:.0f} tok/s vs bf16 base {base['tokens_per_s']:.0f} "
                       f"({int4['tokens_per_s'] / base['tokens_per_s']:.2f}x), both static cache + compiled; "
                       f"INT4 eager {eager['tokens_per_s']:.0f}; {int4['row'].split('(')[-1].rstrip(')')}")}


def random_smollm2(directory: Path, shape: str) -> str:
    """A random-weight model of ``shape`` (bench/shapes.py) with the ChatML byte tokenizer, saved."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "bench"))
    import shapes
    from qalora.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    dims = {**shapes.SHAPES[shape], "vocab_size": max(len(tok), shapes.SHAPES[shape]["vocab_size"])}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dims, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                         bos_token_id=None)).to(torch.bfloat16)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def finetune_and_chat(base: str, device: str, dry: bool, out: Path, timeout: float) -> dict:
    steps, dtype = ("2", "float32") if dry else ("30", "bfloat16")
    cmd = [sys.executable, "-m", "qalora", "train", "--base", base, "--bits", "4", "--group-size", "32",
           "--steps", steps, "--batch-size", "4", "--seq-len", "256", "--eval-every", steps,
           "--save-every", steps, "--dtype", dtype, "--out", str(out)]
    rc, log, secs = _run(cmd, timeout * 0.7, {"QALORA_DEVICE": device})
    report_path = out / "report.json"
    if rc or not report_path.is_file():
        return {"ok": False, "seconds": secs, "result": f"train exit {rc}", "log": log}
    report = json.loads(report_path.read_text())
    rc, reply, chat_s = _run([sys.executable, "-m", "qalora", "chat", str(out / "merged"), "--prompt", PROMPT,
                              "--max-new-tokens", "32"], timeout * 0.3, {"QALORA_DEVICE": device}, stderr=False)
    ok = rc == 0 and report["merge_max_abs_logit_diff"] <= 1e-3  # the check computes in fp32 on every device
    lines = [ln for ln in reply.strip().splitlines() if ln.strip() and not ln.startswith("answered by")]
    reply_line = lines[-1][:80] if lines else ""
    return {"ok": ok, "seconds": secs + chat_s, "log": log + "\n--- chat ---\n" + reply,
            "result": (f"merge max|dlogit| {report['merge_max_abs_logit_diff']:.2g}, eval loss base "
                       f"{report['eval_loss_quantized_base']:.3f} -> merged {report['eval_loss_merged']:.3f}, "
                       f"{report['tokens_per_s']:.0f} tok/s, peak GPU {report.get('peak_gpu_mb') or 0:.0f} MB; "
                       f'reply "{reply_line}"')}


def layer_speed(device: str, dry: bool) -> dict:
    """One merged 4-bit layer's forward, int4 kernel against dequantize-and-matmul, from 1 to 256
    rows, for LLaMA-7B's 4096 x 4096: microseconds each, and the last row count the kernel wins."""
    import torch

    sys.path.insert(0, str(ROOT))
    from qalora.method.quantlinear import QuantLinear
    from qalora.method.quant import quantize_tensor

    out_f, in_f = (256, 256) if dry else (4096, 4096)
    reps = 3 if dry else 50
    qt = quantize_tensor(torch.randn(out_f, in_f, device=device), 4, 128 if in_f % 128 == 0 else 32)
    layer = QuantLinear(qt, use_kernel=True)
    prepared = layer._kernel_weights(torch.device(device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    from qalora.method import kernels
    cells, wins = [], 0
    for m in (1, 16, 64, 128, 256):
        x = torch.randn(m, in_f, device=device, dtype=torch.bfloat16)
        times = {}
        for label, fn in (("kernel", lambda: kernels.int4_matmul(x, *prepared, layer.group_size, out_f)),
                          ("dequant", lambda: layer.reference_forward(x))):
            with torch.inference_mode():
                for _ in range(3):
                    fn()
                sync()
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                sync()
            times[label] = (time.perf_counter() - t0) / reps * 1e6
        if times["kernel"] < times["dequant"]:
            wins = m
        cells.append(f"m={m}: kernel {times['kernel']:.0f} / dequant {times['dequant']:.0f} us")
    return {"ok": True, "result": "; ".join(cells) + f"; the kernel wins up to {wins} rows "
                                                     f"(KERNEL_MAX_ROWS: {kernels.KERNEL_MAX_ROWS[device]})"}


def _keep(directory: Path | None, name: str, text: str) -> None:
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, the tests' tiny shape: check the script itself")
    p.add_argument("--budget-s", type=float, default=480)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--log-dir", type=Path, default=None, help="write each step's whole output here")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        print("no CUDA GPU visible: run with --dry-run to check the script on the CPU")
        return 2
    start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    rows: list[tuple[str, bool | None, float, str]] = []
    rows.append(("environment", True, 0.0, ", ".join(f"{k} {v}" for k, v in environment(device).items())))
    shapes_run = ["tiny"] if dry else ["smollm2-135m", "tinyllama-1.1b"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        steps = [("test suite smoke on " + device, lambda t: suite(device, dry, t), SMOKE_S)]
        for shape in shapes_run:
            steps.append((f"train step, {shape}", lambda t, s=shape: train_bench(s, device, dry, tmp / f"t-{s}.json", t),
                          100))
        for shape in shapes_run:
            steps.append((f"decode, {shape}", lambda t, s=shape: decode_bench(s, device, dry, tmp / f"d-{s}.json", t),
                          90))
        base = "tiny-random" if dry else random_smollm2(tmp / "random-smollm2", "smollm2-135m")
        steps.append(("train->merge->verify->chat (random SmolLM2 shape)" if not dry else
                      "train->merge->verify->chat", lambda t: finetune_and_chat(base, device, dry, tmp / "run", t), 90))
        steps.append(("one layer, int4 kernel vs dequantize", lambda t: layer_speed(device, dry), 40))
        for name, step, cap in steps:
            limit = min(cap, left())
            if limit < 20:
                rows.append((name, None, 0.0, "not run: the budget was spent"))
                continue
            t0 = time.perf_counter()
            try:
                r = step(limit)
            except Exception as exc:  # the table still prints; the traceback goes to stderr
                import traceback
                traceback.print_exc()
                r = {"ok": False, "result": f"{type(exc).__name__}: {exc}"[:300]}
            rows.append((name, r["ok"], r.get("seconds", time.perf_counter() - t0), r["result"]))
            _keep(args.log_dir, name.split(",")[0].replace(" ", "-").replace(">", "") + ".log", r.get("log", ""))
            if not r["ok"]:
                print(r.get("log", "")[-4000:], file=sys.stderr)
    total = time.perf_counter() - start
    print(f"\nGPU check ({'dry run on CPU' if dry else 'CUDA'}), {total:.0f} s in all\n")
    print("| step | ok | seconds | result |")
    print("|---|---|---|---|")
    for name, ok, secs, result in rows:
        mark = "yes" if ok else ("not run" if ok is None else "**NO**")
        print(f"| {name} | {mark} | {secs:.0f} | {result} |")
    if args.json:
        args.json.write_text(json.dumps([dict(zip(("step", "ok", "seconds", "result"), r)) for r in rows], indent=2))
    return 0 if all(r[1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
