"""The New fine-tune tab: the form (base model, bits and group size, advanced settings, exports,
benchmarks, a sweep, the dataset), its live notes (valid group sizes, formats that apply, the
dataset's preview, the sweep plan) and Launch, which shows each problem next to its field."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from jobs import forms, service
from jobs.confine import with_upload_names
from jobs.spec import EXTRA_EXPORTS
from qalora.config import GROUP_SIZES
from qalora.data.hub import RECORD_COLUMNS, guess_columns, paper_dataset
from qalora.errors import QALoRAError

from .common import error_note, job_choices, waiting

NO_COLUMN = "(none)"


def _field_note(message: str | None) -> str:
    return f"⚠ {with_upload_names(message)}" if message else ""


def _data_path(kind, path, hub_id, hub_config, hub_split):
    """The path-or-name input, or for a Hub dataset the reference its fields compose."""
    return forms.hub_ref(hub_id, hub_config, hub_split) if kind == "Hub dataset" else path


def _mapping(prompt, extra, response, messages) -> dict:
    roles = {"prompt": prompt, "input": extra, "response": response, "messages": messages}
    return {role: column for role, column in roles.items() if column and column != NO_COLUMN}


def _hub_checked(kind, builtin, hub_id, config=None):
    """Ask the Hub about the dataset (about 2 s at most, no rows read): its configs, splits and
    columns fill the fields; columns of no known format open the column mapping with a guess."""
    keep = [gr.skip()] * 7
    if kind == "built-in":
        if not str(builtin or "").startswith("paper:"):
            return "", *keep
        ref = paper_dataset(builtin).ref
    elif kind != "Hub dataset" or not (hub_id or "").strip():
        return "", *keep
    else:
        ref = hub_id
    try:
        view = forms.hub_dataset(forms.hub_ref(ref, config))
    except Exception as exc:
        return error_note(exc), *keep
    known = set(view.columns) & set(RECORD_COLUMNS)
    guess = {} if known else guess_columns(view.columns)
    paper = paper_dataset(ref) if kind == "built-in" else None
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
        source = forms.data_source(kind, builtin, upload, _data_path(kind, path, hub_id, hub_config, hub_split))
        what = f"Reading {with_upload_names(source)} and loading the base model's tokenizer"
        for item in waiting(lambda: forms.preview_dataset(source, base), lambda t: f"*{what}… {t:.0f} s*"):
            if isinstance(item, str):
                yield item
            else:
                texts, count = item[1]
    except Exception as exc:
        yield error_note(exc)
        return
    shown = "\n\n".join(f"**Example {i + 1}**\n```text\n{t.strip()}\n```" for i, t in enumerate(texts))
    yield f"**{count} records.** The first, rendered as the model sees them:\n\n{shown}"


def _base_changed(base, swept):
    """(group size choices, note under the base field, base error, the sweep's group sizes to
    try: only valid ones, ticks kept where still valid); a Hub id is asked within 2 s."""
    try:
        sizes = forms.group_size_choices(base)
    except Exception as exc:
        return gr.update(), "", _field_note(str(exc)), gr.skip()
    value = forms.DEFAULT_GROUP_SIZE if forms.DEFAULT_GROUP_SIZE in sizes else sizes[0]
    kept = [int(g) for g in swept or [] if int(g) in sizes] or [value]
    return (gr.update(choices=sizes, value=value), f"Group sizes valid for this model: {sizes}.", "",
            gr.update(choices=sizes, value=kept))


def _exports_for(bits, group_size, wanted):
    """The export checkboxes follow bits and group size: a format that cannot apply is taken out of
    the choices, and the note under them says why. ``wanted`` is what the user ticked, including
    formats hidden for now, so a tick comes back when its format applies again."""
    try:
        ok, refused = forms.export_choices(bits, group_size)
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
        ok, _ = forms.export_choices(bits, group_size)
    except Exception:
        ok = EXTRA_EXPORTS
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
    fields = dict.fromkeys(forms.FIELDS, "")
    try:
        ok, _ = forms.export_choices(bits, group_size)
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
            except QALoRAError as exc:
                raise forms.FormError({"data": str(exc)}) from None
        if sweep:
            grid = {"bits": sweep_bits, "group_size": sweep_groups, "rank": sweep_ranks, "lr": sweep_lrs}
            plan = service.plan_sweep(grid, **form, exports=list(wanted or []))
            sweep_id, ids = service.submit_sweep(plan, name or "")
            note = (f"Sweep **{sweep_id}**: {len(ids)} jobs queued (#{ids[0]}–#{ids[-1]}); follow them in the Jobs "
                    "tab, compare them in the Compare tab." + (f" {len(plan.refused)} combination(s) refused: see "
                                                              "the sweep plan." if plan.refused else ""))
            return (note, gr.update(choices=job_choices(service.list_jobs()), value=ids[0]),
                    gr.Tabs(selected="jobs"), *fields.values())
        spec = forms.form_spec(**form, exports=exports)
        job_id = service.submit(spec)
    except forms.FormError as exc:
        fields.update({k: _field_note(v) for k, v in exc.fields.items()})
        where = ", ".join(label for k, label in forms.FIELDS.items() if k in exc.fields)
        return (f"**Not queued:** fix what is marked ⚠ next to: {where}.", gr.skip(), gr.skip(),
                *fields.values())
    except Exception as exc:
        return (error_note(exc), gr.skip(), gr.skip(), *fields.values())
    note = f"Job **#{job_id}** ({spec.name}) queued; follow it in the Jobs tab."
    return (note, gr.update(choices=job_choices(service.list_jobs()), value=job_id), gr.Tabs(selected="jobs"),
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
        sizes = forms.group_size_choices(base)
    except Exception:  # the base field says what is wrong with it
        sizes = list(GROUP_SIZES)  # a sweep offers them all; those the model cannot take are refused
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
    except forms.FormError as exc:
        return "⚠ " + with_upload_names(" ".join(exc.fields.values()))
    except Exception as exc:
        return error_note(exc)
    return plan.summary()


def _bits_changed(bits):
    """The bit width's preset into the advanced fields, and the note that says so."""
    preset, note = forms.bits_preset(bits)
    return [preset[k] for k in forms.BIT_PRESET_FIELDS] + [note]


