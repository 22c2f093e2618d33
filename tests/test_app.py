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
from ui import auth, common, new_job
from ui import chat as chat_tab, compare as compare_tab, jobs as jobs_tab

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
    return new_job._launch(*{**FORM, **changes}.values())


def _config_dir(tmp_path, **config) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_importing_the_app_builds_demo_without_launching_or_importing_torch():
    code = "import sys, app; print(type(app.demo).__name__, app.demo.is_running, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["Blocks", "False", "False"], out.stderr


def test_a_format_the_group_size_takes_away_is_not_exported(home):
    """At group size 16 the checkboxes hide GGUF and say why; Launch exports what they show, even
    when the click carries the tick that the group-size change has just taken away (a browser race
    that Gradio answered with "Value: 'gguf' is not in the list of choices")."""
    note, *_ = _launch(group_size="16", exports=["gguf", "peft"], name="g16")
    (job,) = service.list_jobs()
    assert note.startswith(f"Job **#{job['id']}** (g16) queued")
    assert job["spec"]["quant"]["group_size"] == 16 and "gguf" not in job["spec"]["exports"]
    assert "peft" in job["spec"]["exports"]


def test_queued_jobs_move_up_and_down_from_the_jobs_tab(home):
    for name in ("a", "b", "c"):
        _launch(name=name)
    a, b, c = sorted(j["id"] for j in service.list_jobs())
    assert jobs_tab._move("up", c) == f"Job #{c} is now 2 of 3 in the queue (runs in this order: #{a}, #{c}, #{b})."
    assert service.queue_order() == [a, c, b]
    assert jobs_tab._move("down", a).startswith(f"Job #{a} is now 2 of 3")
    service.cancel(b)
    assert jobs_tab._move("up", b).endswith(f"Job {b} is canceled, not queued: only queued jobs can be moved.")
    assert jobs_tab._move("up", None) == "Select a job first."


def test_launch_queues_a_job_and_switches_to_the_jobs_tab(home):
    note, picker, tabs, *fields = _launch(name="smoke")
    (job,) = service.list_jobs()
    assert note == f"Job **#{job['id']}** (smoke) queued; follow it in the Jobs tab."
    assert picker["value"] == job["id"] and picker["choices"] == [(f"#{job['id']} smoke (queued)", job["id"])]
    assert tabs.selected == "jobs"
    assert job["spec"]["train"]["steps"] == 6 and job["spec"]["quant"]["group_size"] == 32
    assert job["spec"]["train"]["eval_every"] == 1  # steps // 5 evaluations: the chart shows eval points


@pytest.mark.parametrize("changes, field, message", [
    (dict(group_size="48"), "group_size", "group_size=48 does not divide in_features=64 of q_proj; valid group sizes "
                                          "for this model include [16, 32, 64]."),
    # server paths outside the allowed folders: one message, whether or not they exist
    (dict(base="/no/such/model"), "base", "base model: the form only reads server files under "),
    (dict(base="/etc"), "base", "base model: the form only reads server files under "),
    (dict(kind="path or name", path="/etc/passwd"), "data", "dataset: the form only reads server files under "),
    (dict(steps="ten"), "advanced", "steps must be a whole number (got 'ten'); fix it in the advanced settings."),
    (dict(rank=0), "advanced", "rank must be at least 1 (got 0)."),
    (dict(kind="upload"), "data", "no file is uploaded; drop a .jsonl, .json, .csv or .parquet file on the "
                                  "upload box."),
    (dict(kind="path or name", path="missing.jsonl"), "data", "dataset: the form only reads server files under "),
])
def test_bad_input_is_shown_next_to_its_field_and_nothing_is_queued(home, changes, field, message):
    note, picker, tabs, *fields = _launch(**changes)
    notes = dict(zip(forms.FIELDS, fields))
    assert notes[field].startswith("⚠ " + message), notes
    assert notes[field] == "⚠ " + message or "QALORA_ALLOWED_DIRS" in notes[field]
    assert [k for k, v in notes.items() if v] == [field]  # only the field concerned is marked
    assert note == f"**Not queued:** fix what is marked ⚠ next to: {forms.FIELDS[field]}."
    assert isinstance(picker, type(gr.skip())) and isinstance(tabs, type(gr.skip()))
    assert service.list_jobs() == []


def test_every_problem_of_the_form_is_shown_at_once_and_cleared_when_fixed(home):
    note, _, _, *fields = _launch(lr=1e9, group_size="48", kind="upload")
    notes = dict(zip(forms.FIELDS, fields))
    assert notes["advanced"].startswith("⚠ learning rate 1e+09 is outside the range")
    assert notes["group_size"].startswith("⚠ group_size=48 does not divide")
    assert notes["data"].startswith("⚠ no file is uploaded")
    assert note == "**Not queued:** fix what is marked ⚠ next to: Group size, Dataset, Advanced settings."
    note, _, _, *fields = _launch(name="fixed")
    assert fields == [""] * len(forms.FIELDS) and "queued" in note


