"""GPTQ export of a merged low-bit model, with the logit cost of GPTQ's integer zero points.

Our merged weight is ``w = scale * q + offset`` with a float ``offset`` (the adapter was folded
into it); GPTQ stores ``w = scale * (q - zero)`` with an integer ``zero`` in ``[0, 2^bits - 1]``
and float16 scales. The codes ``q`` carry over exactly; each group's ``(scale, offset)`` must be
replaced by some ``(scale', zero)``. Rounding ``zero = round(-offset / scale)`` moves every weight
of the group by up to half a step, and clamps where the merge pushed the offset out of range. We
instead pick, per group, the integer zero and the scale that minimize the squared weight error
over the group's actual codes (a closed-form least-squares fit; plain rounding is one of the
candidates, so the fit is never worse in weight error). Smaller weight error does not always
mean closer logits, so by default both are built and the one closer to the exact model on a
fixed text is written. What remains is measured on the logits and written to
``export_report.json`` next to the checkpoint. On small models the cost can be large even at 4
bits; it is about what re-quantizing the same weights with integer zeros from scratch costs, and it
is why the float-offset formats (native, GGUF Q4_1) are the lossless ones.

Zero points are kept in ``[1, 2^bits - 1]``. A v1 ("gptq") checkpoint stores ``zero - 1``; with
zero 0 that is -1, which gptqmodel >= 0.9 writes as a borrow across the packed word while older
readers (AutoGPTQ, vLLM's kernels) decode field by field and get the neighbour wrong. Without
zero 0 there is no borrow and every v1 reader decodes the same integers. gptqmodel still refuses
asymmetric v1 checkpoints unless ``meta.quantizer`` names gptqmodel >= 0.9 (its guard against
AutoGPTQ's old files), so the config records the gptqmodel version whose layout we write.

Output layout (what gptqmodel 7.6 writes and loads, and transformers' GPTQ quantizer reads)::

    config.json             the model config with a GPTQ ``quantization_config``
    quantize_config.json    the same settings, for gptqmodel / AutoGPTQ-era tools
    model.safetensors       ``<layer>.qweight/.qzeros/.scales/.g_idx``; all other tensors as saved
    tokenizer files, export_report.json
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from qalora.deployment.export.native import WEIGHTS, float_state, load_quantized, read_quant_config
from qalora.errors import ConfigError, ModelError
from qalora.method.gptq import to_gptq_tensors
from qalora.method.quant import unpack_codes

CHECKPOINT_FORMAT = "gptq"  # v1: qzeros hold zero - 1, read by every GPTQ runtime
LAYOUT_OF = "gptqmodel:7.6.0"  # the packer whose bit layout qalora.method.gptq reproduces
MIN_ZERO = 1  # see the module docstring: no zero 0, so no borrow in v1 qzeros
REPORT = "export_report.json"
ZERO_POINTS = ("auto", "fit", "round")
# Fixed text the exported model is checked on; chat-rendered so template tokens are covered too.
CHECK_MESSAGES = (
    [{"role": "user", "content": "Make a contact card: Meet Amara Okafor, a 34-year-old from Lisbon."},
     {"role": "assistant", "content": '{"name": "Amara Okafor", "age": 34, "city": "Lisbon"}'}],
    [{"role": "user", "content": "Explain in one sentence why the sky is blue."},
     {"role": "assistant", "content": "Air molecules scatter short blue wavelengths far more than red."}],
)
FIT_WINDOW = 2  # zero points tried on each side of the rounded one
# Scales below float16's smallest subnormal would be stored as 0, and GPTQ writes zero point 0 for
# a zero scale; raising them to it keeps every zero >= 1 and costs at most 2^-24 * 2^bits per weight.
FP16_TINY = 2.0 ** -24


def fit_zero_points(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``(scale', zero)`` with integer ``zero`` for fixed codes: ``w ~ scale' * (q - zero)``.

    For each candidate ``z`` the least-squares scale is ``s'(z) = sum((q - z) w) / sum((q - z)^2)``
    with residual ``sum(w^2) - sum((q - z) w)^2 / sum((q - z)^2)``; the candidate with the
    smallest residual wins. Candidates are the rounded zero point and its neighbours within
    ``FIT_WINDOW``, kept in ``[1, 2^bits - 1]``: a zero further away would have to be paid for by
    a scale far from the original. Since ``w = scale * q + offset`` within a group, every sum
    follows from the group's ``sum(q)`` and ``sum(q^2)``: one pass over the codes.

    Args:
        codes: uint8 ``(out, in)``; scale, offset: float ``(out, groups)``.
    Returns:
        ``(scale', zero)``, float32 ``(out, groups)``; ``zero`` holds integers.
    """
    out_f, groups = scale.shape
    q = codes.to(torch.int32).reshape(out_f, groups, -1)
    n = q.shape[-1]
    # float64: the residual is a small difference of large sums at 8 bits.
    sq, sqq = q.sum(-1).double()[..., None], (q * q).sum(-1).double()[..., None]  # exact
    s, o = scale.double()[..., None], offset.double()[..., None]
    sw, sqw, sww = s * sq + n * o, s * sqq + o * sq, s * s * sqq + 2 * s * o * sq + n * o * o
    center = round_zero_points(scale, offset, bits)[1].double()[..., None]
    z = (center + torch.arange(-FIT_WINDOW, FIT_WINDOW + 1, dtype=torch.float64)).clamp(MIN_ZERO, 2 ** bits - 1)
    num = sqw - z * sw                       # sum((q - z) w)
    den = sqq - 2 * z * sq + n * z * z       # sum((q - z)^2); 0 only if every q == z
    safe = den.clamp_min(1e-30)
    resid = torch.where(den > 0, sww - num * num / safe, sww)
    best = resid.argmin(-1, keepdim=True)
    new_scale = torch.where(den > 0, num / safe, 0).gather(-1, best)[..., 0]
    return _storable(new_scale.float()), z.gather(-1, best)[..., 0].float()


