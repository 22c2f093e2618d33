"""The Compare tab: picked jobs (or a whole sweep) side by side: overlaid loss curves, one sortable
table of settings and outcomes with the best values marked, and size against quality; redrawn
while a picked job moves."""
from __future__ import annotations

import gradio as gr
import pandas as pd

import charts
from jobs import service
from jobs.compare import QUALITY, cell_text

from .common import REFRESH_S, download_folder, error_note, job_choices

BEST_CSS = "background-color: #d1fae5; font-weight: 700"
COMPARE_HINT = "*Pick jobs (or a sweep) to compare their curves, settings and outcomes.*"


def _comparable_choices() -> list[tuple[str, int]]:
    """Every job: finished, running and queued (a queued one is listed, without curves until it
    starts), so whatever a sweep holds can be picked."""
    return job_choices(service.list_jobs())


def _sweep_choices() -> list[tuple[str, str]]:
    return [(f"{w['sweep_id']} ({w['jobs']} jobs)", w["sweep_id"]) for w in service.list_sweeps()]


def _compare_table(result: dict):
    """The comparison as a styled table: numbers kept as numbers (so a header click sorts them),
    shown rounded, the best value of each outcome column highlighted."""
    cols = result["columns"]
    frame = pd.DataFrame([[r.get(k) for k, _, _ in cols] for r in result["rows"]], columns=[h for _, h, _ in cols])
    ids = [r["id"] for r in result["rows"]]

    def marks(_):
        return pd.DataFrame([[BEST_CSS if i in result["best"].get(k, ()) else "" for k, _, _ in cols] for i in ids],
                            columns=frame.columns)

    formats = {h: (lambda v, k=k: cell_text(k, None if pd.isna(v) else v)) for k, h, _ in cols}
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
        csv_path = service.compare_csv(ids, download_folder(), result)
    except Exception as exc:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), error_note(exc)
    x = "tokens" if x_axis == "tokens seen" else "step"
    curves = pd.DataFrame(result["curves"], columns=["job", "split", "series", "step", "tokens", "loss"])
    curves = curves.assign(x=curves[x]).astype({"x": "int64", "loss": "float64"})
    key, _ = QUALITY[quality]
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


def build_compare_tab(tab):
    """Lay out the Compare tab inside ``tab`` and wire it; opening the tab refreshes its pickers."""
    with gr.Row():
        sweep = gr.Dropdown([], value=None, label="Sweep", elem_id="compare-sweep", scale=2,
                            info="Picking a sweep picks its jobs.")
        picked = gr.Dropdown([], value=[], multiselect=True, label="Jobs to compare", elem_id="compare-jobs", scale=5)
    with gr.Row():
        x_axis = gr.Radio(["step", "tokens seen"], value="step", label="Loss curves by", elem_id="compare-x")
        quality = gr.Radio(list(QUALITY), value=next(iter(QUALITY)),
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
    tab.select(_compare_opened, [picked, sweep], [picked, sweep])
