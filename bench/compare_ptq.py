"""QA-LoRA vs the paper's baseline (LoRA on the quantized base, merged in 16 bits, quantized again).

Same base (embedded SmolLM2-135M), built-in data, steps, rank, learning rate and seed for both
methods, at 4, 3 and 2 bits with group 32. For each run the table shows the eval loss of the
quantized base, of the trained model, and of the deployed low-bit model, plus the built-in
skill score (exact JSON contact cards on held-out prompts, greedy) and the built-in
multiple-choice accuracy (``builtin:contacts-mc``: the right card among three near misses, by
log-likelihood) of the deployed model.

    python bench/compare_ptq.py [--steps 100] [--bits 4 3 2] [--skill-n 20] [--mc-n 50] [--out runs/compare]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def skill(model_dir: Path, n: int) -> float:
    from qalora.data import builtin_skill_check
    from qalora.export.native import load_quantized
    from qalora.infer import chat

    model, tok = load_quantized(model_dir, use_kernel=False)
    return builtin_skill_check(None, lambda msgs: chat(model, tok, msgs, max_new_tokens=40), n=n)


def mc_accuracy(model_dir: Path, n: int) -> float:
    from qalora.eval import evaluate_dir
    return evaluate_dir(model_dir, "builtin:contacts-mc", limit=n)["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--quant-method", default="rtn")
    ap.add_argument("--skill-n", type=int, default=20)
    ap.add_argument("--mc-n", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "runs" / "compare"))
    args = ap.parse_args()
    from qalora.config import AdapterConfig, QuantConfig, TrainConfig
    from qalora.pipeline import finetune

    rows = []
    for bits in args.bits:
        for method in ("qalora", "qlora-ptq"):
            out = Path(args.out) / f"{method}-{bits}bit"
            report_path = out / "report.json"
            if report_path.is_file():  # finished earlier: reuse (delete the folder to re-run)
                report = json.loads(report_path.read_text())
            else:
                report = finetune("default", "builtin:default", out,
                                  QuantConfig(bits, args.group_size, args.quant_method),
                                  AdapterConfig(rank=16, alpha=32, dropout=0.05, method=method),
                                  TrainConfig(steps=args.steps), resume=True)
            rows.append((bits, method, report, skill(out / "merged", args.skill_n),
                         mc_accuracy(out / "merged", args.mc_n)))
            print(f"done {method} {bits}-bit", file=sys.stderr, flush=True)
    print(f"\nQA-LoRA vs LoRA+PTQ, SmolLM2-135M, builtin:default, group {args.group_size}, "
          f"{args.quant_method.upper()}, {args.steps} steps, rank 16")
    print("| bits | method | eval loss quantized base | eval loss trained | eval loss deployed low-bit | "
          f"deployed vs trained max logit diff | skill (deployed, n={args.skill_n}) | "
          f"multiple choice (deployed, n={args.mc_n}) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for bits, method, r, score, mc in rows:
        name = "QA-LoRA (exact merge)" if method == "qalora" else "LoRA + PTQ"
        print(f"| {bits} | {name} | {r['eval_loss_quantized_base']:.4f} | {r['eval_loss_adapter']:.4f} | "
              f"{r['eval_loss_merged']:.4f} | {r['merge_max_abs_logit_diff']:.2e} | {score:.0%} | {mc:.0%} |")


if __name__ == "__main__":
    main()
