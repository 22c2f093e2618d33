"""The app's form and handlers without a browser: validation messages, launch, job view, card preview.

Handlers are called as Gradio would call them; their outputs are what the page shows.
"""
import json
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest

import app
from jobs import forms, service

ROOT = Path(__file__).resolve().parents[1]
# base, bits, group, method, data kind, built-in, upload, path, rank, alpha, lr, steps, batch, seq, name, exports
FORM = dict(base="tiny-random", bits=4, group_size=32, method="rtn", kind="built-in", builtin="builtin:contacts",
            upload=None, path="", rank=4, alpha=8, lr=1e-3, steps=6, batch=2, seq=256, name="", exports=[])


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QALORA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QALORA_DB_URL", raising=False)
    monkeypatch.setenv("QALORA_ALLOWED_DIRS", str(tmp_path))  # the tests' files live here
    return tmp_path


def _launch(**changes):
    return app._launch(*{**FORM, **changes}.values())


def _config_dir(tmp_path, **config) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_importing_the_app_builds_demo_without_launching_or_importing_torch():
    code = "import sys, app; print(type(app.demo).__name__, app.demo.is_running, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["Blocks", "False", "False"], out.stderr


def test_launch_queues_a_job_and_switches_to_the_jobs_tab(home):
    note, picker, tabs = _launch(name="smoke")
    (job,) = service.list_jobs()
    assert note == f"Job **#{job['id']}** (smoke) queued; follow it in the Jobs tab."
    assert picker["value"] == job["id"] and picker["choices"] == [(f"#{job['id']} smoke (queued)", job["id"])]
    assert tabs.selected == "jobs"
    assert job["spec"]["train"]["steps"] == 6 and job["spec"]["quant"]["group_size"] == 32
    assert job["spec"]["train"]["eval_every"] == 1  # steps // 5 evaluations: the chart shows eval points


@pytest.mark.parametrize("changes, message", [
    (dict(group_size="48"), "**Error:** group_size=48 does not divide in_features=64 of q_proj; valid group sizes for "
                            "this model include [16, 32, 64]."),
    # server paths outside the allowed folders: one message, whether or not they exist
    (dict(base="/no/such/model"), "**Error:** base model: the form only reads server files under "),
    (dict(base="/etc"), "**Error:** base model: the form only reads server files under "),
    (dict(kind="path or name", path="/etc/passwd"), "**Error:** dataset: the form only reads server files under "),
    (dict(group_size="16", exports=["gguf"]), "**Error:** GGUF export needs a group size that is a multiple of 32, "
                                              "got 16: llama.cpp's Q4_1 format keeps one scale and one offset per "
                                              "block of 32 weights, so a block would span groups with different "
                                              "scales and the weights would have to be re-quantized, changing the "
                                              "model. Fine-tune with group_size 32, 64 or 128, or export this model "
                                              "in the native format."),
    (dict(steps="ten"), "**Error:** steps must be a whole number (got 'ten'); fix it in the advanced settings."),
    (dict(rank=0), "**Error:** rank must be at least 1 (got 0)."),
    (dict(kind="upload"), "**Error:** no file is uploaded; drop a .jsonl, .json, .csv or .parquet file on the "
                          "upload box."),
    (dict(kind="path or name", path="missing.jsonl"), "**Error:** dataset: the form only reads server files under "),
])
def test_bad_input_is_reported_in_the_form_and_nothing_is_queued(home, changes, message):
    with pytest.warns(UserWarning):  # gr.Warning outside a request: the toast becomes a warning
        note, picker, tabs = _launch(**changes)
    assert note.startswith(message) and (note == message or "QALORA_ALLOWED_DIRS" in note)
    assert isinstance(picker, type(gr.skip())) and isinstance(tabs, type(gr.skip()))
    assert service.list_jobs() == []


def test_a_dataset_with_a_missing_column_is_refused_with_the_file_and_the_expected_columns(home):
    bad = home / "qa.jsonl"
    bad.write_text('{"question": "2+2?", "answer": "4"}\n{"question": "3+3?", "answer": "6"}\n')
    with pytest.warns(UserWarning):
        note, *_ = _launch(kind="upload", upload=str(bad))
    assert note.startswith("**Error:** qa.jsonl: none of its 2 column(s) is a known record format; expected one of these "
                           "column sets")
    rows = home / "alpaca.jsonl"
    rows.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.warns(UserWarning):
        note, *_ = _launch(kind="path or name", path=str(rows))
    assert "alpaca.jsonl row 2" in note and "output" in note
    assert service.list_jobs() == []


