"""Multiple-choice accuracy by log-likelihood, zero- and few-shot.

Files: MMLU-style CSV (``question, A, B, C, D, answer`` with the answer a letter; a header row
is optional, as in the original MMLU files, and any number of letter columns from A works) or
JSON / JSONL records ``{"question", "choices": [...], "answer"}`` with the answer a letter or a
0-based index. ``builtin:contacts-mc`` is generated in code from the built-in dataset's skill.

Rendering. A question becomes the user turn and is encoded by ``data.encode_prompt``, the
function training and chat use: with a chat template the model sees it exactly as it saw its
fine-tuning prompts and the answer is scored as the start of the assistant's reply; without one,
the same ``### Instruction / ### Response`` format training falls back to. Few-shot examples are
earlier user/assistant turns, the chat-model form of MMLU's prefixed solved examples; they are
the first ``k_shot`` questions of the file and are never scored.

Scoring (``scoring``):

- ``"letter"`` (default for files): the user turn lists the choices as ``A. ...`` lines and asks
  for the letter; each choice scores ``log p(letter | prompt)``. As in MMLU's original
  evaluation, every candidate is one short token, so no length normalization is needed and long
  or short choice texts are not favoured.
- ``"text"`` (default for the built-in set): the user turn is the question alone and each choice
  scores the summed log-probability of its full text as the reply. Suited to choices of equal
  form, such as the built-in contact cards, where it measures the fine-tuned skill directly.

The prediction is the highest-scoring choice (the first one on exact ties).
"""
from __future__ import annotations

import csv
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qalora.errors import ConfigError, DataError

LETTERS = string.ascii_uppercase
SCORINGS = ("letter", "text")
BUILTIN_MC = "builtin:contacts-mc"
LETTER_INSTRUCTION = "Answer with the letter of the correct choice."
_FORMAT_HINT = ("use CSV columns question, A, B, C, D, answer (answer a letter) or JSON lines "
                '{"question": ..., "choices": [...], "answer": "B" or a 0-based index}')


@dataclass
class MCQuestion:
    question: str
    choices: list[str]
    answer: int  # index into choices
    where: str = ""  # file and row, for messages and per-question results


def load_multiple_choice(source) -> list[MCQuestion]:
    """Questions of a .csv / .jsonl / .json file, or of ``builtin:contacts-mc``."""
    if str(source) == BUILTIN_MC:
        return contact_mc_questions()
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"{source}: no such file; {_FORMAT_HINT}.")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise DataError(f"{path.name}: multiple-choice data must be .csv, .jsonl or .json, not "
                        f"{suffix or '(none)'}; {_FORMAT_HINT}.")
    text = path.read_text(encoding="utf-8-sig")
    rows = {".csv": _csv_rows, ".jsonl": _jsonl_rows, ".json": _json_rows}[suffix](path.name, text)
    if not rows:
        raise DataError(f"{path.name} holds no questions; {_FORMAT_HINT}.")
    return [_question(row, where) for where, row in rows]


def looks_multiple_choice(source) -> bool:
    """Whether ``source`` is multiple-choice data (decided from its first record only)."""
    if str(source) == BUILTIN_MC:
        return True
    path = Path(str(source)).expanduser()
    if not path.is_file() or path.suffix.lower() not in (".csv", ".jsonl", ".json"):
        return False
    suffix = path.suffix.lower()
    try:
        with path.open(encoding="utf-8-sig") as f:
            head = f.read() if suffix == ".json" else f.read(1 << 16)
        if suffix == ".csv":
            first = next(csv.reader(head.splitlines()), [])
            return "question" in [c.strip().lower() for c in first] or _headerless(first)
        first = json.loads(head.splitlines()[0]) if suffix == ".jsonl" else json.loads(head)
        first = first[0] if isinstance(first, list) and first else first
    except (ValueError, IndexError, UnicodeDecodeError):
        return False
    return isinstance(first, dict) and "question" in first and ("choices" in first or "A" in first)


def _headerless(cells: list[str]) -> bool:
    """An MMLU data row: question, at least two choices, then a single answer letter."""
    return len(cells) >= 4 and _is_letter(cells[-1], len(cells) - 2)


def _is_letter(value: str, n: int) -> bool:
    value = value.strip().upper()
    return len(value) == 1 and value in LETTERS[:n]


