"""Chat: one model per side kept between turns, freed on switch; streamed replies match each runtime's."""
import gc
import weakref
from types import SimpleNamespace

import pytest

from jobs import chat
from qalora.export.native import save_quantized
from qalora.infer import chat as generate_reply
from qalora.merge import merge_adapters
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
    from qalora.model import load_base
    from qalora.runtime import open_runtime

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
        texts = [u[side] for u in updates]
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
    assert updates == [{"tuned": "T", "base": "B"}, {"tuned": "Tu", "base": "Ba"}, {"tuned": "Tun", "base": "Ba"}]


def test_generation_settings_are_checked():
    with pytest.raises(ValueError, match="max new tokens=0 must be between 1 and 4096"):
        next(chat.stream_reply("base", "tiny-random", MESSAGES, max_new_tokens=0))
    with pytest.raises(ValueError, match="temperature must be in"):
        next(chat.stream_reply("base", "tiny-random", MESSAGES, temperature=3.0))
    with pytest.raises(ValueError, match="chat side 'left' is unknown"):
        chat.slot("left")
