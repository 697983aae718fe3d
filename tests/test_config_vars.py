"""Config variables: ``vars:`` with ``${name}`` / ``${name:-default}`` substitution, ``--set vars.X=``,
the environment fallback, their errors, and configs/graded.yaml pointed at a small fixture corpus."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from llmagogy_ds.config import ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

BASE = {
    "run": {"name": "v", "seed": 1},
    "tokenizer": {"vocab_size": 512},
    "defaults": {"model": {"head_dim": 16, "seq_len": 32}, "train": {"micro_batch": 2, "nproc": 1}},
    "stages": [{"name": "s0", "data": [{"path": "${corpus_root}/a"}],
                "model": {"layers": 1, "hidden": 32, "heads": 2, "ffn": 64}, "train": {"tokens": 10000}}],
}


@pytest.fixture
def corpus(tmp_path):
    for d in ("a", "b"):
        (tmp_path / "corpus" / d).mkdir(parents=True)
        (tmp_path / "corpus" / d / "train.txt").write_text("one two three\n")
        (tmp_path / "corpus" / d / "heldout.txt").write_text("four five\n")
    return tmp_path / "corpus"


def raw(**vars_) -> dict:
    r = copy.deepcopy(BASE)
    if vars_:
        r["vars"] = vars_
    return r


def errors_of(r: dict, base: Path) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(r, base)
    return str(info.value)


def test_var_in_a_data_path_relative_to_the_config(tmp_path, corpus, monkeypatch):
    monkeypatch.delenv("corpus_root", raising=False)
    cfg = config_from_dict(raw(corpus_root="corpus"), tmp_path)
    assert cfg.stages[0].data[0].path == str(corpus / "a")
    # the frozen copy holds the expanded value and no vars: a resume does not depend on them
    assert "vars" not in cfg.raw and "${" not in cfg.to_yaml()
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()), tmp_path / "elsewhere")
    assert again.stages[0].data[0].path == str(corpus / "a")


def test_set_overrides_a_var(tmp_path, corpus):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(raw(corpus_root="/does/not/exist")))
    with pytest.raises(ConfigError, match="no such file or directory: /does/not/exist/a"):
        load_config(f)
    cfg = load_config(f, [f"vars.corpus_root={corpus}"])
    assert cfg.stages[0].data[0].path == str(corpus / "a")
    # --set also defines a var the file does not have
    g = tmp_path / "d.yaml"
    g.write_text(yaml.safe_dump(raw()))
    assert load_config(g, [f"vars.corpus_root={corpus}"]).stages[0].data[0].path == str(corpus / "a")


def test_environment_fallback_and_default(tmp_path, corpus, monkeypatch):
    r = raw(corpus_root="${LLMAGOGY_TEST_CORPUS:-corpus}")
    monkeypatch.delenv("LLMAGOGY_TEST_CORPUS", raising=False)
    assert config_from_dict(r, tmp_path).stages[0].data[0].path == str(corpus / "a")  # the default
    other = tmp_path / "other"
    (other / "a").mkdir(parents=True)
    (other / "a" / "x.txt").write_text("text\n")
    monkeypatch.setenv("LLMAGOGY_TEST_CORPUS", str(other))
    assert config_from_dict(r, tmp_path).stages[0].data[0].path == str(other / "a")  # the environment
    # a var defined in vars wins over the environment
    monkeypatch.setenv("corpus_root", str(other))
    assert config_from_dict(raw(corpus_root="corpus"), tmp_path).stages[0].data[0].path == str(corpus / "a")


def test_numbers_and_several_refs_in_one_string(tmp_path, corpus, monkeypatch):
    monkeypatch.delenv("corpus_root", raising=False)
    r = raw(corpus_root=str(corpus.parent), sub="corpus", budget=4000, rate="2e-3")
    r["stages"][0]["data"][0]["path"] = "${corpus_root}/${sub}/b"
    r["stages"][0]["train"].update(tokens="${budget}", lr="${rate}")
    cfg = config_from_dict(r, tmp_path)
    assert cfg.stages[0].data[0].path == str(corpus / "b")
    assert cfg.stages[0].train.tokens == 4000 and cfg.stages[0].train.lr == pytest.approx(2e-3)


def test_undefined_variable_names_it_and_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("corpus_root", raising=False)
    msg = errors_of(raw(), tmp_path)
    assert "stages[0] (s0).data[0].path: undefined variable ${corpus_root}" in msg
    assert "--set vars.corpus_root=VALUE" in msg


def test_bad_vars_are_reported_together(tmp_path, monkeypatch):
    monkeypatch.delenv("corpus_root", raising=False)
    r = raw(a="${b}", b="${a}", **{"bad-name": "x"}, lst=[1, 2], flag=True)
    r["run"]["name"] = "${a}"
    r["stages"][0]["data"][0]["path"] = "${corpus_root"
    msg = errors_of(r, tmp_path)
    assert "vars.a: circular reference: a -> b -> a" in msg
    assert "vars.bad-name: a variable name must match" in msg
    assert "vars.lst: must be a string or a number, got list [1, 2]" in msg
    assert "vars.flag: must be a string or a number, got bool True" in msg
    assert "stages[0] (s0).data[0].path: unterminated variable reference in '${corpus_root'" in msg
    r2 = raw(corpus_root="x")
    r2["stages"][0]["data"][0]["path"] = "${1x}/a"
    assert "bad variable reference '${1x}'" in errors_of(r2, tmp_path)
    assert "vars: expected a mapping" in errors_of({**raw(), "vars": ["corpus_root"]}, tmp_path)


STAGES = ("stage0_nursery", "stage1_primary", "stage2_middle", "stage3_highschool", "stage4_general")


def test_graded_config_points_at_any_corpus_root(tmp_path, monkeypatch):
    # a fixture corpus with the real one's layout, never ../shared
    for d in STAGES:
        (tmp_path / d).mkdir()
        (tmp_path / d / "train.txt").write_text(f"{d} training text.\n\nMore of it.\n")
        (tmp_path / d / "heldout.txt").write_text(f"{d} held-out text.\n")
    monkeypatch.delenv("LLMAGOGY_CORPUS", raising=False)
    cfg = load_config(CONFIGS / "graded.yaml", [f"vars.corpus_root={tmp_path}"])
    assert [s.data[0].path for s in cfg.stages] == [str(tmp_path / d) for d in STAGES]
    # each later stage reviews the previous stage's corpus
    assert [[Path(src.path).name for src in s.data[1:]] for s in cfg.stages] == [[]] + [[d] for d in STAGES[:-1]]
    monkeypatch.setenv("LLMAGOGY_CORPUS", str(tmp_path))
    assert load_config(CONFIGS / "graded.yaml").stages[0].data[0].path == str(tmp_path / STAGES[0])
    with pytest.raises(ConfigError, match=r"no such file or directory: /nonexistent/corpus/stage0_nursery"):
        load_config(CONFIGS / "graded.yaml", ["vars.corpus_root=/nonexistent/corpus"])
