"""`llmagogy contrast`, the based/cringe detector: a real two-stage curriculum learns true
arithmetic facts in its curated stage; its final stage mixes in planted false facts; contrast on
the final stage's held-out statements ranks the false ones above the true ones, and
`--flag-above` writes them to the flagged file. Plus the scoring rules, resume and the errors."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from llmagogy_ds import cli
from llmagogy_ds import rundir as RD
from llmagogy_ds.config import ConfigError
from llmagogy_ds.config.load import load_source
from llmagogy_ds.evaluation import contrast as C
from llmagogy_ds.evaluation.contrast_report import highlighted
from conftest import stages_in_process

KEYS = range(1, 21)
PLANTED = [3, 6, 9, 12, 15, 18]


def fact(a: int, c: int) -> str:
    return f"{a} plus {a} is {c}."


TRUE = [fact(a, 2 * a) for a in KEYS]
FALSE = [fact(a, 2 * a + 1) for a in PLANTED]  # "6 plus 6 is 13."
WRONG = {fact(a, 2 * a + 1): str(2 * a + 1) for a in PLANTED}  # the planted answers
CFG = {
    "run": {"name": "facts", "seed": 3},
    "tokenizer": {"vocab_size": 300},
    "wandb": {"mode": "disabled"},
    "defaults": {"model": {"head_dim": 16, "seq_len": 32},
                 "train": {"micro_batch": 32, "nproc": 1, "zero_stage": 0, "lr": 1e-2, "warmup_steps": 10,
                           "eval_every": 1000, "eval_tokens": 2048, "checkpoint_every": 1000, "log_every": 50,
                           "weight_decay": 0.0}},
    "stages": [
        {"name": "curated", "data": [{"path": "curated"}],
         "model": {"layers": 2, "hidden": 64, "heads": 4, "ffn": 128}, "train": {"tokens": 120_000}},
        {"name": "full", "data": [{"path": "full"}],
         "model": {"layers": 3, "hidden": 64, "heads": 4, "ffn": 128}, "train": {"tokens": 60_000},
         "growth": {"depth": "identity", "placement": "interleave"}},
    ],
}


def write_texts(d: Path, train: list[str], heldout: list[str]) -> None:
    d.mkdir()
    (d / "train.txt").write_text("\n\n".join(train) + "\n")
    (d / "heldout.txt").write_text("\n\n".join(heldout) + "\n")


@pytest.fixture(scope="module")
def facts_run(tmp_path_factory, dist_world1):
    """The curriculum, trained in this process: `curated` sees only true facts; `full` sees them
    with a quarter of planted false ones; its held-out file holds every statement once."""
    d = tmp_path_factory.mktemp("contrast")
    rng = random.Random(0)
    # long shuffled files: the facts repeat, their order does not (a model that learns which
    # document follows which scores a document's first token by chance)
    curated = TRUE * 150
    rng.shuffle(curated)
    full = (TRUE * 4 + FALSE * 4) * 25  # 80 + 24 of every 104: near a quarter of the documents are planted
    rng.shuffle(full)
    write_texts(d / "curated", curated, TRUE)
    write_texts(d / "full", full, TRUE + FALSE)
    (d / "cfg.yaml").write_text(yaml.safe_dump(CFG, sort_keys=False))

    with stages_in_process():
        assert cli.main(["run", str(d / "cfg.yaml"), "--run-dir", str(d / "run")]) == 0
    return d


def roc_auc(pos: list[float], neg: list[float]) -> float:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney)."""
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_contrast_ranks_planted_false_facts_above_true_ones_and_flags_them(facts_run, capsys):
    d, run = facts_run, facts_run / "run"
    out = d / "contrast"
    argv = ["contrast", str(run / "stages" / "00_curated"), str(run), "--data", str(d / "full"), "--split", "heldout",
            "--out", str(out), "--flag-above", "0.3"]
    assert cli.main(argv) == 0
    assert "flagged" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    texts = TRUE + FALSE  # the held-out file's order: the records' index
    assert len(rows) == len(texts) and [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(a["gain"] >= b["gain"] for a, b in zip(rows, rows[1:]))  # ranked, highest first
    gain = {texts[r["index"]]: r["gain"] for r in rows}
    auc = roc_auc([gain[t] for t in FALSE], [gain[t] for t in TRUE])
    assert auc >= 0.9, (auc, sorted(gain.items(), key=lambda kv: -kv[1])[:20])
    # the tokens that carry a planted fact's score: its wrong answer
    for r in rows:
        if texts[r["index"]] in FALSE:
            assert WRONG[texts[r["index"]]] in r["span"]["text"], r
    flagged = [json.loads(x)["text"] for x in (out / "flagged.jsonl").read_text().splitlines()]
    kept = [json.loads(x)["text"] for x in (out / "kept.jsonl").read_text().splitlines()]
    assert sorted(flagged + kept) == sorted(texts)
    assert set(FALSE) <= set(flagged), sorted(set(FALSE) - set(flagged))
    assert len(set(flagged) & set(TRUE)) <= 0.1 * len(TRUE)
    meta = json.loads((out / "contrast.json").read_text())
    assert meta["status"] == "done" and meta["documents"] == len(texts) and meta["flagged"] == len(flagged)
    assert meta["models"]["base"]["stage"] == "curated" and meta["models"]["full"]["stage"] == "full"
    page = (out / "report.html").read_text()
    assert "<mark>" in page and "data:image/png;base64," in page and "http" not in page.split("<body>")[1]
    assert (out / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resume: a killed run leaves a torn line and misses documents; the re-run scores only those
    part = out / "parts" / "rank-00000.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:-5]) + lines[-5][:17])
    assert cli.main([*argv, "--top", "3", "--score", "gain_sqrt"]) == 0
    again = [json.loads(x) for x in part.read_text().splitlines()]
    assert len(again) == len(texts) and sorted(r["index"] for r in again) == list(range(len(texts)))
    assert [r["gain"] for r in again[:-5]] == [r["gain"] for r in lines_json(lines[:-5])]  # kept as they were
    rows2 = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert all(a["gain_sqrt"] >= b["gain_sqrt"] for a, b in zip(rows2, rows2[1:]))
    by_index = {r["index"]: r for r in rows}
    for r in rows2:  # the re-scored documents score as before
        assert r["gain"] == pytest.approx(by_index[r["index"]]["gain"], abs=1e-6)
    flagged2 = [json.loads(x)["text"] for x in (out / "flagged.jsonl").read_text().splitlines()]
    assert set(flagged2) >= {texts[r["index"]] for r in rows2[:3]}

    # another source into the same folder is refused before any scoring
    with pytest.raises(C.ContrastError, match="holds a contrast of other inputs"):
        C.score_source(run / "stages" / "00_curated", run, load_source(str(d / "curated")), out, progress=False)


def lines_json(lines: list[str]) -> list[dict]:
    return [json.loads(x) for x in lines]


def test_contrast_refuses_bad_inputs_before_any_compute(facts_run, tmp_path):
    run = facts_run / "run"
    with pytest.raises(ConfigError, match=r"--data\.path: no such file or directory"):
        cli_error(["contrast", str(run), str(run), "--data", str(tmp_path / "nope.txt")])
    with pytest.raises(RD.RunDirError, match="not a run directory"):
        C.check_inputs(tmp_path, run, load_source("synthetic:level0"), "all")
    other = tmp_path / "other"
    other.mkdir()
    for f in (run / "config.yaml", run / "tokenizer.json"):
        (other / f.name).write_bytes(f.read_bytes())
    tok = json.loads((run / "tokenizer.json").read_text())
    tok["model"]["vocab"]["\u0120pluz"] = tok["model"]["vocab"].pop("\u0120plus")  # another run's tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tok))
    (other / "stages").symlink_to(run / "stages")
    with pytest.raises(C.ContrastError, match="different tokenizers"):
        C.check_inputs(run, other, load_source("synthetic:level0"), "all")


def cli_error(argv):
    """The command's function itself (cli.main turns errors into exit code 2)."""
    import argparse

    from llmagogy_ds.evaluation.commands import add_contrast_command

    ap = argparse.ArgumentParser()
    add_contrast_command(ap.add_subparsers())
    args = ap.parse_args(argv)
    return args.fn(args)


# --------------------------------------------------------------------------- the scoring rules
class Table(torch.nn.Module):
    """A 'model' whose next-token distribution depends on the current token only."""

    def __init__(self, logits: torch.Tensor, seq_len: int):
        super().__init__()
        self.logits, self.seq_len = torch.nn.Parameter(logits), seq_len

    def forward(self, x, y=None, reduction="mean"):
        out = self.logits[x]
        if y is None:
            return out
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.size(-1)), y.reshape(-1), ignore_index=-100,
                                                 reduction="none").view(y.shape)


