"""One fine-tune from base to verified low-bit model: load, quantize, train, merge, verify, save.

The CLI and the job worker both call :func:`finetune`; it knows nothing of either.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import resource
import time
from pathlib import Path

import torch

from . import data as data_mod
from .config import AdapterConfig, QuantConfig, TrainConfig
from .eval import batches, eval_loss
from .merge import max_logit_diff, merge_adapters, merge_and_requantize
from .model import (count_adapter_params, inject_qalora, load_base, pick_device, quantize_model,
                    resolve_dtype)
from .quant import QuantizedTensor
from .train import latest_checkpoint, train

STAGES = ("load", "quantize", "data", "train", "merge", "verify", "save", "evaluate", "done")
BASE_CACHE = "quantized_base.pt"
MERGE_CHECK_BATCHES = 4


class TrainingStopped(Exception):
    """``should_stop()`` returned true; a checkpoint was written and the run can be resumed."""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibration_ids(examples, n: int = 32) -> list[torch.Tensor]:
    """GPTQ calibration samples: the first ``n`` training examples, ``(1, T)`` each."""
    return [torch.tensor(ex["input_ids"]).unsqueeze(0) for ex in examples[:n]]


def _quantize_or_reuse(model, quant: QuantConfig, adapter: AdapterConfig, train_examples, out: Path, resume: bool,
                       log) -> dict[str, QuantizedTensor]:
    """Quantize the base, or reload the codes a previous attempt wrote (GPTQ is slow to redo)."""
    cache = out / BASE_CACHE
    if resume and cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=False)
        if saved["quant"] == quant.to_dict():
            log.info("reusing quantized base from %s", cache.name)
            return {n: QuantizedTensor(**t) for n, t in saved["layers"].items()}
    calib = calibration_ids(train_examples) if quant.method == "gptq" else None
    from tqdm.auto import tqdm
    with tqdm(desc=f"quantize ({quant.method}, {quant.bits}-bit)", unit="layer", leave=False, disable=None) as bar:
        def progress(i, n):
            bar.total = n
            bar.n = i
            bar.refresh()
        qweights = quantize_model(model, quant, adapter.targets, calib, on_progress=progress)
    tmp = cache.with_suffix(".tmp")
    torch.save({"quant": quant.to_dict(), "layers": {n: vars(q) for n, q in qweights.items()}}, tmp)
    os.replace(tmp, cache)
    return qweights


def finetune(base: str, data: str, out_dir, quant: QuantConfig, adapter: AdapterConfig, train_cfg: TrainConfig, *,
             resume: bool = True, on_step=None, should_stop=None, on_stage=None, log=None) -> dict:
    """Run the whole pipeline; returns the report (also written to ``out_dir/report.json``).

    Writes ``out_dir/merged`` (native low-bit model), ``out_dir/adapter`` and checkpoints under
    ``out_dir/checkpoints``. Raises :class:`TrainingStopped` when ``should_stop()`` fires.
    """
    from .export.adapter import save_adapter
    from .export.native import save_quantized

    log = log or logging.getLogger("qalora")
    stage = on_stage or (lambda name: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    device = pick_device()
    torch_dtype = resolve_dtype(train_cfg.dtype, device)

    stage("load")
    records = data_mod.load_records(data)  # read the data first: a bad file fails in seconds
    model, tokenizer = load_base(base, dtype=torch_dtype, device=device)
    stage("data")
    train_records, eval_records = data_mod.split_records(records, train_cfg.eval_fraction, train_cfg.seed)
    train_examples = data_mod.tokenize_records(train_records, tokenizer, train_cfg.seq_len)
    eval_examples = data_mod.tokenize_records(eval_records, tokenizer, train_cfg.seq_len)
    log.info("data: %d train / %d eval examples", len(train_examples), len(eval_examples))

    stage("quantize")
    qweights = _quantize_or_reuse(model, quant, adapter, train_examples, out, resume, log)
    inject_qalora(model, qweights, adapter)
    pad_id = tokenizer.pad_token_id
    ev = dict(batch_size=train_cfg.batch_size, pad_id=pad_id, max_batches=train_cfg.eval_batches)
    eval_base = eval_loss(model, eval_examples, **ev)
    log.info("quantized base: eval loss %.4f", eval_base)

    stage("train")
    resumed = resume and latest_checkpoint(out / "checkpoints") is not None
    result = train(model, train_examples, eval_examples, train_cfg, pad_id, ckpt_dir=out / "checkpoints",
                   resume=resume, on_step=on_step, should_stop=should_stop, log=log)
    if result.stopped:
        raise TrainingStopped(f"stopped after step {result.step}")
    eval_adapter = eval_loss(model, eval_examples, **ev)

    stage("merge")
    if adapter.method == "qlora-ptq":
        calib = calibration_ids(train_examples) if quant.method == "gptq" else None
        merged = merge_and_requantize(copy.deepcopy(model), quant, calib, use_kernel=False)
    else:
        merged = merge_adapters(copy.deepcopy(model), use_kernel=False)
    stage("verify")
    check = list(batches(eval_examples, train_cfg.batch_size, pad_id, MERGE_CHECK_BATCHES))
    check = [{k: v.to(device) for k, v in b.items()} for b in check]
    diff = max_logit_diff(model, merged, check)
    eval_merged = eval_loss(merged, eval_examples, **ev)
    log.info("merge check: max |logit diff| %.3g, eval loss adapter %.4f merged %.4f", diff, eval_adapter,
             eval_merged)

    stage("save")
    report = {
        "base": base, "data": data, "bits": quant.bits, "group_size": quant.group_size,
        "quant_method": quant.method, "method": adapter.method, "rank": adapter.rank, "alpha": adapter.alpha,
        "steps": result.step,
        "resumed_from_step": result.resumed_from if resumed else 0,
        "adapter_params": count_adapter_params(model),
        "train_examples": len(train_examples), "eval_examples": len(eval_examples),
        "train_loss_first": result.losses[0] if result.losses else None,
        "train_loss_last": result.losses[-1] if result.losses else None,
        "train_losses": result.losses, "eval_losses": {str(k): v for k, v in result.eval_losses.items()},
        "eval_loss_quantized_base": eval_base, "eval_loss_adapter": eval_adapter, "eval_loss_merged": eval_merged,
        "merge_max_abs_logit_diff": diff, "tokens_per_s": result.tokens_per_s, "dtype": str(torch_dtype),
        "device": device.type, "config": {"quant": quant.to_dict(), "adapter": adapter.to_dict(),
                                          "train": train_cfg.to_dict()},
    }
    merged_cfg = {"method": quant.method, "adapter_method": adapter.method, "base": base,
                  "merge_max_abs_logit_diff": diff}
    save_quantized(merged, tokenizer, out / "merged", extra_config=merged_cfg)
    save_adapter(model, out / "adapter", base=base, quant=quant, adapter=adapter)

    stage("evaluate")
    report["peak_rss_mb"] = peak_rss_mb()
    report["wall_s"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=2))
    stage("done")
    return report
