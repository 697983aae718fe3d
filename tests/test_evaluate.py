"""Tests for llmagogy_ds.evaluation.evaluate: held-out loss and teacher-forced exact-match exams."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmagogy_ds.data import corpus as D
from llmagogy_ds.evaluation.evaluate import encode_item, exam_accuracy, heldout_loss
from llmagogy_ds.model.layout import Shape, initial_layout
from llmagogy_ds.model.gpt import GPT, fresh_init

ITEMS = [
    {"prompt": "Q: what is 2+3? A:", "answer": " 5", "kind": "add"},
    {"prompt": "Q: what is 4+4? A:", "answer": " 8", "kind": "add"},
    {"prompt": "Q: copy ab cd. A:", "answer": " ab cd", "kind": "copy"},
    {"prompt": "Q: copy the cat. A:", "answer": " the cat", "kind": "copy"},
    {"prompt": "Q: copy é ü. A:", "answer": " é ü", "kind": "copy"},
]


@pytest.fixture(scope="module")
def tok():
    texts = [it["prompt"] + it["answer"] + "\n" for it in ITEMS] * 30 + ["the cat sat on the mat"] * 30
    return D.train_tokenizer(texts, vocab_size=320)


class Oracle(torch.nn.Module):
    """A 'model' whose arg-max after every known prefix is the next token of its sequence.

    ``wrong`` maps (sequence index, position p) to a token put on top after ``seq[:p + 1]``
    instead of ``seq[p + 1]``. Unknown prefixes (padding) predict token 0.
    """

    def __init__(self, seqs: list[list[int]], vocab: int, wrong: dict | None = None):
        super().__init__()
        self.vocab = vocab
        self.next = {}
        for s, ids in enumerate(seqs):
            for p in range(len(ids) - 1):
                self.next[tuple(ids[: p + 1])] = (wrong or {}).get((s, p), ids[p + 1])
        self.calls = 0
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x):
        self.calls += 1
        B, T = x.shape
        logits = torch.randn(B, T, self.vocab, generator=self.gen)  # noise well below the spike
        for r in range(B):
            row = x[r].tolist()
            for t in range(T):
                logits[r, t, self.next.get(tuple(row[: t + 1]), 0)] = 1e4
        return logits


def encoded(tok, items=ITEMS):
    return [encode_item(tok, it["prompt"], it["answer"]) for it in items]


def test_encode_item_first_answer_token(tok):
    for it in ITEMS:
        ids, first = encode_item(tok, it["prompt"], it["answer"])
        enc = tok.encode(it["prompt"] + it["answer"] + "\n")
        assert ids == enc.ids
        assert 0 < first < len(ids)
        # everything before `first` decodes to the prompt, the rest to answer + newline
        assert tok.decode(ids[:first]) == it["prompt"]
        assert tok.decode(ids[first:]) == it["answer"] + "\n"
        assert tok.decode(ids[first:]).startswith(" ")  # the space belongs to the answer


def test_encode_item_token_straddling_the_boundary(tok):
    # prompt ends in a space that byte-level BPE glues to the next word: " 5" is one token
    prompt, answer = "Q: what is 2+3? A: ", "5"
    ids, first = encode_item(tok, prompt, answer)
    enc = tok.encode(prompt + answer + "\n")
    s, e = enc.offsets[first]
    assert s < len(prompt) < e  # the straddling token counts as an answer token
    assert tok.decode(ids[first:]) == " 5\n"
    assert all(en <= len(prompt) for _, en in enc.offsets[:first])


def test_encode_item_offsets_are_characters(tok):
    prompt, answer = "Q: ééé üü? A:", " ok"
    ids, first = encode_item(tok, prompt, answer)
    assert tok.decode(ids[first:]) == " ok\n"
    assert tok.decode(ids[:first]) == prompt


def test_exam_all_correct(tok):
    enc = encoded(tok)
    model = Oracle([ids for ids, _ in enc], tok.get_vocab_size())
    out = exam_accuracy(model, tok, ITEMS, seq_len=64, batch=2)  # 3 batches of different lengths
    assert out["n"] == len(ITEMS)
    assert out["accuracy"] == 1.0
    assert out["by_kind"] == {"add": 1.0, "copy": 1.0}
    assert model.calls == 3


@pytest.mark.parametrize("which", ["first", "newline", "middle"])
def test_exam_one_wrong_answer_token_fails_the_item(tok, which):
    enc = encoded(tok)
    ids, first = enc[3]  # " the cat\n": several answer tokens
    assert len(ids) - first >= 3
    pos = {"first": first, "newline": len(ids) - 1, "middle": first + 1}[which]
    if which == "newline":
        assert tok.decode([ids[pos]]).endswith("\n")
    bad = (ids[pos] + 1) % tok.get_vocab_size()
    model = Oracle([i for i, _ in enc], tok.get_vocab_size(), wrong={(3, pos - 1): bad})
    out = exam_accuracy(model, tok, ITEMS, seq_len=64, batch=32)
    assert out["accuracy"] == pytest.approx(4 / 5)
    assert out["by_kind"] == {"add": 1.0, "copy": pytest.approx(2 / 3)}


def test_exam_prompt_predictions_do_not_count(tok):
    enc = encoded(tok)
    vocab = tok.get_vocab_size()
    # wrong guesses at every prompt token (all predictions made before the answer starts)
    wrong = {(s, p): (ids[p + 1] + 1) % vocab for s, (ids, first) in enumerate(enc) for p in range(first - 1)}
    model = Oracle([i for i, _ in enc], vocab, wrong=wrong)
    assert exam_accuracy(model, tok, ITEMS, seq_len=64)["accuracy"] == 1.0


def test_exam_per_kind(tok):
    enc = encoded(tok)
    vocab = tok.get_vocab_size()
    # fail item 0 (add) and items 2, 4 (copy) at their first answer token
    wrong = {(s, enc[s][1] - 1): (enc[s][0][enc[s][1]] + 1) % vocab for s in (0, 2, 4)}
    model = Oracle([i for i, _ in enc], vocab, wrong=wrong)
    out = exam_accuracy(model, tok, ITEMS, seq_len=64, batch=3)
    assert out["accuracy"] == pytest.approx(2 / 5)
    assert out["by_kind"]["add"] == pytest.approx(1 / 2)
    assert out["by_kind"]["copy"] == pytest.approx(1 / 3)
    # one kind: no breakdown
    single = exam_accuracy(model, tok, ITEMS[:2], seq_len=64)
    assert "by_kind" not in single and single["accuracy"] == pytest.approx(1 / 2)


def test_exam_truncates_long_items_from_the_left(tok):
    it = {"prompt": "Q: copy the cat the cat the cat the cat. A:", "answer": " the cat"}
    ids, first = encode_item(tok, it["prompt"], it["answer"])
    L = len(ids) - first + 2  # the answer and two prompt tokens fit
    view = ids[-L:]
    vocab = tok.get_vocab_size()
    ok = Oracle([view], vocab)
    assert exam_accuracy(ok, tok, [it], seq_len=L)["accuracy"] == 1.0
    a = first - (len(ids) - L)
    bad = Oracle([view], vocab, wrong={(0, len(view) - 2): (view[-1] + 1) % vocab})  # the newline
    assert exam_accuracy(bad, tok, [it], seq_len=L)["accuracy"] == 0.0
    early = Oracle([view], vocab, wrong={(0, a - 2): (view[a - 1] + 1) % vocab})  # a prompt token
    assert exam_accuracy(early, tok, [it], seq_len=L)["accuracy"] == 1.0


def tiny_gpt(vocab: int, seq_len: int = 16, std: float = 0.5, seed: int = 0) -> GPT:
    layout = initial_layout(Shape(layers=2, hidden=32, heads=2, ffn=64), vocab, head_dim=16)
    model = GPT(layout, seq_len)
    model.load_state_dict(fresh_init(layout, std, torch.Generator().manual_seed(seed)))
    return model


def test_exam_on_real_model_matches_greedy_decoding(tok):
    model = tiny_gpt(tok.get_vocab_size(), seq_len=32).train()
    enc = encoded(tok)
    out = exam_accuracy(model, tok, ITEMS, seq_len=32)
    assert model.training  # mode restored
    assert out["n"] == 5
    with torch.no_grad():
        model.eval()
        expect = []
        for ids, first in enc:
            x = torch.tensor([ids])
            pred = model(x).argmax(-1)[0]
            expect.append(bool((pred[first - 1: len(ids) - 1] == x[0, first:]).all()))
            # greedy decoding from the prompt gives the answer iff teacher-forced match
            seq = ids[:first]
            for _ in range(len(ids) - first):
                seq.append(int(model(torch.tensor([seq])).argmax(-1)[0, -1]))
            assert (seq == ids) == expect[-1]
    assert out["accuracy"] == pytest.approx(np.mean(expect))


# --------------------------------------------------------------------------- held-out loss
def test_heldout_loss_matches_hand_computation():
    vocab, seq = 50, 12
    model = tiny_gpt(vocab, seq_len=seq).train()
    rng = np.random.default_rng(0)
    windows = rng.integers(0, vocab, size=(5, seq + 1)).astype(np.int64)
    got = heldout_loss(model, windows, batch=2)
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()
        w = torch.from_numpy(windows)
        logits = model(w[:, :-1])
        expect = F.cross_entropy(logits.float().reshape(-1, vocab), w[:, 1:].reshape(-1)).item()
    assert abs(got - expect) < 1e-6
    assert abs(expect - math.log(vocab)) > 0.05  # not a uniform-prediction coincidence
    # batching does not change the mean
    assert abs(heldout_loss(model, windows, batch=16) - got) < 1e-6
    # a sharded call without torch.distributed is the whole set
    assert abs(heldout_loss(model, windows, batch=3, shard=True) - got) < 1e-6


def test_heldout_loss_is_per_token_mean_over_unequal_batches():
    # with 5 windows in batches of 2, a mean of batch means would weigh the last window double
    vocab, seq = 50, 12
    model = tiny_gpt(vocab, seq_len=seq, seed=1)
    windows = np.random.default_rng(1).integers(0, vocab, size=(5, seq + 1)).astype(np.int64)
    per_window = [heldout_loss(model, windows[i: i + 1]) for i in range(5)]
    assert abs(heldout_loss(model, windows, batch=2) - float(np.mean(per_window))) < 1e-6
