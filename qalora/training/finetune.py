"""One fine-tune from base to verified low-bit model: load, quantize, train, merge, verify, save.

The CLI and the job worker both call :func:`finetune`; it knows nothing of either.
"""
from __future__ import annotations

import json
import os
import logging
import time
from pathlib import Path

import torch

from qalora.data import records as data_mod
from qalora.data.records import data_identity
from qalora.training import distributed
from qalora import memory
from qalora.config import AdapterConfig, QuantConfig, TrainConfig, method_label
from qalora.evaluation.heldout import batches, count_batches, eval_loss
from qalora.method.quantlinear import set_compute_dtype
from qalora.method.merge import merge_adapters, use_kernels
from qalora.models.model import (BaseSource, base_identity, merge_and_requantize, count_adapter_params, count_model_params, inject_qalora,
                                 load_quantized_base, open_base, pick_device, resolve_dtype)
from qalora.method.quant import QuantizedTensor
from qalora.training.loop import check_fingerprint, latest_checkpoint, read_fingerprint, start_afresh, train

STAGES = ("load", "data", "quantize", "train", "merge", "verify", "save", "done")
ALL_RANK_STAGES = ("load", "data", "quantize", "train")  # under torchrun every rank passes these
BASE_CACHE = "quantized_base.safetensors"
# The merge check compares logits on at most this many eval batches and real tokens: the adapter
# model's logits are kept while the model is merged in place, so the budget bounds that memory.
MERGE_CHECK_BATCHES = 4
MERGE_CHECK_TOKENS = 1024


class TrainingStopped(Exception):
    """``should_stop()`` returned true; a checkpoint was written and the run can be resumed."""


def calibration_ids(examples, n: int = 32) -> list[torch.Tensor]:
    """GPTQ calibration samples: the first ``n`` training examples, ``(1, T)`` each."""
    return [torch.tensor(ex["input_ids"]).unsqueeze(0) for ex in examples[:n]]


def base_cache_key(src: BaseSource, quant: QuantConfig, data: str, train_cfg: TrainConfig,
                   selection: dict | None = None) -> dict:
    """What the quantized base depends on: the base's files and the quantization settings, and for
    GPTQ the calibration examples too (the first training examples of the seeded split of the
    records ``selection`` picks: :func:`data_selection`)."""
    key = {"quant": quant.to_dict(), "base": base_identity(src)}
    if quant.method == "gptq":
        key["calibration"] = {"data": data_identity(data), "seed": train_cfg.seed, "seq_len": train_cfg.seq_len,
                              "eval_fraction": train_cfg.eval_fraction, **(selection or {})}
    return key


def data_selection(columns: dict | None, max_samples: int | None) -> dict:
    """The column mapping and sample size that pick a run's records, where set (a run with neither
    keeps the fingerprint it always had)."""
    return {**({"columns": dict(columns)} if columns else {}),
            **({"max_samples": max_samples} if max_samples is not None else {})}


def save_base_cache(path: Path, key: dict, qweights: dict[str, QuantizedTensor]) -> None:
    """The quantized weights as safetensors (data, not a pickle), written atomically, with the
    :func:`base_cache_key` they were made for."""

    from safetensors.torch import save_file

    tensors, shapes = {}, {}
    for name, qt in qweights.items():
        for part in ("packed", "scale", "offset"):
            tensors[f"{name}.{part}"] = getattr(qt, part).detach().contiguous().cpu()
        shapes[name] = [qt.bits, qt.group_size, qt.in_features]
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"key": json.dumps(key), "layers": json.dumps(shapes)})
    os.replace(tmp, path)


