"""QA-LoRA Studio: fine-tune, watch, chat with and publish low-bit models from the browser.

    python app.py [--host 127.0.0.1] [--port 7860] [--no-worker] [--no-auth]
    (QALORA_AUTH=user:password[,user2:password2] or QALORA_AUTH_FILE=path: login; required off loopback)

The module-level ``demo`` is built at import time and never launched here, so tests import it.
Each tab is laid out by one small builder; every handler calls ``jobs.service`` only. Training
runs in a worker process; the Jobs tab polls the database with a timer, so closing the page or
restarting the app loses nothing.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

import charts
from jobs import service

REFRESH_S = float(os.environ.get("QALORA_REFRESH_S") or 2.0)  # the Jobs tab's polling period
LOG_LINES = 14
JOB_COLUMNS = ["id", "name", "status", "stage", "progress", "loss", "ETA", "tokens/s", "sweep", "created (UTC)"]
CARD_HINT = "*Pick a finished model to preview its model card.*"
CSS = ".field-error p { color: var(--error-text-color, #b91c1c); font-weight: 600; }\n" + charts.CSS


def _error(exc: Exception) -> str:
    """The message, shown once, next to what the user did (no toast repeating it); no traceback."""
    text = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
    text = service.with_upload_names(text)
    return f"**Error:** {text}"


def _field_note(message: str | None) -> str:
    return f"⚠ {service.with_upload_names(message)}" if message else ""


TICK_S = 1.0


def _waiting(work, describe):
    """Run ``work()`` in a thread; yield ``describe(seconds)`` every second until it ends, then
    yield ``("done", result)`` (or raise its exception). Every wait over a second says what it
    waits for."""
    import threading
    import time

    box: dict = {}

    def run():
        try:
            box["result"] = work()
        except BaseException as exc:  # re-raised in the request's thread below
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    thread.start()
    thread.join(0.3)
    while thread.is_alive():
        yield describe(time.monotonic() - t0)
        thread.join(TICK_S)
    if "error" in box:
        raise box["error"]
    yield ("done", box["result"])


def _duration(seconds) -> str:
    if seconds is None:
        return ""
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h {m % 60:02d}m" if m >= 60 else f"{m}m {s:02d}s" if m else f"{s}s"


def _job_choices(jobs: list[dict]) -> list[tuple[str, int]]:
    return [(f"#{j['id']} {j['name']} ({j['status']})", j["id"]) for j in jobs]


def _model_choices() -> list[tuple[str, int]]:
    return [(f"#{m['job_id']} {m['name']} — {m['bits']}-bit, group {m['group_size']}", m["job_id"])
            for m in service.list_models()]


def _models_opened(current):
    """Chat and Publish on opening: fresh choices; with none picked (or the pick gone), the newest
    finished model is picked, so a user with one finished job never has to pick it."""
    choices = _model_choices()
    if current is not None and int(current) in {value for _, value in choices}:
        return gr.update(choices=choices)
    return gr.update(choices=choices, value=choices[0][1] if choices else None)


# ---- New fine-tune ---------------------------------------------------------------------------

def _data_path(kind, path, hub_id, hub_config, hub_split):
    """The path-or-name input, or for a Hub dataset the reference its fields compose."""
    return service.hub_ref(hub_id, hub_config, hub_split) if kind == "Hub dataset" else path


def _mapping(prompt, extra, response, messages) -> dict:
    roles = {"prompt": prompt, "input": extra, "response": response, "messages": messages}
    return {role: column for role, column in roles.items() if column and column != NO_COLUMN}


NO_COLUMN = "(none)"


def _hub_checked(kind, builtin, hub_id, config=None):
    """Ask the Hub about the dataset (about 2 s at most, no rows read): its configs, splits and
    columns fill the fields; columns of no known format open the column mapping with a guess."""
    keep = [gr.skip()] * 7
    if kind == "built-in":
        if not str(builtin or "").startswith("paper:"):
            return "", *keep
        ref = service.paper_dataset(builtin).ref
    elif kind != "Hub dataset" or not (hub_id or "").strip():
        return "", *keep
    else:
        ref = hub_id
    try:
        view = service.hub_dataset(service.hub_ref(ref, config))
    except Exception as exc:
        return _error(exc), *keep
    known = set(view.columns) & set(service.RECORD_COLUMNS)
    guess = {} if known else service.guess_columns(view.columns)
    paper = service.paper_dataset(ref) if kind == "built-in" else None
    guess = dict(paper.columns) if paper else guess
    options = [NO_COLUMN, *view.columns]
    note = (f"**{view.ref.id}**: config `{view.config}` (of {len(view.configs)}), split `{view.split}` (of "
            f"{', '.join(view.splits)}); columns {', '.join(f'`{c}`' for c in view.columns) or 'unknown'}. "
            f"Checked in {view.seconds:.1f} s; the worker downloads it when the job starts."
            + ("" if known or guess else " **Map its columns below.**"))
    mapping = [gr.update(choices=options, value=guess.get(role, NO_COLUMN))
               for role in ("prompt", "input", "response", "messages")]
    return (note, gr.update(choices=view.configs, value=view.config), gr.update(choices=view.splits, value=view.split),
            *mapping, gr.update(visible=kind == "Hub dataset", open=not known))


def _dataset_preview(kind, builtin, upload, path, base, hub_id=None, hub_config=None, hub_split=None):
    """Stream: what is being read while it is read, then the rendered records (for a Hub dataset,
    what the Hub says of it: its rows are downloaded by the worker)."""
    try:
        if kind == "Hub dataset" or str(builtin or "").startswith("paper:") and kind == "built-in":
            yield _hub_checked(kind, builtin, hub_id, hub_config)[0]
            return
        source = service.data_source(kind, builtin, upload, _data_path(kind, path, hub_id, hub_config, hub_split))
        what = f"Reading {service.with_upload_names(source)} and loading the base model's tokenizer"
        for item in _waiting(lambda: service.preview_dataset(source, base), lambda t: f"*{what}… {t:.0f} s*"):
            if isinstance(item, str):
                yield item
            else:
                texts, count = item[1]
    except Exception as exc:
        yield _error(exc)
        return
    shown = "\n\n".join(f"**Example {i + 1}**\n```text\n{t.strip()}\n```" for i, t in enumerate(texts))
    yield f"**{count} records.** The first, rendered as the model sees them:\n\n{shown}"


def _base_changed(base, swept):
    """(group size choices, note under the base field, base error, the sweep's group sizes to
    try: only valid ones, ticks kept where still valid); a Hub id is asked within 2 s."""
    try:
        sizes = service.group_size_choices(base)
    except Exception as exc:
        return gr.update(), "", _field_note(str(exc)), gr.skip()
    value = service.DEFAULT_GROUP_SIZE if service.DEFAULT_GROUP_SIZE in sizes else sizes[0]
    kept = [int(g) for g in swept or [] if int(g) in sizes] or [value]
    return (gr.update(choices=sizes, value=value), f"Group sizes valid for this model: {sizes}.", "",
            gr.update(choices=sizes, value=kept))


def _exports_for(bits, group_size, wanted):
    """The export checkboxes follow bits and group size: a format that cannot apply is taken out of
    the choices, and the note under them says why. ``wanted`` is what the user ticked, including
    formats hidden for now, so a tick comes back when its format applies again."""
    try:
        ok, refused = service.export_choices(bits, group_size)
    except Exception:
        return gr.skip(), gr.skip()
    choices = [(service.DOWNLOAD_FORMATS[f], f) for f in ok]
    value = [f for f in (wanted or []) if f in ok]
    why = "; ".join(f"{f.upper()} is off at group size {group_size}: {reason}" for f, reason in refused.items())
    return gr.update(choices=choices, value=value), f"*{why}.*" if why else ""


def _ticked(value, wanted, bits, group_size):
    """What the user wants exported after a click on the checkboxes: the visible ticks plus the
    wanted formats that are hidden at the current bits and group size."""
    try:
        ok, _ = service.export_choices(bits, group_size)
    except Exception:
        ok = service.EXTRA_EXPORTS
    return [f for f in (wanted or []) if f not in ok] + list(value or [])


def _launch(base, bits, group_size, method, kind, builtin, upload, path, rank, alpha, lr, steps, batch, seq, name,
            wanted=(), sweep=False, sweep_bits=(), sweep_groups=(), sweep_ranks="", sweep_lrs="", devices=1,
            hub_id=None, hub_config=None, hub_split=None, map_prompt=None, map_input=None, map_response=None,
            map_messages=None, max_samples=None, benchmarks="none", bench_tasks="", bench_limit=None, clip=None,
            train_scales=None, scales_lr=None):
    """(status under Launch, job picker, tabs, one note per form field): each problem is shown next
    to the field it concerns, all at once; nothing is queued while there is one.

    ``wanted`` is the formats the user ticked (the ``wanted`` state, not the checkboxes' value: a
    click right after a group-size change can carry ticks of choices just taken away); those the
    bits and group size allow are exported, as the checkboxes show. With ``sweep`` one job is
    queued per combination of the sweep values (``jobs.sweep``)."""
    fields = dict.fromkeys(service.FORM_FIELDS, "")
    try:
        ok, _ = service.export_choices(bits, group_size)
        exports = [f for f in (wanted or []) if f in ok]
    except Exception:
        exports = list(wanted or [])  # the form reports the bad bits or group size itself
    form = dict(kind=kind, builtin=builtin, upload=upload, path=path, base=base, bits=bits, group_size=group_size,
                method=method, rank=rank, alpha=alpha, lr=lr, steps=steps, batch_size=batch, seq_len=seq, name=name,
                devices=devices, max_samples=max_samples, benchmarks=benchmarks, bench_tasks=bench_tasks,
                bench_limit=bench_limit, clip=clip, train_scales=train_scales, scales_lr=scales_lr)
    try:
        if kind == "Hub dataset":
            try:
                form.update(path=_data_path(kind, path, hub_id, hub_config, hub_split),
                            columns=_mapping(map_prompt, map_input, map_response, map_messages))
            except service.QALoRAError as exc:
                raise service.FormError({"data": str(exc)}) from None
        if sweep:
            grid = {"bits": sweep_bits, "group_size": sweep_groups, "rank": sweep_ranks, "lr": sweep_lrs}
            plan = service.plan_sweep(grid, **form, exports=list(wanted or []))
            sweep_id, ids = service.submit_sweep(plan, name or "")
            note = (f"Sweep **{sweep_id}**: {len(ids)} jobs queued (#{ids[0]}–#{ids[-1]}); follow them in the Jobs "
                    "tab, compare them in the Compare tab." + (f" {len(plan.refused)} combination(s) refused: see "
                                                              "the sweep plan." if plan.refused else ""))
            return (note, gr.update(choices=_job_choices(service.list_jobs()), value=ids[0]),
                    gr.Tabs(selected="jobs"), *fields.values())
        spec = service.form_spec(**form, exports=exports)
        job_id = service.submit(spec)
    except service.FormError as exc:
        fields.update({k: _field_note(v) for k, v in exc.fields.items()})
        where = ", ".join(label for k, label in service.FORM_FIELDS.items() if k in exc.fields)
        return (f"**Not queued:** fix what is marked ⚠ next to: {where}.", gr.skip(), gr.skip(),
                *fields.values())
    except Exception as exc:
        return (_error(exc), gr.skip(), gr.skip(), *fields.values())
    note = f"Job **#{job_id}** ({spec.name}) queued; follow it in the Jobs tab."
    return (note, gr.update(choices=_job_choices(service.list_jobs()), value=job_id), gr.Tabs(selected="jobs"),
            *fields.values())


def _sweep_opened(on, bits, group, rank, lr, base):
    """Sweep mode swaps the single Bits and Group size fields for the values to try, starting from
    the single values; the group sizes offered are those the base model takes."""
    if not on:
        return gr.update(visible=True), gr.update(visible=False), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    try:
        lr_text = f"{float(lr):g}"
    except (TypeError, ValueError):
        lr_text = str(lr or "")
    try:
        sizes = service.group_size_choices(base)
    except Exception:  # the base field says what is wrong with it
        sizes = list(service.SWEEP_GROUP_SIZES)
    picked = [int(group)] if str(group).isdigit() and int(group) in sizes else sizes[:1]
    return (gr.update(visible=False), gr.update(visible=True), [int(bits)] if bits else [4],
            gr.update(choices=sizes, value=picked), str(rank if rank is not None else ""), lr_text)


def _sweep_plan(on, base, bits, group_size, method, kind, builtin, upload, path, rank, alpha, lr, steps, batch, seq,
                name, wanted, sweep_bits, sweep_groups, sweep_ranks, sweep_lrs, devices=1):
    """How many jobs the sweep makes and what it refuses, as the values are picked (the dataset's
    rows are read at Launch)."""
    if not on:
        return gr.skip()
    grid = {"bits": sweep_bits, "group_size": sweep_groups, "rank": sweep_ranks, "lr": sweep_lrs}
    try:
        plan = service.plan_sweep(grid, kind="built-in", builtin="builtin:default", upload=None, path=None,
                                  check_rows=False, base=base, bits=bits, group_size=group_size, method=method,
                                  rank=rank, alpha=alpha, lr=lr, steps=steps, batch_size=batch, seq_len=seq,
                                  name=name, exports=list(wanted or []), devices=devices)
    except service.FormError as exc:
        return "⚠ " + service.with_upload_names(" ".join(exc.fields.values()))
    except Exception as exc:
        return _error(exc)
    return plan.summary()


def _bits_changed(bits):
    """The bit width's preset into the advanced fields, and the note that says so."""
    preset, note = service.bits_preset(bits)
    return [preset[k] for k in service.BIT_PRESET_FIELDS] + [note]


