"""Low bits: plain QA-LoRA against the clip search, learned scales and the per-bit presets.

Default model (embedded SmolLM2-135M), built-in data, RTN, same steps, batch and seed in every
row. Each row is one fine-tune (``qalora.training.finetune.finetune``); the table shows the quantized
base's eval loss, the merged low-bit model's, the merge check, the 40 held-out multiple-choice
questions (``builtin:contacts-mc``) on the merged model, the mean step time, the peak memory and
the native folder's size. Finished rows are reused (delete a row's folder to run it again).

    python bench/low_bits.py [--bits 2 3 4] [--group-size 32 64] [--variants plain clip scales preset]
                             [--steps 100] [--out runs/low_bits] [--lr 2e-4] [--scales-lr 5e-5] [--base-only]

Variants: ``plain`` (min-max RTN, rank 16, alpha 32, lr 2e-4: the studio's old defaults), ``clip``
(+ the clip search), ``scales`` (+ the clip search + learned per-group scales), ``scales-row`` (+ the
clip search + one learned factor per output row instead), ``preset`` (the bit width's
preset, ``qalora.config.preset_for``). ``--lr``/``--scales-lr``/``--rank`` override the variants'
values, for the sweep that chose the presets.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def settings(variant: str, bits: int, args) -> dict:
    from qalora.config import preset_for

    # the settings before the presets (min-max, lr 2e-4): qalora.config.BIT_PRESETS[4] today
    plain = {"lr": 2e-4, "rank": 16, "alpha": 32.0, "clip": False, "train_scales": False, "scales_lr": 5e-5}
    chosen = {"plain": plain, "clip": {**plain, "clip": True},
              "scales": {**plain, "clip": True, "train_scales": True},
              "scales-row": {**plain, "clip": True, "train_scales": True, "granularity": "channel"},
              "preset": {**plain, **preset_for(bits)}}[variant]
    for key in ("lr", "scales_lr", "rank"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
            if key == "rank":
                chosen["alpha"] = 2.0 * chosen["rank"]
    return chosen


def run(variant: str, bits: int, group: int, args) -> dict:
    from file_sizes import folder_bytes
    from qalora.atomic import write_text
    from qalora.config import AdapterConfig, QuantConfig, TrainConfig
    from qalora.evaluation.heldout import evaluate_dir
    from qalora.training.finetune import finetune

    s = settings(variant, bits, args)
    tag = "-".join(f"{k}{v}" for k, v in sorted(s.items()) if k not in ("alpha", "granularity")) + f"-s{args.steps}"
    # named by the settings, not the variant: a preset equal to a variant's settings is that same run
    out = Path(args.out) / (f"{bits}bit-g{group}-{tag}" + (f"-{s['granularity']}" if "granularity" in s else ""))
    if not (out / "report.json").is_file():
        finetune("default", "builtin:default", out, QuantConfig(bits, group, "rtn", clip=s["clip"]),
                 AdapterConfig(rank=s["rank"], alpha=s["alpha"], train_scales=s["train_scales"],
                               scales_lr=s["scales_lr"], scales_granularity=s.get("granularity", "group")),
                 TrainConfig(steps=args.steps, lr=s["lr"], eval_every=args.steps, save_every=args.steps),
                 resume=True)
    report = json.loads((out / "report.json").read_text())
    if "mc_accuracy" not in report:
        report["mc_accuracy"] = evaluate_dir(out / "merged", "builtin:contacts-mc", limit=40)["accuracy"]
        write_text(out / "report.json", json.dumps(report, indent=2))
    return {**s, "report": report, "native_mb": folder_bytes(out / "merged") / 1e6}


def base_losses(bits_list, groups) -> None:
    """The quantized base's eval loss (no training) with min-max rounding and with the clip search,
    on the same held-out examples a run evaluates on (``--base-only``)."""
    import torch

    from qalora.data import records as data_mod
    from qalora.config import DEFAULT_TARGETS, QuantConfig, TrainConfig
    from qalora.evaluation.heldout import eval_loss
    from qalora.models.model import load_quantized_base, open_base

    cfg = TrainConfig()
    src = open_base("default")
    records = data_mod.load_records("builtin:default", seed=cfg.seed)
    _, held = data_mod.split_records(records, cfg.eval_fraction, cfg.seed)
    examples = data_mod.tokenize_records(held, src.tokenizer, cfg.seq_len)
    print("\nQuantized base (no training), eval loss on the runs' held-out examples")
    print("| bits | group | min-max | clip search |")
    print("|---:|---:|---:|---:|")
    for bits in bits_list:
        for group in groups:
            losses = []
            for clip in (False, True):
                model, _ = load_quantized_base(src, QuantConfig(bits, group, "rtn", clip=clip), DEFAULT_TARGETS,
                                               "cpu", torch.float32)
                losses.append(eval_loss(model, examples, cfg.batch_size, src.tokenizer.pad_token_id,
                                        cfg.eval_batches))
            print(f"| {bits} | {group} | {losses[0]:.4f} | {losses[1]:.4f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--group-size", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--variants", nargs="+", default=["plain", "clip", "scales", "preset"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "runs" / "low_bits"))
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--scales-lr", type=float, default=None)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--base-only", action="store_true",
                    help="only the quantized base's eval loss, min-max against the clip search (no training)")
    args = ap.parse_args()
    if args.base_only:
        return base_losses(args.bits, args.group_size)
    rows = []
    for bits in args.bits:
        for group in args.group_size:
            for variant in args.variants:
                rows.append((bits, group, variant, run(variant, bits, group, args)))
                print(f"done {bits}-bit g{group} {variant}", file=sys.stderr, flush=True)
    print(f"\nLow bits, SmolLM2-135M, builtin:default, RTN, {args.steps} steps, batch 4 x 256")
    print("| bits | group | variant | lr | rank | clip | learned scales (lr) | eval loss: quantized base | "
          "eval loss: merged | merge max Δlogit | multiple choice (40) | s/step | peak RSS MB | native MB |")
    print("|---:|---:|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for bits, group, variant, r in rows:
        rep = r["report"]
        step_s = rep["train_s"] / max(rep["steps"] - rep.get("resumed_from_step", 0), 1)
        print(f"| {bits} | {group} | {variant} | {r['lr']:g} | {r['rank']} | {'yes' if r['clip'] else 'no'} | "
              f"{'yes (%g)' % r['scales_lr'] if r['train_scales'] else 'no'} | "
              f"{rep['eval_loss_quantized_base']:.4f} | {rep['eval_loss_merged']:.4f} | "
              f"{rep['merge_max_abs_logit_diff']:.1e} | {rep['mc_accuracy']:.0%} | "
              f"{step_s:.2f} | {rep['peak_rss_mb']:.0f} | {r['native_mb']:.0f} |")


if __name__ == "__main__":
    main()
