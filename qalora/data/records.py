"""Datasets: load records, normalize them to chat messages, render, mask and batch.

Sources: ``builtin:NAME``, a .json / .jsonl / .csv / .parquet file, a folder saved with
``Dataset.save_to_disk``, a folder of data files, or a Hub dataset ``ID[:CONFIG][@SPLIT]``
(downloaded through ``datasets`` and cached: :mod:`qalora.data.hub`). Record formats, detected per
source from its columns, or named by a column mapping (``{prompt, response[, input]}``,
``{messages}`` or ``{text}``: see :func:`qalora.data.hub.check_columns`):

- Alpaca:   ``instruction``, optional ``input`` and ``system``, ``output``
- chat:     ``messages``: list of {role, content}, role in system/user/assistant
- ShareGPT: ``conversations``: list of {from, value}, from in system/human/gpt (or user/assistant)
- text:     ``text``; language-model loss on every token

Every record becomes ``{"messages": [...]}`` or ``{"text": "..."}``. Loss is only on
assistant replies (plus their end-of-turn token); all other tokens get label -100.
"""
from __future__ import annotations

import csv
import json
import random
from itertools import accumulate
from pathlib import Path

import torch

from qalora.data.builtin import builtin_records
from qalora.data.hub import check_columns, map_row
from qalora.errors import ConfigError, DataError

IGNORE = -100
FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet")
FORMATS = {  # format -> (column that identifies it, what a record needs)
    "chat": ("messages", "a 'messages' list of {role, content}"),
    "sharegpt": ("conversations", "a 'conversations' list of {from, value}"),
    "alpaca": ("instruction", "instruction and output (optional input, system)"),
    "text": ("text", "a non-empty 'text'"),
}
_EXPECTED = ("expected one of these column sets: {instruction, output[, input, system]} (Alpaca), "
             "{messages} (chat), {conversations} (ShareGPT), {text} (plain text)")
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
_ROLE_NAMES = {"messages": ["system", "user", "assistant"],
               "conversations": ["system", "human", "gpt", "user", "assistant"]}


# Column names other tools use for Alpaca's two fields, for a rename hint.
_ALIASES = {"instruction": ("question", "prompt", "query", "input_text", "context", "source"),
            "output": ("answer", "response", "completion", "target", "reply", "label")}


class UnknownColumns(DataError):
    """A file whose columns match no record format. The message names the columns found (the
    first eight, each cut to 40 characters: a headerless CSV's first row is data) and, where they
    look like Alpaca's fields under other names, the rename that fixes it; ``without_names()`` is
    the same refusal naming none, for whoever may not read the file."""

    def __init__(self, name: str, columns):
        self.name, self.found = name, sorted(str(c) for c in columns)
        shown = ", ".join(repr(c if len(c) <= 40 else c[:39] + "…") for c in self.found[:8])
        more = f" and {len(self.found) - 8} more" if len(self.found) > 8 else ""
        renames = [f"'{c}' → '{field}'" for field, aliases in _ALIASES.items() for c in self.found
                   if c.lower() in aliases]
        hint = f" Rename {' and '.join(renames[:2])} to make it Alpaca." if renames else ""
        super().__init__(f"{name}: its column(s) {shown}{more} match no known record format; {_EXPECTED}.{hint}")

    def without_names(self) -> str:
        return f"{self.name}: none of its {len(self.found)} column(s) is a known record format; {_EXPECTED}."


