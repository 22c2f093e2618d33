"""The new-job form's logic, free of any widget: choices, presets, parsing and dataset preview.

Everything a person can get wrong in the form is caught here and raised as a ``QALoRAError``
whose message names the field and the fix; the app shows it next to the form. Server paths typed
in the form are confined to allowed folders and uploads are kept (see ``jobs.confine``). Heavy imports
(tokenizers, torch) happen inside the functions that need them, so the app starts fast.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

from qalora.config import AdapterConfig, QuantConfig, TrainConfig
from qalora.errors import ConfigError, DataError

from .confine import confine_base, confine_data, keep_upload
from .spec import JobSpec, model_dims

BASE_CHOICES = ("default", "tiny-random")
BITS_CHOICES = (2, 3, 4, 8)
METHOD_CHOICES = (("RTN (fast)", "rtn"), ("GPTQ (better at 2-3 bits, slower)", "gptq"))
DEFAULT_GROUP_SIZE = 32
# Offered when the model's layer widths are only known to the worker (a Hub id or a .gguf file).
FALLBACK_GROUP_SIZES = (32, 64, 128)
_CANDIDATE_GROUP_SIZES = (16, 32, 64, 128, 256)
# Each preset fills the advanced fields; steps dominate the run time.
PRESETS: dict[str, dict] = {
    "quick": dict(rank=8, alpha=16.0, lr=3e-4, steps=40, batch_size=4, seq_len=256),
    "balanced": dict(rank=16, alpha=32.0, lr=2e-4, steps=200, batch_size=4, seq_len=512),
    "thorough": dict(rank=32, alpha=64.0, lr=1e-4, steps=600, batch_size=8, seq_len=1024),
}
DEFAULT_PRESET = "quick"
DATA_KINDS = ("built-in", "upload", "path or name")
SUBMIT_SAMPLE_ROWS = 1000
MIN_RECORDS = 8  # enough to hold some out for evaluation and still train
LR_RANGE = (1e-6, 1e-2)  # rows of a dataset checked in the form before queueing
EVALS_PER_RUN = 5  # evaluations (and checkpoints) spread over a run, so the chart shows eval points


def builtin_choices() -> list[str]:
    from qalora.builtin_data import builtin_names  # not qalora.data: that one imports torch
    return [f"builtin:{n}" for n in builtin_names()]


def group_size_choices(base: str) -> list[int]:
    """Group sizes that divide every targeted layer's ``in_features`` of ``base``.

    Raises ``ModelError`` for a path that does not exist or is not a LLaMA-family model.
    """
    dims = model_dims(confine_base(str(base or "").strip() or "default"))
    if dims is None:
        return list(FALLBACK_GROUP_SIZES)
    return [g for g in _CANDIDATE_GROUP_SIZES if all(d % g == 0 for d in dims)]


def data_source(kind: str, builtin: str | None, upload: str | None, path_or_name: str | None) -> str:
    """The dataset reference a job stores, from whichever of the three inputs is active."""
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
        raise DataError("the dataset path or name is empty; type a file path, a dataset folder, or the name "
                        "of a dataset in the local datasets cache.")
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
               seq_len, name: str = "", exports=(), check_rows: bool = True) -> JobSpec:
    """Turn the form's raw values into a validated ``JobSpec``; raises ``QALoRAError`` on bad input.

    With ``check_rows`` every record of the dataset is parsed now, so a missing column or a
    malformed row is reported in the form instead of failing the job in the worker.
    """
    steps = _number("steps", steps, int, 1)
    rate = _number("learning rate", lr, float)
    if not LR_RANGE[0] <= rate <= LR_RANGE[1]:
        raise ConfigError(f"learning rate {rate:g} is outside the range that trains an adapter "
                          f"({LR_RANGE[0]:g} to {LR_RANGE[1]:g}; typical 1e-4 to 3e-4); fix it in the advanced "
                          "settings.")
    every = max(1, steps // EVALS_PER_RUN)
    train = TrainConfig(steps=steps, batch_size=_number("batch size", batch_size, int, 1),
                        seq_len=_number("sequence length", seq_len, int, 8), lr=_number("learning rate", lr, float),
                        warmup_steps=min(10, steps // 10), eval_every=every, save_every=every, eval_batches=4)
    spec = JobSpec(base=confine_base(str(base or "").strip() or "default"), data=confine_data(data),
                   quant=QuantConfig(bits=_number("bits", bits, int), group_size=_number("group size", group_size, int),
                                     method=method),
                   adapter=AdapterConfig(rank=_number("rank", rank, int, 1), alpha=_number("alpha", alpha, float)),
                   train=train, exports=tuple(exports or ()), name=name or "")
    spec.validate()
    if check_rows:
        from qalora.data import load_records
        # A bounded sample, so a large file is not parsed whole in the web process; the worker
        # reads (and checks) every row when the job starts.
        records = load_records(spec.data, limit=SUBMIT_SAMPLE_ROWS)
        if len(records) < MIN_RECORDS:
            raise DataError(f"{Path(spec.data).name} has {len(records)} record(s); a fine-tune needs at least "
                            f"{MIN_RECORDS} (about one in ten is held out to measure it). Add more records.")
        _check_replies_fit(records, spec)
    return spec


def _check_replies_fit(records: list[dict], spec: JobSpec) -> None:
    """Refuse a sequence length that cuts away every reply of the sample (the worker would fail)."""
    from qalora.data import tokenize_records

    if spec.base not in BASE_CHOICES and not Path(spec.base).expanduser().exists():
        return  # a Hub id: its tokenizer is fetched by the worker, never by a web request
    try:
        tok = _tokenizer(spec.base)
    except (OSError, ValueError):
        return  # a Hub id not downloaded yet: the worker checks with the real tokenizer
    sample = records[:200]
    try:
        tokenize_records(sample, tok, spec.train.seq_len)
    except DataError:
        raise DataError(f"sequence length {spec.train.seq_len} cuts away the whole reply of every one of the first "
                        f"{len(sample)} records, leaving nothing to learn; raise it (typical 256-2048) or shorten "
                        "the prompts.") from None


@lru_cache(maxsize=2)
def _tokenizer(base: str):
    """The base's own tokenizer (its chat template decides the rendering); cached per base."""
    from qalora.model import TINY_MODEL, default_gguf_path

    if base == TINY_MODEL:
        from qalora.tiny import byte_tokenizer
        return byte_tokenizer()
    from transformers import AutoTokenizer

    path = default_gguf_path() if base == "default" else Path(base).expanduser()
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path) if path.exists() else base)


def preview_dataset(source: str, base: str, n: int = 3) -> tuple[list[str], int]:
    """The first ``n`` records rendered as the model will see them, and the record count.

    Falls back to a plain ChatML rendering when the base's tokenizer cannot be loaded here
    (e.g. a Hub id while offline); the worker still uses the real one.
    """
    from qalora.data import preview

    base = confine_base(str(base or "").strip() or "default")
    source = confine_data(source)
    model_dims(base)  # an unknown model path is reported before any loading
    try:
        tok = _tokenizer(base)
    except (OSError, ValueError):
        tok = _tokenizer("tiny-random")
    return preview(source, tok, n)