def round_zero_points(scale: torch.Tensor, offset: torch.Tensor, bits: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain rounding: ``(scale, clamp(round(-offset / scale), 1, 2^bits - 1))``."""
    safe = torch.where(scale == 0, 1.0, scale)
    return _storable(scale.float()), torch.round(-offset / safe).clamp(MIN_ZERO, 2 ** bits - 1).float()


def _storable(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale.abs() < FP16_TINY, FP16_TINY, scale)


def _quantized_layers(src: Path, qc: dict, bits: int) -> tuple[dict, dict]:
    """The native checkpoint's float tensors and, per quantized layer, its uint8 codes ``(out, in)``
    and float ``(out, groups)`` scale and offset: ``(rest, layers)``."""
    from safetensors.torch import load_file

    state = float_state(load_file(src / WEIGHTS))
    layers = {}
    for name in qc["modules"]:
        packed = state.pop(f"{name}.packed")
        codes = unpack_codes(packed, bits, packed.shape[1] * 8 // bits)
        if codes.shape[0] % 32 or codes.shape[1] % 32:
            raise ConfigError(f"{name} is {codes.shape[1]} -> {codes.shape[0]}; GPTQ packs 32 values "
                              "per word and needs both sizes divisible by 32. Use the native or GGUF "
                              "export for this model.")
        layers[name] = (codes, state.pop(f"{name}.scale").float(), state.pop(f"{name}.offset").float())
    return state, layers


def _measure_zero_points(src: Path, layers: dict, bits: int, modes: tuple[str, ...], check_tokens: int,
                         on_progress) -> dict:
    """For each zero-point method in ``modes``: its ``(scale', zero)`` per layer and the logit gap
    (:func:`logit_gap`) of what a GPTQ reader computes from them to the exact model."""
    exact, tokenizer = load_quantized(src, use_kernel=False)
    stored = fp16_rest(exact)  # what the file holds besides the quantized layers: fp16, as GPTQ files do
    ids = check_ids(tokenizer, check_tokens)
    reference = logits_of(exact, ids)
    tried = {}
    for mode in modes:
        groups = {name: fit_zero_points(codes, scale, offset, bits) if mode == "fit"
                  else round_zero_points(scale, offset, bits)
                  for name, (codes, scale, offset) in layers.items()}
        # What a GPTQ reader computes from the file: w = fp16(scale) * (q - zero).
        exported = {name: (s.half().float(), -s.half().float() * z) for name, (s, z) in groups.items()}
        tried[mode] = (groups, logit_gap(reference, logits_of(with_offsets(stored, exported), ids)))
        if on_progress:
            on_progress(len(tried), len(modes) + 1)
    return tried


def _write_gptq(src: Path, out: Path, state: dict, layers: dict, groups: dict, bits: int, group_size: int) -> None:
    """The GPTQ checkpoint: tensors, both configs, and the model's other files (tokenizer...)."""
    from safetensors.torch import save_file

    # embeddings, norms, lm_head, biases: in fp16 (the measured model holds them so too)
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    for name, (new_scale, zero) in groups.items():
        parts = to_gptq_tensors(layers[name][0], new_scale, -new_scale * zero, bits, group_size,
                                CHECKPOINT_FORMAT, scales_dtype=torch.float16)
        tensors.update({f"{name}.{k}": v for k, v in parts.items()})
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    quant = gptq_quantization_config(bits, group_size)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "quantize_config.json").write_text(json.dumps(quant, indent=2))
    for path in src.iterdir():
        if path.is_file() and path.name not in ("config.json", WEIGHTS, REPORT):
            shutil.copy2(path, out / path.name)


def export_gptq(model_dir, out_dir, zero_points: str = "auto", check_tokens: int = 256, on_progress=None) -> dict:
    """Write the merged model in ``model_dir`` (native format) as a GPTQ checkpoint in ``out_dir``.

    Args:
        zero_points: "fit" (:func:`fit_zero_points`), "round" (:func:`round_zero_points`) or
            "auto": build both and keep the one whose logits on the check text are closer to the
            exact model's (by mean |diff|). Neither wins everywhere: the fit minimizes the weight
            error, but activations with outlier channels weight some inputs far more than others.
        check_tokens: at most this many tokens per check sequence.
        on_progress: ``(done, total)`` after each zero-point method is measured and after the write.
    Returns:
        The report (also written to ``out_dir/export_report.json``): ``max_abs_logit_diff`` and
        ``mean_abs_logit_diff`` between the exported model, dequantized exactly from the written
        tensors (float16 scales included), and the exact merged model on fixed text, plus
        ``top1_agreement``, the fraction of positions whose most likely next token is unchanged;
        ``alternatives`` holds the same numbers for each zero-point method tried.
    """
    if zero_points not in ZERO_POINTS:
        raise ConfigError(f"zero_points={zero_points!r} is unknown; choose one of {list(ZERO_POINTS)}.")
    src, out = Path(model_dir), Path(out_dir)
    qc = read_quant_config(src)
    bits, group_size = int(qc["bits"]), int(qc["group_size"])
    if not any(src.glob("tokenizer*")):
        raise ModelError(f"{src} has no tokenizer files; GPTQ loaders (gptqmodel) need the tokenizer "
                         "next to the model, so export from a 'merged' folder written by a job.")
    state, layers = _quantized_layers(src, qc, bits)
    modes = ("fit", "round") if zero_points == "auto" else (zero_points,)
    tried = _measure_zero_points(src, layers, bits, modes, check_tokens, on_progress)
    chosen = min(tried, key=lambda m: tried[m][1]["mean_abs_logit_diff"])
    groups, gap = tried[chosen]
    _write_gptq(src, out, state, layers, groups, bits, group_size)
    report = {"format": "gptq", "checkpoint_format": CHECKPOINT_FORMAT, "bits": bits,
              "group_size": group_size, "modules": len(layers), "zero_points": chosen, **gap,
              "alternatives": {mode: g for mode, (_, g) in tried.items()}}
    (out / REPORT).write_text(json.dumps(report, indent=2))
    if on_progress:
        on_progress(len(modes) + 1, len(modes) + 1)
    return report


def gptq_quantization_config(bits: int, group_size: int) -> dict:
    """The ``quantization_config`` both gptqmodel and transformers' GPTQ quantizer accept."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False,
            "sym": False, "lm_head": False, "format": CHECKPOINT_FORMAT,
            "checkpoint_format": CHECKPOINT_FORMAT, "pack_dtype": "int32",
            "meta": {"quantizer": ["qalora-studio:1", LAYOUT_OF]}}


def fp16_rest(model):
    """A copy of ``model`` whose weights outside the quantized layers (embeddings, norms, head: its
    parameters, the quantized layers hold buffers) are rounded to fp16."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for t in model.parameters():
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model


def with_offsets(model, groups: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """A copy of ``model`` whose ``QuantLinear`` layers keep their codes but take the given
    ``(scale, offset)``, each ``(out, groups)``."""
    model = copy.deepcopy(model)
    for name, (scale, offset) in groups.items():
        layer = model.get_submodule(name)
        layer.scale, layer.offset = scale.float().contiguous(), offset.float().contiguous()
    return model


def check_ids(tokenizer, max_tokens: int = 256) -> list[torch.Tensor]:
    """Token ids ``(1, T)`` of :data:`CHECK_MESSAGES`, chat-rendered when there is a template."""
    out, chat = [], bool(getattr(tokenizer, "chat_template", None))
    for messages in CHECK_MESSAGES:
        if chat:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        else:
            text = "\n\n".join(m["content"] for m in messages)
        # A chat template writes its own leading special tokens; plain text gets the tokenizer's.
        ids = tokenizer(text, add_special_tokens=not chat)["input_ids"][:max_tokens]
        out.append(torch.tensor([ids], dtype=torch.long))
    return out


@torch.no_grad()
def logits_of(model, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    """float32 logits ``(1, T, V)`` of each sequence."""
    return [model(input_ids=x).logits.float() for x in ids]


def logit_gap(reference: list[torch.Tensor], logits: list[torch.Tensor]) -> dict:
    """Max and mean ``|logits - reference|`` and top-1 agreement over every position."""
    diffs = torch.cat([(a - b).abs().flatten() for a, b in zip(reference, logits)])
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, logits))
    total = sum(a.shape[0] * a.shape[1] for a in reference)
    return {"max_abs_logit_diff": diffs.max().item(), "mean_abs_logit_diff": diffs.mean().item(),
            "top1_agreement": agree / total, "check_tokens": total}
