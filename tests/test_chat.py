"""Chat: one model per side kept between turns, freed on switch; streamed replies match each runtime's."""
import gc
import threading
import time
import weakref
from types import SimpleNamespace

import pytest

from jobs import chat
from qalora.deployment.export.native import save_quantized
from qalora.deployment.generate import chat as generate_reply
from qalora.method.merge import merge_adapters
from tests.helpers import tiny_qalora

MAX_NEW = 12
MESSAGES = [{"role": "user", "content": "contact card -> Hana lives in Oslo."}]


class _Model:
    """Stands in for a loaded model: only identity and lifetime matter to the slot."""


def test_slot_keeps_the_model_between_turns_and_frees_it_on_switch():
    loads = []

    def loader(key):
        loads.append(key)
        return _Model(), f"tokenizer-{key}"

    slot = chat.ModelSlot(loader)
    first, tok = slot.get("a")
    assert slot.get("a")[0] is first and tok == "tokenizer-a" and loads == ["a"]
    gone = weakref.ref(first)
    del first
    second, _ = slot.get("b")
    gc.collect()
    assert gone() is None  # the previous model was released before (not after) loading the next
    assert loads == ["a", "b"] and slot.key == "b"
    slot.unload()
    assert slot.key is None
    slot.get("b")
    assert loads == ["a", "b", "b"]


def test_a_failed_load_leaves_the_slot_empty():
    def loader(key):
        if key == "broken":
            raise OSError("no such model")
        return _Model(), None

    slot = chat.ModelSlot(loader)
    slot.get("ok")
    with pytest.raises(OSError):
        slot.get("broken")
    assert slot.key is None


def test_messages_are_built_from_gradio_history_with_system_prompt():
    history = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "!"}]}]
    assert chat.build_messages(history, "again", "  Be brief. ") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "again"}]
    assert chat.build_messages([], "x", "") == [{"role": "user", "content": "x"}]


@pytest.fixture
def merged_dir(tmp_path):
    model, tok = tiny_qalora(seed=3)
    return str(save_quantized(merge_adapters(model), tok, tmp_path / "merged"))


def test_side_by_side_streams_both_models_and_ends_with_their_greedy_replies(merged_dir):
    from qalora.models.model import load_base
    from qalora.deployment.runtime import open_runtime

    try:
        updates = list(chat.stream_side_by_side({"tuned": (merged_dir, MESSAGES), "base": ("tiny-random", MESSAGES)},
                                                max_new_tokens=MAX_NEW))
        assert chat.loaded_models() == {"tuned": merged_dir, "base": "tiny-random"}
        # on a CPU the fine-tuned model answers in llama.cpp, from the GGUF export beside its run
        assert chat.runtime_of("tuned") == {"name": "llama.cpp (GGUF Q4_1)", "reason": (
            "CPU, with the run's GGUF export exports/model-q4_1.gguf (written for this chat)")}
        assert chat.runtime_of("base") == {"name": "PyTorch (float32)", "reason": "float base model on cpu"}
    finally:
        for side in chat.SIDES:
            chat.slot(side).unload()
    for side in chat.SIDES:
        texts = [u[side] for u in updates if u[side] is not None]  # None: still loading
        assert texts[-1] and all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # each update extends it
    base_model, base_tok = load_base("tiny-random")
    tuned = open_runtime(merged_dir)
    assert updates[-1]["tuned"] == tuned.chat(MESSAGES, max_new_tokens=MAX_NEW).text
    tuned.close()
    assert updates[-1]["base"] == generate_reply(base_model, base_tok, MESSAGES, max_new_tokens=MAX_NEW)
    assert updates[-1]["tuned"] != updates[-1]["base"]  # the adapter changed the model


def test_side_by_side_takes_turns_so_both_replies_grow_together(monkeypatch):
    pieces = {"tuned": ["T", "Tu", "Tun"], "base": ["B", "Ba"]}
    monkeypatch.setattr(chat, "stream_reply", lambda side, key, messages, **gen: iter(pieces[side]))
    monkeypatch.setattr(chat, "slot", lambda side: SimpleNamespace(get=lambda key: None))
    updates = list(chat.stream_side_by_side({"tuned": ("k1", MESSAGES), "base": ("k2", MESSAGES)}))
    both = [u for u in updates if None not in u.values()]  # loads are threads: either may end first
    assert both[-1] == {"tuned": "Tun", "base": "Ba"}
    assert {"tuned": "Tu", "base": "Ba"} in both or {"tuned": "Tun", "base": "B"} in both  # interleaved


