"""`llmagogy route`, the gatekeeper: experts branched from one trunk stage, each on its own
domain; each beats the trunk on its own domain, the probe on the trunk stage's hidden states
routes >= 95% of the held-out documents to their own expert, and the routed system's loss on the
mixed held-out set is at most the best single expert's. Plus reuse of the probe, resume of the
routes and the errors on bad input."""
from __future__ import annotations

import json

import pytest
import torch

from llmagogy_ds import cli
from llmagogy_ds import rundir as RD
from llmagogy_ds.data.reading import source_documents
from llmagogy_ds.evaluation import route as R
from llmagogy_ds.evaluation.contrast import encode_documents, token_log_likelihoods
from llmagogy_ds.evaluation.results import load_model
from llmagogy_ds.evaluation.route_report import run_route
from branch_fixtures import DOMAINS


@pytest.fixture(scope="module")
def branched(branched_experts):
    d, trunk, experts = branched_experts
    lineage = json.loads(RD.lineage_path(experts[0]).read_text())
    gate = RD.stage_dir(trunk, RD.load_run_config(trunk), lineage["from_index"])  # the pre-final model
    return d, gate, experts


def test_the_probe_routes_held_out_documents_to_their_expert_and_the_routed_loss_beats_every_expert(branched,
                                                                                                       capsys):
    d, gate, experts = branched
    src = RD.load_run_config(experts[0]).stages[-1].data[0]  # the first expert's own corpus
    out = d / "route"
    argv = ["route", "--gatekeeper", str(gate), "--experts", *map(str, experts), "--data", src.path,
            "--split", "heldout", "--out", str(out), "--probe-docs", "60", "--eval-docs", "40", "--batch", "64",
            "--general", str(gate.parent.parent)]  # the trunk's last finished stage
    assert cli.main(argv) == 0
    assert "route (probe)" in capsys.readouterr().out
    res = json.loads((out / "route.json").read_text())
    ev = res["evaluation"]
    names = [e["name"] for e in res["experts"]]
    assert names == list(DOMAINS) and all(20 <= ev["documents"][n] <= 40 for n in names)
    sy = ev["systems"]
    for n in names:  # each expert beats the trunk stage (the gatekeeper) on its own domain
        assert sy[f"expert {n}"]["loss_by_domain"][n] < sy["gatekeeper alone"]["loss_by_domain"][n], sy
    assert ev["accuracy"]["probe"] >= 0.95, ev["confusion"]
    n_docs = sum(ev["documents"].values())
    assert 0 <= ev["accuracy"]["prefix"] <= 1 and sum(map(sum, ev["confusion"]["prefix"])) == n_docs
    best = sy[ev["best_single_expert"]]["loss"]
    assert best == min(sy[f"expert {n}"]["loss"] for n in names)
    assert sy["routed (probe)"]["loss"] <= best, sy
    assert sy["oracle router"]["loss"] <= best
    assert res["general"]["stage"] == RD.load_run_config(gate.parent.parent).stages[-1].name
    assert sy["general alone"]["loss"] > sy["routed (probe)"]["loss"]
    # compute: the routed system costs one expert plus its router; prefix routing every expert's prefix
    per_tok = {s: v["flops_per_token"] for s, v in sy.items()}
    assert per_tok["routed (probe)"] > per_tok["oracle router"] < per_tok["routed (prefix)"]
    assert res["probe"]["documents"] == {n: 60 for n in names} and res["settings"]["probe_tokens"] == 63

    routes = R.read_routes(out / "routes.jsonl")
    heldout = [t for _, t in source_documents(src, RD.load_run_config(experts[0]).run.seed, roles=("heldout",))]
    assert [r["index"] for r in routes] == list(range(len(heldout)))
    assert sum(r["probe"] == names[0] for r in routes) >= 0.95 * len(routes)
    assert all(set(r["probe_p"]) == set(names) and set(r["prefix_loss"]) == set(names) for r in routes)
    report = (out / "route.md").read_text()
    assert "### Routing accuracy" in report and "has seen the first tokens" in report

    # a re-run reuses the probe and resumes the routes: a killed run's torn line and missing documents
    probe_mtime = (out / "probe.safetensors").stat().st_mtime_ns
    part = out / "parts" / "rank-00000.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:-4]) + lines[-4][:11])
    assert cli.main(argv) == 0
    assert (out / "probe.safetensors").stat().st_mtime_ns == probe_mtime
    again = R.read_routes(out / "routes.jsonl")
    assert [r["index"] for r in again] == [r["index"] for r in routes]
    assert [r["probe"] for r in again] == [r["probe"] for r in routes]
    # another source into the same folder is refused before any model is loaded
    with pytest.raises(R.RouteError, match="holds a routing of other inputs"):
        run_route(gate, experts, RD.load_run_config(experts[1]).stages[-1].data[0], out, progress=False)


