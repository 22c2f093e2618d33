"""Does the job database ever stall the UI? One process streams metric rows the way a worker
does (one transaction per training step), while another polls through ``jobs.service`` the
way the UI's timer does; prints write throughput and the poll latencies.

    python bench/job_queue.py                  # 10,000 rows into a fresh SQLite file
    python bench/job_queue.py --rows 2000 --poll-every 0.2
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _writer(home: str, job_id: int, rows: int, go, done, out) -> None:
    os.environ["QALORA_HOME"] = home
    sys.path.insert(0, str(ROOT))
    from storage import db, repo

    go.wait()
    t0 = time.perf_counter()
    for step in range(1, rows + 1):
        with db() as s:
            repo.record_step(s, job_id, "bench", step=step, train_loss=1.0 / step, eval_loss=None, lr=2e-4,
                             tokens_per_s=1e4, elapsed_s=step * 0.01, eta_s=(rows - step) * 0.01)
    out.put(time.perf_counter() - t0)
    done.set()


def _poller(home: str, job_id: int, poll_every: float, go, done, out) -> None:
    os.environ["QALORA_HOME"] = home
    sys.path.insert(0, str(ROOT))
    from jobs import service

    service.list_jobs()  # connect before the clock starts
    go.wait()
    latencies, seen = [], 0
    while True:
        finished = done.is_set()  # read before polling, so the last poll sees every row
        t0 = time.perf_counter()
        job = service.get_job(job_id, metrics_after=seen)  # incremental, as the UI's chart does
        service.list_jobs(limit=50)
        latencies.append(time.perf_counter() - t0)
        seen = job["metrics"][-1]["step"] if job["metrics"] else seen
        if finished:
            break
        time.sleep(poll_every)
    out.put((latencies, seen))


def run(rows: int, poll_every: float, home: str) -> dict:
    os.environ["QALORA_HOME"] = home
    sys.path.insert(0, str(ROOT))
    from storage import db, repo

    with db() as s:
        job_id = repo.create_job(s, name="bench", spec={}, total_steps=rows)
        repo.claim(s, "bench", job_id)
    ctx = mp.get_context("spawn")
    go, done, w_out, p_out = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(home, job_id, rows, go, done, w_out)),
             ctx.Process(target=_poller, args=(home, job_id, poll_every, go, done, p_out))]
    for p in procs:
        p.start()
    time.sleep(2.0)  # let both processes import and connect
    go.set()
    write_s = w_out.get()
    latencies, seen = p_out.get()
    for p in procs:
        p.join()
    latencies_ms = sorted(x * 1000 for x in latencies)
    return {"rows": rows, "write_s": write_s, "rows_per_s": rows / write_s, "polls": len(latencies_ms),
            "poll_median_ms": statistics.median(latencies_ms),
            "poll_p99_ms": latencies_ms[min(len(latencies_ms) - 1, int(0.99 * len(latencies_ms)))],
            "poll_max_ms": latencies_ms[-1], "rows_seen_by_poller": seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--poll-every", type=float, default=0.05, help="seconds between polls (UI: ~1)")
    parser.add_argument("--home", default=None, help="QALORA_HOME to use (default: a fresh temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(args.rows, args.poll_every, args.home or tmp)
    print(f"{'metric rows written':<24}{r['rows']:>12,}")
    print(f"{'write time (s)':<24}{r['write_s']:>12.2f}")
    print(f"{'write rows/s':<24}{r['rows_per_s']:>12,.0f}")
    print(f"{'polls':<24}{r['polls']:>12,}")
    print(f"{'poll median (ms)':<24}{r['poll_median_ms']:>12.2f}")
    print(f"{'poll p99 (ms)':<24}{r['poll_p99_ms']:>12.2f}")
    print(f"{'poll max (ms)':<24}{r['poll_max_ms']:>12.2f}")
    print(f"{'rows seen by poller':<24}{r['rows_seen_by_poller']:>12,}")


if __name__ == "__main__":
    main()
