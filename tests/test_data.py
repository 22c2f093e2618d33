"""Loading, format detection, error messages, reply-only masking, split and collate."""
import csv
import json

import pytest
import torch

from helpers import smollm2_tokenizer
from qalora.data import builtin, records as data
from qalora.data.builtin import DEFAULT_SIZE, check_reply, contact_records, heldout_records
from qalora.errors import ConfigError, DataError
from qalora.models.tiny import byte_tokenizer, llama2_tokenizer

SEQ_LEN = 256
ROWS = {  # format -> (two raw rows, their normalized records)
    "alpaca": ([{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
                {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief."}],
               [{"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]},
                {"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Translate\n\nchat"},
                              {"role": "assistant", "content": "cat"}]}]),
    "chat": ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
              {"messages": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "2+2?"},
                            {"role": "assistant", "content": "4"}]}],
             [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
              {"messages": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "2+2?"},
                            {"role": "assistant", "content": "4"}]}]),
    "sharegpt": ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]},
                  {"conversations": [{"from": "system", "value": "S"}, {"from": "user", "value": "Q"},
                                     {"from": "assistant", "value": "A"}]}],
                 [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]},
                  {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                {"role": "assistant", "content": "A"}]}]),
    "text": ([{"text": "First document."}, {"text": "Second one, with a comma."}],
             [{"text": "First document."}, {"text": "Second one, with a comma."}]),
}
MULTI_TURN = {"messages": [{"role": "system", "content": "You answer in one word."},
                           {"role": "user", "content": "Colour of the sky?"},
                           {"role": "assistant", "content": "Blue"},
                           {"role": "user", "content": "And grass?"},
                           {"role": "assistant", "content": "Green, mostly."}]}


def _write(path, rows, kind):
    """Write ``rows`` as ``kind``; returns the source string to load."""
    if kind in ("json", "json_data"):
        path.write_text(json.dumps(rows if kind == "json" else {"data": rows}))
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a trailing blank line is fine
    elif kind == "csv":
        cols = sorted({k for r in rows for k in r})
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, cols)
            w.writeheader()
            w.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    elif kind == "parquet":
        import pandas as pd
        pd.DataFrame(rows).to_parquet(path)
    elif kind in ("saved", "folder"):
        import datasets
        ds = datasets.Dataset.from_list(rows)
        if kind == "saved":
            ds.save_to_disk(str(path))
        else:
            path.mkdir()
            ds.to_json(str(path / "train.jsonl"))
    return str(path)


@pytest.fixture(scope="module")
def smol_tok():
    return smollm2_tokenizer()


@pytest.fixture
def plain_tok():
    tok = byte_tokenizer()
    tok.chat_template = None
    return tok


def _supervised(example, tok) -> str:
    return tok.decode([i for i, lab in zip(example["input_ids"], example["labels"]) if lab != data.IGNORE])


@pytest.mark.parametrize("kind,suffix", [("json", ".json"), ("json_data", ".json"), ("jsonl", ".jsonl"),
                                         ("csv", ".csv"), ("parquet", ".parquet"), ("saved", ""),
                                         ("folder", "")])
@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_every_format_loads_from_every_source_type(tmp_path, fmt, kind, suffix):
    rows, expected = ROWS[fmt]
    if kind in ("parquet", "saved", "folder"):  # columnar stores fill absent keys with null / ""
        rows = [{k: r.get(k, "") for k in sorted({k for r in rows for k in r})} for r in rows]
    assert data.load_records(_write(tmp_path / f"d{suffix}", rows, kind)) == expected


