"""Load on ``python -m qalora serve`` over loopback: concurrent OpenAI clients, then overload.

The server runs as a user runs it (its own process, an API key, the runtime it picks: llama.cpp on
the run's GGUF file on a CPU), serving the default model quantized to 4 bits with its adapter
merged (``--model tiny``: the tests' 2-layer model). Then:

1. **load**: ``--clients`` clients (threads of the ``openai`` client, no retries) each send
   ``--requests`` chat requests in turn, alternately streamed and not, greedy, ``--max-tokens``
   tokens; every answer must equal the server's own greedy answer, whole. Reported: requests,
   failures, wrong answers, p50 / p99 / max latency, requests/s and tokens/s;
2. **overload**: the server restarted with ``--max-waiting 4``; ``--clients`` clients send one
   long request each at once: those past the bound get 503 with ``Retry-After`` at once, the others
   their answers; none hangs.

    python bench/serve_load.py [--model default|tiny] [--clients 16] [--requests 20] [--max-tokens 16]
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KEY = "bench-key"
MESSAGES = [{"role": "user", "content": "Make a contact card: Ana Ruiz, 41, lives in Porto."}]


def write_run(model: str, run: Path) -> Path:
    """A finished run folder: the base quantized (RTN 4-bit, group 32), a random adapter merged."""
    import torch

    from qalora.config import AdapterConfig, QuantConfig
    from qalora.deployment.export.native import save_quantized
    from qalora.method.merge import merge_adapters
    from qalora.models.model import inject_qalora, load_base, quantize_model

    base, tok = load_base("default" if model == "default" else "tiny-random")
    adapter = AdapterConfig(rank=8)
    inject_qalora(base, quantize_model(base, QuantConfig(4, 32), adapter.targets), adapter)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.01)
    save_quantized(merge_adapters(base, use_kernel=False), tok, run / "merged")
    return run


def start(run: Path, *extra: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "qalora", "serve", str(run), "--port", str(port),
                             "--api-key", KEY, *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    import openai
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    deadline = time.monotonic() + 300
    while True:
        try:
            client.models.list()
            return proc, port, client.models.list().data[0].id
        except openai.APIConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the server did not start:\n{proc.stdout.read()}")
            time.sleep(0.3)


def stop(proc) -> None:
    proc.terminate()
    proc.communicate(timeout=60)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def load(port: int, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    def client():
        return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=600)

    expected = client().chat.completions.create(model=model, messages=MESSAGES, temperature=0,
                                                max_tokens=max_tokens).choices[0].message.content
    latencies, wrong, failures, tokens = [], [], [], [0]
    lock = threading.Lock()

    def loop(i):
        c = client()
        for k in range(requests):
            t = time.perf_counter()
            try:
                if (i + k) % 2:
                    chunks = c.chat.completions.create(model=model, messages=MESSAGES, temperature=0,
                                                       max_tokens=max_tokens, stream=True,
                                                       stream_options={"include_usage": True})
                    text, used = "", 0
                    for chunk in chunks:
                        if chunk.choices:
                            text += chunk.choices[0].delta.content or ""
                        if chunk.usage:
                            used = chunk.usage.completion_tokens
                else:
                    reply = c.chat.completions.create(model=model, messages=MESSAGES, temperature=0,
                                                      max_tokens=max_tokens)
                    text, used = reply.choices[0].message.content, reply.usage.completion_tokens
            except Exception as exc:  # counted and shown, never hidden
                with lock:
                    failures.append(repr(exc)[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - t)
                tokens[0] += used
                if text != expected:
                    wrong.append(text)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    return {"requests": clients * requests, "ok": len(latencies), "failures": failures, "wrong": len(wrong),
            "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99), "max": max(latencies),
            "rps": len(latencies) / wall, "tps": tokens[0] / wall, "wall": wall}


def overload(port: int, model: str, clients: int) -> dict:
    import httpx

    results = []
    lock = threading.Lock()
    go = threading.Event()

    def one():
        go.wait()
        t = time.perf_counter()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=600,
                       headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": model, "messages": MESSAGES, "max_tokens": 128, "temperature": 0})
        with lock:
            results.append((r.status_code, time.perf_counter() - t, r.headers.get("retry-after")))

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for th in threads:
        th.start()
    go.set()
    for th in threads:
        th.join(timeout=900)
    busy = [r for r in results if r[0] == 503]
    answered = [r for r in results if r[0] == 200]
    return {"sent": clients, "returned": len(results), "answered": len(answered), "busy": len(busy),
            "busy_max_s": max((r[1] for r in busy), default=0.0), "answered_max_s": max((r[1] for r in answered),
                                                                                     default=0.0),
            "retry_after": sorted({r[2] for r in busy}), "other": sorted({r[0] for r in results} - {200, 503})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["default", "tiny"], default="default")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = write_run(args.model, Path(tmp) / "served")
        proc, port, model = start(run)
        try:
            r = load(port, model, args.clients, args.requests, args.max_tokens)
        finally:
            stop(proc)
        proc, port, model = start(run, "--max-waiting", "4")
        try:
            o = overload(port, model, args.clients)
        finally:
            stop(proc)
    print(f"\nLoad: {args.clients} concurrent clients x {args.requests} requests, half streamed, greedy, "
          f"{args.max_tokens} tokens each, {args.model} model, over loopback\n")
    print("| requests | answered whole and correct | failed | wrong | p50 latency | p99 latency | max | "
          "requests/s | tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {r['requests']} | {r['ok'] - r['wrong']} | {len(r['failures'])} | {r['wrong']} | {r['p50']:.2f} s | "
          f"{r['p99']:.2f} s | {r['max']:.2f} s | {r['rps']:.1f} | {r['tps']:.0f} |")
    print(f"\nOverload: --max-waiting 4, {args.clients} clients at once, 128 tokens each\n")
    print("| sent | returned | answered | 503 busy | slowest 503 | slowest answer | Retry-After | other statuses |")
    print("|---:|---:|---:|---:|---:|---:|---|---|")
    print(f"| {o['sent']} | {o['returned']} | {o['answered']} | {o['busy']} | {o['busy_max_s']:.2f} s | "
          f"{o['answered_max_s']:.2f} s | {', '.join(o['retry_after']) or '-'} | {o['other'] or '-'} |")
    if r["failures"]:
        print("\nfailures:", *r["failures"][:5], sep="\n")


if __name__ == "__main__":
    main()
