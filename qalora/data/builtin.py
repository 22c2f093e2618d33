"""The built-in dataset: generated in code, deterministic, no copied text.

``builtin:contacts`` (alias ``builtin:default``) teaches one crisp, checkable skill
that a small instruct model lacks out of the box: turn a sentence about a person
into a contact card in a fixed JSON schema, e.g.

    user:      "Make a contact card: Meet Amara Okafor, a 34-year-old from Lisbon."
    assistant: '{"name": "Amara Okafor", "age": 34, "city": "Lisbon"}'

The prompts never describe the schema (key names, integer age, no prose), so the
base model cannot guess it; replies are short, so a few hundred steps of training
are enough to learn it, which lets a new user see fine-tuning work.
"""
from __future__ import annotations

import json
import random
from typing import Callable

from qalora.errors import DataError

DEFAULT_SIZE = 1200
TRAIN_SEED = 0
# A different seed gives prompts the model has (almost surely) not been trained on;
# any exact collisions with the training set are dropped in ``heldout_records``.
HELDOUT_SEED = 1_000_003

_FIRST = ("Amara", "Bruno", "Chen", "Dalia", "Emeka", "Freya", "Goran", "Hana", "Ines", "Jonas",
          "Kofi", "Leila", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sanjay", "Tove",
          "Umar", "Vera", "Wen", "Ximena", "Yusuf", "Zofia", "Aiko", "Bilal", "Carmen", "Dmitri",
          "Elif", "Farid", "Greta", "Hugo", "Isla", "Jamal", "Keiko", "Lars", "Mina", "Nikolai")
_LAST = ("Okafor", "Silva", "Lindqvist", "Haddad", "Novak", "Tanaka", "Moreau", "Kowalski",
         "Mensah", "Petrov", "Rahman", "Costa", "Fischer", "Nguyen", "Ortega", "Bauer", "Sato",
         "Adeyemi", "Larsen", "Ferreira", "Kaya", "Dubois", "Ivanova", "Mbeki", "Romano", "Park",
         "Quispe", "Weber", "Yilmaz", "Zhou")
_CITIES = ("Lisbon", "Nairobi", "Osaka", "Toronto", "Lima", "Oslo", "Hanoi", "Dakar", "Porto",
           "Krakow", "Denver", "Seville", "Tbilisi", "Accra", "Busan", "Leeds", "Quito", "Tunis",
           "Bergen", "Austin", "Buenos Aires", "Kuala Lumpur", "New Orleans", "Cape Town", "Tel Aviv",
           "Sao Paulo", "Rio de Janeiro", "Mexico City", "Hong Kong", "Salt Lake City", "Zurich",
           "Marrakesh", "Glasgow", "Adelaide", "Montreal", "Valencia", "Bangalore", "Utrecht",
           "Gdansk", "Halifax")
_SENTENCES = (
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{name} ({age}) has an apartment in {city}.",
    "I met {name} in {city}; they are {age}.",
    "Born {age} years ago, {name} now calls {city} home.",
    "{city} resident {name}, age {age}, signed up today.",
    "New member: {name}, {age}, based in {city}.",
    "{name} turned {age} last month and still lives in {city}.",
    "Our driver in {city} is {name}, who is {age}.",
    "Age {age}. Name {name}. Home town {city}.",
    "From {city}: {name}, {age} years young.",
    "{name}, who is {age}, works from {city}.",
    "The new tenant in {city} is {name}, {age} years of age.",
    "{name} moved to {city} at {age} and never left.",
)
_REQUESTS = (
    "Make a contact card: {s}",
    "Contact card, please.\n{s}",
    "{s}\nTurn this into a contact card.",
    "Card this person: {s}",
    "Please file a contact card for the following.\n\n{s}",
    "{s} Contact card?",
    "Write the contact card.\nText: {s}",
    "contact card -> {s}",
)


def _record(rng: random.Random) -> dict:
    name = rng.choice(_FIRST)
    if rng.random() < 0.7:
        name = f"{name} {rng.choice(_LAST)}"
    age, city = rng.randint(18, 89), rng.choice(_CITIES)
    sentence = rng.choice(_SENTENCES).format(name=name, age=age, city=city)
    prompt = rng.choice(_REQUESTS).format(s=sentence)
    card = json.dumps({"name": name, "age": age, "city": city})
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": card}]}


def contact_records(n: int = DEFAULT_SIZE, seed: int = TRAIN_SEED) -> list[dict]:
    """``n`` generated chat records; the same ``(n, seed)`` always gives the same list."""
    rng = random.Random(seed)
    return [_record(rng) for _ in range(n)]


def heldout_records(n: int) -> list[dict]:
    """``n`` contact records whose prompts do not occur in the built-in training set."""
    seen = {r["messages"][0]["content"] for r in contact_records()}
    rng, out = random.Random(HELDOUT_SEED), []
    while len(out) < n:
        rec = _record(rng)
        if rec["messages"][0]["content"] not in seen:
            out.append(rec)
    return out


_BUILTINS: dict[str, Callable[[], list[dict]]] = {"contacts": contact_records}
_ALIASES = {"default": "contacts"}


def builtin_names() -> list[str]:
    """Names accepted after ``builtin:`` (the alias ``default`` is accepted too)."""
    return sorted(_BUILTINS)


def builtin_records(name: str) -> list[dict]:
    """Normalized records of a built-in dataset; unknown names raise DataError."""
    key = _ALIASES.get(name, name)
    if key not in _BUILTINS:
        choices = ", ".join(f"builtin:{n}" for n in builtin_names() + sorted(_ALIASES))
        raise DataError(f"builtin:{name} is not a built-in dataset; choose one of {choices}.")
    return _BUILTINS[key]()


def check_reply(reply: str, expected: str) -> bool:
    """True when ``reply`` is exactly the expected JSON object (whitespace-insensitive)."""
    try:
        return json.loads(reply.strip()) == json.loads(expected)
    except json.JSONDecodeError:
        return False


def builtin_skill_check(records: list[dict] | None, generate_fn: Callable[[list[dict]], str],
                        n: int = 20) -> float:
    """Fraction of ``n`` held-out prompts whose generated reply passes ``check_reply``.

    ``records``: chat records whose final assistant turn is the expected card (e.g. the
    eval split of ``builtin:contacts``); ``None`` uses ``heldout_records(n)``.
    ``generate_fn(messages) -> str`` gets the conversation up to (not including) that
    assistant turn and returns the model's reply text.
    """
    pool = heldout_records(n) if records is None else records
    cases = [r["messages"] for r in pool if r.get("messages") and r["messages"][-1]["role"] == "assistant"][:n]
    if not cases:
        raise DataError("builtin_skill_check needs chat records ending in an assistant reply; "
                        "pass the eval split of builtin:contacts or None.")
    passed = sum(check_reply(generate_fn(m[:-1]), m[-1]["content"]) for m in cases)
    return passed / len(cases)
