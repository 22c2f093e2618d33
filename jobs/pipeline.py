"""Run one job: the library's ``finetune`` wired to the database, a heartbeat and the job's log.

``run_job`` takes only primitives (rq's rule), so it behaves the same in a worker thread, a
subprocess, or on another machine sharing the database. It never raises for a failed job:
the outcome is the job's final status, with a readable error in the row and the full
traceback in ``<artifact dir>/job.log``.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import threading
import time
import traceback
from pathlib import Path

from sqlalchemy import select

from qalora.atomic import write_text
from qalora.errors import QALoRAError
from storage import IllegalTransition, Job, JobStatus, db, get_settings, repo, utcnow

from .identity import new_worker_id
from .mlflow_log import MlflowRun
from .spec import JobSpec

LOG_NAME = "job.log"
BOARD_DIR = "tensorboard"  # TensorBoard event files of the job's training (see Board)
# Fault injection for tests: the first attempt of every job SIGKILLs its own worker on entering
# this stage (tests/test_worker.py kills a worker in each stage and checks the resumed result).
FAULT_STAGE = "QALORA_FAULT_STAGE"
# And this one holds the first attempt on entering its stage until a stop is asked for.
PAUSE_STAGE = "QALORA_PAUSE_STAGE"
ARTIFACTS = {"merged": "merged", "adapter": "adapter", "report": "report.json", "log": LOG_NAME}
# Jobs on the built-in training set are also scored on its multiple-choice questions (held-out people).
BUILTIN_MC = {"builtin:default": "builtin:contacts-mc", "builtin:contacts": "builtin:contacts-mc"}
MC_QUESTIONS = 40


# Seconds each finishing stage takes, in training steps of the same job, when no earlier job on
# the same base has timed it (measured on the default model, 4-bit g32, batch 4, seq 256, CPU;
# bench/finishing.py). Earlier jobs' measured times replace these as soon as there are some.
FINISH_STEPS = {"merge": 0.5, "verify": 3.0, "save": 0.5, "export gguf": 4.0, "export torchao": 5.0, "export gptq": 40.0,
                "export peft": 1.0, "evaluate": 14.0}
HISTORY_JOBS = 50  # succeeded jobs searched for the same base's stage times


def finishing_stages(spec: JobSpec) -> list[str]:
    """The stages a job runs after its last training step, in order."""
    extra = [f"export {fmt}" for fmt in spec.extra_exports]
    return ["merge", "verify", "save", *extra, "evaluate", *(["benchmark"] if spec.benchmarks else [])]


def stage_history(base: str) -> dict[str, float]:
    """Each stage's seconds in the newest succeeded job on ``base`` that timed it."""
    found: dict[str, float] = {}
    with db() as s:
        for job in repo.list_jobs(s, [JobStatus.SUCCEEDED], HISTORY_JOBS):
            if (job.spec or {}).get("base") == base:
                for stage, seconds in ((job.report or {}).get("stage_s") or {}).items():
                    found.setdefault(stage, seconds)
    return found


def estimate_stage(stage: str, s_per_step: float | None, history: dict[str, float]) -> float | None:
    if stage in history:
        return history[stage]
    if s_per_step is None:
        return None
    return FINISH_STEPS.get(stage, 1.0) * s_per_step


class _Stop(Exception):
    """Raised from ``on_stage`` so a cancel or shutdown is honoured between stages, too."""


def job_logger(job_id: int, artifact_dir: Path) -> logging.Logger:
    """A logger that appends to the job's own log file (and nowhere else)."""
    log = logging.getLogger(f"qalora.jobs.{job_id}")
    log.setLevel(logging.INFO)
    log.propagate = False
    artifact_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(artifact_dir / LOG_NAME, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    return log


def close_logger(log: logging.Logger) -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def note(job_id: int, artifact_dir: str | Path, message: str) -> None:
    """Append one warning line to a job's log from outside its run (e.g. crash recovery)."""
    log = job_logger(job_id, Path(artifact_dir))
    log.warning(message)
    close_logger(log)


def _is_oom(exc: BaseException) -> bool:
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or (isinstance(exc, RuntimeError) and ("out of memory" in str(exc).lower()
                                                   or "can't allocate memory" in str(exc).lower())))


