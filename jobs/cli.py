"""The jobs tier's command line: ``python -m jobs sweep``. The library's own commands are
``python -m qalora`` (:mod:`qalora.cli`); a sweep queues jobs, so it lives here, above the job store.
"""
from __future__ import annotations

import argparse
import logging
import sys

from qalora.errors import QALoRAError

from . import service
from .compare import markdown_table
from .confine import unconfined
from .worker import run_here


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="queue one job per combination of bits, group size, rank and learning rate "
                                     "(or run them here with --local); prints the comparison table")
    p.add_argument("--base", default="default", help="as for train")
    p.add_argument("--bits", default="4", help="comma-separated, e.g. 2,3,4")
    p.add_argument("--group-size", default="32", help="comma-separated, e.g. 32,64")
    p.add_argument("--rank", default="16", help="comma-separated, e.g. 8,16")
    p.add_argument("--lr", default="2e-4", help="comma-separated, e.g. 1e-4,3e-4")
    p.add_argument("--alpha-per-rank", type=float, default=2.0, help="LoRA alpha = this x rank (default 2)")
    p.add_argument("--quant-method", choices=["rtn", "gptq"], default="rtn")
    p.add_argument("--data", default="builtin:default", help="builtin:NAME, a dataset file or folder")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--exports", default="", help="also export each job: comma-separated of gguf,torchao,gptq,peft")
    p.add_argument("--name", default="", help="name prefix of the jobs and the sweep")
    p.add_argument("--devices", type=int, default=1, help="devices per job (data-parallel ranks)")
    p.add_argument("--local", action="store_true",
                   help="run the jobs one after another in this process (they are still recorded, so the app's "
                        "Compare tab shows them) instead of leaving them to the workers")


def cmd_sweep(args) -> dict:
    """Queue one job per combination (a sweep), optionally run them here, print the comparison."""
    grid = {"bits": args.bits, "group_size": args.group_size, "rank": args.rank, "lr": args.lr}
    rank0 = int(str(args.rank).split(",")[0])
    builtin = args.data.startswith("builtin:")
    with unconfined():  # the machine's own user: the form's checks, not its confinement
        plan = service.plan_sweep(grid, kind="built-in" if builtin else "path or name",
                                  builtin=args.data if builtin else None, upload=None,
                                  path=None if builtin else args.data, base=args.base, bits=4, group_size=32,
                                  method=args.quant_method, rank=rank0, alpha=args.alpha_per_rank * rank0,
                                  lr=2e-4, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                  name=args.name, exports=[f.strip() for f in args.exports.split(",") if f.strip()],
                                  devices=args.devices)
    print(plan.summary().replace("**", ""))
    sweep_id, ids = service.submit_sweep(plan, args.name)
    print(f"sweep {sweep_id}: queued jobs {', '.join(f'#{i}' for i in ids)}")
    if args.local:
        for job_id in ids:
            status = run_here(job_id)
            print(f"job #{job_id}: {status}", flush=True)
            if status not in ("succeeded", "failed", "canceled"):
                print("stopped; the sweep's other jobs stay queued for the workers")
                break
    else:
        print("the workers run them (python -m jobs.worker, or the app's own); compare them in the app's "
              "Compare tab, or run this again with --local")
    result = service.compare(ids)
    print(markdown_table(result))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _sweep_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from qalora.memory import limit_heap_retention
    limit_heap_retention()  # this process is ours: keep freed weight temporaries out of the heap
    try:
        {"sweep": cmd_sweep}[args.command](args)
    except QALoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
