"""Size search (llmagogy_ds/size_search.py): ladder and budget parsing, the recommendation
rule on hand-made results, an end-to-end search where a model that memorizes is ranked
below one that does not, --write, and input errors before any compute. Also the held-out
windows warning of data.heldout_windows."""
from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest

from llmagogy_ds import cli
from llmagogy_ds.data import corpus as D
from llmagogy_ds.evidence import size_search as S
from llmagogy_ds.config import ConfigError, ModelConfig, load_config


# --------------------------------------------------------------------------- recommendation rule
def res(label, params, train, held):
    return {"label": label, "params": params, "train_loss": train, "heldout_loss": held}


def ladder_results():
    return [
        res("a", 100, 3.50, 3.52),  # no gap, but worst held-out
        res("b", 200, 3.30, 3.33),  # no gap, within 5 % of the best
        res("c", 400, 3.20, 3.25),  # no gap, best held-out among those without a gap
        res("d", 800, 2.50, 3.20),  # best held-out of all, but memorizes (gap 0.70)
    ]


def test_recommend_smallest_within_tolerance_of_best_without_gap():
    rs = ladder_results()
    rec = S.recommend(rs, tolerance=0.05)
    assert rec["status"] == "ok" and rec["warning"] is None
    assert rs[rec["index"]]["label"] == "b"
    assert rec["best_heldout"] == pytest.approx(3.25)  # d's 3.20 does not count: it memorizes
    assert [r["memorizes"] for r in rs] == [False, False, False, True]
    assert [r["within_tolerance"] for r in rs] == [False, True, True, False]
    assert rs[3]["gap"] == pytest.approx(0.70) and rs[3]["gap_limit"] == pytest.approx(0.05 * 3.20)
    # the tolerance moves the choice along the ladder
    assert ladder_results()[S.recommend(ladder_results(), tolerance=0.10)["index"]]["label"] == "a"
    assert ladder_results()[S.recommend(ladder_results(), tolerance=0.0)["index"]]["label"] == "c"


def test_recommend_gap_limit_is_absolute_or_relative_whichever_larger():
    assert S.gap_limit(10.0, 0.05, 0.05) == pytest.approx(0.5)
    assert S.gap_limit(0.5, 0.05, 0.05) == pytest.approx(0.05)
    rs = [res("big-loss", 100, 9.6, 10.0), res("small-loss", 200, 0.40, 0.46)]
    S.recommend(rs)
    assert [r["memorizes"] for r in rs] == [False, True]  # 0.4 <= 0.5; 0.06 > 0.05
    rs = [res("x", 100, 0.40, 0.46)]
    S.recommend(rs, max_gap=0.1)
    assert rs[0]["memorizes"] is False


def test_recommend_all_memorize_names_smallest_gap_with_warning():
    rs = [res("a", 100, 2.0, 3.0), res("b", 200, 1.0, 3.5), res("c", 400, 2.9, 3.2)]
    rec = S.recommend(rs)
    assert rec["status"] == "all_memorize"
    assert rs[rec["index"]]["label"] == "c"  # gap 0.3 is the smallest
    assert "memorizes" in rec["warning"] and "c" in rec["reason"]


def test_recommend_skips_diverged_candidates():
    rs = [res("nan", 100, math.nan, math.nan), res("ok", 200, 3.0, 3.01)]
    assert rs[S.recommend(rs)["index"]]["label"] == "ok"
    with pytest.raises(RuntimeError, match="diverged"):
        S.recommend([res("nan", 100, math.nan, math.inf)])


# --------------------------------------------------------------------------- ladder and budget
def test_default_ladder_halves_and_doubles_the_stage_shape():
    m = ModelConfig(layers=4, hidden=128, heads=8, ffn=344, head_dim=16)
    got = [(c.layers, c.hidden, c.heads, c.ffn) for c in S.default_ladder(m)]
    assert got == [(2, 64, 4, 172), (4, 64, 4, 172), (4, 128, 8, 344), (8, 128, 8, 344), (8, 256, 16, 688)]
    # one layer and one head: halving changes nothing, duplicates are dropped
    tiny = ModelConfig(layers=1, hidden=16, heads=1, ffn=40, head_dim=16)
    assert [(c.layers, c.hidden) for c in S.default_ladder(tiny)] == [(1, 16), (2, 16), (2, 32)]


def test_parse_ladder_and_its_errors():
    m = ModelConfig(layers=2, hidden=64, heads=4, ffn=176, head_dim=16)
    got = S.parse_ladder("1,32; 2x64 ;4,128,300", m)
    assert [(c.layers, c.hidden, c.heads, c.ffn) for c in got] == [(1, 32, 2, 88), (2, 64, 4, 176), (4, 128, 8, 300)]
    with pytest.raises(ConfigError) as e:
        S.parse_ladder("2,100;0,64;3;2,-16;1,32;1,32", m)
    msg = str(e.value)
    assert "--ladder[0] '2,100': hidden 100 is not a multiple of the stage's head_dim 16" in msg
    assert "--ladder[1] '0,64': layers must be a positive integer, got 0" in msg
    assert "--ladder[2] '3': expected D,W or D,W,FFN" in msg
    assert "--ladder[3] '2,-16': hidden must be a positive integer" in msg
    assert "--ladder[5] '1,32': duplicate candidate" in msg
    with pytest.raises(ConfigError, match="no candidates"):
        S.parse_ladder(" ; ", m)