def build_new_tab():
    preset = {**service.PRESETS[service.DEFAULT_PRESET], **service.bits_preset(4)[0]}
    with gr.Row():
        with gr.Column():
            base = gr.Dropdown(list(service.BASE_CHOICES), value="default", allow_custom_value=True,
                               label="Base model", elem_id="base-model",
                               info="'default': the embedded SmolLM2-135M; 'tiny-random' for a smoke test; "
                                    "or type a local folder, a .gguf file or a Hub id (LLaMA family).")
            base_note = gr.Markdown(f"Group sizes valid for this model: {service.group_size_choices('default')}.",
                                    elem_id="base-note")
            base_err = gr.Markdown(elem_id="base-error", elem_classes="field-error")
            with gr.Row(elem_id="single-values") as single_values:  # swapped for the values to try in a sweep
                bits = gr.Radio(list(service.BITS_CHOICES), value=4, label="Bits", elem_id="bits")
                group = gr.Dropdown(service.group_size_choices("default"), value=service.DEFAULT_GROUP_SIZE,
                                    allow_custom_value=True, label="Group size", elem_id="group-size")
            bits_note = gr.Markdown(service.bits_preset(4)[1], elem_id="bits-note")
            group_err = gr.Markdown(elem_id="group-size-error", elem_classes="field-error")
            method = gr.Radio(list(service.METHOD_CHOICES), value="rtn", label="Quantization method")
            presets = gr.Radio(list(service.PRESETS), value=service.DEFAULT_PRESET, label="Preset")
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    rank = gr.Number(preset["rank"], label="LoRA rank", precision=0, elem_id="rank")
                    alpha = gr.Number(preset["alpha"], label="LoRA alpha", elem_id="alpha")
                    lr = gr.Number(preset["lr"], label="Learning rate", elem_id="lr")
                with gr.Row():
                    clip = gr.Checkbox(preset["clip"], label="Clip search", elem_id="clip",
                                       info="Per group, the range with the least rounding error instead of "
                                            "min-max: a better start at 2-3 bits.")
                    train_scales = gr.Checkbox(preset["train_scales"], elem_id="train-scales",
                                               label="Also train the quantization scales; the merge stays exact",
                                               info="The codes stay frozen; the merged model keeps the learned "
                                                    "scales (QA-LoRA + learned scales).")
                    scales_lr = gr.Number(preset["scales_lr"], label="Scales learning rate", elem_id="scales-lr")
                with gr.Row():
                    steps = gr.Number(preset["steps"], label="Steps", precision=0, elem_id="steps")
                    batch = gr.Number(preset["batch_size"], label="Batch size", precision=0, elem_id="batch-size")
                    seq = gr.Number(preset["seq_len"], label="Sequence length", precision=0, elem_id="seq-len")
                gpus = service.device_choices()
                devices = gr.Number(1, label="GPUs for this job", precision=0, minimum=1, maximum=max(gpus, 1),
                                    visible=gpus > 1, elem_id="devices",
                                    info=f"Data-parallel on up to {gpus} GPUs: the global batch is batch size × GPUs; "
                                         "it waits for a worker that owns that many.")
            advanced_err = gr.Markdown(elem_id="advanced-error", elem_classes="field-error")
            exports = gr.CheckboxGroup([(service.DOWNLOAD_FORMATS[f], f) for f in service.EXTRA_EXPORTS],
                                       value=["gguf"], label="Also export when done", elem_id="exports",
                                       info="The native low-bit model and the adapter are always saved.")
            wanted = gr.State(["gguf"])  # ticked by the user, hidden or not
            exports_note = gr.Markdown(elem_id="exports-note")
            exports_err = gr.Markdown(elem_id="exports-error", elem_classes="field-error")
            with gr.Group():
                benchmarks = gr.Dropdown(service.benchmark_choices(), value="none", elem_id="benchmarks",
                                         label="Benchmarks after training (lm-evaluation-harness)",
                                         info="Scores the merged model, and once per base and settings the 16-bit "
                                              "base and the quantized base. Task data is downloaded from the Hub.")
                with gr.Row(visible=False) as bench_row:
                    bench_tasks = gr.Textbox(label="Tasks (comma-separated lm-eval names)", elem_id="bench-tasks",
                                             placeholder="hellaswag, arc_easy", visible=False)
                    bench_limit = gr.Number(None, label="Per-task limit (optional)", precision=0,
                                            elem_id="bench-limit", info="At most this many documents per task.")
            bench_err = gr.Markdown(elem_id="benchmarks-error", elem_classes="field-error")
            name = gr.Textbox(label="Run name (optional)", elem_id="run-name")
            sweep = gr.Checkbox(False, label="Sweep: queue one job per combination of several values",
                                elem_id="sweep-mode")
            with gr.Group(visible=False) as sweep_box:
                sweep_bits = gr.CheckboxGroup(list(service.BITS_CHOICES), value=[4], label="Bits to try",
                                              elem_id="sweep-bits")
                sweep_groups = gr.CheckboxGroup(service.group_size_choices("default"),
                                                value=[service.DEFAULT_GROUP_SIZE], label="Group sizes to try",
                                                elem_id="sweep-groups", info="The sizes this base model takes.")
                with gr.Row():
                    sweep_ranks = gr.Textbox(str(preset["rank"]), label="Ranks to try", elem_id="sweep-ranks",
                                             info="Comma-separated; alpha keeps the advanced settings' alpha/rank.")
                    sweep_lrs = gr.Textbox(f"{preset['lr']:g}", label="Learning rates to try", elem_id="sweep-lrs",
                                           info="Comma-separated, e.g. 1e-4, 3e-4.")
                sweep_plan = gr.Markdown(elem_id="sweep-plan")
            sweep_err = gr.Markdown(elem_id="sweep-error", elem_classes="field-error")
        with gr.Column():
            kind = gr.Radio(list(service.DATA_KINDS), value="built-in", label="Dataset")
            builtins = service.builtin_choices()
            builtin = gr.Dropdown(builtins, value=builtins[0][1], label="Built-in dataset", elem_id="builtin-data")
            upload = gr.File(label="Upload .jsonl / .json / .csv / .parquet", file_types=[".jsonl", ".json", ".csv",
                             ".parquet"], type="filepath", visible=False)
            path = gr.Textbox(label="File path, dataset folder, or Hub dataset ID[:CONFIG][@SPLIT]", visible=False)
            hub_id = gr.Textbox(label="Hub dataset id", placeholder="tatsu-lab/alpaca, or org/name:config@split",
                                visible=False, elem_id="hub-id",
                                info="Checked on the Hub when you press Enter or leave the box (no rows downloaded).")
            with gr.Row(visible=False) as hub_fields:
                hub_config = gr.Dropdown([], label="Config", allow_custom_value=True, elem_id="hub-config")
                hub_split = gr.Dropdown([], label="Split", allow_custom_value=True, elem_id="hub-split")
            hub_note = gr.Markdown(elem_id="hub-note")
            with gr.Accordion("Column mapping", open=False, visible=False, elem_id="column-mapping") as mapping_box:
                with gr.Row():
                    map_prompt = gr.Dropdown([NO_COLUMN], value=NO_COLUMN, label="Prompt", elem_id="map-prompt")
                    map_input = gr.Dropdown([NO_COLUMN], value=NO_COLUMN, label="Input (optional)",
                                            elem_id="map-input")
                    map_response = gr.Dropdown([NO_COLUMN], value=NO_COLUMN, label="Response", elem_id="map-response")
                    map_messages = gr.Dropdown([NO_COLUMN], value=NO_COLUMN, label="…or a messages column",
                                               elem_id="map-messages")
            max_samples = gr.Number(None, label="Max records (optional)", precision=0, elem_id="max-samples",
                                    info="Train on a sample of this many records, drawn with the run's seed (the "
                                         "paper: 320K of FLAN v2).")
            data_err = gr.Markdown(elem_id="data-error", elem_classes="field-error")
            preview_btn = gr.Button("Preview dataset")
            preview = gr.Markdown(elem_id="dataset-preview")
    launch = gr.Button("Launch fine-tune", variant="primary", elem_id="launch")
    status = gr.Markdown(elem_id="launch-status")

    base.change(_base_changed, [base, sweep_groups], [group, base_note, base_err, sweep_groups])
    for control in (bits, group):  # the export choices follow bits and group size live
        control.change(_exports_for, [bits, group, wanted], [exports, exports_note], show_progress="hidden")
    exports.input(_ticked, [exports, wanted, bits, group], wanted, show_progress="hidden")
    fields = ("steps", "batch_size", "seq_len")
    presets.change(lambda p: [service.PRESETS[p][k] for k in fields], presets, [steps, batch, seq])
    bits.change(_bits_changed, bits, [rank, alpha, lr, clip, train_scales, scales_lr, bits_note],
                show_progress="hidden")
    kind.change(lambda k: [gr.update(visible=k == v) for v in service.DATA_KINDS]
                + [gr.update(visible=k == "Hub dataset")] * 2,
                kind, [builtin, upload, path, hub_id, hub_fields, mapping_box])
    data_inputs = [kind, builtin, upload, path, base, hub_id, hub_config, hub_split]
    preview_btn.click(_dataset_preview, data_inputs, preview)
    upload.upload(_dataset_preview, data_inputs, preview)
    path.submit(_dataset_preview, data_inputs, preview)
    hub_outputs = [hub_note, hub_config, hub_split, map_prompt, map_input, map_response, map_messages, mapping_box]
    for event in (hub_id.submit, hub_id.blur, builtin.change):
        event(_hub_checked, [kind, builtin, hub_id], hub_outputs)
    hub_config.input(_hub_checked, [kind, builtin, hub_id, hub_config], hub_outputs)
    inputs = [base, bits, group, method, kind, builtin, upload, path, rank, alpha, lr, steps, batch, seq, name,
              wanted, sweep, sweep_bits, sweep_groups, sweep_ranks, sweep_lrs, devices, hub_id, hub_config, hub_split,
              map_prompt, map_input, map_response, map_messages, max_samples, benchmarks, bench_tasks, bench_limit,
              clip, train_scales, scales_lr]
    benchmarks.change(lambda b: (gr.update(visible=b != "none"), gr.update(visible=b == "custom")), benchmarks,
                      [bench_row, bench_tasks])
    sweep.change(_sweep_opened, [sweep, bits, group, rank, lr, base],
                 [single_values, sweep_box, sweep_bits, sweep_groups, sweep_ranks, sweep_lrs])
    plan_inputs = [sweep, *inputs[:16], sweep_bits, sweep_groups, sweep_ranks, sweep_lrs, devices]
    for control in (sweep_bits, sweep_groups, base, method, steps, rank, alpha):
        control.change(_sweep_plan, plan_inputs, sweep_plan, show_progress="hidden")
    for control in (sweep_ranks, sweep_lrs):
        control.blur(_sweep_plan, plan_inputs, sweep_plan, show_progress="hidden")
        control.submit(_sweep_plan, plan_inputs, sweep_plan, show_progress="hidden")
    notes = dict(base=base_err, group_size=group_err, exports=exports_err, data=data_err, advanced=advanced_err,
                 sweep=sweep_err, benchmarks=bench_err)
    return launch, inputs, [status, *(notes[k] for k in service.FORM_FIELDS)]


