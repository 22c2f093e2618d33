"""Benchmarks through lm-evaluation-harness (the ``lm-eval`` package), the field's standard.

The paper (Xu et al. 2023, Table 1) reports MMLU 0- and 5-shot and seven commonsense QA tasks
(HellaSwag, PIQA, WinoGrande, ARC-easy, ARC-challenge, BoolQ, OpenBookQA). Any lm-eval task or
group name works, and so do tasks written as lm-eval YAML files under an ``include_path`` (its own
mechanism; the tests use that with small local data files).

The model is handed to lm-eval as the loaded model (its ``HFLM`` accepts an instance), so a
finished job is evaluated exactly as it deploys: the merged low-bit model of ``load_quantized``,
its int4 kernel where one applies. A transformers folder or a Hub id is loaded as a float model,
the way lm-eval's own ``hf`` backend loads it.

lm-eval is imported lazily (it pulls in scikit-learn and friends): importing this module is cheap.
"""
from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from qalora.atomic import write_text
from qalora.errors import ConfigError

# The paper's two settings, as the app and the CLI offer them.
PRESETS = {
    "mmlu-5shot": {"label": "MMLU 5-shot (the paper's)", "tasks": ["mmlu"], "num_fewshot": 5},
    "mmlu-0shot": {"label": "MMLU 0-shot (the paper's)", "tasks": ["mmlu"], "num_fewshot": 0},
    "commonsense": {"label": "commonsense QA, 7 tasks (the paper's)",
                    "tasks": ["hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa"],
                    "num_fewshot": 0},
}
# The metric reported per task: length-normalized accuracy where lm-eval computes it (the usual
# figure for HellaSwag, ARC-challenge, OpenBookQA, PIQA), else accuracy, else the first one.
PREFERRED_METRICS = ("acc_norm", "acc", "exact_match", "perplexity")


INCLUDE_ENV = "QALORA_LM_EVAL_INCLUDE"  # a folder of a team's own task YAMLs, for the app's jobs


def task_manager(include_path: str | Path | None = None):
    """lm-eval's task index (its registered tasks, plus the YAML files under ``include_path``, by
    default the folder ``QALORA_LM_EVAL_INCLUDE`` names); built once per folder in a process
    (indexing takes seconds)."""
    import os

    include_path = include_path or os.environ.get(INCLUDE_ENV) or None
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path} is not a folder; give the folder that holds your lm-eval "
                          "task YAML files.")
    return _task_manager(str(Path(include_path).resolve()) if include_path else None)


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_tasks(tasks: Sequence[str], include_path: str | Path | None = None, manager=None) -> list[str]:
    """``tasks`` as lm-eval names them (stripped, deduplicated), or a ``ConfigError`` naming those it
    does not know. Resolving names reads lm-eval's registry only: nothing is downloaded."""
    names = list(dict.fromkeys(t.strip() for t in tasks if t and t.strip()))
    if not names:
        raise ConfigError("no benchmark task given; name lm-eval tasks or groups, e.g. --tasks mmlu or "
                          "--tasks hellaswag,arc_easy.")
    manager = manager or task_manager(include_path)
    known = set(manager.all_tasks)
    unknown = [t for t in names if t not in known]
    if unknown:
        close = [m for u in unknown for m in difflib.get_close_matches(u, known, n=3, cutoff=0.75)]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"lm-eval knows no task or group named {', '.join(map(repr, unknown))}; see `lm-eval "
                          f"--tasks list`, or give --include-path with your task YAML files.{hint}")
    return names


