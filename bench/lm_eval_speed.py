"""Benchmark requests per second: a job's merged low-bit model through ``qalora eval --tasks``
against lm-eval's own ``hf`` backend on the 16-bit (float) base, same task, same machine.

The task is an lm-eval YAML task written here over the built-in held-out multiple-choice questions
(``builtin:contacts-mc``, repeated to ``--docs`` documents): four choices each, so four
log-likelihood requests per document. Each side runs in its own child process, one after the
other; the table gives requests/s, seconds per 1,000 requests and the ratio.

    python bench/lm_eval_speed.py RUN_DIR [--docs 250] [--batch-size 8]

``RUN_DIR``: a finished job's folder (its ``merged/`` is evaluated); its base is saved once as a
transformers folder for the ``hf`` side.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
side, model_ref, tasks, batch = sys.argv[1:5]
from qalora import benchmarks
if side == "qalora":
    model, tok, what = benchmarks.open_model(model_ref, device="cpu")
    t = time.perf_counter()
    results = benchmarks.run(model, tok, ["bench_mc"], include_path=tasks, batch_size=int(batch))
else:
    from lm_eval import simple_evaluate
    t = time.perf_counter()  # lm-eval loads the folder itself; its load is timed too (as a user sees it)
    results = simple_evaluate(model="hf", model_args=f"pretrained={{model_ref}},dtype=float32,device=cpu",
                              tasks=["bench_mc"], task_manager=benchmarks.task_manager(tasks),
                              batch_size=int(batch))
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "acc": results["results"]["bench_mc"]["acc,none"],
                  "docs": results["results"]["bench_mc"]["sample_len"]}}))
"""


def _task(folder: Path, docs: int) -> int:
    from qalora.evaluation import benchmarks, multiple_choice as mc_eval

    questions = mc_eval.load_multiple_choice(mc_eval.BUILTIN_MC)
    rows = [questions[i % len(questions)] for i in range(docs)]
    benchmarks.write_choice_task(folder, "bench_mc", [vars(q) for q in rows])
    return sum(len(q.choices) for q in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--docs", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    run = Path(args.run_dir)
    base = json.loads((run / "report.json").read_text()).get("base", "default")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        requests = _task(tmp, args.docs)
        from qalora.models.model import load_base
        model, tok = load_base(base)
        model.save_pretrained(tmp / "base")
        tok.save_pretrained(tmp / "base")
        del model
        rows = []
        for side, ref, label in (("hf", tmp / "base", f"lm-eval `hf`, float32 base ({base})"),
                                 ("qalora", run, "`qalora eval --tasks`, merged low-bit model")):
            out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), side, str(ref), str(tmp),
                                  str(args.batch_size)], capture_output=True, text=True, check=True)
            rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
    hf_rate = requests / rows[0][1]["seconds"]
    print(f"{args.docs} documents, {requests} log-likelihood requests, batch {args.batch_size}, CPU\n")
    print("| model | accuracy | seconds | requests/s | s per 1,000 requests | vs hf |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows:
        rate = requests / r["seconds"]
        print(f"| {label} | {r['acc']:.3f} | {r['seconds']:.1f} | {rate:.1f} | {1000 / rate:.1f} | "
              f"{rate / hf_rate:.2f}x |")


if __name__ == "__main__":
    main()
