"""What the web form may read on the server: allowed folders only, uploads kept under their hash."""
import hashlib
import os

import pytest

from jobs import confine, forms
from qalora.errors import QALoRAError

ROWS = '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n'


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QALORA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QALORA_ALLOWED_DIRS", raising=False)
    (tmp_path / "home" / "datasets").mkdir(parents=True)
    return tmp_path / "home"


def _refusal(**kw) -> str:
    with pytest.raises(QALoRAError) as exc:
        forms.data_source(**{"kind": "path or name", "builtin": None, "upload": None, **kw})
    return str(exc.value)


def test_paths_outside_the_allowed_folders_get_one_message_whether_or_not_they_exist(home, tmp_path, monkeypatch):
    secret = tmp_path / "secret.csv"
    secret.write_text("instruction,output\npassword,hunter2\n")
    messages = {_refusal(path_or_name=p) for p in (str(secret), str(tmp_path / "absent.csv"), "/etc/passwd",
                                                   "/etc/shadow.jsonl", "../../etc/hosts", "~/.bashrc")}
    assert len(messages) == 1  # nothing tells a visitor which of these exist
    (message,) = messages
    assert message.startswith("dataset: the form only reads server files under ")
    assert "hunter2" not in message and "secret" not in message
    # the allowed folders relative to QALORA_HOME, no server path (before: the absolute folders)
    assert message == ("dataset: the form only reads server files under QALORA_HOME/datasets, QALORA_HOME/models, "
                       "QALORA_HOME/uploads; upload it, or put it there (or ask the operator to add its folder to QALORA_ALLOWED_DIRS).")
    assert str(home) not in message and str(tmp_path) not in message
    monkeypatch.setenv("QALORA_ALLOWED_DIRS", str(tmp_path / "shared"))
    assert " and the folders the operator listed in QALORA_ALLOWED_DIRS;" in _refusal(path_or_name="/etc/passwd")
    with pytest.raises(QALoRAError, match="base model: the form only reads server files"):
        forms.group_size_choices(str(tmp_path))
    with pytest.raises(QALoRAError, match="base model: the form only reads server files"):
        forms.group_size_choices("/etc/model.gguf")


def test_allowed_folders_and_a_symlink_that_escapes_them(home, tmp_path, monkeypatch):
    inside = home / "datasets" / "rows.jsonl"
    inside.write_text(ROWS)
    assert forms.data_source("path or name", None, None, str(inside)) == str(inside)
    outside = tmp_path / "elsewhere" / "rows.jsonl"
    outside.parent.mkdir()
    outside.write_text(ROWS)
    link = home / "datasets" / "link.jsonl"
    link.symlink_to(outside)
    assert "only reads server files" in _refusal(path_or_name=str(link))  # resolved, then refused
    monkeypatch.setenv("QALORA_ALLOWED_DIRS", f"/nonexistent:{outside.parent}")
    assert forms.data_source("path or name", None, None, str(outside)) == str(outside)
    # Hub ids, built-in sets and cached dataset names are no server paths
    assert forms.data_source("built-in", "builtin:contacts", None, "") == "builtin:contacts"
    assert confine.confine_data("someorg/some-set") == "someorg/some-set"
    assert confine.confine_base("org/model") == "org/model" and confine.confine_base("default") == "default"


def test_uploads_are_kept_under_their_hash_and_capped(home, tmp_path, monkeypatch):
    gradio_tmp = tmp_path / "gradio" / "my data.jsonl"
    gradio_tmp.parent.mkdir()
    gradio_tmp.write_text(ROWS)
    kept = forms.data_source("upload", None, str(gradio_tmp), None)
    assert kept == str(home / "uploads" / f"{hashlib.sha256(ROWS.encode()).hexdigest()}.jsonl")
    gradio_tmp.unlink()  # Gradio cleans its temporary folder: the job still finds its data
    assert open(kept).read() == ROWS
    again = tmp_path / "gradio" / "copy.jsonl"
    again.write_text(ROWS)
    assert forms.data_source("upload", None, str(again), None) == kept  # same content, same file
    assert confine.with_upload_names(f"{os.path.basename(kept)} row 2: missing 'output'") == \
        "copy.jsonl row 2: missing 'output'"
    monkeypatch.setenv("QALORA_MAX_UPLOAD_MB", "0.00001")
    with pytest.raises(QALoRAError, match=r"copy.jsonl is 0 MB; uploads are limited to 0 MB \(QALORA_MAX_UPLOAD_MB\)"):
        forms.data_source("upload", None, str(again), None)
    wrong = tmp_path / "gradio" / "notes.txt"
    wrong.write_text("x")
    monkeypatch.delenv("QALORA_MAX_UPLOAD_MB")
    with pytest.raises(QALoRAError, match="unsupported file type .txt"):
        forms.data_source("upload", None, str(wrong), None)


