"""The Jobs tab: the queue as a table polled by a timer, the picked job's progress, loss chart,
merge check and log; cancel, resume, reorder and delete; downloads in every format; benchmarks
asked for after training."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pandas as pd

import charts
from jobs import forms, service
from jobs.pipeline import export_note

from .common import REFRESH_S, download_folder, error_note, job_choices, waiting

LOG_LINES = 14
JOB_COLUMNS = ["id", "name", "status", "stage", "progress", "loss", "ETA", "tokens/s", "sweep", "created (UTC)"]
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


def _duration(seconds) -> str:
    if seconds is None:
        return ""
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h {m % 60:02d}m" if m >= 60 else f"{m}m {s:02d}s" if m else f"{s}s"


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
    eta = ((_duration(job["eta_s"]) if job["eta_s"] is not None else "estimated once training starts")
           if running else "-")
    train, devices = (job["spec"] or {}).get("train") or {}, int((job["spec"] or {}).get("devices") or 1)
    batch, accum = train.get("batch_size", 0), train.get("grad_accum", 1)
    lines = [f"### #{job['id']} {job['name']}: **{job['status']}**",
             f"{stage} · step {job['step']}/{job['total_steps']} · job ETA {eta} · global batch "
             f"{batch * accum * devices} ({batch} × {accum} accumulation × {devices} "
             f"device{'s' if devices > 1 else ''})",
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
        text += f"\n\n**{fmt.upper()} export:** {export_note(result)}"
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
    rows, choices = _job_rows(jobs), job_choices(jobs)
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
        return error_note(exc)
    return (f"Job #{selected} is now {order.index(int(selected)) + 1} of {len(order)} in the queue "
            f"(runs in this order: {', '.join(f'#{i}' for i in order)}).")


def _evaluate(selected, choice, tasks, limit):
    """Queue lm-eval on the selected finished job for a worker; its progress shows in the summary."""
    if selected is None:
        return "Select a finished job first."
    try:
        task = service.request_benchmark(int(selected), choice, tasks, limit)
    except Exception as exc:
        return error_note(exc)
    return (f"Benchmarks {', '.join(task['settings']['tasks'])} of job #{selected}: {task['status']} (task "
            f"#{task['id']}); a worker runs them when no job waits, the job's summary shows the progress.")


def _stop_benchmark(selected):
    if selected is None:
        return "Select a job first."
    try:
        stopped = service.cancel_benchmark(int(selected))
    except Exception as exc:
        return error_note(exc)
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
        return error_note(exc)
    ids = lambda key: ", ".join(f"#{i}" for i in out[key]) or "none"  # noqa: E731
    return (f"Sweep {sweep_id}: canceled {ids('canceled')}; stopping after their current step {ids('stopping')}; "
            f"already ended, left as they are {ids('ended')}.")


def _act(action, selected):
    if selected is None:
        return "Select a job first."
    try:
        before = getattr(service, action)(int(selected))
    except Exception as exc:
        return error_note(exc)
    if action == "cancel":
        return ("Cancel requested; the job stops after its current step." if before["status"] == "running"
                else "Canceled.")  # a queued or interrupted job is canceled at once
    return {
            "resume": "Queued again; it resumes from its last checkpoint.",
            "delete": "Deleted, with its files."}[action]


def _download(selected, fmt="native"):
    """Stream: what is being packed and for how long, then the file."""
    if selected is None:
        yield gr.skip(), "Select a job first."
        return
    label = "the job log" if fmt == "log" else service.DOWNLOAD_FORMATS.get(fmt, fmt)
    yield None, gr.skip()  # no file until this one is ready: the click-through below sends only a new file
    try:
        work = ((lambda: service.download_log(int(selected)))
                if fmt == "log" else lambda: service.download_model(int(selected), fmt, download_folder()))
        for item in waiting(work, lambda t: f"*Preparing {label} of job #{selected} for download (packing its "
                                            f"files into one archive)… {t:.0f} s*"):
            if isinstance(item, str):
                yield gr.skip(), item
            else:
                path, note = item[1]
    except service.ExportQueued as queued:
        yield gr.skip(), str(queued)
        return
    except Exception as exc:
        yield gr.skip(), error_note(exc)
        return
    yield str(path), f"Downloading {note}"


def _row_job(evt: gr.SelectData):
    return int(evt.row_value[0]) if evt.row_value else gr.skip()


def _actions() -> SimpleNamespace:
    """The buttons under the job: queue actions, downloads and benchmarks, and the note they write."""
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
            bench = gr.Dropdown(forms.benchmark_choices()[1:], value="mmlu-5shot", label="Benchmarks",
                                elem_id="evaluate-benchmarks")
            bench_tasks = gr.Textbox(label="Tasks (custom: comma-separated lm-eval names)", elem_id="evaluate-tasks")
            bench_limit = gr.Number(None, label="Per-task limit (optional)", precision=0, elem_id="evaluate-limit")
        with gr.Row():
            evaluate = gr.Button("Evaluate", elem_id="evaluate-button")
            stop_bench = gr.Button("Stop benchmark", elem_id="stop-benchmark")
    note = gr.Markdown(elem_id="action-note")
    return SimpleNamespace(cancel=cancel, resume=resume, up=up, down=down, cancel_sweep=cancel_sweep, delete=delete,
                           confirm=confirm, fmt=fmt, download=download, bench=bench, bench_tasks=bench_tasks,
                           bench_limit=bench_limit, evaluate=evaluate, stop_bench=stop_bench, note=note)


def _wire_actions(a: SimpleNamespace, picker, file) -> None:
    a.cancel.click(lambda p: _act("cancel", p), picker, a.note)
    a.resume.click(lambda p: _act("resume", p), picker, a.note)
    a.up.click(lambda p: _move("up", p), picker, a.note)
    a.down.click(lambda p: _move("down", p), picker, a.note)
    a.cancel_sweep.click(_cancel_sweep, picker, a.note)
    a.delete.click(lambda: gr.update(visible=True), None, a.confirm)
    a.confirm.click(lambda p: (_act("delete", p), gr.update(visible=False), None), picker, [a.note, a.confirm, picker])
    a.download.click(_download, [picker, a.fmt], [file, a.note]).then(None, file, None, js=SAVE_FILE_JS)
    a.evaluate.click(_evaluate, [picker, a.bench, a.bench_tasks, a.bench_limit], a.note)
    a.stop_bench.click(_stop_benchmark, picker, a.note)


def build_jobs_tab():
    """Lay out the Jobs tab and start its timer; returns the job picker (Launch picks the new job)."""
    # filled as the page loads (a callable value runs on each load), not at the timer's first tick
    table = gr.Dataframe(lambda: _job_rows(service.list_jobs()), headers=JOB_COLUMNS, interactive=False,
                         label="Jobs (click a row)", elem_id="jobs-table")
    picker = gr.Dropdown([], value=None, label="Job", elem_id="job-select")
    summary = gr.Markdown("*Select a job.*", elem_id="job-summary")
    plot = gr.Plot(None, show_label=False, elem_id="loss-plot", elem_classes="chart")
    merge = gr.Markdown(elem_id="merge-check")
    actions = _actions()
    file = gr.File(label="Model file", visible=False)  # holds the prepared file for SAVE_FILE_JS
    log = gr.Textbox(label="Log (last lines)", lines=16, max_lines=16, autoscroll=True, elem_id="job-log")
    seen = gr.State({})

    outputs = [table, picker, summary, plot, merge, log, seen]
    gr.Timer(REFRESH_S).tick(_refresh, [picker, seen], outputs, show_progress="hidden", concurrency_limit=None)
    picker.change(lambda p, s: _refresh(p, {**s, "job": None}), [picker, seen], outputs, show_progress="hidden")
    table.select(_row_job, None, picker)
    _wire_actions(actions, picker, file)
    return picker
