"""GPTQ for the group-wise representation: calibration, and import/export of GPTQ tensors.

Our representation of a Linear weight ``W [out, in]`` is ``codes`` (uint8 ``[out, in]``, values in
``[0, 2^bits - 1]``), ``scale`` and ``offset`` (float32 ``[out, in // group_size]``) with
``w[o, i] = scale[o, i // gs] * codes[o, i] + offset[o, i // gs]``. GPTQ stores the same thing
with integer zero points, ``w = scale * (q - zero)``, so ``offset = -scale * zero``.

The GPTQ algorithm itself is gptqmodel's (``gptqmodel.quantization.gptq.GPTQ``, asymmetric,
no act-order); this module only feeds it activations and converts its results. gptqmodel takes
seconds to import and sets a few process-wide environment variables when it does
(``PYTORCH_ALLOC_CONF``, ``CUDA_DEVICE_ORDER``), so it is imported only inside
``gptq_quantize``. The checkpoint functions need nothing but torch and safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qalora.config import check_group_size
from qalora.errors import ConfigError, ModelError

GPTQ_BITS = (2, 3, 4, 8)
# A v1 ("gptq") checkpoint stores zero - 1; "gptq_v2" stores the zero itself.
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_WORD = 32
_MASK32 = (1 << _WORD) - 1


class _Captured(Exception):
    """Raised by the first decoder layer's pre-hook: its inputs are all we need from the model."""


