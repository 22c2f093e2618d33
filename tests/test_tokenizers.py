"""Tokenizers beyond SmolLM2's: training ids are the whole conversation's ids, labels cover
exactly the replies, and generation stops on every end id the model declares.

Tokenizers: the ChatML byte tokenizer, a SentencePiece LLaMA-2 tokenizer with LLaMA-2's chat
template and without one (a base model: the plain '### Instruction' format), a byte-level
Llama-3 tokenizer with its instruct template, and SmolLM2's own (slow: read from the GGUF).
"""
import pytest
import torch

from helpers import smollm2_tokenizer
from qalora.data import records as data
from qalora.deployment.generate import _generation_kwargs, chat
from qalora.models.tiny import byte_tokenizer, llama2_sentencepiece_model, llama2_tokenizer, llama3_tokenizer
from qalora.models.tiny import tiny_random_llama

SEQ_LEN = 512
MAX_NEW = 6
# What load_records makes of an Alpaca row (instruction, output), of one with input and
# system, and of a multi-turn chat record.
RECORDS = {
    "alpaca": {"messages": [{"role": "user", "content": "contact card -> Hana lives in Oslo, age 31."},
                            {"role": "assistant", "content": '{"name": "Hana", "age": 31, "city": "Oslo"}'}]},
    "alpaca_system": {"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Add two and three.\n\n2 + 3"},
                                   {"role": "assistant", "content": "5"}]},
    "multi_turn": {"messages": [{"role": "system", "content": "You answer in one word."},
                                {"role": "user", "content": "Colour of the sky?"},
                                {"role": "assistant", "content": "Blue"},
                                {"role": "user", "content": "And grass?"},
                                {"role": "assistant", "content": "Green, mostly."}]},
}
# What each tokenizer's format writes after a reply and learns with it (LLaMA-2's template
# renders ' ' + reply + ' ' + eos; the decoder drops the leading space).
REPLY_END = {"chatml": "<|im_end|>", "llama2": " </s>", "llama2_plain": "</s>", "llama3": "<|eot_id|>",
             "smollm2": "<|im_end|>"}
# A second end id for the generation config: Llama-3 instruct stops on <|end_of_text|> and
# <|eot_id|>; the others get one of their special tokens.
OTHER_END = {"chatml": "<|endoftext|>", "llama2": "<unk>", "llama2_plain": "<unk>", "llama3": "<|end_of_text|>",
             "smollm2": "<|endoftext|>"}


def _plain_llama2():
    tok = llama2_tokenizer()
    tok.chat_template = None
    return tok


BUILDERS = {"chatml": byte_tokenizer, "llama2": llama2_tokenizer, "llama2_plain": _plain_llama2,
            "llama3": llama3_tokenizer, "smollm2": smollm2_tokenizer}


@pytest.fixture(scope="module", params=[
    "chatml", "llama2", "llama2_plain", "llama3",
    pytest.param("smollm2", marks=pytest.mark.slow)])  # ~6 s to read the tokenizer from the GGUF
def named_tok(request):
    return request.param, BUILDERS[request.param]()


def _conversation_ids(tok, messages) -> list[int]:
    """The ids inference sees for the whole conversation, computed independently of qalora.data.records."""
    if tok.chat_template:
        ids = tok.apply_chat_template(messages, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = "".join(piece for piece, _ in data.render_segments({"messages": messages}, tok))
    return list(tok(text)["input_ids"])  # the tokenizer's own BOS, as for any text


def _runs(labels) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of supervised positions."""
    runs, start = [], None
    for i, label in enumerate([*labels, data.IGNORE]):
        if label != data.IGNORE and start is None:
            start = i
        elif label == data.IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("record", sorted(RECORDS))
def test_training_ids_are_the_conversation_ids_and_labels_cover_exactly_the_replies(named_tok, record):
    name, tok = named_tok
    messages = RECORDS[record]["messages"]
    (ex,) = data.tokenize_records([RECORDS[record]], tok, SEQ_LEN)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids == _conversation_ids(tok, messages)
    assert all(label in (data.IGNORE, i) for i, label in zip(ids, labels))
    turns = [t for t, m in enumerate(messages) if m["role"] == "assistant"]
    runs = _runs(labels)
    assert len(runs) == len(turns)
    for (start, end), turn in zip(runs, turns):
        assert tok.decode(ids[start:end]) == messages[turn]["content"] + REPLY_END[name]
        # Inference starts each reply from exactly the ids training puts before it.
        assert ids[:start] == data.encode_prompt(messages[:turn], tok)


def test_llama2_wrapper_encodes_like_sentencepiece_and_is_deterministic():
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=llama2_sentencepiece_model())
    tok = llama2_tokenizer()
    for text in ["Colour of the sky? Blue, mostly.", '{"name": "Hana", "age": 31}', "Zebra 2024 ünïcode 🙂\nx"]:
        assert tok(text)["input_ids"] == sp.encode(text, add_bos=True)
    assert tok.convert_ids_to_tokens(tok("Blue sky", add_special_tokens=False)["input_ids"])[0].startswith("▁")
    assert llama2_sentencepiece_model.__wrapped__() == llama2_sentencepiece_model()
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", None)
    assert tok("a")["input_ids"][0] == tok.bos_token_id == 1 and tok.eos_token_id == 2
    l3 = llama3_tokenizer()
    assert l3("a")["input_ids"][0] == l3.bos_token_id == l3.convert_tokens_to_ids("<|begin_of_text|>")
    assert l3.eos_token == "<|eot_id|>" and l3.pad_token is None
    for special in ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"):
        assert len(l3(special, add_special_tokens=False)["input_ids"]) == 1
    # Each call returns its own copy: a caller setting a pad token does not change the next one.
    tok.pad_token = tok.eos_token
    assert llama2_tokenizer().pad_token is None


def _always_predicting(model, token_id: int):
    """``model`` with an output layer whose logits always peak at ``token_id``."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True,
                           device=model.lm_head.weight.device)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 10.0
    model.lm_head = head
    return model


def test_generation_stops_on_every_end_id_of_the_generation_config(named_tok, device):
    name, tok = named_tok
    model, tok = tiny_random_llama(tokenizer=tok)
    model.to(device)
    assert model.config.vocab_size == len(tok)
    ends = [tok.eos_token_id, tok.convert_tokens_to_ids(OTHER_END[name])]
    assert len(set(ends)) == 2
    model.generation_config.eos_token_id = ends
    messages = RECORDS["alpaca"]["messages"][:1]
    prompt = data.encode_prompt(messages, tok)
    generated, generate = [], model.generate

    def recording_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        generated.append(out[0, len(prompt):].tolist())
        return out

    model.generate = recording_generate
    for end in ends:
        _always_predicting(model, end)
        assert sorted(_generation_kwargs(tok, MAX_NEW, 0.0, 0.95, model=model)["eos_token_id"]) == sorted(ends)
        assert chat(model, tok, messages, max_new_tokens=MAX_NEW) == ""  # end ids are not shown
        assert generated.pop() == [end]  # stopped right after it
    # Stopping on the tokenizer's eos alone (no model given) would run on past the config's other end id.
    ids = torch.tensor([prompt], device=device)
    out = generate(ids, attention_mask=torch.ones_like(ids), **_generation_kwargs(tok, MAX_NEW, 0.0, 0.95))
    assert out[0, len(prompt):].tolist() == [ends[1]] * MAX_NEW
