"""Runtimes: which one answers where, and that llama.cpp and PyTorch give the same model's replies.

Both runtimes feed the same prompt ids (``encode_prompt``) and decode with the same tokenizer, so
they can differ only through the computation. On the tiny random model (top-2 logit margins of
0.1-0.3 against logits up to 3-4) greedy replies drift apart after a few tokens, so the tiny test
is teacher-forced: every token llama.cpp picks must be our exact model's argmax or trail it by at
most twice llama.cpp's logit deviation (2.7% of the largest logit on this fixture, measured in
test_export_gguf.py: fp16 scales and offsets, Q8_1 activations). Measured over 40 tokens for
seeds 0-3: 37-40 argmax agreements, largest gap 1.9% of the largest logit. On SmolLM2 the greedy
replies themselves agree (slow test; measured on five prompts: four identical to the end, one
apart from token 4).
"""
import itertools

import pytest
import torch

from helpers import default_qalora, tiny_qalora
from qalora.errors import ModelError
from qalora.deployment.export.native import load_quantized, save_quantized
from qalora.deployment.generate import chat as generate_reply
from qalora.method.merge import merge_adapters
from qalora.deployment.runtime import open_runtime
from qalora.deployment.runtime.base import ContextError
from qalora.deployment.runtime.llamacpp import dispatch as llamacpp_dispatch
from qalora.deployment.runtime.pytorch import _pick

MESSAGES = [{"role": "user", "content": "contact card -> Hana lives in Oslo."}]
TOKENS = 40
LLAMA_CPP_DEVIATION = 0.027  # of the largest logit, tiny fixture (test_export_gguf.py)
MIN_ARGMAX_AGREEMENT = 0.9


def make_run(path, **kwargs):
    model, tok = tiny_qalora(**kwargs)
    save_quantized(merge_adapters(model, use_kernel=False), tok, path / "merged")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("rt") / "run")


@pytest.fixture(scope="module")
def llama_rt(run):
    rt = open_runtime(run)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def torch_rt(run):
    return open_runtime(run, prefer="pytorch")


def test_cpu_runs_llama_cpp_on_the_runs_gguf_export_written_once(tmp_path):
    run = make_run(tmp_path / "run")
    first = open_runtime(run)
    path = run / "exports" / "model-q4_1.gguf"
    assert first.name == "llama.cpp (GGUF Q4_1)" and first.path == path and path.read_bytes()[:4] == b"GGUF"
    assert first.reason == "CPU, with the run's GGUF export exports/model-q4_1.gguf (written for this chat)"
    stamp = path.stat().st_mtime_ns
    second = open_runtime(run / "merged")  # the merged folder names the same run
    assert second.path == path and path.stat().st_mtime_ns == stamp and "written" not in second.reason
    assert not list((run / "exports").glob(".partial-*"))
    first.close(), second.close()


def test_pytorch_answers_where_no_gguf_is_possible_or_on_cuda(tmp_path, run):
    run16 = make_run(tmp_path / "g16", group_size=16)
    rt = open_runtime(run16)
    assert rt.name == "PyTorch (dequantize + matmul)"  # group 16 has no CPU int4 kernel either
    assert rt.reason == ("merged model on the CPU; not llama.cpp: group size 16 is not a multiple of 32, so no "
                         "GGUF Q4_1 file holds this model exactly")
    assert not (run16 / "exports").exists()
    with pytest.raises(ModelError, match="the llama.cpp runtime cannot run this model here: not llama.cpp: "
                                         "group size 16"):
        open_runtime(run16, prefer="llama.cpp")
    # on a GPU llama.cpp steps aside before loading anything (the device is only compared)
    assert llamacpp_dispatch(run / "merged", torch.device("cuda")) == \
        "llama-cpp-python runs on the CPU here and the device is cuda"
    assert open_runtime(run, prefer="pytorch").name == "PyTorch int4 kernel"


def test_pytorch_runtime_streams_exactly_what_generate_returns(run, torch_rt):
    model, tok = load_quantized(run / "merged", dtype=torch.bfloat16)  # as the runtime loads it
    want = generate_reply(model, tok, MESSAGES, max_new_tokens=TOKENS)
    texts = list(torch_rt.stream_chat(MESSAGES, max_new_tokens=TOKENS))
    assert texts[-1] == want and len(texts) > 5
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(texts[:-2], texts[1:-1]))


