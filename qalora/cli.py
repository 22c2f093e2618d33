"""Command line: ``python -m qalora train|chat|serve|export|eval``. The only library module that touches argv.

The library's own commands only: a sweep queues jobs, so it is the jobs tier's command
(``python -m jobs sweep``, :mod:`jobs.cli`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from qalora.config import AdapterConfig, QuantConfig, TrainConfig, preset_for
from qalora.data.hub import PAPER_DATASETS, parse_columns, resolve
from qalora.errors import ConfigError, QALoRAError


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="quantize a base, train QA-LoRA, merge exactly, save the low-bit model")
    p.add_argument("--base", default="default",
                   help="'default' (SmolLM2-135M-Instruct), 'tiny-random', a local dir, a .gguf file or a Hub id")
    p.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--quant-method", choices=["rtn", "gptq"], default="rtn")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clip search: per group, the range (and least-squares scale and offset) with the least "
                        "weight error instead of min-max (default: the bit width's preset)")
    p.add_argument("--train-scales", action=argparse.BooleanOptionalAction, default=None,
                   help="also train the quantization scales; the codes stay frozen and the merge stays exact "
                        "(default: the bit width's preset)")
    p.add_argument("--scales-lr", type=float, default=None, help="learning rate of the learned scales (preset)")
    p.add_argument("--scales-granularity", choices=["group", "channel"], default="group",
                   help="learn every per-group scale (default), or one factor per output row on them")
    p.add_argument("--data", default="builtin:default",
                   help="builtin:NAME, a .json/.jsonl/.csv/.parquet file or dataset folder, a Hub dataset "
                        "ID[:CONFIG][@SPLIT], or one of the paper's: " + ", ".join(f"paper:{n}" for n in PAPER_DATASETS))
    p.add_argument("--columns", default=None,
                   help="map the data's columns: prompt=COL,response=COL[,input=COL], or messages=COL, or text=COL")
    p.add_argument("--max-samples", type=int, default=None,
                   help="train on a sample of this many records, drawn with --seed (the paper: 320000 of FLAN v2)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--method", choices=["qalora", "qlora-ptq"], default="qalora",
                   help="qlora-ptq: the baseline (full-width LoRA, merged in 16 bits, quantized again)")
    p.add_argument("--rank", type=int, default=None, help="default: the bit width's preset")
    p.add_argument("--alpha", type=float, default=None, help="default: the preset's, or 2 x rank")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="default: the bit width's preset")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (one per GPU; gloo on the CPU): launches "
                        "torchrun itself; the global batch is batch-size x grad-accum x nproc")


def _chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="reply with a saved low-bit model (llama.cpp on a CPU where a GGUF is possible)")
    p.add_argument("model_dir", help="a run folder (train --out DIR, or a job's folder) or its merged/ folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=0.95)
    _runtime_argument(p)


def _runtime_argument(p) -> None:
    from qalora.deployment.runtime import PREFER

    p.add_argument("--runtime", choices=PREFER, default="auto",
                   help="auto: llama.cpp on the run's GGUF file on a CPU (written once if missing), else PyTorch")


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible API (/v1/chat/completions, /v1/completions) for a run")
    p.add_argument("run_dir", help="a run folder (train --out DIR, or a job's folder) or its merged/ folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-id", default=None, help="the model's name in the API (default: the run folder's name)")
    p.add_argument("--api-key", default=None,
                   help="clients must send 'Authorization: Bearer KEY' (default: $QALORA_API_KEY); required to "
                        "listen beyond loopback")
    p.add_argument("--no-auth", action="store_true", help="listen beyond loopback without an API key")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="requests that may wait for the model; more are answered 503 at once (default 32)")
    p.add_argument("--timeout", type=float, default=None, help="seconds one request may wait and generate (600)")
    _runtime_argument(p)


def _export_parser(sub) -> None:
    from qalora.deployment.export.formats import FORMATS

    p = sub.add_parser("export", help="write a finished run in another format (native, gguf, torchao, torchao-int4, gptq, peft)")
    p.add_argument("run_dir", help="a run folder (train --out DIR, or a job's folder) or its merged/ folder")
    p.add_argument("--format", choices=FORMATS, required=True,
                   help="native: copy; gguf: llama.cpp file (exact, Q4_1/F16); torchao: a folder stock "
                        "transformers loads (float zero points, bf16); gptq: gptqmodel/transformers "
                        "folder (integer zero points, cost measured); peft: PEFT LoRA adapter")
    p.add_argument("--out", default=None, help="destination (default: RUN_DIR/exports/...)")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss / perplexity or multiple-choice accuracy of a saved model "
                                    "(--data), or lm-evaluation-harness benchmarks (--tasks)")
    p.add_argument("model_dir", help="a run folder or its merged/ folder; with --tasks also a transformers model "
                                     "folder or a Hub id")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data",
                      help="builtin:contacts (held-out loss), builtin:contacts-mc (multiple choice), a "
                           "dataset file (loss), or an MMLU-style CSV / JSONL of questions (accuracy)")
    what.add_argument("--tasks", help="lm-eval task or group names, comma-separated (mmlu, hellaswag, arc_easy, "
                                      "...), or a preset: " + ", ".join(_benchmark_presets()))
    p.add_argument("--num-fewshot", type=int, default=None, help="--tasks: examples shown before each question "
                                                                  "(default: each task's own, a preset's)")
    p.add_argument("--include-path", default=None, help="--tasks: a folder of lm-eval task YAML files")
    p.add_argument("--output", default=None, help="--tasks: write lm-eval's results JSON here")
    p.add_argument("--k-shot", type=int, default=0, help="worked examples shown before each question")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many records/questions")
    p.add_argument("--scoring", choices=["letter", "text"], default=None,
                   help="multiple choice: score the answer letter or the choice text")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")


def cmd_export(args) -> dict:
    from qalora.deployment.export import export_run

    result = export_run(args.run_dir, args.format, args.out)
    print(json.dumps(result, indent=2))
    if args.format == "gptq":
        print(f"note: GPTQ stores integer zero points, so the merged float offsets were rounded; against "
              f"the exact model the max |logit difference| is {result['max_abs_logit_diff']:.3g} "
              f"(top-1 agreement {result['top1_agreement']:.1%}). The native export is exact; GGUF differs only by fp16 rounding.")
    return result


def _benchmark_presets() -> list[str]:
    from qalora.evaluation.benchmarks import PRESETS
    return list(PRESETS)


def cmd_benchmarks(args) -> dict:
    """``eval --tasks``: lm-evaluation-harness on the model as it deploys; prints one line per task."""
    from pathlib import Path

    from qalora.evaluation import benchmarks

    preset = benchmarks.PRESETS.get(args.tasks.strip())
    tasks = preset["tasks"] if preset else args.tasks.split(",")
    fewshot = args.num_fewshot if args.num_fewshot is not None else (preset or {}).get("num_fewshot")
    names = benchmarks.check_tasks(tasks, args.include_path)  # before loading any model
    model, tok, what = benchmarks.open_model(args.model_dir)
    print(f"evaluating the {what} on {', '.join(names)}" + (f", {fewshot}-shot" if fewshot is not None else ""))
    results = benchmarks.run(model, tok, names, num_fewshot=fewshot, limit=args.limit, include_path=args.include_path,
                             batch_size=args.batch_size)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    for task, score in benchmarks.scores(results).items():
        err = f" ± {score['stderr']:.4f}" if score["stderr"] is not None else ""
        print(f"{task}: {score['metric']} {score['value']:.4f}{err}")
    return results


def cmd_eval(args) -> dict:
    from qalora.evaluation.heldout import evaluate_dir
    from qalora.deployment.export import run_parts

    if args.tasks:
        return cmd_benchmarks(args)

    merged, _ = run_parts(args.model_dir)
    result = evaluate_dir(merged, args.data, k_shot=args.k_shot, limit=args.limit, scoring=args.scoring,
                          seq_len=args.seq_len, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif result["kind"] == "multiple_choice":
        print(f"accuracy {result['accuracy']:.1%} ({result['correct']}/{result['n']}), {args.k_shot}-shot, "
              f"on {args.data}")
    else:
        print(f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f} over {result['examples']} "
              f"examples of {args.data}")
    return result


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Run this same ``train`` command under ``torchrun --nproc-per-node nproc`` (this machine)."""
    import subprocess

    rest, skip = [], False
    for arg in argv:  # the same arguments, less --nproc
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "qalora", *rest]
    print("launching: " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def with_preset(args) -> dict:
    """The run's lr, rank, alpha, clip search and learned scales: what the command line gave, the rest
    from the preset for ``--bits`` (``qalora.config.preset_for``); says on stderr what it took."""
    preset = preset_for(args.bits)
    given = {"lr": args.lr, "rank": args.rank, "alpha": args.alpha, "clip": args.clip,
             "train_scales": args.train_scales, "scales_lr": args.scales_lr}
    if args.method != "qalora":  # the baseline has no scales to learn; its lr, rank and alpha as given
        preset["train_scales"] = False
    if given["rank"] is not None and given["alpha"] is None:
        given["alpha"] = 2.0 * given["rank"]
    chosen = {k: preset[k] if v is None else v for k, v in given.items()}
    taken = [k for k, v in given.items() if v is None]
    if taken:
        print(f"using the {args.bits}-bit preset for " + ", ".join(f"{k.replace('_', '-')} {chosen[k]}"
                                                                    for k in taken), file=sys.stderr)
    return chosen


def cmd_train(args) -> dict | None:
    from qalora.training.finetune import finetune

    data, columns, max_samples = resolve(args.data, parse_columns(args.columns), args.max_samples)

    chosen = with_preset(args)
    quant = QuantConfig(bits=args.bits, group_size=args.group_size, method=args.quant_method, clip=chosen["clip"])
    adapter = AdapterConfig(rank=chosen["rank"], alpha=chosen["alpha"], dropout=args.dropout, method=args.method,
                            train_scales=chosen["train_scales"], scales_lr=chosen["scales_lr"],
                            scales_granularity=args.scales_granularity)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=chosen["lr"],
                        warmup_steps=min(args.warmup_steps, args.steps), schedule=args.schedule,
                        grad_accum=args.grad_accum, grad_checkpointing=args.grad_checkpointing,
                        eval_every=args.eval_every, save_every=args.save_every, seed=args.seed, dtype=args.dtype)
    from tqdm.auto import tqdm

    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 shows the progress
    with tqdm(total=train.steps, desc="train", unit="step", disable=None if main else True) as bar:
        def on_step(info):
            bar.n = info.step
            bar.set_postfix(loss=f"{info.loss:.3f}", tok_s=f"{info.tokens_per_s:.0f}")
        report = finetune(args.base, data, args.out, quant, adapter, train, resume=args.resume,
                          on_step=on_step, on_stage=lambda s: logging.getLogger("qalora").info("stage: %s", s),
                          columns=columns, max_samples=max_samples)
    if report is None:  # a rank other than 0 of a torchrun: rank 0 writes and prints
        return None
    keys = ("eval_loss_quantized_base", "eval_loss_adapter", "eval_loss_merged", "merge_max_abs_logit_diff",
            "tokens_per_s", "world_size", "global_batch", "peak_rss_mb", "peak_gpu_mb", "device", "wall_s")
    print(json.dumps({k: report[k] for k in keys if report.get(k) is not None}, indent=2))
    print(f"saved the merged {quant.bits}-bit model to {args.out}/merged and the report to {args.out}/report.json")
    return report