def test_several_problems_of_one_section_are_all_named(home):
    """Regression: only the first problem of a section was shown (lr 1e9 + rank 0 + sequence length 8
    showed the learning rate alone; group 100 + steps -1 + lr 1e9 + rank 0 showed two of four)."""
    _, _, _, *fields = _launch(lr=1e9, rank=0, seq=8)
    advanced = dict(zip(forms.FIELDS, fields))["advanced"]
    assert advanced == ("⚠ learning rate 1e+09 is outside the range that trains an adapter (1e-06 to 0.01; typical "
                        "1e-4 to 3e-4); fix it in the advanced settings. rank must be at least 1 (got 0). sequence "
                        "length 8 cuts away the whole reply of every one of the first 200 records, leaving nothing "
                        "to learn; raise it (typical 256-2048) or shorten the prompts.")
    note, _, _, *fields = _launch(group_size="100", steps=-1, lr=1e9, rank=0)
    notes = dict(zip(forms.FIELDS, fields))
    assert notes["group_size"].startswith("⚠ group_size=100 does not divide")
    assert notes["advanced"] == ("⚠ steps must be at least 1 (got -1). learning rate 1e+09 is outside the range that "
                                 "trains an adapter (1e-06 to 0.01; typical 1e-4 to 3e-4); fix it in the advanced "
                                 "settings. rank must be at least 1 (got 0).")
    assert note == "**Not queued:** fix what is marked ⚠ next to: Group size, Advanced settings."
    assert service.list_jobs() == []


def test_a_sequence_length_that_cuts_every_reply_is_reported_beside_a_bad_group_size(home):
    note, _, _, *fields = _launch(seq=8, group_size="48")
    notes = dict(zip(forms.FIELDS, fields))
    assert notes["group_size"].startswith("⚠ group_size=48 does not divide")
    assert notes["advanced"].startswith("⚠ sequence length 8 cuts away the whole reply of every one of the first")
    assert service.list_jobs() == []


def _field_error(changes, field):
    note, picker, tabs, *fields = _launch(**changes)
    assert service.list_jobs() == []
    return dict(zip(forms.FIELDS, fields))[field]


def test_a_dataset_with_a_missing_column_is_refused_with_the_file_and_the_expected_columns(home):
    bad = home / "qa.jsonl"
    bad.write_text('{"question": "2+2?", "answer": "4"}\n{"question": "3+3?", "answer": "6"}\n')
    note = _field_error(dict(kind="upload", upload=str(bad)), "data")
    # the columns it found, and the rename that fixes it (before: "none of its 2 column(s)")
    assert note.startswith("⚠ qa.jsonl: its column(s) 'answer', 'question' match no known record format; expected "
                           "one of these column sets")
    assert note.endswith("Rename 'question' → 'instruction' and 'answer' → 'output' to make it Alpaca.")
    rows = home / "alpaca.jsonl"
    rows.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    note = _field_error(dict(kind="path or name", path=str(rows)), "data")
    assert "alpaca.jsonl row 2" in note and "output" in note


def test_base_model_field_offers_valid_group_sizes_and_rejects_non_llama(home):
    update, note, error, swept = new_job._base_changed(_config_dir(home, model_type="llama", hidden_size=96,
                                                               intermediate_size=256, num_attention_heads=3), [32, 64])
    assert update["choices"] == [16, 32] and update["value"] == 32
    assert (note, error) == ("Group sizes valid for this model: [16, 32].", "")
    # the sweep's "Group sizes to try" offers only these too; a tick it cannot take is dropped
    assert swept["choices"] == [16, 32] and swept["value"] == [32]
    assert forms.group_size_choices("default") == [16, 32, 64]  # SmolLM2-135M: 576 and 1536 wide
    (home / "model").rename(home / "llama")
    _, note, error, _ = new_job._base_changed(
        _config_dir(home, model_type="gpt2", hidden_size=64, intermediate_size=256), [32])
    assert "is a 'gpt2' model; QA-LoRA Studio supports LLaMA-family causal LMs" in error and note == ""


def test_dataset_preview_renders_records_with_the_base_chat_template(home):
    data = home / "sums.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and 3.", "output": str(i + 3)}) + "\n"
                            for i in range(5)))
    shown = list(new_job._dataset_preview("upload", None, str(data), "", "tiny-random"))[-1]
    assert shown.startswith("**5 records.**")
    assert "<|im_start|>user\nAdd 0 and 3.<|im_end|>\n<|im_start|>assistant\n3<|im_end|>" in shown
    assert "Add 2 and 3." in shown and "Add 3 and 3." not in shown  # three examples only


