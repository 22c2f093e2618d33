"""Runs side by side: one table of settings and outcomes, overlaid loss curves, size vs quality.

Pure functions over the job dicts ``service.get_job`` returns (with metrics and artifacts), so
the comparison is tested without a browser and the app only draws it. Every job has a row, queued
ones too; outcomes of a job that has not finished are blank until it has them (its curves grow as
it trains), and only finished jobs are marked best: a partial wall time or a loss halfway through
is no result. Settings and baselines (the quantized base's loss) are never marked.
"""
from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path

from qalora.config import method_label
from storage import utcnow

# (key, column header, which is best: "min", "max" or None). The settings a sweep varies come
# first, then the outcomes, then the settings that rarely differ, so the outcomes are in view.
SETTINGS = [("id", "job", None), ("name", "name", None), ("status", "status", None), ("bits", "bits", None),
            ("group_size", "group size", None), ("rank", "rank", None), ("lr", "lr", None)]
LATER = [("method", "method", None), ("steps", "steps", None), ("base", "base", None), ("sweep", "sweep", None)]
OUTCOMES = [("eval_base", "eval loss: quantized base", None), ("eval_trained", "eval loss: trained", "min"),
            ("eval_merged", "eval loss: merged", "min"), ("merge_diff", "merge max Δlogit", "min"),
            ("mc_score", "multiple choice", "max"), ("gen_score", "replies exact", "max"),
            ("f16_mb", "16-bit MB", None), ("native_mb", "native MB", "min"),
            ("native_bpp", "native bits/param", "min"),
            ("gguf_mb", "GGUF MB", "min"), ("gguf_bpp", "GGUF bits/param", "min"),
            ("torchao_mb", "torchao MB", "min"), ("gptq_mb", "GPTQ MB", "min"), ("tokens_per_s", "tokens/s", "max"),
            ("wall_s", "wall s", "min"), ("peak_rss_mb", "peak RAM MB", "min"), ("peak_gpu_mb", "peak GPU MB", "min")]
# Shown only when some job has them (an export nobody asked for, a GPU nobody used).
OPTIONAL = {"sweep", "mc_score", "gen_score", "gguf_mb", "torchao_mb", "gptq_mb", "peak_gpu_mb", "f16_mb", "native_bpp",
            "gguf_bpp"}
SIZE_KINDS = {"native_mb": "merged", "gguf_mb": "gguf", "torchao_mb": "torchao", "gptq_mb": "gptq"}
# The scatter's quality axes: (label, field of the scatter points, which is best).
QUALITY = {"eval loss (merged)": ("eval_loss", "min"), "multiple-choice score": ("mc_score", "max")}


def label(job: dict) -> str:
    return f"#{job['id']} {job['name']}"


def row(job: dict, now: datetime | None = None) -> dict:
    """One job's settings (from its spec, known from the start) and outcomes (from its report)."""
    spec, report = job.get("spec") or {}, job.get("report") or {}
    quant, adapter, train = spec.get("quant") or {}, spec.get("adapter") or {}, spec.get("train") or {}
    method = method_label(quant, adapter)
    sizes = job_sizes(job)
    metrics = job.get("metrics") or []
    tokens_per_s = report.get("tokens_per_s") or (metrics[-1]["tokens_per_s"] if metrics else None)
    if "run_s" in job:  # over every attempt (``service``)
        wall = job["run_s"]
    else:
        end = job.get("finished_at") or (now or utcnow())
        wall = (end - job["started_at"]).total_seconds() if job.get("started_at") else None
    mc, gen = report.get("multiple_choice") or {}, report.get("generation") or {}
    out = {"id": job["id"], "name": job["name"], "sweep": job.get("sweep_id"), "status": job["status"],
           "base": spec.get("base"), "bits": quant.get("bits"), "group_size": quant.get("group_size"),
           "rank": adapter.get("rank"), "method": method, "steps": train.get("steps"), "lr": train.get("lr"),
           "eval_base": report.get("eval_loss_quantized_base"), "eval_trained": report.get("eval_loss_adapter"),
           "eval_merged": report.get("eval_loss_merged"), "merge_diff": report.get("merge_max_abs_logit_diff"),
           "mc_score": mc.get("accuracy"), "gen_score": gen.get("accuracy"), "tokens_per_s": tokens_per_s,
           "wall_s": wall,
           "peak_rss_mb": report.get("peak_rss_mb"), "peak_gpu_mb": report.get("peak_gpu_mb") or None}
    for key, kind in SIZE_KINDS.items():
        out[key] = sizes[kind] / 1e6 if sizes.get(kind) else None
    params = report.get("model_params")  # the 16-bit model's parameters: its size, and bits per parameter
    out["f16_mb"] = f16_mb(params) if params else None
    for key, kind in (("native_bpp", "merged"), ("gguf_bpp", "gguf")):
        out[key] = bits_per_param(sizes[kind], params) if params and sizes.get(kind) else None
    out["merged_bytes"] = sizes.get("merged")
    bench = report.get("benchmarks") or {}
    for which, prefix in BENCH_SUBJECTS.items():
        for task, score in (bench.get(which) or {}).items():
            out[f"{prefix}{task}"] = score["value"]
            out.setdefault("bench_metrics", {})[task] = score["metric"]
    return out


