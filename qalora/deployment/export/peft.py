"""The QA-LoRA adapter as an ordinary PEFT LoRA adapter, and the float base it applies to.

QA-LoRA's ``lora_A`` (``r x groups``) acts on the group-pooled input ``pool(x)[g] = sum_{i in g}
x_i``. Repeating each of its columns ``group_size`` times gives a full-width ``A'`` (``r x in``)
with ``A' x = A pool(x)`` for every ``x``: the same layer output, exactly, from a plain LoRA that
PEFT loads as is. Dropout differs (PEFT drops inputs before ``A'``, QA-LoRA dropped pooled
inputs), which matters only for further training, never for inference.

The adapter was trained on the *quantized* base. Applied to the original float model it gives a
different (usually close) model; applied to the quantized base's dequantized weights it gives
exactly the trained model. :func:`export_dequantized_base` writes that base as a float
transformers checkpoint, recovered from the merged low-bit model by subtracting the adapter
from the offsets (``offset_base = offset_merged - s * B @ A``, exact up to float32 rounding).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from qalora.deployment.export.adapter import CONFIG, WEIGHTS
from qalora.deployment.export.native import WEIGHTS as NATIVE_WEIGHTS, float_state, read_quant_config
from qalora.errors import ModelError
from qalora.method.layer import LoRALinear, LowRankOnQuantized
from qalora.method.quant import dequantize, unpack_codes

PREFIX = "base_model.model."  # where PEFT's PeftModel keeps the wrapped model
README = "README.md"


def expand_lora_A(lora_A: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(r, in // group_size)`` -> ``(r, in)`` with ``expanded @ x == lora_A @ pool(x)``."""
    return lora_A.repeat_interleave(group_size, dim=1)


def export_peft_adapter(source, out_dir, base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT LoRA adapter (``adapter_model.safetensors``, ``adapter_config.json``, README).

    Args:
        source: our adapter directory (written by ``save_adapter``) or a model holding
            ``QALoRALinear`` layers.
        base_model_name_or_path: recorded in the config for ``AutoPeftModel``; defaults to the
            base the adapter directory names.
    Returns:
        ``out_dir``.
    """
    if isinstance(source, nn.Module):
        layers, settings = _from_model(source)
    else:
        layers, settings = _from_dir(Path(source))
        base_model_name_or_path = base_model_name_or_path or settings["base"]
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (lora_A, lora_B) in layers.items():
        # The baseline (qlora-ptq) already has a full-width lora_A: it is a plain LoRA as it is.
        repeat = settings["group_size"] if settings["method"] == "qalora" else 1
        tensors[f"{PREFIX}{name}.lora_A.weight"] = expand_lora_A(lora_A, repeat).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = lora_B.contiguous()
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    config = _lora_config(settings, sorted({name.rsplit(".", 1)[-1] for name in layers}), base_model_name_or_path)
    config.save_pretrained(str(out))
    (out / README).write_text(_readme(config, settings["group_size"], settings["method"], settings["train_scales"]))
    return out


def _lora_config(settings: dict, target_modules: list[str], base_model_name_or_path: str | None):
    """PEFT's own ``LoraConfig``, so ``adapter_config.json`` has every field the installed PEFT writes."""
    from peft import LoraConfig

    config = LoraConfig(task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
                        r=settings["r"], lora_alpha=settings["lora_alpha"], lora_dropout=settings["lora_dropout"],
                        target_modules=target_modules, bias="none", fan_in_fan_out=False, use_rslora=False,
                        use_dora=False, inference_mode=True, modules_to_save=None)
    # LoraConfig keeps target_modules as a set, written in hash order: a sorted list makes the file reproducible
    config.target_modules = target_modules
    return config


def _from_model(model: nn.Module):
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankOnQuantized)}
    if not layers:
        raise ModelError("this model has no QA-LoRA layers; pass the trained model before merging, "
                         "or the job's 'adapter' folder.")
    first = next(iter(layers.values()))
    ranks = {m.rank for m in layers.values()}
    if len(ranks) > 1:
        raise ModelError(f"the QA-LoRA layers have different ranks {sorted(ranks)}; one adapter "
                         "config can hold only one rank.")
    if len({type(m) for m in layers.values()}) > 1:
        raise ModelError("the model mixes QA-LoRA and plain LoRA layers; one adapter holds one kind.")
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    settings = {"r": first.rank, "lora_alpha": first.scaling * first.rank, "lora_dropout": dropout,
                "group_size": first.group_size, "method": "qlora-ptq" if isinstance(first, LoRALinear) else "qalora",
                "train_scales": bool(getattr(first, "train_scales", False))}
    return {n: (m.lora_A.detach().float().cpu(), m.lora_B.detach().float().cpu())
            for n, m in layers.items()}, settings


