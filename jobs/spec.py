"""What a job will do, checked before it is queued so a bad spec fails in the form, not hours later.

A ``JobSpec`` is the library's three config dataclasses plus the base model, the dataset,
the export formats and a name; it is stored as JSON in the job row (``to_dict``/``from_dict``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from qalora.config import AdapterConfig, QuantConfig, TrainConfig, check_group_size
from qalora.errors import ConfigError, DataError, ModelError

# Always written by qalora.training.finetune.finetune: the merged low-bit model and the adapter.
DEFAULT_EXPORTS = ("native", "adapter")
# Written after training when the spec asks (qalora.deployment.export): llama.cpp file, transformers (torchao)
# folder, GPTQ folder, PEFT adapter.
EXTRA_EXPORTS = ("gguf", "torchao", "gptq", "peft")
EXPORT_FORMATS = DEFAULT_EXPORTS + EXTRA_EXPORTS
MAX_DEVICES = 64
MAX_NAME = 180  # the jobs table holds 200; a taken name gets "-2", "-3", ...
DATA_FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet")
SPEC_FIELDS = ("name", "base", "data", "quant", "adapter", "train", "exports", "devices", "columns", "max_samples",
               "benchmarks")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# SmolLM2-135M-Instruct (the 'default' GGUF): reading the GGUF header takes seconds, so the
# numbers are kept here; (hidden_size, attention width = heads x head_dim, intermediate_size).
_DEFAULT_DIMS = (576, 576, 1536)


@dataclass
class JobSpec:
    base: str = "default"
    data: str = "builtin:default"
    quant: QuantConfig = field(default_factory=QuantConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    exports: tuple[str, ...] = DEFAULT_EXPORTS
    name: str = ""
    devices: int = 1  # devices it trains on, one data-parallel rank each (global batch x devices)
    columns: dict = field(default_factory=dict)  # the data's columns -> prompt/input/response, messages or text
    max_samples: int | None = None  # train on a seeded sample of this many records (the train seed)
    # lm-evaluation-harness after training: {"tasks": [...], "num_fewshot": k or None, "limit": n or None}
    benchmarks: dict = field(default_factory=dict)
    # set by validate(): a spec checked at the edge is trusted after (service.submit does not check it again)
    validated: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self):
        from qalora.data.hub import resolve

        self.base, self.name = str(self.base).strip(), (self.name or "").strip()
        self.data, self.columns, self.max_samples = resolve(str(self.data).strip(), self.columns, self.max_samples)
        self.benchmarks = check_benchmarks(self.benchmarks)
        if self.max_samples is not None and (isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int)
                                             or self.max_samples < 2):
            raise ConfigError(f"max_samples={self.max_samples!r}: give a whole number of records, at least 2 (or "
                              "none, to train on every record).")
        self.exports = tuple(dict.fromkeys((*DEFAULT_EXPORTS, *self.exports)))
        unknown = [f for f in self.exports if f not in EXPORT_FORMATS]
        if unknown:
            raise ConfigError(f"export format(s) {unknown} are not available; choose from {list(EXPORT_FORMATS)}.")
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or not 1 <= self.devices <= MAX_DEVICES:
            raise ConfigError(f"devices={self.devices!r}: a job trains on 1 to {MAX_DEVICES} devices (GPUs, or CPU "
                              "processes on a machine without one).")
        if len(self.name) > MAX_NAME:
            raise ConfigError(f"the run name has {len(self.name)} characters; keep it to {MAX_NAME} or fewer.")
        if not self.name:
            short = short_name(self.base)
            self.name = f"{short}-{self.quant.bits}bit-g{self.quant.group_size}-r{self.adapter.rank}"

    def to_dict(self) -> dict:
        return {"name": self.name, "base": self.base, "data": self.data, "quant": self.quant.to_dict(),
                "adapter": {**self.adapter.to_dict(), "targets": list(self.adapter.targets)},
                "train": self.train.to_dict(), "exports": list(self.exports), "devices": self.devices,
                **({"columns": dict(self.columns)} if self.columns else {}),
                **({"max_samples": self.max_samples} if self.max_samples is not None else {}),
                **({"benchmarks": dict(self.benchmarks)} if self.benchmarks else {})}

    @classmethod
    def from_dict(cls, d: dict) -> JobSpec:
        d = dict(d)
        unknown = sorted(set(d) - set(SPEC_FIELDS))
        if unknown:
            raise ConfigError(f"job spec: unknown field(s) {unknown}; valid fields are {', '.join(SPEC_FIELDS)}.")
        return cls(base=d.get("base", "default"), data=d.get("data", "builtin:default"),
                   quant=QuantConfig.from_dict(d.get("quant")), adapter=AdapterConfig.from_dict(d.get("adapter")),
                   train=TrainConfig.from_dict(d.get("train")), exports=d.get("exports", DEFAULT_EXPORTS),
                   name=d.get("name", ""), devices=d.get("devices", 1), columns=d.get("columns") or {},
                   max_samples=d.get("max_samples"), benchmarks=d.get("benchmarks") or {})

    def validate(self) -> JobSpec:
        """Check what can be checked in well under a second: data source, base model, group size,
        export formats. Run once where a spec enters (``forms.build_spec``, or ``service.submit`` for
        one made elsewhere) and once by the worker on the stored spec; trusted in between.

        Local paths are made absolute, so a worker in another directory finds the same files.
        """
        check_data(self.data)
        dims = model_dims(self.base)
        self.data, self.base = _absolute(self.data), _absolute(self.base)
        if dims is not None:
            check_model_group_size(dims, self.quant.group_size, self.adapter.targets)
        check_exports(self.extra_exports, self.quant.bits, self.quant.group_size)
        self.validated = True
        return self

    @property
    def data_options(self) -> dict:
        """How ``qalora.data.records.load_records`` picks this job's records from its data."""
        return {"columns": self.columns, "max_samples": self.max_samples, "seed": self.train.seed}

    @property
    def extra_exports(self) -> tuple[str, ...]:
        return tuple(f for f in self.exports if f in EXTRA_EXPORTS)


