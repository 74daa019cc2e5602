"""Grade-school word problems with worked solutions, in the spirit of GSM8K.

A problem follows one quantity through 1 to 4 arithmetic steps (+, -, *, exact /, numbers up to 3 digits).
Every solution line shows its arithmetic; the last line is ``#### N``. ``problem(seed)`` is deterministic;
the train and test splits draw seeds from disjoint ranges.

The ``hard`` level (5 or 6 steps, so about twice the solution length) is not in the bundled models' training:
a model trained on it too (``train_model --hard-fraction``) is less sure there, and its test split
``hard-test`` measures decoding with headroom; ``hard-train`` gives prompts for a filter's replay data and
validation problems at that level.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

TRAIN_SEEDS = range(0, 1_000_000_000)
TEST_SEEDS = range(1_000_000_000, 1_000_100_000)
HARD_TEST_SEEDS = range(1_000_100_000, 1_000_200_000)
# level -> (choices of the number of operations, most solution lines)
LEVELS = {"base": ((1, 1, 2, 2, 2, 3, 3, 4), 4), "hard": ((5, 6), 6)}
SPLITS = {"train": (TRAIN_SEEDS, "base"), "test": (TEST_SEEDS, "base"), "hard-train": (TRAIN_SEEDS, "hard"),
          "hard-test": (HARD_TEST_SEEDS, "hard")}

NAMES = [
    ("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Noah", "he"), ("Zoe", "she"), ("Liam", "he"),
    ("Emma", "she"), ("Omar", "he"), ("Nora", "she"), ("Ravi", "he"), ("Lena", "she"), ("Sam", "he"),
    ("Ines", "she"), ("Kai", "he"), ("Maya", "she"), ("Theo", "he"), ("Iris", "she"), ("Jonas", "he"),
    ("Aisha", "she"), ("Diego", "he"), ("Yuki", "she"), ("Felix", "he"), ("Clara", "she"), ("Hugo", "he"),
]
OBJECTS = [
    ("apples", "bag"), ("marbles", "jar"), ("stickers", "sheet"), ("cookies", "tray"), ("pencils", "box"),
    ("stamps", "album"), ("shells", "bucket"), ("coins", "purse"), ("cards", "pack"), ("books", "shelf"),
    ("eggs", "carton"), ("beads", "string"), ("flowers", "vase"), ("candles", "crate"), ("buttons", "tin"),
    ("lemons", "basket"), ("toy cars", "case"), ("balloons", "bundle"), ("crayons", "set"), ("oranges", "sack"),
]
PLACES = ["at the market", "at school", "on the farm", "at the fair", "in the garden", "at the shop", "at home"]
MAX_VALUE = 999


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # worked lines, then "#### N"
    answer: int

    @property
    def steps(self) -> int:
        return self.solution.count("=")


def _step(rng: random.Random, v: int, who: str, pron: str, obj: str, box: str, friend: str):
    """One operation on the running value v: (question sentence, solution lines, new value) or None."""
    kind = rng.choice(["add", "sub", "groups", "mul", "div", "add", "sub"])
    cap = pron.capitalize()
    if kind == "add" and v < MAX_VALUE - 1:
        x = rng.randint(1, min(MAX_VALUE - v, 120))
        where = rng.choice(PLACES)
        q = rng.choice([f"{cap} gets {x} more {obj} {where}.", f"{friend} gives {who} {x} {obj}.",
                        f"Then {pron} finds {x} {obj} {where}."])
        return q, [f"{who} gets {x} more, so {v} + {x} = {v + x} {obj}."], v + x
    if kind == "sub" and v > 1:
        x = rng.randint(1, min(v - 1, 120))
        q = rng.choice([f"{cap} gives {x} {obj} to {friend}.", f"{cap} loses {x} {obj}.",
                        f"{cap} sells {x} of the {obj} {rng.choice(PLACES)}."])
        return q, [f"{who} gives away {x}, so {v} - {x} = {v - x} {obj}."], v - x
    if kind == "groups":
        n, m = rng.randint(2, 6), rng.randint(2, 20)
        if v + n * m <= MAX_VALUE:
            q = f"{cap} buys {n} {box}s with {m} {obj} in each {box}."
            lines = [f"The {box}s hold {n} * {m} = {n * m} {obj}.", f"Now {who} has {v} + {n * m} = {v + n * m} {obj}."]
            return q, lines, v + n * m
    if kind == "mul":
        k = rng.randint(2, 3)
        if v * k <= MAX_VALUE:
            word = {2: "twice", 3: "three times"}[k]
            q = f"Then {pron} ends up with {word} as many {obj} as before."
            return q, [f"{word.capitalize()} as many is {v} * {k} = {v * k} {obj}."], v * k
    if kind == "div":
        ks = [k for k in range(2, 6) if v % k == 0]
        if ks:
            k = rng.choice(ks)
            q = f"{cap} shares the {obj} equally among {k} friends and keeps one share."
            return q, [f"One share is {v} / {k} = {v // k} {obj}."], v // k
    return None


def problem(seed: int, level: str = "base") -> Problem:
    """The problem for ``seed`` at ``level`` (the same seed and level always give the same problem)."""
    if level not in LEVELS:
        raise ValueError(f"level {level!r}: expected one of {list(LEVELS)}")
    ops, max_lines = LEVELS[level]
    rng = random.Random(seed)
    (who, pron), (friend, _) = rng.sample(NAMES, 2)
    obj, box = rng.choice(OBJECTS)
    n_ops = rng.choice(ops)
    v = rng.randint(2, 200)
    opening = rng.choice([f"{who} has {v} {obj}.", f"{who} starts with {v} {obj}.",
                          f"There are {v} {obj} in {who}'s room."])
    sentences, lines = [opening], [f"{who} starts with {v} {obj}."]
    steps = 0
    while steps < n_ops:
        out = _step(rng, v, who, pron, obj, box, friend)
        if out is None or steps + len(out[1]) > max_lines:
            continue
        q, sol, v = out
        sentences.append(q)
        lines += sol
        steps += len(sol)
    sentences.append(f"How many {obj} does {who} have now?")
    lines.append(f"#### {v}")
    return Problem(" ".join(sentences), "\n".join(lines), v)


def split(name: str, n: int, offset: int = 0) -> list[Problem]:
    """The first ``n`` problems (after ``offset``) of a split: ``train``, ``test``, ``hard-train``, ``hard-test``."""
    if name not in SPLITS:
        raise ValueError(f"split {name!r}: expected one of {list(SPLITS)}")
    seeds, level = SPLITS[name]
    if offset + n > len(seeds):
        raise ValueError(f"the {name} split has {len(seeds)} problems; asked for {offset}..{offset + n}")
    return [problem(seeds[offset + i], level) for i in range(n)]


_ANSWER = re.compile(r"####\s*(-?\d+)")


def extract_answer(text: str | None) -> int | None:
    """The integer after the first ``####``, or None when there is none (never raises)."""
    if not isinstance(text, str):
        return None
    match = _ANSWER.search(text)
    if match is None:
        return None
    try:
        return int(match.group(1))
    except ValueError:
        return None


def is_correct(text: str | None, answer: int) -> bool:
    return extract_answer(text) == answer