def test_dataset_name_offline_reads_the_local_cache(tmp_path, monkeypatch):
    # HF_HUB_OFFLINE=1 (the suite's setting): datasets' own offline mode, no flag patched by the library
    import datasets
    src = tmp_path / "src.jsonl"
    _write(src, ROWS["chat"][0], "jsonl")
    cache = tmp_path / "cache"
    datasets.load_dataset("json", data_files=str(src), cache_dir=str(cache))
    # Lay the prepared files out the way the cache keeps a Hub dataset "me/toy".
    (built,) = (cache / "json").glob("*/*/*/dataset_info.json")
    target = cache / "me___toy" / "default" / built.parent.parent.name / built.parent.name
    target.parent.mkdir(parents=True)
    built.parent.rename(target)
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(target / arrow.name.replace("json-", "toy-"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    assert data.load_records("me/toy") == ROWS["chat"][1]
    with pytest.raises(DataError, match=r"'nobody/nothing' is not in the local datasets cache and Hub downloads "
                                        r"are off \(HF_HUB_OFFLINE=1\).*\.jsonl"):
        data.load_records("nobody/nothing")


BAD = [  # (file name, content, substrings the message must contain)
    ("data.jsonl", "", ["data.jsonl is empty"]),
    ("data.json", "   ", ["data.json is empty"]),
    ("data.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"\n',
     ["data.jsonl line 2", "invalid JSON"]),
    ("data.json", '[{"text": "a"},\n {"text": }]', ["data.json", "invalid JSON at line 2"]),
    ("data.json", '{"text": "a"}\n{"text": "b"}', ["data.json", "rename the file to .jsonl"]),
    ("data.json", '{"rows": []}', ["data.json", 'expected a list of records or {"data": [...]}']),
    ("data.jsonl", '{"text": "a"}\n\n["x"]\n', ["data.jsonl line 3", "expected a JSON object"]),
    ("data.jsonl", "\n".join(['{"instruction": "q", "output": "a"}'] * 6 + ['{"instruction": "q"}']),
     ["data.jsonl row 7 (line 7)", "missing 'output'", "instruction and output"]),
    ("data.jsonl", '{"instruction": "q", "output": "a"}\n{"instruction": "  ", "output": "a"}',
     ["data.jsonl row 2", "empty 'instruction'"]),
    ("data.jsonl", '{"instruction": "q", "output": 42}', ["row 1", "'output' must be text, got an int"]),
    ("data.jsonl", '{"prompt": "q", "answer": "a"}',
     ["data.jsonl: its column(s) 'answer', 'prompt' match no known record format", "{instruction, output",
      "{messages}", "{conversations}", "{text}", "Rename 'prompt' → 'instruction' and 'answer' → 'output'"]),
    ("data.csv", "a,b,c,d,e,f,g,h,i," + "x" * 50 + "\n1,2,3,4,5,6,7,8,9,10\n",
     ["data.csv: its column(s) 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h' and 2 more match no known", "{text}"]),
    ("data.jsonl", '{"text": "ok"}\n{"text": ""}', ["data.jsonl row 2", "empty 'text'"]),
    ("data.jsonl", '{"messages": []}', ["row 1", "'messages' must be a non-empty list"]),
    ("data.jsonl", '{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}',
     ["row 1 (line 1) message 2", "'role' is not one of", "['system', 'user', 'assistant']"]),
    ("data.jsonl", '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
     ["row 1 (line 1) message 2", "empty 'content'"]),
    ("data.jsonl", '{"messages": [{"role": "user", "content": "q"}]}', ["row 1", "no assistant reply"]),
    ("data.jsonl", '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}',
     ["row 1 (line 1) message 1", "before any user message"]),
    ("data.jsonl", '{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}',
     ["message 2", "'from' is not one of", "'human', 'gpt'"]),
    ("data.csv", "instruction,output\nq,a\nq,a,extra\n", ["data.csv row 2 (line 3)", "more cells"]),
    ("data.csv", "instruction,output\nq,a\nq,\n", ["data.csv row 2 (line 3, header not counted)",
                                                   "missing 'output'"]),
    ("data.csv", 'messages\n"[{""role"": ""user""}"\n', ["data.csv row 1", "'messages' is not valid JSON"]),
    ("data.parquet", "not parquet", ["data.parquet", "cannot read Parquet"]),
    ("data.txt", "hello", ["data.txt", "unsupported file type .txt", ".jsonl"]),
    ("data.json", '[{"text": "a"}, 3]', ["data.json row 2", "expected a JSON object"]),
    ("data.jsonl", b'{"text": "caf\xe9"}', ["data.jsonl", "not UTF-8", "save the file with UTF-8"]),
]


@pytest.mark.parametrize("name,content,needles", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_malformed_input_names_file_row_and_problem(tmp_path, name, content, needles):
    if isinstance(content, bytes):
        (tmp_path / name).write_bytes(content)
    else:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as err:
        data.load_records(str(tmp_path / name))
    for needle in needles:
        assert needle in str(err.value)


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        data.load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="builtin:nope is not a built-in dataset.*builtin:contacts"):
        data.load_records("builtin:nope")


def test_chatml_masks_everything_but_replies_and_end_of_turn(smol_tok):
    (ex,) = data.tokenize_records([MULTI_TURN], smol_tok, SEQ_LEN)
    assert _supervised(ex, smol_tok) == "Blue<|im_end|>Green, mostly.<|im_end|>"
    # Same tokens as encoding the whole rendered conversation at once.
    full = smol_tok.apply_chat_template(MULTI_TURN["messages"], tokenize=False)
    assert ex["input_ids"] == smol_tok(full, add_special_tokens=False)["input_ids"]
    # Each reply starts right after the generation prompt used at inference time.
    for turn, reply in ((2, "Blue"), (4, "Green, mostly.")):
        prompt = data.encode_prompt(MULTI_TURN["messages"][:turn], smol_tok)
        assert ex["input_ids"][:len(prompt)] == prompt
        labels = ex["labels"][len(prompt) - 1:]
        assert labels[0] == data.IGNORE
        n = labels[1:].index(data.IGNORE)
        assert smol_tok.decode(labels[1:n + 1]) == reply + "<|im_end|>"


def test_default_system_prompt_is_not_supervised(smol_tok):
    (ex,) = data.tokenize_records(ROWS["chat"][1][:1], smol_tok, SEQ_LEN)
    assert "You are a helpful AI assistant" in smol_tok.decode(ex["input_ids"])
    assert _supervised(ex, smol_tok) == "Hello!<|im_end|>"


def test_fallback_format_without_chat_template(plain_tok):
    record = ROWS["alpaca"][1][1]
    text = "".join(piece for piece, _ in data.render_segments(record, plain_tok))
    assert text == "Be brief.\n\n### Instruction:\nTranslate\n\nchat\n\n### Response:\ncat<|im_end|>\n\n"
    (ex,) = data.tokenize_records([record], plain_tok, SEQ_LEN)
    assert _supervised(ex, plain_tok) == "cat<|im_end|>"
    prompt = data.render_prompt(record["messages"][:-1], plain_tok)
    assert prompt == "Be brief.\n\n### Instruction:\nTranslate\n\nchat\n\n### Response:\n"
    assert plain_tok.decode(ex["input_ids"]).startswith(prompt)


def test_templates_that_cannot_be_masked_raise_data_errors():
    tok = byte_tokenizer()
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
                         "{% endif %}" + tok.chat_template)
    with pytest.raises(DataError, match="chat template rejects this conversation.*no system role"):
        data.tokenize_records([MULTI_TURN], tok, SEQ_LEN)
    tok.chat_template = "{{ messages | length }}" + byte_tokenizer().chat_template  # prefix changes
    with pytest.raises(DataError, match="renders earlier turns differently"):
        data.tokenize_records(ROWS["chat"][1][:1], tok, SEQ_LEN)


def test_a_token_joining_the_prompt_space_and_the_reply_is_supervised():
    # The generation prompt ends with a space; SentencePiece folds it into the reply's first
    # piece ('▁Blue'), which must be learned, while the 'A:' marker must not.
    tok = llama2_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\nA: "
                         "{% else %}{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}")
    record = {"messages": [{"role": "user", "content": "Colour of the sky?"},
                           {"role": "assistant", "content": "Blue"}]}
    (ex,) = data.tokenize_records([record], tok, SEQ_LEN)
    pieces = tok.convert_ids_to_tokens(ex["input_ids"])
    assert pieces[-5:] == ["A", ":", "▁Blue", "</s>", "<0x0A>"]
    assert [p for p, lab in zip(pieces, ex["labels"]) if lab != data.IGNORE] == ["▁Blue", "</s>"]


