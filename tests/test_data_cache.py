"""The data at scale (issue 10): streaming tokenization into megatron-core indexed datasets,
one cache per (source, tokenizer) shared by stages, baselines and reruns, pre-tokenized
sources used in place, partitions merged, concurrent writers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from llmagogy_ds.config import ConfigError, config_from_dict
from llmagogy_ds.data import cache as C
from llmagogy_ds.data import corpus as D
from llmagogy_ds.data import encode
from llmagogy_ds.data import prepare as DP
from llmagogy_ds.data import reading as R
from llmagogy_ds.data import tokenize as T
from llmagogy_ds.data.pretokenized import SHA_SUFFIX, megatron_indexed

mi = megatron_indexed()
SEQ = 16


def text(n_docs: int, words: int = 30, seed: int = 0) -> str:
    return "\n\n".join(f"document {i}: " + " ".join(f"w{(i * 7 + j * (seed + 1)) % 40}" for j in range(words))
                       for i in range(n_docs)) + "\n"


def cfg_of(base: Path, stages: list[list[dict]], tokenizer: dict | None = None, **run):
    raw = {"run": {"name": "dc", "seed": 1, **run}, "tokenizer": tokenizer or {"vocab_size": 320},
           "defaults": {"model": {"head_dim": 16, "seq_len": SEQ}, "train": {"micro_batch": 2, "nproc": 1,
                                                                             "tokens": 1000}},
           "stages": [{"name": f"s{i}", "data": data, "model": {"layers": 1, "hidden": 32, "heads": 2, "ffn": 64}}
                      for i, data in enumerate(stages)]}
    return config_from_dict(raw, base)


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    D.train_tokenizer(text(200).split("\n\n"), vocab_size=320).save(str(p))
    return p


def build_megatron(prefix: Path, docs: list[np.ndarray], dtype=np.uint16) -> None:
    """Written with megatron-core's builder directly, as preprocess_data.py does."""
    b = mi.IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for d in docs:
        b.add_document(torch.tensor(d), [len(d)])
    b.finalize(str(prefix) + ".idx")


def no_tokenizing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("tokenized again: the cache was not reused")

    monkeypatch.setattr(C, "tokenize_segments", boom)
    monkeypatch.setattr(encode, "encode", boom)


# --------------------------------------------------------------------------- pre-tokenized sources
def test_a_megatron_dataset_is_trained_on_exactly_its_tokens_in_place(tmp_path, tok_file):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 300, size=int(rng.integers(5, 60)), dtype=np.uint16) for _ in range(80)]
    held = [rng.integers(0, 300, size=40, dtype=np.uint16) for _ in range(3)]
    build_megatron(tmp_path / "corpus_text_document", docs)
    build_megatron(tmp_path / "held_text_document", held)
    cfg = cfg_of(tmp_path, [[{"path": "corpus_text_document", "format": "megatron",
                              "heldout": "held_text_document"}]], tokenizer={"path": str(tok_file)})
    run = tmp_path / "runs" / "r"
    DP.prepare_data(cfg, run)
    tok, sha = DP.ensure_tokenizer(cfg, run)
    data = DP.stage_data(cfg, run, 0, tok, sha)

    expected = np.concatenate(docs)
    train = data.stream(0, "train")
    assert train.tolist() == expected.tolist() and data.sources[0]["train_tokens"] == len(expected)
    assert data.stream(0, "heldout").tolist() == np.concatenate(held).tolist()
    assert not train.flags.owndata  # a view of megatron's memory map, not a copy
    # the trainer's samples: every window of an epoch is a slice of exactly those tokens
    sampler = D.BlendedSampler(data, SEQ, seed=3)
    n = sampler.windows[0]
    x, y = sampler.batch(0, n)
    starts = sorted(sampler.locate(i)[1] for i in range(n))
    assert starts == [w * SEQ for w in range(n)]
    for i in range(n):
        off = sampler.locate(i)[1]
        assert x[i].tolist() == expected[off: off + SEQ].tolist()
        assert y[i].tolist() == expected[off + 1: off + SEQ + 1].tolist()
    # used in place: the cache holds the check, not the tokens
    (entry,) = [d for d in C.cache_root(None, run).iterdir() if d.is_dir()]
    assert sorted(f.name for f in entry.iterdir()) == ["meta.json"]