def test_route_refuses_bad_inputs_before_any_compute(branched, tmp_path):
    d, gate, experts = branched
    with pytest.raises(R.RouteError, match="--gatekeeper: .*nope: no such file or directory"):
        R.check_inputs(tmp_path / "nope", experts)
    with pytest.raises(R.RouteError, match="--experts: .*not a run directory"):
        R.check_inputs(gate, [experts[0], tmp_path])
    trunk = gate.parent.parent  # the trunk run stands for the experts it lists (experts.json)
    assert [m.name for m in R.check_inputs(gate, [trunk])[1]] == list(DOMAINS)
    with pytest.raises(R.RouteError, match="at least two expert runs"):
        R.check_inputs(gate, experts[:1])
    cfg = RD.load_run_config(experts[0])
    with pytest.raises(R.RouteError, match=f"both expert '{DOMAINS[0]}'"):
        R.check_inputs(gate, [experts[0], RD.stage_dir(experts[0], cfg, len(cfg.stages) - 1)])
    k = json.loads(RD.lineage_path(experts[0]).read_text())["from_index"]
    trunk_stage = RD.stage_dir(experts[0], cfg, k)  # the expert's link to the trunk stage: not its own corpus
    with pytest.raises(R.RouteError, match="no own corpus"):
        R.check_inputs(gate, [trunk_stage, experts[1]])
    other = tmp_path / "other"
    other.mkdir()
    for f in (experts[1] / "config.yaml", experts[1] / "lineage.json"):
        (other / f.name).write_bytes(f.read_bytes())
    tok = json.loads(RD.tokenizer_path(experts[1]).read_text())
    word = next(k for k in tok["model"]["vocab"] if k.startswith("\u0120"))
    tok["model"]["vocab"][word + "z"] = tok["model"]["vocab"].pop(word)  # another run's tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tok))
    (other / "stages").symlink_to(experts[1] / "stages")
    with pytest.raises(R.RouteError, match="different tokenizers"):
        R.check_inputs(gate, [experts[0], other])
    with pytest.raises(R.RouteError, match="--method"):
        run_route(gate, experts, methods=("vote",))
    with pytest.raises(R.RouteError, match="--probe-docs must be >= 1"):
        run_route(gate, experts, probe_docs=0)