def load_base_cache(path: Path, key: dict) -> dict[str, QuantizedTensor] | None:
    """The cache written by :func:`save_base_cache`, or None if absent or made for another key
    (another base, other quantization settings, other calibration data)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if json.loads(meta.get("key", "null")) != key:
            return None
        return {name: QuantizedTensor(f.get_tensor(f"{name}.packed"), f.get_tensor(f"{name}.scale"),
                                      f.get_tensor(f"{name}.offset"), bits, gs, in_f)
                for name, (bits, gs, in_f) in json.loads(meta["layers"]).items()}


def _quantized_base(src: BaseSource, quant: QuantConfig, adapter: AdapterConfig, train_examples, out: Path,
                    resume: bool, device, dtype, log, key: dict, on_progress=None, write_cache: bool = True):
    """Stream-load and quantize the base, reusing the codes a previous attempt cached (GPTQ is slow)
    where they were made for the same ``key`` (:func:`base_cache_key`)."""
    cache = out / BASE_CACHE
    cached = load_base_cache(cache, key) if resume else None
    if cached:
        log.info("reusing quantized base from %s", cache.name)
    elif resume and cache.is_file():
        log.info("%s was made for another base, settings or calibration data: quantizing again", cache.name)
    calib = calibration_ids(train_examples) if quant.method == "gptq" and not cached else None
    from tqdm.auto import tqdm
    with tqdm(desc=f"load + quantize ({quant.method}, {quant.bits}-bit)", unit="layer", leave=False,
              disable=None) as bar:
        def progress(i, n):
            bar.total = n
            bar.n = i
            bar.refresh()
            if on_progress:
                on_progress(i, n)
        model, qweights = load_quantized_base(src, quant, adapter.targets, device, dtype, calib_ids=calib,
                                              cached=cached, on_progress=progress)
    if not cached and write_cache:
        save_base_cache(cache, key, qweights)
    return model, qweights


# Settings that do not change what is trained: a resume may change them freely.
_FREE_SETTINGS = ("eval_every", "eval_batches", "save_every")


def run_fingerprint(base: str, data: str, quant: QuantConfig, adapter: AdapterConfig, train_cfg: TrainConfig,
                    selection: dict | None = None) -> dict:
    """What a checkpoint must match to be resumed: base, data contents, the records picked from them
    (:func:`data_selection`) and the training settings."""
    train = {k: v for k, v in train_cfg.to_dict().items() if k not in _FREE_SETTINGS}
    return {"base": base, "data": data_identity(data), **({"data_selection": selection} if selection else {}),
            "quant": quant.to_dict(), "adapter": {**adapter.to_dict(), "targets": list(adapter.targets)},
            "train": train}


def check_batches(examples, batch_size: int, pad_id: int, device, budget: int = MERGE_CHECK_TOKENS) -> list[dict]:
    """Eval batches for the merge check (at most ``MERGE_CHECK_BATCHES``, ``budget`` real tokens)."""
    out, tokens = [], 0
    for batch in batches(examples, batch_size, pad_id, MERGE_CHECK_BATCHES):
        out.append({k: v.to(device) for k, v in batch.items()})
        tokens += int(batch["attention_mask"].sum())
        if tokens >= budget:
            break
    return out


@torch.no_grad()
def _masked_logits(model, check: list[dict]) -> list[torch.Tensor]:
    return [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            [b["attention_mask"].bool()] for b in check]


def finetune(base: str, data: str, out_dir, quant: QuantConfig, adapter: AdapterConfig, train_cfg: TrainConfig, *,
             resume: bool = True, on_step=None, should_stop=None, on_stage=None, on_progress=None, log=None,
             owns=None, columns: dict | None = None, max_samples: int | None = None) -> dict:
    """Run the whole pipeline; returns the report (also written to ``out_dir/report.json``).

    Under ``torchrun`` every rank trains its share of each batch (``qalora.training.distributed``); rank 0
    alone evaluates, writes checkpoints, merges, verifies and saves, and the others return ``None``.

    Writes ``out_dir/merged`` (native low-bit model), ``out_dir/adapter`` and checkpoints under
    ``out_dir/checkpoints``. Raises :class:`TrainingStopped` when ``should_stop()`` fires: at a
    stage boundary, or after a training step.
    ``columns`` maps the data's columns to a record format and ``max_samples`` trains on a sample of
    that many records drawn with the run's seed (:func:`qalora.data.records.load_records`).
    ``on_progress(stage, done, total)`` reports progress inside a stage: a Hub dataset's files
    downloaded, then records tokenized ("data"),
    decoder layers loaded and quantized, then eval batches ("quantize"), layers merged ("merge"),
    check and eval batches ("verify"), the model written ("save"). ``owns()``: see
    :func:`qalora.training.loop.train`.
    """
    from qalora.deployment.export.adapter import save_adapter
    from qalora.deployment.export.atomic import atomic_path
    from qalora.deployment.export.native import save_quantized

    log = log or logging.getLogger("qalora")
    stage = on_stage or (lambda name: None)
    progress = on_progress or (lambda name, done, total: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    memory.reset_peak()  # this run's peak, not the worker process's lifetime maximum
    device = pick_device()
    w = distributed.init(device)  # under torchrun: this rank's place and device; else a world of one
    device = distributed.device_for(device, w)
    torch_dtype = resolve_dtype(train_cfg.dtype, device)
    if not w.main:  # the other ranks train and leave the rest to rank 0; they report nothing
        stage = lambda name: None  # noqa: E731
        progress = lambda name, done, total: None  # noqa: E731
        log = logging.getLogger("qalora.rank")
    report_stage = stage

    def stage(name: str) -> None:
        """Enter stage ``name``: reported, then asked whether to stop. Up to training every rank
        is here and follows rank 0's answer (a stop asked for in any stage ends every rank at the
        next boundary, none left waiting in a collective); after it rank 0 is alone."""
        report_stage(name)
        wanted = bool(should_stop and w.main and should_stop())
        if (distributed.decide(wanted, device) if name in ALL_RANK_STAGES else wanted):
            distributed.finish()
            raise TrainingStopped(f"stopped before stage {name!r}")

    stage("load")
    selection = data_selection(columns, max_samples)
    fingerprint = run_fingerprint(base, data, quant, adapter, train_cfg, selection)
    if resume and (last := latest_checkpoint(out / "checkpoints")):
        # Refuse a stale or foreign folder now, not after loading and quantizing the base.
        check_fingerprint(read_fingerprint(last), fingerprint, last)
    elif not resume and w.main:
        start_afresh(out / "checkpoints", fingerprint)  # this run's old checkpoints go; another's are refused
    stage("data")
    files = [0]  # a Hub dataset's data files, counted as they download; then the two tokenizations

    def downloaded(done: int, total: int) -> None:
        files[0] = total
        progress("data", done, total + 2)
    # the data first (downloaded where it is a Hub dataset): a bad file fails in seconds
    records = data_mod.load_records(data, columns=columns, max_samples=max_samples, seed=train_cfg.seed,
                                    on_progress=downloaded)
    log.info("opening base %s (a Hub id is downloaded once, then read from the Hugging Face cache)", base)
    src = open_base(base)  # config and tokenizer only; the weights stream in at "quantize"
    log.info("base %s: %s at %s", base, src.kind, src.path or "(built in memory)")
    tokenizer = src.tokenizer
    train_records, eval_records = data_mod.split_records(records, train_cfg.eval_fraction, train_cfg.seed)
    progress("data", files[0], files[0] + 2)
    train_examples = data_mod.tokenize_records(train_records, tokenizer, train_cfg.seq_len)
    progress("data", files[0] + 1, files[0] + 2)
    eval_examples = data_mod.tokenize_records(eval_records, tokenizer, train_cfg.seq_len)
    progress("data", files[0] + 2, files[0] + 2)
    log.info("data: %d train / %d eval examples", len(train_examples), len(eval_examples))

    stage("quantize")
    model, qweights = _quantized_base(src, quant, adapter, train_examples, out, resume, device, torch_dtype, log,
                                      base_cache_key(src, quant, data, train_cfg, selection),
                                      lambda done, total: progress("quantize", done, total), write_cache=w.main)
    # The adapter's initial values come from the global RNG: seed it so the job's seed decides them.
    torch.manual_seed(train_cfg.seed)
    inject_qalora(model, qweights, adapter)
    del qweights
    pad_id = tokenizer.pad_token_id
    ev = dict(batch_size=train_cfg.batch_size, pad_id=pad_id, max_batches=train_cfg.eval_batches)
    eval_base = eval_loss(model, eval_examples, **ev) if w.main else None
    if w.main:
        log.info("quantized base: eval loss %.4f", eval_base)

    stage("train")
    resumed = resume and latest_checkpoint(out / "checkpoints") is not None
    result = train(model, train_examples, eval_examples, train_cfg, pad_id, ckpt_dir=out / "checkpoints",
                   resume=resume, on_step=on_step, should_stop=should_stop, log=log,
                   fingerprint=fingerprint, owns=owns, scales_lr=adapter.scales_lr)
    if result.stopped:
        distributed.finish()
        raise TrainingStopped(f"stopped after step {result.step}")
    if not w.main:
        distributed.finish()
        return None
    # The training loop evaluated the adapter model at its last step: that is its eval loss.
    eval_adapter = result.eval_losses.get(result.step)
    if eval_adapter is None:
        eval_adapter = eval_loss(model, eval_examples, **ev)
    adapter_params = count_adapter_params(model)
    model_params = count_model_params(model)
    with atomic_path(out / "adapter") as tmp:
        save_adapter(model, tmp, base=base, quant=quant, adapter=adapter)

    stage("merge")
    # No copy of the model: keep the adapter model's logits on the check tokens, merge in place,
    # then compare.
    check = check_batches(eval_examples, train_cfg.batch_size, pad_id, device)
    # The exactness check computes in fp32 whatever the run's dtype: in bf16 the adapter model and
    # the merged model round their different sums differently (max |logit diff| ~0.03-0.07 measured
    # on an H200 for a 135M model), which measures bf16, not the merge. Embeddings and norms go to
    # fp32 for the check only (scales and offsets are fp32 already), then back.
    if torch_dtype != torch.float32:
        set_compute_dtype(model, torch.float32)
    reference = _masked_logits(model, check)
    merge_progress = lambda done, total: progress("merge", done, total)  # noqa: E731
    if adapter.method == "qlora-ptq":
        calib = calibration_ids(train_examples) if quant.method == "gptq" else None
        merge_and_requantize(model, quant, calib, use_kernel=False, on_progress=merge_progress)
    else:
        merge_adapters(model, use_kernel=False, on_progress=merge_progress)
    merged = model
    stage("verify")
    # The exactness check runs on the dequantize reference (it measures the merge, not a kernel's
    # rounding); the merged model's eval loss then runs on the fast path it is deployed on.
    n_eval = count_batches(len(eval_examples), train_cfg.batch_size, train_cfg.eval_batches)
    total = len(check) + n_eval
    diff = 0.0
    for i, (ref, got) in enumerate(zip(reference, _masked_logits(merged, check)), 1):
        diff = max(diff, (ref - got).abs().max().item())
        progress("verify", i, total)
    del reference
    if torch_dtype != torch.float32:
        set_compute_dtype(merged, torch_dtype)
    merged_path = use_kernels(merged, True)
    eval_merged = eval_loss(merged, eval_examples, **ev,
                            on_progress=lambda done, n: progress("verify", len(check) + done, total))
    use_kernels(merged, False)
    log.info("merge check: max |logit diff| %.3g, eval loss adapter %.4f merged %.4f (%s path)", diff,
             eval_adapter, eval_merged, merged_path)

    stage("save")
    report = {
        "base": base, "data": data, **selection, "bits": quant.bits, "group_size": quant.group_size,
        "quant_method": quant.method, "clip": quant.clip, "method": adapter.method,
        "method_name": method_label(quant, adapter), "train_scales": adapter.train_scales,
        "rank": adapter.rank, "alpha": adapter.alpha,
        "steps": result.step, "world_size": w.size,
        "global_batch": train_cfg.batch_size * train_cfg.grad_accum * w.size,
        "resumed_from_step": result.resumed_from if resumed else 0,
        "adapter_params": adapter_params, "model_params": model_params,
        "train_examples": len(train_examples), "eval_examples": len(eval_examples),
        "train_loss_first": result.losses[0] if result.losses else None,
        "train_loss_last": result.losses[-1] if result.losses else None,
        "train_losses": result.losses, "eval_losses": {str(k): v for k, v in result.eval_losses.items()},
        "eval_loss_quantized_base": eval_base, "eval_loss_adapter": eval_adapter, "eval_loss_merged": eval_merged,
        "eval_merged_path": merged_path,
        "merge_max_abs_logit_diff": diff, "tokens_per_s": result.tokens_per_s,
        "train_s": result.seconds, "dtype": str(torch_dtype),
        "merge_check_dtype": "torch.float32",
        "device": device.type, "config": {"quant": quant.to_dict(), "adapter": adapter.to_dict(),
                                          "train": train_cfg.to_dict()},
    }
    merged_cfg = {"method": quant.method, "adapter_method": adapter.method, "base": base,
                  "merge_max_abs_logit_diff": diff}
    progress("save", 0, 1)
    with atomic_path(out / "merged") as tmp:  # a failed save leaves no half model under merged/
        save_quantized(merged, tokenizer, tmp, extra_config=merged_cfg)
    progress("save", 1, 1)

    report["peak_rss_mb"] = memory.peak_rss_mb()
    report["peak_gpu_mb"] = memory.peak_gpu_mb()
    report["wall_s"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=2))
    # The run succeeded: the quantized-base cache only served resumes, and it is as big as the model.
    (out / BASE_CACHE).unlink(missing_ok=True)
    distributed.finish()
    report_stage("done")
    return report