def test_presets_fill_the_advanced_fields():
    assert set(forms.PRESETS) == {"quick", "balanced", "thorough"}
    steps = [forms.PRESETS[p]["steps"] for p in ("quick", "balanced", "thorough")]
    assert steps == sorted(steps) and len(set(steps)) == 3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_choosing_bits_fills_the_bit_widths_preset_and_says_so(bits):
    from qalora.config import preset_for

    *values, note = new_job._bits_changed(bits)
    p = preset_for(bits)
    assert values == [p[k] for k in ("rank", "alpha", "lr", "clip", "train_scales", "scales_lr")]
    assert note.startswith(f"**Preset for {bits} bits:** learning rate {p['lr']:g}, rank {p['rank']}")
    assert ("stores {}-bit codes as Q4_1 blocks".format(bits) in note) == (bits < 4)  # what a GGUF file costs


def test_a_launch_takes_the_ticks_and_a_spec_left_unset_takes_the_preset(home):
    from qalora.config import preset_for

    new_job._launch(*{**FORM, "name": "own", "bits": 2}.values(), clip=False, train_scales=True, scales_lr=2e-4)
    (job,) = service.list_jobs()
    assert job["spec"]["quant"].get("clip", False) is False
    assert job["spec"]["adapter"]["train_scales"] is True and job["spec"]["adapter"]["scales_lr"] == 2e-4
    spec = forms.build_spec(base="tiny-random", bits=2, group_size=32, method="rtn", data="builtin:contacts",
                            rank=4, alpha=8, lr=1e-3, steps=6, batch_size=2, seq_len=256)
    p = preset_for(2)
    assert (spec.quant.clip, spec.adapter.train_scales, spec.adapter.scales_lr) == (
        p["clip"], p["train_scales"], p["scales_lr"])
    assert service.job_overview(job).startswith("QA-LoRA + learned scales (RTN), 2-bit, group 32")


def test_job_view_shows_metrics_as_train_and_eval_series():
    metrics = [{"step": 1, "train_loss": 2.5, "eval_loss": None}, {"step": 2, "train_loss": 2.0, "eval_loss": 2.2}]
    frame = jobs_tab._loss_frame(metrics, "#7")
    assert frame.values.tolist() == [["#7", "train", 1, 2.5], ["#7", "train", 2, 2.0], ["#7", "eval", 2, 2.2]]
    assert jobs_tab._loss_frame([]) is None
    assert [jobs_tab._duration(s) for s in (None, 42, 125, 7300)] == ["", "42s", "2m 05s", "2h 01m"]


def test_refresh_shows_a_queued_job_and_skips_unchanged_parts(home):
    _launch(name="watch")
    (job,) = service.list_jobs()
    table, picker, summary, plot, merge, log, seen = jobs_tab._refresh(job["id"], {})
    assert table.values.tolist()[0][:5] == [job["id"], "watch", "queued", "", "0/6 (0%)"]
    assert picker["choices"] == [(f"#{job['id']} watch (queued)", job["id"])]
    assert summary.startswith(f"### #{job['id']} watch: **queued**") and plot is None
    assert merge == "*Merge check appears when the job succeeds.*"
    again = jobs_tab._refresh(job["id"], seen)
    assert all(isinstance(part, type(gr.skip())) for part in again[:6])  # nothing changed: nothing re-drawn


def test_job_buttons_cancel_resume_and_delete(home):
    _launch(name="buttons")
    (job,) = service.list_jobs()
    assert jobs_tab._act("cancel", None) == "Select a job first."
    assert jobs_tab._act("cancel", job["id"]) == "Canceled."  # it was only queued: nothing to wait for
    assert service.get_job(job["id"])["status"] == "canceled"
    assert jobs_tab._act("resume", job["id"]) == "Queued again; it resumes from its last checkpoint."
    assert service.get_job(job["id"])["status"] == "queued"
    assert jobs_tab._act("delete", job["id"]) == "Deleted, with its files."
    assert service.list_jobs() == []
    assert jobs_tab._act("resume", job["id"]) == f"**Error:** Job {job['id']} does not exist; refresh the job list."


def test_auth_setting():
    assert auth._auth(None) is None and auth._auth("ann:s3cret:x") == [("ann", "s3cret:x")]
    with pytest.raises(SystemExit, match="QALORA_AUTH must look like user:password"):
        auth._auth("ann")