def cmd_chat(args) -> str:
    from qalora.deployment.runtime import open_runtime

    runtime = open_runtime(args.model_dir, prefer=args.runtime)  # QALORA_DEVICE picks the device
    print(f"answered by: {runtime.name} ({runtime.reason})", file=sys.stderr)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    shown = ""
    for text in runtime.stream_chat(messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p):
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    return shown


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args) -> None:
    import uvicorn

    from qalora.deployment.export import run_parts
    from qalora.deployment.runtime import open_runtime
    from qalora.deployment.serve import build_app

    from qalora.deployment.serve import MAX_WAITING, TIMEOUT_S

    api_key = args.api_key or os.environ.get("QALORA_API_KEY") or None
    if not api_key and not args.no_auth and args.host not in LOOPBACK:
        raise ConfigError(f"--host {args.host} makes the model reachable from other machines, and no API key is "
                          "set: give --api-key KEY (or QALORA_API_KEY) and send it as 'Authorization: Bearer KEY', "
                          "or pass --no-auth to serve without one.")
    merged, _ = run_parts(args.run_dir)
    model_id = args.model_id or (merged.parent.name if merged.name == "merged" else merged.name)
    runtime = open_runtime(merged, prefer=args.runtime)
    print(f"serving {model_id!r} with {runtime.name} ({runtime.reason}) at http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    app = build_app(runtime, model_id, api_key=api_key,
                    max_waiting=MAX_WAITING if args.max_waiting is None else args.max_waiting,
                    timeout_s=TIMEOUT_S if args.timeout is None else args.timeout)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qalora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _chat_parser(sub)
    _serve_parser(sub)
    _export_parser(sub)
    _eval_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train" and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args.nproc, list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # torchao (imported by transformers and gptqmodel) logs every optional GPU kernel it cannot load
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from qalora.memory import limit_heap_retention
    limit_heap_retention()  # this process is ours: keep freed weight temporaries out of the heap
    try:
        commands = {"train": cmd_train, "chat": cmd_chat, "serve": cmd_serve, "export": cmd_export, "eval": cmd_eval}
        commands[args.command](args)
    except QALoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
