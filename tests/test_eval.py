"""Evaluation: multiple-choice files, log-likelihood scoring, few-shot rendering, evaluate_dir."""
import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helpers import tiny_qalora
from qalora.data.builtin import heldout_records
from qalora.data.records import tokenize_records
from qalora.errors import ConfigError, DataError
from qalora.evaluation.heldout import eval_loss, evaluate_dir, token_loss_sum
from qalora.deployment.export.native import load_quantized, save_quantized
from qalora.evaluation.multiple_choice import (BUILTIN_MC, MCQuestion, contact_mc_questions, eval_multiple_choice,
                                               load_multiple_choice, looks_multiple_choice)
from qalora.method.merge import merge_adapters
from qalora.models.tiny import byte_tokenizer, tiny_random_llama

ANSWERS = "CCACBDCA"  # 4 x C, 2 x A, 1 x B, 1 x D


def _mc_csv(path, answers=ANSWERS):
    rows = ["question,A,B,C,D,answer"]
    rows += [f"Question {i}?,a{i},b{i},c{i},d{i},{a}" for i, a in enumerate(answers)]
    path.write_text("\n".join(rows) + "\n")
    return path


class LetterBias(nn.Module):
    """Every position predicts ``token`` with logit ``bias`` above all others (0: uniform)."""

    def __init__(self, vocab, token=0, bias=0.0):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(vocab), requires_grad=False)
        self.logits.data[token] = bias
        self.seen = []

    def forward(self, input_ids, attention_mask=None, **_):
        self.seen.append(input_ids.clone())
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def _letter_id(tok, letter):
    (token,) = tok(letter, add_special_tokens=False)["input_ids"]
    return token


def test_file_formats_parse_to_the_same_questions(tmp_path):
    expected = [MCQuestion("What is 2+2, roughly?", ["3", "4", "5", "22"], 1),
                MCQuestion("Pick the colour", ["red", "car"], 0)]
    (tmp_path / "h.csv").write_text('question,A,B,C,D,answer\n"What is 2+2, roughly?",3,4,5,22,b\n'
                                    "Pick the colour,red,car,,,A\n")
    (tmp_path / "mmlu.csv").write_text('"What is 2+2, roughly?",3,4,5,22,B\nPick the colour,red,car,A\n')
    (tmp_path / "q.jsonl").write_text(
        json.dumps({"question": "What is 2+2, roughly?", "choices": ["3", 4, "5", "22"], "answer": "B"})
        + "\n\n" + json.dumps({"question": "Pick the colour", "choices": ["red", "car"], "answer": 0}) + "\n")
    (tmp_path / "q.json").write_text(json.dumps([
        {"question": "What is 2+2, roughly?", "A": "3", "B": "4", "C": "5", "D": "22", "answer": 1},
        {"question": "Pick the colour", "choices": ["red", "car"], "answer": "a"}]))
    for name in ("h.csv", "mmlu.csv", "q.jsonl", "q.json"):
        got = load_multiple_choice(tmp_path / name)
        assert [(q.question, q.choices, q.answer) for q in got] == \
            [(q.question, q.choices, q.answer) for q in expected], name
        assert looks_multiple_choice(tmp_path / name)
    assert load_multiple_choice(tmp_path / "mmlu.csv")[1].where == "mmlu.csv row 2 (line 2)"
    (tmp_path / "alpaca.jsonl").write_text(json.dumps({"instruction": "hi", "output": "yo"}) + "\n")
    (tmp_path / "text.csv").write_text("text\nhello world\n")
    assert not looks_multiple_choice(tmp_path / "alpaca.jsonl")
    assert not looks_multiple_choice(tmp_path / "text.csv")