def load_records(source: str, limit: int | None = None, *, columns: dict | None = None,
                 max_samples: int | None = None, seed: int = 0, on_progress=None) -> list[dict]:
    """Load and normalize the records of ``source`` (see the module docstring).

    ``limit`` reads and checks only the first ``limit`` records (a bounded sample: the web form
    checks this much before queueing, the worker reads the whole file). ``columns`` maps the
    source's columns to a record format. ``max_samples`` keeps a sample of that many records drawn
    with ``seed`` (in the source's order). ``on_progress(done, total)`` counts a Hub dataset's files
    downloaded.
    """
    source = str(source).strip()
    columns = check_columns(columns)
    if source.startswith("builtin:"):
        return _sample(builtin_records(source[len("builtin:"):]), max_samples, seed)[:limit]
    name, rows = _read_rows(source, limit, on_progress, (max_samples, seed))
    if not rows:
        raise DataError(f"{name} is empty; add at least two records, e.g. one JSON object per line "
                        'like {"instruction": "...", "output": "..."}.')
    rows = _sample(rows, max_samples, seed)
    if columns:
        rows = [(where, map_row(row, columns, f"{name} {where}")) for where, row in rows]
    keys = {key for _, row in rows for key in row}
    fmt = next((f for f, (key, _) in FORMATS.items() if key in keys), None)
    if fmt is None:
        raise UnknownColumns(name, keys)
    return [_normalize(fmt, row, f"{name} {where}") for where, row in rows]


def _sample(rows: list, max_samples: int | None, seed: int) -> list:
    """At most ``max_samples`` of ``rows``, drawn with ``seed``, in their original order."""
    keep = _sample_indices(len(rows), max_samples, seed)
    return rows if keep is None else [rows[i] for i in keep]


def _sample_indices(n: int, max_samples: int | None, seed: int) -> list[int] | None:
    """The sorted indices of a seeded sample of ``max_samples`` of ``n`` rows; None to keep them all."""
    if max_samples is None or n <= max_samples:
        return None
    if max_samples < 1:
        raise ConfigError(f"max_samples={max_samples} must be at least 2 (or unset for every record).")
    return sorted(random.Random(seed).sample(range(n), max_samples))


def _read_rows(source: str, limit: int | None = None, on_progress=None,
               sample: tuple = (None, 0)) -> tuple[str, list[tuple[str, dict]]]:
    """``(display name, [(location such as 'row 7 (line 8)', raw row), ...])``; a dataset (folder or
    Hub) is sampled (``sample``: max_samples, seed) before its rows become Python objects."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.name, _rows_of_dataset(_open_folder(path), limit, sample)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in FILE_TYPES:
            raise DataError(f"{path.name}: unsupported file type {suffix or '(none)'}; "
                            f"use one of {', '.join(FILE_TYPES)}.")
        try:
            text = None if suffix == ".parquet" else _read_text(path, suffix, limit)
        except UnicodeDecodeError as e:
            raise DataError(f"{path.name}: not UTF-8 text (bad byte at offset {e.start}); "
                            "save the file with UTF-8 encoding.") from None
        rows = {".json": _rows_json, ".jsonl": _rows_jsonl, ".csv": _rows_csv,
                ".parquet": _rows_parquet}[suffix](path, text)
        return path.name, rows[:limit]
    if path.suffix.lower() in FILE_TYPES or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: file not found; check the path (relative paths start at {Path.cwd()}).")
    from qalora.data import hub as hubdata
    ref = hubdata.parse_ref(source)
    return str(ref), _rows_of_dataset(hubdata.load(ref, on_progress), limit, sample)


def _rows_json(path: Path, text: str) -> list[tuple[str, dict]]:
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = (" It looks like one object per line: rename the file to .jsonl."
                if e.msg == "Extra data" else "")
        raise DataError(f"{path.name}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}).{hint}")
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{path.name}: expected a list of records or {{"data": [...]}}, '
                        f"got a JSON {type(data).__name__}.")
    return [(f"row {i} (1-based)", _as_object(row, f"{path.name} row {i}"))
            for i, row in enumerate(data, 1)]


def _rows_jsonl(path: Path, text: str) -> list[tuple[str, dict]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name} line {lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                            "each line must hold one complete JSON object.")
        rows.append((f"row {len(rows) + 1} (line {lineno})", _as_object(row, f"{path.name} line {lineno}")))
    return rows


def _rows_csv(path: Path, text: str) -> list[tuple[str, dict]]:
    reader = csv.DictReader(text.splitlines())
    rows = []
    for i, row in enumerate(reader, 1):
        if None in row:
            raise DataError(f"{path.name} row {i} (line {reader.line_num}): more cells than header columns; "
                            "quote values that contain commas.")
        rows.append((f"row {i} (line {reader.line_num}, header not counted)",
                     {k: v for k, v in row.items() if v not in ("", None)}))
    return rows


def _rows_parquet(path: Path, _text) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path.name}: cannot read Parquet ({e}); re-export the file.") from None
    return [(f"row {i} (1-based)", row) for i, row in enumerate(table.to_pylist(), 1)]


def _as_object(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object like {{\"instruction\": ..., \"output\": ...}}, "
                        f"got a {type(row).__name__}.")
    return row


def _open_folder(path: Path):
    import datasets
    if any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return datasets.load_from_disk(str(path))
    try:
        return datasets.load_dataset(str(path))
    except Exception as e:  # datasets raises many types for unreadable folders
        raise DataError(f"{path.name}: cannot load this folder as a dataset ({e}); point to a single "
                        "data file or a folder written by Dataset.save_to_disk.") from None


def _read_text(path: Path, suffix: str, limit: int | None) -> str:
    """The file's text; for a bounded sample of a line-based file, only its first lines."""
    if limit is None or suffix not in (".jsonl", ".csv"):
        return path.read_text(encoding="utf-8-sig")
    lines = []
    with open(path, encoding="utf-8-sig") as f:
        for line in f:  # a CSV cell may span lines: take generously many, then rows are cut to limit
            lines.append(line)
            if len(lines) > 2 * limit + 1:
                break
    return "".join(lines)


