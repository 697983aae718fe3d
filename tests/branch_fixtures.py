"""A small trunk and its expert branches, trained in this process (tests/test_branch.py, and the
routing tests): three word corpora with their own vocabularies (a farm, sums in words, the sea),
a trunk stage on all three, and one expert per corpus continuing from it on its own corpus.

``make_branched_experts(tmp_path)`` needs the ``dist_world1`` fixture (conftest.py) to be active.
"""
from __future__ import annotations

import random
from pathlib import Path

import yaml

from conftest import stages_in_process

DOMAINS = ("farm", "sums", "sea")
DOCS = 600  # per domain: every 20th is held out (30 held-out documents each)
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def _farm(rng: random.Random) -> str:
    who = rng.choice(["the cow", "the pig", "the hen", "the goat", "the farmer", "the horse", "the sheep"])
    does = rng.choice(["eats", "sleeps near", "walks to", "looks at", "runs around", "digs in"])
    what = rng.choice(["the barn", "the field", "the hay", "the fence", "the pond", "the grass", "the mud"])
    when = rng.choice(["in the morning", "after lunch", "before rain", "all day"])
    return f"{who} {does} {what} {when}."


def _sums(rng: random.Random) -> str:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}."
    a, b = max(a, b), min(a, b)
    return f"{NUMBERS[a]} minus {NUMBERS[b]} is {NUMBERS[a - b]}."


def _sea(rng: random.Random) -> str:
    who = rng.choice(["a ship", "a whale", "a sailor", "a captain", "a boat", "a gull", "a crab"])
    does = rng.choice(["sails past", "dives under", "swims toward", "floats by", "watches", "circles"])
    what = rng.choice(["an island", "a reef", "a harbor", "a wave", "a lighthouse", "a shore"])
    when = rng.choice(["at dawn", "at night", "during storms", "through fog"])
    return f"{who} {does} {what} {when}."


SENTENCES = {"farm": _farm, "sums": _sums, "sea": _sea}


def write_corpora(d: Path, docs: int = DOCS, seed: int = 0) -> dict[str, Path]:
    """One text file per domain: documents (paragraphs) of 3-6 sentences."""
    out = {}
    for name in DOMAINS:
        rng = random.Random(f"{seed}:{name}")
        paras = [" ".join(SENTENCES[name](rng) for _ in range(rng.randint(3, 6))) for _ in range(docs)]
        out[name] = d / f"{name}.txt"
        out[name].write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return out


TRUNK = {
    "run": {"name": "trunk", "seed": 3},
    "tokenizer": {"vocab_size": 320},
    "wandb": {"mode": "disabled"},
    "defaults": {"model": {"head_dim": 16, "seq_len": 64},
                 "train": {"micro_batch": 8, "nproc": 1, "zero_stage": 0, "lr": 3e-3, "warmup_steps": 4,
                           "eval_every": 1000, "eval_tokens": 4096, "checkpoint_every": 1000, "log_every": 20,
                           "weight_decay": 0.0}},
    "stages": [
        {"name": "general", "data": [{"path": f"{n}.txt"} for n in DOMAINS],
         "model": {"layers": 1, "hidden": 32, "heads": 2, "ffn": 64}, "train": {"tokens": 32768}},
    ],
}


def experts_file(tokens: int = 16384) -> dict:
    """One expert per domain: ``farm`` keeps the trunk stage's shape, ``sums`` grows a layer,
    ``sea`` grows wider with the old generation slowed (F = 0.5)."""
    return {"experts": [
        {"name": "farm", "description": "farm sentences",
         "stages": [{"name": "farm", "data": ["farm.txt"], "train": {"tokens": tokens}}]},
        {"name": "sums", "description": "sums in words",
         "stages": [{"name": "sums", "data": ["sums.txt"], "model": {"layers": 2},
                     "growth": {"depth": "identity"}, "train": {"tokens": tokens}}]},
        {"name": "sea", "description": "sea sentences",
         "stages": [{"name": "sea", "data": ["sea.txt"], "model": {"hidden": 48, "heads": 3, "ffn": 96},
                     "freeze": 0.5, "train": {"tokens": tokens}}]},
    ]}


def write_trunk(d: Path) -> tuple[Path, Path]:
    """The corpora, the trunk's config and the experts file in ``d``: (config, experts file)."""
    write_corpora(d)
    (d / "trunk.yaml").write_text(yaml.safe_dump(TRUNK, sort_keys=False))
    (d / "experts.yaml").write_text(yaml.safe_dump(experts_file(), sort_keys=False))
    return d / "trunk.yaml", d / "experts.yaml"


def make_branched_experts(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Train the trunk's stage, branch the three experts from it and train them (in this
    process): ``(trunk run dir, [expert run dirs])`` in the order of ``DOMAINS``."""
    from llmagogy_ds import cli
    from llmagogy_ds.train.branch import branch

    cfg, experts = write_trunk(tmp_path)
    trunk = tmp_path / "trunk"
    with stages_in_process():
        assert cli.main(["run", str(cfg), "--run-dir", str(trunk)]) == 0
        dirs = branch(trunk, "general", experts)
        for d in dirs:
            assert cli.main(["run", str(d)]) == 0
    return trunk, dirs
