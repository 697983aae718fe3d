"""Tests for llmagogy_ds.data.corpus: reading sources, tokenizer, packed caches, sampling."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from llmagogy_ds.data import cache as C
from llmagogy_ds.data import corpus as D
from llmagogy_ds.config import DataSource, config_from_dict

WORDS = ("the cat dog sat ran on under a mat tree house red blue green big small quick slow "
         "fox jumps over lazy bird sings song river flows stone hill").split()


def make_docs(n: int, seed: int = 0, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "." for _ in range(n)]


def write_txt(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def make_cfg(base: Path, sources: list[dict], seq_len: int = 16, seed: int = 3):
    raw = {
        "run": {"name": "t", "seed": seed},
        "tokenizer": {"vocab_size": 320},
        "defaults": {"model": {"head_dim": 16, "seq_len": seq_len}, "train": {"micro_batch": 2, "nproc": 1}},
        "stages": [{"name": "s0", "data": sources, "model": {"layers": 1, "hidden": 32, "heads": 2, "ffn": 64},
                    "train": {"tokens": 10000}}],
    }
    return config_from_dict(raw, base)


@pytest.fixture(scope="module")
def tok():
    return D.train_tokenizer(make_docs(300, seed=99), vocab_size=320)


# --------------------------------------------------------------------------- UTF-8
def test_check_utf8_names_file_and_offset(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"hello\xff world")
    with pytest.raises(D.DataError) as e:
        D.check_utf8(p)
    assert str(p) in str(e.value)
    assert "offset 5" in str(e.value)


def test_check_utf8_accepts_valid_multibyte(tmp_path):
    p = tmp_path / "ok.txt"
    p.write_text("héllo wörld – ✓\n", encoding="utf-8")
    D.check_utf8(p)  # no error


def test_check_utf8_truncated_sequence_at_end(tmp_path):
    p = tmp_path / "trunc.txt"
    p.write_bytes("ok é".encode()[:-1])
    with pytest.raises(D.DataError, match="truncated"):
        D.check_utf8(p)


@pytest.mark.parametrize("tail, bad_at", [(b"\xc3\x28xyz", 0), (b"\xe2\x82(", 0), ("é".encode() + b"ok\xff", 4)])
def test_check_utf8_offset_across_read_chunks(tmp_path, tail, bad_at):
    # the first byte of ``tail`` is the last byte of the first 1 MiB read
    start = (1 << 20) - 1
    p = tmp_path / "big.txt"
    p.write_bytes(b"a" * start + tail)
    with pytest.raises(D.DataError) as e:
        D.check_utf8(p)
    assert f"offset {start + bad_at})" in str(e.value)


def test_read_source_invalid_utf8_raises_before_tokenizing(tmp_path, monkeypatch):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"first doc\n\nhello\xff world\n")
    import datasets

    def no_load(*a, **k):
        raise AssertionError("load_dataset called on a non-UTF-8 file")

    monkeypatch.setattr(datasets, "load_dataset", no_load)
    with pytest.raises(D.DataError) as e:
        D.read_source(DataSource(str(p)), "train", 0, str(tmp_path / "hf"))
    assert str(p) in str(e.value) and "offset 16" in str(e.value)


# --------------------------------------------------------------------------- read_source
def test_read_source_txt_paragraphs_and_every_20th_heldout(tmp_path):
    docs = [f"document number {i}\nsecond line of {i}" for i in range(45)]
    p = write_txt(tmp_path / "c.txt", docs)
    src = DataSource(str(p))
    train = D.read_source(src, "train", 0, str(tmp_path / "hf"))
    held = D.read_source(src, "heldout", 0, str(tmp_path / "hf"))
    assert held == [docs[19], docs[39]]
    assert train == [d for i, d in enumerate(docs) if i not in (19, 39)]
    assert "\n" in train[0]  # a paragraph is one document, lines kept together


def test_read_source_dir_with_train_and_heldout_files(tmp_path):
    d = tmp_path / "corpus"
    train_docs, held_docs = make_docs(30, seed=1), make_docs(3, seed=2)
    write_txt(d / "train.txt", train_docs)
    write_txt(d / "heldout.txt", held_docs)
    src = DataSource(str(d))
    assert D.read_source(src, "train", 0, str(tmp_path / "hf")) == train_docs  # nothing held out of train
    assert D.read_source(src, "heldout", 0, str(tmp_path / "hf")) == held_docs


def test_read_source_explicit_heldout_key(tmp_path):
    train_docs, held_docs = make_docs(25, seed=1), make_docs(2, seed=5)
    src = DataSource(str(write_txt(tmp_path / "a.txt", train_docs)), heldout=str(write_txt(tmp_path / "h.txt", held_docs)))
    assert D.read_source(src, "train", 0, str(tmp_path / "hf")) == train_docs
    assert D.read_source(src, "heldout", 0, str(tmp_path / "hf")) == held_docs


def test_read_source_jsonl_text_field(tmp_path):
    docs = make_docs(40, seed=4)
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    train = D.read_source(DataSource(str(p)), "train", 0, str(tmp_path / "hf"))
    held = D.read_source(DataSource(str(p)), "heldout", 0, str(tmp_path / "hf"))
    assert held == [docs[19], docs[39]]
    assert len(train) == 38 and train[0] == docs[0]

    q = tmp_path / "b.jsonl"
    q.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    assert D.read_source(DataSource(str(q), text_field="body"), "train", 0, str(tmp_path / "hf"))[0] == docs[0]


def test_read_source_missing_text_field(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"content": d}) + "\n" for d in make_docs(5)))
    with pytest.raises(D.DataError) as e:
        D.read_source(DataSource(str(p)), "train", 0, str(tmp_path / "hf"))
    msg = str(e.value)
    assert "'text'" in msg and "content" in msg and str(p) in msg


def test_read_source_no_heldout_documents_raises(tmp_path):
    p = write_txt(tmp_path / "few.txt", make_docs(5))  # fewer than 20 documents: nothing held out
    with pytest.raises(D.DataError, match="no heldout documents"):
        D.read_source(DataSource(str(p)), "heldout", 0, str(tmp_path / "hf"))


# --------------------------------------------------------------------------- tokenizer
def test_train_tokenizer_eos_and_round_trip(tmp_path, tok):
    eos = tok.token_to_id(D.EOS)
    assert eos is not None
    assert 257 < tok.get_vocab_size() <= 320
    text = "The quick fox jumps over the lazy dog. Ünïcödé ✓\nnew line"
    enc = tok.encode(text)
    assert eos not in enc.ids
    assert tok.decode(enc.ids) == text
    # merges were learnt: a frequent word is fewer tokens than bytes
    assert len(tok.encode(" the house").ids) < len(" the house")
    # saved and reloaded through load_tokenizer
    tok.save(str(tmp_path / "tok.json"))
    tok2 = D.load_tokenizer(tmp_path / "tok.json")
    assert tok2.encode(text).ids == enc.ids and tok2.token_to_id(D.EOS) == eos


def test_load_tokenizer_without_eos_is_refused(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    t = ByteLevelBPETokenizer()
    t.train_from_iterator(make_docs(50), vocab_size=300, show_progress=False)
    t.save(str(tmp_path / "t.json"))
    with pytest.raises(D.DataError, match="endoftext"):
        D.load_tokenizer(tmp_path / "t.json")


# --------------------------------------------------------------------------- packing / cache
def test_prepare_stage_data_writes_and_reuses_cache(tmp_path, tok, monkeypatch):
    docs = make_docs(60, seed=7)
    p = write_txt(tmp_path / "src" / "a.txt", docs)
    cfg = make_cfg(tmp_path, [{"path": str(p)}])
    stage = cfg.stages[0]
    data_root = tmp_path / "run" / "data"
    sd = D.prepare_stage_data(stage, tok, "sha-1", data_root, seed=3)

    assert sd.root.parent == data_root and sd.root.name.startswith("s0-")
    meta = json.loads((sd.root / "meta.json").read_text())
    assert meta["dtype"] == "uint16" == sd.dtype
    (entry,) = meta["sources"]
    train = sd.stream(0, "train")
    held = sd.stream(0, "heldout")
    assert entry["train_tokens"] == len(train) and entry["heldout_tokens"] == len(held)
    eos = tok.token_to_id(D.EOS)
    train_docs = [d for i, d in enumerate(docs) if i % 20 != 19]
    expected = [t for d in train_docs for t in tok.encode(d).ids + [eos]]
    assert train.tolist() == expected
    assert int((held == eos).sum()) == 3  # documents 19, 39, 59
    # the stage's view is one small file; the tokens are megatron indexed datasets in the shared cache
    assert sorted(f.name for f in sd.root.iterdir()) == ["meta.json"]
    (cached,) = [d for d in (data_root / "cache").iterdir() if d.is_dir()]
    assert {"train.bin", "train.idx", "heldout.bin", "heldout.idx", "meta.json"} <= {f.name for f in cached.iterdir()}
    assert entry["train"]["prefix"] == str(cached / "train")

    mtimes = {f.name: f.stat().st_mtime_ns for f in cached.iterdir()}

    def no_tokenize(*a, **k):
        raise AssertionError("cache not reused: tokenized again")

    monkeypatch.setattr(C, "tokenize_segments", no_tokenize)
    sd2 = D.prepare_stage_data(stage, tok, "sha-1", data_root, seed=3)
    assert sd2.root == sd.root
    assert {f.name: f.stat().st_mtime_ns for f in cached.iterdir()} == mtimes
    monkeypatch.undo()

    # another tokenizer -> another cache
    sd3 = D.prepare_stage_data(stage, tok, "sha-2", data_root, seed=3)
    assert sd3.root != sd.root


def test_prepare_stage_data_source_change_gives_new_fingerprint(tmp_path, tok):
    p = write_txt(tmp_path / "src" / "a.txt", make_docs(40, seed=8))
    cfg = make_cfg(tmp_path, [{"path": str(p)}])
    data_root = tmp_path / "run" / "data"
    sd = D.prepare_stage_data(cfg.stages[0], tok, "sha", data_root, seed=3)
    n_before = sd.sources[0]["train_tokens"]

    write_txt(p, make_docs(80, seed=8))  # more documents: other size and mtime
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    sd2 = D.prepare_stage_data(cfg.stages[0], tok, "sha", data_root, seed=3)
    assert sd2.root != sd.root
    assert (sd.root / "meta.json").exists()  # the old cache is left alone
    assert sd2.sources[0]["train_tokens"] > n_before  # the new content was really read


def test_prepare_stage_data_weight_change_gives_new_cache(tmp_path, tok):
    a = write_txt(tmp_path / "a.txt", make_docs(40, seed=1))
    b = write_txt(tmp_path / "b.txt", make_docs(40, seed=2))
    sd1 = D.prepare_stage_data(make_cfg(tmp_path, [{"path": str(a)}, {"path": str(b), "weight": 0.5}]).stages[0],
                               tok, "sha", tmp_path / "data", seed=3)
    sd2 = D.prepare_stage_data(make_cfg(tmp_path, [{"path": str(a)}, {"path": str(b), "weight": 0.25}]).stages[0],
                               tok, "sha", tmp_path / "data", seed=3)
    assert sd1.weights == [1.0, 0.5] and sd2.weights == [1.0, 0.25]
    assert sd1.root != sd2.root  # another view ...
    assert [s["train"] for s in sd1.sources] == [s["train"] for s in sd2.sources]  # ... of the same tokens


# --------------------------------------------------------------------------- sampling
SEQ = 8
BASE1 = 30000  # tokens of source 1 start here, so a token tells its source and position


def write_stage(root: Path, lengths: list[int], weights: list[float], heldout_lengths=None) -> D.StageData:
    """A StageData whose source k holds tokens k*BASE1 + 0, 1, 2, ... (uint16)."""
    root.mkdir(parents=True, exist_ok=True)
    heldout_lengths = heldout_lengths or lengths
    sources = []
    for k, (n, nh, w) in enumerate(zip(lengths, heldout_lengths, weights)):
        (k * BASE1 + np.arange(n)).astype(np.uint16).tofile(root / f"src{k}.train.bin")
        (k * BASE1 + 10000 + np.arange(nh)).astype(np.uint16).tofile(root / f"src{k}.heldout.bin")
        sources.append({"path": f"src{k}", "weight": w, "train": f"src{k}.train.bin", "heldout": f"src{k}.heldout.bin",
                        "train_tokens": n, "heldout_tokens": nh})
    (root / "meta.json").write_text(json.dumps({"stage": "x", "fingerprint": "f", "dtype": "uint16",
                                                "sources": sources}))
    return D.StageData.load(root)


@pytest.fixture
def stage2(tmp_path):
    # 40 and 13 windows of SEQ + 1 tokens
    return write_stage(tmp_path / "stage", [40 * SEQ + 1, 13 * SEQ + 3], [1.0, 0.25])


def _source_and_window(x_row) -> tuple[int, int]:
    t = int(x_row[0])
    k = int(t >= BASE1)
    off = t - k * BASE1
    assert off % SEQ == 0
    return k, off // SEQ


def test_sampler_targets_are_inputs_shifted(stage2):
    s = D.BlendedSampler(stage2, SEQ, seed=1)
    x, y = s.batch(0, 50)
    assert x.shape == y.shape == (50, SEQ) and x.dtype == np.int64
    assert (x[:, 1:] == y[:, :-1]).all()
    assert (y[:, -1] == x[:, -1] + 1).all()  # contiguous streams: the next token
    for row in x:  # windows are contiguous slices of one source
        assert (np.diff(row) == 1).all()


def test_sampler_deterministic_and_seeded(stage2):
    a = D.BlendedSampler(stage2, SEQ, seed=5).batch(100, 64)
    b = D.BlendedSampler(stage2, SEQ, seed=5).batch(100, 64)
    c = D.BlendedSampler(stage2, SEQ, seed=6).batch(100, 64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("start", [0, 1000, 2047])  # 1000/2047: across a chunk boundary
def test_sampler_independent_of_rank_split(stage2, start):
    s = D.BlendedSampler(stage2, SEQ, seed=2)
    n = 12
    x1, y1 = s.batch(start, 2 * n)  # one rank, micro batch 2n
    fresh = D.BlendedSampler(stage2, SEQ, seed=2)  # another process: no shared caches
    r0 = fresh.batch(start, n)  # two ranks, micro batch n each
    r1 = fresh.batch(start + n, n)
    assert np.array_equal(x1, np.concatenate([r0[0], r1[0]]))
    assert np.array_equal(y1, np.concatenate([r0[1], r1[1]]))


def test_sampler_weights_share(stage2):
    s = D.BlendedSampler(stage2, SEQ, seed=3)
    assert s.chunk == 1024
    x, _ = s.batch(0, 3 * 1024)
    src = (x[:, 0] >= BASE1).astype(int)
    share1 = src.mean()
    assert abs(share1 - 0.2) < 0.01 and abs((1 - share1) - 0.8) < 0.01
    per_chunk = src.reshape(3, 1024).sum(1)
    assert (per_chunk == s.alloc[1]).all()  # every chunk holds the same mix
    # sources are shuffled inside a chunk, not in blocks
    assert 0 < src[:100].sum() < 100


def test_sampler_visits_each_window_once_per_epoch(stage2):
    s = D.BlendedSampler(stage2, SEQ, seed=4)
    assert s.windows == [40, 13]
    x, _ = s.batch(0, 400)
    visits = {0: [], 1: []}
    for row in x:
        k, w = _source_and_window(row)
        visits[k].append(w)
    for k, n_win in ((0, 40), (1, 13)):
        v = visits[k]
        assert len(v) >= 2 * n_win
        assert sorted(v[:n_win]) == list(range(n_win))  # epoch 0: a permutation
        assert sorted(v[n_win: 2 * n_win]) == list(range(n_win))  # epoch 1: another one
        assert v[:n_win] != v[n_win: 2 * n_win]  # reshuffled
        assert v[:n_win] != list(range(n_win))  # shuffled at all


def test_sampler_epochs_continue_across_chunks(stage2):
    s = D.BlendedSampler(stage2, SEQ, seed=4)
    x, _ = s.batch(0, 3 * s.chunk)
    for k, n_win in ((0, 40), (1, 13)):
        v = [w for kk, w in map(_source_and_window, x) if kk == k]
        assert len(v) == 3 * s.alloc[k]
        for e in range(len(v) // n_win):  # every complete epoch is a permutation, chunk borders included
            assert sorted(v[e * n_win: (e + 1) * n_win]) == list(range(n_win)), (k, e)


def test_sampler_epochs_and_too_short_source(tmp_path, stage2):
    s = D.BlendedSampler(stage2, SEQ, seed=0)
    e0, e1 = s.epochs(1024)
    assert e0 == pytest.approx(s.alloc[0] / 40) and e1 == pytest.approx(s.alloc[1] / 13)
    short = write_stage(tmp_path / "short", [100, SEQ], [1.0, 1.0])
    with pytest.raises(D.DataError, match="src1"):
        D.BlendedSampler(short, SEQ, seed=0)


def test_sampler_on_prepared_data(tmp_path, tok):
    a = write_txt(tmp_path / "a.txt", make_docs(60, seed=11))
    b = write_txt(tmp_path / "b.txt", make_docs(60, seed=12))
    cfg = make_cfg(tmp_path, [{"path": str(a)}, {"path": str(b), "weight": 0.25}])
    sd = D.prepare_stage_data(cfg.stages[0], tok, "sha", tmp_path / "data", seed=3)
    assert sd.weights == [1.0, 0.25]
    s = D.BlendedSampler(sd, 16, seed=0)
    x, y = s.batch(7, 9)
    assert (x[:, 1:] == y[:, :-1]).all()
    streams = [sd.stream(k, "train") for k in range(2)]
    for i in range(9):
        k, off = s.locate(7 + i)
        assert x[i].tolist() == streams[k][off: off + 16].tolist()
        assert y[i].tolist() == streams[k][off + 1: off + 17].tolist()


# --------------------------------------------------------------------------- held-out windows
def test_heldout_windows_split_by_weight(tmp_path):
    sd = write_stage(tmp_path / "h", [100, 100], [1.0, 0.25], heldout_lengths=[20 * SEQ + 1, 20 * SEQ + 1])
    w = D.heldout_windows(sd, SEQ, max_tokens=10 * SEQ)
    assert w.shape == (10, SEQ + 1) and w.dtype == np.int64
    src = (w[:, 0] >= BASE1).astype(int)
    assert src.tolist() == [0] * 8 + [1] * 2
    assert (np.diff(w, axis=1) == 1).all()
    assert w[0, 0] == 10000 and w[8, 0] == BASE1 + 10000  # held-out streams, not training ones
    # a fixed set: the same on every call
    assert np.array_equal(w, D.heldout_windows(sd, SEQ, max_tokens=10 * SEQ))
    # capped by what the held-out text holds
    small = write_stage(tmp_path / "s", [100], [1.0], heldout_lengths=[3 * SEQ + 1])
    assert D.heldout_windows(small, SEQ, max_tokens=100 * SEQ).shape == (3, SEQ + 1)


def test_heldout_windows_too_short_raises(tmp_path):
    sd = write_stage(tmp_path / "h", [100], [1.0], heldout_lengths=[SEQ])  # SEQ tokens < one window of SEQ + 1
    with pytest.raises(D.DataError, match="shorter than one sequence"):
        D.heldout_windows(sd, SEQ, max_tokens=1000)
    ok = write_stage(tmp_path / "ok", [100], [1.0], heldout_lengths=[SEQ + 1])
    assert D.heldout_windows(ok, SEQ, max_tokens=1000).shape == (1, SEQ + 1)