def test_access_requires_a_login_off_loopback(tmp_path, capsys):
    # loopback: no login needed, the server's own Hub token may be used
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert auth.access(host, False, {}) == auth.Access(None, server_token=True)
    # anything else without a login: refused, with the fix named
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        with pytest.raises(SystemExit, match="QALORA_AUTH=user:password .*--no-auth"):
            auth.access(host, False, {})
    # --no-auth: allowed with a warning, and visitors must bring their own token
    shared = auth.access("0.0.0.0", True, {})
    assert shared.auth is None and shared.server_token is False and "anyone who can reach" in shared.warning.lower()
    # several users from QALORA_AUTH and from a file
    users = tmp_path / "users"
    users.write_text("# team\nann:pw1\n\nbob:pw:2\n")
    got = auth.access("0.0.0.0", False, {"QALORA_AUTH": "cy:pw3,dee:pw4", "QALORA_AUTH_FILE": str(users)})
    assert got.auth == [("cy", "pw3"), ("dee", "pw4"), ("ann", "pw1"), ("bob", "pw:2")] and got.server_token
    users.write_text("ann\n")
    with pytest.raises(SystemExit, match="line 1 must look like user:password"):
        auth.access("0.0.0.0", False, {"QALORA_AUTH_FILE": str(users)})
    with pytest.raises(SystemExit, match="cannot be read"):
        auth.access("0.0.0.0", False, {"QALORA_AUTH_FILE": str(tmp_path / "none")})


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
    *_, plot, _, _, seen = jobs_tab._refresh(job["id"], {})
    for n in (4, 5):
        step(n)
    asked.clear()
    *_, plot, _, _, seen = jobs_tab._refresh(job["id"], seen)
    assert 3 in asked and 0 not in asked  # only the rows after step 3 were read
    spec = plot.to_dict()
    lines = spec["layer"][0]
    # every step so far, on a whole-step axis over the 6-step run
    assert [r["x"] for r in spec["datasets"][lines["data"]["name"]] if r["split"] == "train"] == [1, 2, 3, 4, 5]
    assert lines["encoding"]["x"]["scale"]["domain"] == [0, 6]
    with db() as s:  # a resume (new attempt) may rewrite steps: everything is read again
        repo.interrupt(s, job["id"], "w1", reason="test")
        repo.requeue(s, job["id"])
        repo.claim(s, "w2", job["id"])
    asked.clear()
    jobs_tab._refresh(job["id"], seen)
    assert asked[-1] == 0


@pytest.mark.parametrize("changes, start", [
    (dict(lr=1e9), "⚠ learning rate 1e+09 is outside the range that trains an adapter (1e-06 to 0.01; "
                   "typical 1e-4 to 3e-4)"),
    (dict(lr=0), "⚠ learning rate 0 is outside the range"),
    (dict(seq=8), "⚠ sequence length 8 cuts away the whole reply of every one of the first 200 records, "
                  "leaving nothing to learn; raise it (typical 256-2048)"),
])
def test_what_the_worker_would_fail_on_is_refused_in_the_form(home, changes, start):
    note = _field_error(changes, "advanced")
    assert note.startswith(start), note


def test_too_few_records_are_refused_with_the_minimum(home):
    few = home / "few.jsonl"
    few.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(3)))
    note = _field_error(dict(kind="path or name", path=str(few)), "data")
    assert note == ("⚠ few.jsonl has 3 record(s); a fine-tune needs at least 8 (about one in ten is held "
                    "out to measure it). Add more records.")


def test_export_choices_follow_bits_and_group_size():
    update, note = new_job._exports_for(4, 16, ["gguf", "gptq"])
    assert [key for _, key in update["choices"]] == ["torchao", "gptq", "peft"] and update["value"] == ["gptq"]
    assert note.startswith("*GGUF is off at group size 16: GGUF export needs a group size that is a multiple of 32")
    update, note = new_job._exports_for(4, 64, ["gptq"])
    assert [key for _, key in update["choices"]] == ["gguf", "torchao", "gptq", "peft"] and note == ""
    update, note = new_job._exports_for(8, 16, [])  # 8-bit goes to an F16 GGUF: any group size
    assert "gguf" in [key for _, key in update["choices"]] and note == ""


def test_a_tick_hidden_by_an_invalid_group_size_comes_back_with_a_valid_one():
    wanted = ["gguf"]
    update, _ = new_job._exports_for(4, 16, wanted)
    assert update["value"] == []  # GGUF needs a multiple of 32: hidden, not forgotten
    wanted = new_job._ticked(["gptq"], wanted, 4, 16)  # the user ticks GPTQ meanwhile
    assert wanted == ["gguf", "gptq"]
    update, _ = new_job._exports_for(4, 64, wanted)
    assert update["value"] == ["gguf", "gptq"]
    wanted = new_job._ticked(["gptq"], wanted, 4, 64)  # unticking a visible format forgets it
    assert new_job._exports_for(4, 64, wanted)[0]["value"] == ["gptq"]


def test_the_loss_chart_spans_the_whole_run_in_whole_steps_with_every_step_so_far():
    metrics = [{"step": n, "train_loss": 1.0 / n, "eval_loss": None} for n in range(1, 41)]
    spec = jobs_tab._loss_plot({"id": 3, "metrics": metrics, "total_steps": 200}).to_dict()
    lines = spec["layer"][0]
    assert lines["encoding"]["x"]["scale"]["domain"] == [0, 200] and lines["encoding"]["x"]["axis"]["tickMinStep"] == 1
    assert [row["x"] for row in spec["datasets"][lines["data"]["name"]]] == list(range(1, 41))  # up to the header's step
    assert jobs_tab._loss_plot({"id": 3, "metrics": [], "total_steps": 200}) is None