# ---- Jobs ------------------------------------------------------------------------------------

def _job_rows(jobs: list[dict]) -> pd.DataFrame:
    rows = []
    for j in jobs:
        tps = (j["report"] or {}).get("tokens_per_s")
        if j["status"] == "running" and j["step"]:
            last = service.get_job(j["id"], metrics_after=j["step"] - 1)["metrics"]
            tps = last[-1]["tokens_per_s"] if last else None
        status = "running (stalled)" if j.get("stalled_s") else j["status"]
        rows.append([j["id"], j["name"], status, j["stage_text"] if j["status"] == "running" else "",
                     f"{j['step']}/{j['total_steps']} ({j['progress']:.0%})",
                     "" if j["loss"] is None else round(j["loss"], 4),
                     _duration(j["eta_s"]) if j["status"] == "running" else "", "" if tps is None else round(tps),
                     j["sweep_id"] or "", j["created_at"].strftime("%Y-%m-%d %H:%M") if j["created_at"] else ""])
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def _loss_frame(metrics: list[dict], job: str = "") -> pd.DataFrame | None:
    """Train and eval loss in long form (``job``, ``split``, ``x`` = step, ``loss``); ``None`` when
    there is none yet."""
    rows = [(job, "train", m["step"], m["train_loss"]) for m in metrics if m["train_loss"] is not None]
    rows += [(job, "eval", m["step"], m["eval_loss"]) for m in metrics if m["eval_loss"] is not None]
    if not rows:
        return None
    return pd.DataFrame(rows, columns=["job", "split", "x", "loss"]).astype({"x": "int64", "loss": "float64"})


