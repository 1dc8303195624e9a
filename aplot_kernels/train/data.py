"""Preference data for ``aplot-kernels train``: the built-in generator and TRL-format files.

Built-in data (:func:`generate`), deterministic for a given seed
----------------------------------------------------------------

Every example is a prompt that states a few facts and asks about one of them,
a *chosen* answer that restates the asked fact correctly, and a *rejected*
answer of one of two kinds:

* **hard** (a near miss, half of the pairs): the chosen answer with exactly
  one detail changed -- a different number, day, time, place or name, or the
  yes/no fact negated. Every prompt states two facts of the same kind and
  asks about one; the changed detail is usually taken from the other fact,
  so the rejected answer uses only words of the prompt. It is close to the
  chosen answer in wording and meaning; telling them apart needs reading
  which fact the question asks about.
* **easy**: an off-topic sentence from an unrelated pool, or an obviously bad
  answer (a refusal, "I don't know", keyboard noise, the topic word repeated).

Splits (each a list of dicts with ``prompt``, ``chosen``, ``rejected``,
``kind`` = ``"hard"``/``"easy"`` and ``domain``):

* ``train`` and ``test_id``: in-distribution domains ``schedule``,
  ``inventory``, ``location``, ``preference`` (templates in ``ID_DOMAINS``);
  ``test_id`` holds no pair that is also in ``train``.
* ``test_ood``: out-of-distribution domains ``sports``, ``price``,
  ``flight``, ``habit`` with different templates, vocabularies, off-topic
  sentences and bad answers (``OOD_DOMAINS``).

Recipe: one ``random.Random`` per split, seeded from ``(seed, split name)``;
each example picks a domain uniformly, fills its template's slots, and
draws hard/easy with probability ``hard_fraction`` (0.5). Nothing depends on
the global random state or on the platform.

Files (:func:`load_preference_file`): TRL's preference format in ``.jsonl``,
``.json``, ``.parquet`` or ``.csv``: columns ``chosen``, ``rejected``,
optional ``prompt`` and ``margin``. Conversational rows (lists of
``{"role", "content"}`` messages) are flattened to text, one message per line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["generate", "load_preference_file", "split_holdout", "SPLITS", "ID_DOMAINS", "OOD_DOMAINS"]

SPLITS = ("train", "test_id", "test_ood")
Pair = Dict[str, object]

# ---------------------------------------------------------------------------
# Vocabularies
# ---------------------------------------------------------------------------

NAMES = [
    "Anna",
    "Ben",
    "Clara",
    "David",
    "Emma",
    "Felix",
    "Grace",
    "Hugo",
    "Iris",
    "Jonas",
    "Kira",
    "Leo",
    "Maya",
    "Noah",
    "Olga",
    "Paul",
    "Rosa",
    "Sam",
    "Tara",
    "Victor",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["8 am", "9 am", "10 am", "11 am", "noon", "1 pm", "2 pm", "3 pm", "4 pm", "5 pm", "6 pm", "7 pm"]
EVENTS = [
    "team meeting",
    "dentist appointment",
    "yoga class",
    "piano lesson",
    "book club",
    "job interview",
    "science exam",
    "birthday party",
    "football practice",
    "doctor visit",
]
ITEMS = ["apples", "pencils", "books", "stamps", "marbles", "candles", "plates", "shirts", "coins", "cups"]
CONTAINERS = ["basket", "drawer", "box", "bag", "cupboard", "crate"]
OBJECTS = ["keys", "wallet", "umbrella", "phone", "glasses", "notebook", "scarf", "laptop", "camera", "ticket"]
ROOMS = ["kitchen", "garage", "bedroom", "hallway", "attic", "office", "garden", "bathroom", "basement", "car"]
FOODS = ["olives", "mushrooms", "spinach", "chocolate", "cheese", "garlic", "pineapple", "tomatoes", "rice", "fish"]

TEAMS = ["Falcons", "Tigers", "Rovers", "Comets", "Giants", "Sharks", "Wolves", "Pilots", "Rangers", "Bears"]
PRODUCTS = ["lamp", "kettle", "backpack", "helmet", "blender", "jacket", "printer", "guitar", "toaster", "tent"]
STORES = ["the corner shop", "the market", "the mall", "the outlet", "the hardware store"]
CITIES = ["Lisbon", "Oslo", "Madrid", "Vienna", "Dublin", "Prague", "Athens", "Warsaw", "Zurich", "Helsinki"]
ACTIVITIES = [
    ("swims", "swim"),
    ("cycles to work", "cycle to work"),
    ("drinks coffee", "drink coffee"),
    ("reads the news", "read the news"),
    ("plays chess", "play chess"),
    ("walks the dog", "walk the dog"),
    ("cooks dinner", "cook dinner"),
    ("takes the bus", "take the bus"),
    ("watches films", "watch films"),
    ("goes running", "go running"),
]

ID_OFF_TOPIC = [
    "The Pacific is the largest ocean on Earth.",
    "Photosynthesis turns light into chemical energy.",
    "A violin has four strings.",
    "Mount Everest is in the Himalayas.",
    "Honey never spoils if it is sealed.",
    "The moon orbits the Earth about once a month.",
    "Penguins cannot fly but they swim well.",
    "Copper is a good conductor of electricity.",
]
OOD_OFF_TOPIC = [
    "Volcanoes can form new islands.",
    "Owls hunt mostly at night.",
    "Glass is made by melting sand.",
    "The heart pumps blood through the body.",
    "Some trees live for thousands of years.",
    "Lightning is hotter than the surface of the sun.",
]
ID_BAD = ["I don't know.", "Sorry, I cannot help with that.", "asdf qwerty zxcv", "Maybe. Who knows?"]
OOD_BAD = ["No idea, ask someone else.", "lorem ipsum dolor", "That is not my problem.", "Hmm hmm hmm."]


def _other(rng: random.Random, options: Sequence, value):
    return rng.choice([o for o in options if o != value])


def _near_number(rng: random.Random, value: int, low: int = 1) -> int:
    return max(low, value + rng.choice([-3, -2, -1, 1, 2, 3])) if value > low + 3 else value + rng.randint(1, 3)


# ---------------------------------------------------------------------------
# Domains: each returns (prompt, chosen, hard rejected, topic word). A prompt
# states two facts and asks about one; the hard rejected answer takes one
# detail from the other fact (or, less often, a fresh value), so that no word
# of it is foreign to the prompt.
# ---------------------------------------------------------------------------


def _swap(rng: random.Random, options: Sequence, value, distractor):
    """The distractor's value when it differs (3 times in 4), else another value."""
    if distractor != value and rng.random() < 0.75:
        return distractor
    return _other(rng, options, value)


