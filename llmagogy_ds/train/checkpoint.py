"""Stage checkpoints: DeepSpeed engine checkpoints made safe to resume from.

A checkpoint is DeepSpeed's own (``engine.save_checkpoint``: model, ZeRO-sharded optimizer,
scheduler, client state) under a tag ``step00000123``. Safety on top of it:

* it is written under ``<tag>.partial`` and renamed to ``<tag>`` once every rank finished;
  then a ``complete.json`` marker with the size of every file is written and the ``latest``
  pointer moved (atomic renames), so a checkpoint torn by a kill is never chosen;
* before it is resumed from, rank 0 checks it (marker, sizes, every pickle loadable with
  ``weights_only=True``; ``checkpoint_files.py``) and sets a bad one aside, never deleting it;
  the ranks then resume together from the checkpoint rank 0 chose (see ``StageCheckpoints``);
* the last ``keep`` complete checkpoints are kept;
* free disk is checked before saving;
* a stage restarted on another world size or ZeRO stage goes through DeepSpeed's universal
  checkpoint (``ds_to_universal`` then ``load_universal``); the universal-checkpoint info
  it needs is stored with every checkpoint (``mark_universal``), not injected afterwards.

``load_consolidated`` turns any ZeRO layout back into one fp32 state dict with DeepSpeed's
``zero_to_fp32`` (growth, evaluation and drift work on that).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from llmagogy_ds import rundir as RD
from llmagogy_ds.train.checkpoint_files import (MARKER, TAG_RE, BadCheckpoint, CheckpointError, check, choose,
                                               complete_tags, note_load_failure, problems, read_marker, safe_load,
                                               tag_for, write_marker)
from llmagogy_ds.parallel.model_parallel import local_names, localize_moments
from llmagogy_ds.parallel.pipeline import pipe_name
from llmagogy_ds.parallel.tensor_parallel import shard_state_dict
from llmagogy_ds.model.layout import param_shapes
from llmagogy_ds.parallel.optim_state import (KEYS, base_optimizer, group_meta, link_state, restore_group_meta,
                                           restore_moments, set_group_steps)

class MachineError(CheckpointError):
    """A failure of the machine (memory, a killed process), not of the checkpoint."""


# the machine's trouble, not the checkpoint's: a load or conversion failing so leaves it as it is
MACHINE_ERRORS = (MachineError, MemoryError, torch.OutOfMemoryError, dist.DistError)


def latest_complete(ckpt_dir: Path) -> str | None:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def check_free_disk(ckpt_dir: Path, need_bytes: int) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(ckpt_dir).free
    if free < need_bytes:
        raise CheckpointError(
            f"{ckpt_dir}: only {free / 2**20:.0f} MiB free, a checkpoint needs about {need_bytes / 2**20:.0f} MiB; "
            "free disk space (or lower train.keep_checkpoints) and resume — nothing was written")


def estimate_bytes(n_params: int, n_trainable: int) -> int:
    """fp32 weights + fp32 master + two Adam moments for trainable params, 10% slack."""
    return int((4 * n_params + 12 * n_trainable) * 1.1) + (1 << 20)


def _broadcast(value: int) -> int:
    """Rank 0's ``value`` on every rank (a tensor on this rank's GPU under NCCL: the engine may
    not be built yet, so its device is taken from LOCAL_RANK)."""
    if not dist.is_initialized():
        return value
    dev = torch.device("cpu")
    if dist.get_backend() == "nccl":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    t = torch.tensor([value], dtype=torch.long, device=dev)
    dist.broadcast(t, 0)
    return int(t.item())


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int, need_bytes: int,
         layout: dict | None = None) -> str:
    """Collective: every rank calls it. Returns the tag. ``layout``: {"tp", "pp"} of the run."""

    tag = tag_for(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    ok, err = 1, None
    if rank == 0:
        try:
            check_free_disk(ckpt_dir, need_bytes)
        except CheckpointError as e:
            ok, err = 0, e
    if not _broadcast(ok):
        raise err or CheckpointError(f"{ckpt_dir}: not enough free disk for a checkpoint (see rank 0's message)")
    # write under a temporary tag, renamed once every rank is done: shards of a save that a
    # kill interrupted (maybe from another world size) never mix with a later one
    partial = f"{tag}.partial"
    if rank == 0:
        shutil.rmtree(ckpt_dir / partial, ignore_errors=True)
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # torn (no valid marker): never resumed from
        shutil.rmtree(ckpt_dir / f"{tag}_universal", ignore_errors=True)  # derived from what is replaced
    if dist.is_initialized():
        dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=partial, client_state=client_state, save_latest=False)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        os.replace(ckpt_dir / partial, ckpt_dir / tag)
        world = dist.get_world_size() if dist.is_initialized() else 1
        write_marker(ckpt_dir / tag, {"step": step, "world_size": world, "zero_stage": engine.zero_optimization_stage(),
                                      **(layout or {"tp": 1, "pp": 1})})
        try:  # what a resume will check, now: a class DeepSpeed stores that the screen refuses shows
            check(ckpt_dir / tag)  # at the first save, not as checkpoints set aside at the next resume
        except BadCheckpoint as e:
            ok, err = 0, CheckpointError(
                f"{ckpt_dir / tag}: the checkpoint just written does not pass the resume check ({e}). If it names "
                "a class of DeepSpeed's, allow it with LLMAGOGY_SAFE_GLOBALS=module.Class and report it")
        if ok:
            RD.write_atomic(ckpt_dir / "latest", tag)
            for old in complete_tags(ckpt_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
                shutil.rmtree(ckpt_dir / f"{old}_universal", ignore_errors=True)
    if not _broadcast(ok):
        raise err or CheckpointError(f"{ckpt_dir / tag}: the checkpoint just written does not pass the resume check "
                                     "(see rank 0's message)")
    return tag


def mark_universal(module: torch.nn.Module, info: dict | None = None) -> None:
    """Attach the universal-checkpoint info DeepSpeed saves with the model states."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    setattr(module, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
                                                **(info or {})})


