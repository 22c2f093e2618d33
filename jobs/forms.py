"""The new-job form's logic, free of any widget: choices, presets, parsing and dataset preview.

Everything a person can get wrong in the form is caught here and raised as a ``QALoRAError``
whose message names the field and the fix; the app shows it next to the form. Server paths typed
in the form are confined to allowed folders and uploads are kept (see ``jobs.confine``). Heavy imports
(tokenizers, torch) happen inside the functions that need them, so the app starts fast.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from qalora.atomic import atomic_path
from qalora.config import GROUP_SIZES, AdapterConfig, QuantConfig, TrainConfig, preset_for, valid_group_sizes
from qalora.data.hub import PAPER_DATASETS, RECORD_COLUMNS, HubRef, overview, parse_ref, resolve
from qalora.deployment.export.formats import check_format, gguf_widens
from qalora.errors import ConfigError, DataError, QALoRAError

from .confine import confine_base, confine_data, keep_upload, owned_by_visitor
from .spec import (EXTRA_EXPORTS, JobSpec, check_data, check_exports, check_model_group_size, dims_from_config,
                   is_hub_id, model_dims)

BASE_CHOICES = ("default", "tiny-random")
BITS_CHOICES = (2, 3, 4, 8)
METHOD_CHOICES = (("RTN (fast)", "rtn"), ("GPTQ (better at 2-3 bits, slower)", "gptq"))
DEFAULT_GROUP_SIZE = QuantConfig.group_size
# Offered when the model's layer widths are only known to the worker (a Hub id or a .gguf file): the
# middle of the candidates (GGUF refuses 16; 256 divides fewer models' widths).
FALLBACK_GROUP_SIZES = tuple(g for g in GROUP_SIZES if 32 <= g <= 128)
# Each run-length preset fills how long and on how much a run trains (steps dominate the run time);
# the learning rate, rank, alpha, clip search and learned scales come from the bit width's preset
# (``qalora.config.preset_for``: ``bits_preset``).
PRESETS: dict[str, dict] = {
    "quick": dict(steps=40, batch_size=4, seq_len=256),
    "balanced": dict(steps=200, batch_size=4, seq_len=512),
    "thorough": dict(steps=600, batch_size=8, seq_len=1024),
}
BIT_PRESET_FIELDS = ("rank", "alpha", "lr", "clip", "train_scales", "scales_lr")
DEFAULT_PRESET = "quick"
DATA_KINDS = ("built-in", "upload", "path or name", "Hub dataset")
HUB_CHECK_TTL_S = 120  # a Hub dataset's overview is asked once per id and kept this long (check, then Launch)
SUBMIT_SAMPLE_ROWS = 1000
MIN_RECORDS = 8  # enough to hold some out for evaluation and still train
LR_RANGE = (1e-6, 1e-2)  # rows of a dataset checked in the form before queueing
EVALS_PER_RUN = 5  # evaluations (and checkpoints) spread over a run, so the chart shows eval points


# The form's fields an error can be shown next to (the app places one note under each).
FIELDS = {"base": "Base model", "group_size": "Group size", "exports": "Also export when done", "data": "Dataset",
          "advanced": "Advanced settings", "sweep": "Sweep", "benchmarks": "Benchmarks"}
BENCH_NONE, BENCH_CUSTOM = "none", "custom"


def _preset_bits(bits) -> int:
    """The bit width whose preset applies: the form's bits, or 4 while they are not a valid choice
    (the bad value is reported with the group size)."""
    return int(bits) if str(bits).strip() in {str(b) for b in BITS_CHOICES} else 4


def bits_preset(bits) -> tuple[dict, str]:
    """The preset for ``bits`` (the form's defaults for :data:`BIT_PRESET_FIELDS`) and the note that
    says so, with what a GGUF file costs where it cannot hold the bits (2 and 3 bits are Q4_1)."""
    bits = _preset_bits(bits)
    p = preset_for(bits)
    scales = f"learned scales on (their lr {p['scales_lr']:g})" if p["train_scales"] else "learned scales off"
    note = (f"**Preset for {bits} bits:** learning rate {p['lr']:g}, rank {p['rank']}, alpha {p['alpha']:g}, "
            f"clip search {'on' if p['clip'] else 'off'}, {scales} (chosen by a sweep on the default model; "
            "any of them can be changed by hand).")
    if gguf_widens(bits):
        note += (f" A GGUF file stores {bits}-bit codes as Q4_1 blocks (llama.cpp has no exact {bits}-bit block "
                 "with a float offset), so it costs what a 4-bit file does; the native folder keeps the "
                 f"{bits} bits.")
    return p, note


def benchmark_choices() -> list[tuple[str, str]]:
    """(label, value) for the launch form's Benchmarks choice: none, the paper's presets, a custom list."""
    from qalora.evaluation.benchmarks import PRESETS  # torch-free: lm-eval is imported only to run or check tasks

    return [("none", BENCH_NONE), *((p["label"], name) for name, p in PRESETS.items()),
            ("custom list of lm-eval tasks", BENCH_CUSTOM)]


def benchmarks_setting(choice: str | None, tasks: str | None = "", limit=None) -> dict:
    """The spec's ``benchmarks`` from the form: a preset or a custom comma-separated task list (names
    checked against lm-eval's registry, nothing downloaded), and an optional per-task limit."""
    from qalora.evaluation.benchmarks import PRESETS, check_tasks

    choice = choice or BENCH_NONE
    if choice == BENCH_NONE:
        return {}
    limit = None if limit in (None, "", 0) else _number("per-task limit", limit, int, 1)  # a blank box sends 0
    if choice == BENCH_CUSTOM:
        names = [t for t in str(tasks or "").split(",") if t.strip()]
        if not names:
            raise ConfigError("no benchmark task given; type lm-eval task or group names, e.g. hellaswag, arc_easy.")
        return {"tasks": check_tasks(names), "num_fewshot": None, "limit": limit}
    if choice not in PRESETS:
        raise ConfigError(f"unknown benchmark preset {choice!r}; pick one of {', '.join(PRESETS)}.")
    return {"tasks": list(PRESETS[choice]["tasks"]), "num_fewshot": PRESETS[choice]["num_fewshot"], "limit": limit}


class FormError(ConfigError):
    """Every problem found in the form, by field (``fields``: field -> message); ``str`` joins them."""

    def __init__(self, fields: dict[str, str]):
        self.fields = dict(fields)
        super().__init__(" ".join(self.fields.values()))


class _Collect:
    """Gathers every error, by field, so the form shows every problem at once: a field with several
    (learning rate, rank and sequence length in the advanced settings) lists them all."""

    def __init__(self):
        self.fields: dict[str, str] = {}

    def add(self, name: str, message: str) -> None:
        if message not in self.fields.get(name, ""):
            self.fields[name] = f"{self.fields[name]} {message}" if name in self.fields else message

    @contextmanager
    def field(self, name: str):
        try:
            yield
        except FormError as exc:
            for key, message in exc.fields.items():
                self.add(key, message)
        except QALoRAError as exc:
            self.add(name, str(exc))

    def raise_any(self) -> None:
        if self.fields:
            raise FormError(self.fields)


def builtin_choices() -> list[tuple[str, str]]:
    """(label, value) for the built-in list: the embedded sets, then the paper's five Hub datasets."""
    from qalora.data.builtin import builtin_names  # not qalora.data.records: that one imports torch

    return [(f"builtin:{n}", f"builtin:{n}") for n in builtin_names()] + [
        (f"{d.label}: {d.ref.split(':')[0]} (the paper's; downloaded from the Hub)", f"paper:{name}")
        for name, d in PAPER_DATASETS.items()]


def hub_ref(hub_id: str | None, config: str | None = None, split: str | None = None) -> str:
    """``ID[:CONFIG][@SPLIT]`` from the form's Hub fields (the id box may already hold a config or split);
    "" for an empty id box, which :func:`data_source` names."""
    if not (hub_id or "").strip():
        return ""
    ref = parse_ref(hub_id.strip())
    return str(HubRef(ref.id, config or ref.config, split or ref.split))


_overviews: dict[str, tuple[float, object]] = {}


def hub_dataset(ref: str):
    """What the Hub says of a dataset (:func:`qalora.data.hub.overview`, about 2 s at most), kept for
    ``HUB_CHECK_TTL_S`` so the check and the Launch that follows ask once."""
    import time

    kept = _overviews.get(ref)
    if kept and time.monotonic() - kept[0] < HUB_CHECK_TTL_S:
        return kept[1]
    view = overview(ref)
    _overviews[ref] = (time.monotonic(), view)
    return view


def check_hub_columns(view, columns: dict) -> None:
    """The mapping names columns the dataset has; without one, its columns must be a known format."""
    shown = ", ".join(repr(c) for c in view.columns[:12]) + (" …" if len(view.columns) > 12 else "")
    if columns:
        missing = [c for c in columns.values() if view.columns and c not in view.columns]
        if missing:
            raise DataError(f"{view.ref}: no column {missing[0]!r}; its columns are {shown}. Fix the column mapping.")
    elif view.columns and not set(view.columns) & set(RECORD_COLUMNS):
        raise DataError(f"{view.ref}: its columns {shown} match no known record format; map them under "
                        "'Column mapping' (a prompt, an optional input and a response column, or one messages "
                        "column).")


def base_dims(base: str) -> tuple[int, int, int] | None:
    """The base's layer widths: from its config for a local folder, from the Hub (2 s at most) for a
    Hub id, ``None`` for a .gguf file other than the default (read by the worker).

    Raises ``ModelError`` for a path that does not exist, a model that is not LLaMA-family, or a
    Hub that cannot be reached (at once, instead of failing the job later).
    """
    base = confine_base(str(base or "").strip() or "default")
    dims = model_dims(base)
    if dims is None and is_hub_id(base):
        from qalora.models.hub import hub_config
        dims = dims_from_config(hub_config(base), base)
    return dims


def group_size_choices(base: str) -> list[int]:
    """Group sizes that divide every targeted layer's ``in_features`` of ``base``."""
    dims = base_dims(base)
    if dims is None:
        return list(FALLBACK_GROUP_SIZES)
    return valid_group_sizes(*dims)


def export_choices(bits, group_size) -> tuple[list[str], dict[str, str]]:
    """(exports that apply at these settings, {export: why it cannot}) for the export checkboxes."""
    ok, refused = [], {}
    for fmt in EXTRA_EXPORTS:
        try:
            check_format(fmt, int(bits), int(group_size))
            ok.append(fmt)
        except (ConfigError, TypeError, ValueError) as exc:
            refused[fmt] = str(exc).split(":")[0] if isinstance(exc, ConfigError) else "needs a valid group size"
    return ok, refused


def data_source(kind: str, builtin: str | None, upload: str | None, path_or_name: str | None) -> str:
    """The dataset reference a job stores, from whichever input is active (for "Hub dataset", the
    reference :func:`hub_ref` composed from the Hub fields)."""
    if kind == "built-in":
        if not builtin:
            raise DataError("no built-in dataset is selected; pick one from the list.")
        return builtin
    if kind == "upload":
        if not upload:
            raise DataError("no file is uploaded; drop a .jsonl, .json, .csv or .parquet file on the upload box.")
        return keep_upload(str(upload))  # Gradio's temporary copy would vanish before a resume
    ref = (path_or_name or "").strip()
    if not ref:
        if kind == "Hub dataset":
            raise DataError("the Hub dataset id is empty; type one, e.g. tatsu-lab/alpaca, or pick one of the "
                            "paper's datasets in the built-in list.")
        raise DataError("the dataset path or name is empty; type a file path, a dataset folder, or a Hub dataset "
                        "ID[:CONFIG][@SPLIT].")
    return confine_data(ref)


def _number(field: str, value, cast, minimum=None):
    try:
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError
        number = float(value)
        if cast is int:
            if not math.isfinite(number) or number != int(number):
                raise ValueError
            number = int(number)
    except (TypeError, ValueError):
        kind = "a whole number" if cast is int else "a number"
        raise ConfigError(f"{field} must be {kind} (got {value!r}); fix it in the advanced settings.") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"{field} must be at least {minimum} (got {value!r}).")
    return number


