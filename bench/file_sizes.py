"""What the files cost: the merged default model's native folder and GGUF file at each bit width and
group size, against the 16-bit model and the Q4_1 GGUF file the studio starts from, and llama.cpp's
decode speed on our GGUF against that file's, side by side.

Each model is built as a job builds it (RTN, the adapter merged into the offsets; a file's size and
speed do not depend on what the adapter learned). Sizes are bytes on disk (the native folder: its
weights, config and tokenizer); bits per parameter are over the whole file and the 16-bit model's
parameter count. Decode: batch 1, the same prompt, greedy, ``--new-tokens`` new tokens, prompt
included, the same threads; the base file and ours alternate ``--rounds`` times and each keeps its
best (the machine's noise falls on both).

    python bench/file_sizes.py [--bits 2 3 4] [--group-size 32 64] [--new-tokens 128] [--repeats 3] [--rounds 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def folder_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (the low-bit sweep measures its folders the same way)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--group-size", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    import torch

    from decode import PROMPT, llama_cpp_tokens_per_s, merged_int4
    from qalora.deployment.export.formats import gguf_fits
    from qalora.deployment.export.gguf import export_gguf
    from qalora.deployment.export.native import save_quantized
    from qalora.deployment.generate import chat_input_ids
    from qalora.models.model import count_model_params, default_gguf_path, load_base

    base, tok = load_base("default", dtype=torch.float32)
    work = Path(tempfile.mkdtemp(prefix="qalora-sizes-"))
    source = default_gguf_path()
    rows, params = [], None
    for bits in args.bits:
        for group in args.group_size:
            model = merged_int4(base, False, compute_dtype=None, bits=bits, group=group)
            params = count_model_params(model)
            native = save_quantized(model, tok, work / f"{bits}-{group}" / "merged")
            gguf = export_gguf(native, work / f"{bits}-{group}.gguf") if gguf_fits(bits, group) else None
            rows.append((bits, group, folder_bytes(native), gguf))
            del model
    print(f"\nFiles of the merged SmolLM2-135M ({params:,} parameters; 16-bit model {2 * params / 1e6:.0f} MB; "
          f"the Q4_1 file the studio starts from {source.stat().st_size / 1e6:.1f} MB)")
    four = {g: n for b, g, n, _ in rows if b == 4}
    print("| bits | group | native MB | native bits/param | vs 4-bit native | GGUF MB | GGUF bits/param | "
          "GGUF vs the base's Q4_1 file |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for bits, group, native, gguf in rows:
        g = gguf.stat().st_size if gguf else None
        vs4 = f"{native / four[group]:.2f}x" if group in four else "–"
        file = f"{g / 1e6:.1f} | {8 * g / params:.2f} | {g / source.stat().st_size:.2f}x" if g else "– | – | –"
        print(f"| {bits} | {group} | {native / 1e6:.1f} | {8 * native / params:.2f} | {vs4} | {file} |")
    ours = next((gguf for b, g, _, gguf in rows if b == 4 and g == 32), None)
    if ours is None:
        return
    prompt = chat_input_ids(tok, PROMPT)[0].tolist()
    best = {"base": 0.0, "ours": 0.0}
    for _ in range(args.rounds):
        for key, path in (("base", source), ("ours", ours)):
            best[key] = max(best[key], llama_cpp_tokens_per_s(path, prompt, args.new_tokens, args.repeats)[0])
    print(f"\nllama.cpp decode, batch 1, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, best of "
          f"{args.rounds} x {args.repeats} alternating runs")
    print("| file | MB | tokens/s | vs the base's file |")
    print("|---|---:|---:|---:|")
    print(f"| the base's own Q4_1 file ({source.name}) | {source.stat().st_size / 1e6:.1f} | {best['base']:.1f} | 1.00x |")
    print(f"| our 4-bit group-32 GGUF (merged QA-LoRA) | {ours.stat().st_size / 1e6:.1f} | {best['ours']:.1f} | "
          f"{best['ours'] / best['base']:.2f}x |")
    import shutil
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
