"""Worker for tests/test_parallel.py, run by torchrun on 4 processes (CPU, gloo).

Same grown (3-generation) weights and the same batch under tp=2, pp=2 and tp=2 × pp=2:
writes the held-out loss and the gathered gradients of each layout (rank 0) next to the
tp=1, pp=1 reference, for the test to compare. The same at tp=2 and pp=2 with activation
checkpointing (``_ckpt``: also compared with the same layout without it), and a grouped-query
attention model (kv heads = heads / 2, grown over 3 generations) at tp=2 and tp=2 × pp=2.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llmagogy_ds.model.layout import Shape, stage_layouts
from llmagogy_ds.model.gpt import GPT, fresh_init
from llmagogy_ds.parallel.rendezvous import init_distributed
from llmagogy_ds.parallel.model_parallel import build_model, gather_full, load_full, local_tensors
from llmagogy_ds.parallel.topology import topology


class ModelCfg:
    seq_len, rope_theta, norm_eps = 32, 10000.0, 1e-5


def loss_and_grads(layout, full, x, tp, pp, recompute=0):
    """Loss and full gradients (rank 0) of one layout; every rank sees the same batch."""
    topo = topology(tp, pp)
    model = build_model(layout, ModelCfg, topo, recompute)
    load_full(model, full, layout, topo)
    if pp == 1:
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        return float(loss), gather_full(local_tensors(model, layout, grads=True), layout, topo)
    # the pipeline runs inside DeepSpeed's engine: one SGD step at lr 1 moves θ by -grad
    import deepspeed

    before = local_tensors(model, layout)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        config={"train_micro_batch_size_per_gpu": x.shape[0], "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9})
    loss = engine.train_batch(iter([(x[:, :-1], x[:, 1:])]))
    after = local_tensors(model, layout)
    return float(loss), gather_full({k: before[k] - after[k] for k in before}, layout, topo)


def reference(layout, full, x):
    ref = GPT(layout, ModelCfg.seq_len)
    ref.load_state_dict(full)
    loss_ref = ref(x[:, :-1], x[:, 1:])
    loss_ref.backward()
    return float(loss_ref), {k: p.grad for k, p in ref.named_parameters()}


def max_err(grads, ref):
    return max((grads[k] - ref[k]).abs().max().item() for k in ref)


def main(out: Path) -> None:
    init_distributed()
    torch.manual_seed(0)
    shapes = [Shape(2, 32, 2, 64), Shape(3, 64, 4, 96), Shape(4, 96, 6, 128)]
    gqa_shapes = [Shape(2, 64, 4, 64, 2), Shape(3, 128, 8, 96, 4), Shape(4, 192, 12, 128, 6)]
    growth = [None, ("identity", "interleave"), ("identity", "top")]
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 64, (4, ModelCfg.seq_len + 1), generator=g)
    results = {}
    # (prefix, shapes, [(tp, pp, recompute)]); a _ckpt run is also compared with its layout without it
    cases = [("", shapes, [(2, 1, 0), (1, 2, 0), (2, 2, 0), (2, 1, 1), (1, 2, 2)]),
             ("gqa_", gqa_shapes, [(2, 1, 0), (2, 2, 1)])]
    for prefix, shp, runs in cases:
        layout = stage_layouts(shp, growth, 64, 16)[-1][0]
        full = fresh_init(layout, 0.05, torch.Generator().manual_seed(1))
        full = {k: v + 0.01 * torch.randn_like(v) for k, v in full.items()}  # no exactly-zero pieces
        loss_ref, grads_ref = reference(layout, full, x)
        results[f"{prefix}ref"] = loss_ref
        plain = {}
        for tp, pp, rc in runs:
            loss, grads = loss_and_grads(layout, full, x, tp, pp, rc)
            if dist.get_rank() == 0:
                scale = max(v.abs().max().item() for v in grads_ref.values())
                r = {"loss": loss, "grad_max_abs_err": max_err(grads, grads_ref), "grad_scale": scale,
                     "n_grads": len(grads), "n_ref": len(grads_ref)}
                if rc and (tp, pp) in plain:
                    r["grad_err_vs_no_ckpt"] = max_err(grads, plain[(tp, pp)])
                if not rc:
                    plain[(tp, pp)] = grads
                results[f"{prefix}tp{tp}_pp{pp}" + ("_ckpt" if rc else "")] = r
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