@pytest.mark.parametrize("name,content,message", [
    ("bad.csv", "question,A,B,C,D,answer\nQ1,a,b,c,d,A\nQ2,a,b,c,d,E\n",
     r"bad.csv row 2 \(line 3\): answer 'E' is not a letter A-D"),
    ("bad.csv", "question,A,B,answer\nQ1,a,b,A\nQ2,a,b,c,A\n", r"row 2 \(line 3\): 5 cells but 4"),
    ("bad.csv", "prompt,reply\nx,y\n", "neither a header with a 'question' column"),
    ("bad.jsonl", '{"question": "Q", "choices": ["a", "b"], "answer": 1}\n{"question": "Q2", ',
     "bad.jsonl line 2: invalid JSON"),
    ("bad.jsonl", '{"question": "Q", "choices": "a, b", "answer": 1}\n', "line 1: 'choices' must be a list"),
    ("bad.jsonl", '{"question": "", "choices": ["a", "b"], "answer": 1}\n', "line 1: missing or empty 'question'"),
    ("bad.jsonl", '{"question": "Q", "choices": ["a", "b"], "answer": "1"}\n', "indices must be JSON numbers"),
    ("bad.jsonl", '{"question": "Q", "choices": ["a"], "answer": 0}\n', "at least two non-empty choices"),
    ("bad.txt", "Q,a,b,A\n", "must be .csv, .jsonl or .json"),
])
def test_malformed_files_name_file_row_and_fix(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        load_multiple_choice(tmp_path / name)


def test_rigged_letter_model_gets_exact_counts(tmp_path):
    tok = byte_tokenizer()
    path = _mc_csv(tmp_path / "mc.csv")
    favours_c = LetterBias(len(tok), _letter_id(tok, "C"), bias=5.0)
    result = eval_multiple_choice(favours_c, tok, path)
    assert (result["correct"], result["n"], result["accuracy"]) == (4, 8, 0.5)
    assert result["chance"] == 0.25 and result["scoring"] == "letter"
    assert all(r["predicted"] == 2 for r in result["per_question"])
    c_logp = 5.0 - math.log(math.exp(5.0) + len(tok) - 1)  # log softmax of the favoured token
    assert result["per_question"][0]["scores"][2] == pytest.approx(c_logp, abs=1e-5)
    # Every answer C: the rigged model is always right.
    assert eval_multiple_choice(favours_c, tok, _mc_csv(tmp_path / "c.csv", "C" * 8))["accuracy"] == 1.0
    # Uniform model: all choices tie and the first (A) is predicted.
    assert eval_multiple_choice(LetterBias(len(tok)), tok, path)["correct"] == ANSWERS.count("A")
    # Few-shot: the first two questions become examples and are not scored; limit caps the rest.
    shot = eval_multiple_choice(favours_c, tok, path, k_shot=2, limit=5)
    assert (shot["n"], shot["correct"]) == (5, ANSWERS[2:7].count("C"))


def test_prompt_is_rendered_with_the_chat_template_and_shots(tmp_path):
    tok = byte_tokenizer()
    model = LetterBias(len(tok))
    eval_multiple_choice(model, tok, _mc_csv(tmp_path / "mc.csv"), k_shot=1, limit=1)
    (ids,) = model.seen
    listing = "\n\nA. a{i}\nB. b{i}\nC. c{i}\nD. d{i}\n\nAnswer with the letter of the correct choice."
    assert tok.decode(ids[0]) == (
        f"<|im_start|>user\nQuestion 0?{listing.format(i=0)}<|im_end|>\n<|im_start|>assistant\nC<|im_end|>\n"
        f"<|im_start|>user\nQuestion 1?{listing.format(i=1)}<|im_end|>\n<|im_start|>assistant\n")


def _reference_scores(model, tok, q, history):
    """Log-prob of each choice as the reply, by one full forward per choice (no batching)."""
    from qalora.data.records import encode_prompt
    prompt = encode_prompt(history + [{"role": "user", "content": q.question}], tok)
    scores = []
    for choice in q.choices:
        reply = tok(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + reply])
        labels = torch.tensor([[-100] * len(prompt) + reply])
        loss, _ = token_loss_sum(model(input_ids=ids).logits, labels)
        scores.append(-loss.item())
    return scores


def test_text_scoring_matches_unbatched_reference_and_ignores_choice_order():
    model, tok = tiny_random_llama()
    questions = [MCQuestion("Name a fruit.", ["apple", "a banana split", "kiwi", "x"], 1, "q1"),
                 MCQuestion("Say hi.", ["hello there", "hi"], 0, "q2"),
                 MCQuestion("Count.", ["one two three", "1 2", "uno"], 2, "q3")]
    result = eval_multiple_choice(model, tok, questions, k_shot=1, scoring="text")
    history = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "a banana split"}]
    for q, r in zip(questions[1:], result["per_question"]):
        assert r["scores"] == pytest.approx(_reference_scores(model, tok, q, history), abs=1e-4)
        assert r["predicted"] == max(range(len(r["scores"])), key=r["scores"].__getitem__)
    assert result["correct"] == sum(r["predicted"] == r["answer"] for r in result["per_question"])
    answer_tokens = [len(tok(q.choices[q.answer])["input_ids"]) for q in questions[1:]]
    nll = -sum(r["scores"][r["answer"]] for r in result["per_question"])
    assert result["loss"] == pytest.approx(nll / sum(answer_tokens))
    # The prompt does not list the choices, so reversing them reverses the scores exactly.
    flipped = [MCQuestion(q.question, q.choices[::-1], len(q.choices) - 1 - q.answer) for q in questions]
    again = eval_multiple_choice(model, tok, flipped, k_shot=1, scoring="text")
    for r, f in zip(result["per_question"], again["per_question"]):
        assert f["scores"] == pytest.approx(r["scores"][::-1], abs=1e-4)
    assert again["correct"] == result["correct"]
    with pytest.raises(ConfigError, match="k_shot=3 leaves no question"):
        eval_multiple_choice(model, tok, questions, k_shot=3)


