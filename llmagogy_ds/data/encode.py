"""The tokenization worker: one chunk of documents in, their ids (each followed by the
end-of-text id) and lengths out. Imports only numpy and tokenizers, so that a spawned worker
starts in a fraction of a second."""
from __future__ import annotations

import os

import numpy as np

EOS = "<|endoftext|>"

_state: dict = {}


def init(tokenizer_json: str, dtype: str, threads: int | None = 1) -> None:
    """Load the tokenizer once per worker. ``threads``: the Rust encoder's own threads (a
    pool worker uses one: the pool gives the parallelism; None leaves the process as it is)."""
    if threads:
        os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when tokenizers first starts its thread pool
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    _state.update(tok=tok, eos=tok.token_to_id(EOS), dtype=np.dtype(dtype))


def encode(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the documents, each with the end-of-text id appended, as one flat array, and the
    length of each document in it."""
    tok, eos, dtype = _state["tok"], _state["eos"], _state["dtype"]
    # the batch encoder without character offsets (we keep only ids): about 30% faster
    encs = tok.encode_batch_fast(docs) if hasattr(tok, "encode_batch_fast") else tok.encode_batch(docs)
    flat: list[int] = []
    lengths = np.empty(len(encs), dtype=np.int64)
    for i, e in enumerate(encs):
        ids = e.ids  # a new Python list at each access: once
        flat += ids
        flat.append(eos)
        lengths[i] = len(ids) + 1
    return np.array(flat, dtype=dtype), lengths
