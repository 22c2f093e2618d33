"""GGUF export for llama.cpp: our merged low-bit checkpoint, re-encoded without re-quantizing.

llama.cpp's Q4_1 block holds 32 weights as ``w = d * q + m`` with 4-bit codes ``q`` and an fp16
scale ``d`` and minimum ``m``: the same form as ours (``w = scale * q + offset``). When the group
size is a multiple of 32, every block lies inside one of our groups, so ``d`` and ``m`` are that
group's scale and offset and the codes are copied unchanged; 2- and 3-bit codes fit the nibbles
as they are. The only change is the fp16 rounding of scale and offset. 8-bit codes have no such
block type, so those weights are dequantized to F16. The token embedding and an untied output head
are written as the Q8_0 blocks the native folder stores (the values the model was trained with,
see ``qalora.models.model.EIGHT_BIT``), so the file is as small as a Q4_1 model of the base; norms stay
F32 (as llama.cpp's own converter writes them).

The tokenizer (vocabulary, merges, token types, special ids, chat template) is read from the
checkpoint's ``tokenizer.json`` so that llama.cpp tokenizes exactly as our model was trained.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from qalora.atomic import atomic_path
from qalora.deployment.export.formats import GGUF_QK as QK, check_format, gguf_type
from qalora.deployment.export.native import WEIGHTS, get_float, logical_keys, q8_0_of, read_quant_config
from qalora.errors import ModelError
from qalora.method.quant import Q8_BLOCK, dequantize, unpack_codes

ARCH = "llama"
# llama.cpp's 'gpt2' tokenizer refuses a file without merges, and the writer cannot store an
# empty array. One merge whose left part has several characters can never fire: before any
# merge, every BPE symbol is a single character of the byte-level alphabet.
INERT_MERGE = "<no-merges> <no-merges>"


def export_gguf(model_dir, out_path=None, on_progress=None) -> Path:
    """Write the merged checkpoint in ``model_dir`` as one llama.cpp GGUF file; returns its path.

    The default path is ``<model_dir>-q4_1.gguf`` (2/3/4-bit) or ``<model_dir>-f16.gguf`` (8-bit)
    beside the directory. Raises ConfigError for a group size Q4_1 cannot hold exactly.
    ``on_progress(done, total)`` counts tensors converted, then written.
    """
    import gguf

    model_dir = Path(model_dir)
    qc = read_quant_config(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    bits, group_size = qc["bits"], qc["group_size"]
    check_format("gguf", bits, group_size)
    _check_architecture(config)
    out = Path(out_path) if out_path else model_dir.with_name(f"{model_dir.name}-{gguf_type(bits)}.gguf")
    with atomic_path(out) as part:  # a failed write leaves no truncated .gguf behind
        writer = gguf.GGUFWriter(part, ARCH)
        file_type = gguf.LlamaFileType.MOSTLY_F16 if bits == 8 else gguf.LlamaFileType.MOSTLY_Q4_1
        _add_hparams(writer, config, qc, file_type)
        _add_tokenizer(writer, model_dir, config["vocab_size"])
        total = len(qc["modules"]) + 1  # each quantized module, then the rest with the write
        for i, (name, array, raw_dtype) in enumerate(_gguf_tensors(model_dir, config, qc), 1):
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
            if on_progress and i < total:  # the quantized modules come first
                on_progress(i, total)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        if on_progress:
            on_progress(total, total)
    return out


def q4_1_blocks(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int) -> np.ndarray:
    """Encode a quantized weight as ggml Q4_1 blocks, codes unchanged.

    Args:
        codes: uint8 ``(out, in)``, values below 16.
        scale, offset: float ``(out, in // group_size)``; ``group_size`` a multiple of 32.
    Returns:
        uint8 ``(out, in // 32 * 20)``: per block fp16 ``d``, fp16 ``m``, then 16 bytes whose low
        nibble is weight ``j`` and high nibble weight ``j + 16`` of the block.
    """
    out_f, in_f = codes.shape
    n_blocks = in_f // QK
    per_group = group_size // QK
    d = _fp16(scale.repeat_interleave(per_group, dim=1), "scale")[..., None].view(np.uint8)
    m = _fp16(offset.repeat_interleave(per_group, dim=1), "offset")[..., None].view(np.uint8)
    q = codes.reshape(out_f, n_blocks, 2, QK // 2).numpy()
    nibbles = q[:, :, 0] | (q[:, :, 1] << 4)
    return np.concatenate([d, m, nibbles], axis=-1).reshape(out_f, n_blocks * (4 + QK // 2))


def q8_0_blocks(codes: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """int8 codes ``(rows, cols)`` and fp16 scales ``(rows, cols // 32)`` as ggml Q8_0 blocks:
    uint8 ``(rows, cols // 32 * 34)``, per block the fp16 ``d`` then 32 int8 codes."""
    rows, cols = codes.shape
    dd = d.numpy().astype("<f2")[..., None].view(np.uint8)
    q = codes.reshape(rows, cols // Q8_BLOCK, Q8_BLOCK).numpy().view(np.uint8)
    return np.concatenate([dd, q], axis=-1).reshape(rows, cols // Q8_BLOCK * (2 + Q8_BLOCK))


def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's LLaMA RoPE expects for a q or k projection of ``rows`` outputs.

    Within each head of ``d = rows // n_head`` rows, transformers rotates row ``j`` with row
    ``j + d/2``; llama.cpp rotates adjacent rows ``2j`` and ``2j + 1``. Returns ``perm`` of shape
    ``(rows,)`` with ``new_rows = old_rows[perm]`` (the permutation convert_hf_to_gguf.py applies).
    A row permutation moves codes, scales and offsets together, so it is exact.
    """
    d = rows // n_head
    return torch.arange(rows).reshape(n_head, 2, d // 2).transpose(1, 2).reshape(rows)


def _fp16(t: torch.Tensor, what: str) -> np.ndarray:
    """``t`` as a little-endian float16 array (ggml's byte order), refusing overflow."""
    half = t.float().numpy().astype("<f2")
    if not np.isfinite(half).all():
        raise ModelError(f"a {what} exceeds float16's range (65504), which GGUF cannot store; "
                         "export this model in the native format instead.")
    return half


def _check_architecture(config: dict) -> None:
    if config.get("model_type") != "llama":
        raise ModelError(f"GGUF export supports LLaMA models (model_type 'llama'); this one is "
                         f"{config.get('model_type')!r}. Export it in the native or GPTQ format instead.")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise ModelError(f"GGUF export supports default or linear RoPE; this model uses "
                         f"{rope.get('rope_type')!r}. Export it in the native format instead.")


def _add_hparams(writer, config: dict, qc: dict, file_type) -> None:
    import gguf

    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = config.get("rope_parameters") or {}
    writer.add_name(f"QA-LoRA {qc['bits']}-bit fine-tune of {qc.get('base') or config.get('_model_name_or_path') or 'LLaMA'}")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    if head_dim * n_head != config["hidden_size"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    # transformers 5 keeps rope_theta in rope_parameters; older configs at the top level.
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, model_dir: Path, n_vocab: int) -> None:
    import gguf
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{model_dir} has no tokenizer.json; GGUF export needs the fast tokenizer saved "
                         "beside the weights (a job's 'merged' folder has it).")
    spec = json.loads(path.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ModelError("GGUF export supports byte-level BPE tokenizers (GPT-2 style, as in SmolLM2); this "
                         "tokenizer is not one. Export this model in the native format instead.")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]  # rows the embedding has but the tokenizer lacks
    types = [gguf.TokenType.UNUSED] * n_vocab
    entries = [(t, i, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()]
    entries += [(a["content"], a["id"], gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
                for a in spec.get("added_tokens", [])]
    for text, i, kind in entries:
        if i >= n_vocab:
            raise ModelError(f"token {text!r} has id {i} but the model has only {n_vocab} embeddings; "
                             "the tokenizer does not belong to this model.")
        tokens[i], types[i] = text, kind
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec, bool(model.get("merges"))))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    special.merges = special.merges or [INERT_MERGE]
    # Whether BOS/EOS are added is what the tokenizer does, not what its config files claim.
    tok = Tokenizer.from_file(str(path))
    plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
    special.add_special_token.update(bos=full[:1] != plain[:1], eos=full[-1:] != plain[-1:])
    special.add_to_gguf(writer, quiet=True)


def _pre_tokenizer(spec: dict, has_merges: bool) -> str:
    """The llama.cpp pre-tokenizer that splits text the way ``spec``'s pre_tokenizer does."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and (steps[0].get("use_regex", True) or not has_merges):
        # Without merges every byte is its own token, so how the text is split cannot matter.
        return "gpt-2"  # llama.cpp's name for GPT-2's regex split
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # single digits, then GPT-2's regex
    raise ModelError(f"GGUF export cannot match this tokenizer's pre-tokenizer ({kinds}) to one llama.cpp "
                     "knows; it supports GPT-2 style byte-level BPE. Export in the native format instead.")


def _gguf_tensors(model_dir: Path, config: dict, qc: dict):
    """Yield ``(gguf name, array, raw ggml type or None)`` for every tensor of the checkpoint."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    n_head = config["num_attention_heads"]
    rope_heads = {gguf.MODEL_TENSOR.ATTN_Q: n_head,
                  gguf.MODEL_TENSOR.ATTN_K: config.get("num_key_value_heads") or n_head}
    bits, group_size = qc["bits"], qc["group_size"]

    def gguf_name(key: str):
        found = names.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ModelError(f"tensor {key!r} has no llama.cpp counterpart; GGUF export supports plain "
                             "LLaMA models. Export this model in the native format instead.")
        return found

    with safe_open(model_dir / WEIGHTS, framework="pt") as f:
        keys = set(logical_keys(f.keys()))
        for module in qc["modules"]:
            kind, name = gguf_name(f"{module}.weight")
            packed, scale, offset = (f.get_tensor(f"{module}.{p}") for p in ("packed", "scale", "offset"))
            codes = unpack_codes(packed, bits, packed.shape[1] * 8 // bits)
            if kind in rope_heads:
                perm = rope_permutation(codes.shape[0], rope_heads[kind])
                codes, scale, offset = codes[perm], scale[perm], offset[perm]
            if bits == 8:
                weight = dequantize(codes, scale, offset)
                yield name, _fp16(weight, "weight"), None
            else:
                yield name, q4_1_blocks(codes, scale, offset, group_size), gguf.GGMLQuantizationType.Q4_1
            keys -= {f"{module}.packed", f"{module}.scale", f"{module}.offset"}
        if not config.get("tie_word_embeddings") and "lm_head.weight" not in keys and "lm_head" not in qc["modules"]:
            raise ModelError(f"{model_dir}/{WEIGHTS} has no lm_head.weight although the model's embeddings "
                             "are not tied; the checkpoint is incomplete. Re-run the job's merge.")
        for key in sorted(keys):
            if key.endswith("rotary_emb.inv_freq"):
                continue  # llama.cpp computes the frequencies from rope.freq_base
            kind, name = gguf_name(key)
            q8 = q8_0_of(f, key)
            if q8 is not None:  # the embedding and head: their Q8_0 blocks as stored, never widened
                yield name, q8_0_blocks(*q8), gguf.GGMLQuantizationType.Q8_0
                continue
            t = get_float(f, key).float()
            if kind in rope_heads:
                t = t[rope_permutation(t.shape[0], rope_heads[kind])]
            yield name, t.contiguous().numpy(), None
