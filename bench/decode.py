"""Decode speed at batch 1: the merged INT4 QA-LoRA model in PyTorch, its exports in their own
runtimes (GGUF Q4_1 in llama.cpp, GPTQ in gptqmodel), the app's chat path, and the transformers
fp32 and bf16 base.

``--device cuda`` (or ``--static``) adds what a GPU decodes with: the merged INT4 model and the
bf16 base each through :class:`qalora.deployment.decode.StaticDecoder`, a static KV cache and a compiled step
(CUDA graphs on CUDA), side by side, and their ratio; on CUDA the CPU-only rows (llama.cpp, GPTQ)
are left out. ``--shape`` picks random weights of SmolLM2-135M's or TinyLlama-1.1B's shape
(``bench/shapes.py``), whose prompt is 32 random token ids.

All models are the embedded SmolLM2-135M, in one process, same prompt, greedy, exactly
``--new-tokens`` generated (EOS ignored), prompt processing included (llama.cpp's prompt cache is
cleared before each run), best of ``--repeats``; first-token latency is the best run's time from
the call to the first new token (the chat rows: to the first text the app receives). The merged
model is built the way a job builds it (RTN 4-bit, group 32, adapter merged into the offsets);
its speed does not depend on what the adapter learned. Every runtime gets the same number of
threads.

The app's chat rows drive ``jobs.chat.stream_reply`` (what the Chat tab streams from) on the
runtime it picks, and the PyTorch runtime it picks on CUDA or where no GGUF is possible; both
stream text as it grows, their end ids cleared so they generate the same number of tokens.

    python bench/decode.py [--new-tokens 128] [--repeats 3] [--skip gguf,gptq,chat]
                           [--device cpu|cuda] [--shape default|smollm2-135m|tinyllama-1.1b] [--static]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a robot."}]


def best_of(run, new_tokens: int, repeats: int) -> tuple[float, float]:
    """``(tokens/s, first-token seconds)`` of the fastest of ``repeats`` runs; ``run(n, first)``
    generates ``n`` tokens and calls ``first()`` when the first one is out."""
    run(8, lambda: None)  # warm-up
    best, first_at = float("inf"), float("inf")
    for _ in range(repeats):
        stamp: list[float] = []
        t = time.perf_counter()
        run(new_tokens, lambda: stamp.append(time.perf_counter()))
        took = time.perf_counter() - t
        if took < best:
            best, first_at = took, stamp[0] - t
    return new_tokens / best, first_at


class _FirstToken:
    """A ``generate`` streamer that calls ``first()`` when the first new token is out."""

    def __init__(self, first):
        self.first, self.puts = first, 0

    def put(self, value):
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt
            self.first()

    def end(self):
        pass


def tokens_per_s(model, tok, new_tokens: int, repeats: int) -> tuple[float, float]:
    from qalora.deployment.generate import chat_input_ids
    ids = chat_input_ids(tok, PROMPT)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=tok.pad_token_id, eos_token_id=None)

    def run(n, first):
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, streamer=_FirstToken(first), **kwargs)
        assert out.shape[1] - ids.shape[1] == n

    with torch.inference_mode():
        return best_of(run, new_tokens, repeats)


def llama_cpp_tokens_per_s(gguf_path: Path, prompt_ids: list[int], new_tokens: int, repeats: int):
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=512, n_threads=torch.get_num_threads(),
                          n_threads_batch=torch.get_num_threads(), verbose=False)

    def run(n, first):
        llm.reset()  # otherwise generate reuses the cached prompt
        made = 0
        for _ in llm.generate(prompt_ids, temp=0.0, top_k=1):  # greedy; EOS does not stop it
            made += 1
            if made == 1:
                first()
            if made == n:
                break
        assert made == n

    try:
        return best_of(run, new_tokens, repeats)
    finally:
        llm.close()


def app_chat_tokens_per_s(merged: Path, prefer: str, new_tokens: int, repeats: int):
    """The Chat tab's path: ``jobs.chat.stream_reply`` on the runtime ``open_runtime`` picks
    (``prefer="auto"``), or on the PyTorch runtime it picks on CUDA or where no GGUF is possible."""
    from jobs import chat
    from qalora.deployment.runtime import open_runtime

    if prefer == "auto":
        runtime, stream = chat.slot("tuned").get(str(merged)), chat.stream_reply
    else:
        runtime = open_runtime(merged, prefer=prefer)
        stream = lambda side, key, messages, **gen: runtime.stream_chat(messages, **gen)  # noqa: E731
    runtime.end_ids.clear()  # exactly n tokens, as in the other rows

    def run(n, first):
        runtime.clear_cache()
        texts = iter(stream("tuned", str(merged), PROMPT, max_new_tokens=n, temperature=0.0))
        next(texts)
        first()
        for _ in texts:
            pass

    try:
        return runtime.name, best_of(run, new_tokens, repeats)
    finally:
        chat.slot("tuned").unload()


def gptqmodel_tokens_per_s(gptq_dir: Path, tok, new_tokens: int, repeats: int) -> float:
    import os
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(torch.get_num_threads()))
    from gptqmodel import BACKEND, GPTQModel

    # gptqmodel's CPU torch kernel runs in 16-bit; torch.compile is left off (it recompiles per
    # sequence length during decoding, which would only add time).
    with torch._dynamo.config.patch(disable=True):
        model = GPTQModel.load(str(gptq_dir), device="cpu", backend=BACKEND.TORCH, dtype=torch.bfloat16).model
        return tokens_per_s(model.eval(), tok, new_tokens, repeats)


def merged_int4(base, use_kernel: bool, compute_dtype=torch.bfloat16, bits: int = 4, group: int = 32):
    """The base quantized (RTN, 4-bit group 32 unless told) and its adapter merged, as a job builds it."""
    from qalora.config import AdapterConfig, QuantConfig
    from qalora.method.quantlinear import set_compute_dtype
    from qalora.method.merge import merge_adapters
    from qalora.models.model import inject_qalora, quantize_model

    model = copy.deepcopy(base)
    adapter = AdapterConfig(rank=16)
    inject_qalora(model, quantize_model(model, QuantConfig(bits, group), adapter.targets), adapter)
    merge_adapters(model, use_kernel=use_kernel)
    if compute_dtype is not None:
        set_compute_dtype(model, compute_dtype)
    model.tie_weights()
    return model.eval()


def static_tokens_per_s(model, prompt_ids: list[int], new_tokens: int, repeats: int, compile: bool = True):
    """``(tokens/s, first-token seconds)`` greedy through a static cache and a compiled step."""
    from qalora.deployment.decode import StaticDecoder, cache_length

    decoder = StaticDecoder(model, cache_length(len(prompt_ids) + new_tokens + 8, 8192), compile=compile)
    sync = torch.cuda.synchronize if decoder.device.type == "cuda" else (lambda: None)

    def run(n, first):
        logits = decoder.prefill(prompt_ids)
        for i in range(n):
            token = int(logits.argmax())  # the token reaches the host each step, as in a chat
            if i == 0:
                first()
            logits = decoder.step(token)
        sync()

    try:
        run(3, lambda: None)  # compile (and record the CUDA graph) before timing
        return best_of(run, new_tokens, repeats)
    finally:
        decoder.close()


def device_rows(args) -> list:
    """The GPU table: bf16 base and merged INT4, eager and static + compiled, on ``args.device``."""
    import shapes

    device = torch.device(args.device)
    base, vocab = shapes.build(args.shape, torch.bfloat16, device)
    if shapes.resolve(args.shape) == "default":
        from transformers import AutoTokenizer

        from qalora.deployment.generate import chat_input_ids
        prompt = chat_input_ids(AutoTokenizer.from_pretrained(shapes.CACHE), PROMPT)[0].tolist()
    else:
        prompt = torch.randint(3, vocab, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    core = args.rows == "core"  # the two rows of the target and the eager INT4 one
    with torch.inference_mode():
        rows.append(("bf16 base, static cache + compiled step", static_tokens_per_s(base, prompt, args.new_tokens,
                                                                                  args.repeats)))
        if not core:
            rows.append(("bf16 base, eager", static_tokens_per_s(base, prompt, args.new_tokens, args.repeats, False)))
    merged = merged_int4(base, use_kernel=True)
    del base
    from qalora.method.quantlinear import QuantLinear
    layers = [m for m in merged.modules() if isinstance(m, QuantLinear)]
    on_kernel = sum(m.prepare_kernel() for m in layers)
    what = f"{on_kernel}/{len(layers)} layers on the int4 kernel"
    rows.append((f"QA-LoRA merged INT4, static cache + compiled step ({what})",
                 static_tokens_per_s(merged, prompt, args.new_tokens, args.repeats)))
    rows.append((f"QA-LoRA merged INT4, eager ({what})",
                 static_tokens_per_s(merged, prompt, args.new_tokens, args.repeats, False)))
    if core:
        return rows
    for m in layers:
        m.use_kernel = False
    rows.append(("QA-LoRA merged INT4, dequantize + matmul, static cache + compiled step",
                 static_tokens_per_s(merged, prompt, args.new_tokens, args.repeats)))
    return rows


def print_table(title: str, rows, vs: str, standalone=None) -> None:
    """One markdown table: tokens/s against the first row (and llama.cpp's, where it ran)."""
    ref = rows[0][1][0]
    print(f"\n{title}")
    print(f"| model | tokens/s | vs {vs} |" + (" vs llama.cpp standalone (same file) |" if standalone else "")
          + " first token |")
    print("|---|---:|---:|" + ("---:|" if standalone else "") + "---:|")
    for name, (tps, first) in rows:
        vs_llama = f" {tps / standalone[0]:.2f}x |" if standalone else ""
        print(f"| {name} | {tps:.1f} | {tps / ref:.2f}x |{vs_llama} {first * 1000:.0f} ms |")


def print_device_table(rows, args) -> None:
    import shapes
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print_table(f"Decode, {shapes.resolve(args.shape)}, {name}, batch 1, {args.new_tokens} new tokens, greedy, "
                f"best of {args.repeats}", rows, "bf16 base, static cache + compiled")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated: gguf, gptq, chat")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shape", choices=["default", "smollm2-135m", "tinyllama-1.1b", "tiny"], default="default")
    ap.add_argument("--static", action="store_true", help="the static-cache rows on the CPU too")
    ap.add_argument("--rows", choices=["all", "core"], default="all",
                    help="core: bf16 and INT4 static + compiled, INT4 eager (the GPU check's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the static-cache rows here")
    args = ap.parse_args()
    if args.device == "cuda" or args.static or args.shape != "default":
        rows = device_rows(args)
        print_device_table(rows, args)
        if args.json:
            import json
            args.json.write_text(json.dumps([{"row": r, "tokens_per_s": t, "first_s": f} for r, (t, f) in rows]))
        if args.device == "cuda" or args.shape != "default":
            return
    cpu_table(args)


