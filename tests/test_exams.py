"""Tests for llmagogy_ds.evaluation.exams: bits per byte, multiple-choice exams, minimal pairs, run evaluation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from llmagogy_ds import rundir as RD
from llmagogy_ds.data import prepare as DP
from llmagogy_ds.config import load_config
from llmagogy_ds.model.stages import Plan
from llmagogy_ds.data import corpus as D
from llmagogy_ds.data import items as DI
from llmagogy_ds.evaluation import exams as E
from llmagogy_ds.evaluation import results as ER
from llmagogy_ds.evaluation.evaluate import heldout_loss
from llmagogy_ds.model.layout import Shape, initial_layout
from llmagogy_ds.model.gpt import GPT, fresh_init

CORPUS = [
    "the cat sat on the mat. the dog sat on the log.",
    "Is it a cat? yes. Is it a dog? no. Is it a bird? maybe.",
    "A: 5 and A: 7. the answer is yes or no or maybe.",
    "café crème, naïve résumé, über 🙂 smile",
    "a cat and a dog and the cat and the dog",
]


@pytest.fixture(scope="module")
def tok():
    return D.train_tokenizer(CORPUS * 40, vocab_size=320)


def tiny_gpt(vocab: int, seq_len: int = 48, std: float = 0.5, seed: int = 0) -> GPT:
    layout = initial_layout(Shape(layers=2, hidden=32, heads=2, ffn=64), vocab, head_dim=16)
    model = GPT(layout, seq_len)
    model.load_state_dict(fresh_init(layout, std, torch.Generator().manual_seed(seed)))
    return model


class Fixed(torch.nn.Module):
    """A 'model' whose next-token logits are the same vector at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("z", logits.float())
        self.inputs: list[torch.Tensor] = []

    def forward(self, idx):
        self.inputs.append(idx.clone())
        return self.z.expand(*idx.shape, -1).clone()


def eos(tok) -> int:
    return tok.token_to_id(D.EOS)


def hand_loglik(model, ids: list[int], first: int) -> float:
    """Σ_{j ≥ first} log p(ids[j] | ids[:j]) with one forward pass over the whole sequence."""
    with torch.no_grad():
        x = torch.tensor([ids])
        lp = torch.log_softmax(model(x[:, :-1]).double(), -1)[0]
    return sum(float(lp[j - 1, ids[j]]) for j in range(first, len(ids)))


def single(tok, text: str) -> int:
    ids = tok.encode(text).ids
    assert len(ids) == 1, f"{text!r} is not one token: {tok.encode(text).tokens}"
    return ids[0]


# --------------------------------------------------------------------------- multiple choice
MC = [
    {"question": "Is it a cat?", "choices": ["yes", "no", "maybe"], "answer": 0},
    {"question": "Q: the cat sat on the", "choices": [" mat.", " log.", "dog"], "answer": 0},
    {"question": "A: ", "choices": ["5", "7"], "answer": 1},  # " 5" straddles the boundary
    {"question": "Which?", "choices": ["café crème", "über 🙂", "naïve"], "answer": 2},
]


def test_choice_text_separator():
    assert E.choice_text("Is it?", "yes") == " yes"
    assert E.choice_text("Is it?", " yes") == " yes"
    assert E.choice_text("Is it?", "\nyes") == "\nyes"
    assert E.choice_text("A: ", "5") == "5"
    assert E.choice_text("", "yes") == "yes"


