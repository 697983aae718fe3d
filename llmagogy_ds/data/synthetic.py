"""Synthetic graded curriculum: the embedded default corpus.

Four levels of text that get harder (nursery -> arithmetic facts -> column
arithmetic -> word problems). Everything is generated in pure Python from a
seed in about a second, so tests and demos never download anything.

Each level has
  * train documents and held-out documents (same distribution, fresh samples),
  * an exam: prompts whose exact continuation is checked automatically.

The exam measures a *procedure*, not memorized facts. Every line is built from
an underlying key (the count start, the operand triple, the name/object combo);
a fixed, seed-determined pool of keys per level is held out, and no train or
held-out line of that level *or any later level* is built from a held-out key.
Exam items are drawn from that pool only, and generation checks that no exam
line (``prompt + answer``) appears verbatim as a line of train/held-out text.

Limits of that guarantee: a procedure's intermediate steps are not policed
(the column sum ``47 + 38`` necessarily contains the fact ``7 + 8 = 15``), and
counts only hold out the start (``count: 40 41 42 43 44`` may be in train while
``count: 41 42 43`` -> `` 44 45 46`` is an exam item).

Documents are lines joined by ``"\\n"`` (no blank lines); the caller separates
documents. Text is lower-case ASCII and every line is shorter than 100 chars.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

# The config owns which levels exist (a config may name them); this module generates them.
from llmagogy_ds.config.sources import SYNTHETIC_LEVELS as LEVELS

PATH_PREFIX = "synthetic:"

# ~1 MB of train text per level: about 1M tokens for a 512-token BPE, which is
# enough for a small model to learn the level, and still generated in < 1 s.
DEFAULT_TRAIN_CHARS = 1_000_000
HELDOUT_FRACTION = 0.05
MIN_DOC_LINES, MAX_DOC_LINES = 8, 30
# Share of lines in a document that revise earlier levels, so a model that
# grows through the curriculum does not forget them.
REVIEW_RATE = 0.15

# Count exam: a prompt of COUNT_PROMPT_LEN numbers, then COUNT_ANSWER_LEN more.
COUNT_PROMPT_LEN = 3
COUNT_ANSWER_LEN = 3
COUNT_MAX_START = 999


@dataclass(frozen=True)
class ExamItem:
    prompt: str
    answer: str  # exact continuation after prompt; ends at end of line (no "\n")
    level: int
    kind: str  # "count", "count_down", "add", "sub", "mul", "column_add", ...


@dataclass
class SyntheticCorpus:
    level: int
    train: list[str]  # documents
    heldout: list[str]  # documents
    exam: list[ExamItem] = field(default_factory=list)

    @property
    def name(self) -> str:
        return LEVELS[self.level]

    @property
    def train_chars(self) -> int:
        return sum(len(d) + 1 for d in self.train)

    @property
    def heldout_chars(self) -> int:
        return sum(len(d) + 1 for d in self.heldout)


def exam_line(item: ExamItem) -> str:
    return item.prompt + item.answer


def parse_path(path: str) -> int | None:
    """``"synthetic:level2"`` -> 2; ``None`` when the path is not synthetic."""
    if not path.startswith(PATH_PREFIX):
        return None
    rest = path[len(PATH_PREFIX):]
    known = ", ".join(f"{PATH_PREFIX}level{n}" for n in LEVELS)
    if not rest.startswith("level") or not rest[len("level"):].isdigit():
        raise ValueError(f"bad synthetic corpus path {path!r}: expected one of {known}")
    level = int(rest[len("level"):])
    if level not in LEVELS:
        raise ValueError(f"unknown synthetic level {level} in {path!r}: expected one of {known}")
    return level


# ---------------------------------------------------------------------------
# vocabulary

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
         "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_word(n: int) -> str:
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] if ones == 0 else f"{_TENS[tens]} {_ONES[ones]}"


_DETS = ["the", "a"]
_ADJS = ["red", "big", "small", "old", "happy", "blue", "little", "good"]
_NOUNS = ["cat", "dog", "bird", "boy", "girl", "fish", "cow", "hen", "man", "frog"]
_VERBS = ["sees", "likes", "helps", "finds", "has", "wants", "hugs", "calls"]
_INTRANS = ["runs", "sits", "sleeps", "jumps", "sings", "eats", "plays"]
_PLACES = ["in the sun", "on the mat", "by the tree", "at home", "in the park"]

# Short names and objects keep word-problem lines under 100 chars.
_NAMES = {"tom": "he", "ben": "he", "sam": "he", "max": "he", "leo": "he", "dan": "he",
          "ann": "she", "mia": "she", "liz": "she", "eva": "she", "zoe": "she", "amy": "she"}
_NAME_LIST = sorted(_NAMES)
_OBJECTS = ["apples", "pens", "books", "cards", "eggs", "coins", "shells", "cups",
            "balls", "cakes", "hats", "stamps"]

# ---------------------------------------------------------------------------
# keys and the held-out pools

# Keys live in shared namespaces so a key held out at one level is also banned
# from review lines of other kinds: ("count", "up"|"down", start),
# ("arith", op, a, b) for facts, column sums and word problems alike, and
# ("combo", name, object) for word-problem surface forms.
Key = tuple

_FACT_DIGITS = range(10)
_COL_RANGE = range(10, 100)  # two-digit operands keep a worked line < 100 chars
_WORD_RANGE = range(2, 100)


def _fact_keys() -> list[Key]:
    keys = [("arith", "+", a, b) for a in _FACT_DIGITS for b in _FACT_DIGITS]
    # subtraction facts are the inverses of the addition facts: (a + b) - b = a
    keys += [("arith", "-", a + b, b) for a in _FACT_DIGITS for b in _FACT_DIGITS]
    keys += [("arith", "*", a, b) for a in _FACT_DIGITS for b in _FACT_DIGITS]
    return keys


def _sample_arith(rng: random.Random, rng_range: range, op: str) -> Key:
    a, b = rng.choice(rng_range), rng.choice(rng_range)
    if op == "-" and a < b:
        a, b = b, a
    return ("arith", op, a, b)


# How many keys each level holds out. Fixed per level (independent of
# exam_items) so later levels can ban earlier pools without knowing how the
# earlier exam was requested. exam_items is capped at these sizes.
_POOL_SIZES = {0: 400, 1: 75, 2: 600, 3: 600}
_COMBO_HOLDOUT = 18  # of 144 name/object combos


def _rng(seed: int, level: int, stream: str) -> random.Random:
    # String seeds are hashed with sha512 by `random`, so this is stable across
    # processes (unlike hash()) and streams are independent of each other.
    return random.Random(f"llmagogy-synthetic:{seed}:{level}:{stream}")


def _holdout(level: int, seed: int) -> list[Key]:
    """The ordered held-out key pool of one level (exam items come first-N)."""
    rng = _rng(seed, level, "holdout")
    size = _POOL_SIZES[level]
    if level == 0:
        # Down-counts need room for the prompt and answer above zero.
        ups = rng.sample(range(COUNT_MAX_START + 1), size // 2)
        downs = rng.sample(range(COUNT_PROMPT_LEN + COUNT_ANSWER_LEN, COUNT_MAX_START + 1), size // 2)
        return _interleave([("count", "up", s) for s in ups], [("count", "down", s) for s in downs])
    if level == 1:
        keys = _fact_keys()
        by_op = [[k for k in keys if k[1] == op] for op in "+-*"]
        return _interleave(*(rng.sample(ks, size // 3) for ks in by_op))
    if level in (2, 3):
        num_range = _COL_RANGE if level == 2 else _WORD_RANGE
        pool: list[Key] = []
        seen: set[Key] = set()
        while len(pool) < size:
            key = _sample_arith(rng, num_range, "+-"[len(pool) % 2])
            # word problems never subtract equal counts ("how many more" reads oddly)
            if level == 3 and key[1] == "-" and key[2] == key[3]:
                continue
            if key not in seen:
                seen.add(key)
                pool.append(key)
        if level == 3:
            combos = [("combo", n, o) for n in _NAME_LIST for o in _OBJECTS]
            pool += rng.sample(combos, _COMBO_HOLDOUT)
        return pool
    raise ValueError(f"unknown synthetic level {level}")


def _interleave(*lists: list) -> list:
    return [x for group in zip(*lists) for x in group]


def _banned(level: int, seed: int) -> set[Key]:
    out: set[Key] = set()
    for k in range(level + 1):
        out.update(_holdout(k, seed))
    return out


# ---------------------------------------------------------------------------
# line makers: each returns the line for a key (pure), samplers pick keys


def count_line(direction: str, start: int, n: int) -> str:
    if direction == "up":
        return "count: " + " ".join(str(start + i) for i in range(n))
    return "count down: " + " ".join(str(start - i) for i in range(n))


def fact_line(op: str, a: int, b: int) -> str:
    return f"{a} {op} {b} = {_apply(op, a, b)}"


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def column_work(op: str, a: int, b: int) -> str:
    """The worked continuation after ``"a op b:"`` for two-digit operands."""
    a1, a0 = divmod(a, 10)
    b1, b0 = divmod(b, 10)
    if op == "+":
        s0 = a0 + b0
        carry = s0 // 10
        step0 = f"{a0} + {b0} = {s0}, write {s0 % 10}" + (" carry 1" if carry else "")
        s1 = a1 + b1 + carry
        step1 = f"{a1} + {b1}" + (" + 1" if carry else "") + f" = {s1}, write {s1 % 10}"
        steps = [step0, step1 + (" carry 1" if s1 >= 10 else "")]
        if s1 >= 10:
            steps.append("write 1")
    else:
        if a0 >= b0:
            borrow = 0
            step0 = f"{a0} - {b0} = {a0 - b0}, write {a0 - b0}"
        else:
            borrow = 1
            step0 = f"{a0} < {b0}, borrow 1, {a0 + 10} - {b0} = {a0 + 10 - b0}, write {a0 + 10 - b0}"
        d1 = a1 - borrow - b1
        step1 = f"{a1}" + (" - 1" if borrow else "") + f" - {b1} = {d1}, write {d1}"
        steps = [step0, step1]
    return " " + "; ".join(steps) + f"; answer {_apply(op, a, b)}"


def column_line(op: str, a: int, b: int) -> str:
    return f"{a} {op} {b}:" + column_work(op, a, b)


# Word-problem templates: (op, text). {n}/{p} name and pronoun of the owner,
# {m} a second person, {o} the object. Sub templates need a > b.
_WORD_TEMPLATES = [
    ("+", "{n} has {a} {o}. {p} gets {b} more. how many {o} does {p} have now?"),
    ("+", "{n} has {a} {o} and {m} has {b}. how many {o} do they have in all?"),
    ("+", "{n} had {a} {o}. {p} found {b} more. how many {o} does {p} have?"),
    ("-", "{n} has {a} {o}. {p} gives {b} to {m}. how many {o} does {p} have left?"),
    ("-", "{n} has {a} {o} and {m} has {b}. how many more {o} does {n} have?"),
    ("-", "{n} had {a} {o}. {p} lost {b}. how many {o} are left?"),
]


def word_problem(template: str, name: str, other: str, obj: str, a: int, b: int) -> str:
    return template.format(n=name, p=_NAMES[name], m=other, o=obj, a=a, b=b)


def word_answer(op: str, a: int, b: int) -> str:
    c = _apply(op, a, b)
    return f" {a} {op} {b} = {c}. answer {c}"


def _sentence(rng: random.Random) -> str:
    def np() -> str:
        words = f"{rng.choice(_ADJS)} {rng.choice(_NOUNS)}" if rng.random() < 0.6 else rng.choice(_NOUNS)
        det = rng.choice(_DETS)
        if det == "a" and words[0] in "aeiou":
            det = "an"  # "an old cat"
        return f"{det} {words}"
    r = rng.random()
    if r < 0.5:
        return f"{np()} {rng.choice(_VERBS)} {np()}."
    if r < 0.8:
        return f"{np()} {rng.choice(_INTRANS)} {rng.choice(_PLACES)}."
    return f"{np()} is {rng.choice(_ADJS)}."


class _Gen:
    """Samplers for one level's text, with that level's banned keys."""

    def __init__(self, level: int, seed: int, rng: random.Random):
        self.level = level
        self.rng = rng
        self.banned = _banned(level, seed)
        # Small key spaces: precompute the allowed keys once, sample by index.
        self.facts = [k for k in _fact_keys() if k not in self.banned]
        self.combos = [(n, o) for n in _NAME_LIST for o in _OBJECTS
                       if ("combo", n, o) not in self.banned]
        self.own: dict[int, Callable[[], str]] = {
            0: self.nursery_line, 1: self.fact, 2: self.column, 3: self.word}

    # level 0 ---------------------------------------------------------------
    def count(self) -> str:
        rng = self.rng
        direction = "up" if rng.random() < 0.6 else "down"
        while True:
            start = rng.randint(0, COUNT_MAX_START)
            n = rng.randint(4, 10)
            if direction == "down" and start < n - 1:
                continue
            if ("count", direction, start) not in self.banned:
                return count_line(direction, start, n)

    def nursery_line(self) -> str:
        r = self.rng.random()
        if r < 0.4:
            return self.count()
        if r < 0.6:
            n = self.rng.randint(0, 99)
            return f"{number_word(n)} is {n}"
        return _sentence(self.rng)

    # level 1 ---------------------------------------------------------------
    def fact(self) -> str:
        _, op, a, b = self.rng.choice(self.facts)
        return fact_line(op, a, b)

    def fact_table(self) -> list[str]:
        # A times/plus table in order, as a child would recite it; held-out
        # facts are skipped, which leaves visible gaps the exam then probes.
        op = self.rng.choice("+*")
        a = self.rng.choice(_FACT_DIGITS)
        return [fact_line(op, a, b) for b in _FACT_DIGITS
                if ("arith", op, a, b) not in self.banned]

    # level 2 ---------------------------------------------------------------
    def _arith(self, num_range: range, op: str) -> Key:
        while True:  # rejection sampling: the banned pools are a few % of keys
            key = _sample_arith(self.rng, num_range, op)
            if key not in self.banned:
                return key

    def column(self) -> str:
        _, op, a, b = self._arith(_COL_RANGE, self.rng.choice("+-"))
        return column_line(op, a, b)

    # level 3 ---------------------------------------------------------------
    def word(self) -> str:
        rng = self.rng
        op, template = rng.choice(_WORD_TEMPLATES)
        _, _, a, b = self._arith(_WORD_RANGE, op)
        if op == "-" and a == b:
            return self.word()  # "how many more" with equal counts reads oddly
        while True:
            name, obj = rng.choice(self.combos)
            other = rng.choice(_NAME_LIST)
            if other != name and ("combo", other, obj) not in self.banned:
                break
        return word_problem(template, name, other, obj, a, b) + word_answer(op, a, b)

    # documents -------------------------------------------------------------
    def review(self) -> str:
        # Favour the level just below: weights 1, 2, 4, ... towards it.
        lower = list(range(self.level))
        level = self.rng.choices(lower, weights=[2 ** k for k in lower])[0]
        return self.own[level]()

    def document(self) -> str:
        rng = self.rng
        n = rng.randint(MIN_DOC_LINES, MAX_DOC_LINES)
        lines: list[str] = []
        if self.level == 1 and rng.random() < 0.3:
            lines += self.fact_table()
        while len(lines) < n:
            if self.level > 0 and rng.random() < REVIEW_RATE:
                lines.append(self.review())
            else:
                lines.append(self.own[self.level]())
        return "\n".join(lines)


def _documents(gen: _Gen, n_docs: int | None, target_chars: int) -> list[str]:
    docs: list[str] = []
    total = 0
    while (len(docs) < n_docs) if n_docs is not None else (total < target_chars):
        doc = gen.document()
        docs.append(doc)
        total += len(doc) + 1
    return docs


# ---------------------------------------------------------------------------
# exam


def _exam_item(level: int, key: Key, rng: random.Random, novel_combo: tuple[str, str] | None,
               seen_combos: list[tuple[str, str]]) -> ExamItem:
    if key[0] == "count":
        _, direction, start = key
        full = count_line(direction, start, COUNT_PROMPT_LEN + COUNT_ANSWER_LEN)
        prompt = count_line(direction, start, COUNT_PROMPT_LEN)
        return ExamItem(prompt, full[len(prompt):], level, "count" if direction == "up" else "count_down")
    _, op, a, b = key
    if level == 1:
        kind = {"+": "add", "-": "sub", "*": "mul"}[op]
        return ExamItem(f"{a} {op} {b} =", f" {_apply(op, a, b)}", level, kind)
    if level == 2:
        kind = "column_add" if op == "+" else "column_sub"
        return ExamItem(f"{a} {op} {b}:", column_work(op, a, b), level, kind)
    template = rng.choice([t for o, t in _WORD_TEMPLATES if o == op])
    if novel_combo is not None:
        name, obj = novel_combo
        kind = "word_problem_novel"
    else:
        name, obj = rng.choice(seen_combos)
        kind = "word_problem"
    other = rng.choice([n for n in _NAME_LIST if n != name])
    return ExamItem(word_problem(template, name, other, obj, a, b), word_answer(op, a, b), level, kind)


def _exam(level: int, seed: int, exam_items: int) -> list[ExamItem]:
    rng = _rng(seed, level, "exam")
    pool = _holdout(level, seed)
    arith = [k for k in pool if k[0] != "combo"]
    novel = [(k[1], k[2]) for k in pool if k[0] == "combo"]
    seen_combos = [(n, o) for n in _NAME_LIST for o in _OBJECTS if (n, o) not in novel]
    items = []
    for i, key in enumerate(arith[:exam_items]):
        # Every 4th word problem also uses an unseen name/object combination.
        combo = novel[(i // 4) % len(novel)] if novel and i % 4 == 3 else None
        items.append(_exam_item(level, key, rng, combo, seen_combos))
    return items


# ---------------------------------------------------------------------------
# entry point


def generate(
    level: int,
    seed: int = 0,
    train_docs: int | None = None,
    heldout_docs: int | None = None,
    exam_items: int = 200,
) -> SyntheticCorpus:
    """Generate one curriculum level.

    ``train_docs=None`` generates about ``DEFAULT_TRAIN_CHARS`` of text;
    ``heldout_docs=None`` gives about 5% of the train documents. ``exam_items``
    is capped by the level's held-out pool (75 for level 1's 300 facts, 400
    for level 0, 600 for levels 2 and 3).
    """
    if level not in LEVELS:
        raise ValueError(f"unknown synthetic level {level}: expected one of {sorted(LEVELS)}")
    # Separate random streams: the number of train documents does not change
    # the held-out documents or the exam.
    train = _documents(_Gen(level, seed, _rng(seed, level, "train")), train_docs, DEFAULT_TRAIN_CHARS)
    if heldout_docs is None:
        heldout_docs = max(1, round(len(train) * HELDOUT_FRACTION))
    heldout = _documents(_Gen(level, seed, _rng(seed, level, "heldout")), heldout_docs, 0)
    exam = _exam(level, seed, exam_items)

    # The invariant the exam relies on; a RuntimeError (not assert) so it also
    # holds under python -O.
    seen_lines = {line for doc in train + heldout for line in doc.split("\n")}
    for item in exam:
        if exam_line(item) in seen_lines:
            raise RuntimeError(f"exam line leaked into level {level} text: {exam_line(item)!r}")
    return SyntheticCorpus(level=level, train=train, heldout=heldout, exam=exam)
