"""SLURM: rank mapping, ``llmagogy submit --dry-run`` and ``status`` (no cluster needed), then
``slurm/stage.sh`` on a real single-machine SLURM cluster (tests/slurm_cluster.sh):

* the tiny curriculum to the end, 2 tasks on 1 node (the uninterrupted reference);
* one stage on 2 simulated nodes × 1 task;
* preemption: ``scancel --batch --signal=USR1`` mid-stage -> checkpoint, requeue, resume ->
  the same losses and weights as the uninterrupted run;
* ``llmagogy submit`` (one job per stage, afterok chain) where one rank is killed with SIGKILL
  mid-stage -> the step ends, the job requeues itself and finishes; the next job follows.

The cluster fixture installs SLURM with apt-get when it is missing (root only) and skips, with
the reason, when it cannot. LLMAGOGY_SLURM_TESTS=0 skips the cluster tests.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from llmagogy_ds.data import prepare as DP
from llmagogy_ds.train import checkpoint as C
from llmagogy_ds import cli
from llmagogy_ds import rundir as RD
from llmagogy_ds.cluster import slurm as S
from llmagogy_ds.parallel import rendezvous as RZ
from llmagogy_ds.config import load_config
from llmagogy_ds.evaluation.results import weights_fingerprint

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm_cluster.sh"
STAGE_SH = REPO / "slurm" / "stage.sh"
TINY = REPO / "configs" / "tiny.yaml"

# tests/test_integration.py's small budgets, but a longer "primary" (40 steps of ~0.2-0.5 s) so that a
# signal or a kill lands in the middle of it
SMALL = [
    "wandb.mode=disabled",
    "stages.nursery.train.tokens=61440", "stages.primary.train.tokens=163840", "stages.middle.train.tokens=61440",
    "defaults.train.eval_every=5", "defaults.train.checkpoint_every=5", "defaults.train.log_every=5",
    "defaults.train.warmup_steps=5", "defaults.train.eval_tokens=8192",
    "stages.middle.train.nproc=1", "stages.middle.train.zero_stage=3",  # a step smaller than the job
    "stages.middle.train.global_batch=null",  # micro_batch x grad_accum x nproc, as these tests were sized
]
SETS = [a for o in SMALL for a in ("--set", o)]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


# =========================================================================== no cluster needed
def test_rank_env_from_slurm():
    task = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456"}
    assert RZ.rank_env_from_slurm(task) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                           "MASTER_ADDR": "gpu007", "MASTER_PORT": str(20000 + 123456 % 20000)}
    # what stage.sh exports wins
    env = RZ.rank_env_from_slurm({**task, "MASTER_ADDR": "n1", "MASTER_PORT": "29999"})
    assert "MASTER_ADDR" not in env and "MASTER_PORT" not in env
    # the batch shell has SLURM_PROCID/SLURM_NTASKS too, but is no srun task; torchrun's RANK wins
    assert RZ.rank_env_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"}) == {}
    assert RZ.rank_env_from_slurm({**task, "RANK": "0"}) == {}


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("node[003-005,9]", "node003"),
                                            ("a[1-2],b3", "a1"), ("b3,a[1-2]", "b3"), ("r[2-3]-n[01-04]", "r2-n01")])
def test_first_host(nodelist, first):
    assert RZ.first_host(nodelist) == first


def test_collective_timeout():
    assert RZ.collective_timeout({}) == 600
    assert RZ.collective_timeout({"LLMAGOGY_COLLECTIVE_TIMEOUT": "30"}) == 30
    with pytest.raises(ValueError, match="LLMAGOGY_COLLECTIVE_TIMEOUT"):
        RZ.collective_timeout({"LLMAGOGY_COLLECTIVE_TIMEOUT": "soon"})


def test_stale_build_lock_is_removed_and_a_live_one_waited_for(tmp_path, capsys):
    """A lock that a killed rank left (the CI hang of stop 18: every start waited on it) is removed;
    one younger than the timeout is waited for until its build ends; nothing else is touched."""
    import os
    import threading
    import time

    assert RZ.build_lock_timeout({}) == 300
    with pytest.raises(ValueError, match="LLMAGOGY_BUILD_LOCK_TIMEOUT"):
        RZ.build_lock_timeout({"LLMAGOGY_BUILD_LOCK_TIMEOUT": "0"})
    op = tmp_path / "py311_cpu" / "deepspeed_shm_comm"
    op.mkdir(parents=True)
    (op / "deepspeed_shm_comm.so").write_bytes(b"built")
    stale = op / "lock"
    stale.touch()
    os.utime(stale, (time.time() - 3600,) * 2)
    live = tmp_path / "py311_cpu" / "fused_adam" / "lock"
    live.parent.mkdir()
    live.touch()
    threading.Timer(0.5, live.unlink).start()  # its build ends
    t0 = time.monotonic()
    assert RZ.clear_stale_build_locks(tmp_path, stale_after=60, poll=0.05) == [stale]
    assert 0.4 < time.monotonic() - t0 < 30
    assert not stale.exists() and (op / "deepspeed_shm_comm.so").read_bytes() == b"built"
    assert f"removed the stale build lock {stale}" in capsys.readouterr().err
    # a lock that never goes is removed once it is older than the timeout
    live.touch()
    assert RZ.clear_stale_build_locks(tmp_path, stale_after=0.3, poll=0.05) == [live]


def dry_run(tmp_path, capsys, *sets):
    run_dir = tmp_path / "run"
    argv = ["submit", str(TINY), "--run-dir", str(run_dir), "--dry-run"] + [a for o in sets for a in ("--set", o)]
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_submit_dry_run_one_job_per_stage(tmp_path, capsys):
    rc, out, err = dry_run(tmp_path, capsys,
                           "defaults.resources.time=02:00:00", "defaults.resources.account=proj",
                           "stages.primary.resources.partition=big", "stages.primary.train.nproc=4",
                           "stages.middle.train.nproc=8", "stages.middle.resources.nodes=2",
                           "stages.middle.train.global_batch=null",  # tiny's 32 does not divide by 16 x 8
                           "stages.middle.resources.gpus_per_node=4", "stages.middle.resources.cpus_per_task=8",
                           "stages.middle.resources.sbatch_args=--exclusive --qos=high")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert [x.split(" ", 1)[0] for x in lines] == ["JOB0=$(sbatch", "JOB1=$(sbatch", "JOB2=$(sbatch"]
    nursery, primary, middle = lines
    assert nursery.startswith("JOB0=$(sbatch") and "--dependency" not in nursery
    assert "--job-name=tiny-nursery" in nursery and "--nodes=1 --ntasks-per-node=2" in nursery
    assert "--time=02:00:00" in nursery and "--account=proj" in nursery and "--partition" not in nursery
    assert "--partition=big" in primary and "--ntasks-per-node=4" in primary
    assert '--dependency=afterok:"$JOB0" --kill-on-invalid-dep=yes' in primary
    assert '--dependency=afterok:"$JOB1"' in middle
    for opt in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--exclusive",
                "--qos=high"):
        assert opt in middle
    for name, line in zip(("nursery", "primary", "middle"), lines):
        # each job runs the stage from the run's frozen config
        assert line.endswith(f"{STAGE_SH} {tmp_path / 'run' / 'config.yaml'} --run-dir {tmp_path / 'run'} "
                             f"--stage {name})")
        assert f"--output={tmp_path / 'run' / 'slurm' / name}-%j.log" in line
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    assert "LLMAGOGY_NPROC" not in out  # every stage runs on train.nproc ranks


def test_submit_other_gpu_count_changes_the_world_size(tmp_path, capsys):
    # 2 nodes x 1 GPU for a stage configured with nproc=1: 2 ranks, same global batch (the trainer's)
    rc, out, err = dry_run(tmp_path, capsys, "stages.middle.train.nproc=1", "stages.middle.resources.nodes=2",
                           "stages.middle.resources.gpus_per_node=1")
    assert rc == 0, err
    middle = out.strip().splitlines()[2]
    assert "--nodes=2 --ntasks-per-node=1 --gpus-per-node=1" in middle and ",LLMAGOGY_NPROC=2 " in middle
    assert "stage middle: 2 ranks (resources) instead of train.nproc=1" in err


def test_submit_skips_done_stages_and_accepts_resource_changes(tmp_path, capsys):
    run_dir = RD.open_run_dir(load_config(TINY), tmp_path / "run")
    (run_dir / "stages" / "00_nursery").mkdir(parents=True)
    (run_dir / "stages" / "00_nursery" / "result.json").write_text("{}")
    rc, out, err = dry_run(tmp_path, capsys)
    assert rc == 0, err
    assert [x.split("--stage ")[1] for x in out.strip().splitlines()] == ["primary)", "middle)"]
    assert '--dependency=afterok:"$JOB0"' in out.strip().splitlines()[1]
    # resources only schedule the jobs: changing them is accepted for a started run...
    rc, out, err = dry_run(tmp_path, capsys, "stages.middle.resources.nodes=2")
    assert rc == 0, err
    assert "only resources differ" in err and "--nodes=2 --ntasks-per-node=1" in out
    # ...any other change is refused, as by `llmagogy run`
    rc, out, err = dry_run(tmp_path, capsys, "stages.middle.train.lr=1e-4")
    assert rc == 2 and "--restart" in err and "lr" in err


@pytest.mark.parametrize("sets,expected", [
    (["stages.primary.resources.nodes=3"], "stages.primary.resources.nodes: train.nproc=2 ranks cannot be split"),
    (["stages.primary.resources.time=00:05:00"], "stages.primary.resources.time: '00:05:00' leaves no training"),
])
def test_submit_bad_resources(tmp_path, capsys, sets, expected):
    rc, _, err = dry_run(tmp_path, capsys, *sets)
    assert rc == 2 and expected in err


def test_prepare_prints_only_the_run_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(DP, "prepare_data", lambda cfg, run_dir: print("tokenizing..."))
    rc = cli.main(["prepare", str(TINY), "--run-dir", str(tmp_path / "run"), "--stage", "primary"])
    out, err = capsys.readouterr()
    assert rc == 0 and out == f"{tmp_path / 'run'}\n" and "tokenizing..." in err
    assert (tmp_path / "run" / "config.yaml").exists()
    assert cli.main(["prepare", str(TINY), "--run-dir", str(tmp_path / "run"), "--stage", "nope"]) == 2


def test_status_rows(tmp_path, monkeypatch):
    run_dir = RD.open_run_dir(load_config(TINY, SMALL), tmp_path / "run")
    stages = run_dir / "stages"
    (stages / "00_nursery").mkdir(parents=True)
    (stages / "00_nursery" / "result.json").write_text(json.dumps({"steps": 15, "loss_end": 4.5}))
    (stages / "01_primary" / "checkpoints" / "step00000010").mkdir(parents=True)
    (stages / "01_primary" / "checkpoints" / "step00000010" / "complete.json").write_text('{"step": 10}')
    (stages / "01_primary" / "metrics.jsonl").write_text(
        '{"step": 10, "loss": 3.25}\n{"step": 10, "heldout_loss": 3.5}\n{"step": 12, "loss": 3.0}\n{"step"')
    S.record_jobs(run_dir, [{"stage": "nursery", "job_id": "11"}, {"stage": "primary", "job_id": "12"},
                            {"stage": "middle", "job_id": "13"}])
    monkeypatch.setattr(S, "squeue_states", lambda: {"11": ("COMPLETED", "None"), "12": ("RUNNING", "None"),
                                                     "13": ("PENDING", "Dependency")})
    rows = {r["stage"]: r for r in S.status_rows(run_dir)}
    assert rows["nursery"]["status"] == "done" and rows["nursery"]["heldout_loss"] == 4.5
    p = rows["primary"]
    assert (p["status"], p["step"], p["total"], p["checkpoint"], p["loss"], p["heldout_loss"]) == \
        ("running", 12, 40, 10, 3.0, 3.5)
    assert rows["middle"]["status"] == "queued" and rows["middle"]["total"] == 30
    monkeypatch.setattr(S, "squeue_states", lambda: None)  # no SLURM here
    rows = {r["stage"]: r for r in S.status_rows(run_dir)}
    assert rows["primary"]["status"] == "stopped" and rows["middle"]["status"] == "pending"
    S.print_status(run_dir)  # renders


# =========================================================================== a real cluster
@pytest.fixture(scope="session")
def cluster():
    """A single-machine SLURM cluster (partition "one": 1 node; "two": 2 simulated nodes);
    yields the environment for its clients and jobs."""
    if os.environ.get("LLMAGOGY_SLURM_TESTS") == "0":
        pytest.skip("LLMAGOGY_SLURM_TESTS=0")
    if os.geteuid() != 0:
        pytest.skip("the SLURM tests install and start a throwaway cluster (slurmctld, slurmd, munge): needs root")
    t0 = time.time()
    out = subprocess.run(["bash", str(CLUSTER), "install"], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        pytest.skip(f"cannot install SLURM (apt-get install slurmctld slurmd slurm-client munge): "
                    f"{(out.stdout + out.stderr)[-600:]}")
    # not under pytest's tmp dirs: those are root-only (0700) and munged runs as user munge
    d = Path(tempfile.mkdtemp(prefix="llmagogy-slurm-"))
    d.chmod(0o755)
    # the jobs' python: this one. (Not by putting the venv first on PATH: the venv's ninja would then
    # rebuild DeepSpeed's JIT ops that the other tests built with the system's ninja, ~35 s each time.)
    env = dict(os.environ, LLMAGOGY_SLURM_DIR=str(d), SLURM_CONF=str(d / "slurm.conf"), LLMAGOGY_PYTHON=sys.executable)
    out = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)
        pytest.fail(f"SLURM is installed but the test cluster did not start:\n{out.stdout}{out.stderr}\n"
                    f"{_tail(d / 'log' / 'slurmctld.log')}")
    print(f"\n[slurm] install + start: {time.time() - t0:.0f} s", file=sys.stderr)
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=180)
    shutil.rmtree(d, ignore_errors=True)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return f"--- {path} (end) ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"--- {path}: none"


def sh(env, *cmd, timeout=60) -> str:
    out = subprocess.run(list(cmd), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}: exit {out.returncode}\n{out.stdout}{out.stderr}"
    return out.stdout


def sbatch(env, log: Path, run_dir: Path, *args, opts=()) -> str:
    jid = sh(env, "sbatch", "--parsable", f"--output={log}", *opts, str(STAGE_SH), str(TINY),
             "--run-dir", str(run_dir), *SETS, *args).strip().split(";")[0]
    return jid


def job(env, jid: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], env=env, capture_output=True, text=True, timeout=30)
    state = re.search(r"\bJobState=(\S+)", out.stdout)
    restarts = re.search(r"\bRestarts=(\d+)", out.stdout)
    return {"state": state[1] if state else "UNKNOWN", "restarts": int(restarts[1]) if restarts else 0}


def wait_for(what: str, pred, timeout: float, diag=lambda: "", every: float = 0.2):
    """Poll ``pred`` until it is truthy, for at most ``timeout`` seconds."""
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{diag()}")


def wait_job(env, jid: str, log: Path, timeout: float) -> dict:
    diag = lambda: f"job {jid}: {job(env, jid)}\n{_tail(log)}\n{_tail(Path(env['LLMAGOGY_SLURM_DIR']) / 'log' / 'slurmctld.log', 15)}"  # noqa: E731
    info = wait_for(f"job {jid} to end", lambda: (lambda j: j if j["state"] in TERMINAL else None)(job(env, jid)),
                    timeout, diag, every=1.0)
    assert info["state"] == "COMPLETED", diag()
    return info


@pytest.fixture
def cancel_leftovers(cluster):
    """Jobs a test submitted are cancelled when it ends, whatever happened."""
    jobs: list[str] = []
    yield jobs
    if jobs:
        subprocess.run(["scancel", *jobs], env=cluster, capture_output=True, timeout=30)


def summary(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "summary.json").read_text())["stages"]


def assert_same_run(a: Path, b: Path) -> None:
    """Same held-out loss at the end of every stage, same final weights (CPU fp32, same seed)."""
    for sa, sb in zip(summary(a), summary(b), strict=True):
        assert sb["status"] == "done" and sb["loss_end"] == pytest.approx(sa["loss_end"], abs=1e-6), sa["name"]
    for ma in sorted(p for p in (a / "stages").glob(f"*/{RD.MODEL_DIR}") if RD.weights_at(p.parent) == p):
        wa = RD.Weights(ma).load()
        wb = RD.Weights(b / "stages" / ma.parent.name / RD.MODEL_DIR).load()
        assert wa.keys() == wb.keys()
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6, ma.parent.name


def first_checkpoint(stage_dir: Path):
    return lambda: C.latest_complete(stage_dir / "checkpoints")


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The tiny curriculum through `sbatch slurm/stage.sh`, uninterrupted: 2 tasks on 1 node."""
    d = tmp_path_factory.mktemp("reference")
    log = d / "job.log"
    t0 = time.time()
    jid = sbatch(cluster, log, d / "run")
    try:
        info = wait_job(cluster, jid, log, timeout=420)
    finally:
        subprocess.run(["scancel", jid], env=cluster, capture_output=True, timeout=30)
    print(f"\n[slurm] reference curriculum: {time.time() - t0:.0f} s", file=sys.stderr)
    return {"run": d / "run", "log": log, "job": jid, "info": info}