def build_spec(*, base: str, bits, group_size, method: str, data: str, rank, alpha, lr, steps, batch_size,
               seq_len, name: str = "", exports=(), check_rows: bool = True, devices=1, columns=None,
               max_samples=None, benchmarks=None, bench_tasks: str = "", bench_limit=None, clip=None,
               train_scales=None, scales_lr=None) -> JobSpec:
    """Turn the form's raw values into a validated ``JobSpec``; raises ``QALoRAError`` on bad input.

    The form is the edge: each field is checked here, every problem reported at once under its field
    (``FormError``), and the spec returned is validated (``JobSpec.validate``), so ``service.submit``
    trusts it. With ``check_rows`` a sample of the dataset's records is parsed now, so a missing
    column or a malformed row is reported in the form instead of failing the job in the worker; a
    Hub dataset is asked about instead (exists, readable, its columns against the mapping), its rows
    are not downloaded here. ``columns`` maps the dataset's columns (roles -> column, empty ones
    ignored); ``max_samples`` (blank: every record) trains on a seeded sample. ``clip``,
    ``train_scales`` and ``scales_lr`` left as None take the preset for ``bits``
    (``qalora.config.preset_for``).
    """
    errors = _Collect()
    # the bit width's preset fills what the form left unset (bad bits are reported with the group size)
    preset = preset_for(_preset_bits(bits))
    numbers = _advanced_numbers(errors, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, rank=rank,
                                alpha=alpha, devices=devices)
    train, adapter = _train_and_adapter(errors, numbers, preset, train_scales, scales_lr)
    dims = None
    with errors.field("base"):
        base = confine_base(str(base or "").strip() or "default")
        dims = base_dims(base)
    quant = _quant(errors, bits, group_size, method, preset["clip"] if clip is None else bool(clip), dims)
    with errors.field("exports"):
        if quant is not None:
            check_exports(exports or (), quant.bits, quant.group_size)
    data, columns, max_samples, hub = _dataset(errors, data, columns, max_samples)
    if check_rows and not hub and "data" not in errors.fields:
        with errors.field("data"):
            check_records(data, columns, None if "base" in errors.fields else base, numbers.get("seq_len"))
    bench = {}
    with errors.field("benchmarks"):
        bench = benchmarks_setting(benchmarks, bench_tasks, bench_limit)
    errors.raise_any()
    spec = JobSpec(base=base, data=data, quant=quant, adapter=adapter, train=train, exports=tuple(exports or ()),
                   name=name or "", devices=numbers["devices"], columns=columns, max_samples=max_samples,
                   benchmarks=bench)
    return spec.validate()