def _from_dir(adapter_dir: Path):
    from safetensors.torch import load_file

    config_path = adapter_dir / CONFIG
    if not config_path.is_file() or not (adapter_dir / WEIGHTS).is_file():
        raise ModelError(f"{adapter_dir} has no {CONFIG} and {WEIGHTS}; point to the 'adapter' "
                         "folder a training job wrote.")
    config = json.loads(config_path.read_text())
    if config.get("adapter_type") != "qalora":
        raise ModelError(f"{adapter_dir} is not a QA-LoRA adapter (adapter_type="
                         f"{config.get('adapter_type')!r}); a PEFT adapter needs no conversion.")
    state = load_file(adapter_dir / WEIGHTS)
    names = sorted(k[:-len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight"))
    layers = {n: (state[f"{n}.lora_A.weight"].float(), state[f"{n}.lora_B.weight"].float()) for n in names}
    settings = {"r": config["r"], "lora_alpha": config["lora_alpha"],
                "lora_dropout": config.get("lora_dropout", 0.0), "group_size": config["group_size"],
                "base": config.get("base_model"), "method": config.get("method", "qalora"),
                "train_scales": bool(config.get("train_scales"))}
    return layers, settings


def export_dequantized_base(merged_dir, adapter_dir, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """Write the quantized base the adapter was trained on as a float transformers checkpoint.

    ``W = scale * q + (offset_merged - s * B @ A)`` per group: the same weights the QA-LoRA
    layers held before merging. Load it with ``AutoModelForCausalLM.from_pretrained(out_dir)``
    and apply the adapter from :func:`export_peft_adapter` to get the trained model.
    """
    from safetensors.torch import load_file, save_file

    merged_dir, out = Path(merged_dir), Path(out_dir)
    layers, settings = _from_dir(Path(adapter_dir))
    if settings["method"] != "qalora":
        raise ModelError(f"{adapter_dir} is a {settings['method']} (baseline) adapter: its merged model was "
                         "re-quantized after a 16-bit merge, so the base it was trained on cannot be recovered "
                         "from it. Export the PEFT adapter alone and apply it to the original float base.")
    qc = read_quant_config(merged_dir)
    mismatch = sorted(set(qc["modules"]) ^ set(layers))
    if mismatch:
        raise ModelError(f"the adapter in {adapter_dir} and the model in {merged_dir} cover different "
                         f"layers (e.g. {mismatch[:3]}); use the 'merged' and 'adapter' folders of one job.")
    scaling = settings["lora_alpha"] / settings["r"]
    bits = qc["bits"]
    state = float_state(load_file(merged_dir / NATIVE_WEIGHTS))
    tensors = {}
    for name, (lora_A, lora_B) in layers.items():
        packed, scale = state.pop(f"{name}.packed"), state.pop(f"{name}.scale").float()
        offset = state.pop(f"{name}.offset").float() - scaling * (lora_B @ lora_A)
        codes = unpack_codes(packed, bits, packed.shape[1] * 8 // bits)
        tensors[f"{name}.weight"] = dequantize(codes, scale, offset).to(dtype)
    tensors.update({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / NATIVE_WEIGHTS, metadata={"format": "pt"})
    config = json.loads((merged_dir / "config.json").read_text())
    del config["quantization_config"]
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for path in merged_dir.iterdir():
        if path.is_file() and path.name not in ("config.json", NATIVE_WEIGHTS):
            shutil.copy2(path, out / path.name)
    return out


def _readme(config, group_size: int, method: str = "qalora", train_scales: bool = False) -> str:
    base = config.base_model_name_or_path or "<the dequantized base folder>"
    learned = ("; this run also learned the quantization scales, which the adapter does not hold, so "
               "use the dequantized base (it has them)" if train_scales else "")
    if method != "qalora":
        return f"""# LoRA adapter (QA-LoRA Studio's LoRA+PTQ baseline) in PEFT format

Rank {config.r}, alpha {config.lora_alpha}, target modules {', '.join(config.target_modules)}.
A plain full-width LoRA trained on the {group_size}-group quantized base (QLoRA-style): PEFT loads it
as is. It reproduces the trained model on the dequantized quantized base, and gives a close but
different model on the original float base:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
```
"""
    return f"""# QA-LoRA adapter in PEFT LoRA format

Rank {config.r}, alpha {config.lora_alpha}, target modules {', '.join(config.target_modules)}.
Trained with QA-LoRA (Xu et al. 2023) on a {group_size}-group quantized base.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
```

**Which base.** The adapter was trained on the *quantized* base model, whose weights are
`scale * q + offset` per group of {group_size} inputs. Applied to exactly those weights
(dequantized to float; QA-LoRA Studio exports them as "dequantized base") it reproduces the
trained model to float rounding. Applied to the original float model it gives a close but
different model{learned}.

**How it was converted.** QA-LoRA's `lora_A` has one column per quantization group and sees the
input summed within each group. Here every column is repeated {group_size} times, which gives
exactly the same output on the full input, so PEFT needs nothing special. Merging it into a float
base gives a float model; for the low-bit model with the adapter merged exactly, use the
QA-LoRA Studio native, GGUF or GPTQ export instead.
"""