def _both(rng: random.Random, facts: List[str], capitalise: bool = True) -> str:
    """Two facts joined by "and", in random order (the asked one is not always first)."""
    first, second = facts if rng.random() < 0.5 else facts[::-1]
    text = f"{first} and {second}"
    return text[0].upper() + text[1:] if capitalise else text


def _schedule(rng):
    (event, other), (day, day2), (time, time2) = rng.sample(EVENTS, 2), rng.choices(DAYS, k=2), rng.choices(TIMES, k=2)
    facts = [f"the {event} is on {day} at {time}", f"the {other} is on {day2} at {time2}"]
    prompt = f"{_both(rng, facts)}. When is the {event}?"
    chosen = f"The {event} is on {day} at {time}."
    if rng.random() < 0.5:
        hard = f"The {event} is on {_swap(rng, DAYS, day, day2)} at {time}."
    else:
        hard = f"The {event} is on {day} at {_swap(rng, TIMES, time, time2)}."
    return prompt, chosen, hard, event


def _inventory(rng):
    name, (item, item2), box = rng.choice(NAMES), rng.sample(ITEMS, 2), rng.choice(CONTAINERS)
    k, k2 = rng.sample(range(2, 20), 2)
    prompt = f"{name} has {_both(rng, [f'{k} {item}', f'{k2} {item2}'], False)} in the {box}. How many {item} does {name} have?"
    wrong = k2 if rng.random() < 0.75 else _near_number(rng, k)
    return prompt, f"{name} has {k} {item}.", f"{name} has {wrong} {item}.", item


def _location(rng):
    name, (obj, obj2), (room, room2) = rng.choice(NAMES), rng.sample(OBJECTS, 2), rng.sample(ROOMS, 2)
    prompt = f"{name} left {_both(rng, [f'the {obj} in the {room}', f'the {obj2} in the {room2}'], False)}. Where is the {obj}?"
    return prompt, f"The {obj} is in the {room}.", f"The {obj} is in the {_swap(rng, ROOMS, room, room2)}.", obj