def test_multiple_choice_matches_hand_loglikelihood(tok):
    model = tiny_gpt(tok.get_vocab_size()).train()
    out = E.score_multiple_choice(model, tok, MC, seq_len=48, batch=4, details=True)
    assert model.training  # mode restored
    conts = [[" yes", " no", " maybe"], [" mat.", " log.", " dog"], ["5", "7"],
             [" café crème", " über 🙂", " naïve"]]
    correct, correct_norm = [], []
    for it, cs, r in zip(MC, conts, out["items"]):
        q = it["question"]
        sums, means = [], []
        for c, got_sum, got_n in zip(cs, r["loglik"], r["tokens"]):
            enc = tok.encode(q + c)
            if q.endswith(" "):  # the space is glued to the choice's first token: it counts as the choice's
                first = len(tok.encode(q[:-1]).ids)
                assert tok.decode(enc.ids[first:]) == " " + c
            else:
                first = len(tok.encode(q).ids)
                assert enc.ids[:first] == tok.encode(q).ids and tok.decode(enc.ids[first:]) == c
            ids = [eos(tok)] + enc.ids
            expect = hand_loglik(model, ids, first + 1)
            assert got_n == len(ids) - first - 1
            assert abs(got_sum - expect) < 1e-5
            sums.append(expect)
            means.append(expect / got_n)
        assert r["pred"] == int(np.argmax(sums)) and r["pred_norm"] == int(np.argmax(means))
        correct.append(r["pred"] == it["answer"])
        correct_norm.append(r["pred_norm"] == it["answer"])
    assert out["n"] == 4 and out["truncated"] == 0
    assert out["accuracy"] == pytest.approx(np.mean(correct))
    assert out["accuracy_norm"] == pytest.approx(np.mean(correct_norm))
    assert out["chance"] == pytest.approx(np.mean([1 / 3, 1 / 3, 1 / 2, 1 / 3]))
    assert "by_grade" not in out and "by_subject" not in out
    # batching (and the right padding it needs) changes nothing
    one = E.score_multiple_choice(model, tok, MC, seq_len=48, batch=1, details=True)
    for a, b in zip(one["items"], out["items"]):
        assert np.allclose(a["loglik"], b["loglik"], atol=1e-5)


def test_sum_and_per_token_mean_choose_differently(tok):
    vocab = tok.get_vocab_size()
    q = "Is it a cat?"
    a_ids = tok.encode(q + " cat").ids[len(tok.encode(q).ids):]
    b_ids = tok.encode(q + " the dog sat").ids[len(tok.encode(q).ids):]
    assert len(a_ids) == 1 and len(b_ids) == 3 and not set(a_ids) & set(b_ids)
    p = torch.full((vocab,), 0.05 / (vocab - 4))
    p[a_ids] = 0.05  # one unlikely token: log 0.05 = -3.0
    p[b_ids] = 0.3  # three likely tokens: 3 log 0.3 = -3.6, but -1.2 per token
    model = Fixed(p.log())
    items = [{"question": q, "choices": ["the dog sat", "cat"], "answer": 0}]
    out = E.score_multiple_choice(model, tok, items, seq_len=16, details=True)
    r = out["items"][0]
    assert r["loglik"] == pytest.approx([3 * math.log(0.3), math.log(0.05)], abs=1e-5)
    assert r["tokens"] == [3, 1]
    assert (r["pred"], r["pred_norm"]) == (1, 0)
    assert (out["accuracy"], out["accuracy_norm"]) == (0.0, 1.0)