def _csv_rows(name: str, text: str) -> list[tuple[str, dict]]:
    reader = csv.reader(text.splitlines())
    rows, header = [], None
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        if header is None and not rows and not _headerless(cells):
            header = [c.strip() for c in cells]
            if "question" not in [h.lower() for h in header]:
                raise DataError(f"{name}: the first row {cells[:6]} is neither a header with a "
                                f"'question' column nor a question row; {_FORMAT_HINT}.")
            continue
        where = f"{name} row {len(rows) + 1} (line {reader.line_num})"
        if header is None:
            n = len(cells) - 2
            rows.append((where, {"question": cells[0], **dict(zip(LETTERS, cells[1:1 + n])),
                                 "answer": cells[-1]}))
        elif len(cells) != len(header):
            raise DataError(f"{where}: {len(cells)} cells but {len(header)} header columns; quote "
                            "values that contain commas.")
        else:
            rows.append((where, {h.upper() if _is_letter(h, len(LETTERS)) else h.lower(): c
                                 for h, c in zip(header, cells)}))
    return rows


def _jsonl_rows(name: str, text: str) -> list[tuple[str, dict]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{name} line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{name} line {lineno}: invalid JSON ({e.msg}); each line must hold "
                                "one complete JSON object.") from None
    return rows


def _json_rows(name: str, text: str) -> list[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: invalid JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of questions; {_FORMAT_HINT}.")
    return [(f"{name} item {i}", row) for i, row in enumerate(data, 1)]


def _question(row, where: str) -> MCQuestion:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with question, choices and answer, "
                        f"got {type(row).__name__}.")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: missing or empty 'question'.")
    if "choices" in row:
        choices = row["choices"]
        if not isinstance(choices, list) or not all(isinstance(c, (str, int, float)) for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of texts, got {choices!r}.")
        choices = [str(c) for c in choices]
    else:
        choices = [str(row[k]) for k in LETTERS if k in row]
        if list(LETTERS[:len(choices)]) != [k for k in LETTERS if k in row]:
            raise DataError(f"{where}: choice columns must run A, B, C, ... without gaps.")
        while choices and not choices[-1].strip():  # a CSV row with fewer choices than columns
            choices.pop()
    if len(choices) < 2 or any(not str(c).strip() for c in choices):
        raise DataError(f"{where}: needs at least two non-empty choices, got {choices!r}.")
    return MCQuestion(question, choices, _answer(row.get("answer"), len(choices), where), where)


def _answer(value, n: int, where: str) -> int:
    valid = f"a letter {LETTERS[0]}-{LETTERS[n - 1]} or a 0-based index 0-{n - 1}"
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
        return value
    if isinstance(value, str) and _is_letter(value, n):
        return LETTERS.index(value.strip().upper())
    raise DataError(f"{where}: answer {value!r} is not {valid} (indices must be JSON numbers; "
                    "CSV answers are letters).")


def contact_mc_questions(n: int = 100, seed: int = 0) -> list[MCQuestion]:
    """Held-out contact-card prompts, each with the right card and three near misses.

    One near miss gets a fact wrong (the age, city or name of another held-out record); two get
    the schema wrong (the age as text, or the city under "location"). Reading the sentence is
    enough to reject the first, only having learned the schema rejects the others: measured on
    40 prompts, SmolLM2-135M-Instruct prefers the right card to the fact error every time but
    to the "location" card only 20% of the time, and after 100 QA-LoRA steps always. Meant for
    ``"text"`` scoring: the question is the original prompt, the choices candidate replies.
    """
    from qalora.data.builtin import heldout_records

    records = heldout_records(n)
    cards = [json.loads(r["messages"][-1]["content"]) for r in records]
    rng = random.Random(seed)
    questions = []
    for i, (record, card) in enumerate(zip(records, cards)):
        key = ("age", "city", "name")[i % 3]
        wrong = [{**card, key: rng.choice([c[key] for c in cards if c[key] != card[key]])},
                 {**card, "age": str(card["age"])},
                 {"name": card["name"], "age": card["age"], "location": card["city"]}]
        answer = rng.randrange(4)
        choices = [json.dumps(c) for c in wrong[:answer] + [card] + wrong[answer:]]
        questions.append(MCQuestion(record["messages"][0]["content"], choices, answer,
                                    f"{BUILTIN_MC} #{i + 1}"))
    return questions


def _turns(q: MCQuestion, scoring: str) -> tuple[str, list[str]]:
    """(user text, candidate reply per choice)."""
    if scoring == "text":
        return q.question, q.choices
    listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
    return f"{q.question}\n\n{listed}\n\n{LETTER_INSTRUCTION}", list(LETTERS[:len(q.choices)])


@torch.no_grad()
def _scores(model, prompt: list[int], continuations: list[list[int]], pad_id: int, device) -> list[torch.Tensor]:
    """Per-token log-probs ``(len(c),)`` of each continuation after ``prompt``.

    The prompt runs once and its KV cache is shared by the choices, which then run together as
    one right-padded batch: the shared prompt (most of the tokens, with its chat template) is not
    computed once per choice, and the vocabulary head runs only where a choice's tokens are scored.
    """
    ids = torch.tensor([prompt], device=device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    first = F.log_softmax(out.logits[0, -1].float(), -1)
    if all(len(c) == 1 for c in continuations):  # letters: the prompt's last position scores them all
        return [first[c].cpu() for c in continuations]
    n, width = len(continuations), max(map(len, continuations)) - 1
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    rest = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, len(prompt) + width), dtype=torch.long)
    mask[:, :len(prompt)] = 1
    for r, c in enumerate(continuations):
        rest[r, :len(c) - 1], mask[r, len(prompt):len(prompt) + len(c) - 1] = torch.tensor(c[:-1]), 1
    positions = torch.arange(len(prompt), len(prompt) + width, device=device).expand(n, -1)
    logp = F.log_softmax(model(input_ids=rest.to(device), attention_mask=mask.to(device), position_ids=positions,
                               past_key_values=cache, use_cache=True).logits.float(), -1).cpu()
    first = first.cpu()
    return [torch.cat([first[c[:1]], logp[r, torch.arange(len(c) - 1), torch.tensor(c[1:], dtype=torch.long)]])
            for r, c in enumerate(continuations)]


