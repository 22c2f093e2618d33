"""Scale-out, measured: how fast workers claim jobs from one queue, and one job's training on 1 and 2 processes.

    python bench/scale.py [--jobs 600] [--train-steps 8] [--base default] [--skip-train]

Claims: ``--jobs`` queued jobs; 1, 2 and 4 worker processes race to claim them with
``storage.repo.claim`` (one transaction each, as the worker does), on SQLite (the file in
QALORA_HOME) and on a throwaway PostgreSQL server (Debian's package, as the tests start it).
Every job must be claimed exactly once; the table gives claims per second over the whole race
and the 99th-percentile latency of one claim.

Training: ``python -m qalora train --nproc N`` on the base for ``--train-steps`` steps, batch 4 per
process (so the global batch doubles with 2), gloo on this CPU. The table states the cores: on a
2-core machine two processes share the same cores, so the ratio reads as overhead, not speed-up.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _claimer(env: dict, name: str, start, out) -> None:
    os.environ.update(env)
    from storage import db, repo

    claimed, latencies = [], []
    with db():
        pass  # connect (and migrate) before the race starts
    start.wait()
    while True:
        t0 = time.perf_counter()
        with db() as s:
            job_id = repo.claim(s, name)
        latencies.append(time.perf_counter() - t0)
        if job_id is None:
            break
        claimed.append(job_id)
    out.put((name, claimed, latencies[:-1]))


def claim_race(env: dict, jobs: int, workers: int) -> dict:
    os.environ.update(env)
    from storage import db, get_engine, get_settings, repo

    with db() as s:
        for _ in range(jobs):
            repo.create_job(s, name="bench", spec={"base": "tiny-random"}, total_steps=1)
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(env, f"bench-host:{i}:w", start, out)) for i in range(workers)]
    for p in procs:
        p.start()
    time.sleep(3.0)  # every claimer imported and connected
    t0 = time.perf_counter()
    start.set()
    results = [out.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    ids = [i for _, claimed, _ in results for i in claimed]
    latencies = sorted(x for _, _, lat in results for x in lat)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    get_engine(get_settings().db_url).dispose()
    return {"claimed": len(ids), "double": len(ids) - len(set(ids)), "lost": jobs - len(set(ids)),
            "claims_per_s": len(ids) / wall, "p99_ms": p99 * 1000}


def train_rate(base: str, steps: int, nproc: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "qalora", "train", "--base", base, "--out", str(out), "--steps", str(steps),
           "--batch-size", "4", "--seq-len", "256", "--eval-every", str(steps), "--save-every", str(steps),
           "--warmup-steps", "1", "--nproc", str(nproc)]
    env = {**os.environ, "QALORA_DEVICE": "cpu", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    report = json.loads((out / "report.json").read_text())
    return {"tokens_per_s": report["tokens_per_s"], "global_batch": report["global_batch"],
            "world_size": report["world_size"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--base", default="default")
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()

    import pg

    rows = []
    with tempfile.TemporaryDirectory() as tmp, pg.server() as pg_url:
        for backend in ("sqlite", "postgresql"):
            for workers in (1, 2, 4):
                home = Path(tmp) / f"{backend}-{workers}"
                env = {"QALORA_HOME": str(home)}
                if backend == "postgresql":
                    env["QALORA_DB_URL"] = pg.create_database(pg_url)
                else:
                    os.environ.pop("QALORA_DB_URL", None)
                r = claim_race(env, args.jobs, workers)
                rows.append((backend, workers, r))
                print(f"{backend} x{workers}: {r}", file=sys.stderr, flush=True)
                os.environ.pop("QALORA_DB_URL", None)
    print(f"\nClaims: {args.jobs} queued jobs, N worker processes racing ({os.cpu_count()} CPU cores)\n")
    print("| database | workers | claims/s | p99 claim latency (ms) | double claims | lost |")
    print("|---|---|---|---|---|---|")
    for backend, workers, r in rows:
        print(f"| {backend} | {workers} | {r['claims_per_s']:.0f} | {r['p99_ms']:.1f} | {r['double']} | {r['lost']} |")
    if args.skip_train:
        return
    with tempfile.TemporaryDirectory() as tmp:
        one = train_rate(args.base, args.train_steps, 1, Path(tmp) / "one")
        two = train_rate(args.base, args.train_steps, 2, Path(tmp) / "two")
    print(f"\nTraining one job on {args.base}, {args.train_steps} steps, batch 4 per process, seq 256, gloo "
          f"({os.cpu_count()} CPU cores shared by the processes)\n")
    print("| processes | global batch | tokens/s | vs 1 process |")
    print("|---|---|---|---|")
    for r in (one, two):
        print(f"| {r['world_size']} | {r['global_batch']} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
