"""DeepSpeed adapter: config dict, optimizer over generation param groups, initialize."""
from __future__ import annotations

import torch


def device_kind() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()  # "cpu" or "cuda"


def ds_config(train, zero_stage: int | None = None, load_universal: bool = False) -> dict:
    """DeepSpeed config for a stage's ``TrainConfig``. No DeepSpeed scheduler: GenerationLR."""
    precision = train.precision
    cfg = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage if zero_stage is None else zero_stage},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return cfg


def build_optimizer(groups: list[dict], train):
    """AdamW over the generation groups: DeepSpeed's FusedAdam on GPU when it builds, else torch."""
    kw = dict(lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps, weight_decay=train.weight_decay)
    if device_kind() == "cuda":
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kw)
        except Exception:  # no compiler / ops not built: torch's fused AdamW is close
            return torch.optim.AdamW(groups, fused=True, **kw)
    return torch.optim.AdamW(groups, foreach=True, **kw)


def initialize(model, groups: list[dict], train, make_scheduler, zero_stage: int | None = None,
               load_universal: bool = False, mpu=None):
    """``deepspeed.initialize`` with our optimizer and per-generation scheduler.

    A ``PipelineModule`` gets DeepSpeed's pipeline engine (its topology is its mpu); a
    tensor-parallel model passes ``mpu`` (parallel.topology.MegatronMPU)."""
    import deepspeed

    optimizer = build_optimizer(groups, train)
    engine, opt, _, sched = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=make_scheduler, mpu=mpu,
        config=ds_config(train, zero_stage, load_universal), dist_init_required=False)
    return engine, opt, sched