def test_accuracy_per_grade_and_subject_and_chance(tok):
    vocab = tok.get_vocab_size()
    yes, no, maybe = single(tok, " yes"), single(tok, " no"), single(tok, " maybe")
    z = torch.zeros(vocab)
    z[yes] = 5.0  # " yes" is always the model's pick
    z[no] = 1.0
    q = "Is it a cat?"
    items = [
        {"question": q, "choices": ["yes", "no"], "answer": 0, "grade": 1, "subject": "math"},  # right
        {"question": q, "choices": ["no", "yes"], "answer": 0, "grade": 1, "subject": "math"},  # wrong
        {"question": q, "choices": ["no", "maybe", "yes"], "answer": 2, "grade": 2, "subject": "reading"},  # right
        {"question": q, "choices": ["yes", "no", "maybe", "no"], "answer": 0, "grade": 2, "subject": "math"},  # right
        {"question": q, "choices": ["yes", "no"], "answer": 1},  # wrong, no grade nor subject
        {"question": q, "choices": ["maybe", "no"], "answer": 1, "grade": 10, "subject": "math"},  # right
    ]
    out = E.score_multiple_choice(Fixed(z), tok, items, seq_len=16, batch=3)
    assert out["n"] == 6
    assert out["accuracy"] == pytest.approx(4 / 6) and out["accuracy_norm"] == pytest.approx(4 / 6)
    assert out["chance"] == pytest.approx(np.mean([1 / 2, 1 / 2, 1 / 3, 1 / 4, 1 / 2, 1 / 2]))
    g = out["by_grade"]
    assert list(g) == ["1", "2", "10", "(none)"]  # numeric grades in numeric order
    assert g["1"] == {"n": 2, "accuracy": 0.5, "accuracy_norm": 0.5, "chance": 0.5}
    assert g["2"]["accuracy"] == 1.0 and g["2"]["chance"] == pytest.approx((1 / 3 + 1 / 4) / 2)
    assert g["10"]["n"] == 1 and g["10"]["accuracy"] == 1.0
    assert g["(none)"] == {"n": 1, "accuracy": 0.0, "accuracy_norm": 0.0, "chance": 0.5}
    s = out["by_subject"]
    assert s["math"]["n"] == 4 and s["math"]["accuracy"] == pytest.approx(3 / 4)
    assert s["math"]["chance"] == pytest.approx(np.mean([1 / 2, 1 / 2, 1 / 4, 1 / 2]))
    assert s["reading"]["accuracy"] == 1.0 and s["(none)"]["accuracy"] == 0.0
    json.dumps(out)  # JSON-serializable


def test_multiple_choice_batches_forward_passes(tok):
    model = Fixed(torch.zeros(tok.get_vocab_size()))
    items = [{"question": "Is it a cat?", "choices": ["yes", "no", "maybe"], "answer": 0}] * 5
    E.score_multiple_choice(model, tok, items, seq_len=16, batch=8)
    assert len(model.inputs) == 2  # 15 choices in batches of 8
    assert all((x[:, 0] == eos(tok)).all() for x in model.inputs)  # EOS in front of the question


def test_multiple_choice_long_items_truncate_from_the_left(tok):
    model = tiny_gpt(tok.get_vocab_size(), seq_len=6)
    q = "the cat sat on the mat. the dog sat on the log. Is it a cat?"
    out = E.score_multiple_choice(model, tok, [{"question": q, "choices": ["yes", "no"], "answer": 0}],
                                  seq_len=6, details=True)
    assert out["truncated"] == 1
    ids = [eos(tok)] + tok.encode(q + " yes").ids
    first = len(ids) - len(tok.encode(" yes").ids)
    assert out["items"][0]["loglik"][0] == pytest.approx(hand_loglik(model, ids[-7:], first - (len(ids) - 7)),
                                                         abs=1e-5)


