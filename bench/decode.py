"""Decode speed at batch 1: the merged INT4 QA-LoRA model vs the transformers fp32 and bf16 base.

All models are the embedded SmolLM2-135M, in one process, same prompt, greedy, exactly
``--new-tokens`` generated (EOS ignored). The merged model is built the way a job builds it
(RTN 4-bit, group 32, adapter merged into the offsets); its speed does not depend on what the
adapter learned.

    python bench/decode.py [--new-tokens 128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a robot."}]


def tokens_per_s(model, tok, new_tokens: int, repeats: int) -> float:
    from qalora.infer import chat_input_ids
    ids = chat_input_ids(tok, PROMPT)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            best = min(best, time.perf_counter() - t)
    assert out.shape[1] - ids.shape[1] == new_tokens
    return new_tokens / best


def merged_int4(base_fp32, use_kernel: bool):
    from qalora.config import AdapterConfig, QuantConfig
    from qalora.infer import set_compute_dtype
    from qalora.merge import merge_adapters
    from qalora.model import inject_qalora, quantize_model

    model = copy.deepcopy(base_fp32)
    adapter = AdapterConfig(rank=16)
    inject_qalora(model, quantize_model(model, QuantConfig(4, 32), adapter.targets), adapter)
    merge_adapters(model, use_kernel=use_kernel)
    set_compute_dtype(model, torch.bfloat16)
    model.tie_weights()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from qalora.model import load_base

    base, tok = load_base("default", dtype=torch.float32)
    rows = []
    rows.append(("transformers fp32 base", tokens_per_s(base, tok, args.new_tokens, args.repeats)))
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    rows.append(("transformers bf16 base", tokens_per_s(bf16, tok, args.new_tokens, args.repeats)))
    del bf16
    for name, use_kernel in (("QA-LoRA merged INT4 (int4 kernel)", True),
                             ("QA-LoRA merged INT4 (dequantize + matmul)", False)):
        model = merged_int4(base, use_kernel)
        rows.append((name, tokens_per_s(model, tok, args.new_tokens, args.repeats)))
        del model
    ref = rows[0][1]
    print(f"\nDecode, SmolLM2-135M, batch 1, {args.new_tokens} new tokens, greedy, best of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    print("| model | tokens/s | vs fp32 base |")
    print("|---|---:|---:|")
    for name, tps in rows:
        print(f"| {name} | {tps:.1f} | {tps / ref:.2f}x |")


if __name__ == "__main__":
    main()
