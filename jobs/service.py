"""The job queue as the UI sees it: submit, watch, cancel, resume and delete jobs; list models;
download, export, benchmark and compare them. (The form, chat and publish helpers the UI also
calls live beside it, in ``jobs.forms``, ``jobs.chat`` and ``jobs.publish``.)

Every function opens its own short transaction and returns plain dicts (ready for a table
widget), so the UI holds no database objects and never blocks on a running job. Errors
meant for the user are ``QALoRAError`` subclasses with a readable message.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from sqlalchemy import select

from qalora.atomic import atomic_path
from qalora.config import method_label
from qalora.errors import ConfigError
from storage import (EXPORT_STATUS, Artifact, IllegalTransition, Job, JobStateError, JobStatus, Metric, db,
                     get_settings, repo, utcnow)

from .compare import files_text
from .confine import with_upload_names
from .pipeline import LOG_NAME, export_note
from .spec import JobSpec
from .sweep import SweepPlan, plan_sweep as _plan_sweep

ROOT = Path(__file__).resolve().parents[1]
JOB_FIELDS = ("id", "name", "status", "stage", "stage_done", "stage_total", "stage_started_at", "step",
              "total_steps", "loss", "eta_s", "error", "attempts", "cancel_requested", "worker_id", "created_at",
              "started_at", "finished_at", "heartbeat_at", "artifact_dir", "sweep_id")
# What each stage counts, for "quantize 12/30 layers".
STAGE_UNITS = {"data": "parts", "quantize": "layers", "merge": "layers", "verify": "batches", "save": "model",
               "evaluate": "questions and replies", "export gguf": "tensors", "export gptq": "steps", "export peft": "files"}


def _job_dict(job: Job) -> dict:
    d = {k: getattr(job, k) for k in JOB_FIELDS}
    d["artifact_dir"] = str(job.folder) if job.folder else None  # on this machine (QALORA_ARTIFACTS)
    d["progress"] = job.step / job.total_steps if job.total_steps else 0.0
    d["spec"], d["report"] = job.spec, job.report
    d["stage_text"], d["stage_eta_s"] = _stage_progress(job)
    d["run_s"] = _run_seconds(job)
    # Alive (heartbeating) but not moving: a hung CUDA call or a deadlock. Shown, not acted on.
    d["stalled_s"] = None
    if job.status == JobStatus.RUNNING.value and job.progress_at is not None:
        idle = (utcnow() - job.progress_at).total_seconds()
        if idle >= get_settings().stall_s:
            d["stalled_s"] = idle
            d["last_log_line"] = _log_tail(job.folder, 1).strip()
    return d


def _run_seconds(job: Job) -> float | None:
    """Wall time over all the job's attempts: the earlier ones (``earlier_run_s``) and the last one,
    to now while it runs, to its end once ended, to its last sign of life when it was interrupted
    (and while it waits in the queue after that); ``None`` before it first started."""
    if job.started_at is None:
        return job.earlier_run_s
    if job.status == JobStatus.RUNNING.value:
        last = repo.attempt_seconds(job.started_at, utcnow())
    elif job.finished_at is not None:
        last = repo.attempt_seconds(job.started_at, job.finished_at)
    else:
        last = repo.attempt_seconds(job.started_at, job.heartbeat_at, job.progress_at)
    return (job.earlier_run_s or 0.0) + last


def _stage_progress(job: Job) -> tuple[str, float | None]:
    """("evaluate 12/40 questions", seconds left in the stage at its measured rate) for a running job."""
    if job.status != JobStatus.RUNNING.value or not job.stage:
        return job.stage or "", None
    if job.stage == "train":
        return f"train {job.step}/{job.total_steps} steps", None
    if not job.stage_total:
        return job.stage, None
    text = f"{job.stage} {job.stage_done or 0}/{job.stage_total} {STAGE_UNITS.get(job.stage, '')}".rstrip()
    eta = None
    if job.stage_done and job.stage_started_at is not None:
        elapsed = (utcnow() - job.stage_started_at).total_seconds()
        eta = elapsed * (job.stage_total - job.stage_done) / job.stage_done
    return text, eta


def _log_tail(folder: str | None, lines: int) -> str:
    """The last ``lines`` lines of the log in a job's folder ('' before the job has started)."""
    path = Path(folder or "") / LOG_NAME
    if not path.is_file():
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(deque(f, maxlen=lines))