def _loss_plot(job: dict):
    """The Jobs tab's loss chart: whole steps from 0 to the run's last step, train and eval of one
    hue; it holds every step the header counts (both come from one read of the job)."""
    frame = _loss_frame(job["metrics"], f"#{job['id']}")
    if frame is None:
        return None
    return charts.curves(frame, "step", total=int(job["total_steps"] or frame["x"].max()), title="Loss")


def _job_summary(job: dict) -> str:
    running = job["status"] == "running"
    stage = f"stage `{job['stage_text'] if running else job['stage'] or '-'}`"
    if running and job["stage_eta_s"] is not None:
        stage += f" (about {_duration(job['stage_eta_s'])} left in it)"
    eta = (_duration(job["eta_s"]) if job["eta_s"] is not None else "estimated once training starts") if running else "-"
    train, devices = (job["spec"] or {}).get("train") or {}, int((job["spec"] or {}).get("devices") or 1)
    batch, accum = train.get("batch_size", 0), train.get("grad_accum", 1)
    lines = [f"### #{job['id']} {job['name']}: **{job['status']}**",
             f"{stage} · step {job['step']}/{job['total_steps']} · job ETA {eta} · global batch {batch * accum * devices} "
             f"({batch} × {accum} accumulation × {devices} device{'s' if devices > 1 else ''})",
             service.job_overview(job)]
    tasks = service.export_tasks(job["id"]) if job["status"] == "succeeded" else []
    if tasks:
        lines.append("Exports asked for later: " + ", ".join(
            f"{t['format']} {t['status']}" + (f" ({t['error']})" if t["error"] else "") for t in tasks))
    benches = service.benchmark_tasks(job["id"]) if job["status"] == "succeeded" else []
    if benches:
        lines.append("Benchmarks asked for later: " + ", ".join(_bench_text(t) for t in benches))
    if job.get("stalled_s"):
        lines.append(f"**Stalled:** no progress for {_duration(job['stalled_s'])} (the worker is alive but the "
                     f"job does not move; cancel and resume it if this lasts). Last log line: "
                     f"`{job.get('last_log_line') or '-'}`")
    if job["error"]:
        lines.append(f"**Error:** {job['error']}")
    return "\n\n".join(lines)


def _bench_text(task: dict) -> str:
    """One benchmark task: its tasks and status, with its progress in requests and ETA while it runs."""
    text = f"{', '.join(task['settings']['tasks'])} {task['status']}"
    if task["status"] == "running" and task["total"]:
        eta = f", about {_duration(task['eta_s'])} left" if task["eta_s"] is not None else ""
        text += f" ({task['done']}/{task['total']} requests{eta})"
    return text + (f" ({task['error']})" if task["error"] else "")


def _merge_check(job: dict) -> str:
    r = job["report"]
    if not r:
        return "*Merge check appears when the job succeeds.*"
    text = (f"**Merge check:** max |logit difference| {r['merge_max_abs_logit_diff']:.3g} · eval loss "
            f"quantized base {r['eval_loss_quantized_base']:.4f} → with adapter {r['eval_loss_adapter']:.4f} · "
            f"merged {r['eval_loss_merged']:.4f}")
    mc = r.get("multiple_choice")
    if mc:
        text += (f"\n\n**Multiple choice** ({mc['data']}): {mc['correct']}/{mc['n']} = {mc['accuracy']:.0%} "
                 f"(chance {mc['chance']:.0%})")
    gen = r.get("generation")
    if gen:
        text += f"\n\n**Held-out replies, exact:** {gen['exact']}/{gen['n']} = {gen['accuracy']:.0%}"
        for ex in gen["examples"][:1]:
            text += f" · e.g. expected `{_clip(ex['expected'])}`, got `{_clip(ex['got']) or '(nothing)'}`"
    bench = r.get("benchmarks") or {}
    for task, score in (bench.get("merged") or {}).items():
        base16, qbase = ((bench.get(k) or {}).get(task, {}).get("value") for k in ("base16", "quantized_base"))
        text += (f"\n\n**{task}** ({score['metric']}, lm-eval): 16-bit base {_score(base16)} · quantized base "
                 f"{_score(qbase)} · merged **{_score(score['value'])}**")
    for fmt, result in (r.get("exports") or {}).items():
        text += f"\n\n**{fmt.upper()} export:** {service.export_note(result)}"
    return text