def test_waits_say_what_they_wait_for(monkeypatch):
    import time

    monkeypatch.setattr(common, "TICK_S", 0.05)
    updates = list(common.waiting(lambda: time.sleep(0.5) or 42, lambda t: f"loading… {t:.1f} s"))
    assert updates[-1] == ("done", 42) and len(updates) >= 3
    assert all(u.startswith("loading… ") for u in updates[:-1])
    with pytest.raises(ZeroDivisionError):
        list(common.waiting(lambda: 1 / 0, str))
    assert list(common.waiting(lambda: "quick", str)) == [("done", "quick")]  # no message under 0.3 s


def test_auto_names_keep_the_models_own_name():
    from jobs.spec import JobSpec
    from qalora.config import QuantConfig

    assert JobSpec(base="meta-llama/Llama-3.1-8B", quant=QuantConfig(4, 64)).name == "Llama-3.1-8B-4bit-g64-r16"
    assert JobSpec(base="/models/tinyllama.Q8_0.gguf").name.startswith("tinyllama.Q8_0-4bit")
    assert JobSpec(base="/models/llama-2-7b/").name.startswith("llama-2-7b-4bit")


def test_chat_says_which_runtime_answers_and_how_to_serve_the_model(home, monkeypatch):
    from jobs import chat
    from qalora.deployment.export.native import save_quantized
    from qalora.method.merge import merge_adapters
    from storage import db, repo
    from tests.helpers import tiny_qalora

    _launch(name="served")
    (job,) = service.list_jobs()
    model, tok = tiny_qalora()
    save_quantized(merge_adapters(model), tok, Path(job["artifact_dir"]) / "merged")
    with db() as s:
        repo.claim(s, "w", job["id"])
        repo.succeed(s, job["id"], "w", report={"base": "tiny-random", "bits": 4, "group_size": 32})
    assert chat_tab._serve_note(job["id"]) == (
        f'OpenAI-compatible API for this model (same runtime as this chat): `python -m qalora serve '
        f'"$QALORA_HOME"/jobs/job-{job["id"]:05d} --port 8000` (in a shell with QALORA_HOME set as for the app), '
        f'then `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")` with `model="job-{job["id"]:05d}"`.')
    # the usual case: the home (./data by default) under the folder the app runs in; the printed
    # path, taken from that folder, is the run
    monkeypatch.chdir(home)
    serve = service.serve_command(job["id"])
    shown = serve["command"].split()[4]
    assert not shown.startswith(("/", '"')) and (home / shown).resolve() == Path(job["artifact_dir"]).resolve()
    assert serve["where"] == "in the folder the app was started from"
    try:
        updates = list(chat_tab._send("contact card -> Hana lives in Oslo.", [], [], job["id"], False, "", 8, 0.0,
                                      0.95))
        # side by side: the base's bubble says it is loading until it answers; both runtimes named
        both = list(chat_tab._send("hi", [], [], job["id"], True, "", 8, 0.0, 0.95))
    finally:
        for side in chat.SIDES:
            chat.slot(side).unload()
    assert both[0][2][-1]["content"].startswith("*Loading the base model `tiny-random` into memory… 0 s")
    assert both[0][1][-1]["content"] == ""  # the fine-tuned model was loaded already: it answers at once
    assert both[-2][2][-1]["content"] and not both[-2][2][-1]["content"].startswith("*Loading")
    assert any("Generating with llama.cpp (GGUF Q4_1)… · base model `tiny-random` on PyTorch (float32)" in u[3]
               for u in both), [u[3] for u in both]
    assert both[-1][3].endswith("Base model: **PyTorch (float32)** (float base model on cpu).")
    statuses = [u[3] for u in updates]
    assert "*Generating with llama.cpp (GGUF Q4_1)…*" in statuses
    assert statuses[-1] == (f"Model #{job['id']} loaded; kept in memory for the next turn. Answered by **llama.cpp "
                            "(GGUF Q4_1)** (CPU, with the run's GGUF export exports/model-q4_1.gguf (written for "
                            "this chat)).")
    assert (Path(job["artifact_dir"]) / "exports" / "model-q4_1.gguf").is_file()


def _launch_sweep(bits=(2, 4), groups=(32, 48), ranks="4", lrs="1e-3", **changes):
    return new_job._launch(*{**FORM, **changes}.values(), True, list(bits), list(groups), ranks, lrs)


