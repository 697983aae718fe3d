"""Our decoder as a Hugging Face ``LlamaForCausalLM`` and back: pure maps of state dicts and
configs (no files; ``export.py`` and ``import_hf.py`` read and write them).

The two models are the same function, name for name:

    ours (pieces assembled)        LlamaForCausalLM
    tok_emb                        model.embed_tokens.weight
    blocks.{i}.attn_norm           model.layers.{i}.input_layernorm.weight
    blocks.{i}.attn.wq|wk|wv|wo    model.layers.{i}.self_attn.q_proj|k_proj|v_proj|o_proj.weight
    blocks.{i}.ffn_norm            model.layers.{i}.post_attention_layernorm.weight
    blocks.{i}.ffn.w1|w3|w2        model.layers.{i}.mlp.gate_proj|up_proj|down_proj.weight
    norm, lm_head                  model.norm.weight, lm_head.weight

Both rotate halves for RoPE (GPT-NeoX / HF convention, ``gpt.apply_rope``), so q and k need no
permutation; both compute RMSNorm in fp32 and scale by the gain after casting back; attention
is scaled by 1/sqrt(head_dim); the LM head is untied. Grouped-query attention maps as is: query
head i reads kv head i // (heads / kv_heads) in both (``num_key_value_heads``). The one epsilon of a model
(``layout.model_norm_eps``) is ``rms_norm_eps``.
"""
from __future__ import annotations

import torch

from llmagogy_ds.model.growth import assemble, split
from llmagogy_ds.model.layout import ModelLayout, model_norm_eps, total, weight_specs

_BLOCK = {"attn_norm": "input_layernorm", "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
          "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj", "ffn.w2": "mlp.down_proj"}
