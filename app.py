"""QA-LoRA Studio: fine-tune, watch, chat with and publish low-bit models from the browser.

    python app.py [--host 127.0.0.1] [--port 7860] [--no-worker] [--no-auth]
    (QALORA_AUTH=user:password[,user2:password2] or QALORA_AUTH_FILE=path: login; required off loopback)

The module-level ``demo`` is built at import time and never launched here, so tests import it.
Each tab is laid out by one small builder in the ``ui`` package; the handlers call the jobs tier
(and, for a setting or an error's type, the library's config and errors). Training runs in a worker process; the Jobs tab polls the database with a timer, so closing
the page or restarting the app loses nothing.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

import gradio as gr

from jobs import service
from jobs.forms import warm_up
from ui import auth
from ui.chat import build_chat_tab
from ui.common import CSS
from ui.compare import build_compare_tab
from ui.jobs import build_jobs_tab
from ui.new_job import build_new_tab, wire_launch
from ui.publish import build_publish_tab


def build_app() -> gr.Blocks:
    with gr.Blocks(title="QA-LoRA Studio", analytics_enabled=False) as app:
        gr.Markdown("# QA-LoRA Studio\nFine-tune a low-bit LLaMA-family model with quantization-aware LoRA, "
                    "watch it train, chat with it and publish it.")
        with gr.Tabs() as tabs:
            with gr.Tab("New fine-tune", id="new"):
                form = build_new_tab()
            with gr.Tab("Jobs", id="jobs"):
                job_picker = build_jobs_tab()
            with gr.Tab("Compare", id="compare") as compare_tab:
                build_compare_tab(compare_tab)
            with gr.Tab("Chat", id="chat") as chat_tab:
                build_chat_tab(chat_tab)
            with gr.Tab("Publish", id="publish") as publish_tab:
                build_publish_tab(publish_tab)
        wire_launch(form, job_picker, tabs)
    return app


demo = build_app()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="QA-LoRA Studio web app")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--no-worker", action="store_true", help="do not start a training worker process")
    parser.add_argument("--no-auth", action="store_true",
                        help="serve beyond localhost without a login (not recommended; prints a warning)")
    args = parser.parse_args(argv)
    chosen = auth.access(args.host, args.no_auth, dict(os.environ))
    auth.use(chosen)
    if chosen.warning:
        print(chosen.warning, file=sys.stderr, flush=True)
    # SIGTERM stops the app like Ctrl-C does, so the workers below are stopped too
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workers = None if args.no_worker else service.WorkerPool().start()
    # the first dataset preview needs the default tokenizer: read it while the page loads
    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    try:
        # no run history: it would keep every call's inputs, the publish token included, in the browser
        demo.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port,
                                                       auth=chosen.auth, show_error=True, run_history=False, css=CSS)
    finally:
        if workers is not None:
            workers.stop()  # SIGTERM: a running job checkpoints and goes back to the queue


if __name__ == "__main__":
    main()