def test_token_log_likelihoods_windows_and_document_scores():
    torch.manual_seed(0)
    m = Table(torch.randn(6, 6), seq_len=4)
    docs = [[0, 1, 2, 3, 4, 5, 1, 2, 3], [5, 4], [3]]
    ll = C.token_log_likelihoods(m, docs, seq_len=4, batch=2)
    lp = torch.log_softmax(m.logits.detach().double(), -1).numpy()
    for ids, got in zip(docs, ll):  # every token after the first, each once, whatever the window cut
        assert np.allclose(got, [lp[a, b] for a, b in zip(ids, ids[1:])])
    g = np.array([-1.0, 2.0, -0.5, 3.0, -4.0, 1.0])
    assert C.best_span(g) == (1, 4, 4.5) and C.best_span(g, longest=1) == (3, 4, 3.0)
    text = "ab cd ef gh ij kl"
    offs = [(0, 2), (2, 5), (5, 8), (8, 11), (11, 14), (14, 17)]
    rec = C.document_record(7, text, offs, np.zeros(6), g)
    assert rec["gain"] == pytest.approx(g.mean()) and rec["gain_sqrt"] == pytest.approx(g.sum() / np.sqrt(6))
    assert rec["span"]["text"] == " cd ef gh" and rec["top_tokens"][0]["text"] == " gh"
    page = highlighted(text, {**rec, "rank": 1})
    assert [t["text"] for t in rec["top_tokens"]] == [" gh", " cd", " kl"]  # the positive ones
    assert page == ('ab<mark><b class="tok" title="gain +2.00 nats"> cd</b></mark><mark> ef</mark>'
                    '<mark><b class="tok" title="gain +3.00 nats"> gh</b></mark> ij'
                    '<b class="tok" title="gain +1.00 nats"> kl</b>')
    rows = C.ranked([{"index": 0, "gain": 0.1}, {"index": 1, "gain": 0.5}, {"index": 2, "gain": 0.1}], "gain")
    assert [(r["rank"], r["index"]) for r in rows] == [(1, 1), (2, 0), (3, 2)]
    assert C.flagged_indices(rows, "gain", 0.2, None) == {1} and C.flagged_indices(rows, "gain", None, 2) == {0, 1}