def _preference(rng):
    name, (liked, disliked) = rng.choice(NAMES), rng.sample(FOODS, 2)
    fact = (
        f"{name} likes {liked} but does not like {disliked}."
        if rng.random() < 0.5
        else f"{name} does not like {disliked} but likes {liked}."
    )
    food = rng.choice([liked, disliked])
    yes, no = f"Yes, {name} likes {food}.", f"No, {name} does not like {food}."
    good, bad = (yes, no) if food == liked else (no, yes)
    return f"{fact} Does {name} like {food}?", good, bad, food


def _sports(rng):
    (w1, l1, w2, l2), first = rng.sample(TEAMS, 4), rng.random() < 0.5
    (a1, b1), (a2, b2) = sorted(rng.sample(range(0, 10), 2), reverse=True), sorted(rng.sample(range(0, 10), 2), reverse=True)
    prompt = (
        f"Yesterday the {w1} beat the {l1} {a1} to {b1}, and the {w2} beat the {l2} {a2} to {b2}. "
        f"What was the score of the {w1 if first else w2} game?"
    )
    w, a, b, ao = (w1, a1, b1, a2) if first else (w2, a2, b2, a1)
    chosen = f"The {w} won {a} to {b}."
    hard = (
        f"The {w} won {ao if ao != a else a + 1} to {b}." if rng.random() < 0.5 else f"The {l1 if first else l2} won {a} to {b}."
    )
    return prompt, chosen, hard, w


def _price(rng):
    (product, product2), store = rng.sample(PRODUCTS, 2), rng.choice(STORES)
    p, p2 = rng.sample(range(12, 96), 2)
    prompt = (
        f"At {store}, a {product2} is sold for {p2} dollars and a {product} for {p} dollars. What does the {product} cost there?"
    )
    wrong = p2 if rng.random() < 0.75 else _near_number(rng, p)
    return prompt, f"The {product} costs {p} dollars.", f"The {product} costs {wrong} dollars.", product


def _flight(rng):
    codes = [f"{c}{rng.randint(100, 999)}" for c in rng.sample("ABCDEFGH", 2)]
    (city, city2), (gate, gate2) = rng.sample(CITIES, 2), rng.sample(range(1, 41), 2)
    code = codes[0]
    prompt = (
        f"Flight {codes[1]} to {city2} departs from gate {gate2}, while passengers for flight {code} to {city} "
        f"board at gate {gate}. Which gate is flight {code}?"
    )
    if rng.random() < 0.5:
        hard = f"Flight {code} to {city} boards at gate {_swap(rng, range(1, 41), gate, gate2)}."
    else:
        hard = f"Flight {code} to {_swap(rng, CITIES, city, city2)} boards at gate {gate}."
    return prompt, f"Flight {code} to {city} boards at gate {gate}.", hard, city


def _habit(rng):
    name, ((does, do), (never, never_base)) = rng.choice(NAMES), rng.sample(ACTIVITIES, 2)
    prompt_fact = f"Every day {name} {does}, but {name} never {never}."
    asked_often = rng.random() < 0.5
    activity, base = (does, do) if asked_often else (never, never_base)
    yes, no = f"Yes, {name} {activity} every day.", f"No, {name} never {activity}."
    good, bad = (yes, no) if asked_often else (no, yes)
    return f"{prompt_fact} Does {name} ever {base}?", good, bad, name


ID_DOMAINS: Dict[str, Callable] = {
    "schedule": _schedule,
    "inventory": _inventory,
    "location": _location,
    "preference": _preference,
}
OOD_DOMAINS: Dict[str, Callable] = {"sports": _sports, "price": _price, "flight": _flight, "habit": _habit}


def _easy(rng: random.Random, topic: str, off_topic: Sequence[str], bad: Sequence[str]) -> str:
    roll = rng.random()
    if roll < 0.5:
        return rng.choice(off_topic)
    if roll < 0.85:
        return rng.choice(bad)
    return " ".join([topic] * rng.randint(3, 5))