def test_a_sweep_from_the_form_queues_one_job_per_combination_under_one_sweep_id(home):
    note, picker, tabs, *fields = _launch_sweep(exports=["gguf"])
    jobs = sorted(service.list_jobs(), key=lambda j: j["id"])
    assert [(j["spec"]["quant"]["bits"], j["spec"]["quant"]["group_size"]) for j in jobs] == [(2, 32), (4, 32)]
    sweep_id = jobs[0]["sweep_id"]
    assert sweep_id and jobs[1]["sweep_id"] == sweep_id and all("gguf" in j["spec"]["exports"] for j in jobs)
    assert note == (f"Sweep **{sweep_id}**: 2 jobs queued (#{jobs[0]['id']}–#{jobs[1]['id']}); follow them in the "
                    "Jobs tab, compare them in the Compare tab. 2 combination(s) refused: see the sweep plan.")
    assert picker["value"] == jobs[0]["id"] and tabs.selected == "jobs" and fields == [""] * len(forms.FIELDS)
    rows = jobs_tab._job_rows(service.list_jobs())
    assert list(rows["sweep"]) == [sweep_id, sweep_id]
    # the plan shown before Launch says the same
    plan = new_job._sweep_plan(True, *list(FORM.values())[:4], *list(FORM.values())[4:15], ["gguf"], [2, 4], [32, 48],
                           "4", "1e-3")
    assert plan.startswith("**2 jobs** will be queued (bits 2, 4 × group size 32, 48 × rank 4 × learning rate 0.001)")
    assert "Refused 2 (bits 2, group size 48; bits 4, group size 48): group_size=48 does not divide" in plan
    # the Jobs tab cancels the whole sweep from any of its jobs
    assert jobs_tab._cancel_sweep(jobs[1]["id"]) == (f"Sweep {sweep_id}: canceled #{jobs[0]['id']}, #{jobs[1]['id']}; "
                                                "stopping after their current step none; already ended, left as "
                                                "they are none.")
    assert {j["status"] for j in service.list_jobs()} == {"canceled"}


def test_a_bad_sweep_value_is_shown_under_the_sweep_and_nothing_is_queued(home):
    note, picker, tabs, *fields = _launch_sweep(ranks="4, 0")
    notes = dict(zip(forms.FIELDS, fields))
    assert notes["sweep"] == "⚠ sweep: rank 0 must be at least 1." and [k for k, v in notes.items() if v] == ["sweep"]
    assert note == "**Not queued:** fix what is marked ⚠ next to: Sweep."
    assert service.list_jobs() == []
    note, _, _, *fields = _launch_sweep(ranks="0, x", lrs="5", steps=-1)  # every problem, in the sweep and outside
    notes = dict(zip(forms.FIELDS, fields))
    assert notes["sweep"] == ("⚠ sweep: rank 0 must be at least 1. sweep rank: 'x' is not a whole number; separate "
                              "values with commas, e.g. 8, 16. sweep: learning rate 5 is outside the range that trains "
                              "an adapter (1e-06 to 0.01; typical 1e-4 to 3e-4).")
    assert notes["advanced"] == "⚠ steps must be at least 1 (got -1)."
    assert note == "**Not queued:** fix what is marked ⚠ next to: Advanced settings, Sweep."
    _, _, _, *fields = _launch_sweep(groups=(48,))
    assert dict(zip(forms.FIELDS, fields))["sweep"].startswith("⚠ none of the 2 combinations can run on this model")
    assert service.list_jobs() == []


def test_opening_the_sweep_starts_from_the_forms_single_values_and_hides_them():
    """Before: the single Bits and Group size fields stayed above the values to try, and the group
    sizes offered 128 and 256 to a model that takes only 16, 32 and 64."""
    single, box, bits, groups, ranks, lrs = new_job._sweep_opened(True, 3, 64, 8, 0.0003, "default")
    assert single["visible"] is False and box["visible"] is True
    assert (bits, groups["value"], ranks, lrs) == ([3], [64], "8", "0.0003")
    assert groups["choices"] == [16, 32, 64]  # SmolLM2-135M's sizes only
    single, box, *_ = new_job._sweep_opened(False, 3, 64, 8, 0.0003, "default")
    assert single["visible"] is True and box["visible"] is False


def test_the_compare_table_keeps_numbers_sortable_and_highlights_the_best_cell():
    result = {"columns": [("id", "job", None), ("eval_merged", "eval loss: merged", "min"),
                          ("native_mb", "native MB", "min")],
              "rows": [{"id": 1, "eval_merged": 1.25, "native_mb": 80.5}, {"id": 2, "eval_merged": 1.5,
                                                                            "native_mb": 60.25}],
              "best": {"eval_merged": [1], "native_mb": [2]}}
    sent = gr.Dataframe(interactive=False).postprocess(compare_tab._compare_table(result))  # what the page gets
    assert sent.data == [[1, 1.25, 80.5], [2, 1.5, 60.25]]  # numbers: a header click sorts them as numbers
    assert sent.metadata["display_value"] == [["1", "1.2500", "80.5"], ["2", "1.5000", "60.2"]]  # shown rounded
    best = compare_tab.BEST_CSS
    assert sent.metadata["styling"] == [["", best, ""], ["", "", best]]  # the best cell of each outcome


def _offered(update: dict, multiselect=True):
    """What the page does with a picker update: Gradio refuses a value outside the choices (the red
    "Value: 3 (type: int) is not in the list of choices" toast) when the value comes back."""
    return gr.Dropdown(choices=update["choices"], multiselect=multiselect).preprocess(update.get("value"))


