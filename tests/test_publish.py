"""Publishing a finished job through the real ``huggingface_hub`` client to a fake Hub on 127.0.0.1.

The fake implements the four endpoints an upload uses (whoami, repo creation, pre-upload,
commit) and records what it was sent, so the tests check what a real Hub would receive.
"""
import base64
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs import publish, service
from jobs.spec import JobSpec
from qalora.config import AdapterConfig, QuantConfig, TrainConfig
from storage import get_settings

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_fakeSECRETtoken1234567890"
USER = "alice"
STEPS = 4


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, dict] = {"alice/taken": {"private": False, "files": {}}}
        self.requests: list[tuple[str, str]] = []
        self.validated: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # keep the test output clean
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        self._reply(401, {"error": "Invalid credentials in Authorization header"})
        return False

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        self.server.requests.append(("GET", self.path))
        if self.path == "/api/whoami-v2" and self._authorized():
            self._reply(200, {"type": "user", "name": USER, "orgs": []})
        elif self.path != "/api/whoami-v2" and not self._download(head=False):
            self._reply(404, {"error": "not found"})

    def do_HEAD(self):
        self.server.requests.append(("HEAD", self.path))
        if not self._download(head=True):
            self._reply(404, {"error": "not found"})

    def _download(self, head: bool) -> bool:
        """The read side of the Hub that snapshot_download uses: repo info, file tree, file bytes."""
        path = self.path.split("?")[0].strip("/").split("/")
        info = path[:2] == ["api", "models"] and len(path) == 4  # repo info, as at a revision
        api = info or path[:2] == ["api", "models"] and len(path) >= 6 and path[4] in ("revision", "tree")
        resolve = len(path) >= 5 and path[2] == "resolve"
        if not (api or resolve):
            return False
        repo_id = "/".join(path[2:4] if api else path[:2])
        repo = self.server.repos.get(repo_id)
        if repo is None or (repo.get("gated") and self.headers.get("Authorization") != f"Bearer {TOKEN}"):
            code, error = (404, "RepositoryNotFound") if repo is None else (403, "GatedRepo")
            data = json.dumps({"error": error}).encode()
            self.send_response(code)
            self.send_header("X-Error-Code", error)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)
            return True
        sha = "f" * 40
        files = repo["files"]
        if info or api and path[4] == "revision":
            self._reply(200, {"id": repo_id, "sha": sha, "private": repo["private"],
                              "siblings": [{"rfilename": f} for f in sorted(files)]})
        elif api:
            self._reply(200, [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                              for f, b in sorted(files.items())])
        else:
            name = "/".join(path[4:])
            if name not in files:
                self._reply(404, {"error": "Entry not found"})
                return True
            data = files[name]
            self.send_response(200)
            self.send_header("X-Repo-Commit", sha)
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if not head:
                self.wfile.write(data)
        return True

    def do_POST(self):
        self.server.requests.append(("POST", self.path))
        body = self._body()
        if not self._authorized():
            return
        parts = self.path.split("?")[0].strip("/").split("/")
        if self.path == "/api/validate-yaml":  # the client asks the Hub to check the card's metadata
            self.server.validated.append(json.loads(body)["content"])
            return self._reply(200, {"errors": [], "warnings": []})
        if self.path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req.get('organization') or USER}/{req['name']}"
            if repo_id in self.server.repos:
                return self._reply(409, {"error": "You already created this model repo"})
            self.server.repos[repo_id] = {"private": req.get("visibility") == "private", "files": {}}
            return self._reply(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id})
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
            repo = self.server.repos.get(f"{parts[2]}/{parts[3]}")
            if repo is None:
                return self._reply(404, {"error": "Repository not found"})
            if parts[4] == "preupload":
                files = json.loads(body)["files"]
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                    "shouldIgnore": False} for f in files]})
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._reply(200, {"commitUrl": f"{self.server.url}/{parts[2]}/{parts[3]}/commit/1",
                                     "commitOid": "1" * 40})
        self._reply(404, {"error": "not found"})


@pytest.fixture