# ---- Layout: one builder per section of the form, each returning its components by name -----

def _error_box(elem_id: str):
    return gr.Markdown(elem_id=elem_id, elem_classes="field-error")


def _model_fields() -> dict:
    """Base model, bits and group size (swapped for the values to try in a sweep), method, preset."""
    base = gr.Dropdown(list(forms.BASE_CHOICES), value="default", allow_custom_value=True,
                       label="Base model", elem_id="base-model",
                       info="'default': the embedded SmolLM2-135M; 'tiny-random' for a smoke test; "
                            "or type a local folder, a .gguf file or a Hub id (LLaMA family).")
    base_note = gr.Markdown(f"Group sizes valid for this model: {forms.group_size_choices('default')}.",
                            elem_id="base-note")
    base_err = _error_box("base-error")
    with gr.Row(elem_id="single-values") as single_values:  # swapped for the values to try in a sweep
        bits = gr.Radio(list(forms.BITS_CHOICES), value=4, label="Bits", elem_id="bits")
        group = gr.Dropdown(forms.group_size_choices("default"), value=forms.DEFAULT_GROUP_SIZE,
                            allow_custom_value=True, label="Group size", elem_id="group-size")
    bits_note = gr.Markdown(forms.bits_preset(4)[1], elem_id="bits-note")
    group_err = _error_box("group-size-error")
    method = gr.Radio(list(forms.METHOD_CHOICES), value="rtn", label="Quantization method")
    presets = gr.Radio(list(forms.PRESETS), value=forms.DEFAULT_PRESET, label="Preset")
    return dict(base=base, base_note=base_note, base_err=base_err, single_values=single_values, bits=bits,
                group=group, bits_note=bits_note, group_err=group_err, method=method, presets=presets)


def _advanced_fields(preset: dict) -> dict:
    """The Advanced accordion: LoRA, clip search and learned scales, steps and sizes, GPUs."""
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
    advanced_err = _error_box("advanced-error")
    return dict(rank=rank, alpha=alpha, lr=lr, clip=clip, train_scales=train_scales, scales_lr=scales_lr,
                steps=steps, batch=batch, seq=seq, devices=devices, advanced_err=advanced_err)


def _export_fields() -> dict:
    """The formats to export when done, and what the user ticked (hidden or not)."""
    exports = gr.CheckboxGroup([(service.DOWNLOAD_FORMATS[f], f) for f in EXTRA_EXPORTS],
                               value=["gguf"], label="Also export when done", elem_id="exports",
                               info="The native low-bit model and the adapter are always saved.")
    wanted = gr.State(["gguf"])  # ticked by the user, hidden or not
    exports_note = gr.Markdown(elem_id="exports-note")
    exports_err = _error_box("exports-error")
    return dict(exports=exports, wanted=wanted, exports_note=exports_note, exports_err=exports_err)


