"""What several tabs share: the polling period, the page's CSS, error and wait messages, the job and
finished-model pickers' choices, and the per-request download folder."""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr

import charts
from jobs import service
from jobs.confine import with_upload_names

REFRESH_S = float(os.environ.get("QALORA_REFRESH_S") or 2.0)  # the Jobs tab's polling period
CSS = ".field-error p { color: var(--error-text-color, #b91c1c); font-weight: 600; }\n" + charts.CSS
TICK_S = 1.0
DOWNLOADS_KEEP_S = 3600


def error_note(exc: Exception) -> str:
    """The message, shown once, next to what the user did (no toast repeating it); no traceback."""
    text = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
    text = with_upload_names(text)
    return f"**Error:** {text}"


def waiting(work, describe):
    """Run ``work()`` in a thread; yield ``describe(seconds)`` every second until it ends, then
    yield ``("done", result)`` (or raise its exception). Every wait over a second says what it
    waits for."""
    box: dict = {}

    def run():
        try:
            box["result"] = work()
        except BaseException as exc:  # re-raised in the request's thread below
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    thread.start()
    thread.join(0.3)
    while thread.is_alive():
        yield describe(time.monotonic() - t0)
        thread.join(TICK_S)
    if "error" in box:
        raise box["error"]
    yield ("done", box["result"])


def job_choices(jobs: list[dict]) -> list[tuple[str, int]]:
    return [(f"#{j['id']} {j['name']} ({j['status']})", j["id"]) for j in jobs]


def model_choices() -> list[tuple[str, int]]:
    return [(f"#{m['job_id']} {m['name']} — {m['bits']}-bit, group {m['group_size']}", m["job_id"])
            for m in service.list_models()]


def models_opened(current):
    """Chat and Publish on opening: fresh choices; with none picked (or the pick gone), the newest
    finished model is picked, so a user with one finished job never has to pick it."""
    choices = model_choices()
    if current is not None and int(current) in {value for _, value in choices}:
        return gr.update(choices=choices)
    return gr.update(choices=choices, value=choices[0][1] if choices else None)


def download_folder() -> Path:
    """A fresh folder per request (two clicks never write the same file); old ones are removed."""
    root = Path(tempfile.gettempdir()) / "qalora-downloads"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.is_dir() and time.time() - old.stat().st_mtime > DOWNLOADS_KEEP_S:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=root))
