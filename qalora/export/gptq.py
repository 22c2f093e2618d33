"""GPTQ export of a merged low-bit model, with the logit cost of GPTQ's integer zero points.

Our merged weight is ``w = scale * q + offset`` with a float ``offset`` (the adapter was folded
into it); GPTQ stores ``w = scale * (q - zero)`` with an integer ``zero`` in ``[0, 2^bits - 1]``
and float16 scales. The codes ``q`` carry over exactly; each group's ``(scale, offset)`` must be
replaced by some ``(scale', zero)``. Rounding ``zero = round(-offset / scale)`` moves every weight
of the group by up to half a step, and clamps where the merge pushed the offset out of range. We
instead pick, per group, the integer zero and the scale that minimize the squared weight error
over the group's actual codes (a closed-form least-squares fit; plain rounding is one of the
candidates, so the fit is never worse). What remains is measured on the model's logits and
written to ``export_report.json`` next to the checkpoint.

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

from ..errors import ModelError
from ..gptq import from_gptq_tensors, to_gptq_tensors
from ..quant import from_codes, unpack_codes
from .native import WEIGHTS, load_quantized, read_quant_config

CHECKPOINT_FORMAT = "gptq"  # v1: qzeros hold zero - 1, read by every GPTQ runtime
LAYOUT_OF = "gptqmodel:7.6.0"  # the packer whose bit layout qalora.gptq reproduces
MIN_ZERO = 1  # see the module docstring: no zero 0, so no borrow in v1 qzeros
REPORT = "export_report.json"
# Fixed text the exported model is checked on; chat-rendered so template tokens are covered too.
CHECK_MESSAGES = (
    [{"role": "user", "content": "Make a contact card: Meet Amara Okafor, a 34-year-old from Lisbon."},
     {"role": "assistant", "content": '{"name": "Amara Okafor", "age": 34, "city": "Lisbon"}'}],
    [{"role": "user", "content": "Explain in one sentence why the sky is blue."},
     {"role": "assistant", "content": "Air molecules scatter short blue wavelengths far more than red."}],
)
_FIT_CHUNK = 1 << 24  # candidate-table entries per chunk of rows in the zero-point search


def fit_zero_points(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``(scale', offset' = -scale' * zero)`` with integer ``zero`` for fixed codes.

    For each group and each candidate ``z`` in ``[1, 2^bits - 1]`` the least-squares scale is
    ``s'(z) = sum((q - z) w) / sum((q - z)^2)`` with residual ``sum(w^2) - sum((q - z) w)^2 /
    sum((q - z)^2)``; the candidate with the smallest residual wins. Only per-group sums of
    ``q, q^2, w, q w, w^2`` are needed, so the search costs ``O(out * groups * 2^bits)``.

    Args:
        codes: uint8 ``(out, in)``; scale, offset: float ``(out, groups)``.
    Returns:
        ``(scale', offset')``, float32 ``(out, groups)``; ``-offset' / scale'`` is an integer.
    """
    out_f, groups = scale.shape
    q = codes.float().reshape(out_f, groups, -1)
    w = scale.float()[..., None] * q + offset.float()[..., None]
    n = q.shape[-1]
    sums = [t.double() for t in (q.sum(-1), (q * q).sum(-1), w.sum(-1), (q * w).sum(-1), (w * w).sum(-1))]
    z = torch.arange(MIN_ZERO, 2 ** bits, dtype=torch.float64)
    rows = max(1, _FIT_CHUNK // (groups * z.numel()))
    new_scale, new_zero = torch.empty(out_f, groups), torch.empty(out_f, groups)
    for lo in range(0, out_f, rows):
        sq, sqq, sw, sqw, sww = (t[lo:lo + rows, :, None] for t in sums)
        num = sqw - z * sw                       # sum((q - z) w)
        den = sqq - 2 * z * sq + n * z * z       # sum((q - z)^2); 0 only if every q == z
        safe = den.clamp_min(1e-30)
        resid = torch.where(den > 0, sww - num * num / safe, sww)
        best = resid.argmin(-1, keepdim=True)
        new_scale[lo:lo + rows] = torch.where(den > 0, num / safe, 0).gather(-1, best)[..., 0].float()
        new_zero[lo:lo + rows] = z[best[..., 0]].float()
    return new_scale, -new_scale * new_zero


def round_zero_points(scale: torch.Tensor, offset: torch.Tensor, bits: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain rounding: ``zero = clamp(round(-offset / scale), 1, 2^bits - 1)``, scale kept."""
    safe = torch.where(scale == 0, 1.0, scale)
    zero = torch.round(-offset / safe).clamp(MIN_ZERO, 2 ** bits - 1)
    return scale.float(), -scale.float() * zero


def export_gptq(model_dir, out_dir, fit: bool = True, check_tokens: int = 256) -> dict:
    """Write the merged model in ``model_dir`` (native format) as a GPTQ checkpoint in ``out_dir``.

    Args:
        fit: choose zero points and scales by :func:`fit_zero_points`; ``False`` only rounds
            ``-offset / scale`` (kept to show what the fit buys).
        check_tokens: at most this many tokens per check sequence.
    Returns:
        The report (also written to ``out_dir/export_report.json``): ``max_abs_logit_diff`` and
        ``mean_abs_logit_diff`` between the exported model, dequantized exactly from the written
        tensors (float16 scales included), and the exact merged model on fixed text, plus
        ``top1_agreement``, the fraction of positions whose most likely next token is unchanged.
    """
    from safetensors.torch import load_file, save_file

    src, out = Path(model_dir), Path(out_dir)
    qc = read_quant_config(src)
    bits, group_size = int(qc["bits"]), int(qc["group_size"])
    if not any(src.glob("tokenizer*")):
        raise ModelError(f"{src} has no tokenizer files; GPTQ loaders (gptqmodel) need the tokenizer "
                         "next to the model, so export from a 'merged' folder written by a job.")
    state = load_file(src / WEIGHTS)
    tensors, dequant = {}, {}
    for name in qc["modules"]:
        packed = state.pop(f"{name}.packed")
        scale, offset = state.pop(f"{name}.scale").float(), state.pop(f"{name}.offset").float()
        codes = unpack_codes(packed, bits, packed.shape[1] * 8 // bits)
        scale, offset = (fit_zero_points(codes, scale, offset, bits) if fit
                         else round_zero_points(scale, offset, bits))
        parts = to_gptq_tensors(codes, scale, offset, bits, group_size, CHECKPOINT_FORMAT,
                                scales_dtype=torch.float16)
        tensors.update({f"{name}.{k}": v for k, v in parts.items()})
        dequant[name] = from_gptq_tensors(**parts, bits=bits, group_size=group_size,
                                          checkpoint_format=CHECKPOINT_FORMAT)
    tensors.update(state)  # embeddings, norms, lm_head, biases: unchanged
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

    exact, tokenizer = load_quantized(src, use_kernel=False)
    report = {"format": "gptq", "checkpoint_format": CHECKPOINT_FORMAT, "bits": bits,
              "group_size": group_size, "modules": len(dequant),
              "zero_points": "least-squares fit (codes kept)" if fit else "rounded (codes kept)",
              **logit_gap(exact, with_weights(exact, dequant), check_ids(tokenizer, check_tokens))}
    (out / REPORT).write_text(json.dumps(report, indent=2))
    return report


def gptq_quantization_config(bits: int, group_size: int) -> dict:
    """The ``quantization_config`` both gptqmodel and transformers' GPTQ quantizer accept."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False,
            "sym": False, "lm_head": False, "format": CHECKPOINT_FORMAT,
            "checkpoint_format": CHECKPOINT_FORMAT, "pack_dtype": "int32", "true_sequential": True,
            "meta": {"quantizer": ["qalora-studio:1", LAYOUT_OF]}}


def with_weights(model, weights: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """A copy of ``model`` whose ``QuantLinear`` layers take the given ``(codes, scale, offset)``."""
    from ..infer import QuantLinear
    from ..model import set_module

    model = copy.deepcopy(model)
    for name, (codes, scale, offset) in weights.items():
        old = model.get_submodule(name)
        set_module(model, name, QuantLinear(from_codes(codes, scale, offset, old.bits), old.bias,
                                            use_kernel=False))
    return model


def check_ids(tokenizer, max_tokens: int = 256) -> list[torch.Tensor]:
    """Token ids ``(1, T)`` of :data:`CHECK_MESSAGES`, chat-rendered when there is a template."""
    out = []
    for messages in CHECK_MESSAGES:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        else:
            text = "\n\n".join(m["content"] for m in messages)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens]
        out.append(torch.tensor([ids], dtype=torch.long))
    return out


@torch.no_grad()
def logit_gap(reference, model, ids: list[torch.Tensor]) -> dict:
    """Max and mean ``|logits - reference logits|`` and top-1 agreement over every position."""
    diffs, agree, total = [], 0, 0
    for x in ids:
        a, b = reference(input_ids=x).logits.float(), model(input_ids=x).logits.float()
        diffs.append((a - b).abs().flatten())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += x.numel()
    d = torch.cat(diffs)
    return {"max_abs_logit_diff": d.max().item(), "mean_abs_logit_diff": d.mean().item(),
            "top1_agreement": agree / total, "check_tokens": total}