def needs_universal(ckpt_dir: Path, tag: str, world_size: int, zero_stage: int) -> bool:
    """A checkpoint written by another world size or ZeRO stage is loaded as universal.

    ZeRO-0 checkpoints hold full optimizer states and load under any world size directly.
    """
    info = checkpoint_info(ckpt_dir, tag)
    if info["zero_stage"] == 0:
        if zero_stage != 0:
            raise CheckpointError(
                f"{ckpt_dir / tag}: written with ZeRO-0, which has no ZeRO shards to convert; "
                f"resume it with zero_stage 0 (asked for {zero_stage})")
        return False
    return info["world_size"] != world_size or info["zero_stage"] != zero_stage


def needs_relayout(ckpt_dir: Path, tag: str, world_size: int, zero_stage: int, layout: dict) -> bool:
    """A checkpoint is re-cut per parameter (``load_relayout``) when its tp/pp differ from the
    run's, or when either side is model-parallel and the world size or ZeRO stage differ."""
    info = checkpoint_info(ckpt_dir, tag)
    src = (info.get("tp", 1), info.get("pp", 1))
    dst = (layout["tp"], layout["pp"])
    if src == (1, 1) and dst == (1, 1):
        return False
    change = src != dst or info["world_size"] != world_size or info["zero_stage"] != zero_stage
    if change and info["zero_stage"] == 0:
        raise CheckpointError(
            f"{ckpt_dir / tag}: written with ZeRO-0 at tp={src[0]}, pp={src[1]}; only ZeRO 1-3 checkpoints convert "
            f"to another layout: resume it with its own tp, pp, world size and ZeRO stage")
    return change


