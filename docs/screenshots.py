"""Refresh the README's screenshots (Jobs, Compare, Chat) from a real app on real jobs.

    QALORA_HOME=/tmp/shots/home python -m jobs sweep --bits 3,4 --group-size 32,64 --steps 40 \
        --batch-size 4 --exports gguf --name demo --local     # the jobs (default model, ~15 min on 2 cores)
    QALORA_HOME=/tmp/shots/home python docs/screenshots.py  # docs/screenshot.png, compare.png, chat.png

The app runs with ``--no-worker`` on a free port against that home; Playwright drives Debian's
chromium (as the browser test does). The chat turn is side by side with the base model.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]
MESSAGE = "Make a contact card: Ana Ruiz, 41, lives in Porto."


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    if not os.environ.get("QALORA_HOME"):
        raise SystemExit("set QALORA_HOME to the home that holds the jobs to show (see this file's docstring).")
    port = _port()
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--no-worker"], cwd=ROOT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            expect.set_options(timeout=120_000)
            page.goto(url)
            page.get_by_role("tab", name="Jobs").click()
            page.locator("#job-select input").click()
            page.get_by_role("option").first.click()
            expect(page.locator("#loss-plot g.mark-line path").first).to_be_visible()
            time.sleep(1)
            page.screenshot(path=ROOT / "docs" / "screenshot.png", full_page=True)
            page.get_by_role("tab", name="Compare").click()
            expect(page.locator("#compare-scatter g.mark-text.role-mark text").first).to_be_visible()
            time.sleep(1)
            page.screenshot(path=ROOT / "docs" / "compare.png", full_page=True)
            page.get_by_role("tab", name="Chat").click()
            expect(page.locator("#chat-model input")).to_have_value(re.compile(r"^#\d+ "))
            page.locator("#chat-compare input").check()
            page.locator("#chat-input textarea").fill(MESSAGE)
            page.locator("#chat-send").click()
            expect(page.locator("#chat-status")).to_contain_text("kept in memory for the next turn")
            page.screenshot(path=ROOT / "docs" / "chat.png", full_page=True)
            browser.close()
    finally:
        app.send_signal(signal.SIGTERM)
        app.wait(timeout=60)
    print("wrote docs/screenshot.png, docs/compare.png, docs/chat.png")


if __name__ == "__main__":
    main()