def _benchmark_fields() -> dict:
    """Benchmarks after training: a preset, or custom lm-eval tasks with a per-task limit."""
    with gr.Group():
        benchmarks = gr.Dropdown(forms.benchmark_choices(), value="none", elem_id="benchmarks",
                                 label="Benchmarks after training (lm-evaluation-harness)",
                                 info="Scores the merged model, and once per base and settings the 16-bit "
                                      "base and the quantized base. Task data is downloaded from the Hub.")
        with gr.Row(visible=False) as bench_row:
            bench_tasks = gr.Textbox(label="Tasks (comma-separated lm-eval names)", elem_id="bench-tasks",
                                     placeholder="hellaswag, arc_easy", visible=False)
            bench_limit = gr.Number(None, label="Per-task limit (optional)", precision=0,
                                    elem_id="bench-limit", info="At most this many documents per task.")
    bench_err = _error_box("benchmarks-error")
    return dict(benchmarks=benchmarks, bench_row=bench_row, bench_tasks=bench_tasks, bench_limit=bench_limit,
                bench_err=bench_err)


def _sweep_fields(preset: dict) -> dict:
    """Sweep mode: the values to try (bits, group sizes, ranks, learning rates) and the plan."""
    sweep = gr.Checkbox(False, label="Sweep: queue one job per combination of several values",
                        elem_id="sweep-mode")
    with gr.Group(visible=False) as sweep_box:
        sweep_bits = gr.CheckboxGroup(list(forms.BITS_CHOICES), value=[4], label="Bits to try",
                                      elem_id="sweep-bits")
        sweep_groups = gr.CheckboxGroup(forms.group_size_choices("default"),
                                        value=[forms.DEFAULT_GROUP_SIZE], label="Group sizes to try",
                                        elem_id="sweep-groups", info="The sizes this base model takes.")
        with gr.Row():
            sweep_ranks = gr.Textbox(str(preset["rank"]), label="Ranks to try", elem_id="sweep-ranks",
                                     info="Comma-separated; alpha keeps the advanced settings' alpha/rank.")
            sweep_lrs = gr.Textbox(f"{preset['lr']:g}", label="Learning rates to try", elem_id="sweep-lrs",
                                   info="Comma-separated, e.g. 1e-4, 3e-4.")
        sweep_plan = gr.Markdown(elem_id="sweep-plan")
    sweep_err = _error_box("sweep-error")
    return dict(sweep=sweep, sweep_box=sweep_box, sweep_bits=sweep_bits, sweep_groups=sweep_groups,
                sweep_ranks=sweep_ranks, sweep_lrs=sweep_lrs, sweep_plan=sweep_plan, sweep_err=sweep_err)


def _data_source_fields() -> dict:
    """Where the records come from: a built-in set, an upload, a path or name, or a Hub dataset."""
    kind = gr.Radio(list(forms.DATA_KINDS), value="built-in", label="Dataset")
    builtins = forms.builtin_choices()
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
    return dict(kind=kind, builtin=builtin, upload=upload, path=path, hub_id=hub_id, hub_fields=hub_fields,
                hub_config=hub_config, hub_split=hub_split, hub_note=hub_note)


def _data_use_fields() -> dict:
    """How the records are read: the column mapping, a sample size, and the preview."""
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
    data_err = _error_box("data-error")
    preview_btn = gr.Button("Preview dataset")
    preview = gr.Markdown(elem_id="dataset-preview")
    return dict(mapping_box=mapping_box, map_prompt=map_prompt, map_input=map_input, map_response=map_response,
                map_messages=map_messages, max_samples=max_samples, data_err=data_err, preview_btn=preview_btn,
                preview=preview)


def _layout() -> SimpleNamespace:
    """Every component of the form, by name, laid out in its two columns."""
    preset = {**forms.PRESETS[forms.DEFAULT_PRESET], **forms.bits_preset(4)[0]}
    with gr.Row():
        with gr.Column():
            left = {**_model_fields(), **_advanced_fields(preset), **_export_fields(), **_benchmark_fields()}
            left["name"] = gr.Textbox(label="Run name (optional)", elem_id="run-name")
            left.update(_sweep_fields(preset))
        with gr.Column():
            right = {**_data_source_fields(), **_data_use_fields()}
    launch = gr.Button("Launch fine-tune", variant="primary", elem_id="launch")
    status = gr.Markdown(elem_id="launch-status")
    return SimpleNamespace(**left, **right, launch=launch, status=status)


# ---- Events: one function per group of fields that follow each other -------------------------