def _metric_dict(m: Metric) -> dict:
    return {"step": m.step, "train_loss": m.train_loss, "eval_loss": m.eval_loss, "lr": m.lr,
            "tokens_per_s": m.tokens_per_s, "elapsed_s": m.elapsed_s, "tokens_seen": m.tokens_seen,
            "time": m.created_at}


def _artifact_dict(a: Artifact, folder: Path | None) -> dict:
    return {"kind": a.kind, "path": str((folder or Path()) / a.path), "size_bytes": a.size_bytes,
            "created_at": a.created_at}


def _require(s, job_id: int) -> Job:
    job = repo.get_job(s, job_id)
    if job is None:
        raise JobStateError(f"Job {job_id} does not exist; refresh the job list.")
    return job


def submit(spec: JobSpec | dict) -> int:
    """Validate ``spec`` and queue it; returns the job id. Bad specs raise before anything is stored.

    A spec from ``form_spec`` (or ``build_spec``) was validated there and is trusted; a dict or a spec
    made elsewhere is validated here, once.
    A name already used by another job gets a number (``name-2``, ``name-3``), so jobs stay apart.
    """
    spec = spec if isinstance(spec, JobSpec) else JobSpec.from_dict(spec)
    if not spec.validated:
        spec.validate()
    with db() as s:
        return _queue(s, spec)


def _queue(s, spec: JobSpec, sweep_id: str | None = None) -> int:
    taken = set(s.scalars(select(Job.name).where(Job.name.like(f"{spec.name}%"))))
    name, n = spec.name, 2
    while name in taken:
        name, n = f"{spec.name}-{n}", n + 1
    spec.name = name
    return repo.create_job(s, name=spec.name, spec=spec.to_dict(), total_steps=spec.train.steps, sweep_id=sweep_id,
                           devices=spec.devices)


def plan_sweep(grid: dict, **form) -> SweepPlan:
    """The jobs a sweep makes (``jobs.sweep.plan_sweep``): validated specs, refused combinations with
    the reason, exports left out; raises ``FormError`` for what no combination can fix."""
    return _plan_sweep(grid, **form)


def submit_sweep(plan: SweepPlan, label: str = "") -> tuple[str, list[int]]:
    """Queue every job of ``plan`` in one transaction under a new sweep id; returns (sweep id, job ids)."""
    import secrets

    stem = re.sub(r"[^\w.-]+", "-", label.strip())[:40].strip("-") or "sweep"
    sweep_id = f"{stem}-{utcnow():%m%d-%H%M}-{secrets.token_hex(2)}"
    with db() as s:
        return sweep_id, [_queue(s, spec, sweep_id) for spec in plan.specs]  # validated by plan_sweep


def list_sweeps() -> list[dict]:
    """Sweeps, newest first: ``{"sweep_id", "jobs", "created_at"}``."""
    with db() as s:
        return [{"sweep_id": sid, "jobs": n, "created_at": t} for sid, n, t in repo.sweeps(s)]


def sweep_jobs(sweep_id: str) -> list[int]:
    with db() as s:
        return repo.sweep_job_ids(s, sweep_id)


def cancel_sweep(sweep_id: str) -> dict[str, list[int]]:
    """Cancel every job of a sweep that has not ended: queued and interrupted ones at once, running
    ones after their current step. Returns ids by what happened: ``canceled``, ``stopping``,
    ``ended`` (finished, failed or canceled before: left as they are)."""
    ids = sweep_jobs(sweep_id)
    if not ids:
        raise JobStateError(f"Sweep {sweep_id!r} has no jobs; refresh the list.")
    out: dict[str, list[int]] = {"canceled": [], "stopping": [], "ended": []}
    for job_id in ids:
        try:
            before = cancel(job_id)
        except (IllegalTransition, JobStateError):
            out["ended"].append(job_id)
            continue
        out["stopping" if before["status"] == JobStatus.RUNNING.value else "canceled"].append(job_id)
    return out


def list_jobs(status: str | JobStatus | list | None = None, limit: int = 200) -> list[dict]:
    """Newest first; ``status`` filters to one status or a list of them."""
    statuses = [status] if isinstance(status, (str, JobStatus)) else status
    with db() as s:
        return [_job_dict(j) for j in repo.list_jobs(s, statuses, limit)]


NO_METRICS = -1