def to_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert ``tag`` with DeepSpeed's ``ds_to_universal`` (once); returns the universal tag."""
    import subprocess
    import sys

    out = ckpt_dir / f"{tag}_universal"
    if (out / MARKER).exists():
        try:  # reused only when it is what we wrote: DeepSpeed unpickles it without restriction
            check(out)
            return out.name
        except BadCheckpoint as e:
            print(f"[llmagogy] {out} is not usable ({e}); converting {tag} again", flush=True)
            os.replace(out, ckpt_dir / f"{out.name}.bad-{e.reason}-{os.getpid()}")
    tmp = ckpt_dir / f"{tag}_universal.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode < 0:
        raise MachineError(f"ds_to_universal on {ckpt_dir / tag} was killed by signal {-proc.returncode} "
                           "(out of memory?); the checkpoint stays as it is")
    if proc.returncode != 0:
        raise CheckpointError(f"ds_to_universal failed on {ckpt_dir / tag}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    _both_optimizer_state_layouts(tmp / "zero" / "optimizer_state.pt")
    # DeepSpeed looks the model states up under the *loading* ZeRO stage's file name
    # (ZeRO-3: zero_pp_rank_0_mp_rank_XX_…, else mp_rank_XX_…): provide both
    for f in list(tmp.glob("*mp_rank_*_model_states.pt")):
        plain = f.name.replace("zero_pp_rank_0_", "")
        for name in (plain, f"zero_pp_rank_0_{plain}"):
            if not (tmp / name).exists():
                os.link(f, tmp / name)
    write_marker(tmp, {k: v for k, v in checkpoint_info(ckpt_dir, tag).items() if k != "files"})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out.name


def _both_optimizer_state_layouts(path: Path) -> None:
    """ZeRO-1/2 and ZeRO-3 read a universal checkpoint in slightly different layouts (global
    state under ``param_groups`` vs ``optimizer_state_dict``; per-parameter files as dicts vs
    bare tensors); write what both read, so a stage can change its ZeRO stage on restart."""
    import deepspeed
    from deepspeed.checkpoint.constants import DS_VERSION, OPTIMIZER_STATE_DICT, PARAM

    sd = safe_load(path)
    if OPTIMIZER_STATE_DICT not in sd:
        step_file = next(path.parent.glob("*/step.pt"), None)
        step = safe_load(step_file) if step_file else 0
        sd[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, "param_groups": sd["param_groups"]}
    sd.setdefault("param_groups", sd[OPTIMIZER_STATE_DICT]["param_groups"])
    sd.setdefault(DS_VERSION, deepspeed.__version__)  # ZeRO-1/2 refuse a state without it
    torch.save(sd, path)
    # ZeRO-3's conversion stores bare tensors per parameter; ZeRO-1/2 read {"param": tensor}
    for f in path.parent.glob("*/*.pt"):
        if f.name != "step.pt":
            t = safe_load(f)
            if torch.is_tensor(t):
                torch.save({PARAM: t}, f)


def load_relayout(engine, ckpt_dir: Path, tag: str, layout, topo) -> dict:
    """Resume ``tag`` (converted by ``to_universal``) on another tp/pp/dp/ZeRO layout.

    The universal form holds every trainable parameter unsharded (fp32 weights, Adam moments)
    under the writing run's names; each rank maps them to canonical names, takes its TP slice
    and sets weights and moments through DeepSpeed's tensor-fragment API. Frozen generations
    are not in it: they are the stage's init weights, already loaded. Returns the client state
    (counters, scheduler) of the checkpoint.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    src = checkpoint_info(ckpt_dir, tag)
    zero = ckpt_dir / f"{tag}_universal" / "zero"
    name_in_ckpt = (lambda c: pipe_name(c, layout.n_layers)) if src.get("pp", 1) > 1 else (lambda c: c)
    link_state(engine)
    base = base_optimizer(engine)
    params = dict(engine.module.named_parameters())
    layout_shape = param_shapes(layout)

    def full(c: str, key: str) -> torch.Tensor:
        path = zero / name_in_ckpt(c) / f"{key}.pt"
        if not path.exists():
            raise CheckpointError(f"{path}: missing from the converted checkpoint {tag}")
        t = safe_load(path)
        return (t["param"] if isinstance(t, dict) else t).reshape(layout_shape[c])

    for c, name in local_names(engine.module, layout).items():
        p = params[name]
        if not p.requires_grad:
            continue
        vals = {key: shard_state_dict({c: full(c, key)}, layout, topo.tp, topo.tp_rank)[c]
                for key in ("fp32", *KEYS)}
        with torch.no_grad():
            p.copy_(vals["fp32"].to(p.dtype))
        if engine.zero_optimization_stage() > 0:
            safe_set_full_fp32_param(p, vals["fp32"].to(p.device))
            for key in KEYS:
                safe_set_full_optimizer_state(p, vals[key].to(p.device), key)
        else:
            for key in KEYS:
                base.state[p][key].copy_(vals[key])
    files = sorted((ckpt_dir / tag).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{ckpt_dir / tag}: no model states file with the run's counters")
    client = safe_load(files[0])
    set_group_steps(engine, client.get("adam_steps") or {})
    return client


def checkpoint_info(ckpt_dir: Path, tag: str) -> dict:
    """The marker of ``tag`` (``BadCheckpoint``, a ``CheckpointError``, when it is torn)."""
    try:
        return read_marker(Path(ckpt_dir) / tag)
    except BadCheckpoint as e:
        raise BadCheckpoint(e.reason, f"{Path(ckpt_dir) / tag}: {e}") from None


def load_consolidated(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a (possibly ZeRO-sharded) DeepSpeed checkpoint. Frozen
    parameters are missing from a ZeRO-1 checkpoint's (``stage_end.full_weights`` adds them)."""
    path = Path(ckpt_dir) / tag
    try:  # zero_to_fp32 unpickles without restriction: check the files first
        check(path)
    except BadCheckpoint as e:
        raise BadCheckpoint(e.reason, f"{path}: {e}") from None
    if any(path.glob("*optim_states.pt")) and any(path.glob("*zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # ZeRO-0: the module states hold the full weights
        files = sorted(path.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{path}: no DeepSpeed model states found")
        sd = safe_load(files[0])["module"]
    return {k: v.float().clone() for k, v in sd.items()}


class StageCheckpoints:
    """A stage's checkpoints: which one to resume from and how, the resume itself (all three
    paths) and saving, behind one object the trainer holds.

    Resume paths: the same layout (DeepSpeed's own load); another world size or ZeRO stage
    (DeepSpeed's universal load); another tp/pp (the universal form loaded per canonical
    parameter, ``load_relayout``). A stage with no checkpoint yet starts from its init weights,
    with the Adam moments carried across growth when there are any (``carry``: each rank grows its own).

    Which checkpoint: rank 0 alone decides (``checkpoint_files.choose``: checks, sets bad ones
    aside, converts to the universal form when needed) and broadcasts the step, so every rank
    loads the same one. A rank that then fails to load it leaves a note and exits: torchrun (or
    ``srun --kill-on-bad-exit``) ends the others, which may wait inside one of DeepSpeed's
    collectives, so nothing hangs; the next run sets that checkpoint aside and resumes from the
    previous one. (Falling back within the run would need a rebuilt engine and agreement
    across collectives a failed rank may have left half-way.)
    """

    def __init__(self, stage_dir: Path, world: int, zero_stage: int, layout_key: dict, keep: int, need_bytes: int,
                 carry=None):
        self.dir = Path(stage_dir) / RD.CHECKPOINTS
        self.init_moments = Path(stage_dir) / RD.INIT_MOMENTS  # a run grown before moments were carried per rank
        self.carry = carry  # module → this rank's grown moments (canonical names), or None
        self.world, self.zero_stage, self.layout_key = world, zero_stage, layout_key
        self.keep, self.need_bytes = keep, need_bytes
        rank = dist.get_rank() if dist.is_initialized() else 0
        step = -1  # -1: no checkpoint (start from init); -2: rank 0 failed (its message says why)
        if rank == 0:
            try:
                tag = choose(self.dir, self._convert)
                step = -1 if tag is None else int(TAG_RE.match(tag).group(1))
            except Exception as e:  # told to every rank, so that none waits for rank 0 in a collective
                print(f"[llmagogy] {self.dir}: {type(e).__name__}: {e}", flush=True)
                step = -2
        step = _broadcast(step)
        if step == -2:
            raise CheckpointError(f"{self.dir}: no checkpoint could be chosen (see rank 0's message)")
        self.tag = None if step < 0 else tag_for(step)
        self.relayout, self.universal = self._paths(self.tag)

    def _paths(self, tag: str | None) -> tuple[bool, bool]:
        """(relayout, universal) for resuming ``tag`` in this run's layout."""
        if tag is None:
            return False, False
        relayout = needs_relayout(self.dir, tag, self.world, self.zero_stage, self.layout_key)
        return relayout, not relayout and needs_universal(self.dir, tag, self.world, self.zero_stage)

    def _convert(self, tag: str) -> None:
        """Rank 0, before the engine is built: the universal form, when the resume goes through it.
        A conversion that fails is a failed load: noted, and set aside by the next run."""
        if any(self._paths(tag)):
            try:
                to_universal(self.dir, tag)
            except MACHINE_ERRORS:
                raise
            except Exception as e:
                note_load_failure(self.dir / tag, 0, e)
                raise

    def resume(self, engine, sched, layout, topo, rank: int, stage_name: str) -> dict | None:
        """Load the chosen checkpoint into ``engine``/``sched`` (restoring this rank's RNG state);
        returns the trainer's counters from it, or None when there is none."""
        if self.tag is None:
            return self._start_fresh(engine, layout, topo, rank, stage_name)
        try:
            return self._load(engine, sched, layout, topo, rank)
        except MACHINE_ERRORS:
            raise
        except Exception as e:
            note_load_failure(self.dir / self.tag, rank, e)
            raise CheckpointError(
                f"rank {rank} could not load checkpoint {self.dir / self.tag} ({type(e).__name__}: {e}); noted: "
                "the next run sets it aside (nothing is deleted) and resumes from the previous checkpoint") from e

    def _load(self, engine, sched, layout, topo, rank: int) -> dict:
        if self.relayout:
            client = load_relayout(engine, self.dir, self.tag, layout, topo)
            sched.load_state_dict(client["lr_scheduler"])
            return client["llmagogy"]
        load_tag = f"{self.tag}_universal" if self.universal else self.tag
        meta = group_meta(engine)
        _, client = engine.load_checkpoint(str(self.dir), tag=load_tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if client is None:  # DeepSpeed logs a missing file and returns None instead of raising
            raise CheckpointError(f"DeepSpeed found nothing to load under {self.dir / load_tag}")
        if self.universal:
            restore_group_meta(engine, meta, client.get("adam_steps"))
            sched.apply()
        rng = client.get("rng", {}).get(rank)
        if rng is not None:
            from llmagogy_ds.train.step import set_rng_state

            set_rng_state(rng)
        return client["llmagogy"]

    def _start_fresh(self, engine, layout, topo, rank: int, stage_name: str) -> None:
        grown = (torch.load(self.init_moments, map_location="cpu", weights_only=True) if self.init_moments.exists()
                 else self.carry(engine.module) if self.carry is not None else None)
        if grown is not None:  # growth.optimizer: carry
            n = restore_moments(engine, localize_moments(grown, engine.module, layout, topo))
            if rank == 0:
                print(f"[llmagogy] stage {stage_name}: Adam moments of {n} old tensors carried across growth")
        return None

    def save(self, engine, step: int, client_state: dict) -> str:
        return save(engine, self.dir, step, client_state, self.keep, self.need_bytes, self.layout_key)


__all__ = ["StageCheckpoints", "save", "latest_complete", "mark_universal", "needs_universal", "needs_relayout",
           "load_relayout", "to_universal", "complete_tags", "load_consolidated", "checkpoint_info", "tag_for", "MARKER",
           "CheckpointError", "BadCheckpoint", "problems", "safe_load", "estimate_bytes", "check_free_disk"]
