"""MLflow logging is optional: without the package, or with a tracking store that fails, the job goes on."""
import logging
import sys

from jobs.mlflow_log import MlflowRun
from qalora.config import StepInfo

JOB = {"id": 7, "name": "probe", "sweep_id": None,
       "spec": {"base": "tiny-random", "data": "builtin:contacts", "quant": {"bits": 4}, "adapter": {"rank": 4},
                "train": {"steps": 3}}}


def test_without_the_tracking_uri_nothing_is_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert MlflowRun.from_env(tmp_path, JOB, logging.getLogger("t")) is None
    assert not (tmp_path / "mlflow_run_id").exists()


def test_a_missing_mlflow_package_is_said_once_and_the_job_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # what an environment without mlflow shows
    with caplog.at_level(logging.WARNING):
        assert MlflowRun.from_env(tmp_path, JOB, logging.getLogger("t")) is None
    assert caplog.messages == ["MLFLOW_TRACKING_URI is set but mlflow is not installed: pip install mlflow-skinny; "
                               "this job is logged to TensorBoard only"]


def test_a_store_that_fails_mid_job_stops_the_logging_not_the_job(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    run = MlflowRun.from_env(tmp_path, JOB, logging.getLogger("t"))
    assert run is not None and (tmp_path / "mlflow_run_id").read_text() == run.run_id
    info = StepInfo(1, 3, 2.5, 1e-3, 100.0, 1.0, None, tokens_seen=100, extra={"grad_norm": 0.5})
    run.step(info)
    assert [(m.step, m.value) for m in run.client.get_metric_history(run.run_id, "train/grad_norm")] == [(1, 0.5)]
    (tmp_path / "m.db").unlink()  # the store is gone
    (tmp_path / "m.db").mkdir()  # and cannot be opened again
    with caplog.at_level(logging.WARNING):
        run.step(info)
        run.end("succeeded", {"eval_loss_merged": 1.0})
    assert run.client is None
    assert len(caplog.messages) == 1 and caplog.messages[0].startswith("MLflow logging stopped (a step failed: ")