def get_job(job_id: int, metrics_after: int = 0) -> dict:
    """The job with its metrics after step ``metrics_after`` (poll incrementally; ``NO_METRICS``:
    none, the row alone) and artifacts."""
    with db() as s:
        job = _require(s, job_id)
        d = _job_dict(job)
        d["metrics"] = ([] if metrics_after == NO_METRICS else
                        [_metric_dict(m) for m in repo.metrics(s, job_id, metrics_after)])
        d["artifacts"] = [_artifact_dict(a, job.folder) for a in repo.artifacts(s, job_id)]
    return d


def cancel(job_id: int) -> dict:
    """Cancel a queued or interrupted job now; ask a running one to stop after its current step.

    Returns the job as it was at the moment of the request (``step`` is the last finished step).
    """
    for _ in range(2):
        try:
            with db() as s:
                if not repo.request_cancel(s, job_id):
                    repo.cancel(s, job_id)
                return _job_dict(_require(s, job_id))
        except IllegalTransition as exc:
            if exc.current != JobStatus.RUNNING:
                raise  # a worker claiming it in between is retried as a running job; the rest is final
    raise JobStateError(f"Job {job_id} changed state while being canceled; try again.")


def resume(job_id: int) -> dict:
    """Queue an interrupted, failed or canceled job again; it continues from its last checkpoint."""
    with db() as s:
        repo.requeue(s, job_id)
        return _job_dict(_require(s, job_id))


def queue_order() -> list[int]:
    """Queued job ids in the order workers will run them."""
    with db() as s:
        return repo.queued_ids(s)


def move(job_id: int, direction: str) -> list[int]:
    """Move queued job ``job_id`` one place ``up`` (sooner) or ``down`` (later); returns the new
    queue order. A job that is not queued raises ``JobStateError`` with what it is."""
    with db() as s:
        return repo.move_queued(s, job_id, direction)


def job_overview(job: dict) -> str:
    """How the job is made and what it wrote: its method (``qalora.config.method_label``), bits and
    group size, and its files beside the 16-bit model in MB and bits per parameter."""
    spec = job.get("spec") or {}
    quant = spec.get("quant") or {}
    text = f"{method_label(quant, spec.get('adapter'))}, {quant.get('bits')}-bit, group {quant.get('group_size')}"
    files = files_text(job)
    return text + (f" · files: {files}" if files else "")


def compare(job_ids) -> dict:
    """The Compare tab's data for these jobs (``jobs.compare.compare``): table columns, rows and best
    cells, loss-curve points by step and tokens, size-vs-quality points with the frontier."""
    from .compare import compare as _compare

    return _compare([get_job(int(i)) for i in dict.fromkeys(job_ids or ())])


def compare_csv(job_ids, dest_dir: str | Path, result: dict | None = None) -> Path:
    """The comparison table as a CSV file in ``dest_dir``; ``result``: :func:`compare` of these jobs,
    where the caller has it already (not computed again)."""
    from .compare import write_csv

    ids = list(dict.fromkeys(int(i) for i in job_ids or ()))
    name = f"qalora-compare-{'-'.join(map(str, ids[:8]))}{'-more' if len(ids) > 8 else ''}.csv"
    return write_csv(result if result is not None else compare(ids), Path(dest_dir) / name)


def delete(job_id: int) -> None:
    """Remove a job that is not running, its metrics, and its artifact directory."""
    with db() as s:
        folder = _require(s, job_id).folder
        repo.delete_job(s, job_id)
    path = Path(folder) if folder else None
    # only ever remove a directory this store created for this job
    if path and path.name == f"job-{job_id:05d}" and path.is_dir():
        shutil.rmtree(path)


def list_models() -> list[dict]:
    """Finished models whose merged directory still exists, newest first."""
    models = []
    for job in list_jobs(JobStatus.SUCCEEDED):
        merged = Path(job["artifact_dir"]) / "merged"
        if not merged.is_dir():
            continue
        r = job["report"] or {}
        models.append({"job_id": job["id"], "name": job["name"], "path": str(merged),
                       "adapter_path": str(Path(job["artifact_dir"]) / "adapter"), "base": r.get("base"),
                       "bits": r.get("bits"), "group_size": r.get("group_size"), "rank": r.get("rank"),
                       "steps": r.get("steps"), "eval_loss_merged": r.get("eval_loss_merged"),
                       "eval_loss_quantized_base": r.get("eval_loss_quantized_base"),
                       "merge_max_abs_logit_diff": r.get("merge_max_abs_logit_diff"),
                       "finished_at": job["finished_at"]})
    return models


_STAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
_SERVER_PATH = re.compile(r"(?<![\w.$>])/(?:[^\s'\",)/]+/)+([^\s'\",)/]+)")  # /a/b/name -> …/name


def readable_log(job_id: int, lines: int = 14) -> str:
    """The job log's last ``lines`` entries for the page: no traceback (the downloadable log has it)
    and no server paths (the job's folder and the store's home are named, not spelled out)."""
    with db() as s:
        folder = _require(s, job_id).folder
    raw = _log_tail(folder, lines * 40).splitlines()
    kept = [line for line in raw if _STAMPED.match(line)]
    home = str(get_settings().home.resolve())
    out = []
    for line in kept[-lines:]:
        line = with_upload_names(line)
        if folder:
            line = line.replace(str(folder), "<job folder>")
        out.append(_SERVER_PATH.sub(r"…/\1", line.replace(home, "$QALORA_HOME")))
    if len(kept) < len(raw):
        out.append("(the full traceback is in the downloadable log: Download → job log)")
    return "\n".join(out)


def log_path(job_id: int) -> Path:
    """The job's full log file, for download."""
    with db() as s:
        folder = _require(s, job_id).folder
    path = Path(folder or "") / LOG_NAME
    if not path.is_file():
        raise JobStateError(f"Job {job_id} has no log yet: it has not started.")
    return path


def read_log(job_id: int, tail: int = 200) -> str:
    """The last ``tail`` lines of the job's log ('' before the job has started)."""
    with db() as s:
        folder = _require(s, job_id).folder
    return _log_tail(folder, tail)