def test_base_model_field_offers_valid_group_sizes_and_rejects_non_llama(home):
    update, note = app._base_changed(_config_dir(home, model_type="llama", hidden_size=96, intermediate_size=256,
                                                 num_attention_heads=3))
    assert update["choices"] == [16, 32] and update["value"] == 32
    assert note == "Group sizes valid for this model: [16, 32]."
    assert forms.group_size_choices("default") == [16, 32, 64]  # SmolLM2-135M: 576 and 1536 wide
    assert forms.group_size_choices("org/some-model") == list(forms.FALLBACK_GROUP_SIZES)
    (home / "model").rename(home / "llama")
    with pytest.warns(UserWarning):
        _, note = app._base_changed(_config_dir(home, model_type="gpt2", hidden_size=64, intermediate_size=256))
    assert "is a 'gpt2' model; QA-LoRA Studio supports LLaMA-family causal LMs" in note


def test_dataset_preview_renders_records_with_the_base_chat_template(home):
    data = home / "sums.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and 3.", "output": str(i + 3)}) + "\n"
                            for i in range(5)))
    shown = app._dataset_preview("upload", None, str(data), "", "tiny-random")
    assert shown.startswith("**5 records.**")
    assert "<|im_start|>user\nAdd 0 and 3.<|im_end|>\n<|im_start|>assistant\n3<|im_end|>" in shown
    assert "Add 2 and 3." in shown and "Add 3 and 3." not in shown  # three examples only


def test_presets_fill_the_advanced_fields():
    assert set(forms.PRESETS) == {"quick", "balanced", "thorough"}
    steps = [forms.PRESETS[p]["steps"] for p in ("quick", "balanced", "thorough")]
    assert steps == sorted(steps) and len(set(steps)) == 3


def test_job_view_shows_metrics_as_train_and_eval_series():
    metrics = [{"step": 1, "train_loss": 2.5, "eval_loss": None}, {"step": 2, "train_loss": 2.0, "eval_loss": 2.2}]
    frame = app._loss_frame(metrics)
    assert frame.values.tolist() == [[1, 2.5, "train"], [2, 2.0, "train"], [2, 2.2, "eval"]]
    assert app._loss_frame([]) is None
    assert [app._duration(s) for s in (None, 42, 125, 7300)] == ["", "42s", "2m 05s", "2h 01m"]


def test_refresh_shows_a_queued_job_and_skips_unchanged_parts(home):
    _launch(name="watch")
    (job,) = service.list_jobs()
    table, picker, summary, plot, merge, log, seen = app._refresh(job["id"], {})
    assert table.values.tolist()[0][:4] == [job["id"], "watch", "queued", "0/6 (0%)"]
    assert picker["choices"] == [(f"#{job['id']} watch (queued)", job["id"])]
    assert summary.startswith(f"### #{job['id']} watch: **queued**") and plot is None
    assert merge == "*Merge check appears when the job succeeds.*"
    again = app._refresh(job["id"], seen)
    assert all(isinstance(part, type(gr.skip())) for part in again[:6])  # nothing changed: nothing re-drawn


def test_job_buttons_cancel_resume_and_delete(home):
    _launch(name="buttons")
    (job,) = service.list_jobs()
    assert app._act("cancel", None) == "Select a job first."
    assert app._act("cancel", job["id"]) == "Canceled."  # it was only queued: nothing to wait for
    assert service.get_job(job["id"])["status"] == "canceled"
    assert app._act("resume", job["id"]) == "Queued again; it resumes from its last checkpoint."
    assert service.get_job(job["id"])["status"] == "queued"
    assert app._act("delete", job["id"]) == "Deleted, with its files."
    assert service.list_jobs() == []
    with pytest.warns(UserWarning):
        assert app._act("resume", job["id"]) == f"**Error:** Job {job['id']} does not exist; refresh the job list."


def test_auth_setting():
    assert app._auth(None) is None and app._auth("ann:s3cret:x") == [("ann", "s3cret:x")]
    with pytest.raises(SystemExit, match="QALORA_AUTH must look like user:password"):
        app._auth("ann")