def hub():
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """One real tiny job, run in this process (the publish tests only read it)."""
    import os

    from jobs.pipeline import run_job

    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("QALORA_HOME", "QALORA_DB_URL")}
    os.environ["QALORA_HOME"] = str(home)
    os.environ.pop("QALORA_DB_URL", None)
    spec = JobSpec(base="tiny-random", data="builtin:contacts", quant=QuantConfig(4, 32),
                   adapter=AdapterConfig(rank=4, alpha=8),
                   train=TrainConfig(steps=STEPS, batch_size=2, seq_len=256, eval_every=2, save_every=2,
                                     eval_batches=1, warmup_steps=1), exports=("gguf", "gptq"),
                   name="contacts-tiny")
    job_id = service.submit(spec)
    assert run_job(job_id) == "succeeded"
    yield service.get_job(job_id)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def env(finished_job, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("QALORA_HOME", str(get_settings().home))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))  # not this machine's login
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return finished_job


def test_card_names_the_job_settings_and_results(env):
    card = publish.model_card(env, "alice/contacts")
    report = env["report"]
    assert card.startswith("---\nlibrary_name: transformers\n")
    for row in ("| bits | 4 |", "| group size | 32 |", "| quantization | RTN |", "| dataset | builtin:contacts |",
                "| LoRA rank / alpha | 4 / 8 |", f"| steps | {STEPS} |", "| batch size x seq len | 2 x 256 |",
                f"| eval loss, merged low-bit model | {report['eval_loss_merged']:.4g} |",
                f"| merge check: max abs logit difference | {report['merge_max_abs_logit_diff']:.3g} |",
                "![loss curve](loss_curve.png)", 'snapshot_download("alice/contacts", allow_patterns=["native/*"])',
                'AutoModelForCausalLM.from_pretrained("alice/contacts")',
                'Llama.from_pretrained("alice/contacts", filename="model-q4_1.gguf")',
                "| method | QA-LoRA (RTN) |"):
        assert row in card
    # each file's size beside the 16-bit model's, in bits per parameter of the whole file
    params = report["model_params"]
    sizes = {a["kind"]: a["size_bytes"] for a in env["artifacts"]}
    assert f"native {sizes['merged'] / 1e6:.0f} MB ({8 * sizes['merged'] / params:.2f} bits/param)" in card
    assert f"16-bit model {2 * params / 1e6:.0f} MB" in card
    assert "Q4_1 blocks, so the file costs what a 4-bit one does" not in card  # a 4-bit run
    two = {**env, "report": {**report, "bits": 2}}
    assert "the 2-bit codes are stored in Q4_1 blocks, so the file costs what a 4-bit one does" in \
        publish.model_card(two, "alice/contacts", formats=["gguf"])


def test_loss_curve_draws_train_line_and_eval_points(env):
    img = publish.loss_curve(env)
    assert img.size == (720, 400)
    colors = {c for _, c in img.getcolors(maxcolors=100_000)}
    assert (0x1F, 0x77, 0xB4) in colors and (0xFF, 0x7F, 0x0E) in colors  # train line, eval dots
    empty = publish.loss_curve({"metrics": [], "report": {}})
    assert (0x1F, 0x77, 0xB4) not in {c for _, c in empty.getcolors(maxcolors=100_000)}


def test_download_zips_the_merged_model(env, tmp_path):
    import zipfile

    update, note = _download_now(env["id"])
    with zipfile.ZipFile(update) as z:
        names = set(z.namelist())
    merged = Path(env["artifact_dir"]) / "merged"
    assert names == {p.name for p in merged.iterdir()} and "load_quantized" in note
    assert service.archive_model(env["id"], tmp_path).name == f"qalora-job-{env['id']:05d}-merged.zip"
    # each click gets its own folder: two downloads never write the same file
    again, _ = _download_now(env["id"])
    assert Path(again).parent != Path(update).parent
    assert Path(again).name == Path(update).name
    assert not list(Path(again).parent.glob(".partial-*"))