def _rows_of_dataset(ds, limit: int | None = None, sample: tuple = (None, 0)) -> list[tuple[str, dict]]:
    if hasattr(ds, "keys"):  # a DatasetDict: train on its train split
        splits = list(ds.keys())
        if "train" not in splits and len(splits) != 1:
            raise DataError(f"the dataset has splits {splits} but no 'train' split; save the split "
                            "you want to train on as its own dataset.")
        ds = ds["train" if "train" in splits else splits[0]]
    rows = _sample_indices(len(ds), *sample) or range(len(ds))
    rows = list(rows)[:limit] if limit is not None else rows
    if len(rows) < len(ds):
        ds = ds.select(rows)
    return [(f"row {i + 1} (1-based)", row) for i, row in zip(rows, ds.to_list())]


def _text(row: dict, key: str, where: str, need: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if not required:
            return ""
        problem = "missing" if value is None else "empty"
        raise DataError(f"{where}: {problem} '{key}' ({need}).")
    if not isinstance(value, str):
        # The message names the row and the type, never the value: errors must not echo file contents.
        kind = type(value).__name__
        raise DataError(f"{where}: '{key}' must be text, got {'an' if kind[0] in 'aeiou' else 'a'} {kind}.")
    return value


def _turns(row: dict, key: str, role_key: str, text_key: str, where: str) -> list[dict]:
    turns = row.get(key)
    if isinstance(turns, str):  # CSV cells hold the list as JSON text
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: '{key}' is not valid JSON ({e.msg}); write it as a JSON list.") from None
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: '{key}' must be a non-empty list of {{{role_key}, {text_key}}} objects.")
    out, seen_user = [], False
    for j, turn in enumerate(turns, 1):
        at = f"{where} message {j}"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: expected an object {{{role_key}, {text_key}}}, got {type(turn).__name__}.")
        raw_role = str(turn.get(role_key, "")).lower()
        role = _ROLES.get(raw_role) if raw_role in _ROLE_NAMES[key] else None
        if role is None:
            raise DataError(f"{at}: '{role_key}' is not one of {_ROLE_NAMES[key]}; use one of those.")
        content = _text(turn, text_key, at, f"every {role} message needs text")
        if role == "assistant" and not seen_user:
            raise DataError(f"{at}: assistant reply before any user message; start with a user "
                            "turn (after an optional system message).")
        seen_user |= role == "user"
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant reply to learn from; add a turn with role 'assistant'.")
    return out


def _normalize(fmt: str, row: dict, where: str) -> dict:
    need = FORMATS[fmt][1]
    if fmt == "text":
        return {"text": _text(row, "text", where, need)}
    if fmt == "chat":
        return {"messages": _turns(row, "messages", "role", "content", where)}
    if fmt == "sharegpt":
        return {"messages": _turns(row, "conversations", "from", "value", where)}
    instruction, output = _text(row, "instruction", where, need), _text(row, "output", where, need)
    extra = _text(row, "input", where, need, required=False)
    system = _text(row, "system", where, need, required=False)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    head = [{"role": "system", "content": system}] if system else []
    return {"messages": head + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}


def render_segments(record: dict, tokenizer) -> list[tuple[str, bool]]:
    """The record's full rendered text as ``(piece, supervised)`` pairs, in order.

    With a chat template, each assistant reply is located by rendering the conversation
    before it with ``add_generation_prompt=True`` and the conversation through it: the
    reply is the difference, so every template marker stays unsupervised while the
    reply's end-of-turn token (e.g. ``<|im_end|>``) is supervised. Whitespace the
    template puts after that token is not, so the model learns to stop at the token.
    """
    eos = tokenizer.eos_token or ""
    if "text" in record:
        return [(record["text"] + eos, True)]
    messages = record["messages"]
    if not getattr(tokenizer, "chat_template", None):
        return _plain_segments(messages, eos)
    full = _chat(tokenizer, messages, False)
    segments, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix, through = _chat(tokenizer, messages[:i], True), _chat(tokenizer, messages[:i + 1], False)
        if not (through.startswith(prefix) and full.startswith(through) and len(prefix) >= cursor):
            raise DataError("the tokenizer's chat template renders earlier turns differently once later "
                            "turns are added, so reply tokens cannot be located; use single-turn records "
                            "or a tokenizer without a chat template (plain '### Instruction' format).")
        reply = through[len(prefix):]
        body = reply.rstrip()
        segments += [(full[cursor:len(prefix)], False), (body, True), (reply[len(body):], False)]
        cursor = len(through)
    segments.append((full[cursor:], False))
    return [s for s in segments if s[0]]


def render_prompt(messages: list[dict], tokenizer) -> str:
    """Text to generate the next assistant reply from, rendered exactly as in training."""
    if getattr(tokenizer, "chat_template", None):
        return _chat(tokenizer, messages, True)
    return "".join(p for p, _ in _plain_segments(messages, tokenizer.eos_token or "")) + "### Response:\n"


def encode_prompt(messages: list[dict], tokenizer) -> list[int]:
    """Token ids of ``render_prompt`` with the same leading special tokens as training."""
    ids = _encode(tokenizer, render_prompt(messages, tokenizer))
    bos = _leading_special_ids(tokenizer)
    return ids if ids[:len(bos)] == bos else bos + ids


def tokenize_records(records: list[dict], tokenizer, seq_len: int) -> list[dict]:
    """Token ids and labels (-100 except reply tokens), truncated to ``seq_len`` tokens.

    The rendered text is encoded once, so ``input_ids`` are exactly the ids of the whole
    conversation (``apply_chat_template(..., tokenize=True)``) that inference continues from;
    see :func:`_encode_labelled` for which tokens are supervised. Labels are aligned with
    ``input_ids`` (the model shifts them). Examples with no supervised token left after
    truncation are dropped.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len={seq_len} is too short; use at least 8 tokens (typical: 256-2048).")
    if not records:
        raise DataError("no records to tokenize; the dataset is empty.")
    bos, out = _leading_special_ids(tokenizer), []
    for record in records:
        ids, labels = _encode_labelled(tokenizer, render_segments(record, tokenizer))
        if ids[:len(bos)] != bos:
            ids, labels = bos + ids, [IGNORE] * len(bos) + labels
        ids, labels = ids[:seq_len], labels[:seq_len]
        # The first label is never predicted (nothing precedes it), so it does not count.
        if any(label != IGNORE for label in labels[1:]):
            out.append({"input_ids": ids, "labels": labels})
    if not out:
        raise DataError(f"all {len(records)} records lose their whole reply when cut to seq_len={seq_len} "
                        "tokens; raise seq_len or shorten the prompts.")
    return out


def split_records(records: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic ``(train, eval)`` split; eval gets ``round(n * eval_fraction)`` records,
    at least one, and train keeps at least one. Both keep the original record order."""
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction={eval_fraction} must be between 0 and 1 (typical: 0.05-0.1).")
    n = len(records)
    if n < 2:
        raise DataError(f"the dataset has {n} record(s); at least 2 are needed (one to train on, "
                        "one to evaluate), so add more records.")
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask``, ``labels`` LongTensors of shape
    ``(batch, longest)``; padding has attention 0 and label -100."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def preview(source: str, tokenizer, n: int = 3) -> tuple[list[str], int]:
    """The first ``n`` records rendered as training text, and the total record count."""
    records = load_records(source)
    return ["".join(p for p, _ in render_segments(r, tokenizer)) for r in records[:n]], len(records)


def _chat(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # templates raise jinja's TemplateError for conversations they reject
        raise DataError(f"the model's chat template rejects this conversation ({e}); change the records to "
                        "the turn order it expects (e.g. no system message, strictly alternating user and "
                        "assistant).") from None


def _plain_segments(messages: list[dict], eos: str) -> list[tuple[str, bool]]:
    """Fallback format for tokenizers without a chat template."""
    segments = []
    for m in messages:
        if m["role"] == "system":
            segments.append((f"{m['content']}\n\n", False))
        elif m["role"] == "user":
            segments.append((f"### Instruction:\n{m['content']}\n\n", False))
        else:
            segments += [("### Response:\n", False), (m["content"] + eos, True), ("\n\n", False)]
    return segments


def _encode(tokenizer, text: str) -> list[int]:
    # Special tokens written in the text (template markers) are kept; none are added.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_labelled(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of the segments' joined text, encoded in one call.

    Segment by segment, tokenizers that prepend '▁' to each call (SentencePiece) or merge
    across a boundary would give other ids than the conversation seen at inference. A token
    is supervised when its characters overlap a supervised segment, so a token that joins
    a space and the reply's first word (SentencePiece's '▁Blue') is learned whichever side
    of the boundary the template puts the space; template markers and the whitespace after
    an end-of-turn token touch no supervised character. Tokenizers without character offsets
    (slow, pure Python) are encoded segment by segment.
    """
    if not getattr(tokenizer, "is_fast", False):
        return _encode_piecewise(tokenizer, segments)
    text = "".join(piece for piece, _ in segments)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # supervised_before[i]: how many supervised characters precede position i of ``text``.
    supervised_before = [0, *accumulate(int(sup) for piece, sup in segments for _ in piece)]
    ids = list(enc["input_ids"])
    labels = [i if supervised_before[end] > supervised_before[start] else IGNORE
              for i, (start, end) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def _encode_piecewise(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for piece, supervised in segments:
        tokens = _encode(tokenizer, piece)
        ids += tokens
        labels += tokens if supervised else [IGNORE] * len(tokens)
    return ids, labels


def _leading_special_ids(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before any text (e.g. LLaMA's BOS); [] for most chat models."""
    plain = _encode(tokenizer, "a")
    full = list(tokenizer("a")["input_ids"])
    return full[:full.index(plain[0])] if plain and plain[0] in full else []


def data_identity(source: str) -> str:
    """``builtin:NAME``, or the size and SHA-256 of a data file (of each file, for a folder)."""
    import hashlib

    path = Path(str(source)).expanduser()
    if not path.exists():
        return str(source)  # built-in sets and cached dataset names are their own identity
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{f.stat().st_size}:".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return f"{sum(f.stat().st_size for f in files)} bytes, sha256 {digest.hexdigest()[:16]}"