def test_a_numpy_token_file_holds_out_its_tail_in_place(tmp_path, tok_file):
    ids = (np.arange(4000) % 300).astype(np.int32)
    ids.tofile(tmp_path / "tokens.bin")
    cfg = cfg_of(tmp_path, [[{"path": "tokens.bin", "format": "numpy", "dtype": "int32"}]],
                 tokenizer={"path": str(tok_file)})
    run = tmp_path / "runs" / "r"
    DP.prepare_data(cfg, run)
    data = DP.stage_data(cfg, run, 0, *DP.ensure_tokenizer(cfg, run))
    assert data.stream(0, "train").tolist() == ids[:3800].tolist()
    assert data.stream(0, "heldout").tolist() == ids[3800:].tolist()  # the last 1/20


@pytest.mark.parametrize("case, fragments", [
    ("id too large", ["corpus.bin", "token id 400", "vocabulary size"]),
    ("other tokenizer", ["corpus" + SHA_SUFFIX, "tokenized with tokenizer sha256"]),
    ("truncated bin", ["corpus.bin", "truncated"]),
    ("corrupt idx", ["corpus.idx", "bad header"]),
    ("truncated idx", ["corpus.idx", "truncated"]),
])
def test_bad_pretokenized_data_is_one_clear_error_before_compute(tmp_path, tok_file, case, fragments):
    docs = [np.arange(50, dtype=np.uint16) % 300 for _ in range(30)]
    if case == "id too large":
        docs[7] = docs[7].copy()
        docs[7][3] = 400
    build_megatron(tmp_path / "corpus", docs)
    idx, bin_ = tmp_path / "corpus.idx", tmp_path / "corpus.bin"
    if case == "other tokenizer":
        (tmp_path / ("corpus" + SHA_SUFFIX)).write_text("0" * 64 + "\n")
    elif case == "truncated bin":
        bin_.write_bytes(bin_.read_bytes()[:-10])
    elif case == "corrupt idx":
        idx.write_bytes(b"garbage!" + idx.read_bytes()[8:])
    elif case == "truncated idx":
        idx.write_bytes(idx.read_bytes()[:100])
    cfg = cfg_of(tmp_path, [[{"path": "corpus", "format": "megatron"}]], tokenizer={"path": str(tok_file)})
    with pytest.raises(D.DataError) as e:
        DP.prepare_data(cfg, tmp_path / "runs" / "r")
    assert "\n" not in str(e.value)
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_pretokenized_config_errors(tmp_path):
    (tmp_path / "t.bin").write_bytes(b"\0" * 8)
    for data, frag in [([{"path": "nothere", "format": "megatron"}], "nothere.idx"),
                       ([{"path": "t.bin", "format": "numpy"}], "needs dtype"),
                       ([{"path": "t.bin", "format": "tokens"}], "expected one of text, megatron, numpy"),
                       ([{"path": "t.bin", "format": "numpy", "dtype": "float32"}], "needs dtype")]:
        with pytest.raises(ConfigError, match=frag):
            cfg_of(tmp_path, [data])


# --------------------------------------------------------------------------- one cache, reused
def test_weights_review_share_rerun_and_baseline_reuse_the_cache(tmp_path, monkeypatch):
    from llmagogy_ds.evidence.baseline import prepare_baseline

    (tmp_path / "a.txt").write_text(text(60))
    (tmp_path / "b.txt").write_text(text(60, seed=1))
    first = cfg_of(tmp_path, [[{"path": "a.txt"}], [{"path": "b.txt"}]])
    runs = tmp_path / "runs"
    DP.prepare_data(first, runs / "cur")
    entries = sorted(d.name for d in (runs / "data_cache").iterdir() if d.is_dir())
    assert len(entries) == 2  # one per source, not per stage

    no_tokenizing(monkeypatch)
    # new mix weights and a review share of stage 0 in stage 1, in a new run with the same tokenizer
    review = cfg_of(tmp_path, [[{"path": "a.txt", "weight": 0.5}], [{"path": "b.txt"}, {"path": "a.txt", "weight": 0.2}]])
    (runs / "cur2").mkdir()
    (runs / "cur2" / "tokenizer.json").write_text((runs / "cur" / "tokenizer.json").read_text())
    DP.prepare_data(review, runs / "cur2")
    DP.prepare_data(first, runs / "cur")  # a rerun
    data = DP.stage_data(review, runs / "cur2", 1, *DP.ensure_tokenizer(review, runs / "cur2"))
    assert data.weights == [1.0, 0.2] and data.sources[1]["train"] == DP.stage_data(
        first, runs / "cur", 0, *DP.ensure_tokenizer(first, runs / "cur")).sources[0]["train"]
    # the baseline: the curriculum's tokenizer, every stage's corpus mixed, no tokenization
    prepare_baseline(first, runs / "cur-baseline", curriculum_run=None)
    assert sorted(d.name for d in (runs / "data_cache").iterdir() if d.is_dir()) == entries


