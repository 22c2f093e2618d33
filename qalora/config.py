"""One dataclass per concern; each validates itself with a message that says what to do."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from qalora.errors import ConfigError

VALID_BITS = (2, 3, 4, 8)
# The group sizes offered (the form, a sweep, the layer-width check's suggestions); a model takes those
# that divide its layers' widths (``valid_group_sizes`` below).
GROUP_SIZES = (16, 32, 64, 128, 256)
QUANT_METHODS = ("rtn", "gptq")
SCHEDULES = ("cosine", "constant")
DTYPES = ("auto", "float32", "bfloat16")
ADAPTER_METHODS = ("qalora", "qlora-ptq")
SCALE_GRANULARITIES = ("group", "channel")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _from_dict(cls, data: dict | None):
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown setting(s) {unknown}; valid settings are {sorted(known)}.")
    return cls(**data)


def _to_dict(self) -> dict:
    """The settings as a dict; an option left at its off value is left out, so runs made before the
    option existed keep their fingerprints and cache keys (see ``_OPTIONAL``)."""
    d = asdict(self)
    for name, off in getattr(self, "_OPTIONAL", {}).items():
        if d.get(name) == off:
            d.pop(name)
    return d


@dataclass
class QuantConfig:
    bits: int = 4
    group_size: int = 32
    method: str = "rtn"
    # clip search: per group, the clip ratio (and least-squares scale and offset) with the least
    # weight error instead of plain min-max (qalora.method.quant.quantize_rtn; GPTQ's own grid search)
    clip: bool = False
    _OPTIONAL = {"clip": False}

    def __post_init__(self):
        if self.bits not in VALID_BITS:
            raise ConfigError(f"bits={self.bits} is not supported; choose one of {list(VALID_BITS)}.")
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ConfigError(f"group_size={self.group_size} is invalid; use a divisor of the layers' "
                              "in_features such as 32, 64 or 128.")
        if self.method not in QUANT_METHODS:
            raise ConfigError(f"quantization method {self.method!r} is unknown; choose 'rtn' or 'gptq'.")
        self.clip = bool(self.clip)

    to_dict = _to_dict
    from_dict = classmethod(_from_dict)


def group_size_fits(in_features: int, group_size: int) -> bool:
    """The rule: groups of ``group_size`` consecutive inputs tile a row of ``in_features`` exactly."""
    return in_features % group_size == 0


def valid_group_sizes(*in_features: int, candidates=GROUP_SIZES) -> list[int]:
    """The ``candidates`` that fit every one of ``in_features`` (one layer's width, or a model's)."""
    return [g for g in candidates if all(group_size_fits(i, g) for i in in_features)]


def check_group_size(in_features: int, group_size: int, layer: str = "layer") -> None:
    """Raise a ConfigError naming the layer when ``group_size`` does not divide ``in_features``.

    The one check of a group size against a layer; the job form (by the layer widths it knows),
    ``qalora.method.quant.quantize_rtn`` (where packed tensors are made), GPTQ and the streaming
    loader all ask it."""
    if not group_size_fits(in_features, group_size):
        valid = valid_group_sizes(in_features) or [d for d in range(2, in_features + 1)
                                                   if group_size_fits(in_features, d)][:8]
        raise ConfigError(
            f"group_size={group_size} does not divide in_features={in_features} of {layer}; "
            f"valid group sizes for this model include {valid}.")
    if in_features % 8:
        raise ConfigError(f"{layer} has in_features={in_features}, not a multiple of 8; "
                          "bit-packing needs whole bytes per row.")


@dataclass
class AdapterConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    # qalora: group-pooled adapter, exact merge. qlora-ptq: the baseline (full-width LoRA on the
    # same quantized base, merged in 16 bits, then quantized again).
    method: str = "qalora"
    # learned scales: every quantized linear's per-group scales trained too (their own learning
    # rate, no weight decay); the codes stay frozen, so the merge stays exact
    train_scales: bool = False
    scales_lr: float = 5e-5
    # what is learned: every per-group scale ("group"), or one factor per output row on them ("channel")
    scales_granularity: str = "group"
    _OPTIONAL = {"train_scales": False}

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.method not in ADAPTER_METHODS:
            raise ConfigError(f"adapter method {self.method!r} is unknown; choose one of {list(ADAPTER_METHODS)}.")
        if self.rank < 1:
            raise ConfigError(f"rank={self.rank} must be at least 1 (typical: 8 to 64).")
        if self.alpha <= 0:
            raise ConfigError(f"alpha={self.alpha} must be positive (typical: 2 x rank).")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1).")
        if not self.targets:
            raise ConfigError("targets is empty; name at least one linear layer such as 'q_proj'.")
        self.train_scales = bool(self.train_scales)
        if self.train_scales and self.method != "qalora":
            raise ConfigError("learned scales (train_scales) are a QA-LoRA option: the baseline's merge "
                              "quantizes again, so there is no scale to keep. Use method 'qalora' or turn "
                              "train_scales off.")
        if self.scales_granularity not in SCALE_GRANULARITIES:
            raise ConfigError(f"scales_granularity {self.scales_granularity!r} is unknown; choose one of "
                              f"{list(SCALE_GRANULARITIES)}.")
        if not self.scales_lr > 0:
            raise ConfigError(f"scales_lr={self.scales_lr} must be positive (typical: 1e-5 to 1e-4).")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = _to_dict(self)
        if not self.train_scales:  # these mean nothing without learned scales
            d.pop("scales_lr")
            d.pop("scales_granularity")
        return d

    @property
    def method_name(self) -> str:
        """How the run is named where it is shown (Jobs, Compare, the card)."""
        if self.method != "qalora":
            return "LoRA + PTQ"
        if not self.train_scales:
            return "QA-LoRA"
        return "QA-LoRA + learned scales" + (" (per row)" if self.scales_granularity == "channel" else "")
    from_dict = classmethod(_from_dict)


def method_label(quant, adapter) -> str:
    """How a run is named wherever it is shown (Jobs, Compare, the card): the adapter method, learned
    scales, the quantizer and the clip search, e.g. ``QA-LoRA + learned scales (RTN + clip search)``.
    ``quant`` and ``adapter`` are the configs or their dicts (a job's spec)."""
    q = quant if isinstance(quant, QuantConfig) else QuantConfig.from_dict(quant or {})
    a = adapter if isinstance(adapter, AdapterConfig) else AdapterConfig.from_dict(adapter or {})
    return f"{a.method_name} ({q.method.upper()}{' + clip search' if q.clip else ''})"


# Per-bit-width defaults of the form and the CLI (a user's own values win), chosen by the sweep in
# bench/low_bits.py on the default model and the built-in data (README, "Low bits").
BIT_PRESETS = {
    2: {"lr": 5e-4, "rank": 16, "alpha": 32.0, "clip": True, "train_scales": True, "scales_lr": 5e-5},
    3: {"lr": 2e-4, "rank": 16, "alpha": 32.0, "clip": True, "train_scales": True, "scales_lr": 5e-5},
    4: {"lr": 2e-4, "rank": 16, "alpha": 32.0, "clip": False, "train_scales": False, "scales_lr": 5e-5},
    8: {"lr": 2e-4, "rank": 16, "alpha": 32.0, "clip": False, "train_scales": False, "scales_lr": 5e-5},
}


def preset_for(bits: int) -> dict:
    """The preset for ``bits``: lr, rank, alpha, clip search, learned scales and their lr."""
    if bits not in BIT_PRESETS:
        raise ConfigError(f"bits={bits} is not supported; choose one of {list(VALID_BITS)}.")
    return dict(BIT_PRESETS[bits])


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    grad_checkpointing: bool = False
    eval_every: int = 25
    eval_batches: int = 8
    save_every: int = 25
    seed: int = 0
    eval_fraction: float = 0.1
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "save_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.seq_len < 8:
            raise ConfigError(f"seq_len={self.seq_len} is too short; use at least 8 tokens (typical: 256-2048).")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be positive (typical: 1e-4 to 3e-4).")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be 0 or more.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} is unknown; choose 'cosine' or 'constant'.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is unknown; choose one of {list(DTYPES)}.")
        if not 0.0 < self.eval_fraction < 0.5:
            raise ConfigError(f"eval_fraction={self.eval_fraction} must be between 0 and 0.5.")

    to_dict = asdict
    from_dict = classmethod(_from_dict)


@dataclass
class StepInfo:
    """What the training loop reports after every optimizer step (see ``train(on_step=...)``)."""
    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_s: float
    elapsed_s: float
    eval_loss: float | None = None
    tokens_seen: int = 0  # training tokens (not padding) in all steps so far, this one included
    extra: dict = field(default_factory=dict)