def cpu_table(args) -> None:
    skip = set(filter(None, args.skip.split(",")))
    import tempfile

    from qalora.deployment.export.gguf import export_gguf
    from qalora.deployment.export.gptq import export_gptq
    from qalora.deployment.export.native import save_quantized
    from qalora.deployment.generate import chat_input_ids
    from qalora.models.model import load_base

    base, tok = load_base("default", dtype=torch.float32)
    rows = []  # (name, (tokens/s, first-token seconds))
    rows.append(("transformers fp32 base", tokens_per_s(base, tok, args.new_tokens, args.repeats)))
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    rows.append(("transformers bf16 base", tokens_per_s(bf16, tok, args.new_tokens, args.repeats)))
    del bf16
    for name, use_kernel in (("QA-LoRA merged INT4, PyTorch (int4 kernel)", True),
                             ("QA-LoRA merged INT4, PyTorch (dequantize + matmul)", False)):
        model = merged_int4(base, use_kernel)
        rows.append((name, tokens_per_s(model, tok, args.new_tokens, args.repeats)))
        del model
    work = Path(tempfile.mkdtemp(prefix="qalora-decode-"))
    save_quantized(merged_int4(base, False, compute_dtype=None), tok, work / "merged")
    standalone = None
    if "gguf" not in skip:
        # where a job's export lands, so the app's chat runs this very file
        path = export_gguf(work / "merged", work / "exports" / "model-q4_1.gguf")
        prompt_ids = chat_input_ids(tok, PROMPT)[0].tolist()
        standalone = llama_cpp_tokens_per_s(path, prompt_ids, args.new_tokens, args.repeats)
        rows.append(("same model, GGUF Q4_1 export, llama.cpp (standalone)", standalone))
    if "chat" not in skip:
        for prefer, what in (("auto", "the app picks on this CPU"), ("pytorch", "on CUDA or without GGUF")):
            name, result = app_chat_tokens_per_s(work / "merged", prefer, args.new_tokens, args.repeats)
            rows.append((f"in-app chat (streamed), {name}: {what}", result))
    if "gptq" not in skip:
        export_gptq(work / "merged", work / "gptq")
        rows.append(("same model, GPTQ export, gptqmodel (torch backend, bf16)",
                     gptqmodel_tokens_per_s(work / "gptq", tok, args.new_tokens, args.repeats)))
    print_table(f"Decode, SmolLM2-135M, batch 1, {args.new_tokens} new tokens, greedy, best of {args.repeats}, "
                f"{torch.get_num_threads()} threads", rows, "fp32 base", standalone)
    import shutil
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