def _score(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def _clip(text: str, n: int = 80) -> str:
    """One line of at most ``n`` characters, safe inside Markdown backticks."""
    line = " ".join(str(text).split()).replace("`", "'")
    return line if len(line) <= n else line[:n - 1] + "…"


def _job_with_metrics(job_id: int, seen: dict) -> tuple[dict, dict]:
    """The job with all its metrics, fetching only the rows after those this page already has.

    A new attempt (a resume) may rewrite the steps after its checkpoint: then all are fetched again.
    """
    cached = seen.get("metrics") if seen.get("metrics_of") == job_id else None
    job = service.get_job(job_id, metrics_after=cached[-1]["step"] if cached else 0)
    if cached and job["attempts"] != seen.get("metrics_attempts"):
        cached, job = None, service.get_job(job_id)
    job["metrics"] = (cached or []) + job["metrics"]
    return job, {**seen, "metrics_of": job_id, "metrics": job["metrics"], "metrics_attempts": job["attempts"]}


def _refresh(selected, seen):
    """One timer tick; parts that did not change are skipped so nothing flickers or closes."""
    jobs = service.list_jobs()
    rows, choices = _job_rows(jobs), _job_choices(jobs)
    table = rows if rows.values.tolist() != seen.get("rows") else gr.skip()
    picker = gr.update(choices=choices) if choices != seen.get("choices") else gr.skip()
    seen = {**seen, "rows": rows.values.tolist(), "choices": choices}
    if selected is None:
        if seen.get("job") == "none":
            return table, picker, gr.skip(), gr.skip(), gr.skip(), gr.skip(), seen
        return table, picker, "*Select a job.*", None, "", "", {**seen, "job": "none"}
    try:
        job, seen = _job_with_metrics(int(selected), seen)
    except Exception as exc:
        return table, picker, f"**Error:** {exc}", None, "", "", {**seen, "job": None}
    exports = (tuple((t["format"], t["status"]) for t in service.export_tasks(job["id"]))
               + tuple((t["id"], t["status"], t["done"]) for t in service.benchmark_tasks(job["id"]))
               if job["status"] == "succeeded" else ())
    key = (job["id"], job["status"], job["stage_text"], len(job["metrics"]), exports,
           None if job["stage_eta_s"] is None else round(job["stage_eta_s"]))
    if key == seen.get("job"):
        return table, picker, gr.skip(), gr.skip(), gr.skip(), gr.skip(), seen
    return (table, picker, _job_summary(job), _loss_plot(job), _merge_check(job),
            service.readable_log(job["id"], LOG_LINES), {**seen, "job": key})


def _move(direction, selected):
    """Move the selected queued job one place sooner or later; says where it now stands."""
    if selected is None:
        return "Select a job first."
    try:
        order = service.move(int(selected), direction)
    except Exception as exc:
        return _error(exc)
    return (f"Job #{selected} is now {order.index(int(selected)) + 1} of {len(order)} in the queue "
            f"(runs in this order: {', '.join(f'#{i}' for i in order)}).")


def _evaluate(selected, choice, tasks, limit):
    """Queue lm-eval on the selected finished job for a worker; its progress shows in the summary."""
    if selected is None:
        return "Select a finished job first."
    try:
        task = service.request_benchmark(int(selected), choice, tasks, limit)
    except Exception as exc:
        return _error(exc)
    return (f"Benchmarks {', '.join(task['settings']['tasks'])} of job #{selected}: {task['status']} (task "
            f"#{task['id']}); a worker runs them when no job waits, the job's summary shows the progress.")


def _stop_benchmark(selected):
    if selected is None:
        return "Select a job first."
    try:
        stopped = service.cancel_benchmark(int(selected))
    except Exception as exc:
        return _error(exc)
    return (f"Stopping benchmark task(s) {', '.join(f'#{i}' for i in stopped)} (between two requests)." if stopped
            else f"Job #{selected} has no benchmark queued or running.")


def _cancel_sweep(selected):
    """Cancel every job of the selected job's sweep that has not ended."""
    if selected is None:
        return "Select a job of the sweep first."
    try:
        sweep_id = service.get_job(int(selected), metrics_after=service.NO_METRICS)["sweep_id"]
        if not sweep_id:
            return f"Job #{selected} is not part of a sweep; use Cancel."
        out = service.cancel_sweep(sweep_id)
    except Exception as exc:
        return _error(exc)
    ids = lambda key: ", ".join(f"#{i}" for i in out[key]) or "none"  # noqa: E731
    return (f"Sweep {sweep_id}: canceled {ids('canceled')}; stopping after their current step {ids('stopping')}; "
            f"already ended, left as they are {ids('ended')}.")


def _act(action, selected):
    if selected is None:
        return "Select a job first."
    try:
        before = getattr(service, action)(int(selected))
    except Exception as exc:
        return _error(exc)
    if action == "cancel":
        return ("Cancel requested; the job stops after its current step." if before["status"] == "running"
                else "Canceled.")  # a queued or interrupted job is canceled at once
    return {
            "resume": "Queued again; it resumes from its last checkpoint.",
            "delete": "Deleted, with its files."}[action]


DOWNLOADS_KEEP_S = 3600


def _download_folder() -> Path:
    """A fresh folder per request (two clicks never write the same file); old ones are removed."""
    import shutil
    import time

    root = Path(tempfile.gettempdir()) / "qalora-downloads"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.is_dir() and time.time() - old.stat().st_mtime > DOWNLOADS_KEEP_S:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=root))


def _download(selected, fmt="native"):
    """Stream: what is being packed and for how long, then the file."""
    if selected is None:
        yield gr.skip(), "Select a job first."
        return
    label = "the job log" if fmt == "log" else service.DOWNLOAD_FORMATS.get(fmt, fmt)
    yield None, gr.skip()  # no file until this one is ready: the click-through below sends only a new file
    try:
        work = ((lambda: service.download_log(int(selected)))
                if fmt == "log" else lambda: service.download_model(int(selected), fmt, _download_folder()))
        for item in _waiting(work, lambda t: f"*Preparing {label} of job #{selected} for download (packing its "
                                             f"files into one archive)… {t:.0f} s*"):
            if isinstance(item, str):
                yield gr.skip(), item
            else:
                path, note = item[1]
    except service.ExportQueued as queued:
        yield gr.skip(), str(queued)
        return
    except Exception as exc:
        yield gr.skip(), _error(exc)
        return
    yield str(path), f"Downloading {note}"


# Once the file is ready the browser saves it: one click on Download, no file chip to click again.
SAVE_FILE_JS = """(file) => {
    if (file && file.url) {
        const link = document.createElement("a");
        link.href = file.url;
        link.download = file.orig_name || "";
        document.body.appendChild(link);
        link.click();
        link.remove();
    }
    return [];
}"""


def build_jobs_tab():
    # filled as the page loads (a callable value runs on each load), not at the timer's first tick
    table = gr.Dataframe(lambda: _job_rows(service.list_jobs()), headers=JOB_COLUMNS, interactive=False,
                         label="Jobs (click a row)", elem_id="jobs-table")
    picker = gr.Dropdown([], value=None, label="Job", elem_id="job-select")
    summary = gr.Markdown("*Select a job.*", elem_id="job-summary")
    plot = gr.Plot(None, show_label=False, elem_id="loss-plot", elem_classes="chart")
    merge = gr.Markdown(elem_id="merge-check")
    with gr.Row():
        cancel, resume = gr.Button("Cancel"), gr.Button("Resume")
        up, down = gr.Button("Move up in queue", elem_id="move-up"), gr.Button("Move down", elem_id="move-down")
        cancel_sweep = gr.Button("Cancel its whole sweep", elem_id="cancel-sweep")
        delete, confirm = gr.Button("Delete"), gr.Button("Confirm delete", variant="stop", visible=False)
    with gr.Row():
        fmt = gr.Dropdown([(label, key) for key, label in service.DOWNLOAD_FORMATS.items()]
                          + [("job log (full, with tracebacks)", "log")], value="native",
                          label="Download", elem_id="download-format")
        download = gr.Button("Download", elem_id="download-button")
    with gr.Accordion("Evaluate a finished job on benchmarks (lm-evaluation-harness)", open=False,
                      elem_id="evaluate-box"):
        with gr.Row():
            bench = gr.Dropdown(service.benchmark_choices()[1:], value="mmlu-5shot", label="Benchmarks",
                                elem_id="evaluate-benchmarks")
            bench_tasks = gr.Textbox(label="Tasks (custom: comma-separated lm-eval names)", elem_id="evaluate-tasks")
            bench_limit = gr.Number(None, label="Per-task limit (optional)", precision=0, elem_id="evaluate-limit")
        with gr.Row():
            evaluate = gr.Button("Evaluate", elem_id="evaluate-button")
            stop_bench = gr.Button("Stop benchmark", elem_id="stop-benchmark")
    action_note = gr.Markdown(elem_id="action-note")
    file = gr.File(label="Model file", visible=False)  # holds the prepared file for SAVE_FILE_JS
    log = gr.Textbox(label="Log (last lines)", lines=16, max_lines=16, autoscroll=True, elem_id="job-log")
    seen = gr.State({})

    outputs = [table, picker, summary, plot, merge, log, seen]
    gr.Timer(REFRESH_S).tick(_refresh, [picker, seen], outputs, show_progress="hidden", concurrency_limit=None)
    picker.change(lambda p, s: _refresh(p, {**s, "job": None}), [picker, seen], outputs, show_progress="hidden")
    table.select(_row_job, None, picker)
    cancel.click(lambda p: _act("cancel", p), picker, action_note)
    resume.click(lambda p: _act("resume", p), picker, action_note)
    up.click(lambda p: _move("up", p), picker, action_note)
    down.click(lambda p: _move("down", p), picker, action_note)
    cancel_sweep.click(_cancel_sweep, picker, action_note)
    delete.click(lambda: gr.update(visible=True), None, confirm)
    confirm.click(lambda p: (_act("delete", p), gr.update(visible=False), None), picker, [action_note, confirm, picker])
    download.click(_download, [picker, fmt], [file, action_note]).then(None, file, None, js=SAVE_FILE_JS)
    evaluate.click(_evaluate, [picker, bench, bench_tasks, bench_limit], action_note)
    stop_bench.click(_stop_benchmark, picker, action_note)
    return picker


