"""Stage 0 from a local Hugging Face LLaMA (``stages[0].init: {hf: PATH}``): its weights become
generation 0 and its tokenizer the run's; the curriculum then grows it as usual.

The config names the model's tokenizer as the run's: ``tokenizer: {path: PATH/tokenizer.json}``,
and stage 0's ``model`` block must describe the model (layers, hidden, heads, ffn, head_dim,
rope_theta, norm_eps = rms_norm_eps). ``check_init`` says every difference and every setting
our decoder cannot represent (biases, tied embeddings, RoPE scaling, grouped-query attention,
another activation), naming the field, before any compute (``prepare_hf`` in ``llmagogy run``).

The run's tokenizer is the model's, converted once into ``RUN/tokenizer.json``: our data and
scorers separate documents with ``<|endoftext|>``, so the model's end-of-text token is renamed
to it when it has another name (``</s>``: same id, same embedding row); its post-processor (a
BOS in front of every encoding) is dropped, since packing puts the separator in; and unused
special tokens fill the vocabulary up to ``vocab_size`` when the embedding has spare rows.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from llmagogy_ds import rundir as RD
from llmagogy_ds.config import ConfigError, CurriculumConfig
from llmagogy_ds.data import corpus as D
from llmagogy_ds.interop.hf import from_hf, shape_mismatches, unsupported
from llmagogy_ds.model.layout import ModelLayout

TOKENIZER = "tokenizer.json"


def read_config(path) -> dict:
    f = Path(path) / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{f}: cannot read the model's config ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{f}: not a JSON object")
    return cfg


def init_errors(cfg: CurriculumConfig) -> list[str]:
    """Everything wrong with ``stages[0].init.hf`` for this config (empty: it imports)."""
    st = cfg.stages[0]
    path = st.init.hf
    if not path:
        return []
    where = f"stages[0] ({st.name})"
    hf = read_config(path)
    errs = [f"{where}.init.hf ({path}/config.json) {e}" for e in unsupported(hf)]
    errs += shape_mismatches(hf, st.model, where)
    tok = Path(path) / TOKENIZER
    if not tok.is_file():
        errs.append(f"{where}.init.hf: {path} has no {TOKENIZER} (the run's tokenizer is the model's)")
    elif cfg.tokenizer.path is None or Path(cfg.tokenizer.path).resolve() != tok.resolve():
        errs.append(f"tokenizer: a run whose stage 0 starts from init.hf uses that model's tokenizer: set "
                    f"tokenizer: {{path: {tok}}}")
    return errs


def check_init(cfg: CurriculumConfig) -> None:
    errs = init_errors(cfg)
    if errs:
        raise ConfigError(errs, cfg.source_path)


def prepare_hf(cfg: CurriculumConfig, run_dir) -> None:
    """Before any compute (``llmagogy run``/``prepare``, ahead of the data): the init model's
    config checked, the run's tokenizer converted from it, and ``export:`` able to run."""
    check_init(cfg)
    missing = [m for m in ("transformers", "safetensors") if importlib.util.find_spec(m) is None]
    if cfg.export is not None and cfg.export.hf and missing:
        raise ConfigError(f"export.hf: needs {' and '.join(missing)}: pip install -e '.[hf]'", cfg.source_path)
    ensure_run_tokenizer(cfg, run_dir)


# --------------------------------------------------------------------------- the tokenizer
def _token_name(t) -> str | None:
    return t.get("content") if isinstance(t, dict) else t