@pytest.mark.parametrize("text,kind,value", [
    (None, "fraction", 1.0), ("2e6", "tokens", 2e6), ("500k", "tokens", 5e5), ("1_000_000", "tokens", 1e6),
    ("0.25x", "fraction", 0.25), ("3e12flops", "flops", 3e12), ("2TFLOPs", "flops", 2e12), ("4M tokens", "tokens", 4e6),
])
def test_parse_budget(text, kind, value):
    b = S.parse_budget(text)
    assert (b.kind, b.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize("text", ["abc", "-1", "0x", "nan", "12q"])
def test_parse_budget_errors(text):
    with pytest.raises(ConfigError, match="--budget"):
        S.parse_budget(text)


# --------------------------------------------------------------------------- end to end
WORDS = "ab cd ef gh ij kl mn op qr st uv wx yz ba dc fe".split()


def markov_docs(n: int, seed: int) -> list[str]:
    """Each word is followed by one of two words, at random: a rule a small model learns from
    little text, and random choices that only a model with room to spare can memorize."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        w, words = rng.randrange(16), []
        for _ in range(40):
            words.append(WORDS[w])
            w = rng.choice(((w + 1) % 16, (3 * w + 5) % 16))
        docs.append(" ".join(words))
    return docs


CONFIG = """\
# size-search test curriculum
run: {name: sizes, seed: 1}
tokenizer: {vocab_size: 300}
defaults:
  model: {head_dim: 8, seq_len: 32}
  train: {lr: 1.0e-2, warmup_steps: 5, micro_batch: 16, nproc: 1, weight_decay: 0.0, eval_tokens: 4096}
stages:
  - name: s0
    data: [{path: corpus}]
    model: {layers: 2, hidden: 64, heads: 8, ffn: 128}   # the shape to check
    train: {epochs: 30}            # ~4,900 training tokens seen 30 times
  - name: s1
    data: [{path: corpus}]
    model:
      layers: 2
      hidden: 64
      heads: 8
      ffn: 128
    growth: {depth: identity}
    train: {tokens: 5000}
"""


def write_corpus(root: Path) -> Path:
    (root / "corpus").mkdir(parents=True)
    (root / "corpus" / "train.txt").write_text("\n\n".join(markov_docs(120, 1)) + "\n")
    (root / "corpus" / "heldout.txt").write_text("\n\n".join(markov_docs(60, 2)) + "\n")
    (root / "cfg.yaml").write_text(CONFIG)
    return root / "cfg.yaml"


@pytest.fixture(scope="module")
def one_thread():
    # tiny models on a shared 2-core machine: one thread avoids OpenMP spinning against other jobs
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("sizes")
    cfg = write_corpus(root)
    rc = cli.main(["size-search", str(cfg), "--stage", "s0", "--run-dir", str(root / "run"),
                   "--ladder", "1,8;2,64", "--write"])
    out = root / "run" / "size_search" / "s0"
    return {"rc": rc, "root": root, "cfg": cfg, "report": json.loads((out / "size_search.json").read_text()),
            "png": out / "size_search.png"}


def test_search_ranks_memorizing_model_below_one_that_generalizes(searched):
    assert searched["rc"] == 0
    rep = searched["report"]
    small, big = rep["candidates"]
    assert (small["label"], big["label"]) == ("1x8", "2x64") and big["stage_shape"] and not small["stage_shape"]
    # same budget for both; the big one memorizes: train loss far below held-out
    assert small["tokens"] == big["tokens"] and big["flops"] > 5 * small["flops"] > 0
    assert big["heldout_loss"] - big["train_loss"] > 0.3 and big["memorizes"]
    assert abs(small["heldout_loss"] - small["train_loss"]) <= small["gap_limit"] and not small["memorizes"]
    assert small["heldout_loss"] < big["heldout_loss"]
    assert rep["recommendation"]["status"] == "ok" and rep["recommendation"]["label"] == "1x8"
    assert rep["train_windows"] == rep["heldout_windows"] > 10
    assert all(r["params"] > 0 and r["wall_seconds"] > 0 and r["epochs"] == pytest.approx(30, rel=0.05)
               for r in rep["candidates"])
    assert searched["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_gives_a_loadable_config_that_differs_only_in_the_stage_shape(searched):
    cfg_path = searched["cfg"]
    sized = cfg_path.with_name("cfg.sized.yaml")
    assert searched["report"]["sized_config"] == str(sized)
    assert cfg_path.read_text() == CONFIG  # the user's file is untouched
    text = sized.read_text()
    assert "# the shape to check" in text and "# size-search test curriculum" in text  # edited in place
    old, new = load_config(cfg_path), load_config(sized)
    assert new.stages[0].model.layers == 1 and new.stages[0].model.hidden == 8
    assert (new.stages[0].model.heads, new.stages[0].model.ffn) == (1, 16)
    expect = json.loads(json.dumps(old.raw))
    expect["stages"][0]["model"].update(layers=1, hidden=8, heads=1, ffn=16)
    assert new.raw == expect


def test_write_inserts_missing_keys_in_block_style_and_refuses_a_shrink(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text here\n")
    text = """\
run: {name: w}
tokenizer: {vocab_size: 300}
defaults:
  model: {head_dim: 8, seq_len: 16, heads: 4, ffn: 64}
  train: {tokens: 1000, micro_batch: 2}
stages:
  - name: s0
    data: [{path: corpus}]
    model:
      layers: 1      # keep me
      hidden: 32
    train: {tokens: 2000}
  - name: s1
    data: [{path: corpus}]
    model: {layers: 2, hidden: 64, heads: 8, ffn: 128}
"""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    path, kept = S.write_sized_config(cfg, "s0", {"layers": 2, "hidden": 48, "heads": 6, "ffn": 96})
    assert kept and path == tmp_path / "c.sized.yaml"
    out = path.read_text()
    assert "layers: 2      # keep me" in out and "      heads: 6\n      ffn: 96\n" in out
    m = load_config(path).stages[0].model
    assert (m.layers, m.hidden, m.heads, m.ffn) == (2, 48, 6, 96)
    assert load_config(path).raw["stages"][1] == load_config(cfg).raw["stages"][1]
    # a shape larger than the next stage's cannot grow into it: nothing written
    path.unlink()
    with pytest.raises(ConfigError, match=r"(?s)does not fit the curriculum.*shrinks from 3 to 2"):
        S.write_sized_config(cfg, "s0", {"layers": 3, "hidden": 32, "heads": 4, "ffn": 64})
    assert not path.exists() and not list(tmp_path.glob("*.tmp"))
    assert cfg.read_text() == text


@pytest.mark.parametrize("args,message", [
    (["--stage", "nope"], "--stage: no stage named 'nope' (stages: s0, s1)"),
    (["--stage", "s0", "--ladder", "2,60"], "hidden 60 is not a multiple of the stage's head_dim 8"),
    (["--stage", "s0", "--ladder", "0,64"], "layers must be a positive integer, got 0"),
    (["--stage", "s0", "--budget", "lots"], "--budget: cannot read 'lots'"),
    (["--stage", "s0", "--tolerance", "-1"], "--tolerance: must be a number >= 0"),
    (["--stage", "s0", "--threads", "0"], "--threads: must be a positive integer, got 0"),
])
def test_bad_input_fails_before_any_compute(tmp_path, capsys, args, message):
    cfg = write_corpus(tmp_path)
    rc = cli.main(["size-search", str(cfg), "--run-dir", str(tmp_path / "run")] + args)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # no tokenizer, no data, no training


def test_budget_below_one_step_is_refused(tmp_path, capsys, one_thread):
    cfg = write_corpus(tmp_path)
    rc = cli.main(["size-search", str(cfg), "--stage", "s0", "--run-dir", str(tmp_path / "run"), "--budget", "100"])
    assert rc == 2
    assert "--budget: less than one optimizer step (512 tokens" in capsys.readouterr().err
    assert not (tmp_path / "run" / "size_search" / "s0").exists()


# --------------------------------------------------------------------------- held-out windows
def write_stage(root: Path, heldout_lengths: list[int], weights: list[float]) -> D.StageData:
    root.mkdir(parents=True, exist_ok=True)
    sources = []
    for k, (nh, w) in enumerate(zip(heldout_lengths, weights)):
        np.arange(100, dtype=np.uint16).tofile(root / f"s{k}.train.bin")
        (1000 * (k + 1) + np.arange(nh)).astype(np.uint16).tofile(root / f"s{k}.heldout.bin")
        sources.append({"path": f"/data/src{k}", "weight": w, "train": f"s{k}.train.bin",
                        "heldout": f"s{k}.heldout.bin", "train_tokens": 100, "heldout_tokens": nh})
    (root / "meta.json").write_text(json.dumps({"stage": "x", "fingerprint": "f", "dtype": "uint16",
                                                "sources": sources}))
    return D.StageData.load(root)


def test_heldout_windows_warns_about_a_source_too_short_for_one_window(tmp_path):
    sd = write_stage(tmp_path / "a", [5 * 8 + 1, 8], [1.0, 1.0])  # source 1: 8 tokens < one window of 9
    with pytest.warns(UserWarning, match=r"/data/src1 \(8 held-out tokens\) is shorter than one sequence of 9"):
        w = D.heldout_windows(sd, 8, max_tokens=1000)
    assert w.shape == (5, 9) and (w[:, 0] < 2000).all()  # only source 0's windows
    with warnings.catch_warnings():  # every source long enough: no warning
        warnings.simplefilter("error")
        D.heldout_windows(write_stage(tmp_path / "b", [9, 9], [1.0, 1.0]), 8, max_tokens=1000)
    with pytest.raises(D.DataError, match=r"in every source: /data/src0 \(3 held-out tokens\); /data/src1"):
        D.heldout_windows(write_stage(tmp_path / "c", [3, 8], [1.0, 1.0]), 8, max_tokens=1000)
