"""How long the New fine-tune form takes to refuse each bad input, and with what message.

Each case calls the form's own check (``jobs.forms.build_spec`` after ``data_source``, as the
Launch button does) in a fresh process on a fresh ``QALORA_HOME``, warm (a first call loads the
tokenizer; the table shows the second). ``--before-ref`` runs the same cases on an older commit in
a temporary git worktree, side by side: "queued" there means the input was accepted and would
have failed later in the worker.

    python bench/form_checks.py [--before-ref REF]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from jobs import forms
case = json.loads(sys.argv[1])
form = dict(base="default", bits=4, group_size=32, method="rtn", rank=8, alpha=16, lr=3e-4, steps=40,
            batch_size=4, seq_len=256, exports=["gguf"])
form.update(case.get("form", {}))
data = case.get("data", "builtin:default")
def attempt():
    t0 = time.perf_counter()
    try:
        forms.build_spec(data=forms.data_source("path or name", None, None, data) if data != "builtin:default"
                         else data, **form)
        return time.perf_counter() - t0, "accepted (would be queued)"
    except Exception as exc:
        return time.perf_counter() - t0, str(exc)
attempt()  # warm: tokenizer and imports
print(json.dumps(attempt()))
"""


def _silent_endpoint() -> tuple[str, socket.socket]:
    """A server that accepts connections and never answers (a Hub behind a dead proxy)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return f"http://127.0.0.1:{s.getsockname()[1]}", s


def cases(tmp: Path) -> dict[str, dict]:
    few = tmp / "few.jsonl"
    few.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(3)))
    return {
        "learning rate 1e9": {"form": {"lr": 1e9}},
        "sequence length 8": {"form": {"seq_len": 8}},
        "3-record dataset": {"data": str(few)},
        "group 16 with GGUF ticked": {"form": {"group_size": 16}},
        "Hub id, Hub unreachable": {"form": {"base": "meta-llama/Llama-3.1-8B"}, "endpoint": "silent"},
    }


def run(code_root: Path, name: str, case: dict, tmp: Path, endpoint: str) -> tuple[float, str]:
    env = {**os.environ, "QALORA_HOME": str(tmp / f"home-{abs(hash(name))}"), "PYTHONPATH": str(code_root),
           "QALORA_ALLOWED_DIRS": str(tmp), "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "0"}
    env.pop("QALORA_DB_URL", None)
    if case.get("endpoint"):
        env["HF_ENDPOINT"] = endpoint
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case)], cwd=code_root, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        return float("nan"), proc.stderr.strip().splitlines()[-1][:120]
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-ref", default=None)
    args = parser.parse_args(argv)
    endpoint, silent = _silent_endpoint()
    threading.Thread(target=lambda: [silent.accept() for _ in iter(int, 1)], daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        roots = {"now": ROOT}
        if args.before_ref:
            tree = tmp / "before"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.before_ref], cwd=ROOT, check=True,
                           capture_output=True)
            roots = {f"before ({args.before_ref})": tree, **roots}
        try:
            results = {label: {name: run(root, name, case, tmp, endpoint) for name, case in cases(tmp).items()}
                       for label, root in roots.items()}
        finally:
            if args.before_ref:
                subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "before")], cwd=ROOT,
                               capture_output=True)
    labels = list(results)
    print(f"seconds for the form to answer (warm), {os.cpu_count()} CPU cores\n")
    print("| refused input | " + " | ".join(labels) + " | message now |")
    print("|---|" + "---:|" * len(labels) + "---|")
    for name in results["now"]:
        cells = []
        for label in labels:
            seconds, message = results[label][name]
            cells.append(f"{seconds:.2f}" + (" (queued)" if message.startswith("accepted") else ""))
        print(f"| {name} | " + " | ".join(cells) + f" | {results['now'][name][1][:110]}… |")


if __name__ == "__main__":
    main()
