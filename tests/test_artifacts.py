"""Job folders live under QALORA_ARTIFACTS and are stored by name, so a machine that mounts the shared
folder elsewhere finds every file of a job another machine ran."""
import json
import shutil

from jobs import service
from jobs.spec import JobSpec
from jobs.worker import Worker
from qalora.config import AdapterConfig, QuantConfig, TrainConfig
from storage import db, repo


def test_a_job_is_found_through_qalora_artifacts_wherever_the_shared_folder_is_mounted(tmp_path, monkeypatch):
    monkeypatch.setenv("QALORA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QALORA_DB_URL", raising=False)
    monkeypatch.setenv("QALORA_ARTIFACTS", str(tmp_path / "gpu-host-mount"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and 3.", "output": str(i + 3)}) + "\n"
                            for i in range(30)))
    spec = JobSpec(base="tiny-random", data=str(data), quant=QuantConfig(4, 32), adapter=AdapterConfig(rank=4, alpha=8),
                   train=TrainConfig(steps=3, batch_size=2, seq_len=64, warmup_steps=1, eval_every=3, save_every=3,
                                     eval_batches=1), exports=("gguf",))
    job_id = service.submit(spec)
    assert Worker().run(burst=True) == 1
    with db() as s:
        assert repo.get_job(s, job_id).artifact_dir == f"job-{job_id:05d}"  # a name, not this machine's path
    # the web host mounts the same shared folder at another path
    shutil.move(tmp_path / "gpu-host-mount", tmp_path / "web-host-mount")
    monkeypatch.setenv("QALORA_ARTIFACTS", str(tmp_path / "web-host-mount"))
    job = service.get_job(job_id)
    folder = tmp_path / "web-host-mount" / f"job-{job_id:05d}"
    assert job["status"] == "succeeded" and job["artifact_dir"] == str(folder)
    assert {a["kind"]: a["path"] for a in job["artifacts"]}["gguf"] == str(folder / "exports" / "model-q4_1.gguf")
    assert [m["path"] for m in service.list_models()] == [str(folder / "merged")]
    assert "succeeded" in service.read_log(job_id)
    path, _ = service.download_model(job_id, "gguf", tmp_path / "dl")
    assert path.read_bytes() == (folder / "exports" / "model-q4_1.gguf").read_bytes()
    assert service.compare([job_id])["rows"][0]["gguf_mb"] * 1e6 == path.stat().st_size
    # an export asked for later is written by a worker there and found here, by name again
    task = service.request_export(job_id, "peft")
    assert Worker().run(burst=True) == 0  # no job: it ran the export task
    (done,) = [t for t in service.export_tasks(job_id) if t["id"] == task["id"]]
    assert done["status"] == "done" and done["path"] == str(folder / "exports" / "peft")