_DISK_FULL = ("no space left on device", "file too large", "disk quota exceeded", f"os error {errno.ENOSPC})",
              f"os error {errno.EFBIG})", f"os error {errno.EDQUOT})")


def _is_disk_full(exc: BaseException) -> bool:
    """A full disk or a file-size limit, from Python (OSError) or a Rust writer (safetensors)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    return any(marker in str(exc).lower() for marker in _DISK_FULL)


def describe_error(exc: BaseException, spec: JobSpec | None) -> str:
    """The one-paragraph message shown in the UI; the traceback goes to the log."""
    if _is_oom(exc):
        sizes = f" (batch_size={spec.train.batch_size}, seq_len={spec.train.seq_len})" if spec else ""
        return (f"Out of memory{sizes}: reduce batch size or "
                "sequence length (raise grad_accum to keep the effective batch), or turn on gradient "
                "checkpointing, then resume the job.")
    if _is_disk_full(exc):
        return ("Out of disk space (or over a file-size limit) while writing the job's files: free space "
                "where the jobs are stored (QALORA_HOME) and resume the job. Finished files are written "
                "under a temporary name first, so nothing already saved was damaged.")
    if isinstance(exc, QALoRAError):
        return str(exc)
    return f"{type(exc).__name__}: {exc} (internal error; the full traceback is in the job log)."


def export_note(result: dict) -> str:
    fmt = result["format"]
    if fmt == "gptq":
        return (f"GPTQ stores integer zero points, so the merged offsets were rounded: against the exact "
                f"model, max |logit difference| {result['max_abs_logit_diff']:.3g}, mean "
                f"{result['mean_abs_logit_diff']:.3g}, same top-1 token at {result['top1_agreement']:.0%} of "
                "positions. The native download is exact; GGUF differs from it only by fp16 rounding.")
    if fmt == "gguf":
        return (f"{result.get('gguf_type', 'GGUF')} file: the same codes, each group's scale and offset "
                "stored in fp16 (exact up to fp16 rounding). Load it with llama.cpp, llama-cpp-python, "
                "Ollama or LM Studio.")
    if fmt == "torchao":
        return (f"transformers checkpoint (torchao int-x): the same codes, scales and float zero points in bf16; "
                f"against the exact model, max |logit difference| {result['max_abs_logit_diff']:.3g} (largest "
                f"logit {result['max_abs_logit']:.3g}), same top token at {result['top1_agreement']:.0%} of "
                "positions. Load it with transformers' AutoModelForCausalLM.from_pretrained (pip install torchao).")
    if fmt == "peft":
        return "PEFT LoRA adapter (lora_A expanded to full width); apply it to the 16-bit base with peft."
    return "Native low-bit model: load with qalora.deployment.export.native.load_quantized."


def run_benchmarks(spec: JobSpec, folder: Path, log, on_progress) -> dict:
    """lm-evaluation-harness on the job's merged model, and on the 16-bit base and the quantized base
    (each once per base, quantization and benchmark settings, kept under the store's cache: a sweep
    evaluates its base once). ``on_progress(done, total)`` counts requests over the runs still to
    make; it may raise to stop."""
    from qalora.evaluation import benchmarks
    from qalora.models.model import pick_device

    device = pick_device()
    runs = [("merged", None)] + [(which, benchmarks.baseline_key(which, spec.base, spec.quant, spec.benchmarks,
                                                                 spec.data, spec.data_options))
                                 for which in ("base16", "quantized_base")]
    cache = get_settings().home / "cache" / "benchmarks"
    out = {"settings": dict(spec.benchmarks)}
    for i, (which, key) in enumerate(runs):
        kept = benchmarks.read_cached(cache, key) if key else None
        if kept is not None:
            log.info("benchmarks of the %s: cached (%s)", which, key["id"])
            out[which] = kept
            continue
        calib = _calibration(spec) if which == "quantized_base" and spec.quant.method == "gptq" else None
        model, tokenizer = benchmarks.open_for(which, folder, spec.base, spec.quant, device, calib)
        results = benchmarks.run(model, tokenizer, spec.benchmarks["tasks"],
                                 num_fewshot=spec.benchmarks.get("num_fewshot"), limit=spec.benchmarks.get("limit"),
                                 on_progress=lambda done, total, i=i: on_progress(i * total + done,
                                                                                  len(runs) * total))
        del model
        out[which] = benchmarks.scores(results)
        log.info("benchmarks of the %s: %s", which,
                 ", ".join(f"{t} {v['metric']} {v['value']:.4f}" for t, v in out[which].items()))
        if key:
            benchmarks.write_cached(cache, key, out[which])
    return out


def _calibration(spec: JobSpec):
    """GPTQ's calibration samples as the run drew them: its first training examples."""
    from qalora.data import records as data_mod
    from qalora.models.model import open_base
    from qalora.training.finetune import calibration_ids

    records = data_mod.load_records(spec.data, **spec.data_options)
    train_records, _ = data_mod.split_records(records, spec.train.eval_fraction, spec.train.seed)
    tokenizer = open_base(spec.base).tokenizer
    return calibration_ids(data_mod.tokenize_records(train_records, tokenizer, spec.train.seq_len))