def test_cache_location_config_then_environment_then_beside_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv(C.ENV, raising=False)
    assert C.cache_root(None, tmp_path / "runs" / "r") == (tmp_path / "runs" / "data_cache").resolve()
    monkeypatch.setenv(C.ENV, str(tmp_path / "env"))
    assert C.cache_root(None, tmp_path / "runs" / "r") == tmp_path / "env"
    cfg = cfg_of(tmp_path, [[{"path": "synthetic:level0"}]], data_cache="shared/cache")
    assert DP.data_cache(cfg, tmp_path / "r") == tmp_path / "shared" / "cache"  # relative to the config


def test_a_waiting_process_gives_up_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv(C.TIMEOUT_ENV, "1")
    lock = C._Lock(tmp_path / "entry.lock")
    assert lock.try_acquire()  # another open file: flock conflicts even inside one process
    try:
        with pytest.raises(D.DataError, match=r"still being prepared by another process \(pid \d+ on .*gave up"):
            C.ensure_entry(tmp_path / "entry", lambda tmp: {}, "the tokens of x.txt")
    finally:
        lock.release()
    (tmp_path / "entry.tmp-host-1" / "train.bin").parent.mkdir()  # a killed builder's leftovers
    (tmp_path / "entry.tmp-host-1" / "train.bin").write_bytes(b"half")
    assert C.ensure_entry(tmp_path / "entry", lambda tmp: {"ok": 1}, "x") == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "entry.lock"]
    assert C.ensure_entry(tmp_path / "entry", lambda tmp: 1 / 0, "x") == {"ok": 1}  # complete: never rebuilt


_PREPARE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from llmagogy_ds.config import DataSource
    from llmagogy_ds.data import cache as C, corpus as D
    tok = D.load_tokenizer(sys.argv[1])
    build = C.tokenize_segments

    def slow_build(*a, **k):  # the window in which the other process must wait, not build too
        print("built", flush=True)
        time.sleep(2)
        return build(*a, **k)

    C.tokenize_segments = slow_build
    Path(sys.argv[4], str(os.getpid())).touch()  # start together: both imported, both ready
    while len(os.listdir(sys.argv[4])) < 2:
        time.sleep(0.05)
    meta = C.source_cache(DataSource(sys.argv[2]), tok, "sha", Path(sys.argv[3]), 1, workers=1)
    print(meta["counts"]["train"]["tokens"])