def test_builtin_contact_questions():
    questions = contact_mc_questions()
    assert questions == contact_mc_questions() and len(questions) == 100
    cards = [r["messages"][1]["content"] for r in heldout_records(100)]
    for q, card in zip(questions, cards):
        assert q.choices[q.answer] == card and len(set(q.choices)) == 4
        right = json.loads(card)
        misses = [json.loads(c) for j, c in enumerate(q.choices) if j != q.answer]
        assert [sorted(m) for m in misses] == [sorted(right)] * 2 + [["age", "location", "name"]]
        assert sum(misses[0][k] != right[k] for k in right) == 1  # one wrong fact
        assert misses[1] == {**right, "age": str(right["age"])}  # the age as text
        assert misses[2]["location"] == right["city"]
    assert sorted({q.answer for q in questions}) == [0, 1, 2, 3]
    assert looks_multiple_choice(BUILTIN_MC)


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory):
    model, tok = tiny_qalora(bits=4)
    merged = merge_adapters(copy.deepcopy(model), use_kernel=False)
    return save_quantized(merged, tok, tmp_path_factory.mktemp("eval") / "merged")


def test_evaluate_dir_multiple_choice_and_loss(merged_dir, tmp_path):
    model, tok = load_quantized(merged_dir, use_kernel=False)
    path = _mc_csv(tmp_path / "mc.csv")
    result = evaluate_dir(merged_dir, str(path), k_shot=1)
    direct = eval_multiple_choice(model, tok, path, k_shot=1)
    assert result["kind"] == "multiple_choice" and result["n"] == 7
    assert result["accuracy"] == direct["accuracy"]
    assert result["perplexity"] == pytest.approx(math.exp(direct["loss"]))

    builtin = evaluate_dir(merged_dir, BUILTIN_MC, limit=3)
    assert (builtin["scoring"], builtin["n"]) == ("text", 3)

    loss = evaluate_dir(merged_dir, "builtin:default", limit=4, batch_size=2)
    examples = tokenize_records(heldout_records(4), tok, 1024)
    expected = eval_loss(model, examples, 2, tok.pad_token_id)
    assert loss["kind"] == "loss" and loss["examples"] == 4
    assert loss["loss"] == pytest.approx(expected, rel=1e-6)
    assert loss["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)


def test_held_out_replies_are_generated_and_compared_exactly(merged_dir, tmp_path):
    """The generation check beside the multiple choice: greedy replies to conversations the run
    held out, counted when equal to the expected reply (whitespace around aside)."""
    from qalora.evaluation.heldout import exact_replies, generation_check_dir, heldout_replies, reply_pairs
    from qalora.deployment.generate import chat

    model, tok = load_quantized(merged_dir, use_kernel=False)
    pairs = heldout_replies("builtin:default", 4, 0.1, 0)
    assert [p[0][-1]["content"] for p in pairs] == [r["messages"][0]["content"] for r in heldout_records(4)]
    # what the model really answers, then expected replies equal to it for two and not for two
    said = [chat(model, tok, m, max_new_tokens=8, temperature=0.0).strip() for m, _ in pairs]
    asked = [(m, f"  {s}\n" if i < 2 else s + " and more") for i, ((m, _), s) in enumerate(zip(pairs, said))]
    got = exact_replies(model, tok, asked, max_new_tokens=8)  # the tiny model never stops: 8 tokens each
    assert (got["n"], got["exact"], got["accuracy"]) == (4, 2, 0.5)
    assert got["examples"][0] == {"prompt": pairs[0][0][-1]["content"], "expected": said[0], "got": said[0]}
    # the random tiny model cannot write a contact card
    saved = generation_check_dir(merged_dir, "builtin:default", n=3, use_kernel=False)
    assert (saved["data"], saved["n"], saved["exact"]) == ("builtin:default", 3, 0)
    # a user's file: its own held-out split (the run's fraction and seed); plain text has no reply to check
    rows = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    held = heldout_replies(str(tmp_path / "d.jsonl"), 8, 0.1, 0)
    assert len(held) == 2 and all(m[-1]["content"] == f"say {e}" for m, e in held)
    assert reply_pairs([{"text": "plain"}]) == [] and exact_replies(model, tok, []) is None


def test_choices_scored_on_the_shared_prompt_cache_match_scoring_each_row_whole():
    """The prompt runs once and its KV cache is shared by the choices (the built-in check went from
    15-19 s to 8 s on the default model): the log-probs are those of each prompt + choice row run
    whole."""
    import torch.nn.functional as F

    from qalora.evaluation.multiple_choice import _scores
    from tests.helpers import tiny_qalora

    model, tok = tiny_qalora(seed=6)
    model.eval()
    prompt = tok("Where does Ana live?", add_special_tokens=False)["input_ids"]
    choices = [tok(c, add_special_tokens=False)["input_ids"] for c in (" in Porto, Portugal", " Oslo", " Lima, Peru")]
    shared = _scores(model, prompt, choices, tok.pad_token_id or 0, torch.device("cpu"))
    for c, got in zip(choices, shared):
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=torch.tensor([prompt + c])).logits[0].float(), -1)
        whole = logp[len(prompt) - 1 + torch.arange(len(c)), torch.tensor(c)]
        assert got.shape == (len(c),) and torch.allclose(got, whole, atol=1e-4)