def _worker_env(n: int, shares: list[list[str]], gpus: list[str]) -> dict:
    settings = get_settings()
    # absolute paths, so the workers find the same store whatever their working directory
    env = {**os.environ, "QALORA_HOME": str(settings.home), "QALORA_DB_URL": settings.db_url,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return {**env, "CUDA_VISIBLE_DEVICES": ",".join(shares[n])} if gpus else env


def _spawn_worker(n: int, env: dict, log_dir: Path) -> subprocess.Popen:
    with open(log_dir / f"worker-{n}.log", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "jobs.worker", "--die-with-parent", "--wait-for-slot"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def start_worker_process(count: int | None = None, log_dir: Path | None = None) -> list[subprocess.Popen]:
    """Start ``count`` (default ``QALORA_WORKERS``) ``python -m jobs.worker`` processes.

    They inherit this process's environment (``QALORA_HOME``, ``QALORA_DB_URL``) and write to
    ``<home>/workers/worker-<n>.log``. On a GPU machine each owns a contiguous share of the GPUs
    (its ``CUDA_VISIBLE_DEVICES``), never fewer than one. Each stops when this process dies, and
    waits for a slot while every slot is held (by a worker of an app that died, until it stops).
    """
    from .devices import split, visible_gpus

    settings = get_settings()
    log_dir = Path(log_dir or settings.home / "workers")
    log_dir.mkdir(parents=True, exist_ok=True)
    gpus = visible_gpus()
    shares = split(gpus, count or settings.workers)
    return [_spawn_worker(n, _worker_env(n, shares, gpus), log_dir) for n in range(len(shares))]


class WorkerPool:
    """The app's workers: started with it, started again when one ends while the app runs, stopped
    with it. Every ``check_s`` seconds it also recovers jobs whose worker is gone (whoever notices
    first: this, or any worker), so a job never shows "running" for long with no worker behind it."""

    def __init__(self, count: int | None = None, check_s: float | None = None):
        self.count, self.check_s = count, check_s if check_s is not None else max(get_settings().poll_s, 1.0)
        self.procs: list[subprocess.Popen] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "WorkerPool":
        self.procs = start_worker_process(self.count)
        self._thread = threading.Thread(target=self._watch, name="worker-pool", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        from .devices import split, visible_gpus
        from .worker import recover_orphans

        settings = get_settings()
        gpus = visible_gpus()
        shares = split(gpus, self.count or settings.workers)
        while not self._stop.wait(self.check_s):
            for n, proc in enumerate(self.procs):
                if proc.poll() is not None and not self._stop.is_set():
                    logging.getLogger("qalora.app").warning("worker %d (pid %d) ended with %s; starting another",
                                                            n, proc.pid, proc.returncode)
                    self.procs[n] = _spawn_worker(n, _worker_env(n, shares, gpus), settings.home / "workers")
            try:
                recover_orphans()
            except Exception:  # the database may be away for a moment: the next round retries
                logging.getLogger("qalora.app").exception("recovering orphaned jobs failed; retrying")

    def stop(self, timeout: float = 120) -> None:
        """SIGTERM every worker (a running job checkpoints and goes back to the queue), then wait."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=timeout)


def device_choices() -> int:
    """How many devices one job may ask for on this machine: its GPUs (the form offers the choice
    only where there are two or more)."""
    from .devices import visible_gpus

    return len(visible_gpus())


def chat_keys(job_id: int, compare: bool = False) -> dict[str, str]:
    """What each chat side loads for a finished job: its merged model and, to compare, its base."""
    job = get_job(job_id, metrics_after=NO_METRICS)
    merged = Path(job["artifact_dir"] or "") / "merged"
    if job["status"] != JobStatus.SUCCEEDED.value or not merged.is_dir():
        raise JobStateError(f"Job {job_id} has no finished model; pick one from the list of finished models.")
    keys = {"tuned": str(merged)}
    if compare:
        keys["base"] = (job["report"] or {}).get("base") or job["spec"]["base"]
    return keys


def serve_command(job_id: int, port: int = 8000) -> dict:
    """How to serve job ``job_id``'s model to OpenAI clients: ``{"command", "where", "model_id",
    "base_url"}``; the command works as printed in a shell at ``where``.

    The run folder is written relative to the app's working directory when under it (the default
    home, ``./data``, is), else under ``$QALORA_HOME`` where the app was given that variable (the
    page names no other server path), else in full."""
    run = Path(chat_keys(job_id)["tuned"]).parent.resolve()
    home, cwd = get_settings().home.resolve(), Path.cwd().resolve()
    if run.is_relative_to(cwd):
        shown, where = str(run.relative_to(cwd)), "in the folder the app was started from"
    elif os.environ.get("QALORA_HOME") and run.is_relative_to(home):
        shown, where = f'"$QALORA_HOME"/{run.relative_to(home)}', "in a shell with QALORA_HOME set as for the app"
    else:
        shown, where = str(run), "on the app's machine"
    return {"command": f"python -m qalora serve {shown} --port {port}", "where": where, "model_id": run.name,
            "base_url": f"http://127.0.0.1:{port}/v1"}


def publish_job(job_id: int, repo_name: str, **kwargs) -> str:
    """Upload job ``job_id``'s merged model to the Hub (see ``jobs.publish.publish``); returns the URL."""
    from .publish import publish
    return publish(get_job(job_id), repo_name, **kwargs)


DOWNLOAD_FORMATS = {"native": "merged low-bit model (native, exact)", "gguf": "GGUF for llama.cpp (exact codes, fp16 scales)",
                    "torchao": "transformers checkpoint (torchao, bf16 scales and zero points)",
                    "gptq": "GPTQ for gptqmodel / transformers (rounded zero points)",
                    "peft": "adapter in PEFT format"}


def archive_model(job_id: int, dest_dir: str | Path, fmt: str = "native") -> Path:
    """The job's model in ``fmt`` as one file in ``dest_dir``: a zip of a folder, or the .gguf file."""
    return download_model(job_id, fmt, dest_dir)[0]


class ExportQueued(Exception):
    """The format is not written yet: an export task is queued (or running) for a worker."""

    def __init__(self, task: dict):
        self.task = task
        what = {"queued": "queued", "running": "being written"}[task["status"]]
        super().__init__(f"The {task['format']} export is {what} by the worker (the web server never loads "
                         "models); the Jobs tab shows when it is ready, then download again.")


def _task_dict(t) -> dict:
    """An export row (``repo.export_tasks``): its format, status, the file's path on this machine,
    what the export measured (``result``), its note and error."""
    report = t.report or {}
    path = str(t.folder / report["path"]) if report.get("path") and t.folder is not None else None
    return {"id": t.id, "format": t.spec.get("format"), "status": EXPORT_STATUS[t.status], "path": path,
            "note": report.get("note"), "error": t.error, "created_at": t.created_at, "finished_at": t.finished_at,
            "result": {**report, "path": path} if report else None}


def export_tasks(job_id: int) -> list[dict]:
    with db() as s:
        _require(s, job_id)
        return [_task_dict(t) for t in repo.export_tasks(s, job_id)]


def request_export(job_id: int, fmt: str) -> dict:
    """Queue an export of a finished job for a worker (or return the one queued, running or done)."""
    from qalora.deployment.export.formats import check_format

    job = get_job(job_id, metrics_after=NO_METRICS)
    r = job["report"] or {}
    check_format(fmt, int(r.get("bits") or 4), int(r.get("group_size") or 32))  # refuse what cannot apply, now
    with db() as s:
        return _task_dict(repo.request_export(s, job_id, fmt))


BENCHMARK_STATUS = {**EXPORT_STATUS, "canceled": "canceled"}  # a stopped benchmark is no failure


def benchmark_tasks(job_id: int) -> list[dict]:
    """The benchmark runs asked of a finished job: settings, status, progress (requests) and ETA,
    the scores when done, the error when failed."""
    with db() as s:
        _require(s, job_id)
        return [{"id": t.id, "settings": t.spec.get("benchmarks"), "status": BENCHMARK_STATUS[t.status],
                 "done": t.stage_done, "total": t.stage_total, "eta_s": t.eta_s if t.status == "running" else None,
                 "scores": t.report, "error": t.error} for t in repo.benchmark_tasks(s, job_id)]


def request_benchmark(job_id: int, choice: str, tasks: str = "", limit=None) -> dict:
    """Queue lm-evaluation-harness on a finished job (the form's choice: a preset or task names, and a
    per-task limit) for a worker; the same settings already queued or running are that one."""
    from .forms import benchmarks_setting

    settings = benchmarks_setting(choice, tasks, limit)
    if not settings:
        raise ConfigError("no benchmark chosen; pick a preset or type lm-eval task names.")
    with db() as s:
        task = repo.request_benchmark(s, job_id, settings)
        return {"id": task.id, "settings": settings, "status": BENCHMARK_STATUS[task.status]}


def cancel_benchmark(job_id: int) -> list[int]:
    """Stop the job's queued or running benchmark runs (a running one between two requests); returns
    the ids asked to stop."""
    active = [t["id"] for t in benchmark_tasks(job_id) if t["status"] in ("queued", "running")]
    for task_id in active:
        cancel(task_id)
    return active


def _ready_export(job_id: int, fmt: str) -> dict | None:
    """The job's finished export in ``fmt`` (made by the job or by a later task), if its file exists."""
    job = get_job(job_id, metrics_after=NO_METRICS)
    done = ((job["report"] or {}).get("exports") or {}).get(fmt)
    if done and (Path(job["artifact_dir"]) / done["path"]).exists():
        return {**done, "path": str(Path(job["artifact_dir"]) / done["path"])}
    for task in reversed(export_tasks(job_id)):
        if task["format"] == fmt and task["status"] == "done" and Path(task["path"]).exists():
            return {"format": fmt, "path": task["path"], "note": task["note"]}
    return None


def _zip_stored(folder: Path, archive: Path) -> None:
    """Zip ``folder`` without compression: packed low-bit weights do not shrink, and storing them
    is several times faster than deflating them."""
    import zipfile

    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(folder))