def test_llama_cpp_greedy_tokens_are_our_models_argmax_within_its_rounding(run, llama_rt):
    ids = llama_rt.chat_ids(MESSAGES)
    tokens = llama_rt._tokens(ids, TOKENS, 0.0, 1.0, None)
    picked = list(itertools.islice(tokens, TOKENS))
    tokens.close()
    reference, _ = load_quantized(run / "merged", use_kernel=False)  # exact fp32 path
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([ids + picked])).logits[0, len(ids) - 1:-1]
    gap = logits.max(-1).values - logits[torch.arange(TOKENS), picked]
    assert (gap == 0).float().mean() >= MIN_ARGMAX_AGREEMENT, gap
    assert gap.max() <= 2 * LLAMA_CPP_DEVIATION * logits.abs().max()


def test_lengths_end_ids_and_stop_strings(llama_rt, torch_rt):
    for rt in (llama_rt, torch_rt):
        ids = rt.chat_ids(MESSAGES)
        full = rt.generate(ids, max_new_tokens=12)
        assert (full.prompt_tokens, full.completion_tokens, full.finish_reason) == (len(ids), 12, "length")
        greedy = list(itertools.islice(rt._tokens(ids, 12, 0.0, 1.0, None), 12))
        assert full.text == rt.tokenizer.decode(greedy, skip_special_tokens=True)
        rt.end_ids.add(greedy[3])  # the fourth token now ends the reply
        try:
            ended = rt.generate(ids, max_new_tokens=12)
        finally:
            rt.end_ids.discard(greedy[3])
        assert (ended.completion_tokens, ended.finish_reason) == (3, "stop")
        assert ended.text == rt.tokenizer.decode(greedy[:3], skip_special_tokens=True)
        stop = full.text[4:6]
        streamed = list(rt.stream(ids, max_new_tokens=12, stop=[stop]))
        cut = streamed[-1]
        assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"
        assert all(cut.text.startswith(g.text) for g in streamed)  # nothing shown is taken back
        with pytest.raises(ContextError, match=f"maximum context length is 512 tokens, but the prompt has "
                                               f"{len(ids)} and 500 more"):
            rt.generate(ids, max_new_tokens=500)


def test_sampling_keeps_the_top_p_nucleus_and_a_seed_repeats_the_reply(llama_rt, torch_rt):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    g = torch.Generator().manual_seed(0)
    assert {_pick(logits, 1.0, 0.6, g) for _ in range(200)} == {0, 1}  # 0.5 + 0.3 covers 0.6
    assert {_pick(logits, 1.0, 1.0, g) for _ in range(400)} == {0, 1, 2, 3}
    assert {_pick(logits * 50, 0.01, 1.0, g) for _ in range(50)} == {0}  # a low temperature is near greedy
    for rt in (llama_rt, torch_rt):
        ids = rt.chat_ids(MESSAGES)
        sampled = [rt.generate(ids, max_new_tokens=12, temperature=1.0, seed=seed).text for seed in (7, 7, 8)]
        assert sampled[0] == sampled[1] != sampled[2]


@pytest.mark.slow
def test_default_model_greedy_replies_agree_between_runtimes(tmp_path):
    model, tok = default_qalora()
    save_quantized(merge_adapters(model, use_kernel=False), tok, tmp_path / "run" / "merged")
    del model
    llama_rt, torch_rt = open_runtime(tmp_path / "run"), open_runtime(tmp_path / "run", prefer="pytorch")
    assert (llama_rt.name, torch_rt.name) == ("llama.cpp (GGUF Q4_1)", "PyTorch int4 kernel")
    for prompt in ("What is the capital of France? Answer in one sentence.", "Write a haiku about the sea.",
                   "Make a contact card: Ana is 30 and lives in Rome."):
        messages = [{"role": "user", "content": prompt}]
        a, b = llama_rt.chat(messages, max_new_tokens=64), torch_rt.chat(messages, max_new_tokens=64)
        assert a == b and a.completion_tokens >= 6, (a, b)
    llama_rt.close()