# --------------------------------------------------------------------------- minimal pairs
def test_minimal_pairs_match_hand_loglikelihood(tok):
    model = tiny_gpt(tok.get_vocab_size())
    pairs = [{"sentence_good": "the cat sat on the mat.", "sentence_bad": "the cat sat on the mats."},
             {"sentence_good": "café crème", "sentence_bad": "crème café 🙂"}]
    out = E.score_minimal_pairs(model, tok, pairs, seq_len=48, details=True)
    correct = []
    for p, r in zip(pairs, out["items"]):
        good = hand_loglik(model, [eos(tok)] + tok.encode(p["sentence_good"]).ids, 1)  # first token scored too
        bad = hand_loglik(model, [eos(tok)] + tok.encode(p["sentence_bad"]).ids, 1)
        assert abs(r["logp_good"] - good) < 1e-5 and abs(r["logp_bad"] - bad) < 1e-5
        correct.append(good > bad)
    assert out["accuracy"] == pytest.approx(np.mean(correct)) and out["n"] == 2


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_minimal_pairs_accuracy_and_groups(tok, tmp_path):
    vocab = tok.get_vocab_size()
    cat, dog = single(tok, " cat"), single(tok, " dog")
    z = torch.zeros(vocab)
    z[cat] = 3.0  # sentences with " cat" are more likely than the same with " dog"
    d = tmp_path / "blimp"
    d.mkdir()
    write_jsonl(d / "anaphor_agreement.jsonl", [
        {"sentence_good": "the cat sat", "sentence_bad": "the dog sat", "UID": "anaphor_agreement",
         "linguistics_term": "anaphor", "field": "morphology"},  # right
        {"sentence_good": "the dog sat", "sentence_bad": "the cat sat", "UID": "anaphor_agreement",
         "linguistics_term": "anaphor", "field": "morphology"},  # wrong
    ])
    write_jsonl(d / "island.jsonl", [
        {"sentence_good": "a cat", "sentence_bad": "a dog", "UID": "island", "linguistics_term": "island_effects",
         "field": "syntax"},  # right
        {"sentence_good": "a cat", "sentence_bad": "a cat", "UID": "island", "linguistics_term": "island_effects",
         "field": "syntax"},  # a tie is not a success
        {"sentence_good": "the cat and a cat", "sentence_bad": "the dog and a dog", "UID": "island",
         "linguistics_term": "island_effects", "field": "syntax"},  # right
    ])
    pairs = DI.load_jsonl(d)
    assert [p["_file"] for p in pairs] == ["anaphor_agreement"] * 2 + ["island"] * 3
    model = Fixed(z)
    out = E.score_minimal_pairs(model, tok, pairs, seq_len=16, batch=4)
    assert out["n"] == 5 and out["accuracy"] == pytest.approx(3 / 5)
    assert out["by_paradigm"] == {"anaphor_agreement": {"n": 2, "accuracy": 0.5},
                                  "island": {"n": 3, "accuracy": pytest.approx(2 / 3)}}
    assert out["by_term"] == {"anaphor": {"n": 2, "accuracy": 0.5},
                              "island_effects": {"n": 3, "accuracy": pytest.approx(2 / 3)}}
    assert out["by_field"]["syntax"]["n"] == 3
    assert out["by_file"] == out["by_paradigm"]
    assert len(model.inputs) == 3  # 10 sentences in batches of 4
    assert all((x[:, 0] == eos(tok)).all() for x in model.inputs)
    json.dumps(out)
    # Zorro: `paradigm`, one file: no by_file, no by_term
    z_pairs = DI.load_jsonl(write_jsonl(tmp_path / "zorro.jsonl", [
        {"sentence_good": "the cat", "sentence_bad": "the dog", "paradigm": "agreement"},
        {"sentence_good": "the dog", "sentence_bad": "the cat", "paradigm": "binding"}]))
    zout = E.score_minimal_pairs(model, tok, z_pairs, seq_len=16)
    assert zout["by_paradigm"] == {"agreement": {"n": 1, "accuracy": 1.0}, "binding": {"n": 1, "accuracy": 0.0}}
    assert "by_file" not in zout and "by_term" not in zout


# --------------------------------------------------------------------------- bits per byte
TEXT = "the cat sat on the mat.\nthe dog sat.\n\n  \ncafé crème 🙂 über\n\n\nIs it a cat? yes.\n"


def test_split_documents():
    assert E.split_documents(TEXT) == ["the cat sat on the mat.\nthe dog sat.", "café crème 🙂 über",
                                       "Is it a cat? yes."]
    assert E.split_documents("\n\n  \n") == []


def test_bits_per_byte_matches_hand_computation(tok):
    T = 8
    model = tiny_gpt(tok.get_vocab_size(), seq_len=T).train()
    out = E.bits_per_byte(model, tok, TEXT, seq_len=T, batch=2)
    assert model.training
    docs = E.split_documents(TEXT)
    stream = [eos(tok)]
    for d in docs:
        stream += tok.encode(d).ids + [eos(tok)]
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(stream) - 1, T):  # non-overlapping windows, the last one shorter
            w = torch.tensor([stream[s: s + T + 1]])
            nll += F.cross_entropy(model(w[:, :-1])[0].double(), w[0, 1:], reduction="sum").item()
            n += w.shape[1] - 1
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    assert n == len(stream) - 1 and len(stream) - 1 > 3 * T and (len(stream) - 1) % T  # a partial last window
    assert out["tokens"] == n and out["bytes"] == nbytes and out["documents"] == 3
    assert out["windows"] == math.ceil(n / T)
    assert out["loss"] == pytest.approx(nll / n, abs=1e-5)
    assert out["bpb"] == pytest.approx(nll / (math.log(2) * nbytes), abs=1e-5)
    assert abs(out["loss"] - math.log(tok.get_vocab_size())) > 0.05  # not a uniform coincidence
    assert E.bits_per_byte(model, tok, TEXT, seq_len=T, batch=16)["bpb"] == pytest.approx(out["bpb"], abs=1e-6)