def _row_job(evt: gr.SelectData):
    return int(evt.row_value[0]) if evt.row_value else gr.skip()


# ---- Compare ---------------------------------------------------------------------------------

BEST_CSS = "background-color: #d1fae5; font-weight: 700"
COMPARE_HINT = "*Pick jobs (or a sweep) to compare their curves, settings and outcomes.*"


def _comparable_choices() -> list[tuple[str, int]]:
    """Every job: finished, running and queued (a queued one is listed, without curves until it
    starts), so whatever a sweep holds can be picked."""
    return _job_choices(service.list_jobs())


def _sweep_choices() -> list[tuple[str, str]]:
    return [(f"{w['sweep_id']} ({w['jobs']} jobs)", w["sweep_id"]) for w in service.list_sweeps()]


def _compare_table(result: dict):
    """The comparison as a styled table: numbers kept as numbers (so a header click sorts them),
    shown rounded, the best value of each outcome column highlighted."""
    from jobs.compare import _cell

    cols = result["columns"]
    frame = pd.DataFrame([[r.get(k) for k, _, _ in cols] for r in result["rows"]], columns=[h for _, h, _ in cols])
    ids = [r["id"] for r in result["rows"]]

    def marks(_):
        return pd.DataFrame([[BEST_CSS if i in result["best"].get(k, ()) else "" for k, _, _ in cols] for i in ids],
                            columns=frame.columns)

    formats = {h: (lambda v, k=k: _cell(k, None if pd.isna(v) else v)) for k, h, _ in cols}
    return frame.style.apply(marks, axis=None).format(formats)


def _statuses(rows: list[dict]) -> str:
    """"4 jobs: 1 finished, 2 running (their curves grow), 1 queued (no curve until it starts)"."""
    count = {s: sum(r["status"] == s for r in rows) for s in ("succeeded", "running", "queued")}
    parts = [f"{count['succeeded']} finished"] if count["succeeded"] else []
    if count["running"]:
        parts.append(f"{count['running']} running (curves grow, outcomes appear when it ends)")
    if count["queued"]:
        parts.append(f"{count['queued']} queued (no curve until it starts)")
    other = len(rows) - sum(count.values())
    if other:
        parts.append(f"{other} failed, canceled or interrupted (outcomes as far as they got)")
    return f"{len(rows)} job{'s' if len(rows) != 1 else ''}: " + ", ".join(parts)


def _compare(picked, x_axis, quality):
    """(curves, table, scatter, CSV button, note) for the picked jobs."""
    ids = [int(i) for i in picked or []]
    if not ids:
        return None, None, None, gr.update(visible=False), COMPARE_HINT
    try:
        result = service.compare(ids)
        csv_path = service.compare_csv(ids, _download_folder())
    except Exception as exc:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), _error(exc)
    x = "tokens" if x_axis == "tokens seen" else "step"
    curves = pd.DataFrame(result["curves"], columns=["job", "split", "series", "step", "tokens", "loss"])
    curves = curves.assign(x=curves[x]).astype({"x": "int64", "loss": "float64"})
    key, _ = service.COMPARE_QUALITY[quality]
    points = pd.DataFrame([{**p, "quality": p[key], "frontier": p[f"{key}_frontier"]} for p in result["scatter"]
                           if p[key] is not None],
                          columns=["job", "merged_mb", "quality", "frontier", "bits", "group_size", "rank"])
    note = (f"{_statuses(result['rows'])}. The best value per outcome among finished jobs is highlighted; the "
            "frontier is the jobs no other job beats on both merged size and quality.")
    if x == "step":  # the longest run's steps, so a running job's curve is seen against its end
        total = max([int(r.get("steps") or 0) for r in result["rows"]] + [int(curves["x"].max()) if len(curves) else 0])
    else:
        total = int(curves["x"].max()) if len(curves) else 0
    return (charts.curves(curves, "training tokens seen" if x == "tokens" else "step", total=total,
                          whole=x == "step") if len(curves) else None,
            _compare_table(result),
            charts.scatter(points, quality) if len(points) else None,
            gr.update(value=str(csv_path), visible=True), note)


def _compare_opened(picked, sweep):
    """Fresh choices; with nothing picked yet, the newest sweep and its jobs are picked. A pick
    whose job is gone (deleted) is dropped rather than refused by the picker."""
    jobs, sweeps = _comparable_choices(), _sweep_choices()
    offered = {value for _, value in jobs}
    kept = [int(i) for i in picked or [] if int(i) in offered]
    if kept or not sweeps:
        sweep = sweep if sweep in {value for _, value in sweeps} else None
        return (gr.update(choices=jobs, value=kept) if kept != list(picked or []) else gr.update(choices=jobs),
                gr.update(choices=sweeps, value=sweep))
    newest = sweeps[0][1]
    return gr.update(choices=jobs, value=service.sweep_jobs(newest)), gr.update(choices=sweeps, value=newest)


def _sweep_picked(sweep):
    """Picking a sweep picks its jobs, in whatever state (the picker offers them all, fresh)."""
    if not sweep:
        return gr.skip()
    return gr.update(choices=_comparable_choices(), value=service.sweep_jobs(sweep))


def _compare_state(picked) -> tuple:
    """What a redraw depends on: each picked job's status, step and stage (a queued job starting,
    a running one stepping or finishing)."""
    ids = {int(i) for i in picked or []}
    return tuple((j["id"], j["status"], j["step"], j["stage"]) for j in service.list_jobs() if j["id"] in ids)


def _compare_tick(picked, x_axis, quality, seen):
    """The timer: redraw only when a picked job moved (started, stepped, finished); the picker's
    labels follow their jobs' statuses."""
    state = _compare_state(picked)
    if state == seen:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), seen
    choices = _comparable_choices()
    return (*_compare(picked, x_axis, quality), gr.update(choices=choices), state)