def _run_task(task_id: int, worker_id: str, describe, work) -> str:
    """Run a task row this worker claimed (an export, a benchmark) for its finished job, in the
    worker, never the web process: it heartbeats, is recovered and is finished as any row of the
    queue is. ``describe(task)`` names it in the job's log ("export gguf").
    ``work(task, log, lost)`` does it and returns ``(report, record)``: the task's report
    and ``record(session)``, what else it writes when it succeeds; raising ``_Stop`` ends the task
    canceled (or leaves it, when it was taken over). Returns "done", "canceled", "failed" or
    "taken over"."""
    with db() as s:
        task = repo.get_job(s, task_id)
        s.expunge(task)
    what = describe(task)
    log = job_logger(task.parent_id, task.folder)
    lost = threading.Event()
    beat = _Heartbeat(task_id, worker_id, get_settings().heartbeat_s, lost)
    beat.start()
    try:
        report, record = work(task, log, lost)
        with db() as s:
            repo.succeed(s, task_id, worker_id, report=report)
            record(s)
        return "done"
    except _Stop as exc:
        if lost.is_set():
            log.warning("%s: taken over after a missed heartbeat; leaving it", what)
            return "taken over"
        log.info("%s canceled (%s)", what, exc)
        with db() as s:
            repo.cancel(s, task_id, worker_id)
        return "canceled"
    except IllegalTransition:
        log.warning("%s: it was taken over after a missed heartbeat; leaving it", what)
        return "taken over"
    except Exception as exc:
        message = describe_error(exc, None)
        log.error("%s failed: %s\n%s", what, message, traceback.format_exc())
        try:
            with db() as s:
                repo.fail(s, task_id, worker_id, message)
        except IllegalTransition:
            return "taken over"
        return "failed"
    finally:
        beat.done.set()
        beat.join()
        close_logger(log)


def run_export(task_id: int, worker_id: str) -> str:
    """Write the format of an export row this worker claimed, for its job (:func:`_run_task`)."""
    from qalora.deployment.export import export_run

    def work(task, log, lost):
        fmt, folder = task.spec["format"], task.folder
        log.info("export %s (asked for after the job ended) on worker %s", fmt, worker_id)
        result = export_run(folder, fmt)
        log.info("export %s: %s", fmt, result["path"])
        kept = {**result, "path": repo.relative(result["path"], folder), "note": export_note(result)}
        return kept, lambda s: repo.add_artifact(s, task.parent_id, fmt, Path(result["path"]), folder)
    return _run_task(task_id, worker_id, lambda task: f"export {task.spec['format']}", work)