_TOP = {"tok_emb": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_name(name: str) -> str:
    """The ``LlamaForCausalLM`` parameter of one of our (assembled) weights."""
    if name in _TOP:
        return f"{_TOP[name]}.weight"
    _, i, rest = name.split(".", 2)  # blocks.{i}.{rest}
    return f"model.layers.{i}.{_BLOCK[rest]}.weight"


def to_hf(sd: dict[str, torch.Tensor], layout: ModelLayout, dtype: torch.dtype = torch.float32) -> dict:
    """Our state dict (generation pieces) → ``LlamaForCausalLM``'s (whole matrices, ``dtype``)."""
    return {hf_name(k): v.detach().to(dtype).contiguous() for k, v in assemble(sd, layout).items()}


def from_hf(hf_sd: dict[str, torch.Tensor], layout: ModelLayout) -> dict[str, torch.Tensor]:
    """``LlamaForCausalLM``'s state dict → ours under ``layout`` (fp32 pieces). Every tensor of
    ``hf_sd`` must be one of the layout's weights with its shape (ValueError naming the first
    one that is not: a bias, a tied head, another shape); RoPE's inv_freq buffers are skipped."""
    shapes = assemble_shapes(layout)
    names = {hf_name(w): w for w in shapes}
    extra = sorted(k for k in set(hf_sd) - set(names) if not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ValueError(f"tensor {extra[0]}: not a weight of our LLaMA (it has no biases; {len(extra)} such "
                         "tensor(s))")
    full = {}
    for hf, ours in names.items():
        if hf not in hf_sd:
            raise ValueError(f"tensor {hf}: missing")
        if tuple(hf_sd[hf].shape) != shapes[ours]:
            raise ValueError(f"tensor {hf}: shape {tuple(hf_sd[hf].shape)}, expected {shapes[ours]}")
        full[ours] = hf_sd[hf].detach().float()
    return split(full, layout)


def assemble_shapes(layout: ModelLayout) -> dict[str, tuple[int, ...]]:
    """The whole shape of every weight of ``layout`` (``{spec name: shape}``)."""
    out = {}
    for w in weight_specs(layout):
        rows = total(w.rows) * w.row_unit
        out[w.name] = (rows,) if w.cols is None else (rows, total(w.cols) * w.col_unit)
    return out


def hf_config(layout: ModelLayout, model_cfg, eos_id: int, dtype: str = "fp32") -> dict:
    """``config.json`` of the ``LlamaForCausalLM`` that ``layout`` is (``model_cfg``: the stage's
    ``ModelConfig``: seq_len, rope_theta, norm_eps, init_std). ``rope_theta`` is written both the
    transformers-4 way and as v5's ``rope_parameters``, so either version reads it."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": layout.vocab, "hidden_size": layout.d_model, "intermediate_size": layout.d_ffn,
        "num_hidden_layers": layout.n_layers, "num_attention_heads": layout.n_heads,
        "num_key_value_heads": layout.n_kv_heads, "head_dim": layout.head_dim, "hidden_act": "silu",
        "max_position_embeddings": model_cfg.seq_len, "rms_norm_eps": model_norm_eps(layout, model_cfg.norm_eps),
        "rope_theta": model_cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": model_cfg.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "initializer_range": model_cfg.init_std, "use_cache": True, "pretraining_tp": 1,
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
    }


# --------------------------------------------------------------------------- what we can import
def _rope_type(cfg: dict) -> str | None:
    """The RoPE variant a config asks for beyond plain RoPE (None: plain)."""
    for key in ("rope_scaling", "rope_parameters"):
        r = cfg.get(key)
        if isinstance(r, dict):
            kind = r.get("rope_type", r.get("type", "default"))
            if kind != "default" or any(k not in ("rope_type", "type", "rope_theta") for k in r):
                return f"{key}: {r}"
    return None


def unsupported(cfg: dict) -> list[str]:
    """``field: why`` for every setting of an HF config our decoder cannot represent."""
    out = []
    arch = cfg.get("architectures") or ["LlamaForCausalLM"]
    if cfg.get("model_type", "llama") != "llama" or arch != ["LlamaForCausalLM"]:
        out.append(f"model_type/architectures: {cfg.get('model_type')!r} {arch}: only LlamaForCausalLM is supported")
    # (field, the value we can represent, why not otherwise); an absent field has LLaMA's default
    for key, ok, why in [
        ("attention_bias", (False,), "attention biases are not supported (our q/k/v/o have none)"),
        ("mlp_bias", (False,), "MLP biases are not supported (our gate/up/down have none)"),
        ("tie_word_embeddings", (False,), "tied input/output embeddings are not supported (our LM head is its "
                                          "own matrix)"),
        ("hidden_act", ("silu", "swish"), "only SwiGLU with silu is supported"),
    ]:
        got = cfg.get(key, ok[0])
        if got not in ok:
            out.append(f"{key}: {got!r}: {why}")
    rope = _rope_type(cfg)
    if rope:
        out.append(f"{rope}: only plain RoPE is supported (no scaling)")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        out.append(f"partial_rotary_factor: {cfg['partial_rotary_factor']}: only full-width RoPE is supported")
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    if isinstance(kv, int) and isinstance(heads, int) and (kv < 1 or heads % kv):
        out.append(f"num_key_value_heads: {kv} does not divide num_attention_heads {heads}")
    hidden = cfg.get("hidden_size")
    if isinstance(hidden, int) and isinstance(heads, int) and heads:
        head_dim = cfg.get("head_dim") or hidden // heads
        if head_dim * heads != hidden:
            out.append(f"head_dim: {head_dim} x num_attention_heads {heads} != hidden_size {hidden}: our "
                       "hidden is heads x head_dim")
    return out


def shape_mismatches(cfg: dict, model_cfg, where: str) -> list[str]:
    """``where.key: ours vs HF`` for every stage-0 model setting that differs from the HF config."""
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    pairs = [("layers", "num_hidden_layers", cfg.get("num_hidden_layers")), ("hidden", "hidden_size", hidden),
             ("heads", "num_attention_heads", heads), ("kv_heads", "num_key_value_heads",
                                                       cfg.get("num_key_value_heads") or heads),
             ("ffn", "intermediate_size", cfg.get("intermediate_size")),
             ("head_dim", "head_dim", cfg.get("head_dim") or (hidden // heads if hidden and heads else None)),
             ("rope_theta", "rope_theta", _theta(cfg)), ("norm_eps", "rms_norm_eps", cfg.get("rms_norm_eps", 1e-6))]
    out = []
    for ours, theirs, value in pairs:
        mine = getattr(model_cfg, ours)
        if ours == "kv_heads" and mine is None:
            mine = model_cfg.heads  # no kv_heads: one per query head
        if value is None or float(mine) != float(value):
            out.append(f"{where}.model.{ours}: {mine}, but the model's {theirs} is {value} (set it to {value})")
    return out


def _theta(cfg: dict) -> float:
    r = cfg.get("rope_parameters")
    if isinstance(r, dict) and "rope_theta" in r:
        return r["rope_theta"]
    return cfg.get("rope_theta", 10000.0)


__all__ = ["hf_name", "to_hf", "from_hf", "hf_config", "unsupported", "shape_mismatches", "assemble_shapes",
           "DTYPES"]