def gptq_quantize(model: nn.Module, calib_input_ids: list[torch.Tensor], bits: int, group_size: int,
                  targets: tuple[str, ...], damp: float = 0.01, on_progress=None, clip: bool = False
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """GPTQ-quantize every ``nn.Linear`` whose last name component is in ``targets``.

    Calibration is sequential: decoder layer ``k`` receives the hidden states produced by layers
    ``0..k-1`` with their targets already quantized, and inside a layer the modules are quantized
    in stages of modules sharing an input (q/k/v, then o, then gate/up, then down for LLaMA), each
    stage's Hessian ``H = 2/N * X^T X`` taken from outputs of the already quantized stages
    (gptqmodel's ``true_sequential``). Each layer runs in float32 on the device it lives on (the
    dtype gptqmodel's Hessians and our code recovery expect) and is restored to its weights and
    dtype once the next layer's inputs are computed: only one layer is ever copied.

    Args:
        model: a LLaMA-family causal LM, on any device, in any float dtype.
        calib_input_ids: token ids, each ``[T]`` or ``[B, T]`` without padding; one forward each.
        damp: fraction of ``mean(diag(H))`` added to ``diag(H)``; gptqmodel raises it in steps of
            0.01 if the Cholesky factorization still fails.
        on_progress: called as ``on_progress(done, total)`` after each quantized module.

    Returns:
        ``{qualified_name: (codes [out, in] uint8, scale [out, G] f32, offset [out, G] f32)}``,
        on the model's device.
    """
    _check_bits(bits)
    _check_calibration(calib_input_ids)
    modules = _target_linears(model, targets, group_size)
    layers = _decoder_layers(model, modules)
    qcfg = gptq_config(bits, group_size, damp, clip)
    names = {id(module): name for name, module in modules}
    results: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    count = iter(range(1, len(modules) + 1))
    done = (lambda _name: on_progress(next(count), len(modules))) if on_progress else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = capture_layer_inputs(model, layers[0], calib_input_ids)
            for layer in layers:
                dtype = next(layer.parameters()).dtype
                inside = {id(m) for m in layer.modules()}
                saved = {n: m.weight.detach().clone() for n, m in modules if id(m) in inside}
                layer.float()
                found, inputs = gptq_quantize_layer(layer, inputs, names, qcfg, bits, on_module=done)
                results.update(found)
                for module in layer.modules():
                    if id(module) in names:
                        module.weight.data.copy_(saved[names[id(module)]])
                layer.to(dtype)
    finally:
        model.train(was_training)
    return results


# GPTQ's own clip search (its quantizer's ``mse`` grid: each group's range shrunk by up to 20% in
# 1% steps, the shrink with the least |error|^2.4 kept, as the GPTQ paper's code does)
GPTQ_CLIP_NORM = 2.4


def gptq_config(bits: int, group_size: int, damp: float = 0.01, clip: bool = False):
    """gptqmodel's ``QuantizeConfig`` for our layout: asymmetric, contiguous groups, no act-order;
    ``clip``: its grid search of each group's range instead of min-max."""
    from gptqmodel.quantization.config import QuantizeConfig

    # act_group_aware defaults to on in gptqmodel; off gives the textbook column order.
    # fallback=None: an unreached module must fail loudly here, not silently become RTN.
    return QuantizeConfig(bits=bits, group_size=group_size, desc_act=False, sym=False,
                          act_group_aware=False, damp_percent=damp, fallback=None,
                          offload_to_disk=False, mse=GPTQ_CLIP_NORM if clip else 0.0)


def gptq_quantize_layer(layer: nn.Module, inputs: list, names: dict[int, str], qcfg, bits: int,
                        on_module=None) -> tuple[dict, list]:
    """GPTQ-quantize the targets of one float32 decoder layer; return ``(results, next inputs)``.

    ``inputs`` are the layer's ``(args, kwargs)`` per calibration sample (float32 hidden states);
    ``names`` maps ``id(module)`` to qualified names for the targets. The targets' weights are
    left fake-quantized, and the next inputs are computed through them, as gptqmodel does.
    """
    from gptqmodel.quantization.gptq import GPTQ

    inputs = [_float32(sample) for sample in inputs]
    results = {}
    for stage in _stages(layer, names, inputs[0]):
        tasks = {names[id(m)]: (m, _new_task(GPTQ, m, qcfg)) for m in stage}
        _run_layer(layer, inputs, stage, [task for _, task in tasks.values()])
        for name, (module, task) in tasks.items():
            results[name] = _finish_task(name, module, task, bits)
            module.__dict__.pop("target_device", None)  # attribute the GPTQ task adds
            if on_module is not None:
                on_module(name)
    next_inputs = [((_hidden(layer(*args, **kwargs)),) + args[1:], kwargs) for args, kwargs in inputs]
    return results, next_inputs


def _float32(obj):
    """Float tensors in nested tuples/lists/dicts cast to float32 (hidden states, rotary cos/sin)."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_float32(o) for o in obj)
    if isinstance(obj, list):
        return [_float32(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _float32(v) for k, v in obj.items()}
    return obj


def _check_calibration(calib_input_ids) -> None:
    if not calib_input_ids:
        raise ConfigError("GPTQ needs calibration samples; pass at least one token sequence "
                          "(typically 128 sequences of 512-2048 tokens).")


def _target_linears(model, targets, group_size):
    modules = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not modules:
        raise ConfigError(f"no nn.Linear named {sorted(targets)} in the model; choose target names "
                          "that exist, such as 'q_proj' or 'down_proj'.")
    for name, module in modules:
        if not module.weight.is_floating_point():
            raise ModelError(f"{name} holds {module.weight.dtype} weights; GPTQ needs a float model "
                             "(load the base unquantized).")
        check_group_size(module.in_features, group_size, name)
    return modules


def _decoder_layers(model, modules) -> nn.ModuleList:
    """The ModuleList of blocks (``model.model.layers`` for LLaMA) holding every target."""
    for name, candidate in model.named_modules():
        if isinstance(candidate, nn.ModuleList) and len(candidate):
            prefixes = [f"{name}.{i}." for i in range(len(candidate))]
            if all(any(n.startswith(p) for p in prefixes) for n, _ in modules):
                return candidate
    raise ModelError("GPTQ calibration needs every target inside the decoder layers "
                     "(model.model.layers); remove targets such as lm_head from the list.")


def capture_layer_inputs(model, first_layer, calib_input_ids):
    """Positional and keyword inputs of the first decoder layer, one entry per sample.

    Only the layers before ``first_layer`` (embeddings, rotary) need real weights: the hook
    stops the forward before ``first_layer`` runs, so later layers may still be on ``meta``.
    """
    device = next(p.device for p in model.parameters() if not p.is_meta)
    captured = []

    def grab(_, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in calib_input_ids:
            try:
                ids = (ids if ids.dim() == 2 else ids[None]).to(device)
                model(input_ids=ids, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _stages(layer, names, sample):
    """Target modules of ``layer`` grouped by shared input, in the order they are called."""
    groups: list[tuple[torch.Tensor, list[nn.Module]]] = []

    def record(module, inp, _):
        # Holding the input tensors keeps them alive, so identity cannot be confused by reuse.
        for seen, members in groups:
            if seen is inp[0]:
                members.append(module)
                return
        groups.append((inp[0], [module]))

    hooks = [m.register_forward_hook(record) for m in layer.modules() if id(m) in names]
    try:
        layer(*sample[0], **sample[1])
    finally:
        for hook in hooks:
            hook.remove()
    return [members for _, members in groups]


def _new_task(gptq_cls, module, qcfg):
    task = gptq_cls(module, qcfg=qcfg)
    task.quantizer.configure(perchannel=True)  # one scale/zero per output row and group
    return task


def _run_layer(layer, inputs, stage, tasks):
    hooks = [m.register_forward_hook(lambda _, inp, out, t=t: t.add_batch(inp[0].detach(), out))
             for m, t in zip(stage, tasks)]
    try:
        for args, kwargs in inputs:
            layer(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()


def _finish_task(name, module, task, bits):
    if task.nsamples == 0:
        raise ModelError(f"{name} saw no calibration tokens; GPTQ cannot quantize a module the "
                         "forward pass does not reach (remove it from the targets).")
    fake_q, scale, zero = task.quantize()[:3]  # fake_q = scale * (q - zero), [out, in]
    task.free()
    gs = module.in_features // scale.shape[1]
    scale_full = scale.repeat_interleave(gs, dim=1)
    zero_full = zero.repeat_interleave(gs, dim=1)
    # fake_q / scale is an integer up to float rounding, so round() recovers q exactly.
    codes = (torch.round(fake_q / scale_full) + zero_full).clamp_(0, 2 ** bits - 1)
    module.weight.data.copy_(fake_q)  # later stages and layers see the quantized layer
    return codes.to(torch.uint8), scale.float(), (-scale * zero).float()


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _check_bits(bits):
    if bits not in GPTQ_BITS:
        raise ConfigError(f"bits={bits} cannot be stored as GPTQ; choose one of {list(GPTQ_BITS)}.")


def _check_format(checkpoint_format):
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ConfigError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported; "
                          f"use one of {list(CHECKPOINT_FORMATS)} (gptq_v1 is 'gptq').")


# GPTQ packs 32 // bits codes per int32 word for 2/4/8 bits and 32 codes into 3 words for 3 bits
# (the 10|1|10|1|10 layout). Both are the little-endian bit stream of the codes along the packed
# dimension cut into 32-bit words: bit b of value i is stream bit i * bits + b. Working one bit
# plane at a time keeps the temporaries at the size of the weight.
def _pack_dim0(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``[n, m]`` integers in ``[0, 2^bits)`` -> int32 ``[n * bits // 32, m]``."""
    n, m = values.shape
    if n % _WORD:
        raise ConfigError(f"GPTQ packs 32 values at a time but got {n}; GPTQ needs in_features "
                          "and out_features divisible by 32.")
    values = values.to(torch.int64)
    words = torch.zeros(n * bits // _WORD, m, dtype=torch.int64)
    for b in range(bits):
        pos = torch.arange(n) * bits + b
        words.index_add_(0, pos // _WORD, ((values >> b) & 1) << (pos % _WORD)[:, None])
    return _to_int32(words)


def _unpack_dim0(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[n * bits // 32, m]`` -> int64 ``[n, m]``; inverse of ``_pack_dim0``."""
    n = words.shape[0] * _WORD // bits
    words = words.to(torch.int64)
    values = torch.zeros(n, words.shape[1], dtype=torch.int64)
    for b in range(bits):
        pos = torch.arange(n) * bits + b
        values |= ((words[pos // _WORD] >> (pos % _WORD)[:, None]) & 1) << b
    return values


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    words = words & _MASK32
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _shift_v1(qzeros: torch.Tensor, bits: int, delta: int) -> torch.Tensor:
    """Convert packed zeros between v1 (zero - 1) and v2 (zero) the way gptqmodel 7.6 does.

    For 2/4/8 bits gptqmodel adds/subtracts ``0x..0101`` on the whole int32 word, so a zero of 0
    borrows from its neighbour field; only the same whole-word operation undoes it exactly. For
    3 bits, whose fields straddle words, it shifts each field modulo 8.
    """
    if bits == 3:
        zeros = _unpack_dim0(qzeros.T, bits) + delta  # [out, G]
        return _pack_dim0(zeros & 7, bits).T.contiguous()
    ones = sum(1 << (bits * j) for j in range(_WORD // bits))
    return _to_int32(qzeros.to(torch.int64) + delta * ones)


def from_gptq_tensors(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      g_idx: torch.Tensor | None, bits: int, group_size: int,
                      checkpoint_format: str = "gptq"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpack one GPTQ module into ``(codes [out, in] uint8, scale [out, G], offset [out, G])``.

    Args:
        qweight: int32 ``[in * bits // 32, out]``.
        qzeros: int32 ``[G, out * bits // 32]``, storing ``zero - 1`` for ``checkpoint_format``
            "gptq" (v1, what gptqmodel 7.6 saves by default) or ``zero`` for "gptq_v2".
        scales: ``[G, out]`` (float16 in gptqmodel's checkpoints; converted exactly to float32).
        g_idx: int ``[in]`` group of each input column; must be ``i // group_size``.
    """
    _check_bits(bits)
    _check_format(checkpoint_format)
    n_groups, out_features = scales.shape
    in_features = qweight.shape[0] * _WORD // bits
    if n_groups * group_size != in_features or qweight.shape[1] != out_features:
        raise ConfigError(f"GPTQ tensors do not match bits={bits}, group_size={group_size}: "
                          f"qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}; check "
                          "the checkpoint's quantize_config.json.")
    expected = torch.arange(in_features) // group_size
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64).cpu(), expected):
        raise ConfigError("this GPTQ checkpoint uses act-order (desc_act=True): its g_idx maps input "
                          "columns to groups out of order, which contiguous groups cannot "
                          "represent. Re-quantize the model with desc_act=False.")
    if checkpoint_format == "gptq":
        qzeros = _shift_v1(qzeros, bits, +1)
    codes = _unpack_dim0(qweight, bits).T.to(torch.uint8)
    zeros = _unpack_dim0(qzeros.T, bits)[:out_features]  # [out, G]
    scale = scales.float().T.contiguous()
    return codes.contiguous(), scale, -scale * zeros.float()


def to_gptq_tensors(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                    group_size: int, checkpoint_format: str = "gptq",
                    scales_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Pack our representation as GPTQ ``{qweight, qzeros, scales, g_idx}`` (inverse of above).

    GPTQ holds integer zero points only, so each float offset becomes
    ``zero = clamp(round(-offset / scale), 0, 2^bits - 1)``: the result is lossy in the zeros
    alone (exact when the offsets came from GPTQ or min-max RTN; merged adapters move them off the
    grid). Codes are exact, and so are the scales while ``scales_dtype`` is float32; pass
    ``torch.float16`` for what GPTQ kernels load, which also rounds the scales.
    """
    _check_bits(bits)
    _check_format(checkpoint_format)
    maxq = 2 ** bits - 1
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zeros = torch.where(scale == 0, 0.0, torch.round(-offset / safe)).clamp(0, maxq)
    qzeros = _pack_dim0(zeros.to(torch.int64), bits).T.contiguous()  # zeros: [out, G]
    if checkpoint_format == "gptq":
        qzeros = _shift_v1(qzeros, bits, -1)
    return {
        "qweight": _pack_dim0(codes.T, bits),
        "qzeros": qzeros,
        "scales": scale.T.to(scales_dtype).contiguous(),
        "g_idx": (torch.arange(codes.shape[1]) // group_size).to(torch.int32),
    }


def load_gptq_checkpoint(directory: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]]:
    """Read every quantized module of a GPTQ safetensors checkpoint directory.

    Settings come from ``quantize_config.json`` or ``config.json["quantization_config"]``.
    Returns ``{module_name: (codes, scale, offset)}`` as ``from_gptq_tensors``.
    """
    from safetensors import safe_open

    directory = Path(directory)
    cfg = _read_quant_config(directory)
    bits, group_size = int(cfg.get("bits", 4)), int(cfg.get("group_size", 128))
    checkpoint_format = str(cfg.get("checkpoint_format") or cfg.get("format") or "gptq").lower()
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelError(f"no .safetensors files in {directory}; GPTQ checkpoints saved as .bin "
                         "are not supported, re-save the model with safetensors.")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            for key in reader.keys():
                prefix, _, part = key.rpartition(".")
                if part in ("qweight", "qzeros", "scales", "g_idx"):
                    tensors.setdefault(prefix, {})[part] = reader.get_tensor(key)
    results = {}
    for name, parts in sorted(tensors.items()):
        if "qweight" not in parts:
            continue
        gs = group_size if group_size > 0 else parts["qweight"].shape[0] * _WORD // bits
        results[name] = from_gptq_tensors(parts["qweight"], parts["qzeros"], parts["scales"],
                                          parts.get("g_idx"), bits, gs, checkpoint_format)
    if not results:
        raise ModelError(f"{directory} holds no GPTQ tensors (qweight/qzeros/scales); is it a "
                         "GPTQ checkpoint?")
    return results


def _read_quant_config(directory: Path) -> dict:
    path = directory / "quantize_config.json"
    if path.exists():
        cfg = json.loads(path.read_text())
    elif (directory / "config.json").exists():
        cfg = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    else:
        raise ModelError(f"{directory} has neither quantize_config.json nor config.json; point to "
                         "the folder of a GPTQ checkpoint.")
    method = str(cfg.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise ConfigError(f"{directory} is quantized with {method!r}, not GPTQ; only GPTQ "
                          "checkpoints can be imported here.")
    return cfg
