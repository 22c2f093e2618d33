"""One fine-tune from base to verified low-bit model: load, quantize, train, merge, verify, save.

The CLI and the job worker both call :func:`finetune`; it knows nothing of either.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qalora import memory
from qalora.atomic import atomic_path, write_text
from qalora.config import AdapterConfig, QuantConfig, TrainConfig, method_label
from qalora.data import records as data_mod
from qalora.data.records import data_identity
from qalora.deployment.export.adapter import save_adapter
from qalora.deployment.export.native import save_quantized
from qalora.evaluation.heldout import batches, count_batches, eval_loss
from qalora.method.merge import merge_adapters, use_kernels
from qalora.method.quant import QuantizedTensor
from qalora.method.quantlinear import set_compute_dtype
from qalora.models.model import (BaseSource, base_identity, count_adapter_params, count_model_params, inject_qalora,
                                 load_quantized_base, merge_and_requantize, open_base, pick_device, resolve_dtype)
from qalora.training import distributed
from qalora.training.loop import (TrainResult, check_fingerprint, latest_checkpoint, read_fingerprint, start_afresh,
                                  train)

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
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"key": json.dumps(key), "layers": json.dumps(shapes)})


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
                    resume: bool, device, dtype, log, key: dict, on_progress=None):
    """Stream-load and quantize the base, reusing the codes a previous attempt cached (GPTQ is slow)
    where they were made for the same ``key`` (:func:`base_cache_key`). Returns ``(model, quantized
    weights, whether they came from the cache)``; writing the cache is the caller's."""
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
    return model, qweights, bool(cached)


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


@dataclass
class _Run:
    """One fine-tune: its settings, this rank's place, and what each stage hands to the next.

    :func:`_start` fills the first block; the recipe's steps fill the rest, in order."""
    base: str
    data: str
    out: Path
    quant: QuantConfig
    adapter: AdapterConfig
    train_cfg: TrainConfig
    resume: bool
    columns: dict | None
    max_samples: int | None
    on_step: Callable | None
    should_stop: Callable[[], bool] | None
    owns: Callable[[], bool] | None
    report_stage: Callable[[str], None]
    progress: Callable[[str, int, int], None]
    log: logging.Logger
    w: distributed.World
    device: torch.device
    dtype: torch.dtype
    t_start: float
    selection: dict
    fingerprint: dict | None = None          # load
    src: BaseSource | None = None            # data
    train_examples: list[dict] = field(default_factory=list)
    eval_examples: list[dict] = field(default_factory=list)
    model: torch.nn.Module | None = None     # quantize
    base_key: dict | None = None
    qweights: dict[str, QuantizedTensor] | None = None
    cached: bool = False
    eval_base: float | None = None
    resumed: bool = False                    # train
    result: TrainResult | None = None
    eval_adapter: float | None = None
    adapter_params: int = 0
    model_params: int = 0
    check: list[dict] = field(default_factory=list)  # merge
    reference: list[torch.Tensor] | None = None
    diff: float = 0.0                        # verify
    eval_merged: float | None = None
    merged_path: str = ""
    report: dict | None = None               # save

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def pad_id(self) -> int:
        return self.src.tokenizer.pad_token_id

    @property
    def ev(self) -> dict:
        """:func:`qalora.evaluation.heldout.eval_loss`'s settings for this run."""
        return dict(batch_size=self.train_cfg.batch_size, pad_id=self.pad_id, max_batches=self.train_cfg.eval_batches)


# Which rank does what under torchrun, decided here and nowhere else: every rank loads, quantizes and
# trains its share (ALL_RANK_STAGES), a step marked RANK_0 in the recipe runs on rank 0 alone, and
# after training rank 0 is alone (the others leave the process group and return None).
EVERY_RANK, RANK_0 = "every rank", "rank 0"


def _runs_here(w: distributed.World, who: str) -> bool:
    """Whether this process runs a step meant for ``who`` (:data:`EVERY_RANK` or :data:`RANK_0`)."""
    return who == EVERY_RANK or w.main


def _enter(run: _Run, name: str) -> bool:
    """Enter stage ``name``: reported, then asked whether to stop. Up to training every rank is here
    and follows rank 0's answer (a stop asked for in any stage ends every rank at the next boundary,
    none left waiting in a collective). False on a rank with no part in the stage: it has left."""
    if name not in ALL_RANK_STAGES and not _runs_here(run.w, RANK_0):
        distributed.finish()
        return False
    run.report_stage(name)
    wanted = bool(run.should_stop and _runs_here(run.w, RANK_0) and run.should_stop())
    if (distributed.decide(wanted, run.device) if name in ALL_RANK_STAGES else wanted):
        distributed.finish()
        raise TrainingStopped(f"stopped before stage {name!r}")
    return True