def check_benchmarks(bench: dict | None) -> dict:
    """``{"tasks": [names], "num_fewshot": k or None, "limit": n or None}``, or {} for none. The names are
    checked against lm-eval's registry by ``qalora.evaluation.benchmarks.check_tasks`` (the form does it)."""
    if not bench or not bench.get("tasks"):
        return {}
    unknown = sorted(set(bench) - {"tasks", "num_fewshot", "limit"})
    if unknown:
        raise ConfigError(f"benchmarks: unknown field(s) {unknown}; give tasks, num_fewshot and limit.")
    tasks = [str(t).strip() for t in bench["tasks"] if str(t).strip()]
    out = {"tasks": tasks, "num_fewshot": bench.get("num_fewshot"), "limit": bench.get("limit")}
    for key, low in (("num_fewshot", 0), ("limit", 1)):
        value = out[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"benchmarks: {key}={value!r} must be a whole number of at least {low}, or none.")
    return out


def short_name(base: str) -> str:
    """The base's own name: ``meta-llama/Llama-3.1-8B`` -> ``Llama-3.1-8B``, a .gguf file's stem."""
    if base in ("default", "tiny-random"):
        return base
    name = Path(base.rstrip("/")).name
    return name[:-len(".gguf")] if name.endswith(".gguf") else name


