"""Optional MLflow logging of a job: on when ``MLFLOW_TRACKING_URI`` is set and ``mlflow`` (or
``mlflow-skinny``) is installed; the app works without either.

One MLflow run per job, in the experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``qalora-studio``):
its settings as params, every step's train loss, lr, tokens/s and grad norm (eval loss where
evaluated), and at the end the outcomes (eval losses, merge check, multiple-choice score, model
sizes). A resumed job continues its run (the run id is kept in the job's folder). A tracking
server that fails never fails the job: the first error is logged and logging stops.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

RUN_ID_FILE = "mlflow_run_id"
DEFAULT_EXPERIMENT = "qalora-studio"


class MlflowRun:
    def __init__(self, client, run_id: str, log: logging.Logger):
        self.client, self.run_id, self.log = client, run_id, log

    @classmethod
    def from_env(cls, artifact_dir: Path, job: dict, log: logging.Logger) -> MlflowRun | None:
        """The job's run (started, or continued after a resume); ``None`` when MLflow is not asked for
        or cannot be used (said once in the job log)."""
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            return None
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            log.warning("MLFLOW_TRACKING_URI is set but mlflow is not installed: pip install mlflow-skinny; "
                        "this job is logged to TensorBoard only")
            return None
        try:
            client = MlflowClient(tracking_uri=uri)
            saved = Path(artifact_dir) / RUN_ID_FILE
            if saved.is_file():
                run_id = saved.read_text().strip()
                client.update_run(run_id, status="RUNNING")
            else:
                run_id = cls._start(client, job)
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(run_id)
        except Exception as exc:  # a server that is down, a store that cannot be written
            log.warning("MLflow logging is off for this job: %s", exc)
            return None
        log.info("MLflow run %s at %s", run_id, uri)
        return cls(client, run_id, log)

    @staticmethod
    def _start(client, job: dict) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        found = client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else client.create_experiment(name)
        spec = job["spec"]
        tags = {"qalora.job_id": str(job["id"]), "mlflow.runName": job["name"]}
        if job.get("sweep_id"):
            tags["qalora.sweep_id"] = job["sweep_id"]
        run = client.create_run(experiment, run_name=job["name"], tags=tags)
        params = {"base": spec.get("base"), "data": spec.get("data"), **{f"quant.{k}": v for k, v in spec["quant"].items()},
                  **{f"adapter.{k}": v for k, v in spec["adapter"].items()},
                  **{f"train.{k}": v for k, v in spec["train"].items()}}
        from mlflow.entities import Param
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])
        return run.info.run_id

    def _safely(self, what: str, call) -> None:
        if self.client is None:
            return
        try:
            call()
        except Exception as exc:
            self.log.warning("MLflow logging stopped (%s failed: %s); the job goes on", what, exc)
            self.client = None

    def step(self, info) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        values = {"train/loss": info.loss, "train/lr": info.lr, "train/tokens_per_s": info.tokens_per_s,
                  "train/grad_norm": info.extra.get("grad_norm"), "eval/loss": info.eval_loss}
        metrics = [Metric(k, float(v), stamp, info.step) for k, v in values.items() if v is not None]
        self._safely("a step", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def end(self, status: str, report: dict | None = None) -> None:
        """``status``: the job's (succeeded, failed, canceled, queued = handed back to resume later)."""
        from mlflow.entities import Metric

        if report:
            stamp = int(time.time() * 1000)
            mc = report.get("multiple_choice") or {}
            final = {"final/eval_loss_quantized_base": report.get("eval_loss_quantized_base"),
                     "final/eval_loss_trained": report.get("eval_loss_adapter"),
                     "final/eval_loss_merged": report.get("eval_loss_merged"),
                     "final/merge_max_abs_logit_diff": report.get("merge_max_abs_logit_diff"),
                     "final/multiple_choice_accuracy": mc.get("accuracy"),
                     "final/tokens_per_s": report.get("tokens_per_s"), "final/peak_rss_mb": report.get("peak_rss_mb")}
            metrics = [Metric(k, float(v), stamp, 0) for k, v in final.items() if v is not None]
            self._safely("the outcomes", lambda: self.client.log_batch(self.run_id, metrics=metrics))
        state = {"succeeded": "FINISHED", "failed": "FAILED", "canceled": "KILLED"}.get(status)
        if state:  # a job handed back stays RUNNING: its next attempt continues the run
            self._safely("the end", lambda: self.client.set_terminated(self.run_id, state))