def test_bits_per_byte_of_a_uniform_model(tok):
    V = tok.get_vocab_size()
    out = E.bits_per_byte(Fixed(torch.zeros(V)), tok, TEXT, seq_len=8)
    assert out["loss"] == pytest.approx(math.log(V), abs=1e-6)
    assert out["bpb"] == pytest.approx(out["tokens"] * math.log(V) / (math.log(2) * out["bytes"]), rel=1e-6)
    assert out["bytes"] == len("".join(E.split_documents(TEXT)).encode("utf-8"))


def test_count_bytes(tok, monkeypatch):
    text = "café crème 🙂 über naïve"
    ids = tok.encode(text).ids
    assert E.count_bytes(tok, ids) == len(text.encode("utf-8"))
    assert E.count_bytes(tok, [eos(tok)] + ids + [eos(tok)]) == len(text.encode("utf-8"))  # EOS: no bytes
    # a cut inside a multi-byte character still adds up exactly
    assert all(E.count_bytes(tok, ids[:k]) + E.count_bytes(tok, ids[k:]) == len(text.encode()) for k in range(len(ids)))
    # other tokenizers: decoded between special tokens
    monkeypatch.setattr(E, "_byte_table", lambda tokenizer: None)
    assert E.count_bytes(tok, ids + [eos(tok)] + ids) == 2 * len(text.encode("utf-8"))


# --------------------------------------------------------------------------- load_jsonl
def test_load_jsonl_exam_items(tmp_path):
    f = write_jsonl(tmp_path / "exam.jsonl", [
        {"question": "q1", "choices": ["a", "b"], "answer": 1, "grade": 3},
        {"question": "q2", "choices": ["a", "b", "c"], "answer": 0, "subject": "math"}])
    items = DI.load_jsonl(f)
    assert [it["question"] for it in items] == ["q1", "q2"] and items[0]["_file"] == "exam"


@pytest.mark.parametrize("rows, kind, message", [
    (['{"question": "q", "choices": ["a", "b"], "answer": 0}', "", '{"question": "q", "choices": ['],
     None, ":3: bad JSON"),
    (['{"question": "q", "answer": 0}'], None, ":1: missing field 'choices'"),
    (['{"question": "q", "choices": ["a", "b"], "answer": 0}', '{"question": "q", "choices": ["a", "b"], "answer": 2}'],
     None, ":2: 'answer' must be an index into 'choices' (0..1), got 2"),
    (['{"question": "q", "choices": ["a", "b"], "answer": true}'], None, "'answer' must be an index"),
    (['{"question": "q", "choices": ["a"], "answer": 0}'], None, "at least 2"),
    (['{"question": "q", "choices": ["a", 3], "answer": 0}'], None, "choice 1 must be a non-empty string"),
    (['{"sentence_good": "a b"}'], None, ":1: missing field 'sentence_bad'"),
    (['{"sentence_good": "a b", "sentence_bad": ""}'], None, "'sentence_bad' must be a non-empty string"),
    (['{"text": "a b"}'], None, ":1: neither a multiple-choice item"),
    (['[1, 2]'], None, ":1: expected a JSON object"),
    (['{"sentence_good": "a", "sentence_bad": "b"}'], "exam", ":1: missing field 'question'"),
    ([], None, "no items"),
])
def test_load_jsonl_errors_name_file_and_line(tmp_path, rows, kind, message):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(rows) + ("\n" if rows else ""))
    with pytest.raises(D.DataError) as e:
        DI.load_jsonl(f, kind=kind)
    assert str(f) in str(e.value) and message in str(e.value)