def test_job_exports_and_multiple_choice_are_in_the_report_and_downloads(env, tmp_path):
    from ui import jobs as jobs_tab

    report = env["report"]
    kinds = {a["kind"] for a in service.get_job(env["id"])["artifacts"]}
    assert {"merged", "adapter", "report", "log", "gguf", "gptq"} <= kinds
    run = Path(service.get_job(env["id"])["artifact_dir"])
    assert report["exports"]["gguf"]["path"] == "exports/model-q4_1.gguf"  # relative: any machine's mount finds it
    gguf_file = run / report["exports"]["gguf"]["path"]
    assert gguf_file.read_bytes()[:4] == b"GGUF" and report["exports"]["gguf"]["exact"] is True
    gptq = json.loads((run / report["exports"]["gptq"]["path"] / "export_report.json").read_text())
    assert report["exports"]["gptq"]["max_abs_logit_diff"] == gptq["max_abs_logit_diff"] > 0
    mc = report["multiple_choice"]
    assert mc["n"] == 40 and mc["correct"] == round(mc["accuracy"] * 40) and mc["chance"] == 0.25
    # the jobs tab shows the GPTQ cost beside the download, and each format downloads as one file
    assert f"max |logit difference| {gptq['max_abs_logit_diff']:.3g}" in jobs_tab._merge_check(env)
    path, note = _download_now(env["id"], "gptq")
    assert path.endswith(".zip") and f"{gptq['max_abs_logit_diff']:.3g}" in note
    path, note = _download_now(env["id"], "gguf")
    assert Path(path).read_bytes() == gguf_file.read_bytes() and "exact" in note
    # its size in the unit it states: MB of 10^6 bytes (before: MiB labelled MB)
    assert note.startswith(f"Downloading `{Path(path).name}`, {Path(path).stat().st_size / 1e6:,.1f} MB. ")
    assert list(jobs_tab._download(env["id"], "gguf"))[0][0] is None  # the old file goes first: no stale click-through
    # not made by the job: the web process only queues it; a worker writes it
    import sys
    import zipfile

    import gradio as gr

    from jobs.worker import Worker
    # the web process's own answer, in a fresh process (this one loaded torch long ago): it loads
    # no torch to queue the export
    code = ("import json, sys, app; from ui import jobs as jobs_tab; "
            "update, note = list(jobs_tab._download(%d, 'peft'))[-1]; "
            "print(json.dumps({'note': note, 'torch': 'torch' in sys.modules, 'skip': type(update).__name__}))"
            % env["id"])
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QALORA_HOME": str(get_settings().home)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    web = json.loads(proc.stdout.strip().splitlines()[-1])
    assert web["torch"] is False and web["skip"] == type(gr.skip()).__name__
    note = web["note"]
    assert note.startswith("The peft export is queued by the worker")
    assert [(t["format"], t["status"]) for t in service.export_tasks(env["id"])] == [("peft", "queued")]
    assert _download_now(env["id"], "peft")[1] == note  # asking twice queues it once
    assert len(service.export_tasks(env["id"])) == 1
    assert "peft queued" in jobs_tab._job_summary(service.get_job(env["id"]))
    assert not (Path(env["artifact_dir"]) / "exports" / "peft").exists()
    assert Worker().run(burst=True) == 0  # no job ran; the export did
    (task,) = service.export_tasks(env["id"])
    assert task["status"] == "done" and Path(task["path"]).is_dir()
    path, note = service.download_model(env["id"], "peft", tmp_path)
    with zipfile.ZipFile(path) as z:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(z.namelist())
    assert "PEFT LoRA adapter" in note and "peft done" in jobs_tab._job_summary(service.get_job(env["id"]))
    # the transformers (torchao) checkpoint the same way, with its measured fidelity in the note
    _download_now(env["id"], "torchao")
    assert Worker().run(burst=True) == 0
    path, note = service.download_model(env["id"], "torchao", tmp_path)
    with zipfile.ZipFile(path) as z:
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(z.namelist())
        assert json.loads(z.read("config.json"))["quantization_config"]["quant_method"] == "torchao"
    assert "from_pretrained" in note and re.search(r"max \|logit difference\| [\d.e-]+ \(largest logit", note)


