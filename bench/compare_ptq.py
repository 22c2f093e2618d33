"""QA-LoRA vs the paper's baseline (LoRA on the quantized base, merged in 16 bits, quantized again).

Same base (embedded SmolLM2-135M), built-in data, steps, rank, learning rate and seed for both
methods, at 4, 3 and 2 bits with group 32. For each run the table shows the eval loss of the
quantized base, of the trained model, and of the deployed low-bit model, plus the built-in
skill score (exact JSON contact cards on held-out prompts, greedy) and the built-in
multiple-choice accuracy (``builtin:contacts-mc``: the right card among three near misses, by
log-likelihood) of the deployed model.

    python bench/compare_ptq.py [--steps 100] [--bits 4 3 2] [--skill-n 20] [--mc-n 50] [--out runs/compare]
                                [--tasks builtin | mmlu-5shot | commonsense | lm-eval names] [--limit N]

Then the paper's Table 1 layout through lm-evaluation-harness: rows 16-bit base, and per bit width
the quantized base (no training), LoRA + PTQ and QA-LoRA, one column per task. ``--tasks builtin``
(the default) is the held-out multiple choice above written as an lm-eval task (no download);
the paper's presets need the Hub for their data.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def skill(model_dir: Path, n: int) -> float:
    from qalora.data.builtin import builtin_skill_check
    from qalora.deployment.export.native import load_quantized
    from qalora.deployment.generate import chat

    model, tok = load_quantized(model_dir, use_kernel=False)
    return builtin_skill_check(None, lambda msgs: chat(model, tok, msgs, max_new_tokens=40), n=n)


def mc_accuracy(model_dir: Path, n: int) -> float:
    from qalora.evaluation.heldout import evaluate_dir
    return evaluate_dir(model_dir, "builtin:contacts-mc", limit=n)["accuracy"]


def table1(args, bits_list) -> None:
    """The paper's Table 1 layout for this run, every model scored by lm-eval on the same tasks."""
    import tempfile

    from qalora.evaluation import benchmarks, multiple_choice as mc_eval
    from qalora.config import QuantConfig

    folder = Path(tempfile.mkdtemp())
    if args.tasks == "builtin":
        questions = mc_eval.load_multiple_choice(mc_eval.BUILTIN_MC)
        benchmarks.write_choice_task(folder, "contacts_mc", [vars(q) for q in questions])
        tasks, fewshot, include = ["contacts_mc"], 0, folder
    else:
        preset = benchmarks.PRESETS.get(args.tasks)
        tasks = preset["tasks"] if preset else args.tasks.split(",")
        fewshot, include = (preset or {}).get("num_fewshot"), None
    names = benchmarks.check_tasks(tasks, include)

    def score(model, tok) -> dict:
        results = benchmarks.run(model, tok, names, num_fewshot=fewshot, limit=args.limit, include_path=include)
        return benchmarks.scores(results)

    rows = [("16-bit base", "16", score(*benchmarks.open_for("base16", None, "default", None, "cpu")))]
    for bits in bits_list:
        quant = QuantConfig(bits, args.group_size, args.quant_method)
        if args.quant_method == "rtn":  # GPTQ's quantized base needs the runs' calibration samples
            rows.append(("quantized base, no training", bits,
                         score(*benchmarks.open_for("quantized_base", None, "default", quant, "cpu"))))
        for method, label in (("qlora-ptq", "LoRA + PTQ"), ("qalora", "QA-LoRA")):
            model, tok, _ = benchmarks.open_model(str(Path(args.out) / f"{method}-{bits}bit"), device="cpu")
            rows.append((label, bits, score(model, tok)))
        print(f"scored {bits}-bit", file=sys.stderr, flush=True)
    metric = {t: rows[0][2].get(t, {}).get("metric", "") for t in names}
    print(f"\nTable 1 layout (lm-eval, {fewshot or 0}-shot{f', limit {args.limit}' if args.limit else ''}), "
          f"SmolLM2-135M, group {args.group_size}, {args.quant_method.upper()}, {args.steps} steps")
    print("| model | bits | " + " | ".join(f"{t} ({metric[t]})" for t in names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for label, bits, scores in rows:
        print(f"| {label} | {bits} | " + " | ".join(f"{scores[t]['value']:.4f}" if t in scores else "–"
                                                  for t in names) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--quant-method", default="rtn")
    ap.add_argument("--skill-n", type=int, default=20)
    ap.add_argument("--mc-n", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "runs" / "compare"))
    ap.add_argument("--tasks", default="builtin", help="builtin, a preset (mmlu-5shot, commonsense) or lm-eval names")
    ap.add_argument("--limit", type=int, default=None, help="documents per lm-eval task")
    args = ap.parse_args()
    from qalora.config import AdapterConfig, QuantConfig, TrainConfig
    from qalora.training.finetune import finetune

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
    table1(args, args.bits)


if __name__ == "__main__":
    main()
