"""Exports of a finished run: one entry point for the CLI, the jobs and the app.

A run directory (``python -m qalora train --out DIR`` or a job's artifact folder) holds the merged
low-bit model in ``merged/`` (the native format) and the trained adapter in ``adapter/``.

=========  ==========================================  =====================================
format     what is written                             exact?
=========  ==========================================  =====================================
native     the ``merged`` folder, copied               yes (it is the model)
gguf       one ``.gguf`` file for llama.cpp            yes, Q4_1 (group size multiple of 32)
torchao    a transformers folder (torchao int-x)       yes up to bf16 scales and zero points
torchao-   a transformers folder (torchao int4,        yes up to bf16 scales and zero points;
int4       tinygemm layout; CUDA, 4-bit runs)          runs on CUDA only
gptq       a gptqmodel / transformers GPTQ folder      no: integer zero points; cost measured
peft       a PEFT LoRA adapter for the 16-bit base     adapter only (expanded ``lora_A``)
=========  ==========================================  =====================================
"""
from __future__ import annotations

import shutil
from pathlib import Path

from qalora.atomic import atomic_path
from qalora.deployment.export.formats import check_format, gguf_type
from qalora.errors import ModelError


def run_parts(run_dir) -> tuple[Path, Path]:
    """(merged model dir, adapter dir) of a run directory, or of a ``merged`` folder given directly."""
    path = Path(run_dir).expanduser()
    if (path / "merged").is_dir():
        return path / "merged", path / "adapter"
    if (path / "config.json").is_file() and (path.parent / "adapter").is_dir():
        return path, path.parent / "adapter"
    if (path / "config.json").is_file():
        return path, path / "__no_adapter__"
    raise ModelError(f"{path} is not a finished run: expected a folder with merged/ (written by "
                     "`python -m qalora train --out DIR` or a job), or a merged model folder.")


def run_gguf_path(merged: Path, bits: int) -> Path:
    """Where :func:`export_run` writes a run's GGUF file by default."""
    return merged.parent / "exports" / f"model-{gguf_type(bits)}.gguf"


def export_run(run_dir, fmt: str, out=None, on_progress=None) -> dict:
    """Export run ``run_dir`` in ``fmt``; returns ``{"format", "path", "exact", ...}``.

    ``out`` defaults to ``<run_dir>/exports/<format>``. The GPTQ result also carries the measured
    cost of integer zero points (``max_abs_logit_diff``, ``mean_abs_logit_diff``,
    ``top1_agreement``) against the exact merged model. ``on_progress(done, total)`` counts the
    export's steps (GGUF: tensors converted; GPTQ: zero-point candidates measured, then the write).
    """
    from qalora.deployment.export.native import read_quant_config

    progress = on_progress or (lambda done, total: None)
    merged, adapter = run_parts(run_dir)
    qc = read_quant_config(merged)
    check_format(fmt, int(qc["bits"]), int(qc["group_size"]))
    root = merged.parent / "exports"
    # Every export is written under a temporary name and renamed into place when complete (qalora.atomic).
    if fmt == "native":
        dest = Path(out) if out else root / "native"
        with atomic_path(dest) as tmp:
            shutil.copytree(merged, tmp)
        progress(1, 1)
        return {"format": fmt, "path": str(dest), "exact": True}
    if fmt == "gguf":
        from qalora.deployment.export.gguf import export_gguf
        dest = Path(out) if out else run_gguf_path(merged, int(qc["bits"]))
        export_gguf(merged, dest, on_progress=progress)  # written atomically by export_gguf itself
        return {"format": fmt, "path": str(dest), "exact": True, "gguf_type": gguf_type(int(qc["bits"])).upper()}
    if fmt == "torchao":
        from qalora.deployment.export.torchao import export_torchao
        dest = Path(out) if out else root / "torchao"
        with atomic_path(dest) as tmp:
            export_torchao(merged, tmp, on_progress=progress)
        from qalora.deployment.export.torchao import fidelity
        return {"format": fmt, "path": str(dest), "exact": False, "dtype": "bfloat16", **fidelity(merged, dest)}
    if fmt == "torchao-int4":
        from qalora.deployment.export.torchao import export_torchao, int4_fidelity
        dest = Path(out) if out else root / "torchao-int4"
        with atomic_path(dest) as tmp:
            export_torchao(merged, tmp, on_progress=progress, layout="int4")
        return {"format": fmt, "path": str(dest), "exact": False, "dtype": "bfloat16", **int4_fidelity(merged, dest)}
    if fmt == "gptq":
        from qalora.deployment.export.gptq import export_gptq
        dest = Path(out) if out else root / "gptq"
        with atomic_path(dest) as tmp:
            report = export_gptq(merged, tmp, on_progress=progress)
        keep = ("max_abs_logit_diff", "mean_abs_logit_diff", "top1_agreement", "zero_points")
        return {"format": fmt, "path": str(dest), "exact": False, **{k: report[k] for k in keep if k in report}}
    if not adapter.is_dir():
        raise ModelError(f"{merged} has no adapter folder beside it; the PEFT export needs the run's adapter/.")
    from qalora.deployment.export.peft import export_peft_adapter
    dest = Path(out) if out else root / "peft"
    with atomic_path(dest) as tmp:
        export_peft_adapter(adapter, tmp)
    progress(1, 1)
    return {"format": fmt, "path": str(dest), "exact": False}