def _files_under(root):
    return [p for p in root.rglob("*") if p.is_file()]


def _code_blocks(card: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", card, flags=re.S)


def _run_snippet(code: str, hub, tmp_path) -> str:
    """A card snippet as a user runs it: a fresh process, online, its own cache, the fake Hub."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip()


@pytest.fixture
def torchao_ready(env):
    """The transformers checkpoint a publish uploads, written as every export a job did not make is:
    by a worker (publishing waits for one; here one runs the queue once)."""
    from jobs.worker import Worker

    if not any(t["format"] == "torchao" and t["status"] == "done" for t in service.export_tasks(env["id"])):
        service.request_export(env["id"], "torchao")
        Worker().run(burst=True)
    return env


def test_publish_uploads_every_format_and_the_cards_snippets_run(torchao_ready, env, hub, caplog, tmp_path):
    from huggingface_hub import ModelCard

    caplog.set_level(logging.DEBUG)
    steps = []
    url = service.publish_job(env["id"], "contacts-4bit", private=True, token=TOKEN, endpoint=hub.url,
                              progress=lambda f, m: steps.append((f, m)))
    assert url == f"{hub.url}/alice/contacts-4bit"
    repo = hub.repos["alice/contacts-4bit"]
    assert repo["private"] is True
    run = Path(env["artifact_dir"])
    # every file, byte for byte: the transformers checkpoint at the root, GGUF + Modelfile, native/, adapter/
    expected = {p.relative_to(run / "exports" / "torchao").as_posix(): p for p in _files_under(run / "exports" / "torchao")}
    expected |= {"native/" + p.relative_to(run / "merged").as_posix(): p for p in _files_under(run / "merged")}
    expected |= {"adapter/" + p.relative_to(run / "adapter").as_posix(): p for p in _files_under(run / "adapter")}
    expected["model-q4_1.gguf"] = run / env["report"]["exports"]["gguf"]["path"]
    assert set(repo["files"]) == set(expected) | {"Modelfile", "README.md", "loss_curve.png"}
    assert {"config.json", "model.safetensors", "tokenizer.json", "native/model.safetensors",
            "adapter/adapter_model.safetensors"} <= set(repo["files"])
    assert all(repo["files"][name] == path.read_bytes() for name, path in expected.items())
    config = json.loads(repo["files"]["config.json"])
    assert config["quantization_config"]["quant_method"] == "torchao" and config["dtype"] == "bfloat16"
    assert repo["files"]["Modelfile"].decode().startswith("FROM ./model-q4_1.gguf\nTEMPLATE")
    assert repo["files"]["loss_curve.png"][:8] == b"\x89PNG\r\n\x1a\n"
    card = repo["files"]["README.md"].decode()
    assert hub.validated == [card]
    # the card's metadata is what the Hub reads, and its fidelity row is the measured one
    data = ModelCard(card).data
    assert (data.library_name, data.pipeline_tag) == ("transformers", "text-generation") and data.base_model is None
    assert {"qalora", "4-bit", "torchao", "gguf", "q4_1"} <= set(data.tags)
    measured = re.search(r"max \\\|logit difference\\\| ([\d.e+-]+) \(largest logit ([\d.e+-]+)\), same top token "
                         r"on (\d+)% of (\d+) tokens", card)
    assert measured and 0 < float(measured[1]) < 0.1 * float(measured[2]) and int(measured[3]) >= 80, card
    # every file a snippet names is in the repo
    named = set(re.findall(r'filename="([^"]+)"', card)) | set(re.findall(r"hf download \S+ (\S+) (\S+)", card)[0])
    assert named == {"model-q4_1.gguf", "Modelfile"} and named <= set(repo["files"])
    # the transformers and llama-cpp-python snippets run as printed, downloading from the Hub
    blocks = _code_blocks(card, "python")
    assert len(blocks) == 3 and [("from_pretrained" in b, "llama_cpp" in b, "load_quantized" in b) for b in blocks] \
        == [(True, False, False), (True, True, False), (False, False, True)]
    reply = _run_snippet(blocks[0], hub, tmp_path)
    local = _run_snippet(blocks[0].replace('"alice/contacts-4bit"', repr(str(run / "exports" / "torchao"))),
                         hub, tmp_path)
    assert reply and reply == local  # the Hub's copy answers as the local export does
    gguf_reply = _run_snippet(blocks[1], hub, tmp_path)
    from llama_cpp import Llama
    llm = Llama(str(expected["model-q4_1.gguf"]), verbose=False)
    direct = llm.create_chat_completion(messages=[{"role": "user", "content": "Hello!"}], max_tokens=64,
                                        temperature=0)["choices"][0]["message"]["content"]
    assert gguf_reply and gguf_reply == direct.strip()
    native = _run_snippet(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + blocks[2] +
                          "print(type(model).__name__, sum(1 for m in model.modules() if type(m).__name__ == 'QuantLinear'))",
                          hub, tmp_path)
    assert native == "LlamaForCausalLM 14"
    assert [f for f, _ in steps] == sorted(f for f, _ in steps) and steps[-1][0] == 1.0
    # the token is in no file under QALORA_HOME (database, WAL, logs, artifacts) and no log record
    for path in _files_under(get_settings().home):
        assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in caplog.text and TOKEN not in json.dumps(service.get_job(env["id"]), default=str)


def test_publish_only_the_ticked_formats_and_refuse_what_cannot_apply(torchao_ready, env, hub):
    service.publish_job(env["id"], "only-gguf", token=TOKEN, endpoint=hub.url, formats=["gguf"])
    files = set(hub.repos["alice/only-gguf"]["files"])
    assert files == {"model-q4_1.gguf", "Modelfile", "README.md", "loss_curve.png"}
    card = hub.repos["alice/only-gguf"]["files"]["README.md"].decode()
    assert "library_name" not in card.split("---")[1] and "AutoModelForCausalLM" not in card
    with pytest.raises(publish.PublishError, match="Tick at least one format"):
        service.publish_job(env["id"], "none", token=TOKEN, endpoint=hub.url, formats=[])
    with pytest.raises(publish.PublishError, match=r"format\(s\) \['awq'\] cannot be published"):
        service.publish_job(env["id"], "awq", token=TOKEN, endpoint=hub.url, formats=["awq"])
    job16 = {**env, "report": {**env["report"], "group_size": 16}}
    assert publish.publish_choices(job16)[0] == ["transformers", "native", "adapter"]
    assert "multiple of 32" in publish.publish_choices(job16)[1]["gguf"]
    assert "alice/none" not in hub.repos and "alice/awq" not in hub.repos


def test_public_repo_under_an_explicit_namespace_and_token_from_environment(torchao_ready, env, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    url = service.publish_job(env["id"], "alice/contacts-public", private=False, endpoint=hub.url)
    assert url.endswith("/alice/contacts-public") and hub.repos["alice/contacts-public"]["private"] is False
    assert ("GET", "/api/whoami-v2") not in hub.requests  # the namespace was given: no lookup needed


def test_token_from_the_login_cache_and_the_app_handler_clears_the_token_field(torchao_ready, env, hub, monkeypatch):
    from huggingface_hub import constants

    from ui import publish as publish_tab

    cache = Path(constants.HF_TOKEN_PATH)
    cache.parent.mkdir(parents=True)
    cache.write_text(TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    shown, token_field = publish_tab._publish(env["id"], "from-cache", True, "", progress=lambda *a, **k: None)
    url = f"{hub.url}/alice/from-cache"
    assert (shown, token_field) == (f"Published (private): [{url}]({url})", "")
    assert "README.md" in hub.repos["alice/from-cache"]["files"]


def test_bad_token_taken_name_and_missing_token_give_clear_messages(torchao_ready, env, hub):
    with pytest.raises(publish.PublishError, match=r"rejected the token \(401 Unauthorized\).*settings/tokens"):
        service.publish_job(env["id"], "contacts", token="hf_wrong", endpoint=hub.url)
    with pytest.raises(publish.PublishError, match="alice/taken already exists: choose another repository name"):
        service.publish_job(env["id"], "taken", token=TOKEN, endpoint=hub.url)
    assert hub.repos["alice/taken"]["files"] == {}  # nothing was uploaded over the existing repo
    with pytest.raises(publish.PublishError, match="No Hugging Face token found.*HF_TOKEN"):
        service.publish_job(env["id"], "contacts", endpoint=hub.url)
    with pytest.raises(publish.PublishError, match="repository name 'bad name!' is not valid"):
        service.publish_job(env["id"], "bad name!", token=TOKEN, endpoint=hub.url)


def test_unreachable_hub_names_the_endpoint_not_the_token(torchao_ready, env, hub):
    dead = hub.url
    hub.shutdown()
    hub.server_close()
    with pytest.raises(publish.PublishError, match=f"Cannot reach {dead}") as err:
        service.publish_job(env["id"], "contacts", token=TOKEN, endpoint=dead)
    assert TOKEN not in str(err.value)


def test_shared_without_login_never_lends_the_servers_token(torchao_ready, env, hub, monkeypatch):
    """--no-auth off loopback: HF_TOKEN is set on the server, yet a visitor with an empty token field
    is told to paste their own, and nothing reaches the Hub; their own token still works."""
    from ui import auth, publish as publish_tab

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(auth, "_ACCESS", auth.access("0.0.0.0", True, {}))
    shown, _ = publish_tab._publish(env["id"], "borrowed", True, "", progress=lambda *a, **k: None)
    assert "Paste your Hugging Face token" in shown and TOKEN not in shown
    assert hub.requests == [] and "alice/borrowed" not in hub.repos
    shown, _ = publish_tab._publish(env["id"], "own", True, TOKEN, progress=lambda *a, **k: None)
    assert shown.startswith("Published (private)")


def test_a_hub_id_downloads_the_base_and_trains(hub, tmp_path, monkeypatch):
    """A Hub id in a job downloads config, tokenizer and safetensors (streamed in layer by layer);
    a missing or gated repo gives a message that names the fix."""
    from huggingface_hub import constants

    from qalora.errors import ModelError
    from qalora.models.model import open_base
    from qalora.training.finetune import finetune
    from qalora.models.tiny import tiny_random_llama

    model, tok = tiny_random_llama()
    model.save_pretrained(tmp_path / "src", max_shard_size="200KB")
    tok.save_pretrained(tmp_path / "src")
    hub.repos["meta-tiny/llama"] = {"private": False, "files": {p.name: p.read_bytes()
                                                                 for p in (tmp_path / "src").iterdir()}}
    hub.repos["meta-tiny/gated"] = {**hub.repos["meta-tiny/llama"], "gated": True}
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)

    src = open_base("meta-tiny/llama")
    assert src.kind == "safetensors" and (src.path / "model.safetensors.index.json").is_file()
    assert any(r[1].startswith("/meta-tiny/llama/resolve/") for r in hub.requests)
    report = finetune("meta-tiny/llama", "builtin:default", tmp_path / "run", QuantConfig(4, 32),
                      AdapterConfig(rank=4), TrainConfig(steps=1, batch_size=2, seq_len=320, eval_batches=1))
    assert report["base"] == "meta-tiny/llama" and report["merge_max_abs_logit_diff"] <= 1e-4
    with pytest.raises(ModelError, match="could not fetch 'meta-tiny/missing': the Hub at .* has no such model"):
        open_base("meta-tiny/missing")
    with pytest.raises(ModelError, match="could not fetch 'meta-tiny/gated': it is gated. .*set HF_TOKEN"):
        open_base("meta-tiny/gated")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="Hub downloads are off"):
        open_base("meta-tiny/other")


def _download_now(*args):
    """The download handler streams what it prepares; the page ends on its last update."""
    from ui import jobs as jobs_tab
    return list(jobs_tab._download(*args))[-1]


def test_the_form_asks_the_hub_for_a_hub_id_within_its_budget(hub, tmp_path, monkeypatch):
    """A Hub id's config is read in the form: real group sizes when the Hub answers, and at once a
    clear refusal (nothing queued) when it has no such model, cannot be reached, or does not answer."""
    import socket

    from huggingface_hub import constants

    from jobs import forms
    from qalora.errors import ModelError
    from qalora.models.hub import hub_config
    from ui import new_job

    monkeypatch.setenv("QALORA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QALORA_DB_URL", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    config = {"model_type": "llama", "hidden_size": 96, "intermediate_size": 256, "num_attention_heads": 3}
    hub.repos["org/llama-96"] = {"private": False, "files": {"config.json": json.dumps(config).encode()}}
    hub.repos["org/gpt"] = {"private": False, "files": {"config.json": json.dumps(
        {"model_type": "gpt2", "hidden_size": 64, "intermediate_size": 256}).encode()}}
    assert forms.group_size_choices("org/llama-96") == [16, 32]  # from the Hub's config, not a guess
    update, note, error, _ = new_job._base_changed("org/gpt", [32])
    assert "is a 'gpt2' model" in error
    with pytest.raises(ModelError, match="the Hub at .* has no such model, or it is private"):
        hub_config("org/missing")
    # the whole form refuses a Hub id it cannot reach, next to the base field
    form = dict(base="org/missing", bits=4, group_size=32, method="rtn", data="builtin:contacts", rank=4, alpha=8,
                lr=1e-3, steps=6, batch_size=2, seq_len=256)
    with pytest.raises(forms.FormError) as refused:
        forms.build_spec(**form)
    assert list(refused.value.fields) == ["base"] and "has no such model" in refused.value.fields["base"]
    assert service.list_jobs() == []
    # nothing listening: refused at once; a server that accepts and never answers: refused at the budget
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ModelError, match=r"cannot reach the Hub at http://127\.0\.0\.1:\d+ to read 'org/x' "
                                         r"\(ConnectError within 2 s\): download the model first"):
        hub_config("org/x")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        with pytest.raises(ModelError, match=r"\(ReadTimeout within 0\.3 s\)"):
            hub_config("org/y", timeout=0.3)


def test_the_loss_axis_never_shows_a_negative_loss():
    assert publish.y_range([0.01, 0.02, 2.0]) == (0.0, 2.0 + 0.05 * 1.99)
    assert publish.y_range([0.3, 0.3]) == (0.0, 0.8)  # one value: 0.5 room, floored at 0
    lo, hi = publish.y_range([1.0, 3.0])
    assert (lo, hi) == (0.9, 3.1)


def test_card_preview_names_the_repo_as_it_will_be_published(env):
    from ui import publish as publish_tab

    card, _, repo = publish_tab._card(env["id"], "my-model")
    assert 'from_pretrained("<your-hub-username>/my-model")' in card and repo == "my-model"
    card, _, _ = publish_tab._card(env["id"], "team/my-model", ["native"])
    assert 'snapshot_download("team/my-model", allow_patterns=["native/*"])' in card
    assert "from_pretrained" not in card  # only the ticked formats are described
    update, note = publish_tab._publish_formats(env["id"])  # a job of group size 32 with an adapter: everything
    assert update["value"] == ["transformers", "gguf", "native", "adapter"] and note == ""


def test_publishing_never_lifts_the_offline_switch_of_the_web_process(torchao_ready, env, hub):
    """huggingface_hub reads HF_HUB_OFFLINE from one module global: the upload runs in a process of its
    own, so this process's other threads (a form's Hub check, the chat loading a Hub base) stay offline
    throughout (it was lifted here for the whole upload)."""
    import time

    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # the suite runs offline (conftest.py)
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.add(constants.HF_HUB_OFFLINE)
            time.sleep(0.0002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        url = service.publish_job(env["id"], "offline-check", private=True, token=TOKEN, endpoint=hub.url)
    finally:
        done.set()
        watcher.join()
    assert url == f"{hub.url}/alice/offline-check" and seen == {True}