def _lm_class():
    from lm_eval.models.huggingface import HFLM

    class ProgressLM(HFLM):
        """lm-eval's HF backend on an already loaded model, reporting requests done as it goes.

        Progress is counted from the rows of each model call, so lm-eval still sees every request
        at once: it sorts them by length and shares a context's forward among its choices (handing
        them over in chunks instead made the run twice as slow)."""

        on_progress: Callable[[int, int], None] | None = None
        _done = _total = 0

        def _counted(self, method, requests, **kwargs):
            self._done, self._total = 0, len(requests)
            out = method(requests, **kwargs)
            self._report(self._total)
            return out

        def _report(self, done: int) -> None:
            self._done = min(done, self._total)
            if self.on_progress is not None and self._total:
                self.on_progress(self._done, self._total)

        def _model_call(self, inps, *args, **kwargs):
            out = super()._model_call(inps, *args, **kwargs)
            self._report(self._done + int(inps.shape[0]))
            return out

        def _model_generate(self, context, *args, **kwargs):
            out = super()._model_generate(context, *args, **kwargs)
            self._report(self._done + int(context.shape[0]))
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._counted(super().loglikelihood, requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._counted(super().loglikelihood_rolling, requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self._counted(super().generate_until, requests, disable_tqdm=True)

    return ProgressLM


def wrap(model, tokenizer, batch_size: int = 8, on_progress: Callable[[int, int], None] | None = None):
    """The loaded ``model`` as an lm-eval model (its HF backend, given the instance)."""
    lm = _lm_class()(pretrained=model.eval(), tokenizer=tokenizer, batch_size=int(batch_size))
    lm.on_progress = on_progress
    return lm


def run(model, tokenizer, tasks: Sequence[str], num_fewshot: int | None = None, limit: int | float | None = None,
        include_path: str | Path | None = None, batch_size: int = 8, log_samples: bool = False,
        on_progress: Callable[[int, int], None] | None = None, seed: int = 0) -> dict:
    """lm-eval's ``simple_evaluate`` on the loaded ``model``; returns its results (JSON-safe).

    ``limit``: at most this many documents per task (a fraction below 1 is a share of them);
    ``on_progress(done, total)`` counts requests of the current request type.
    """
    from lm_eval import simple_evaluate

    manager = task_manager(include_path)
    names = check_tasks(tasks, manager=manager)
    results = simple_evaluate(model=wrap(model, tokenizer, batch_size, on_progress), tasks=names,
                              num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=log_samples,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed)
    return json.loads(json.dumps(results, default=str))


def scores(results: dict) -> dict[str, dict]:
    """``{task: {"metric", "value", "stderr"}}``: the reported metric of each task and group."""
    out = {}
    for task, metrics in (results.get("results") or {}).items():
        found = {key.split(",")[0]: (value, metrics.get(key.replace(",", "_stderr,", 1)))
                 for key, value in metrics.items() if "," in key and "_stderr" not in key
                 and isinstance(value, (int, float))}
        metric = next((m for m in PREFERRED_METRICS if m in found), next(iter(found), None))
        if metric is not None:
            value, stderr = found[metric]
            out[task] = {"metric": metric, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return out


def open_model(ref: str, device=None):
    """``(model, tokenizer, what)`` for ``ref``: a run folder or its ``merged/`` (the low-bit model
    as it deploys), a transformers folder or a Hub id (a float model, as lm-eval's ``hf`` loads it)."""
    import torch

    from qalora.models.model import pick_device

    device = torch.device(device) if device is not None else pick_device()
    path = Path(ref).expanduser()
    if path.is_dir() and ((path / "merged").is_dir() or _is_native(path)):
        from qalora.deployment.export import run_parts
        from qalora.deployment.export.native import load_quantized

        merged, _ = run_parts(path)
        from qalora.method.quantlinear import dequantize_once_if_it_fits

        model, tok = load_quantized(merged, device=device, use_kernel=device.type == "cuda")
        dequantize_once_if_it_fits(model)  # requests come in large batches: dequantize once, not per call
        return model, tok, f"merged low-bit model {merged.name} on {device}"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(path) if path.is_dir() else ref
    if not path.is_dir() and ref.count("/") != 1:
        raise ConfigError(f"{ref!r} is neither a run folder, a transformers model folder nor a Hub id like 'org/name'.")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    return model, AutoTokenizer.from_pretrained(source), f"float model {source} ({dtype}) on {device}"


def _is_native(path: Path) -> bool:
    """Whether ``path`` holds a low-bit checkpoint of ours (``qalora.deployment.export.native``)."""
    from qalora.deployment.export.native import FORMAT

    config = path / "config.json"
    if not config.is_file():
        return False
    return (json.loads(config.read_text()).get("quantization_config") or {}).get("quant_method") == FORMAT


def write_choice_task(folder, name: str, rows: list[dict], prompt: str = "{{question}}\nAnswer:") -> Path:
    """An lm-eval multiple-choice task over local data, found with ``include_path=folder``: rows of
    ``{"question", "choices", "answer": index}`` written as ``NAME.jsonl`` beside ``NAME.yaml``
    (accuracy and length-normalized accuracy). ``prompt`` is lm-eval's ``doc_to_text`` template."""
    folder = Path(folder)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("question", "choices", "answer")}) + "\n" for r in rows))
    path = folder / f"{name}.yaml"
    path.write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: {json.dumps(prompt)}
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return path


# ---- the job's baselines: the 16-bit base and the quantized base before training ------------------

def baseline_key(which: str, base: str, quant, bench: dict, data: str, data_options: dict) -> dict:
    """What a baseline's scores depend on: the base's files, the benchmark settings and, for the
    quantized base, the quantization settings (and GPTQ's calibration data)."""
    import hashlib

    from qalora.models.model import open_base
    from qalora.models.model import base_identity
    from qalora.data.records import data_identity

    key = {"which": which, "base": base_identity(open_base(base)), "benchmarks": bench}
    if which == "quantized_base":
        key["quant"] = quant.to_dict()
        if quant.method == "gptq":
            key["calibration"] = {"data": data_identity(data), **{k: v for k, v in data_options.items() if v}}
    key["id"] = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return key


def read_cached(folder: Path, key: dict) -> dict | None:
    path = Path(folder) / f"{key['id']}.json"
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return kept["scores"] if kept.get("key") == key else None


def write_cached(folder: Path, key: dict, scores_: dict) -> None:
    write_text(Path(folder) / f"{key['id']}.json", json.dumps({"key": key, "scores": scores_}, indent=2))


def open_for(which: str, run_dir: Path, base: str, quant, device, calib_ids=None):
    """``(model, tokenizer)`` to benchmark: the run's merged low-bit model as it deploys, the 16-bit
    base as it loads, or the base quantized with the run's settings and no adapter (with the
    quantized-base cache reused where it was made for the same settings, else quantized again)."""
    import torch

    from qalora.models.model import load_base, load_quantized_base, open_base, resolve_dtype

    device = torch.device(device)
    if which == "merged":
        model, tokenizer, _ = open_model(str(run_dir), device)
        return model, tokenizer
    dtype = resolve_dtype("auto", device)
    if which == "base16":
        return load_base(base, dtype=dtype, device=device)
    if which != "quantized_base":
        raise ConfigError(f"unknown benchmark subject {which!r}")
    from qalora.config import AdapterConfig
    from qalora.method.quantlinear import dequantize_once_if_it_fits

    src = open_base(base)
    with torch.no_grad():
        model, _ = load_quantized_base(src, quant, AdapterConfig().targets, device, dtype, calib_ids=calib_ids)
    dequantize_once_if_it_fits(model)
    return model.eval(), src.tokenizer