def build_compare_tab():
    with gr.Row():
        sweep = gr.Dropdown([], value=None, label="Sweep", elem_id="compare-sweep", scale=2,
                            info="Picking a sweep picks its jobs.")
        picked = gr.Dropdown([], value=[], multiselect=True, label="Jobs to compare", elem_id="compare-jobs", scale=5)
    with gr.Row():
        x_axis = gr.Radio(["step", "tokens seen"], value="step", label="Loss curves by", elem_id="compare-x")
        quality = gr.Radio(list(service.COMPARE_QUALITY), value=next(iter(service.COMPARE_QUALITY)),
                           label="Quality axis of the size-vs-quality plot", elem_id="compare-quality")
    note = gr.Markdown(COMPARE_HINT, elem_id="compare-note")
    curves = gr.Plot(None, show_label=False, elem_id="compare-curves", elem_classes="chart")
    table = gr.Dataframe(interactive=False, label="Settings and outcomes (click a header to sort; scroll sideways "
                         "for every outcome)", elem_id="compare-table", max_height=420, pinned_columns=2)
    with gr.Row():
        scatter = gr.Plot(None, show_label=False, elem_id="compare-scatter", scale=3, elem_classes="chart")
        csv = gr.DownloadButton("Download the table (CSV)", visible=False, elem_id="compare-csv", scale=1)
    seen = gr.State(())
    outputs = [curves, table, scatter, csv, note]
    sweep.input(_sweep_picked, sweep, picked)
    for control in (picked, x_axis, quality):
        control.change(_compare, [picked, x_axis, quality], outputs, show_progress="hidden").then(
            _compare_state, picked, seen, show_progress="hidden")
    gr.Timer(max(REFRESH_S, 1.0) * 2.5).tick(_compare_tick, [picked, x_axis, quality, seen],
                                              [*outputs, picked, seen], show_progress="hidden")
    return picked, sweep


# ---- Chat ------------------------------------------------------------------------------------

def _send(message, tuned, base, job_id, compare, system, max_new, temperature, top_p):
    """Stream the reply (and, side by side, the base model's reply to the same message)."""
    message = (message or "").strip()
    if not message:
        yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    if job_id is None:
        yield gr.skip(), gr.skip(), gr.skip(), _error(ValueError("pick a finished model first."))
        return
    histories = {"tuned": tuned or [], "base": base or []}
    replies: dict = {}
    try:
        keys = service.chat_keys(int(job_id), bool(compare))
        requests = {side: (key, service.build_messages(histories[side], message, system or ""))
                    for side, key in keys.items()}
        turn = lambda side, reply: [*histories[side], {"role": "user", "content": message},  # noqa: E731
                                    {"role": "assistant", "content": reply}]
        loaded = service.loaded_models()
        replies = {side: "" if loaded.get(side) == key else None for side, key in keys.items()}
        t0 = time.monotonic()
        shown = lambda replies: _chat_shown(replies, keys, job_id, time.monotonic() - t0)  # noqa: E731
        texts = shown(replies)
        yield "", turn("tuned", texts["tuned"]), turn("base", texts["base"]) if compare else gr.skip(), \
            _chat_progress(replies, keys, job_id, 0.0)
        # each side answers as soon as it is loaded: the fine-tuned reply streams while the base loads
        for replies in service.stream_side_by_side(requests, max_new_tokens=max_new, temperature=temperature,
                                                   top_p=top_p):
            texts = shown(replies)
            yield (gr.skip(), turn("tuned", texts["tuned"]), turn("base", texts["base"]) if compare else gr.skip(),
                   _chat_progress(replies, keys, job_id, time.monotonic() - t0))
    except Exception as exc:
        # a side that never loaded says so in its bubble; a reply already given stays
        failed = {side: turn(side, "*(no reply: see the message below)*") if replies.get(side, "") is None
                  else gr.skip() for side in ("tuned", "base")}
        yield gr.skip(), failed["tuned"], failed["base"], _error(exc)
        return
    loaded = f"Model #{job_id}" + (f" and base `{keys['base']}`" if compare else "")
    yield gr.skip(), gr.skip(), gr.skip(), f"{loaded} loaded; kept in memory for the next turn. {_answered_by(compare)}"


def _who(side: str, keys: dict, job_id) -> str:
    return f"the fine-tuned model #{job_id}" if side == "tuned" else f"the base model `{keys['base']}`"


def _chat_shown(replies: dict, keys: dict, job_id, waited: float) -> dict:
    """Each side's bubble: its reply so far, or what it waits for while its model loads."""
    return {side: (f"*Loading {_who(side, keys, job_id)} into memory… {waited:.0f} s (once: it stays loaded for "
                   "the next turns)*" if replies.get(side) is None else replies[side])
            for side in keys}


def _chat_progress(replies: dict, keys: dict, job_id, waited: float) -> str:
    """The status while answering: which runtime answers each side, named before it replies, and
    which side still loads."""
    parts = []
    for side in keys:
        if replies.get(side) is None:
            parts.append(f"loading {_who(side, keys, job_id)} into memory… {waited:.0f} s")
        elif side == "tuned":
            parts.append(f"Generating with {(service.runtime_of('tuned') or {}).get('name', 'the model')}…")
        else:
            parts.append(f"base model `{keys['base']}` on {(service.runtime_of('base') or {}).get('name', '?')}")
    text = " · ".join(parts)
    return f"*{text[:1].upper() + text[1:]}*"


def _answered_by(compare: bool) -> str:
    """Which runtime answered each side, and why that one."""
    tuned = service.runtime_of("tuned")
    if tuned is None:  # another session switched models meanwhile
        return ""
    text = f"Answered by **{tuned['name']}** ({tuned['reason']})."
    if compare and (base := service.runtime_of("base")):
        text += f" Base model: **{base['name']}** ({base['reason']})."
    return text


def _serve_note(job_id) -> str:
    """The command that serves the picked model to OpenAI clients, on the same runtime as this chat."""
    if job_id is None:
        return ""
    try:
        serve = service.serve_command(int(job_id))
    except Exception as exc:
        return _error(exc)
    return (f"OpenAI-compatible API for this model (same runtime as this chat): `{serve['command']}` "
            f"({serve['where']}), then "
            f"`OpenAI(base_url=\"{serve['base_url']}\", api_key=\"-\")` with `model=\"{serve['model_id']}\"`.")


def build_chat_tab():
    with gr.Row():
        model = gr.Dropdown([], value=None, label="Finished model", elem_id="chat-model", scale=3)
        refresh = gr.Button("↻ Refresh list", scale=1)
        compare = gr.Checkbox(False, label="Side by side with the base model", elem_id="chat-compare", scale=2)
    serve_note = gr.Markdown(elem_id="chat-serve")
    with gr.Accordion("Generation settings", open=False):
        system = gr.Textbox(label="System prompt", placeholder="(none)")
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, 0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, 0.95, step=0.05, label="Top-p")
            max_new = gr.Slider(8, 1024, 128, step=8, label="Max new tokens")
    with gr.Row():
        tuned = gr.Chatbot(label="Fine-tuned low-bit model", elem_id="chat-tuned", height=360, buttons=["copy"])
        base = gr.Chatbot(label="Base model", elem_id="chat-base", height=360, visible=False, buttons=["copy"])
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, elem_id="chat-input",
                             scale=5)
        send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
        clear = gr.Button("Clear", scale=1)
    status = gr.Markdown(elem_id="chat-status")

    refresh.click(lambda: gr.update(choices=_model_choices()), None, model)
    compare.change(lambda c: gr.update(visible=c), compare, base)
    model.change(lambda job_id: ([], [], _serve_note(job_id)), model, [tuned, base, serve_note])
    args = ([message, tuned, base, model, compare, system, max_new, temperature, top_p], [message, tuned, base, status])
    send.click(_send, *args)
    message.submit(_send, *args)
    clear.click(lambda: ([], []), None, [tuned, base])
    return model


# ---- Publish ---------------------------------------------------------------------------------

def _card(job_id, repo, formats=None):
    if job_id is None:
        return CARD_HINT, None, gr.skip()
    try:
        job = service.get_job(int(job_id))
    except Exception as exc:
        return _error(exc), None, gr.skip()
    repo = (repo or "").strip() or job["name"]
    # a bare name goes under the token's account when published; the snippet shows where
    repo_id = repo if "/" in repo else f"<your-hub-username>/{repo}"
    # the card's YAML header is metadata for the Hub; preview it as code, not as a heading
    _, meta, body = service.model_card(job, repo_id, formats).split("---\n", 2)
    body = body.replace("![loss curve](loss_curve.png)", "*(loss_curve.png: the image above)*")
    return f"```yaml\n{meta}```\n{body}", service.loss_curve(job), repo