""")


def test_two_processes_preparing_one_source_make_one_correct_cache(tmp_path, tok_file):
    src = tmp_path / "big.txt"
    src.write_text(text(6000))
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    (tmp_path / "ready").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE, str(tok_file), str(src), str(cache),
                               str(tmp_path / "ready")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(o.count("built") for o, _ in outs) == 1  # one process tokenized ...
    assert sum(o.count("waiting for the tokens of") for o, _ in outs) == 1  # ... while the other waited
    assert outs[0][0].split()[-1] == outs[1][0].split()[-1]  # both read the same cache
    (entry,) = [d for d in cache.iterdir() if d.is_dir()]  # one entry, no temporary directory left
    tok = D.load_tokenizer(tok_file)
    eos = tok.token_to_id(D.EOS)
    docs = R.read_source(R_source(src), "train", 1)
    expected = [t for d in docs for t in tok.encode(d).ids + [eos]]
    ds = mi.IndexedDataset(str(entry / "train"))
    assert ds.get(0, 0, int(ds.sequence_lengths.sum())).tolist() == expected
    assert len(ds) == len(docs)


def R_source(path: Path):
    from llmagogy_ds.config import DataSource

    return DataSource(str(path))


# --------------------------------------------------------------------------- streaming, pool, partitions
def test_pool_and_partitions_give_the_one_pass_result(tmp_path, tok_file, monkeypatch):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in text(700).split("\n\n")))
    tok = D.load_tokenizer(tok_file)
    monkeypatch.setattr(R, "SEGMENT_BYTES", 20_000)  # several segments: held-out counting restarts in each
    segs = R.source_segments(R_source(src))
    assert len(segs) > 4
    one = C.source_cache(R_source(src), tok, "sha", tmp_path / "one", 1, workers=0)
    monkeypatch.setattr(T, "SMALL_SOURCE", 0)
    monkeypatch.setattr(T, "CHUNK_DOCS", 16)  # many chunks in flight, returned in order
    pool = C.source_cache(R_source(src), tok, "sha", tmp_path / "pool", 1, workers=2)
    for i in range(3):
        merged = C.partition_cache(R_source(src), tok, "sha", tmp_path / "parts", 1, i, 3, workers=0)
        assert (merged is None) == (i < 2)

    def tokens(meta, role):
        ds = mi.IndexedDataset(meta[role]["prefix"])
        return ds.get(0, 0, int(ds.sequence_lengths.sum())).tolist(), ds.sequence_lengths.tolist()

    for role in ("train", "heldout"):
        assert tokens(one, role) == tokens(pool, role) == tokens(merged, role)
    assert one["counts"]["heldout"]["documents"] == sum(
        sum(1 for r, _ in R.segment_documents(R_source(src), 1, s) if r == "heldout") for s in segs)
    assert not list((tmp_path / "parts").glob("*.parts-*"))  # partitions removed once merged


def test_txt_byte_ranges_split_paragraphs_exactly_once(tmp_path):
    body = "\r\n\r\n".join(f"para {i}\r\nline two of {i}" for i in range(50)) + "\n\n\n  \nlast one"
    p = tmp_path / "t.txt"
    p.write_bytes(body.encode())
    whole = list(R.txt_documents(p))
    assert len(whole) == 51 and whole[0] == "para 0\nline two of 0"
    size = p.stat().st_size
    for cuts in ([0, 1, 2, 3, size], [0, 7, 100, 101, 555, size], list(range(0, size, 13)) + [size]):
        parts = [d for a, b in zip(cuts, cuts[1:]) for d in R.txt_documents(p, a, b)]
        assert parts == whole, cuts


def test_tokenizer_sample_is_spread_over_a_large_source_and_bounded(tmp_path):
    p = tmp_path / "big.txt"
    p.write_text(text(3000))
    sample = list(R.sample_documents(R_source(p), 1, budget=20_000))
    assert 20_000 <= sum(len(d) for d in sample) < 40_000
    firsts = [int(d.split(":")[0].split()[1]) for d in sample]
    assert firsts[0] == 0 and max(firsts) > 2800  # from the start to the end, not a prefix
    small = list(R.sample_documents(R_source(p), 1, budget=10**9))
    assert small == R.read_source(R_source(p), "train", 1)  # a source that fits: all its training text


def test_hub_sources_stream(monkeypatch):
    import datasets

    from llmagogy_ds.config import DataSource

    seen = {}

    def fake_load(path, name=None, split=None, streaming=False, **kw):
        seen.update(path=path, split=split, streaming=streaming)
        return iter([{"text": f"doc {i}"} for i in range(45)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    held = R.read_source(DataSource("someone/corpus"), "heldout", 0)
    assert seen == {"path": "someone/corpus", "split": "train", "streaming": True}
    assert held == ["doc 19", "doc 39"]


# --------------------------------------------------------------------------- the command and the cluster job
def test_tokenize_command_partitions_and_submit_puts_the_tokenization_job_first(tmp_path, capsys, monkeypatch):
    import yaml

    from llmagogy_ds import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text(text(300))
    raw = {"run": {"name": "dc", "seed": 1}, "tokenizer": {"vocab_size": 320},
           "defaults": {"model": {"head_dim": 16, "seq_len": SEQ}, "train": {"micro_batch": 2, "nproc": 1,
                                                                             "tokens": 1000},
                        "resources": {"account": "proj"}},
           "stages": [{"name": f"s{i}", "data": [{"path": "a.txt"}],
                       "model": {"layers": 1, "hidden": 32, "heads": 2, "ffn": 64}} for i in range(2)]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    submit = ["submit", "cfg.yaml", "--run-dir", "run", "--dry-run"]
    assert cli.main(submit + ["--tokenize-parts", "4", "--tokenize-cpus", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and "tokenize.sh" in lines[0] and "--array=0-3" in lines[0]
    assert "--cpus-per-task=8" in lines[0] and "--account=proj" in lines[0] and "--dependency" not in lines[0]
    assert '--dependency=afterok:"$JOB0"' in lines[1] and "--stage s0" in lines[1]
    assert '--dependency=afterok:"$JOB1"' in lines[2]

    monkeypatch.setattr(R, "SEGMENT_BYTES", 4000)  # parts of one small file
    assert cli.main(["tokenize", "cfg.yaml", "--run-dir", "run", "--workers", "1", "--partition", "1/2"]) == 0
    assert "partition 1/2 done" in capsys.readouterr().out
    assert cli.main(["tokenize", "cfg.yaml", "--run-dir", "run", "--workers", "1", "--partition", "2/2"]) == 0
    assert "train +" in capsys.readouterr().out
    assert cli.main(submit) == 0  # everything is in the cache: the stages only
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "tokenize.sh" not in lines[0] and "--dependency" not in lines[0]
    assert cli.main(["tokenize", "cfg.yaml", "--run-dir", "run", "--partition", "3/2"]) == 2
    assert "--partition" in capsys.readouterr().err