def _absolute(ref: str) -> str:
    if ref in ("default", "tiny-random") or ref.startswith("builtin:"):
        return ref
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def check_data(source: str) -> None:
    """The source must exist; its rows are parsed by the worker, which names a bad file and row."""
    if source.startswith("builtin:"):
        from qalora.data.builtin import builtin_records
        builtin_records(source[len("builtin:"):])  # unknown names raise a DataError listing the choices
        return
    path = Path(source).expanduser()
    if path.is_dir():
        return
    if path.is_file():
        if path.suffix.lower() not in DATA_FILE_TYPES:
            raise DataError(f"{path.name}: unsupported file type {path.suffix or '(none)'}; "
                            f"use one of {', '.join(DATA_FILE_TYPES)}.")
        if path.stat().st_size == 0:
            raise DataError(f"{path.name} is empty; add at least two records.")
        return
    if path.suffix.lower() in DATA_FILE_TYPES or source.startswith((".", "/", "~")) or not source:
        raise DataError(f"dataset {source!r} not found; give builtin:default, the path of a "
                        f"{'/'.join(DATA_FILE_TYPES)} file, a dataset folder, or a Hub dataset ID[:CONFIG][@SPLIT].")
    # anything else is a Hub dataset, written ID[:CONFIG][@SPLIT]: the form asks the Hub about it
    # (jobs.forms.hub_dataset), the worker downloads it
    from qalora.data.hub import parse_ref
    parse_ref(source)


def model_dims(base: str) -> tuple[int, int, int] | None:
    """(hidden, attention width, intermediate) when cheaply known; ``None`` defers to the worker.

    Raises ``ModelError`` for a local path that does not exist or is not a LLaMA-family model.
    """
    if base == "default":
        return _DEFAULT_DIMS
    if base == "tiny-random":
        from qalora.models.tiny import TINY_DIMS
        return TINY_DIMS["hidden_size"], TINY_DIMS["hidden_size"], TINY_DIMS["intermediate_size"]
    path = Path(base).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {base} does not exist; check the path.")
        return None
    if path.is_dir():
        return _dims_from_config(path)
    if is_hub_id(base):
        return None  # a Hub id: the form asks the Hub (jobs.forms.base_dims); the worker downloads it
    raise ModelError(missing_model_message(base))


def missing_model_message(base: str) -> str:
    return (f"model {base!r} was not found: give 'default', 'tiny-random', a local model directory, a .gguf "
            "file, or a Hugging Face Hub id like 'org/name'.")


def is_hub_id(base: str) -> bool:
    """``org/name`` that is not a local path."""
    return bool(_HUB_ID.match(base)) and not base.startswith((".", "/", "~")) and not Path(base).exists()


def _dims_from_config(path: Path) -> tuple[int, int, int]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path} has no config.json; point to a folder saved with save_pretrained, "
                         "or to a .gguf file.")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise ModelError(f"{cfg_file} is not a readable model config ({exc}); re-save the model.") from None
    return dims_from_config(cfg, str(path), str(cfg_file))


def dims_from_config(cfg: dict, where: str, file: str | None = None) -> tuple[int, int, int]:
    """(hidden, attention width, intermediate) of a LLaMA-family ``config.json``'s contents."""
    from qalora.models.model import LLAMA_FAMILY

    try:
        hidden, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{file or where + ' config.json'} is not a readable model config ({exc}); "
                         "re-save the model.") from None
    if cfg.get("model_type") not in LLAMA_FAMILY:
        raise ModelError(f"{where} is a {cfg.get('model_type')!r} model; QA-LoRA Studio supports "
                         f"LLaMA-family causal LMs ({', '.join(LLAMA_FAMILY)}). Pick a LLaMA-family base.")
    heads = int(cfg.get("num_attention_heads") or 1)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    return hidden, heads * head_dim, inter


def check_model_group_size(dims: tuple[int, int, int], group_size: int, targets) -> None:
    """Every targeted linear's in_features must be a multiple of ``group_size`` (the rule and its
    message: ``qalora.config.check_group_size``)."""
    hidden, attn, inter = dims
    in_features = {"o_proj": attn, "down_proj": inter}
    for target in targets:
        check_group_size(in_features.get(target, hidden), group_size, target)


def check_exports(exports, bits: int, group_size: int) -> None:
    """Each export format must hold these bits and group size (the rules live in
    ``qalora.deployment.export.formats``)."""
    from qalora.deployment.export.formats import check_format

    for fmt in exports:
        check_format(fmt, bits, group_size)