def test_the_compare_tab_opens_on_a_sweep_with_queued_and_running_jobs(home):
    """Regression: the picker offered only jobs that had started, while the newest sweep's jobs
    were picked: opening Compare on a sweep with a queued job failed in every panel."""
    assert compare_tab._compare([], "step", "eval loss (merged)")[-1] == compare_tab.COMPARE_HINT
    _launch_sweep(bits=(2, 3, 4), groups=(32,))
    a, b, c = sorted(j["id"] for j in service.list_jobs())
    from storage import db, repo
    with db() as s:  # one running with two steps, two still queued
        repo.claim(s, "host:1:w", a)
        for step in (1, 2):
            repo.record_step(s, a, "host:1:w", step=step, train_loss=3.0 - step, eval_loss=None, lr=1e-3,
                             tokens_per_s=100.0, elapsed_s=step, eta_s=5.0, tokens_seen=100 * step)
    jobs, sweep = compare_tab._compare_opened([], None)
    (sweep_id,) = {j["sweep_id"] for j in service.list_jobs()}
    assert sweep["value"] == sweep_id and _offered(jobs) == [a, b, c]  # every job of the sweep, accepted
    assert _offered(compare_tab._sweep_picked(sweep_id)) == [a, b, c]
    curves, table, _, _, note = compare_tab._compare([a, b, c], "step", "eval loss (merged)")
    assert note.startswith("3 jobs: 1 running (curves grow, outcomes appear when it ends), 2 queued (no curve "
                           "until it starts).")
    spec = curves.to_dict()
    drawn = spec["datasets"][spec["layer"][0]["data"]["name"]]
    assert {(r["job"].split()[0], r["split"]) for r in drawn} == {(f"#{a}", "train")}  # queued jobs: listed, no curve
    frame = table.data
    assert list(frame["status"]) == ["running", "queued", "queued"] and frame["wall s"].isna().tolist()[1:] == [True] * 2
    assert frame["wall s"][0] > 0  # the running job's wall time so far: shown, never marked best
    sent = gr.Dataframe(interactive=False).postprocess(table)
    assert {cell for row in sent.metadata["styling"] for cell in row} == {""}
    kept, _ = compare_tab._compare_opened([b], None)
    assert "value" not in kept and _offered({**kept, "value": [b]}) == [b]  # a pick the user made is kept
    service.delete(c)
    dropped, _ = compare_tab._compare_opened([b, c], None)
    assert dropped["value"] == [b]  # a deleted job is dropped, not refused
    # the timer redraws when a picked job moves, and not otherwise
    state = compare_tab._compare_state([a, b])
    assert compare_tab._compare_tick([a, b], "step", "eval loss (merged)", state)[-1] == state
    assert isinstance(compare_tab._compare_tick([a, b], "step", "eval loss (merged)", state)[0], type(gr.skip()))
    with db() as s:
        repo.claim(s, "host:2:w", b)
    moved = compare_tab._compare_tick([a, b], "step", "eval loss (merged)", state)
    assert moved[-1] != state and moved[4].startswith("2 jobs: 2 running")


def test_a_job_asking_for_two_devices_states_its_global_batch(home):
    args = list({**FORM, "name": "dp"}.values()) + [False, [], [], "", "", 2]
    note, *_ = new_job._launch(*args)
    (job,) = service.list_jobs()
    assert job["spec"]["devices"] == 2 and note.startswith(f"Job **#{job['id']}** (dp) queued")
    assert "global batch 4 (2 × 1 accumulation × 2 devices)" in jobs_tab._job_summary(service.get_job(job["id"]))
    _, _, _, *fields = new_job._launch(*args[:-1], 0)
    assert dict(zip(forms.FIELDS, fields))["advanced"] == "⚠ GPUs for this job must be at least 1 (got 0)."


def _hub_launch(**hub):
    form = {**FORM, "kind": "Hub dataset"}
    return new_job._launch(*form.values(), **hub)