_ADVANCED = (("steps", "steps", int, 1), ("lr", "learning rate", float, None), ("batch_size", "batch size", int, 1),
             ("seq_len", "sequence length", int, 8), ("rank", "rank", int, 1), ("alpha", "alpha", float, None),
             ("devices", "GPUs for this job", int, 1))


def _advanced_numbers(errors: _Collect, **raw) -> dict:
    """The advanced settings' numbers (those that parse), each checked on its own: every bad value is named."""
    numbers = {}
    for key, label, cast, minimum in _ADVANCED:
        with errors.field("advanced"):
            value = _number(label, raw[key], cast, minimum)
            if key == "lr" and not LR_RANGE[0] <= value <= LR_RANGE[1]:
                raise ConfigError(f"learning rate {value:g} is outside the range that trains an adapter "
                                  f"({LR_RANGE[0]:g} to {LR_RANGE[1]:g}; typical 1e-4 to 3e-4); fix it in the "
                                  "advanced settings.")
            numbers[key] = value
    return numbers


def _train_and_adapter(errors: _Collect, numbers: dict, preset: dict, train_scales, scales_lr):
    """(TrainConfig, AdapterConfig) from the advanced settings, or (None, None) while one is wrong."""
    train = adapter = None
    if "advanced" in errors.fields:
        return train, adapter
    with errors.field("advanced"):
        steps = numbers["steps"]
        every = max(1, steps // EVALS_PER_RUN)
        train = TrainConfig(steps=steps, batch_size=numbers["batch_size"], seq_len=numbers["seq_len"],
                            lr=numbers["lr"], warmup_steps=min(10, steps // 10), eval_every=every, save_every=every,
                            eval_batches=4)
        scales_lr = preset["scales_lr"] if scales_lr in (None, "", 0) else _number("scales learning rate",
                                                                                   scales_lr, float)
        adapter = AdapterConfig(rank=numbers["rank"], alpha=numbers["alpha"], scales_lr=scales_lr,
                                train_scales=preset["train_scales"] if train_scales is None else bool(train_scales))
    return train, adapter


def _quant(errors: _Collect, bits, group_size, method: str, clip: bool, dims) -> QuantConfig | None:
    """The quantization settings (field ``group_size``): bits and group size each parsed, the group size
    checked against the base's layer widths where known; ``None`` while any of it is wrong."""
    with errors.field("group_size"):
        bits = _number("bits", bits, int)
    with errors.field("group_size"):
        group_size = _number("group size", group_size, int)
        if dims is not None:
            check_model_group_size(dims, group_size, AdapterConfig().targets)
    if "group_size" in errors.fields:
        return None
    with errors.field("group_size"):
        return QuantConfig(bits=bits, group_size=group_size, method=method, clip=clip)
    return None


def _dataset(errors: _Collect, data: str, columns, max_samples):
    """(data, columns, max_samples, hub): the dataset reference resolved, confined and checked to
    exist; a Hub dataset (``hub``) is asked about, its columns checked against the mapping."""
    hub = False
    with errors.field("data"):
        if max_samples not in (None, "", 0):  # a blank box in the browser sends 0
            max_samples = _number("max records", max_samples, int, 2)
        else:
            max_samples = None
        data, columns, max_samples = resolve(data, columns, max_samples)
        data = confine_data(data)
        check_data(data)
        hub = is_hub_dataset(data)
        if hub:
            check_hub_columns(hub_dataset(data), columns)
    return data, columns, max_samples, hub


def is_hub_dataset(data: str) -> bool:
    """Whether a checked dataset reference names a Hub dataset (neither built in nor a path here)."""
    return not data.startswith("builtin:") and not Path(data).expanduser().exists()


def check_records(data: str, columns, base: str | None, seq_len: int | None) -> None:
    """A bounded sample of the dataset's records parsed (field ``data``), so a large file is not parsed
    whole in the web process (the worker reads and checks every row when the job starts); with
    ``base`` and ``seq_len``, the replies must survive the sequence length (field ``advanced``).
    Raises ``FormError`` with both fields' problems."""
    from qalora.data.records import load_records

    errors, records = _Collect(), None
    with errors.field("data"), owned_by_visitor(data):
        records = load_records(data, limit=SUBMIT_SAMPLE_ROWS, columns=columns)
        if len(records) < MIN_RECORDS:
            raise DataError(f"{Path(data).name} has {len(records)} record(s); a fine-tune needs at least "
                            f"{MIN_RECORDS} (about one in ten is held out to measure it). Add more records.")
    if records and seq_len and base is not None:
        with errors.field("advanced"):  # checked even when another field is wrong: all problems at once
            _check_replies_fit(records, base, seq_len)
    errors.raise_any()


def form_spec(*, kind: str, builtin: str | None, upload: str | None, path: str | None, **fields) -> JobSpec:
    """``build_spec`` from the form's dataset inputs; a dataset that cannot be read is reported
    together with every other field's problem (``FormError``)."""
    errors = _Collect()
    data = None
    with errors.field("data"):
        data = data_source(kind, builtin, upload, path)
    if data is None:
        with errors.field("data"):  # the other fields, checked against a dataset that exists
            build_spec(data="builtin:default", **{**fields, "check_rows": False})
        errors.raise_any()
    return build_spec(data=data, **fields)


def _check_replies_fit(records: list[dict], base: str, seq_len: int) -> None:
    """Refuse a sequence length that cuts away every reply of the sample (the worker would fail)."""
    from qalora.data.records import tokenize_records

    try:
        tok = _tokenizer(base)
    except (OSError, ValueError):
        return  # a Hub id whose tokenizer is not downloaded yet: the worker checks with the real one
    sample = records[:200]
    try:
        tokenize_records(sample, tok, seq_len)
    except DataError:
        raise DataError(f"sequence length {seq_len} cuts away the whole reply of every one of the first "
                        f"{len(sample)} records, leaving nothing to learn; raise it (typical 256-2048) or shorten "
                        "the prompts.") from None


@lru_cache(maxsize=2)
def _tokenizer(base: str):
    """The base's own tokenizer (its chat template decides the rendering); cached per base."""
    from qalora.models.model import TINY_MODEL, default_gguf_path

    if base == TINY_MODEL:
        from qalora.models.tiny import byte_tokenizer
        return byte_tokenizer()
    from transformers import AutoTokenizer

    path = default_gguf_path() if base == "default" else Path(base).expanduser()
    if base == "default":
        return _default_tokenizer(path)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if path.exists():
        return AutoTokenizer.from_pretrained(str(path))
    # a Hub id: only a tokenizer already in the local cache (a web request never downloads one)
    return AutoTokenizer.from_pretrained(base, local_files_only=True)


def _default_tokenizer(gguf_path: Path):
    """The embedded model's tokenizer, read out of its GGUF file once (tens of seconds) and then kept
    as a tokenizer folder in the store, which loads in well under a second."""
    from transformers import AutoTokenizer

    from storage import get_settings

    cached = get_settings().home / "cache" / f"default-tokenizer-{gguf_path.stat().st_size}"
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except (OSError, ValueError):
            pass  # a damaged copy: read the GGUF again below
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    with atomic_path(cached) as tmp:
        tok.save_pretrained(str(tmp))
    return tok


def warm_up() -> None:
    """Load what the form's first preview needs (the default tokenizer), e.g. in a thread at start."""
    _tokenizer("default")


def preview_dataset(source: str, base: str, n: int = 3) -> tuple[list[str], int]:
    """The first ``n`` records rendered as the model will see them, and the record count.

    Falls back to a plain ChatML rendering when the base's tokenizer cannot be loaded here
    (e.g. a Hub id while offline); the worker still uses the real one.
    """
    from qalora.data.records import preview

    base = confine_base(str(base or "").strip() or "default")
    source = confine_data(source)
    model_dims(base)  # an unknown model path is reported before any loading
    try:
        tok = _tokenizer(base)
    except (OSError, ValueError):
        tok = _tokenizer("tiny-random")
    with owned_by_visitor(source):
        return preview(source, tok, n)