# lm-eval scores in the table: the merged model's (ranked), then its baselines' (never ranked).
BENCH_SUBJECTS = {"merged": "bench:", "quantized_base": "bench-qbase:", "base16": "bench-base16:"}
_BENCH_HEADERS = {"bench:": "{task} {metric}", "bench-qbase:": "{task}: quantized base",
                  "bench-base16:": "{task}: 16-bit base"}


def bench_columns(rows: list[dict]) -> list[tuple[str, str, str | None]]:
    """One column per benchmark task some job ran, for the merged model (best marked, higher is
    better, as lm-eval's accuracies are; a perplexity lower), then the baselines beside them."""
    metrics = {}
    for r in rows:
        metrics.update(r.get("bench_metrics") or {})
    cols = []
    for prefix, header in _BENCH_HEADERS.items():
        for task, metric in metrics.items():
            if any(r.get(prefix + task) is not None for r in rows):
                better = ("min" if metric == "perplexity" else "max") if prefix == "bench:" else None
                cols.append((prefix + task, header.format(task=task, metric=metric), better))
    return cols


FINISHED = "succeeded"


def best(rows: list[dict]) -> dict[str, list[int]]:
    """For each outcome, the ids of the finished jobs with the best value (ties all marked)."""
    marks = {}
    for key, _, better in OUTCOMES + bench_columns(rows):
        values = [(r[key], r["id"]) for r in rows if r.get(key) is not None and r.get("status") == FINISHED]
        if better and values:
            top = (min if better == "min" else max)(v for v, _ in values)
            marks[key] = [i for v, i in values if v == top]
    return marks


def frontier(points: list[tuple[int, float, float]], better: str = "min") -> list[int]:
    """Ids of the points (id, size, quality) no other point beats on both size and quality."""
    sign = 1 if better == "min" else -1
    keep = []
    for i, size, q in points:
        beaten = any(s2 <= size and sign * q2 <= sign * q and (s2 < size or sign * q2 < sign * q)
                     for j, s2, q2 in points if j != i)
        if not beaten:
            keep.append(i)
    return keep


def columns(rows: list[dict]) -> list[tuple[str, str, str | None]]:
    """The table's columns: every setting and outcome, less the optional ones no job has."""
    return [c for c in SETTINGS + OUTCOMES + bench_columns(rows) + LATER
            if c[0] not in OPTIONAL or any(r.get(c[0]) is not None for r in rows)]


def curves(job: dict) -> list[dict]:
    """The job's loss points, train and eval, by step and by training tokens seen."""
    out, tokens, last_elapsed = [], 0.0, 0.0
    for m in job.get("metrics") or []:
        if m.get("tokens_seen") is not None:
            tokens = float(m["tokens_seen"])
        elif m.get("tokens_per_s") and m.get("elapsed_s") is not None:  # rows written before tokens_seen
            tokens += m["tokens_per_s"] * max(m["elapsed_s"] - last_elapsed, 0.0)
        last_elapsed = m.get("elapsed_s") or last_elapsed
        for split, key in (("train", "train_loss"), ("eval", "eval_loss")):
            if m.get(key) is not None:
                out.append({"job": label(job), "split": split, "series": f"#{job['id']} {split}",
                            "step": int(m["step"]), "tokens": int(tokens), "loss": float(m[key])})
    return out