@pytest.mark.multiprocess
def test_sbatch_whole_curriculum_one_node(reference):
    stages = summary(reference["run"])
    assert [s["name"] for s in stages] == ["nursery", "primary", "middle"]
    assert [s["world_size"] for s in stages] == [2, 2, 1]
    assert all(s["status"] == "done" and s["loss_end"] < 5.5 for s in stages)
    assert reference["info"]["restarts"] == 0
    text = reference["log"].read_text()
    assert "stage nursery: 2 rank(s) on 1 node(s)" in text and "stage middle: 1 rank(s)" in text
    assert "curriculum tiny" in text  # the summary table at the end
    assert S.stage_jobs(reference["run"]) == {n: reference["job"] for n in ("nursery", "primary", "middle")}


@pytest.mark.multiprocess
def test_sbatch_one_stage_on_two_nodes(cluster, reference, tmp_path, cancel_leftovers):
    log = tmp_path / "job.log"
    jid = sbatch(cluster, log, tmp_path / "run", "--stage", "nursery",
                 opts=["--partition=two", "--nodes=2", "--ntasks-per-node=1"])
    cancel_leftovers.append(jid)
    wait_job(cluster, jid, log, timeout=240)
    text = log.read_text()
    assert "on slurmtest[1-2]" in text and "stage nursery: 2 rank(s) on 2 node(s), rendezvous slurmtest1:" in text
    (nursery,) = [s for s in summary(tmp_path / "run") if s["status"] == "done"]
    assert nursery["name"] == "nursery" and nursery["world_size"] == 2
    # the same two ranks, one per node: the same numbers as on one node
    assert nursery["loss_end"] == pytest.approx(summary(reference["run"])[0]["loss_end"], abs=1e-6)


