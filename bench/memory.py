"""Peak memory per stage of a fine-tune on a random-weight LLaMA, before and after streaming load.

Writes a random LLaMA of the given shape (default: TinyLlama-1.1B's — hidden 2048, intermediate
5632, 22 layers, 32 heads, 4 KV heads, vocab 32000) as sharded bf16 safetensors with a real
LLaMA-2-style SentencePiece tokenizer, then runs a short fine-tune + merge + save on it through
``qalora.training.finetune.finetune``, each implementation in its own child process:

- ``new``: this checkout (streams the checkpoint one decoder layer at a time, merges in place);
- ``before``: the code before that change (``--before-ref``, checked out in a temporary git
  worktree), which loads the whole float model, then quantizes, then deep-copies to merge.

Each stage's peak RSS is the kernel's high-water mark (``VmHWM``), reset at every stage start.
The table puts them beside the bf16 checkpoint size and the packed size, and projects the
measured bytes per parameter to 7B, 13B and 70B shapes on one GPU.

    python bench/memory.py [--impl both|new|before] [--bits 4] [--group-size 64] [--steps 2]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE_REF = "3e16d5f"  # the last commit before streaming load and the in-place merge
SHAPE_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)
# Shapes for the projection (Llama-2 7B/13B/70B, and Llama-3-70B's larger vocabulary).
PROJECTED = {
    "7B (Llama-2)": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "13B (Llama-2)": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                          num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "70B (Llama-2)": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "70B (Llama-3)": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
}
CUDA_CONTEXT_GIB = 0.5  # what the CUDA runtime itself holds on the GPU, outside PyTorch's allocator
GIB = 2 ** 30


def layer_params(s: dict) -> int:
    """Parameters of one decoder layer's seven projections."""
    h, i = s["hidden_size"], s["intermediate_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * i


def adapter_params(s: dict, rank: int, group: int) -> int:
    h, i = s["hidden_size"], s["intermediate_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    outs, ins = [h, kv, kv, h, i, i, h], [h, h, h, h, h, h, i]
    return s["num_hidden_layers"] * sum(rank * (n // group) + o * rank for o, n in zip(outs, ins))


# ---------------------------------------------------------------------------------------------
# The random checkpoint

def write_checkpoint(directory: Path, shape: dict, seed: int = 0) -> None:
    """Random bf16 weights, one safetensors shard per decoder layer (and one for the rest)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from qalora.models.loader import empty_model
    from qalora.models.tiny import llama2_tokenizer

    if (directory / "model.safetensors.index.json").is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    tok = llama2_tokenizer()
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dtype="bfloat16")
    skeleton = empty_model(config, torch.bfloat16)
    shards: dict[str, dict] = {}
    for name, t in skeleton.state_dict().items():
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, {})[name] = t.shape
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for n, (key, shapes) in enumerate(shards.items()):
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shp in shapes.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shp, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shp, generator=g) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, directory / file, metadata={"format": "pt"})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(directory)
    tok.save_pretrained(directory)


# ---------------------------------------------------------------------------------------------
# One implementation, in a child process

# Own copies of train_step.py's two helpers: importing that module puts this checkout first on
# sys.path, and the "before" child must import the old code from its worktree.
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")


def child(model_dir: str, out_dir: str, bits: int, group: int, steps: int, seq: int, batch: int = 1) -> None:
    """Run the fine-tune of whatever ``qalora`` is on sys.path; print per-stage peaks as JSON."""
    import torch

    from qalora.config import AdapterConfig, QuantConfig, TrainConfig
    from qalora.training.finetune import finetune

    try:  # as the CLI and the worker do (absent from the code before)
        from qalora.memory import limit_heap_retention
        limit_heap_retention()
    except ImportError:
        pass
    peaks: dict[str, float] = {}
    gpu: dict[str, float] = {}
    seconds: dict[str, float] = {}
    current = ["startup"]
    clock = [time.perf_counter()]

    def on_stage(name: str) -> None:
        peaks[current[0]] = max(peaks.get(current[0], 0.0), _status_kb("VmHWM") / 1024)
        seconds[current[0]] = seconds.get(current[0], 0.0) + time.perf_counter() - clock[0]
        clock[0] = time.perf_counter()
        if torch.cuda.is_available():
            gpu[current[0]] = torch.cuda.max_memory_allocated() / 2 ** 20
            torch.cuda.reset_peak_memory_stats()
        current[0] = name
        _reset_peak()

    train = TrainConfig(steps=steps, batch_size=batch, seq_len=seq, warmup_steps=0, eval_every=steps,
                        save_every=steps, eval_batches=1 if batch == 1 else 8, eval_fraction=0.02 if batch == 1 else 0.1)
    report = finetune(model_dir, "builtin:default", out_dir, QuantConfig(bits, group), AdapterConfig(rank=16),
                      train, resume=False, on_stage=on_stage)
    on_stage("end")
    merged = Path(out_dir) / "merged" / "model.safetensors"
    print("RESULT " + json.dumps({"peaks": peaks, "gpu": gpu, "seconds": seconds, "merge_diff": report["merge_max_abs_logit_diff"],
                                  "merged_bytes": merged.stat().st_size, "wall_s": report["wall_s"]}))


def run_child(impl: str, model_dir: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        code_root = ROOT
        if impl == "before":
            code_root = Path(tmp) / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(code_root),
                            args.before_ref], check=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(code_root), "HF_HUB_OFFLINE": "1"}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(model_dir),
                   str(Path(tmp) / "out"), str(args.bits), str(args.group_size), str(args.steps), str(args.seq),
                   str(args.batch)]
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        finally:
            if impl == "before":
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(code_root)],
                               check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{impl} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------------------------
# Report

def projection(shape: dict, bytes_per_param: float, rank: int, group: int, seq: int) -> dict:
    """GPU bytes of a bf16-compute fine-tune: packed linears, bf16 embeddings and head, and the
    larger of one bf16 decoder layer (while streaming in) and the training state: fp32 adapter
    with grads and AdamW moments (16 B/param), checkpointed activations (one bf16 hidden state
    per layer and token), one layer's activations in flight (~(16 h + 3 i) bf16 values per token),
    fp32 logits and their gradient, and one dequantized weight in forward and backward."""
    h, i, n, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    linear = n * layer_params(shape)
    packed = linear * bytes_per_param
    embed_head = 2 * v * h * 2
    load_extra = layer_params(shape) * 2
    train_extra = (adapter_params(shape, rank, group) * 16 + n * seq * h * 2 + seq * (16 * h + 3 * i) * 2
                   + 3 * seq * v * 4 + 2 * h * i * 2)
    total = packed + embed_head + max(load_extra, train_extra) + CUDA_CONTEXT_GIB * GIB
    return {"params_b": (linear + embed_head / 2) / 1e9, "packed": packed, "embed_head": embed_head,
            "load_extra": load_extra, "train_extra": train_extra, "total": total}


STAGE_ROWS = [("load", "load (config, tokenizer, data / whole float model)"), ("data", "data"),
              ("quantize", "quantize (streams the weights in, new)"), ("train", "train"), ("merge", "merge"),
              ("verify", "verify"), ("save", "save")]


def stage_table(results: dict, impls: list[str]) -> None:
    mb = 2 ** 20
    head = "| stage | " + " | ".join(f"peak RSS {i} (MiB, time)" for i in impls) + (" | new / before |" if len(impls) == 2
                                                                                 else " |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for key, label in STAGE_ROWS:
        vals = [results[i]["peaks"].get(key) for i in impls]
        cells = [f"{v:,.0f} ({results[i]['seconds'].get(key, 0):.0f} s)" if v else "-"
                 for v, i in zip(vals, impls)]
        ratio = f" {vals[1] / vals[0]:.2f}x |" if len(vals) == 2 and all(vals) else (" - |" if len(vals) == 2
                                                                                   else "")
        print(f"| {label} | " + " | ".join(cells) + " |" + ratio)
    overall = [max(results[i]["peaks"].values()) for i in impls]
    ratio = f" {overall[1] / overall[0]:.2f}x |" if len(overall) == 2 else ""
    print("| **whole run** | " + " | ".join(f"**{v:,.0f}**" for v in overall) + " |" + ratio)
    for i in impls:
        print(f"\n{i}: merge max |logit diff| {results[i]['merge_diff']:.3g}, merged model file "
              f"{results[i]['merged_bytes'] / mb:,.0f} MiB, wall {results[i]['wall_s']:.0f} s")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        a = sys.argv[2:]
        child(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), int(a[5]), int(a[6]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impl", choices=["both", "new", "before"], default="both")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--before-ref", default=BEFORE_REF)
    p.add_argument("--cache", type=Path, default=ROOT / "data" / "cache" / "random-llama-1.1b")
    for key, value in SHAPE_1B.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=value)
    p.add_argument("--batch", type=int, default=1, help="examples per step (each its own length: padded)")
    p.add_argument("--base", choices=["random-1.1b", "default"], default="random-1.1b",
                   help="default: the embedded SmolLM2-135M on the built-in data, no projection")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    mb = 2 ** 20
    impls = ["before", "new"] if args.impl == "both" else [args.impl]
    if args.base == "default":
        results = {impl: run_child(impl, "default", args) for impl in impls}
        print(f"\nSmolLM2-135M (the embedded default model), {args.bits}-bit, group {args.group_size}, rank "
              f"{args.rank}, {args.steps} steps of {args.batch} built-in records (up to {args.seq} tokens each), "
              f"evaluation every {args.steps} steps, CPU fp32 compute\n")
        stage_table(results, impls)
        return
    shape = {k: getattr(args, k) for k in SHAPE_1B}
    write_checkpoint(args.cache, shape)

    linear = shape["num_hidden_layers"] * layer_params(shape)
    embed = 2 * shape["vocab_size"] * shape["hidden_size"]
    bf16_bytes = sum(f.stat().st_size for f in args.cache.glob("*.safetensors"))
    groups = linear // args.group_size
    packed = linear * args.bits // 8 + groups * 8  # codes + fp32 scale and offset per group
    results = {impl: run_child(impl, args.cache, args) for impl in impls}

    print(f"\nRandom LLaMA {(linear + embed) / 1e9:.2f}B parameters ({shape}), {args.bits}-bit, group "
          f"{args.group_size}, rank {args.rank}, {args.steps} steps of {args.batch} x {args.seq} tokens, CPU fp32 "
          "compute")
    print(f"bf16 checkpoint {bf16_bytes / mb:,.0f} MiB; packed linears {packed / mb:,.0f} MiB "
          f"({packed / linear:.3f} B/param); embeddings + head in fp32 {embed * 4 / mb:,.0f} MiB\n")
    stage_table(results, impls)
    bpp = packed / linear
    print(f"\nProjection to one GPU (bf16 compute, {args.bits}-bit group {args.group_size}: {bpp:.3f} B/param "
          f"measured on the packed linears; rank {args.rank}; 1 x 512 tokens with gradient checkpointing; "
          f"+{CUDA_CONTEXT_GIB} GiB CUDA context):\n")
    print("| base | params | packed linears | embeddings + head (bf16) | one bf16 layer (load) | "
          "training state | projected peak |")
    print("|---|---|---|---|---|---|---|")
    rows = [(name, s, args.group_size, bpp) for name, s in PROJECTED.items()]
    # The same layout at group 128 (codes + one fp32 scale and offset per group), for the largest base.
    rows.append(("70B (Llama-3), group 128", PROJECTED["70B (Llama-3)"], 128, args.bits / 8 + 8 / 128))
    for name, s, group, per_param in rows:
        pr = projection(s, per_param, args.rank, group, 512)
        print(f"| {name} | {pr['params_b']:.1f}B | {pr['packed'] / GIB:.1f} GiB | {pr['embed_head'] / GIB:.1f} GiB | "
              f"{pr['load_extra'] / GIB:.2f} GiB | {pr['train_extra'] / GIB:.2f} GiB | **{pr['total'] / GIB:.1f} GiB** |")


if __name__ == "__main__":
    main()
