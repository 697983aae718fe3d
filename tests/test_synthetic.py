"""Tests for the synthetic graded curriculum (llmagogy_ds.data.synthetic).

The checks parse the generated *text* with their own regexes rather than
trusting the generator's internals, so a formatting change that breaks the
exam split or the arithmetic shows up here.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import pytest

from llmagogy_ds.data import synthetic as syn
from llmagogy_ds.data.synthetic import LEVELS, ExamItem, exam_line, generate, parse_path

# --- an independent line parser ----------------------------------------------

COUNT_RE = re.compile(r"^count( down)?: (\d+(?: \d+)*)$")
WORD_NUM_RE = re.compile(r"^[a-z ]+ is (\d+)$")
SENTENCE_RE = re.compile(r"^[a-z ]+\.$")
FACT_RE = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)$")
COLUMN_RE = re.compile(r"^(\d+) ([-+]) (\d+):(.*)$")
WORD_RE = re.compile(r"^([a-z]+) (?:has|had) (\d+) ([a-z]+)(?:\.| and) .*\? (\d+) ([-+]) (\d+) = (\d+)\. answer (\d+)$")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def classify(line: str) -> tuple[str, tuple | None]:
    """Line -> (procedure kind, underlying key or None)."""
    if m := COUNT_RE.match(line):
        direction = "down" if m.group(1) else "up"
        start = int(m.group(2).split()[0])
        return ("count_down" if m.group(1) else "count"), ("count", direction, start)
    if m := FACT_RE.match(line):
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return {"+": "add", "-": "sub", "*": "mul"}[op], ("arith", op, a, b)
    if m := COLUMN_RE.match(line):
        op = m.group(2)
        return ("column_add" if op == "+" else "column_sub"), ("arith", op, int(m.group(1)), int(m.group(3)))
    if m := WORD_RE.match(line):
        op = m.group(5)
        return ("word_add" if op == "+" else "word_sub"), ("arith", op, int(m.group(4)), int(m.group(6)))
    if WORD_NUM_RE.match(line):
        return "number_word", None
    if SENTENCE_RE.match(line):
        return "sentence", None
    raise AssertionError(f"unrecognised line: {line!r}")


def lines_of(docs: list[str]) -> list[str]:
    return [line for doc in docs for line in doc.split("\n")]


def exam_key(item: ExamItem) -> tuple:
    """The underlying key of an exam item, parsed from its full line."""
    kind, key = classify(exam_line(item))
    assert key is not None, item
    return key


@pytest.fixture(scope="module")
def corpora() -> dict[int, syn.SyntheticCorpus]:
    # Default sizes: this is what training uses, and it takes well under 1 s.
    return {level: generate(level, seed=0) for level in LEVELS}


# --- API -----------------------------------------------------------------------


def test_levels_and_parse_path():
    assert LEVELS == {0: "nursery", 1: "facts", 2: "column arithmetic", 3: "word problems"}
    assert parse_path("synthetic:level0") == 0
    assert parse_path("synthetic:level3") == 3
    assert parse_path("data/train.txt") is None
    assert parse_path("hf:wikitext") is None
    for bad in ("synthetic:foo", "synthetic:", "synthetic:level", "synthetic:levelx", "synthetic:level-1"):
        with pytest.raises(ValueError, match="synthetic:level0"):
            parse_path(bad)
    with pytest.raises(ValueError, match="unknown synthetic level 9"):
        parse_path("synthetic:level9")
    with pytest.raises(ValueError):
        generate(len(LEVELS))


def test_exam_line_is_prompt_plus_answer():
    item = ExamItem(prompt="3 + 4 =", answer=" 7", level=1, kind="add")
    assert exam_line(item) == "3 + 4 = 7"


# --- shape and sizes -----------------------------------------------------------


def test_every_level_nonempty_and_well_formed(corpora):
    for level, corpus in corpora.items():
        assert corpus.level == level
        assert corpus.train and corpus.heldout and corpus.exam
        # ~1 MB default, held-out ~5%
        assert 500_000 <= corpus.train_chars <= 2_000_000
        assert 0.03 <= corpus.heldout_chars / corpus.train_chars <= 0.08
        for doc in corpus.train + corpus.heldout:
            lines = doc.split("\n")
            assert 8 <= len(lines) <= 30
            for line in lines:
                assert line and line == line.strip()
                assert len(line) < 100
                assert re.fullmatch(r"[a-z0-9 .,:;?<=+*-]+", line), line
                classify(line)  # every line is a known procedure
        for item in corpus.exam:
            assert item.level == level
            assert "\n" not in item.prompt + item.answer
            assert item.answer.startswith(" ")
            assert len(exam_line(item)) < 100


def test_worst_case_line_lengths_fit():
    # Exhaustive over the column key space and the longest word-problem fills.
    for a in range(10, 100):
        for b in range(10, 100):
            assert len(syn.column_line("+", a, b)) < 100
            if a >= b:
                assert len(syn.column_line("-", a, b)) < 100
    obj = max(syn._OBJECTS, key=len)
    for op, template in syn._WORD_TEMPLATES:
        line = syn.word_problem(template, "tom", "ann", obj, 99, 98) + syn.word_answer(op, 99, 98)
        assert len(line) < 100, line


def test_explicit_sizes_and_exam_cap():
    c = generate(2, seed=3, train_docs=7, heldout_docs=2, exam_items=10)
    assert (len(c.train), len(c.heldout), len(c.exam)) == (7, 2, 10)
    assert {i.kind for i in c.exam} == {"column_add", "column_sub"}
    # Level 1 has only 300 facts: the exam is capped at its held-out pool.
    assert len(generate(1, train_docs=5, exam_items=10_000).exam) == 75
    assert generate(0, train_docs=5, exam_items=0).exam == []


# --- determinism -----------------------------------------------------------------


def _digest(corpus: syn.SyntheticCorpus) -> str:
    h = hashlib.sha256()
    for doc in corpus.train + ["--"] + corpus.heldout + ["--"]:
        h.update(doc.encode() + b"\0")
    for item in corpus.exam:
        h.update(repr(item).encode())
    return h.hexdigest()


def test_deterministic_given_seed():
    for level in LEVELS:
        a = generate(level, seed=1, train_docs=50)
        b = generate(level, seed=1, train_docs=50)
        c = generate(level, seed=2, train_docs=50)
        assert a == b
        assert a.train != c.train
        assert a.exam != c.exam


def test_heldout_and_exam_do_not_depend_on_train_size():
    small = generate(3, seed=5, train_docs=10)
    big = generate(3, seed=5, train_docs=40)
    assert small.train == big.train[:10]
    assert small.heldout == big.heldout[: len(small.heldout)]  # 1 vs 2 docs
    assert small.exam == big.exam


def test_deterministic_across_processes():
    # String hashing is randomised per process; the corpus must not depend on it.
    code = (
        "from llmagogy_ds.data import synthetic as s; import sys; "
        "sys.path.insert(0, 'tests'); from test_synthetic import _digest; "
        "print(_digest(s.generate(3, seed=4, train_docs=30)))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = set()
    for hashseed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        outs.add(subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                                capture_output=True, text=True, check=True).stdout.strip())
    assert outs == {_digest(generate(3, seed=4, train_docs=30))}


# --- the exam split ----------------------------------------------------------------


def test_no_exam_line_in_train_or_heldout(corpora):
    for corpus in corpora.values():
        seen = set(lines_of(corpus.train + corpus.heldout))
        assert not {exam_line(i) for i in corpus.exam} & seen


def test_no_exam_key_leaks(corpora):
    # Keys of this level's exam and of every earlier level's full held-out pool
    # never appear as the key of a text line (exam_items=10**6 gives the pool).
    pools = {level: {exam_key(i) for i in generate(level, seed=0, train_docs=1, exam_items=10**6).exam}
             for level in LEVELS}
    for level, corpus in corpora.items():
        assert {exam_key(i) for i in corpus.exam} <= pools[level]
        keys = {classify(line)[1] for line in lines_of(corpus.train + corpus.heldout)}
        for earlier in range(level + 1):
            assert not keys & pools[earlier], (level, earlier)


def test_word_problem_exam_has_unseen_name_object_combos(corpora):
    corpus = corpora[3]
    seen = set()
    for line in lines_of(corpus.train + corpus.heldout):
        if m := WORD_RE.match(line):
            name, obj = m.group(1), m.group(3)
            seen.add((name, obj))
            for other in re.findall(r"(?:and|to) ([a-z]+)(?: has|\.)", line):
                seen.add((other, obj))
    kinds = {}
    for item in corpus.exam:
        m = WORD_RE.match(exam_line(item))
        kinds.setdefault(item.kind, []).append((m.group(1), m.group(3)) in seen)
    assert set(kinds) == {"word_problem", "word_problem_novel"}
    assert all(kinds["word_problem"])
    assert not any(kinds["word_problem_novel"])
    assert len(kinds["word_problem_novel"]) >= 20


# --- the answers are right -----------------------------------------------------------


def check_count(line: str) -> None:
    m = COUNT_RE.match(line)
    nums = [int(x) for x in m.group(2).split()]
    step = -1 if m.group(1) else 1
    assert nums == [nums[0] + step * i for i in range(len(nums))] and min(nums) >= 0, line


def check_column(op: str, a: int, b: int, work: str) -> None:
    steps = work.strip().split("; ")
    assert steps[-1] == f"answer {OPS[op](a, b)}"
    written = []
    for step in steps[:-1]:
        if step == "write 1":  # final carry out
            written.append(1)
            continue
        eq = re.fullmatch(r"(?:\d+ < \d+, borrow 1, )?(\d+(?: [-+] \d+)+) = (\d+), write (\d)( carry 1)?", step)
        assert eq, step
        lhs, total, digit = eq.group(1), int(eq.group(2)), int(eq.group(3))
        assert eval(lhs) == total and digit == total % 10, step
        assert bool(eq.group(4)) == (total >= 10), step
        written.append(digit)
    assert int("".join(map(str, reversed(written)))) == OPS[op](a, b)


def check_line(line: str) -> None:
    kind, _ = classify(line)
    if kind.startswith("count"):
        check_count(line)
    elif kind in ("add", "sub", "mul"):
        a, op, b, c = FACT_RE.match(line).groups()
        assert OPS[op](int(a), int(b)) == int(c) >= 0, line
    elif kind.startswith("column"):
        a, op, b, work = COLUMN_RE.match(line).groups()
        check_column(op, int(a), int(b), work)
    elif kind.startswith("word"):
        m = WORD_RE.match(line)
        a, op, b, c, ans = int(m.group(4)), m.group(5), int(m.group(6)), int(m.group(7)), int(m.group(8))
        assert OPS[op](a, b) == c == ans >= 0, line
        # the worked line uses the problem's numbers, and the op fits the story
        assert re.findall(r"\d+", line.split("?")[0]) == [str(a), str(b)], line
        question = line.split("?")[0]
        wants_sub = "how many more" in question or "left" in question
        assert wants_sub == (op == "-"), line


def test_exam_answers_are_correct(corpora):
    for corpus in corpora.values():
        for item in corpus.exam:
            check_line(exam_line(item))
    # prompt/answer split points
    for item in corpora[0].exam:
        assert len(item.prompt.split(":")[1].split()) == syn.COUNT_PROMPT_LEN
        assert len(item.answer.split()) == syn.COUNT_ANSWER_LEN
    assert all(i.prompt.endswith(" =") for i in corpora[1].exam)
    assert all(i.prompt.endswith(":") for i in corpora[2].exam)
    assert all(i.prompt.endswith("?") and i.answer.startswith(" ") for i in corpora[3].exam)


def test_training_text_is_correct(corpora):
    for corpus in corpora.values():
        for line in lines_of(corpus.train[:200] + corpus.heldout):
            check_line(line)


def test_exam_kinds_are_balanced(corpora):
    expected = {0: {"count", "count_down"}, 1: {"add", "sub", "mul"},
                2: {"column_add", "column_sub"}, 3: {"word_problem", "word_problem_novel"}}
    for level, corpus in corpora.items():
        assert {i.kind for i in corpus.exam} == expected[level]
        assert len(set(corpus.exam)) == len(corpus.exam)  # no duplicates


# --- harder with level ---------------------------------------------------------------


def test_text_gets_harder_with_level(corpora):
    kinds = {level: {classify(line)[0] for line in lines_of(c.train)} for level, c in corpora.items()}
    counts = [len(kinds[level]) for level in sorted(kinds)]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), kinds
    for level in range(1, len(LEVELS)):
        assert kinds[level - 1] <= kinds[level]  # earlier procedures are reviewed
    # From arithmetic facts on, lines get longer (more steps per line).
    mean_len = {level: sum(map(len, ls)) / len(ls)
                for level, c in corpora.items() for ls in [lines_of(c.train)]}
    assert mean_len[1] < mean_len[2] < mean_len[3]