def test_errors_about_an_allowed_file_never_echo_its_contents(home):
    for name, text in (("cols.jsonl", '{"hunter2": "x"}\n{"hunter2": "y"}\n'),
                       ("value.jsonl", '{"instruction": "q", "output": ["hunter2"]}\n'),
                       ("role.jsonl", '{"messages": [{"role": "hunter2", "content": "x"}]}\n')):
        path = home / "datasets" / name
        path.write_text(text)
        with pytest.raises(QALoRAError) as exc:
            forms.build_spec(base="tiny-random", bits=4, group_size=32, method="rtn",
                             data=forms.data_source("path or name", None, None, str(path)), rank=8, alpha=16,
                             lr=2e-4, steps=10, batch_size=2, seq_len=256)
        assert "hunter2" not in str(exc.value) and name in str(exc.value)
    # the visitor's own upload: the refusal names the columns it found (and how to fix them)
    upload = home / "question.jsonl"
    upload.write_text('{"question": "q", "answer": "a"}\n{"question": "r", "answer": "b"}\n')
    with pytest.raises(QALoRAError) as exc:
        forms.build_spec(base="tiny-random", bits=4, group_size=32, method="rtn",
                         data=forms.data_source("upload", None, str(upload), None), rank=8, alpha=16, lr=2e-4,
                         steps=10, batch_size=2, seq_len=256)
    assert "its column(s) 'answer', 'question' match no known record format" in str(exc.value)


def _form_message(**kw) -> dict:
    fields = dict(base="default", bits=4, group_size=32, method="rtn", data="builtin:default", rank=8, alpha=16,
                  lr=2e-4, steps=10, batch_size=2, seq_len=256)
    with pytest.raises(forms.FormError) as exc:
        forms.build_spec(**{**fields, **kw})
    return exc.value.fields


def test_a_name_that_exists_here_is_told_what_a_missing_name_is_told(home, tmp_path, monkeypatch):
    """Written as a dataset name or a model name (no ``/``, ``.``, ``~``, no file suffix), a relative
    path that exists under the app's working folder gets the same message, word for word, as a name
    that does not exist (it got the confinement message, a missing one "no such dataset")."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    (work / "secret-set").mkdir(parents=True)
    (work / "secret-set" / "rows.jsonl").write_text(ROWS)
    (work / "org" / "secret-model").mkdir(parents=True)
    monkeypatch.chdir(work)
    for present, absent, field in (("secret-set", "absent-set", "data"), ("secret-set", "absent-set", "base"),
                                   ("org/secret-model", "org/absent-model", "base")):
        told = [_form_message(**{field: name})[field].replace(name, "NAME") for name in (present, absent)]
        assert told[0] == told[1], (field, told)
        assert "only reads server files" not in told[0]


def test_the_command_line_sweep_reads_any_path(home, tmp_path, monkeypatch):
    """``python -m jobs sweep`` is the machine user's own tool: it is not confined."""
    import subprocess
    import sys
    from pathlib import Path

    mine = tmp_path / "elsewhere" / "mine.jsonl"
    mine.parent.mkdir()
    mine.write_text(ROWS * 10)
    assert "only reads server files" in str(_form_message(data=str(mine))["data"])  # the form is confined
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "jobs", "sweep", "--base", "tiny-random", "--data", str(mine),
                           "--bits", "4", "--group-size", "32", "--steps", "2", "--name", "outside"],
                          cwd=root, env={**os.environ, "QALORA_HOME": str(home)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "queued jobs #1" in proc.stdout
    from jobs import service
    (job,) = service.list_jobs()
    assert job["spec"]["data"] == str(mine)