def hf_tokenizer(path):
    """The tokenizer of HF model dir ``path`` as our data needs it (module doc)."""
    from tokenizers import Tokenizer

    path = Path(path)
    try:
        tj = json.loads((path / TOKENIZER).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path / TOKENIZER}: cannot read ({e})") from None
    hf = read_config(path)
    tc = path / "tokenizer_config.json"
    tcfg = json.loads(tc.read_text()) if tc.is_file() else {}
    tj["post_processor"] = None  # packing separates documents; no BOS per encoding
    tok = Tokenizer.from_str(json.dumps(tj))
    if tok.token_to_id(D.EOS) is None:
        name = _token_name(tcfg.get("eos_token"))
        eos_id = hf.get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
        if name is None and eos_id is not None:
            name = tok.id_to_token(eos_id)
        if name is None or tok.token_to_id(name) is None:
            raise ConfigError(f"{path}: the model has no end-of-text token ({D.EOS} or an eos_token in "
                              "tokenizer_config.json / eos_token_id in config.json) to separate documents with")
        tok = Tokenizer.from_str(json.dumps(_rename(tj, name, tok.token_to_id(name))))
    vocab = hf.get("vocab_size")
    have = tok.get_vocab_size()
    if isinstance(vocab, int) and have < vocab:  # spare embedding rows: unused tokens keep the ids aligned
        tok.add_special_tokens([f"<|unused_{k}|>" for k in range(vocab - have)])
    if isinstance(vocab, int) and tok.get_vocab_size() != vocab:
        raise ConfigError(f"{path}: the tokenizer has {tok.get_vocab_size()} tokens, the model's vocab_size is "
                          f"{vocab}")
    return tok


def _rename(tj: dict, name: str, idx: int) -> dict:
    """tokenizer.json with token ``name`` (id ``idx``) renamed to <|endoftext|>, a special token."""
    vocab = tj.get("model", {}).get("vocab")
    if isinstance(vocab, dict) and name in vocab:
        vocab[D.EOS] = vocab.pop(name)
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        for entry in vocab:
            if entry[0] == name:
                entry[0] = D.EOS
    added = tj.setdefault("added_tokens", [])
    for t in added:
        if t.get("content") == name:
            t.update(content=D.EOS, special=True)
            break
    else:
        added.append({"id": idx, "content": D.EOS, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
    return tj


def ensure_run_tokenizer(cfg: CurriculumConfig, run_dir) -> bool:
    """Write ``RUN/tokenizer.json`` from ``stages[0].init.hf`` if the run has none yet (so the
    data preparation finds it); True if written."""
    path = RD.tokenizer_path(run_dir)
    hf = cfg.stages[0].init.hf
    if not hf or path.exists():
        return False
    RD.write_atomic(path, hf_tokenizer(hf).to_str(pretty=True))
    return True


# --------------------------------------------------------------------------- the weights
def load_hf_weights(path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF model dir: ``model.safetensors`` (or its shards and index), else
    ``pytorch_model.bin`` (or its shards)."""
    path = Path(path)
    for index, single, safe in (("model.safetensors.index.json", "model.safetensors", True),
                                ("pytorch_model.bin.index.json", "pytorch_model.bin", False)):
        files = [path / single] if (path / single).is_file() else []
        if (path / index).is_file():
            files = sorted({path / f for f in json.loads((path / index).read_text())["weight_map"].values()})
        if files:
            out = {}
            for f in files:
                if safe:
                    from safetensors.torch import load_file

                    out.update(load_file(str(f)))
                else:
                    out.update(torch.load(f, map_location="cpu", weights_only=True))
            return out
    raise ConfigError(f"{path}: no model.safetensors or pytorch_model.bin (or their index)")


def stage0_weights(cfg: CurriculumConfig, layout: ModelLayout) -> dict[str, torch.Tensor]:
    """The stage-0 state dict, under our layout names, of ``stages[0].init.hf``: checked first
    (``check_init``), then mapped name for name (``hf.from_hf``)."""
    check_init(cfg)
    path = cfg.stages[0].init.hf
    try:
        return from_hf(load_hf_weights(path), layout)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"stages[0].init.hf ({path}): {e}", cfg.source_path) from None


__all__ = ["read_config", "init_errors", "check_init", "prepare_hf", "hf_tokenizer", "ensure_run_tokenizer",
           "load_hf_weights", "stage0_weights"]