@pytest.mark.multiprocess
def test_preempted_job_requeues_and_matches_uninterrupted_run(cluster, reference, tmp_path, cancel_leftovers):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    jid = sbatch(cluster, log, run_dir)
    cancel_leftovers.append(jid)
    primary = run_dir / "stages" / "01_primary"
    wait_for("primary's first complete checkpoint", first_checkpoint(primary), 300, lambda: _tail(log))
    assert not (primary / "result.json").exists()
    # what SLURM does --signal=B:USR1@300 before the time limit: USR1 to the batch shell only
    sh(cluster, "scancel", "--batch", "--signal=USR1", jid)
    info = wait_job(cluster, jid, log, timeout=420)
    text = log.read_text()
    assert info["restarts"] == 1, text[-3000:]
    assert "requeue: stage primary stopped by SIGUSR1 (checkpoint saved)" in text
    stopped = re.search(r"stage primary: stopped at step (\d+)/40", text)
    resumed = re.search(r"stage primary: resumed from step(\d+) \(step (\d+)/40\)", text)
    assert stopped and resumed and int(stopped[1]) == int(resumed[2]) < 40, text[-3000:]
    assert "srun exit" not in text  # a preemption is no failure
    assert_same_run(reference["run"], run_dir)


def _rank_pid(run_dir: Path, stage: str, rank: str) -> int | None:
    pattern = f"^[^ ]*python[^ ]* -m llmagogy_ds.train --run-dir {re.escape(str(run_dir))} --stage {stage}"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    for pid in out.stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_PROCID={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.multiprocess
def test_submit_chain_survives_a_killed_rank(cluster, reference, tmp_path, cancel_leftovers):
    # the reference's finished nursery, so that `submit` has primary and middle left
    run_dir = tmp_path / "run"
    shutil.copytree(reference["run"], run_dir, ignore=shutil.ignore_patterns("01_primary", "02_middle", "slurm*",
                                                                             "summary.json"))
    llmagogy = [sys.executable, "-m", "llmagogy_ds.cli"]
    out = sh(cluster, *llmagogy, "submit", str(TINY), "--run-dir", str(run_dir), *SETS)
    jobs = re.findall(r"stage (\w+): job (\d+)", out)
    assert [s for s, _ in jobs] == ["primary", "middle"], out
    (_, jp), (_, jm) = jobs
    cancel_leftovers.extend([jp, jm])
    assert [r["job_id"] for r in S.read_jobs(run_dir)] == [jp, jm]
    plog = run_dir / "slurm" / f"primary-{jp}.log"

    primary = run_dir / "stages" / "01_primary"
    wait_for("primary's first complete checkpoint", first_checkpoint(primary), 300, lambda: _tail(plog))
    status = sh(cluster, *llmagogy, "status", str(run_dir))
    assert re.search(r"primary\W+running", status) and re.search(r"middle\W+queued", status), status
    pid = wait_for("rank 1 of primary", lambda: _rank_pid(run_dir, "primary", "1"), 30)
    os.kill(pid, 9)
    t_kill = time.time()
    # the step ends (srun --kill-on-bad-exit, and the collective fails on rank 0) and the job requeues
    wait_for("the job to requeue itself", lambda: job(cluster, jp)["restarts"] >= 1, 120, lambda: _tail(plog))
    print(f"\n[slurm] killed rank -> requeued in {time.time() - t_kill:.1f} s", file=sys.stderr)
    wait_job(cluster, jp, plog, timeout=300)
    wait_job(cluster, jm, run_dir / "slurm" / f"middle-{jm}.log", timeout=300)  # afterok followed

    text = plog.read_text()
    assert re.search(r"requeue: stage primary: srun exit \d+ \(.*task 1: Killed.*\(failure 1 of at most 3\)", text), \
        text[-3000:]
    assert re.search(r"stage primary: resumed from step\d+", text)
    assert (run_dir / "slurm" / f"job-{jp}.failures").read_text().strip() == "1"
    # a crash resumes from the latest complete checkpoint: still the uninterrupted run's numbers
    assert_same_run(reference["run"], run_dir)
    status = sh(cluster, *llmagogy, "status", str(run_dir))
    assert len(re.findall(r"\W(done)\W", status)) == 3 and "completed" in status, status
    # a finished run has nothing left to submit
    assert "nothing to submit" in sh(cluster, *llmagogy, "submit", str(TINY), "--run-dir", str(run_dir), *SETS)


@pytest.mark.multiprocess
def test_submit_trunk_and_experts_on_a_real_cluster(cluster, reference, tmp_path, cancel_leftovers):
    """`branch` before the trunk's stage has trained, then one `submit`: the experts' jobs wait for
    the trunk's job of that stage (not its last), link it when they start, and train beside it."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference["run"], run_dir, ignore=shutil.ignore_patterns("01_primary", "02_middle", "slurm*",
                                                                             "summary.json"))
    experts = {"experts": [{"name": n, "stages": [{"name": n, "data": [{"path": f"synthetic:{lvl}"}],
                                                   "train": {"tokens": 16384, "nproc": 1, "eval_every": 2}}]}
                           for n, lvl in (("counting", "level0"), ("sums", "level2"))]}
    (tmp_path / "experts.yaml").write_text(json.dumps(experts))
    llmagogy = [sys.executable, "-m", "llmagogy_ds.cli"]
    sh(cluster, *llmagogy, "branch", str(run_dir), "--from", "primary", "--experts", str(tmp_path / "experts.yaml"))
    out = sh(cluster, *llmagogy, "submit", str(TINY), "--run-dir", str(run_dir), *SETS)
    jobs = dict(re.findall(r"stage (\w+): job (\d+)", out))
    assert list(jobs) == ["primary", "middle", "counting", "sums"], out
    cancel_leftovers.extend(jobs.values())
    for name in ("middle", "counting", "sums"):  # afterok on primary's job, not on the trunk's last
        dep = re.search(r"\bDependency=(\S+)", sh(cluster, "scontrol", "show", "job", "-o", jobs[name]))
        assert dep and dep[1].startswith(f"afterok:{jobs['primary']}"), (name, dep and dep[1])
    for name in ("primary", "middle"):
        wait_job(cluster, jobs[name], run_dir / "slurm" / f"{name}-{jobs[name]}.log", timeout=420)
    fingerprint = weights_fingerprint(run_dir / "stages" / "01_primary")
    for name in ("counting", "sums"):
        e = run_dir / "experts" / name
        wait_job(cluster, jobs[name], e / "slurm" / f"{name}-{jobs[name]}.log", timeout=300)
        (own,) = [s for s in summary(e) if s["name"] == name]
        assert own["status"] == "done" and own["world_size"] == 1
        assert json.loads(RD.lineage_path(e).read_text())["trunk_weights"] == fingerprint
        trunk_model = RD.weights_at(run_dir / "stages" / "01_primary")
        assert os.path.samefile(next(trunk_model.iterdir()),
                                e / "stages" / "01_primary" / trunk_model.name / next(trunk_model.iterdir()).name)
