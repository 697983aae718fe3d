import contextlib
import os
import signal
import socket
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def dist_world1():
    """A one-rank gloo process group in the test process (DeepSpeed needs one)."""
    import torch.distributed as dist

    from llmagogy_ds.parallel.rendezvous import init_distributed

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        init_distributed()
    yield


@pytest.fixture(scope="session")
def branched_experts(tmp_path_factory, dist_world1):
    """``(dir, trunk, [expert run dirs])``: tests/branch_fixtures.py's trunk and its three experts,
    trained once for the session (test_branch and test_route read them; neither changes them)."""
    from branch_fixtures import make_branched_experts

    d = tmp_path_factory.mktemp("branched")
    trunk, experts = make_branched_experts(d)
    return d, trunk, experts


@contextlib.contextmanager
def stages_in_process():
    """Run every stage that ``llmagogy`` would start with torchrun in this process (one rank;
    needs ``dist_world1``); yields the launches as ``(run dir name, stage, nproc)``. The trainer's
    preemption handlers do not outlive the block."""
    from llmagogy_ds.cluster import launcher
    from llmagogy_ds.train import loop as train

    launched = []

    def in_process(run_dir, stage, nproc, extra=()):  # what torchrun would start, on this one rank
        launched.append((Path(run_dir).name, stage, nproc))
        train.train_stage(Path(run_dir), stage)
        return 0

    mp = pytest.MonkeyPatch()
    mp.setattr(launcher, "run_stage", in_process)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        yield launched
    finally:
        mp.undo()
        for sig, h in handlers.items():
            signal.signal(sig, h)