def test_load_jsonl_directory_errors(tmp_path):
    with pytest.raises(D.DataError, match="no such file"):
        DI.load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(D.DataError, match="no .jsonl files"):
        DI.load_jsonl(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    write_jsonl(tmp_path / "b.jsonl", [{"sentence_good": "a", "sentence_bad": "b"}])
    with pytest.raises(D.DataError, match="mixes multiple-choice items"):
        DI.load_jsonl(tmp_path)
    (tmp_path / "c.jsonl").write_bytes(b'{"sentence_good": "\xff", "sentence_bad": "b"}\n')
    with pytest.raises(D.DataError, match="c.jsonl: not UTF-8"):
        DI.load_jsonl(tmp_path / "c.jsonl")


def test_scorers_check_items(tok):
    with pytest.raises(D.DataError, match="item 1: missing field 'answer'"):
        E.score_multiple_choice(Fixed(torch.zeros(tok.get_vocab_size())), tok,
                                [{"question": "q", "choices": ["a", "b"], "answer": 0},
                                 {"question": "q", "choices": ["a", "b"]}], seq_len=8)


# --------------------------------------------------------------------------- output
def test_write_results_and_format_table(tmp_path):
    res = {"checkpoint": "RUN/stages/00_a/model.pt", "stage": "a", "stage_index": 0, "n_params": 1234, "seq_len": 8,
           "heldout": {"a": {"loss": 1.5, "bpb": 0.75, "tokens": 100, "bytes": 300, "exam": {"accuracy": 0.25}},
                       "b": {"missing": "no data cache"}},
           "texts": {"t.txt": {"loss": 2.0, "bpb": 1.25, "tokens": 10, "bytes": 20}},
           "exams": {"e.jsonl": {"n": 4, "accuracy": 0.5, "accuracy_norm": float("nan"), "chance": 0.3,
                                 "by_grade": {"3": {"n": 4, "accuracy": 0.5, "accuracy_norm": 0.75, "chance": 0.3}}}},
           "pairs": {"p": {"n": 2, "accuracy": 1.0, "by_term": {"island": {"n": 2, "accuracy": 1.0}}}}}
    path = RD.write_atomic(tmp_path / "sub" / "eval.json", res)
    back = json.loads(path.read_text())  # strict JSON: NaN became null
    assert back["exams"]["e.jsonl"]["accuracy_norm"] is None and back["heldout"]["a"]["bpb"] == 0.75
    table = ER.format_table(res)
    for s in ("stage 0 a", "1,234", "held-out sets", "0.7500", "25.0%", "t.txt", "1.2500", "e.jsonl", "grade 3",
              "75.0%", "minimal pairs", "term island", "100.0%"):
        assert s in table, s
    assert "b " in table  # the stage without data still has a row
    # one scorer's result alone
    assert "bpb" in ER.format_table({"loss": 1.0, "bpb": 0.5, "tokens": 3, "bytes": 6})
    assert "chance" in ER.format_table(res["exams"]["e.jsonl"])
    assert "minimal pairs" in ER.format_table(res["pairs"]["p"])


# --------------------------------------------------------------------------- a tiny run dir
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    small = {"hidden": 16, "heads": 2, "ffn": 32}
    raw = {
        "run": {"name": "t", "seed": 1},
        "tokenizer": {"vocab_size": 300},
        "defaults": {"model": {"head_dim": 8, "seq_len": 16},
                     "train": {"nproc": 1, "eval_tokens": 256, "tokens": 4096, "micro_batch": 2}},
        "stages": [
            {"name": "a", "data": [{"path": "synthetic:level0"}], "model": {"layers": 1, **small}},
            {"name": "b", "data": [{"path": "synthetic:level1"}, {"path": "synthetic:level0", "weight": 0.5}],
             "model": {"layers": 2, **small}},
            {"name": "c", "data": [{"path": "synthetic:level1"}], "model": {"layers": 2, **small}},
        ],
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(root / "cfg.yaml")
    run = RD.open_run_dir(cfg, root / "run")
    tok, sha = DP.ensure_tokenizer(cfg, run)
    for s in (0, 1):  # stage c keeps no data cache and no weights
        DP.stage_data(cfg, run, s, tok, sha)
    plan = Plan(cfg, tok.get_vocab_size())
    for s in (0, 1):
        sdir = RD.stage_dir(run, cfg, s)
        sdir.mkdir(parents=True)
        torch.save(fresh_init(plan.layout(s), 0.3, torch.Generator().manual_seed(s)), sdir / "model.pt")
    return run


def test_load_model_from_run_stage_dir_or_checkpoint(run_dir):
    model, tok, cfg, s = ER.load_model(run_dir, device="cpu")
    assert s == 1 and model.layout.n_layers == 2 and not model.training  # the last finished stage
    assert tok.get_vocab_size() == model.layout.vocab and [st.name for st in cfg.stages] == ["a", "b", "c"]
    for p in (run_dir / "stages" / "00_a", run_dir / "stages" / "00_a" / "model.pt"):
        model, _, _, s = ER.load_model(p, device="cpu")
        assert s == 0 and model.layout.n_layers == 1
    (run_dir / "stages" / "02_c").mkdir(exist_ok=True)
    with pytest.raises(RD.RunDirError, match="stage not finished"):
        ER.load_model(run_dir / "stages" / "02_c")
    with pytest.raises(RD.RunDirError, match="not a run directory"):
        ER.load_model(run_dir / "data")
    with pytest.raises(RD.RunDirError, match="no such file"):
        ER.load_model(run_dir / "nope")


def test_evaluate_run(run_dir, tmp_path):
    exam = write_jsonl(tmp_path / "exam.jsonl", [
        {"question": "2 + 5 =", "choices": ["7", "8", "9"], "answer": 0, "grade": 1},
        {"question": "3 + 3 =", "choices": ["5", "6"], "answer": 1, "grade": 2}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"sentence_good": "one two three", "sentence_bad": "three two one",
                                                    "UID": "order"}])
    text = tmp_path / "text.txt"
    text.write_text("one two three.\n\nfour five six seven eight nine ten.\n")
    res = ER.evaluate_run(run_dir / "stages" / "00_a", exams=[exam], pairs=[pairs], texts=[text])
    sdir = run_dir / "stages" / "00_a"
    assert res["output"] == str(sdir / "eval.json")
    assert json.loads((sdir / "eval.json").read_text()) == json.loads(json.dumps(RD.jsonable(res)))
    assert res["stage"] == "a" and res["stage_index"] == 0 and res["seq_len"] == 16
    assert set(res["heldout"]) == {"a", "b", "c"} and "missing" in res["heldout"]["c"]
    model, tok, cfg, _ = ER.load_model(sdir, device="cpu")
    for s, name in ((0, "a"), (1, "b")):
        h = res["heldout"][name]
        data = ER.stage_cache(run_dir, name)
        windows = D.heldout_windows(data, 16, 256)
        # the same windows as the trainer's held-out loss
        assert h["loss"] == pytest.approx(heldout_loss(model, windows), abs=1e-6)
        assert h["tokens"] == windows.shape[0] * 16
        assert h["bytes"] == sum(len(tok.decode(w[1:].tolist()).encode("utf-8")) for w in windows)
        assert h["bpb"] == pytest.approx(h["loss"] * h["tokens"] / (math.log(2) * h["bytes"]))
        assert len(h["sources"]) == len(cfg.stages[s].data)
        assert 0.0 <= h["exam"]["accuracy"] <= 1.0 and h["exam"]["n"] > 0
    assert res["texts"][str(text)] == E.bits_per_byte(model, tok, text.read_text(), 16)
    assert res["exams"][str(exam)]["n"] == 2 and set(res["exams"][str(exam)]["by_grade"]) == {"1", "2"}
    assert res["pairs"][str(pairs)]["by_paradigm"]["order"]["n"] == 1
    assert "held-out sets" in ER.format_table(res)
    # input errors surface before any scoring, naming the file
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(D.DataError, match="bad.jsonl:1"):
        ER.evaluate_run(run_dir, exams=[bad], write=False)