def run_benchmark(task_id: int, worker_id: str) -> str:
    """Benchmark a finished job with the settings of a benchmark row this worker claimed
    (:func:`run_benchmarks`, :func:`_run_task`): progress in requests with an ETA, a cancel honoured
    between requests; the scores go in the task's report and the job's."""
    def work(task, log, lost):
        with db() as s:
            parent = JobSpec.from_dict(repo.get_job(s, task.parent_id).spec)
        spec = JobSpec.from_dict({**parent.to_dict(), "benchmarks": task.spec["benchmarks"]})
        log.info("benchmarks %s (asked for after the job ended) on worker %s", spec.benchmarks["tasks"], worker_id)
        t0 = time.perf_counter()

        def progress(done: int, total: int) -> None:
            with db() as s:
                row = repo.get_job(s, task.id)
                if lost.is_set() or row.cancel_requested:
                    raise _Stop("stopped while benchmarking")
                eta = (time.perf_counter() - t0) * (total - done) / done if done else None
                if not repo.heartbeat(s, task.id, worker_id, stage="benchmark", stage_done=done, stage_total=total,
                                      eta_s=eta):
                    lost.set()
        out = run_benchmarks(spec, task.folder, log, progress)
        return out, lambda s: repo.set_report_value(s, task.parent_id, "benchmarks", out)
    return _run_task(task_id, worker_id, lambda task: "benchmark", work)


class Board:
    """TensorBoard event files in the job's folder, the format people's tools read:
    ``train/loss``, ``train/lr``, ``train/tokens_per_s``, ``train/grad_norm`` at every step and
    ``eval/loss`` where evaluated. Each attempt writes its own run (``tensorboard/attempt-N``): a
    resumed job shows the interrupted attempt up to where it died and the resumed one from its
    checkpoint on. Flushed at every step; the writer is opened at the first step (it imports
    TensorBoard)."""

    def __init__(self, directory: Path):
        self.directory, self.writer = directory, None

    def step(self, info) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.directory))
        scalars = {"train/loss": info.loss, "train/lr": info.lr, "train/tokens_per_s": info.tokens_per_s,
                   "train/grad_norm": info.extra.get("grad_norm"), "eval/loss": info.eval_loss}
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, info.step)
        self.writer.flush()  # on disk at every step: a killed worker loses none of what it logged

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _Heartbeat(threading.Thread):
    """Keeps a row's heartbeat (a job's, an export's) fresh while the main thread is busy inside the
    library; ``lost`` is set when the row is no longer this worker's."""

    def __init__(self, job_id: int, worker_id: str, every_s: float, lost: threading.Event):
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id, self.worker_id, self.every_s, self.lost = job_id, worker_id, every_s, lost
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            try:
                with db() as s:
                    if not repo.heartbeat(s, self.job_id, self.worker_id):
                        self.lost.set()
                        return
            except Exception:  # a locked or unreachable database: try again next beat
                continue


def run_job(job_id: int, worker_id: str | None = None, *, shutdown: threading.Event | None = None) -> str:
    """Run job ``job_id`` to an end state and return that status's value.

    With ``worker_id`` the job must already be claimed by that worker (the worker loop);
    without, this call claims the queued job itself. ``shutdown`` set by a stopping worker
    makes the job checkpoint and go back to the queue.
    """
    if worker_id is None:
        worker_id = new_worker_id()
        with db() as s:
            repo.claim(s, worker_id, job_id)
    with db() as s:
        job = repo.get_job(s, job_id)
        raw_spec, artifact_dir, attempt = job.spec, job.folder, job.attempts
        about = {"id": job.id, "name": job.name, "spec": job.spec, "sweep_id": job.sweep_id}
    run = _JobRun(job_id, worker_id, artifact_dir, shutdown or threading.Event(), attempt)
    run.mlflow = MlflowRun.from_env(artifact_dir, about, run.log)
    beat = _Heartbeat(job_id, worker_id, get_settings().heartbeat_s, run.lost)
    beat.start()
    try:
        run.log.info("attempt %d on worker %s: %s", attempt, worker_id, raw_spec)
        status = run.execute(raw_spec)
        if run.mlflow:
            run.mlflow.end(status, run.report)
        return status
    finally:
        beat.done.set()
        beat.join()
        close_logger(run.log)


