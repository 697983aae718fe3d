"""A stage's model as a Hugging Face ``LlamaForCausalLM`` directory that ``transformers``,
vLLM and lm-evaluation-harness load offline:

    OUT/config.json                 LlamaForCausalLM (hf.hf_config)
    OUT/model.safetensors           weights (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
    OUT/tokenizer.json              the run's tokenizer; it puts <|endoftext|> in front of a text, as
    OUT/tokenizer_config.json       our scorers and training do (a document follows EOS): bos = eos = pad
    OUT/generation_config.json      bos/eos/pad token ids

Any stage of a run exports, whatever tp/pp/ZeRO layout trained it: the stage end writes the full
fp32 weights under the layout's names (``model/`` shards; ``model.pt`` in older runs), and this reads those.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llmagogy_ds import rundir as RD
from llmagogy_ds.data import corpus as D
from llmagogy_ds.data.prepare import run_tokenizer
from llmagogy_ds.evaluation.results import load_weights, locate_checkpoint
from llmagogy_ds.interop.hf import DTYPES, hf_config, to_hf
from llmagogy_ds.model.layout import ModelLayout, param_shapes

HF_DIR = "hf"  # RUN/stages/NN_name/hf: the `export:` section's output at each stage end
MAX_SHARD_BYTES = 5 * 2**30  # as transformers' save_pretrained (5 GB shards)


# --------------------------------------------------------------------------- a run's stage
def read_stage(run_dir: Path, s: int, checkpoint: Path | None = None):
    """``(weights, layout, ModelConfig, tokenizer)`` of stage ``s``'s final model (``model/``, or an
    older run's ``model.pt``)."""
    cfg = RD.load_run_config(run_dir)
    tok = run_tokenizer(run_dir)
    layout = RD.run_plan(run_dir, cfg, tok.get_vocab_size()).layout(s)
    ckpt = checkpoint or RD.weights_at(RD.stage_dir(run_dir, cfg, s))
    if ckpt is None or not ckpt.exists():
        raise RD.RunDirError(f"{RD.stage_dir(run_dir, cfg, s)}: stage not finished (no {RD.MODEL_DIR}/)")
    expected = {k: torch.empty(shape, device="meta") for k, shape in param_shapes(layout).items()}
    sd = load_weights(ckpt, expected, f"{run_dir / RD.CONFIG} (stage {cfg.stages[s].name})")
    return sd, layout, cfg.stages[s].model, tok


def export_stage(run_dir, s: int, out=None, dtype: str = "fp32", max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write stage ``s`` of ``run_dir`` as a Hugging Face LLaMA to ``out`` (default
    ``RUN/stages/NN_name/hf``); returns ``out``. The stage-end callback of ``export:``."""
    run_dir = Path(run_dir)
    sd, layout, model_cfg, tok = read_stage(run_dir, s)
    if out is None:
        out = RD.stage_dir(run_dir, RD.load_run_config(run_dir), s) / HF_DIR
    try:
        return export_model(sd, layout, model_cfg, tok, out, dtype, max_shard_bytes)
    except ValueError as e:  # a model grown before one-epsilon norms is no standard LLaMA
        raise RD.RunDirError(f"{run_dir}: stage {s}: {e}") from None


def export_path(path, out, dtype: str = "fp32") -> tuple[Path, int]:
    """``export_stage`` of a run dir (its last finished stage), a stage dir or a model.pt in one;
    returns ``(out, stage index)``."""
    ckpt, run_dir, s = locate_checkpoint(path)
    if ckpt.name not in (RD.MODEL, RD.MODEL_DIR):
        raise RD.RunDirError(f"{ckpt}: export reads a stage's final weights ({RD.MODEL_DIR}/, or {RD.MODEL})")
    return export_stage(run_dir, s, out, dtype), s


# --------------------------------------------------------------------------- files
def export_model(sd: dict, layout: ModelLayout, model_cfg, tokenizer, out, dtype: str = "fp32",
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write weights ``sd`` of ``layout`` with ``tokenizer`` (a ``tokenizers.Tokenizer`` with
    <|endoftext|>) as a ``LlamaForCausalLM`` directory ``out``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    eos = tokenizer.token_to_id(D.EOS)
    if eos is None:
        raise ValueError(f"the tokenizer has no {D.EOS} token")
    config = hf_config(layout, model_cfg, eos, dtype)  # first: refuses a model with per-norm epsilons
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    RD.write_hf_weights(out, to_hf(sd, layout, DTYPES[dtype]), max_shard_bytes)
    RD.write_atomic(out / "config.json", config)
    RD.write_atomic(out / "generation_config.json",
                    {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, "_from_model_config": False})
    save_tokenizer(tokenizer, out, model_cfg.seq_len)
    return out


def hf_tokenizer_object(tokenizer):
    """A copy of ``tokenizer`` that puts <|endoftext|> in front of a text (``add_special_tokens``),
    so an HF user, and lm-eval, condition the first token as our scorers do."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    t = Tokenizer.from_str(tokenizer.to_str())
    eos = D.EOS
    t.post_processor = TemplateProcessing(single=f"{eos} $A", pair=f"{eos} $A {eos} $B:1",
                                          special_tokens=[(eos, t.token_to_id(eos))])
    return t


def save_tokenizer(tokenizer, out: Path, max_length: int) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` (+ special_tokens_map) through
    transformers' own ``PreTrainedTokenizerFast.save_pretrained`` (offline)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer_object(tokenizer), bos_token=D.EOS,
                                 eos_token=D.EOS, pad_token=D.EOS, model_max_length=max_length,
                                 clean_up_tokenization_spaces=False)
    hf.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # not LlamaTokenizer, which would redo the post-processor
    RD.write_atomic(cfg_path, cfg)


# --------------------------------------------------------------------------- checks
@torch.no_grad()
def logits_difference(out, model, ids: torch.Tensor) -> float:
    """max |logits(transformers, OUT) − logits(ours)| on token ids ``[B, T]`` (both fp32, cpu)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    theirs = hf(ids).logits.float()
    mine = model.eval()(ids).float()
    return float((theirs - mine).abs().max())


__all__ = ["export_stage", "export_path", "export_model", "read_stage",
           "save_tokenizer", "hf_tokenizer_object", "logits_difference", "HF_DIR"]