def test_tokenizers_without_offsets_are_encoded_segment_by_segment():
    class Slow:  # a pure-Python tokenizer: no character offsets
        is_fast = False

        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def __call__(self, text, **kwargs):
            assert "return_offsets_mapping" not in kwargs
            return self._tok(text, **kwargs)

    tok = byte_tokenizer()  # one token per byte: piecewise and whole encodings agree
    records = [MULTI_TURN, ROWS["chat"][1][0]]
    assert data.tokenize_records(records, Slow(tok), SEQ_LEN) == data.tokenize_records(records, tok, SEQ_LEN)


def test_text_records_supervise_every_token(plain_tok):
    (ex,) = data.tokenize_records([{"text": "abc"}], plain_tok, SEQ_LEN)
    assert plain_tok.decode(ex["input_ids"]) == "abc<|im_end|>"
    assert ex["labels"] == ex["input_ids"]


def test_truncation_and_skipping():
    tok = byte_tokenizer()  # one token per byte: lengths are easy to reason about
    long_reply = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * 300}]}
    long_prompt = {"messages": [{"role": "user", "content": "q" * 300}, {"role": "assistant", "content": "a"}]}
    out = data.tokenize_records([long_reply, long_prompt], tok, 64)
    assert len(out) == 1  # the long prompt leaves no reply token within 64 tokens
    assert len(out[0]["input_ids"]) == len(out[0]["labels"]) == 64
    prompt_len = len(data.encode_prompt(long_reply["messages"][:1], tok))
    assert out[0]["labels"][:prompt_len] == [data.IGNORE] * prompt_len
    assert _supervised(out[0], tok) == "x" * (64 - prompt_len)
    with pytest.raises(DataError, match="all 1 records lose their whole reply.*seq_len=64"):
        data.tokenize_records([long_prompt], tok, 64)