def download_model(job_id: int, fmt: str, dest_dir: str | Path) -> tuple[Path, str]:
    """(file to download, note to show beside it). Packs files that exist; never exports here.

    A format the job did not write is queued for a worker (``ExportQueued`` says so); the note
    states what the format costs (for GPTQ, the measured max logit difference).
    """
    keys = chat_keys(job_id)
    if fmt == "native":
        source, result = Path(keys["tuned"]), {"format": "native"}
    else:
        result = _ready_export(job_id, fmt)
        if result is None:
            raise ExportQueued(request_export(job_id, fmt))
        source = Path(result["path"])
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    stem = f"qalora-job-{job_id:05d}-{'merged' if fmt == 'native' else fmt}"
    path = dest / (f"{stem}{source.suffix}" if source.is_file() else f"{stem}.zip")
    with atomic_path(path) as tmp:  # the download link never points at a half file
        if source.is_file():
            shutil.copyfile(source, tmp)
        else:
            _zip_stored(source, tmp)
    return path, file_note(path, result.get("note") or export_note(result))


def download_log(job_id: int) -> tuple[Path, str]:
    """(the job's full log, the note beside the download), as :func:`download_model` gives a model."""
    path = log_path(job_id)
    return path, file_note(path, "The job's full log, tracebacks included.")


def file_note(path: Path, note: str) -> str:
    """What a download says beside it: the file's name and size (MB of 10^6 bytes), then ``note``."""
    return f"`{path.name}`, {path.stat().st_size / 1e6:,.1f} MB. {note}"
