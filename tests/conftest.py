import os
import socket

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