def test_a_hub_dataset_is_checked_in_the_form_mapped_and_queued(home, dataset_hub):
    """The Hub fields: the id is asked about (configs, splits, columns; no rows downloaded), columns of
    no known format open the mapping with a guess, and the job stores the mapping and the sample."""
    from fakehub import parquet_bytes
    rows = [{"question": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(40)]
    dataset_hub.add("team/sums", {"data/train.parquet": parquet_bytes(rows), "data/test.parquet": parquet_bytes(rows[:5])})
    note, config, split, prompt, extra, response, messages, box = new_job._hub_checked("Hub dataset", None, "team/sums")
    assert note.startswith("**team/sums**: config `default` (of 1), split `train` (of train, test); columns "
                           "`question`, `answer`. Checked in ")
    assert (config["value"], split["choices"], split["value"]) == ("default", ["train", "test"], "train")
    assert (prompt["value"], extra["value"], response["value"], messages["value"]) == ("question", "(none)", "answer",
                                                                                      "(none)")
    assert prompt["choices"] == ["(none)", "question", "answer"] and box["open"] and box["visible"]
    assert not dataset_hub.fetched()  # nothing downloaded whole: the schema came from a Parquet footer
    # Launch without a mapping: the columns are named and the mapping asked for, nothing queued
    note, *fields = _hub_launch(hub_id="team/sums", hub_config="default", hub_split="train")
    assert dict(zip(forms.FIELDS, fields[2:]))["data"] == (
        "⚠ team/sums:default@train: its columns 'question', 'answer' match no known record format; map them under "
        "'Column mapping' (a prompt, an optional input and a response column, or one messages column).")
    assert service.list_jobs() == []
    note, *fields = _hub_launch(hub_id="team/sums", hub_config="default", hub_split="train", map_prompt="question",
                                map_input="(none)", map_response="answr", map_messages="(none)")
    assert "no column 'answr'; its columns are 'question', 'answer'. Fix the column mapping." in fields[2 + 3]
    note, *_ = _hub_launch(hub_id="team/sums", hub_config="default", hub_split="train", map_prompt="question",
                           map_input="(none)", map_response="answer", map_messages="(none)", max_samples=30)
    (job,) = service.list_jobs()
    assert note.startswith(f"Job **#{job['id']}**")
    assert job["spec"]["data"] == "team/sums:default@train"
    assert (job["spec"]["columns"], job["spec"]["max_samples"]) == ({"prompt": "question", "response": "answer"}, 30)


def test_a_hub_dataset_the_form_cannot_read_is_named(home, dataset_hub):
    from fakehub import parquet_bytes
    dataset_hub.add("team/locked", {"data/train.parquet": parquet_bytes([{"text": "x"}] * 10)}, gated=True)
    note, *_ = new_job._hub_checked("Hub dataset", None, "team/locked")
    assert note == ("**Error:** dataset 'team/locked' is gated: accept its conditions on its Hub page, then set HF_TOKEN (a "
                    "token of the account that accepted them) where the studio runs, and try again.")
    note, *fields = _hub_launch(hub_id="nobody/here")
    assert dict(zip(forms.FIELDS, fields[2:]))["data"].startswith("⚠ dataset 'nobody/here' was not found on the Hub")
    note, *fields = _hub_launch(hub_id=" ")
    assert dict(zip(forms.FIELDS, fields[2:]))["data"] == (
        "⚠ the Hub dataset id is empty; type one, e.g. tatsu-lab/alpaca, or pick one of the paper's datasets in the "
        "built-in list.")
    note, *fields = _hub_launch(hub_id="not a dataset id")
    assert "is not a Hub dataset reference; write ID[:CONFIG][@SPLIT]" in dict(zip(forms.FIELDS, fields[2:]))["data"]
    assert service.list_jobs() == []


def test_the_papers_datasets_are_in_the_built_in_list(home):
    labels = dict((v, k) for k, v in forms.builtin_choices())
    assert labels["paper:alpaca"] == "Alpaca (52K): tatsu-lab/alpaca (the paper's; downloaded from the Hub)"
    assert [v for v in labels if v.startswith("paper:")] == ["paper:alpaca", "paper:flan-v2", "paper:self-instruct",
                                                             "paper:longform", "paper:chip2"]


def test_benchmarks_are_chosen_at_launch_and_checked_with_lm_evals_names(home, lm_eval_tasks, monkeypatch):
    monkeypatch.setenv("QALORA_LM_EVAL_INCLUDE", str(lm_eval_tasks))
    form = list(FORM.values())
    note, *fields = new_job._launch(*form, benchmarks="custom", bench_tasks="qa_mcc", bench_limit=4)
    assert dict(zip(forms.FIELDS, fields[2:]))["benchmarks"].startswith(
        "⚠ lm-eval knows no task or group named 'qa_mcc'")
    assert service.list_jobs() == []
    note, *_ = new_job._launch(*form, benchmarks="custom", bench_tasks="qa_mc, qa_ll", bench_limit=4)
    new_job._launch(*form, benchmarks="commonsense")
    first, second = service.list_jobs()[::-1]
    assert first["spec"]["benchmarks"] == {"tasks": ["qa_mc", "qa_ll"], "num_fewshot": None, "limit": 4}
    assert second["spec"]["benchmarks"] == {"tasks": ["hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge",
                                                      "boolq", "openbookqa"], "num_fewshot": 0, "limit": None}
    summary = jobs_tab._merge_check({**first, "status": "succeeded", "report": {
        "merge_max_abs_logit_diff": 0.0, "eval_loss_quantized_base": 1.0, "eval_loss_adapter": 0.5,
        "eval_loss_merged": 0.5, "benchmarks": {"merged": {"qa_mc": {"metric": "acc_norm", "value": 0.75}},
                                                "base16": {"qa_mc": {"metric": "acc_norm", "value": 1.0}}}}})
    assert "**qa_mc** (acc_norm, lm-eval): 16-bit base 1.0000 · quantized base – · merged **0.7500**" in summary