def _wire_model(f: SimpleNamespace) -> None:
    """Base, bits, group size and preset fill in the fields that depend on them."""
    f.base.change(_base_changed, [f.base, f.sweep_groups], [f.group, f.base_note, f.base_err, f.sweep_groups])
    for control in (f.bits, f.group):  # the export choices follow bits and group size live
        control.change(_exports_for, [f.bits, f.group, f.wanted], [f.exports, f.exports_note], show_progress="hidden")
    f.exports.input(_ticked, [f.exports, f.wanted, f.bits, f.group], f.wanted, show_progress="hidden")
    fields = ("steps", "batch_size", "seq_len")
    f.presets.change(lambda p: [forms.PRESETS[p][k] for k in fields], f.presets, [f.steps, f.batch, f.seq])
    f.bits.change(_bits_changed, f.bits, [f.rank, f.alpha, f.lr, f.clip, f.train_scales, f.scales_lr, f.bits_note],
                  show_progress="hidden")
    f.benchmarks.change(lambda b: (gr.update(visible=b != "none"), gr.update(visible=b == "custom")), f.benchmarks,
                        [f.bench_row, f.bench_tasks])


def _wire_data(f: SimpleNamespace) -> None:
    """The dataset kind shows its fields; previews and Hub checks answer as the user types."""
    f.kind.change(lambda k: [gr.update(visible=k == v) for v in forms.DATA_KINDS]
                  + [gr.update(visible=k == "Hub dataset")] * 2,
                  f.kind, [f.builtin, f.upload, f.path, f.hub_id, f.hub_fields, f.mapping_box])
    data_inputs = [f.kind, f.builtin, f.upload, f.path, f.base, f.hub_id, f.hub_config, f.hub_split]
    f.preview_btn.click(_dataset_preview, data_inputs, f.preview)
    f.upload.upload(_dataset_preview, data_inputs, f.preview)
    f.path.submit(_dataset_preview, data_inputs, f.preview)
    hub_outputs = [f.hub_note, f.hub_config, f.hub_split, f.map_prompt, f.map_input, f.map_response, f.map_messages,
                   f.mapping_box]
    for event in (f.hub_id.submit, f.hub_id.blur, f.builtin.change):
        event(_hub_checked, [f.kind, f.builtin, f.hub_id], hub_outputs)
    f.hub_config.input(_hub_checked, [f.kind, f.builtin, f.hub_id, f.hub_config], hub_outputs)


def _launch_inputs(f: SimpleNamespace) -> list:
    """The form's values in the order ``_launch`` takes them."""
    return [f.base, f.bits, f.group, f.method, f.kind, f.builtin, f.upload, f.path, f.rank, f.alpha, f.lr, f.steps,
            f.batch, f.seq, f.name, f.wanted, f.sweep, f.sweep_bits, f.sweep_groups, f.sweep_ranks, f.sweep_lrs,
            f.devices, f.hub_id, f.hub_config, f.hub_split, f.map_prompt, f.map_input, f.map_response,
            f.map_messages, f.max_samples, f.benchmarks, f.bench_tasks, f.bench_limit, f.clip, f.train_scales,
            f.scales_lr]


def _wire_sweep(f: SimpleNamespace, inputs: list) -> None:
    """Sweep mode swaps the single values for the values to try; the plan follows every change."""
    f.sweep.change(_sweep_opened, [f.sweep, f.bits, f.group, f.rank, f.lr, f.base],
                   [f.single_values, f.sweep_box, f.sweep_bits, f.sweep_groups, f.sweep_ranks, f.sweep_lrs])
    plan_inputs = [f.sweep, *inputs[:16], f.sweep_bits, f.sweep_groups, f.sweep_ranks, f.sweep_lrs, f.devices]
    for control in (f.sweep_bits, f.sweep_groups, f.base, f.method, f.steps, f.rank, f.alpha):
        control.change(_sweep_plan, plan_inputs, f.sweep_plan, show_progress="hidden")
    for control in (f.sweep_ranks, f.sweep_lrs):
        control.blur(_sweep_plan, plan_inputs, f.sweep_plan, show_progress="hidden")
        control.submit(_sweep_plan, plan_inputs, f.sweep_plan, show_progress="hidden")


def build_new_tab():
    """Lay out the form and wire its live notes; returns (Launch button, its inputs, its outputs:
    the status under it, then one note per form field), for ``wire_launch``."""
    f = _layout()
    _wire_model(f)
    _wire_data(f)
    inputs = _launch_inputs(f)
    _wire_sweep(f, inputs)
    notes = dict(base=f.base_err, group_size=f.group_err, exports=f.exports_err, data=f.data_err,
                 advanced=f.advanced_err, sweep=f.sweep_err, benchmarks=f.bench_err)
    return f.launch, inputs, [f.status, *(notes[k] for k in forms.FIELDS)]


def wire_launch(form, job_picker, tabs) -> None:
    """Launch queues the job, then picks it in the Jobs tab and opens that tab (built after this one)."""
    launch, inputs, outputs = form
    launch.click(_launch, inputs, [outputs[0], job_picker, tabs, *outputs[1:]])