def compare(jobs: list[dict]) -> dict:
    """Everything the Compare tab shows, as plain data: table columns and rows, the best cells,
    curve points, and size-vs-quality points with their frontier."""
    now = utcnow()
    rows = [row(j, now) for j in jobs]
    scatter = []
    for r in rows:
        if r["merged_bytes"]:
            scatter.append({"job": label(r), "merged_mb": r["merged_bytes"] / 1e6, "eval_loss": r["eval_merged"],
                            "mc_score": r["mc_score"], "bits": r["bits"], "group_size": r["group_size"],
                            "rank": r["rank"]})
    for key, better in QUALITY.values():
        points = [(p["job"], p["merged_mb"], p[key]) for p in scatter if p[key] is not None]
        on = set(frontier(points, better))
        for p in scatter:
            p[f"{key}_frontier"] = None if p[key] is None else ("frontier" if p["job"] in on else "dominated")
    return {"columns": columns(rows), "rows": rows, "best": best(rows),
            "curves": [pt for j in jobs for pt in curves(j)], "scatter": scatter}


def write_csv(result: dict, path: Path) -> Path:
    """The table as CSV: the headers shown, full-precision values, and a ``best`` column naming
    the outcomes where the job is best."""
    path = Path(path)
    cols = result["columns"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([header for _, header, _ in cols] + ["best at"])
        for r in result["rows"]:
            marks = [header for key, header, _ in cols if r["id"] in result["best"].get(key, ())]
            w.writerow(["" if r.get(key) is None else r[key] for key, _, _ in cols] + ["; ".join(marks)])
    return path


def cell_text(key: str, value) -> str:
    """One value as the table shows it: the learning rate as given, losses to 4 decimals, scores as
    percentages, sizes to 0.1 below 100; ``None`` is blank."""
    if value is None:
        return ""
    if isinstance(value, float):
        if key == "lr":
            return f"{value:g}"
        if key == "merge_diff":
            return f"{value:.2g}"
        if key in ("mc_score", "gen_score"):
            return f"{value:.0%}"
        if key.startswith("bench"):
            return f"{value:.4f}"
        return f"{value:.4f}" if key.startswith("eval") else f"{value:.1f}" if value < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(result: dict, keys: list[str] | None = None) -> str:
    """The table as Markdown (best values in bold): for the CLI and the README."""
    cols = [c for c in result["columns"] if keys is None or c[0] in keys]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        cells = []
        for key, _, _ in cols:
            text = cell_text(key, r.get(key))
            cells.append(f"**{text}**" if text and r["id"] in result["best"].get(key, ()) else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def files_text(job: dict) -> str:
    """The job's files beside the 16-bit model: 'native 110 MB (6.52 bits/param) · GGUF 97 MB (5.73
    bits/param) · 16-bit model 269 MB', for the Jobs tab and the model card ('' before any file)."""
    sizes = job_sizes(job)
    params = (job.get("report") or {}).get("model_params")
    names = {"merged": "native", "gguf": "GGUF", "torchao": "torchao", "gptq": "GPTQ"}
    parts = [f"{names[k]} {b / 1e6:.0f} MB" + (f" ({bits_per_param(b, params):.2f} bits/param)" if params else "")
             for k, b in sizes.items() if k in names]
    if parts and params:
        parts.append(f"16-bit model {f16_mb(params):.0f} MB")
    return " · ".join(parts)


def f16_mb(params: int) -> float:
    """MB of the model's ``params`` parameters in a 16-bit checkpoint."""
    return 2 * params / 1e6


def bits_per_param(nbytes: int, params: int) -> float:
    """A file's bits per parameter of the 16-bit model."""
    return 8 * nbytes / params


def job_sizes(job: dict) -> dict[str, int]:
    """Bytes of each file the job wrote, by artifact kind."""
    return {a["kind"]: a["size_bytes"] for a in job.get("artifacts") or [] if a.get("size_bytes")}