def _publish_formats(job_id):
    """The format checkboxes for a job: every format it can have, all ticked; the others named
    with the reason underneath."""
    if job_id is None:
        return gr.skip(), ""
    try:
        ok, refused = service.publish_choices(service.get_job(int(job_id)))
    except Exception as exc:
        return gr.skip(), _error(exc)
    why = "; ".join(f"{f} is not offered: {reason}" for f, reason in refused.items())
    return (gr.update(choices=[(service.PUBLISH_FORMATS[f], f) for f in ok], value=ok),
            f"*{why}*" if why else "")


def _publish(job_id, repo, private, token, formats=None, progress=gr.Progress(track_tqdm=True)):
    """Upload; the token field is cleared afterwards so the page does not keep it either."""
    if job_id is None:
        return _error(ValueError("pick a finished model first.")), ""
    try:
        url = service.publish_job(int(job_id), repo, private=bool(private), token=token, formats=formats,
                                  progress=lambda fraction, text: progress(fraction, desc=text),
                                  allow_server_token=_ACCESS.server_token)
    except Exception as exc:
        return _error(exc), ""
    return f"Published ({'private' if private else 'public'}): [{url}]({url})", ""


def build_publish_tab():
    with gr.Row():
        with gr.Column(scale=1):
            model = gr.Dropdown([], value=None, label="Finished model", elem_id="publish-model")
            refresh = gr.Button("↻ Refresh list")
            repo = gr.Textbox(label="Repository name", placeholder="name or namespace/name", elem_id="publish-repo")
            private = gr.Checkbox(True, label="Private repository")
            formats = gr.CheckboxGroup([(v, k) for k, v in service.PUBLISH_FORMATS.items()],
                                       value=list(service.PUBLISH_FORMATS), label="Formats to upload",
                                       elem_id="publish-formats")
            formats_note = gr.Markdown(elem_id="publish-formats-note")
            token = gr.Textbox(label="Hugging Face token (optional)", type="password", elem_id="publish-token",
                               info="Used for this upload only, never stored. Empty: HF_TOKEN or your "
                                    "`hf auth login`.")
            publish = gr.Button("Publish to the Hub", variant="primary", elem_id="publish-button")
            result = gr.Markdown(elem_id="publish-result")
        with gr.Column(scale=2):
            curve = gr.Image(label="Loss curve (uploaded as loss_curve.png)", show_label=False, type="pil",
                             elem_id="publish-curve", buttons=["download", "fullscreen"])
            card = gr.Markdown(CARD_HINT, elem_id="card-preview")
    refresh.click(lambda: gr.update(choices=_model_choices()), None, model)
    model.change(_publish_formats, model, [formats, formats_note]).then(
        _card, [model, gr.State(""), formats], [card, curve, repo])
    repo.blur(_card, [model, repo, formats], [card, curve, repo])
    formats.input(_card, [model, repo, formats], [card, curve, repo])
    publish.click(_publish, [model, repo, private, token, formats], [result, token])
    return model


# ---- App -------------------------------------------------------------------------------------

def build_app() -> gr.Blocks:
    with gr.Blocks(title="QA-LoRA Studio", analytics_enabled=False) as app:
        gr.Markdown("# QA-LoRA Studio\nFine-tune a low-bit LLaMA-family model with quantization-aware LoRA, "
                    "watch it train, chat with it and publish it.")
        with gr.Tabs() as tabs:
            with gr.Tab("New fine-tune", id="new"):
                launch, launch_inputs, launch_outputs = build_new_tab()
            with gr.Tab("Jobs", id="jobs"):
                job_picker = build_jobs_tab()
            with gr.Tab("Compare", id="compare") as compare_tab:
                compare_jobs, compare_sweep = build_compare_tab()
            with gr.Tab("Chat", id="chat") as chat_tab:
                chat_model = build_chat_tab()
            with gr.Tab("Publish", id="publish") as publish_tab:
                publish_model = build_publish_tab()
        launch.click(_launch, launch_inputs, [launch_outputs[0], job_picker, tabs, *launch_outputs[1:]])
        # finished models appear when their tab is opened; the current choice is kept
        compare_tab.select(_compare_opened, [compare_jobs, compare_sweep], [compare_jobs, compare_sweep])
        for tab, picker in ((chat_tab, chat_model), (publish_tab, publish_model)):
            tab.select(_models_opened, picker, picker)
    return app


demo = build_app()


def _auth(raw: str | None):
    """``QALORA_AUTH``: ``user:password``, several separated by commas."""
    if not raw:
        return None
    users = []
    for entry in raw.split(","):
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise SystemExit("QALORA_AUTH must look like user:password (both non-empty; several separated by "
                             "commas); unset it to disable login.")
        users.append((user, password))
    return users


def _auth_file(path: str | None):
    """``QALORA_AUTH_FILE``: one ``user:password`` per line; blank lines and ``#`` comments skipped."""
    if not path:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SystemExit(f"QALORA_AUTH_FILE={path} cannot be read ({exc.strerror}); fix the path or unset it.")
    users = []
    for n, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            user, sep, password = line.strip().partition(":")
            if not sep or not user or not password:
                raise SystemExit(f"QALORA_AUTH_FILE line {n} must look like user:password (both non-empty).")
            users.append((user, password))
    if not users:
        raise SystemExit(f"QALORA_AUTH_FILE={path} names no user; add user:password lines or unset it.")
    return users


def _is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Access:
    auth: list | None               # Gradio's auth list, or None for no login
    server_token: bool              # may Publish fall back to HF_TOKEN / the login cache?
    warning: str | None = None      # printed at start


def access(host: str, no_auth: bool, env: dict) -> Access:
    """Who may use the app, decided before it starts: login is required off loopback."""
    users = (_auth(env.get("QALORA_AUTH")) or []) + (_auth_file(env.get("QALORA_AUTH_FILE")) or [])
    if users:
        return Access(users, server_token=True)
    if _is_loopback(host):
        return Access(None, server_token=True)
    if not no_auth:
        raise SystemExit(f"refusing to serve on {host} without a login: anyone who can reach it could run jobs on "
                         "this machine and use its files. Set QALORA_AUTH=user:password (or QALORA_AUTH_FILE), "
                         "or pass --no-auth if this network is yours alone.")
    return Access(None, server_token=False, warning=(
        f"WARNING: serving on {host} with no login (--no-auth). Anyone who can reach this address can start "
        "jobs, read their results and use the GPU. Publishing needs each visitor's own Hub token; the server's "
        "HF_TOKEN and login cache are not used."))


_ACCESS = Access(None, server_token=True)  # what the module-level demo uses; main() replaces it


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="QA-LoRA Studio web app")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--no-worker", action="store_true", help="do not start a training worker process")
    parser.add_argument("--no-auth", action="store_true",
                        help="serve beyond localhost without a login (not recommended; prints a warning)")
    args = parser.parse_args(argv)
    global _ACCESS
    _ACCESS = access(args.host, args.no_auth, dict(os.environ))
    if _ACCESS.warning:
        print(_ACCESS.warning, file=sys.stderr, flush=True)
    auth = _ACCESS.auth
    # SIGTERM stops the app like Ctrl-C does, so the workers below are stopped too
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workers = None if args.no_worker else service.WorkerPool().start()
    # the first dataset preview needs the default tokenizer: read it while the page loads
    threading.Thread(target=service.warm_up, name="warm-up", daemon=True).start()
    try:
        # no run history: it would keep every call's inputs, the publish token included, in the browser
        demo.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port, auth=auth,
                                                       show_error=True, run_history=False, css=CSS)
    finally:
        if workers is not None:
            workers.stop()  # SIGTERM: a running job checkpoints and goes back to the queue


if __name__ == "__main__":
    main()