def eval_multiple_choice(model, tokenizer, questions, k_shot: int = 0, limit: int | None = None,
                         scoring: str = "letter", on_progress=None) -> dict:
    """Accuracy of ``model`` on multiple-choice ``questions`` (a path or a list of MCQuestion).

    Returns ``accuracy`` (correct / n), ``correct``, ``n`` (scored questions: all but the first
    ``k_shot``, at most ``limit``), ``chance`` (expected accuracy of guessing), ``loss`` (mean
    negative log-likelihood per token of the correct replies), ``k_shot``, ``scoring`` and
    ``per_question``: ``{where, answer, predicted, scores}`` with the summed log-prob per choice.
    """
    from qalora.data.records import encode_prompt

    if scoring not in SCORINGS:
        raise ConfigError(f"scoring {scoring!r} is unknown; choose 'letter' or 'text'.")
    if not isinstance(questions, list):
        questions = load_multiple_choice(questions)
    if k_shot < 0 or k_shot >= len(questions):
        raise ConfigError(f"k_shot={k_shot} leaves no question to score out of {len(questions)}; "
                          f"use 0 to {len(questions) - 1} examples (typical: 0 or 5).")
    shots, scored = questions[:k_shot], questions[k_shot:]
    scored = scored[:limit] if limit else scored
    history = []
    for q in shots:
        user, replies = _turns(q, scoring)
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": replies[q.answer]}]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    was_training = model.training
    model.eval()
    results, nll, tokens = [], 0.0, 0
    for q in scored:
        user, replies = _turns(q, scoring)
        prompt = encode_prompt(history + [{"role": "user", "content": user}], tokenizer)
        conts = [list(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies]
        if max_len and len(prompt) + max(map(len, conts)) > max_len:
            raise ConfigError(f"{q.where}: the prompt with {k_shot} examples is {len(prompt)} tokens, "
                              f"beyond the model's {max_len}; use fewer examples (k_shot).")
        per_token = _scores(model, prompt, conts, pad_id, device)
        scores = [float(t.sum()) for t in per_token]
        predicted = max(range(len(scores)), key=lambda j: (scores[j], -j))
        nll, tokens = nll - scores[q.answer], tokens + len(conts[q.answer])
        results.append({"where": q.where, "answer": q.answer, "predicted": predicted, "scores": scores})
        if on_progress:
            on_progress(len(results), len(scored))
    model.train(was_training)
    correct = sum(r["answer"] == r["predicted"] for r in results)
    return {"accuracy": correct / len(results), "correct": correct, "n": len(results),
            "chance": sum(1 / len(q.choices) for q in scored) / len(scored), "loss": nll / tokens,
            "k_shot": k_shot, "scoring": scoring, "per_question": results}