def test_access_requires_a_login_off_loopback(tmp_path, capsys):
    # loopback: no login needed, the server's own Hub token may be used
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert app.access(host, False, {}) == app.Access(None, server_token=True)
    # anything else without a login: refused, with the fix named
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        with pytest.raises(SystemExit, match="QALORA_AUTH=user:password .*--no-auth"):
            app.access(host, False, {})
    # --no-auth: allowed with a warning, and visitors must bring their own token
    shared = app.access("0.0.0.0", True, {})
    assert shared.auth is None and shared.server_token is False and "anyone who can reach" in shared.warning.lower()
    # several users from QALORA_AUTH and from a file
    users = tmp_path / "users"
    users.write_text("# team\nann:pw1\n\nbob:pw:2\n")
    got = app.access("0.0.0.0", False, {"QALORA_AUTH": "cy:pw3,dee:pw4", "QALORA_AUTH_FILE": str(users)})
    assert got.auth == [("cy", "pw3"), ("dee", "pw4"), ("ann", "pw1"), ("bob", "pw:2")] and got.server_token
    users.write_text("ann\n")
    with pytest.raises(SystemExit, match="line 1 must look like user:password"):
        app.access("0.0.0.0", False, {"QALORA_AUTH_FILE": str(users)})
    with pytest.raises(SystemExit, match="cannot be read"):
        app.access("0.0.0.0", False, {"QALORA_AUTH_FILE": str(tmp_path / "none")})


def test_app_refuses_to_start_shared_without_login(monkeypatch):
    monkeypatch.delenv("QALORA_AUTH", raising=False)
    monkeypatch.delenv("QALORA_AUTH_FILE", raising=False)
    with pytest.raises(SystemExit, match="refusing to serve on 0.0.0.0 without a login"):
        app.main(["--host", "0.0.0.0", "--no-worker", "--port", "1"])


def test_the_jobs_timer_fetches_only_new_metric_rows(home, monkeypatch):
    from storage import db, repo

    _launch(name="metrics")
    (job,) = service.list_jobs()
    with db() as s:
        repo.claim(s, "w1", job["id"])

    def step(n):
        with db() as s:
            repo.record_step(s, job["id"], "w1", step=n, train_loss=1.0 / n, eval_loss=None, lr=1e-3,
                             tokens_per_s=5.0, elapsed_s=float(n), eta_s=1.0)

    asked = []
    real = service.get_job
    monkeypatch.setattr(service, "get_job", lambda job_id, metrics_after=0: asked.append(metrics_after) or
                        real(job_id, metrics_after))
    for n in (1, 2, 3):
        step(n)
    *_, plot, _, _, seen = app._refresh(job["id"], {})
    for n in (4, 5):
        step(n)
    asked.clear()
    *_, plot, _, _, seen = app._refresh(job["id"], seen)
    assert 3 in asked and 0 not in asked  # only the rows after step 3 were read
    assert sorted(plot[plot.series == "train"].step.tolist()) == [1, 2, 3, 4, 5]
    with db() as s:  # a resume (new attempt) may rewrite steps: everything is read again
        repo.interrupt(s, job["id"], "w1", reason="test")
        repo.requeue(s, job["id"])
        repo.claim(s, "w2", job["id"])
    asked.clear()
    app._refresh(job["id"], seen)
    assert asked[-1] == 0


@pytest.mark.parametrize("changes, start", [
    (dict(lr=1e9), "**Error:** learning rate 1e+09 is outside the range that trains an adapter (1e-06 to 0.01; "
                   "typical 1e-4 to 3e-4)"),
    (dict(lr=0), "**Error:** learning rate 0 is outside the range"),
    (dict(seq=8), "**Error:** sequence length 8 cuts away the whole reply of every one of the first 200 records, "
                  "leaving nothing to learn; raise it (typical 256-2048)"),
])
def test_what_the_worker_would_fail_on_is_refused_in_the_form(home, changes, start):
    with pytest.warns(UserWarning):
        note, *_ = _launch(**changes)
    assert note.startswith(start), note
    assert service.list_jobs() == []


def test_too_few_records_are_refused_with_the_minimum(home):
    few = home / "few.jsonl"
    few.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(3)))
    with pytest.warns(UserWarning):
        note, *_ = _launch(kind="path or name", path=str(few))
    assert note == ("**Error:** few.jsonl has 3 record(s); a fine-tune needs at least 8 (about one in ten is held "
                    "out to measure it). Add more records.")
    assert service.list_jobs() == []
