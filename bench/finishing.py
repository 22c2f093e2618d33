"""Time of each stage of a job on the default model, from the job's own log: is finishing cheap?

Runs one job through the worker path (``jobs.pipeline.run_job``: the library's fine-tune, then the
job's exports and, on the built-in data, its multiple-choice evaluation) in a child process with a
fresh ``QALORA_HOME``, and reads each stage's start time from the job log. Prints one table: each
stage's seconds, the training time, the time from the last training step to "succeeded", and
their ratio (issue 12's target: finishing <= 20% of a 100-step run's training).

``--before-ref`` also runs the code at that commit (a temporary git worktree), side by side.

    python bench/finishing.py [--steps 100] [--exports gguf] [--before-ref REF]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) INFO stage: (\w+)")
END_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) INFO succeeded")

CHILD = r"""
import json, sys, time
from jobs import forms, service
from jobs.pipeline import run_job
args = json.loads(sys.argv[1])
spec = forms.build_spec(base="default", bits=4, group_size=32, method="rtn", data="builtin:default", rank=8,
                        alpha=16, lr=3e-4, steps=args["steps"], batch_size=4, seq_len=256,
                        exports=args["exports"])
job_id = service.submit(spec)
t0 = time.time()
status = run_job(job_id)
job = service.get_job(job_id)
last = job["metrics"][-1]["time"] if job["metrics"] else None
print(json.dumps({"status": status, "wall_s": time.time() - t0, "log": job["artifact_dir"] + "/job.log",
                  "error": job["error"], "last_step_at": last and last.strftime("%Y-%m-%d %H:%M:%S"),
                  "finished_at": job["finished_at"] and job["finished_at"].strftime("%Y-%m-%d %H:%M:%S")}))
"""


def _t(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S")


def train_start(log: Path) -> str:
    for line in log.read_text().splitlines():
        if (m := STAGE_LINE.match(line)) and m.group(2) == "train":
            return m.group(1)
    raise SystemExit(f"no training stage in {log}")


def stage_times(log: Path) -> dict[str, float]:
    """Seconds spent in each stage (first start of a stage to the next stage's start)."""
    marks = []
    for line in log.read_text().splitlines():
        if m := STAGE_LINE.match(line):
            marks.append((m.group(2), datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")))
        elif m := END_LINE.match(line):
            marks.append(("end", datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")))
    out: dict[str, float] = {}
    for (name, t), (_, t_next) in zip(marks, marks[1:]):
        if name not in out:
            out[name] = (t_next - t).total_seconds()
    return out


def run(code_root: Path, steps: int, exports: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "QALORA_HOME": home, "PYTHONPATH": str(code_root)}
        env.pop("QALORA_DB_URL", None)
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"steps": steps, "exports": exports})],
                              cwd=code_root, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["stages"] = stage_times(Path(result["log"]))
        result["train_started_at"] = train_start(Path(result["log"]))
        return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--exports", default="", help="comma-separated extra exports (default: none)")
    parser.add_argument("--before-ref", default=None, help="also time this git commit, side by side")
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--skip-now", action="store_true", help="time only --before-ref")
    args = parser.parse_args(argv)
    exports = [e for e in args.exports.split(",") if e]
    results = {}
    if args.before_ref:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "before"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.before_ref], cwd=ROOT, check=True,
                           capture_output=True)
            try:
                results["before"] = run(tree, args.steps, exports)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    if not args.skip_now:
        results["now"] = run(ROOT, args.steps, exports)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    finishing = ("merge", "verify", "save", "export", "evaluate")
    print(f"default model (SmolLM2-135M), 4-bit g32 RTN, {args.steps} steps, batch 4, seq 256, built-in data, "
          f"exports: {exports or 'none'}; {os.cpu_count()} CPU cores\n")
    names = list(results)
    print("| stage | " + " | ".join(f"{n} (s)" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    order = ["load", "data", "quantize", "train", *finishing]
    for stage in order:
        if any(stage in r["stages"] for r in results.values()):
            print(f"| {stage} | " + " | ".join(f"{r['stages'].get(stage, 0):.0f}" for r in results.values()) + " |")
    rows = {}
    for n, r in results.items():
        # training: "stage: train" to the last step's metric row; finishing: that row to "succeeded"
        train_s = (_t(r["last_step_at"]) - _t(r["train_started_at"])).total_seconds()
        finish_s = (_t(r["finished_at"]) - _t(r["last_step_at"])).total_seconds()
        rows[n] = (train_s, finish_s, finish_s / train_s if train_s else float("nan"))
    print("| training (stage start → last step) | " + " | ".join(f"{v[0]:.0f}" for v in rows.values()) + " |")
    print("| **last step → succeeded** | " + " | ".join(f"**{v[1]:.0f}**" for v in rows.values()) + " |")
    print("| finishing / training | " + " | ".join(f"{v[2]:.0%}" for v in rows.values()) + " |")
    for n, r in results.items():
        if r["status"] != "succeeded":
            print(f"\n{n}: job {r['status']}: {r['error']}")


if __name__ == "__main__":
    main()