class _JobRun:
    """One attempt at one job: the library's callbacks and the recording of its outcome."""

    def __init__(self, job_id: int, worker_id: str, artifact_dir: Path, shutdown: threading.Event,
                 attempt: int = 1):
        self.job_id, self.worker_id, self.artifact_dir, self.shutdown = job_id, worker_id, artifact_dir, shutdown
        self.attempt = attempt
        self.lost = threading.Event()  # another worker owns the job now (we were presumed dead)
        self.log = job_logger(job_id, artifact_dir)
        self.board = Board(artifact_dir / BOARD_DIR / f"attempt-{attempt}")
        self.mlflow: MlflowRun | None = None  # MLFLOW_TRACKING_URI set: the job's MLflow run
        self.report: dict | None = None  # the finished job's report
        self.stage: str | None = None
        self.stage_t0 = time.perf_counter()
        self.stage_s: dict[str, float] = {}  # seconds spent in each stage this attempt
        self.finishing: list[str] = []  # stages after training (set once the spec is read)
        self.history: dict[str, float] = {}  # stage seconds of an earlier job on the same base
        self.s_per_step: float | None = None  # measured training rate, for the finishing estimate

    def _read(self):
        """The job's row as the database has it now; a job no longer ours sets ``lost``."""
        with db() as s:
            row = s.execute(select(Job.status, Job.worker_id, Job.cancel_requested)
                            .where(Job.id == self.job_id)).one()
        if row.status != JobStatus.RUNNING.value or row.worker_id != self.worker_id:
            self.lost.set()
        return row

    def should_stop(self) -> bool:
        if self.lost.is_set() or self.shutdown.is_set():
            return True
        row = self._read()  # one primary-key read per step: a cancel is seen within one step
        return self.lost.is_set() or row.cancel_requested

    def owns(self) -> bool:
        """Whether the job is still ours, read from the database before each checkpoint: a worker
        presumed dead and taken over writes nothing into the new owner's folder."""
        if not self.lost.is_set():
            self._read()
        return not self.lost.is_set()

    def _close_stage(self) -> None:
        """Add the current stage's time to ``stage_s``."""
        now = time.perf_counter()
        if self.stage is not None:
            self.stage_s[self.stage] = self.stage_s.get(self.stage, 0.0) + now - self.stage_t0
        self.stage, self.stage_t0 = None, now

    def _enter(self, name: str) -> None:
        """Start timing stage ``name`` (closing the previous one) and record it in the row."""
        self._close_stage()
        self.stage = name
        with db() as s:
            if not repo.heartbeat(s, self.job_id, self.worker_id, stage=name, stage_done=None, stage_total=None,
                                  stage_started_at=utcnow(), eta_s=self.eta(name)):
                self.lost.set()

    def eta(self, stage: str, done: int = 0, total: int | None = None, steps_left: int = 0) -> float | None:
        """Seconds to the end of the job: the rest of this stage (from its own measured rate when it
        has made progress) plus every later finishing stage (from an earlier job's times, else from
        this job's training rate); None while there is nothing to estimate from."""
        if stage not in self.finishing and stage != "train":
            return None
        later = self.finishing if stage == "train" else self.finishing[self.finishing.index(stage) + 1:]
        estimates = [estimate_stage(st, self.s_per_step, self.history) for st in later]
        if any(e is None for e in estimates):
            return None
        if stage == "train":
            return steps_left * self.s_per_step + sum(estimates) if self.s_per_step is not None else None
        elapsed = time.perf_counter() - self.stage_t0
        if done and total:
            current = elapsed * (total - done) / done
        else:
            guess = estimate_stage(stage, self.s_per_step, self.history)
            current = None if guess is None else max(guess - elapsed, 0.0)
        return None if current is None else current + sum(estimates)

    def _record_stage(self, name: str) -> None:
        self.log.info("stage: %s", name)
        self._enter(name)
        if os.environ.get(FAULT_STAGE) == name and self.attempt == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: the kill-anywhere resume test
        if os.environ.get(PAUSE_STAGE) == name and self.attempt == 1:
            self._pause()

    def _pause(self, limit_s: float = 120.0) -> None:
        """Fault injection: hold this stage until a stop is asked for (the cancel-in-any-stage tests)."""
        end = time.monotonic() + limit_s
        while time.monotonic() < end and not self.should_stop():
            time.sleep(0.05)

    def on_stage(self, name: str) -> None:
        """The job's own stages (exports, scoring): recorded, then a stop asked for is honoured."""
        self._record_stage(name)
        if name != "done" and self.should_stop():
            raise _Stop(f"stopped before stage {name!r}")

    def library_stage(self, name: str) -> None:
        """The library's stages, recorded; the library itself asks ``should_stop`` at each one (all
        ranks agreeing). Its "done" is not the job's, whose exports and scoring follow."""
        if name != "done":
            self._record_stage(name)

    def on_progress(self, stage: str, done: int, total: int) -> None:
        """Progress inside a stage (a layer quantized, a question scored): shown with its ETA."""
        with db() as s:
            if not repo.heartbeat(s, self.job_id, self.worker_id, stage=stage, stage_done=done, stage_total=total,
                                  eta_s=self.eta(stage, done, total)):
                self.lost.set()

    def on_step(self, info) -> None:
        self.board.step(info)
        if self.mlflow:
            self.mlflow.step(info)
        self.s_per_step = info.elapsed_s / max(info.step, 1)
        eta = self.eta("train", steps_left=info.total_steps - info.step)
        with db() as s:
            if not repo.record_step(s, self.job_id, self.worker_id, step=info.step, train_loss=info.loss,
                                    eval_loss=info.eval_loss, lr=info.lr, tokens_per_s=info.tokens_per_s,
                                    elapsed_s=info.elapsed_s, eta_s=eta, tokens_seen=info.tokens_seen):
                self.lost.set()

    def execute(self, raw_spec: dict) -> str:
        from qalora.training.finetune import TrainingStopped, finetune

        spec = None
        try:
            spec = JobSpec.from_dict(raw_spec).validate()  # once, here: the files may have changed since the queue
            self.finishing, self.history = finishing_stages(spec), stage_history(spec.base)
            report = finetune(spec.base, spec.data, self.artifact_dir, spec.quant, spec.adapter, spec.train,
                              resume=True, log=self.log, on_step=self.on_step, should_stop=self.should_stop,
                              on_stage=self.library_stage, on_progress=self.on_progress, owns=self.owns,
                              columns=spec.columns, max_samples=spec.max_samples)
            report = self.after_training(spec, report)
        except (TrainingStopped, _Stop) as exc:
            return self._stopped(str(exc))
        except Exception as exc:
            message = describe_error(exc, spec)
            self.log.error("failed: %s\n%s", message, traceback.format_exc())
            return self._finish(lambda s: repo.fail(s, self.job_id, self.worker_id, message), JobStatus.FAILED)
        except BaseException:
            # the worker process is being torn down (KeyboardInterrupt, SystemExit): hand the job back
            self.log.warning("worker %s stopping mid-job:\n%s", self.worker_id, traceback.format_exc())
            self._finish(lambda s: self._hand_back(s, "the worker stopped"), JobStatus.QUEUED)
            raise
        finally:
            self.board.close()
        self.log.info("succeeded: merge max |logit diff| %.3g", report["merge_max_abs_logit_diff"])
        self.report = report
        return self._finish(lambda s: self._succeed(s, report), JobStatus.SUCCEEDED)

    def after_training(self, spec: JobSpec, report: dict) -> dict:
        """The spec's extra exports and the evaluation (:meth:`evaluate`); kept in the report."""
        from qalora.deployment.export import export_run

        if spec.extra_exports:
            self.on_stage("export")
        exports = {}
        for fmt in spec.extra_exports:
            name = f"export {fmt}"
            self._enter(name)
            result = export_run(self.artifact_dir, fmt,
                                on_progress=lambda done, total, name=name: self.on_progress(name, done, total))
            self.log.info("export %s: %s", fmt, result)
            # kept relative to the job's folder, which each machine finds under its QALORA_ARTIFACTS
            exports[fmt] = {**result, "path": repo.relative(result["path"], self.artifact_dir)}
        self.on_stage("evaluate")
        self.evaluate(spec, report)
        if spec.benchmarks:
            self.on_stage("benchmark")
            report["benchmarks"] = self.benchmark(spec)
        self._close_stage()
        report["exports"] = exports
        # what each stage took in this attempt: the next job on this base estimates its ETA from it
        report["stage_s"] = {k: round(v, 2) for k, v in self.stage_s.items()}
        write_text(self.artifact_dir / ARTIFACTS["report"], json.dumps(report, indent=2))
        self.on_stage("done")  # once, after everything the job does
        return report

    def evaluate(self, spec: JobSpec, report: dict) -> None:
        """The merged model as deployed (the int4 kernel where the device and shape allow it): on
        built-in data its multiple-choice score, and on any chat data a few held-out replies
        generated and compared exactly, so a model that scores on near-miss choices but cannot
        answer shows it."""
        from qalora.evaluation.heldout import GENERATION_REPLIES, evaluate_dir, generation_check_dir
        from qalora.models.model import pick_device

        device, merged = str(pick_device()), self.artifact_dir / "merged"
        mc_data = BUILTIN_MC.get(spec.data)
        questions = MC_QUESTIONS if mc_data else 0
        total = questions + GENERATION_REPLIES
        if mc_data:
            mc = evaluate_dir(merged, mc_data, limit=MC_QUESTIONS, use_kernel=True, device=device,
                              on_progress=lambda done, _: self.on_progress("evaluate", done, total))
            report["multiple_choice"] = {k: mc[k] for k in ("data", "accuracy", "correct", "n", "chance", "k_shot")}
            self.log.info("multiple choice on %s: %d/%d correct", mc_data, mc["correct"], mc["n"])
        gen = generation_check_dir(merged, spec.data, eval_fraction=spec.train.eval_fraction, seed=spec.train.seed,
                                   columns=spec.columns, max_samples=spec.max_samples,
                                   device=device, use_kernel=True,
                                   on_progress=lambda done, _: self.on_progress("evaluate", questions + done, total))
        if gen is not None:
            report["generation"] = gen
            self.log.info("held-out replies: %d/%d exact", gen["exact"], gen["n"])

    def benchmark(self, spec: JobSpec) -> dict:
        """:func:`run_benchmarks` as the job's last stage; a cancel is honoured between requests."""
        def progress(done, total):
            if self.should_stop():
                raise _Stop("stopped while benchmarking")
            self.on_progress("benchmark", done, total)
        return run_benchmarks(spec, self.artifact_dir, self.log, progress)

    def _succeed(self, s, report: dict) -> None:
        for kind, rel in ARTIFACTS.items():
            if (self.artifact_dir / rel).exists():
                repo.add_artifact(s, self.job_id, kind, self.artifact_dir / rel, self.artifact_dir)
        for fmt, result in (report.get("exports") or {}).items():
            repo.add_artifact(s, self.job_id, fmt, self.artifact_dir / result["path"], self.artifact_dir)
        repo.succeed(s, self.job_id, self.worker_id, report)

    def _stopped(self, why: str) -> str:
        if self.lost.is_set():
            self.log.warning("%s: the job was taken over after a missed heartbeat; leaving it", why)
            return self._status()
        with db() as s:
            canceled = repo.get_job(s, self.job_id).cancel_requested
        if canceled:
            self.log.info("canceled (%s)", why)
            return self._finish(lambda s: repo.cancel(s, self.job_id, self.worker_id), JobStatus.CANCELED)
        self.log.info("worker shutting down (%s); the job goes back to the queue and resumes from its "
                      "checkpoint", why)
        return self._finish(lambda s: self._hand_back(s, "the worker shut down"), JobStatus.QUEUED)

    def _hand_back(self, s, why: str) -> None:
        repo.interrupt(s, self.job_id, self.worker_id, reason=f"{why}; resuming from the last checkpoint")
        repo.requeue(s, self.job_id)

    def _status(self) -> str:
        with db() as s:
            return repo.get_job(s, self.job_id).status

    def _finish(self, write, status: JobStatus) -> str:
        try:
            with db() as s:
                write(s)
        except IllegalTransition as exc:
            self.log.warning("could not record the outcome: %s", exc)
            return self._status()
        return status.value