def _start(base: str, data: str, out_dir, quant: QuantConfig, adapter: AdapterConfig, train_cfg: TrainConfig,
           resume: bool, columns: dict | None, max_samples: int | None, on_step, should_stop, on_stage,
           on_progress, log, owns) -> _Run:
    """Setup: the output folder, this run's memory peak, the device and dtype, this rank's place and
    the callbacks it reports through (the other ranks train and leave the rest to rank 0: they
    report nothing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    memory.reset_peak()  # this run's peak, not the worker process's lifetime maximum
    device = pick_device()
    w = distributed.init(device)  # under torchrun: this rank's place and device; else a world of one
    device = distributed.device_for(device, w)
    dtype = resolve_dtype(train_cfg.dtype, device)
    reports = _runs_here(w, RANK_0)
    return _Run(base=base, data=data, out=out, quant=quant, adapter=adapter, train_cfg=train_cfg, resume=resume,
                columns=columns, max_samples=max_samples, on_step=on_step, should_stop=should_stop, owns=owns,
                report_stage=on_stage if reports and on_stage else (lambda name: None),
                progress=on_progress if reports and on_progress else (lambda name, done, total: None),
                log=(log or logging.getLogger("qalora")) if reports else logging.getLogger("qalora.rank"),
                w=w, device=device, dtype=dtype, t_start=t_start, selection=data_selection(columns, max_samples))


def _check_resume(run: _Run) -> None:
    """The run's fingerprint; a stale or foreign checkpoint folder is refused now, not after loading
    and quantizing the base."""
    run.fingerprint = run_fingerprint(run.base, run.data, run.quant, run.adapter, run.train_cfg, run.selection)
    if run.resume and (last := latest_checkpoint(run.ckpt_dir)):
        check_fingerprint(read_fingerprint(last), run.fingerprint, last)


def _clear_checkpoints(run: _Run) -> None:
    """A run that does not resume: this run's old checkpoints go; another's are refused."""
    if not run.resume:
        start_afresh(run.ckpt_dir, run.fingerprint)


def _setup_data(run: _Run) -> None:
    """The records (downloaded where they are a Hub dataset: a bad file fails in seconds), the base's
    config and tokenizer, then the train/eval split tokenized."""
    cfg, files = run.train_cfg, [0]  # a Hub dataset's data files, counted as they download; then 2 tokenizations

    def downloaded(done: int, total: int) -> None:
        files[0] = total
        run.progress("data", done, total + 2)
    records = data_mod.load_records(run.data, columns=run.columns, max_samples=run.max_samples, seed=cfg.seed,
                                    on_progress=downloaded)
    run.log.info("opening base %s (a Hub id is downloaded once, then read from the Hugging Face cache)", run.base)
    run.src = open_base(run.base)  # config and tokenizer only; the weights stream in at "quantize"
    run.log.info("base %s: %s at %s", run.base, run.src.kind, run.src.path or "(built in memory)")
    train_records, eval_records = data_mod.split_records(records, cfg.eval_fraction, cfg.seed)
    run.progress("data", files[0], files[0] + 2)
    run.train_examples = data_mod.tokenize_records(train_records, run.src.tokenizer, cfg.seq_len)
    run.progress("data", files[0] + 1, files[0] + 2)
    run.eval_examples = data_mod.tokenize_records(eval_records, run.src.tokenizer, cfg.seq_len)
    run.progress("data", files[0] + 2, files[0] + 2)
    run.log.info("data: %d train / %d eval examples", len(run.train_examples), len(run.eval_examples))


def _quantize(run: _Run) -> None:
    """The base, stream-loaded and quantized (or its codes reused from a previous attempt's cache)."""
    run.base_key = base_cache_key(run.src, run.quant, run.data, run.train_cfg, run.selection)
    run.model, run.qweights, run.cached = _quantized_base(
        run.src, run.quant, run.adapter, run.train_examples, run.out, run.resume, run.device, run.dtype, run.log,
        run.base_key, lambda done, total: run.progress("quantize", done, total))


def _cache_base(run: _Run) -> None:
    """Keep freshly made codes for a resume (GPTQ is slow); the run deletes them when it succeeds."""
    if not run.cached:
        save_base_cache(run.out / BASE_CACHE, run.base_key, run.qweights)


def _add_adapters(run: _Run) -> None:
    """The QA-LoRA adapters on the quantized layers (the base's codes now live in the model)."""
    # The adapter's initial values come from the global RNG: seed it so the job's seed decides them.
    torch.manual_seed(run.train_cfg.seed)
    inject_qalora(run.model, run.qweights, run.adapter)
    run.qweights = None


def _eval_base(run: _Run) -> None:
    run.eval_base = eval_loss(run.model, run.eval_examples, **run.ev)
    run.log.info("quantized base: eval loss %.4f", run.eval_base)


def _train(run: _Run) -> None:
    """Train (resuming from the newest checkpoint when asked); a stop leaves a checkpoint and raises."""
    run.resumed = run.resume and latest_checkpoint(run.ckpt_dir) is not None
    run.result = train(run.model, run.train_examples, run.eval_examples, run.train_cfg, run.pad_id,
                       ckpt_dir=run.ckpt_dir, resume=run.resume, on_step=run.on_step, should_stop=run.should_stop,
                       log=run.log, fingerprint=run.fingerprint, owns=run.owns, scales_lr=run.adapter.scales_lr)
    if run.result.stopped:
        distributed.finish()
        raise TrainingStopped(f"stopped after step {run.result.step}")


def _save_adapter(run: _Run) -> None:
    """The adapter model's eval loss and size, and the adapter written on its own."""
    # The training loop evaluated the adapter model at its last step: that is its eval loss.
    run.eval_adapter = run.result.eval_losses.get(run.result.step)
    if run.eval_adapter is None:
        run.eval_adapter = eval_loss(run.model, run.eval_examples, **run.ev)
    run.adapter_params = count_adapter_params(run.model)
    run.model_params = count_model_params(run.model)
    with atomic_path(run.out / "adapter") as tmp:
        save_adapter(run.model, tmp, base=run.base, quant=run.quant, adapter=run.adapter)


def _merge(run: _Run) -> None:
    """Keep the adapter model's logits on the check tokens, then merge in place (no copy of the model)."""
    run.check = check_batches(run.eval_examples, run.train_cfg.batch_size, run.pad_id, run.device)
    # The exactness check computes in fp32 whatever the run's dtype: in bf16 the adapter model and
    # the merged model round their different sums differently (max |logit diff| ~0.03-0.07 measured
    # on an H200 for a 135M model), which measures bf16, not the merge. Embeddings and norms go to
    # fp32 for the check only (scales and offsets are fp32 already), then back.
    if run.dtype != torch.float32:
        set_compute_dtype(run.model, torch.float32)
    run.reference = _masked_logits(run.model, run.check)
    merge_progress = lambda done, total: run.progress("merge", done, total)  # noqa: E731
    if run.adapter.method == "qlora-ptq":
        calib = calibration_ids(run.train_examples) if run.quant.method == "gptq" else None
        merge_and_requantize(run.model, run.quant, calib, use_kernel=False, on_progress=merge_progress)
    else:
        merge_adapters(run.model, use_kernel=False, on_progress=merge_progress)


def _verify(run: _Run) -> None:
    """The merge's exactness on the check tokens, then the merged model's eval loss.

    The exactness check runs on the dequantize reference (it measures the merge, not a kernel's
    rounding); the merged model's eval loss then runs on the fast path it is deployed on."""
    cfg, merged, n_check = run.train_cfg, run.model, len(run.check)
    total = n_check + count_batches(len(run.eval_examples), cfg.batch_size, cfg.eval_batches)
    for i, (ref, got) in enumerate(zip(run.reference, _masked_logits(merged, run.check)), 1):
        run.diff = max(run.diff, (ref - got).abs().max().item())
        run.progress("verify", i, total)
    run.reference = None
    if run.dtype != torch.float32:
        set_compute_dtype(merged, run.dtype)
    run.merged_path = use_kernels(merged, True)
    run.eval_merged = eval_loss(merged, run.eval_examples, **run.ev,
                                on_progress=lambda done, n: run.progress("verify", n_check + done, total))
    use_kernels(merged, False)
    run.log.info("merge check: max |logit diff| %.3g, eval loss adapter %.4f merged %.4f (%s path)", run.diff,
                 run.eval_adapter, run.eval_merged, run.merged_path)


def _report(run: _Run) -> dict:
    """The run's report, less what is measured after the save (peak memory, wall time)."""
    quant, adapter, cfg, result = run.quant, run.adapter, run.train_cfg, run.result
    return {
        "base": run.base, "data": run.data, **run.selection, "bits": quant.bits, "group_size": quant.group_size,
        "quant_method": quant.method, "clip": quant.clip, "method": adapter.method,
        "method_name": method_label(quant, adapter), "train_scales": adapter.train_scales,
        "rank": adapter.rank, "alpha": adapter.alpha,
        "steps": result.step, "world_size": run.w.size,
        "global_batch": cfg.batch_size * cfg.grad_accum * run.w.size,
        "resumed_from_step": result.resumed_from if run.resumed else 0,
        "adapter_params": run.adapter_params, "model_params": run.model_params,
        "train_examples": len(run.train_examples), "eval_examples": len(run.eval_examples),
        "train_loss_first": result.losses[0] if result.losses else None,
        "train_loss_last": result.losses[-1] if result.losses else None,
        "train_losses": result.losses, "eval_losses": {str(k): v for k, v in result.eval_losses.items()},
        "eval_loss_quantized_base": run.eval_base, "eval_loss_adapter": run.eval_adapter,
        "eval_loss_merged": run.eval_merged, "eval_merged_path": run.merged_path,
        "merge_max_abs_logit_diff": run.diff, "tokens_per_s": result.tokens_per_s,
        "train_s": result.seconds, "dtype": str(run.dtype),
        "merge_check_dtype": "torch.float32",
        "device": run.device.type, "config": {"quant": quant.to_dict(), "adapter": adapter.to_dict(),
                                              "train": cfg.to_dict()},
    }


def _save(run: _Run) -> None:
    """The merged model, then the report; the quantized-base cache goes (it only served resumes)."""
    run.report = report = _report(run)
    merged_cfg = {"method": run.quant.method, "adapter_method": run.adapter.method, "base": run.base,
                  "merge_max_abs_logit_diff": run.diff}
    run.progress("save", 0, 1)
    with atomic_path(run.out / "merged") as tmp:  # a failed save leaves no half model under merged/
        save_quantized(run.model, run.src.tokenizer, tmp, extra_config=merged_cfg)
    run.progress("save", 1, 1)
    report["peak_rss_mb"] = memory.peak_rss_mb()
    report["peak_gpu_mb"] = memory.peak_gpu_mb()
    report["wall_s"] = time.perf_counter() - run.t_start
    write_text(run.out / "report.json", json.dumps(report, indent=2))
    # The run succeeded: the quantized-base cache only served resumes, and it is as big as the model.
    (run.out / BASE_CACHE).unlink(missing_ok=True)


# The recipe: each stage's steps in order, and which ranks run each (see _runs_here).
Step = Callable[[_Run], None]
RECIPE: tuple[tuple[str, tuple[tuple[Step, str], ...]], ...] = (
    ("load", ((_check_resume, EVERY_RANK), (_clear_checkpoints, RANK_0))),
    ("data", ((_setup_data, EVERY_RANK),)),
    ("quantize", ((_quantize, EVERY_RANK), (_cache_base, RANK_0), (_add_adapters, EVERY_RANK),
                  (_eval_base, RANK_0))),
    ("train", ((_train, EVERY_RANK), (_save_adapter, RANK_0))),
    ("merge", ((_merge, RANK_0),)),
    ("verify", ((_verify, RANK_0),)),
    ("save", ((_save, RANK_0),)),
)


def finetune(base: str, data: str, out_dir, quant: QuantConfig, adapter: AdapterConfig, train_cfg: TrainConfig, *,
             resume: bool = True, on_step=None, should_stop=None, on_stage=None, on_progress=None, log=None,
             owns=None, columns: dict | None = None, max_samples: int | None = None) -> dict | None:
    """Run the whole pipeline (:data:`RECIPE`); returns the report (also written to ``out_dir/report.json``).

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
    run = _start(base, data, out_dir, quant, adapter, train_cfg, resume, columns, max_samples, on_step,
                 should_stop, on_stage, on_progress, log, owns)
    for stage, steps in RECIPE:
        if not _enter(run, stage):
            return None
        for step, who in steps:
            if _runs_here(run.w, who):
                step(run)
    distributed.finish()
    run.report_stage("done")
    return run.report