def test_split_is_deterministic_disjoint_and_sized():
    records = [{"text": str(i)} for i in range(50)]
    train, held = data.split_records(records, 0.1, seed=3)
    assert (train, held) == data.split_records(records, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert sorted(r["text"] for r in train + held) == sorted(r["text"] for r in records)
    assert held != data.split_records(records, 0.1, seed=4)[1]
    assert [len(s) for s in data.split_records(records[:2], 0.01, 0)] == [1, 1]
    assert [len(s) for s in data.split_records(records[:3], 0.49, 0)] == [2, 1]
    with pytest.raises(DataError, match="1 record.*at least 2"):
        data.split_records(records[:1], 0.1, 0)
    with pytest.raises(ConfigError, match="eval_fraction"):
        data.split_records(records, 1.5, 0)


def test_collate_right_pads():
    batch = data.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                          {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))
    assert all(t.dtype == torch.long for t in batch.values())


def test_preview_renders_first_records(tmp_path, smol_tok):
    texts, count = data.preview(_write(tmp_path / "d.jsonl", ROWS["alpaca"][0], "jsonl"), smol_tok, n=1)
    assert count == 2 and len(texts) == 1
    assert texts[0].endswith("<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n")


def test_builtin_dataset_is_deterministic_varied_and_checkable():
    assert builtin.builtin_names() == ["contacts"]
    records = data.load_records("builtin:default")
    assert records == data.load_records("builtin:contacts") == contact_records()
    assert len(records) == DEFAULT_SIZE
    prompts = [r["messages"][0]["content"] for r in records]
    assert len(set(prompts)) > 0.99 * len(prompts)
    for r in records:
        card = json.loads(r["messages"][1]["content"])
        assert list(card) == ["name", "age", "city"] and str(card["age"]) in r["messages"][0]["content"]
        assert card["name"] in r["messages"][0]["content"] and card["city"] in r["messages"][0]["content"]
    held = heldout_records(30)
    assert not {r["messages"][0]["content"] for r in held} & set(prompts)


def test_builtin_skill_check_scores_replies():
    card = '{"name": "Ines", "age": 30, "city": "Oslo"}'
    assert check_reply(' {"city": "Oslo", "age": 30,  "name": "Ines"}\n', card)
    assert not check_reply('{"name": "Ines", "age": "30", "city": "Oslo"}', card)
    assert not check_reply("Name: Ines, age 30, Oslo", card)
    expected = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in heldout_records(10)}
    assert builtin.builtin_skill_check(None, lambda m: expected[m[-1]["content"]], n=10) == 1.0
    flip = iter(range(10))
    assert builtin.builtin_skill_check(None, lambda m: expected[m[-1]["content"]] if next(flip) % 2 else "no",
                                    n=10) == 0.5
    with pytest.raises(DataError, match="chat records"):
        builtin.builtin_skill_check([{"text": "x"}], lambda m: "", n=3)


def test_a_bounded_sample_reads_only_the_head_of_a_line_based_file(tmp_path):
    """The web form checks the first rows only; a problem far down the file is the worker's to find."""
    from qalora.data.records import load_records

    good = "".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(5000))
    path = tmp_path / "big.jsonl"
    path.write_bytes(good.encode() + b"\xff\xfe not utf-8, not json\n")
    sample = load_records(str(path), limit=1000)
    assert len(sample) == 1000 and sample[-1]["messages"][0]["content"] == "q999"
    with pytest.raises(DataError, match="not UTF-8"):
        load_records(str(path))  # the whole file: the worker's view
    csv_path = tmp_path / "big.csv"
    csv_path.write_text("instruction,output\n" + "".join(f"q{i},a{i}\n" for i in range(3000)) + 'bad,"unclosed\n')
    assert len(load_records(str(csv_path), limit=50)) == 50