def test_probe_features_prefix_losses_and_the_saved_probe(branched, tmp_path):
    _, gate, experts = branched
    model, tok, cfg, s = load_model(gate, "cpu")
    _, ids = encode_documents(tok, ["the cow eats the hay all day. " * 8, "a whale dives under a reef."])
    x = torch.tensor([ids[0][:10]])
    assert torch.equal(model.lm_head(model.hidden(x)), model(x))  # the probe reads what the LM head reads
    # a document's features: its first N tokens after EOS, whatever else is in the batch (padding)
    both = R.pooled_hidden(model, ids, 20)
    assert torch.allclose(both[1], R.pooled_hidden(model, [ids[1]], 20)[0], atol=1e-5)
    assert torch.allclose(both[0], R.pooled_hidden(model, [ids[0][:21]], 50)[0], atol=1e-5)
    # the prefix's loss is the same whether the prefix is scored alone or inside its document
    T = cfg.stages[s].model.seq_len
    full = token_log_likelihoods(model, ids[:1], T)[0]
    assert len(full) > T and R.prefix_losses([full], 12)[0] == pytest.approx(-full[:12].mean())
    assert R.prefix_losses(token_log_likelihoods(model, [ids[0][:13]], T), 12)[0] == pytest.approx(-full[:12].mean())
    # the probe separates what is separable, and is reused only for the key it was trained for
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(30, 6, generator=g) + 4 * torch.eye(6)[k] for k in range(3)])
    labels = torch.arange(3).repeat_interleave(30)
    probe = R.Probe.train(feats, labels, ["a", "b", "c"], l2=1e-2)
    p = probe.probabilities(feats)
    assert (p.argmax(-1) == labels).double().mean() >= 0.9 and torch.allclose(p.sum(-1), torch.ones(90))
    key = {"experts": [{"name": n} for n in "abc"], "probe_tokens": 8}
    probe.save(tmp_path, {"key": key})
    again = R.Probe.load(tmp_path, key)
    assert again.experts == ["a", "b", "c"] and torch.equal(again.probabilities(feats), p)
    assert R.Probe.load(tmp_path, {**key, "probe_tokens": 9}) is None


def test_models_come_one_at_a_time_beside_the_gatekeeper(branched, tmp_path, monkeypatch):
    """The mixed held-out set scores each expert (and the general model) alone beside the
    gatekeeper; routing a source by the probe needs no expert on the device at all."""
    import gc
    import weakref

    from llmagogy_ds.evaluation import route_report

    d, gate, experts = branched
    alive, most = [], [0]

    def counted(path, device=None):
        out = load_model(path, device)
        alive.append(weakref.ref(out[0]))
        gc.collect()
        most[0] = max(most[0], sum(r() is not None for r in alive))
        return out

    monkeypatch.setattr(route_report, "load_model", counted)
    src = RD.load_run_config(experts[1]).stages[-1].data[0]
    res = run_route(gate, experts, src, tmp_path / "route", general=gate.parent.parent, methods=("probe",),
                    probe_docs=20, eval_docs=8, split="heldout", progress=False)
    assert len(alive) == 1 + len(experts) + 1  # gatekeeper, each expert once, the general model
    assert most[0] == 2
    sy = res["evaluation"]["systems"]
    assert {f"expert {n}" for n in DOMAINS} | {"gatekeeper alone", "general alone", "routed (probe)"} <= set(sy)
    assert all(e["matmul_params"] > 0 for e in res["experts"]) and res["routes"]["documents"] > 0


@pytest.mark.multiprocess
def test_two_ranks_route_a_source_as_one_rank_does(branched, tmp_path):
    """torchrun with 2 ranks: rank 0 fits the probe, rank 1 loads it after the barrier, each routes
    its documents (i = rank mod 2) into its part file, rank 0 merges: the same routes as one rank."""
    import os
    import subprocess
    import sys

    _, gate, experts = branched
    src = RD.load_run_config(experts[2]).stages[-1].data[0]
    args = ["route", "--gatekeeper", str(gate), "--experts", *map(str, experts), "--data", src.path, "--split",
            "heldout", "--probe-docs", "40", "--eval-docs", "0", "--batch", "64"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "llmagogy_ds.cli", *args, "--out", str(tmp_path / "two")], env=env, check=True, timeout=900)
    one, two = (R.read_routes(tmp_path / d / "routes.jsonl") for d in ("one", "two"))
    assert len(one) > 4 and [r["index"] for r in two] == [r["index"] for r in one]
    parts = sorted(p.name for p in (tmp_path / "two" / "parts").glob("*.jsonl"))
    assert parts == ["rank-00000.jsonl", "rank-00001.jsonl"]
    for a, b in zip(one, two):
        assert (a["probe"], a["prefix"], a["tokens"]) == (b["probe"], b["prefix"], b["tokens"])
        for key in ("probe_p", "prefix_loss"):
            assert b[key] == pytest.approx(a[key], abs=1e-4)
    res = json.loads((tmp_path / "two" / "route.json").read_text())
    assert res["routes"]["documents"] == len(one) and res["evaluation"] is None
