"""Expert branches (``llmagogy branch``): three experts continue a trunk's stage on their own word
corpora (tests/branch_fixtures.py); each beats the trunk's model on its own held-out set, shown
side by side in summary and report; lineage recorded and checked; the trunk's stages, tokenizer
and token cache reused, not copied; ``submit``'s dependency graph; bad experts files."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from branch_fixtures import DOMAINS, TRUNK, experts_file, write_trunk
from llmagogy_ds import cli
from llmagogy_ds import rundir as RD
from llmagogy_ds.cluster import slurm as S
from llmagogy_ds.config import ConfigError, load_config
from llmagogy_ds.data import prepare as DP
from llmagogy_ds.evidence import experts as EX
from llmagogy_ds.evaluation.results import weights_fingerprint
from llmagogy_ds.train.branch import BranchError, branch, ensure_branch, stage_keys


@pytest.fixture(scope="module")
def branched(branched_experts):
    return branched_experts


def cache_entries(d: Path) -> list[str]:
    return sorted(p.name for p in (d / "data_cache").iterdir() if p.is_dir())


# =========================================================================== trained experts
def test_each_expert_beats_the_trunk_on_its_own_held_out_set(branched, capsys):
    d, trunk, dirs = branched
    table = EX.side_by_side(trunk)
    rows = {r["model"]: r for r in table["rows"]}
    assert list(rows) == ["trunk @ general", "expert farm", "expert sums", "expert sea"]
    assert table["columns"] == list(DOMAINS) and table["missing"] == 0
    for name in DOMAINS:
        own = rows[f"expert {name}"]["losses"][name]
        assert own < rows["trunk @ general"]["losses"][name] - 0.3, name
        assert table["best"][name] == f"expert {name}"  # each expert is the best on its own set
    assert all(r["mean"] is not None for r in rows.values())
    # cached under the models' and sets' fingerprints: summary reads them without computing
    cached = json.loads(EX.cache_path(trunk).read_text())
    assert len(cached) == 4 * 3
    assert EX.side_by_side(trunk, compute=False)["rows"][1]["losses"] == rows["expert farm"]["losses"]
    assert cli.main(["summary", str(trunk)]) == 0
    out = capsys.readouterr().out
    assert "experts side by side" in out and "expert sums" in out and "*" in out and "not computed" not in out
    assert cli.main(["report", str(trunk)]) == 0
    report = (trunk / "report" / "report.md").read_text()
    assert "## Experts side by side" in report and "| sums set |" in report.replace("model | farm set ", "")
    assert f"**{rows['expert sea']['losses']['sea']:.4f}**" in report
    capsys.readouterr()
    assert cli.main(["status", str(trunk)]) == 0  # the trunk's table, then each expert's
    out = capsys.readouterr().out
    assert [n for n in DOMAINS if re.search(rf"\b{n}\W+done\b", out)] == list(DOMAINS), out


def test_lineage_links_and_the_shared_token_cache(branched):
    d, trunk, dirs = branched
    assert [p.name for p in dirs] == list(DOMAINS) and all(p.parent == trunk / "experts" for p in dirs)
    tcfg = RD.load_run_config(trunk)
    registry = json.loads((trunk / "experts.json").read_text())
    assert {k: v["run_dir"] for k, v in registry.items()} == {n: str(p) for n, p in zip(DOMAINS, dirs)}
    src = trunk / "stages" / "00_general"
    files = [f.relative_to(src) for f in src.rglob("*") if f.is_file() and RD.CHECKPOINTS not in f.parts]
    assert len(files) >= 4
    for name, e in zip(DOMAINS, dirs):
        lin = json.loads((e / "lineage.json").read_text())
        assert weights_fingerprint(src / "model") == weights_fingerprint(src)  # a stage or its weights: one model
        assert lin == {"trunk_run": str(trunk.resolve()), "trunk_name": "trunk", "from_stage": "general",
                       "from_index": 0, "trunk_config": stage_keys(tcfg)[0],
                       "trunk_weights": weights_fingerprint(src), "expert": name}
        cfg = RD.load_run_config(e)
        assert cfg.run.name == f"trunk-{name}" and [s.name for s in cfg.stages] == ["general", name]
        assert cfg.raw["stages"][0] == tcfg.raw["stages"][0]  # the trunk's stage as it was trained
        assert cfg.run.data_cache == str((d / "data_cache").resolve())
        for f in files:  # the very files: hard links, no copies
            assert os.path.samefile(e / "stages" / "00_general" / f, src / f), (name, f)
        assert not (e / "stages" / "00_general" / RD.CHECKPOINTS).exists()
        assert os.path.samefile(e / "tokenizer.json", trunk / "tokenizer.json")
        summary = json.loads((e / "summary.json").read_text())
        assert [s["status"] for s in summary["stages"]] == ["done", "done"]
    # the experts' corpora are the trunk's sources: one cache entry each, none added by the experts
    assert len(cache_entries(d)) == 3
    grown = {n: json.loads((e / "stages" / f"01_{n}" / "growth.json").read_text()) for n, e in zip(DOMAINS, dirs)}
    for n, g in grown.items():  # same shape (farm), a layer more (sums), wider (sea): exact growth
        assert g["loss_after_growth"] == pytest.approx(g["loss_prev_model"], abs=1e-5), n


def test_branch_again_is_a_noop_and_a_changed_trained_expert_is_refused(branched, capsys):
    d, trunk, dirs = branched
    stamp = {p: (p / "config.yaml").stat().st_mtime_ns for p in dirs}
    assert branch(trunk, "general", d / "experts.yaml") == dirs
    assert {p: (p / "config.yaml").stat().st_mtime_ns for p in dirs} == stamp
    changed = experts_file()
    changed["experts"][1]["stages"][0]["train"]["tokens"] *= 2
    (d / "changed.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(BranchError, match=r"experts\[1\] \(sums\): changed, but .* already trained .* sums"):
        branch(trunk, "general", d / "changed.yaml")
    assert {p: (p / "config.yaml").stat().st_mtime_ns for p in dirs} == stamp  # nothing was touched
    rc = cli.main(["branch", str(trunk), "--from", "general", "--experts", str(d / "changed.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("llmagogy: BranchError: ") and "refusing to overwrite" in err
    with pytest.raises(BranchError, match="trunk's .* an expert trains only its own stages"):
        ensure_branch(dirs[0], 0)


def test_a_trunk_stage_changed_under_an_expert_is_refused(branched, tmp_path, capsys):
    d, trunk, _ = branched
    t2 = tmp_path / "t2"
    shutil.copytree(trunk, t2, ignore=shutil.ignore_patterns("experts", "experts.json", "report"))
    (tmp_path / "farm.txt").write_text((d / "farm.txt").read_text())
    only = {"experts": experts_file()["experts"][:1]}
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(only))
    (e,) = branch(t2, "general", tmp_path / "one.yaml")
    assert ensure_branch(e, 1)["trunk_weights"] == weights_fingerprint(t2 / "stages" / "00_general")
    result = t2 / "stages" / "00_general" / "result.json"
    r = json.loads(result.read_text())
    RD.write_atomic(result, {**r, "loss_end": r["loss_end"] + 1.0})  # the trunk's stage trained again
    with pytest.raises(BranchError, match="trunk's stage 'general' .* changed since this expert grew from it"):
        ensure_branch(e, 1)
    assert cli.main(["run", str(e)]) == 2
    assert "changed since this expert grew from it" in capsys.readouterr().err
    RD.write_atomic(result, r)
    cfg = yaml.safe_load((t2 / "config.yaml").read_text())
    cfg["stages"][0]["train"]["lr"] = 1e-3  # the trunk restarted with another config
    (t2 / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(BranchError, match="configured differently"):
        ensure_branch(e, 1)


# =========================================================================== before the trunk has trained
def open_trunk(d: Path, stages: int = 1) -> Path:
    cfg_path, _ = write_trunk(d)
    raw = copy.deepcopy(TRUNK)
    if stages == 2:  # a later trunk stage the experts do not wait for
        raw["stages"].append({"name": "later", "data": [{"path": f"{n}.txt"} for n in DOMAINS],
                              "model": {"layers": 2, "hidden": 32, "heads": 2, "ffn": 64}, "train": {"tokens": 4096}})
        cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return RD.open_run_dir(load_config(cfg_path), d / "trunk")


def test_branch_before_the_trunk_stage_has_finished(tmp_path, capsys):
    trunk = open_trunk(tmp_path)
    dirs = branch(trunk, "general", tmp_path / "experts.yaml")
    for e in dirs:
        assert json.loads((e / "lineage.json").read_text())["trunk_weights"] is None
        assert not (e / "stages").exists() and not (e / "tokenizer.json").exists()
    with pytest.raises(BranchError, match="tokenizer is not there yet: prepare or run the trunk first"):
        ensure_branch(dirs[0], 1)
    with pytest.raises(RD.RunDirError, match="an expert branch, whose tokenizer is the trunk's"):
        DP.ensure_tokenizer(RD.load_run_config(dirs[0]), dirs[0])  # never one of its own
    RD.write_atomic(trunk / "tokenizer.json", "{}")  # prepared, stage not trained
    with pytest.raises(BranchError, match="grows from the trunk's stage 'general', which has not finished"):
        ensure_branch(dirs[0], 1)
    assert os.path.samefile(dirs[0] / "tokenizer.json", trunk / "tokenizer.json")
    assert cli.main(["run", str(dirs[1])]) == 2
    assert "which has not finished" in capsys.readouterr().err


def test_submit_runs_the_experts_beside_the_trunks_later_stages(tmp_path, capsys, monkeypatch):
    trunk = open_trunk(tmp_path, stages=2)
    assert cli.main(["branch", str(trunk), "--from", "general", "--experts", str(tmp_path / "experts.yaml")]) == 0
    assert capsys.readouterr().out.split() == [str(trunk / "experts" / n) for n in DOMAINS]
    assert cli.main(["submit", str(trunk), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    stages = [line.rsplit("--stage ", 1)[1].rstrip(")") if "--stage " in line else "tokenize" for line in lines]
    assert stages == ["tokenize", "general", "later", *DOMAINS]  # the experts' corpora are the trunk's sources
    assert '--dependency=afterok:"$JOB1"' in lines[2]
    for name, line in zip(DOMAINS, lines[3:]):  # after the trunk's stage `general`, not after its last
        assert '--dependency=afterok:"$JOB1" --kill-on-invalid-dep=yes' in line and "$JOB2" not in line
        assert f"--job-name=trunk-{name}-{name}" in line and f"--run-dir {trunk / 'experts' / name} " in line
    # submitted (a fake sbatch): the same graph with job ids, each job recorded in its own run dir
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\nn=$(cat "$SBATCH_LOG.count" 2>/dev/null || echo 0)\n'
                                    'echo $((n + 1)) > "$SBATCH_LOG.count"\nprintf "%s\\0" "$@" > "$SBATCH_LOG.$n"\n'
                                    'echo "700$n"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(tmp_path / "sbatch"))
    monkeypatch.setattr(S, "squeue_states", lambda: None)
    assert cli.main(["submit", str(trunk)]) == 0
    assert "trunk: stage general: job 7001" in capsys.readouterr().out
    calls = [(tmp_path / f"sbatch.{i}").read_bytes().decode().split("\0")[:-1] for i in range(6)]
    assert "--dependency=afterok:7001" in calls[2]
    assert all("--dependency=afterok:7001" in c for c in calls[3:])
    assert S.stage_jobs(trunk) == {"tokenize": "7000", "general": "7001", "later": "7002"}
    assert S.stage_jobs(trunk / "experts" / "sea") == {"sea": "7005"}
    # one expert alone: after the trunk's job of `general` while it is queued...
    sums = trunk / "experts" / "sums"
    monkeypatch.setattr(S, "squeue_states", lambda: {"7001": ("PENDING", "Dependency")})
    assert cli.main(["submit", str(sums), "--dry-run"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert "--dependency=afterok:7001 " in line and "--stage sums" in line
    # ...an error when it is neither queued nor done, and no dependency once it is done
    monkeypatch.setattr(S, "squeue_states", lambda: {"7001": ("FAILED", "")})
    assert cli.main(["submit", str(sums), "--dry-run"]) == 2
    assert "has not finished and no job of it is queued" in capsys.readouterr().err
    RD.write_atomic(trunk / "stages" / "00_general" / "result.json", {})
    assert cli.main(["submit", str(sums), "--dry-run"]) == 0
    assert "--dependency" not in capsys.readouterr().out
    # side by side before anything trained: the rows to come, nothing to score yet, nothing computed
    table = EX.side_by_side(trunk)
    assert [r["model"] for r in table["rows"]] == ["trunk @ general", *(f"expert {n}" for n in DOMAINS),
                                                   "trunk @ later (final)"]
    assert table["unprepared"] == list(DOMAINS) and table["missing"] == 0 and not EX.cache_path(trunk).exists()
    assert "(not finished)" in EX.text(table) and "has not been prepared" in EX.text(table)


# =========================================================================== bad input
def _stage(**kw) -> dict:
    return {"name": "a", "data": ["farm.txt"], "train": {"tokens": 4096}, **kw}


@pytest.mark.parametrize("experts,expected", [
    ({"experts": [{"name": "a", "stages": [_stage(model={"hidden": 16, "heads": 1})]}]},
     "experts[0] (a): stages[0] (a).model.hidden: shrinks from 32 to 16"),
    ({"experts": [{"name": "a", "stages": [_stage(train={})]}]},
     "experts[0] (a): stages[0] (a).train: set exactly one of tokens or epochs"),
    ({"experts": [{"name": "a", "stages": [_stage(name="general")]}]},
     "experts[0] (a): stages[0] (general).name: duplicate stage name (also trunk stages[0])"),
    ({"experts": [{"name": "a", "stages": [_stage(data=["missing.txt"])]}]}, "experts[0] (a): stages[0] (a).data"),
    ({"experts": [{"name": "a", "stages": [_stage()]}, {"name": "a", "stages": [_stage()]}]},
     "experts[1] (a).name: used twice (also experts[0])"),
    ({"experts": [{"name": "a", "run": {"name": "x"}, "stages": [_stage()]}]},
     "experts[0] (a).run.name: set by branch"),
    ({"experts": [{"name": "a", "stage": [_stage()]}]}, "experts[0] (a).stage: unknown key 'stage' (did you mean"),
    ({"experts": []}, "experts: expected a non-empty list"),
    ({"defaults": {"train": {"lr": "${missing_var}"}}, "experts": [{"name": "a", "stages": [_stage()]}]},
     "undefined variable ${missing_var}"),
])
def test_bad_experts_file_names_the_file_expert_and_key(tmp_path, capsys, experts, expected):
    trunk = open_trunk(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(experts))
    with pytest.raises(ConfigError) as e:
        branch(trunk, "general", path)
    assert str(path) in str(e.value) and expected in str(e.value), str(e.value)
    assert not (trunk / "experts").exists() and not (trunk / "experts.json").exists()  # nothing created
    assert cli.main(["branch", str(trunk), "--from", "general", "--experts", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"llmagogy: ConfigError: invalid config {path}")


def test_unknown_from_stage_lists_the_trunks_stages(tmp_path):
    trunk = open_trunk(tmp_path, stages=2)
    with pytest.raises(BranchError, match=r"--from: no stage 'primary' in .* \(its stages: general, later\)"):
        branch(trunk, "primary", tmp_path / "experts.yaml")


def test_vars_defaults_and_what_an_expert_stage_inherits(tmp_path):
    trunk = open_trunk(tmp_path)
    path = tmp_path / "vars.yaml"
    path.write_text(yaml.safe_dump({"vars": {"corpus": str(tmp_path)}, "defaults": {"train": {"lr": 1e-3}},
                                    "experts": [{"name": "a", "run": {"seed": 9}, "stages": [
                                        _stage(data=["${corpus}/sea.txt"], model={"layers": 3})]}]}))
    (e,) = branch(trunk, "general", path)
    st = RD.load_run_config(e).stages[1]
    assert st.data[0].path == str(tmp_path / "sea.txt") and st.train.lr == 1e-3 and st.train.tokens == 4096
    assert (st.model.layers, st.model.hidden, st.model.seq_len, st.train.micro_batch) == (3, 32, 64, 8)
    assert RD.load_run_config(e).run.seed == 9