def test_the_quick_side_streams_its_whole_reply_while_the_other_still_loads(monkeypatch):
    """Before: both models were loaded before either answered, so the fine-tuned reply (1 s alone)
    waited for the base (18.7 s to load) with nothing on screen."""
    tuned_done = threading.Event()

    def tuned_reply():
        yield from ("T", "Tu", "Tun")
        tuned_done.set()

    def get(side, key):
        if side == "base":
            tuned_done.wait(timeout=5)  # the base loads until the fine-tuned reply has ended
            time.sleep(0.3)  # and a little longer: the wait is shown
    monkeypatch.setattr(chat, "stream_reply", lambda side, key, messages, **gen: (
        tuned_reply() if side == "tuned" else iter(["B", "Ba"])))
    monkeypatch.setattr(chat, "slot", lambda side: SimpleNamespace(get=lambda key: get(side, key)))
    t0 = time.monotonic()
    updates = list(chat.stream_side_by_side({"tuned": ("k1", MESSAGES), "base": ("k2", MESSAGES)}, poll_s=0.1))
    assert time.monotonic() - t0 < 4  # nobody waited for the 5 s timeout
    tuned_alone = [u["tuned"] for u in updates if u["base"] is None]
    assert tuned_alone[-1] == "Tun"  # the whole fine-tuned reply came while the base was loading
    assert updates[-2:] == [{"tuned": "Tun", "base": "B"}, {"tuned": "Tun", "base": "Ba"}]
    assert sum(u == {"tuned": "Tun", "base": None} for u in updates) >= 1  # the wait itself is reported


def test_a_side_that_fails_to_load_raises_after_the_other_side_has_answered(monkeypatch):
    def get(side, key):
        if side == "base":
            time.sleep(0.3)
            raise OSError("no such model")
    monkeypatch.setattr(chat, "stream_reply", lambda side, key, messages, **gen: iter(["T", "Tu"]))
    monkeypatch.setattr(chat, "slot", lambda side: SimpleNamespace(get=lambda key: get(side, key)))
    seen = []
    with pytest.raises(OSError, match="no such model"):
        for update in chat.stream_side_by_side({"tuned": ("k1", MESSAGES), "base": ("k2", MESSAGES)}, poll_s=0.05):
            seen.append(update)
    assert seen[-1] == {"tuned": "Tu", "base": None}


@pytest.mark.slow  # needs the embedded default model
def test_a_gguf_base_answers_side_by_side_in_llama_cpp_from_its_own_file():
    """Before: the base always ran as a float model in PyTorch (18.7 s to load the default base,
    against llama.cpp Q4_1 on the other side)."""
    runtime = chat._load_base("default")
    try:
        assert runtime.name == "llama.cpp (GGUF Q4_1)"  # read from the file's general.file_type
        assert runtime.reason == "CPU, with the base's own GGUF file SmolLM2-135M-Instruct.Q4_1.gguf"
        reply = runtime.chat(MESSAGES, max_new_tokens=MAX_NEW)
        ids = runtime.chat_ids(MESSAGES)
    finally:
        runtime.close()
    # what stock llama.cpp says on the user's file, fed the same prompt ids, greedy
    import llama_cpp

    from qalora.models.model import default_gguf_path
    stock = llama_cpp.Llama(str(default_gguf_path()), n_ctx=512, verbose=False)
    try:
        expected = stock.create_completion(ids, max_tokens=MAX_NEW, temperature=0.0, top_k=1, repeat_penalty=1.0)
    finally:
        stock.close()
    assert reply.text and reply.text == expected["choices"][0]["text"]


def test_generation_settings_are_checked():
    with pytest.raises(ValueError, match="max new tokens=0 must be between 1 and 4096"):
        next(chat.stream_reply("base", "tiny-random", MESSAGES, max_new_tokens=0))
    with pytest.raises(ValueError, match="temperature must be in"):
        next(chat.stream_reply("base", "tiny-random", MESSAGES, temperature=3.0))
    with pytest.raises(ValueError, match="chat side 'left' is unknown"):
        chat.slot("left")


@pytest.mark.slow  # needs the embedded default model
def test_the_first_side_by_side_turn_of_a_fresh_process_loads_both_models(merged_dir):
    """Regression: the two load threads resolved transformers' lazy names at once and the first
    turn after a start failed with "cannot import name 'AutoTokenizer'" (every time, on the
    default base)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import json; from jobs import chat; "
            "u = list(chat.stream_side_by_side({'tuned': (%r, %r), 'base': ('default', %r)}, max_new_tokens=4)); "
            "print(json.dumps([u[-1], chat.runtime_of('base')['name']]))" % (merged_dir, MESSAGES, MESSAGES))
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    import json
    last, base = json.loads(run.stdout.strip().splitlines()[-1])
    assert last["tuned"] and last["base"] and base == "llama.cpp (GGUF Q4_1)"