def _split_seed(seed: int, split: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{split}".encode()).digest()[:8], "little")


def _key(pair: Pair) -> Tuple:
    return pair["prompt"], pair["chosen"], pair["rejected"]


def _make_split(split: str, size: int, seed: int, hard_fraction: float, exclude=frozenset()) -> List[Pair]:
    rng = random.Random(_split_seed(seed, split))
    ood = split == "test_ood"
    domains = OOD_DOMAINS if ood else ID_DOMAINS
    off_topic, bad = (OOD_OFF_TOPIC, OOD_BAD) if ood else (ID_OFF_TOPIC, ID_BAD)
    names = sorted(domains)
    pairs: List[Pair] = []
    seen = set(exclude)
    attempts = 0
    while len(pairs) < size:
        attempts += 1
        if attempts > 50 * size + 1000:
            raise RuntimeError(f"could not draw {size} distinct pairs for split {split!r}")
        domain = rng.choice(names)
        prompt, chosen, hard, topic = domains[domain](rng)
        kind = "hard" if rng.random() < hard_fraction else "easy"
        rejected = hard if kind == "hard" else _easy(rng, topic, off_topic, bad)
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind, "domain": domain}
        if _key(pair) in seen:
            continue
        seen.add(_key(pair))
        pairs.append(pair)
    return pairs


def generate(
    *, seed: int = 0, n_train: int = 1024, n_test: int = 256, n_ood: int = 256, hard_fraction: float = 0.5
) -> Dict[str, List[Pair]]:
    """The built-in preference data: ``{"train": [...], "test_id": [...], "test_ood": [...]}`` (see module docstring)."""
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"`hard_fraction` must lie in [0, 1], got {hard_fraction}")
    for name, value in (("n_train", n_train), ("n_test", n_test), ("n_ood", n_ood)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    train = _make_split("train", n_train, seed, hard_fraction)
    test_id = _make_split("test_id", n_test, seed, hard_fraction, exclude=frozenset(map(_key, train)))
    test_ood = _make_split("test_ood", n_ood, seed, hard_fraction)
    return {"train": train, "test_id": test_id, "test_ood": test_ood}


# ---------------------------------------------------------------------------
# Files in TRL's preference format
# ---------------------------------------------------------------------------


def _as_text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # conversational: [{"role": ..., "content": ...}, ...]
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    if value is None:
        return ""
    return str(value)


def _read_rows(path: str) -> List[dict]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if ext == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, list) else data.get("data", data.get("train", []))
    if ext == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    if ext == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"`data` must be a .jsonl, .json, .parquet or .csv file, got {path!r}")


def load_preference_file(path: str) -> List[Pair]:
    """Pairs from a TRL-format file: ``[{"prompt", "chosen", "rejected"[, "margin"]}, ...]``."""
    if not os.path.isfile(path):
        raise ValueError(f"`data`: no such file {path!r}")
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"`data`: {path!r} holds no rows")
    missing = {"chosen", "rejected"} - set(rows[0])
    if missing:
        raise ValueError(
            f"`data`: {path!r} lacks column(s) {sorted(missing)} (TRL's format: chosen, rejected, optional prompt, margin)"
        )
    pairs = []
    for row in rows:
        pair: Pair = {
            "prompt": _as_text(row.get("prompt")),
            "chosen": _as_text(row["chosen"]),
            "rejected": _as_text(row["rejected"]),
            "kind": str(row.get("kind") or ""),
            "domain": str(row.get("domain") or ""),
        }
        if row.get("margin") not in (None, ""):
            pair["margin"] = float(row["margin"])
        pairs.append(pair)
    return pairs


def split_holdout(pairs: List[Pair], fraction: float, seed: int) -> Tuple[List[Pair], List[Pair]]:
    """A seeded ``(train, held_out)`` split of a file's pairs."""
    order = list(range(len(pairs)))
    random.Random(_split_seed(seed, "holdout")).shuffle(order)
    n_held = max(1, int(round(fraction * len(pairs)))) if len(pairs) > 1 else 0
    held = sorted(order[:n_held])
    kept = sorted(order[n_held:])
    return [pairs[i] for i in kept], [pairs[i] for i in held]


def save_jsonl(pairs: List[Pair], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair) + "\n")


def describe(splits: Dict[str, Optional[List[Pair]]]) -> str:
    parts = []
    for name, pairs in splits.items():
        if pairs:
            hard = sum(p.get("kind") == "hard" for p in pairs)
            parts.append(f"{name}={len(pairs)} ({hard} hard)")
    return ", ".join(parts)
