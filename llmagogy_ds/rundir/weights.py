"""A stage's weights as a folder of safetensors shards with Hugging Face's index (one reader,
``Weights``, by memory map; one writer, ``ShardWriter``, that several pipeline stages share),
also the files of ``llmagogy export``; older runs' single ``.pt`` files are still read."""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from llmagogy_ds.rundir.files import RunDirError, read_json, write_atomic

INIT, INIT_MOMENTS, MODEL, MOMENTS = "init.pt", "init_moments.pt", "model.pt", "moments.pt"  # runs written before
INIT_DIR, MODEL_DIR, MOMENTS_DIR = "init", "model", "moments"  # the same as safetensors shards, a folder each
WEIGHTS_INDEX = "model.safetensors.index.json"  # Hugging Face's name; written last: the folder is complete
SHARD_BYTES = 1 << 25  # a writer holds one shard file's tensors (32 MiB; twice that while it writes them)
HF_WEIGHTS = "model.safetensors"  # Hugging Face's name of the weights in one file
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def weights_at(sdir: Path, kind: str = MODEL_DIR) -> Path | None:
    """A stage's weights of ``kind`` (``init``, ``model`` or ``moments``): the complete folder of
    safetensors shards, else the single ``.pt`` file of a run written before them, else None."""
    store = Path(sdir) / kind
    if (store / WEIGHTS_INDEX).exists():
        return store
    old = Path(sdir) / f"{kind}.pt"
    return old if old.exists() else None


class Weights(Mapping):
    """Tensors by name, read one at a time by memory map, from a folder of safetensors shards or
    an old ``.pt`` (``torch.load(mmap=True)``): nobody holds a whole model to read a part of it.
    ``slice(name, dim, n, i)`` reads only part ``i`` of ``n`` along ``dim`` (a TP slice)."""

    def __init__(self, path: Path):
        import torch

        self.path = Path(path)
        self._shapes: dict | None = None
        if self.path.is_dir():
            index = read_json(self.path / WEIGHTS_INDEX)
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                raise RunDirError(f"{self.path / WEIGHTS_INDEX}: not a weights index (no weight_map)")
            self.files, self.metadata, self._sd = index["weight_map"], index.get("metadata") or {}, None
        else:
            try:
                sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # not a torch file, truncated, pickled objects that are not tensors
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise RunDirError(f"{self.path}: not a model weights file ({reason})") from None
            if not isinstance(sd, dict):
                raise RunDirError(f"{self.path}: not a model weights file (a {type(sd).__name__}, not a state dict)")
            self.metadata = {k: v for k, v in sd.items() if not torch.is_tensor(v)}  # moments.pt: steps
            self._sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
            self.files = dict.fromkeys(self._sd)

    def _read(self, name: str, part=None):
        """One tensor (or ``part`` of it, a tuple of slices) through a map of its file opened for
        this read only: a mapping kept open would keep every page read so far resident."""
        from safetensors import safe_open

        with safe_open(str(self.path / self.files[name]), framework="pt") as h:
            return h.get_tensor(name) if part is None else h.get_slice(name)[part]

    def __contains__(self, name) -> bool:  # by the index, not by reading the tensor (Mapping's way)
        return name in self.files

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, name: str):
        if name not in self.files:
            raise KeyError(name)
        return self._sd[name] if self._sd is not None else self._read(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._sd is not None:
            return tuple(self._sd[name].shape)
        if self._shapes is None:  # from the shards' headers (nothing is read)
            from safetensors import safe_open

            self._shapes = {}
            for f in set(self.files.values()):
                with safe_open(str(self.path / f), framework="pt") as h:
                    self._shapes.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
        return self._shapes[name]

    def slice(self, name: str, dim: int | None, n: int, i: int):
        """Part ``i`` of ``n`` equal parts of ``name`` along ``dim`` (None or n = 1: whole)."""
        if dim is None or n == 1:
            return self[name]
        if self._sd is not None:
            return self._sd[name].chunk(n, dim=dim)[i].clone()
        shape = self.shape(name)
        index = [slice(None)] * len(shape)
        index[dim] = slice(i * shape[dim] // n, (i + 1) * shape[dim] // n)
        return self._read(name, tuple(index))

    def load(self) -> dict:
        """Every tensor, as a plain dict (a small model, or a consumer that needs it whole)."""
        return {k: self[k].clone() for k in self.files}


class ShardWriter:
    """One writer's tensors into the folder ``store`` as safetensors files ``part-<who>-NNNNN``
    of about ``max_bytes`` each; it holds one file's tensors at a time. Several writers (pipeline
    stages) fill one folder; ``finish_store`` then indexes it."""

    def __init__(self, store: Path, who: str, max_bytes: int = SHARD_BYTES):
        self.store, self.who, self.max_bytes = Path(store), who, max_bytes
        self.buf: dict = {}
        self.size, self.n = 0, 0

    def add(self, name: str, t) -> None:
        t = t.detach().to("cpu").clone().contiguous()  # a copy: params may be views of one flat buffer
        n = t.numel() * t.element_size()
        if self.buf and self.size + n > self.max_bytes:  # files of at most max_bytes (a bigger tensor alone)
            self.flush()
        self.buf[name] = t
        self.size += n

    def flush(self) -> None:
        if not self.buf:
            return
        from safetensors.torch import save_file

        buf = self.buf
        write_atomic(self.store / f"part-{self.who}-{self.n:05d}.safetensors",
                     lambda tmp: save_file(buf, str(tmp), metadata={"format": "pt"}))  # transformers wants "format"
        self.buf, self.size, self.n = {}, 0, self.n + 1

    close = flush


def begin_store(store: Path) -> Path:
    """An empty folder for a new set of shards (what a torn earlier attempt left is replaced)."""
    import shutil

    shutil.rmtree(store, ignore_errors=True)
    Path(store).mkdir(parents=True)
    return Path(store)


def finish_store(store: Path, expected=None, metadata: dict | None = None, hf_names: bool = False) -> Path:
    """Index every shard of ``store`` (after all writers closed) into ``model.safetensors.index.json``,
    written last: a folder without it is incomplete and never read. ``expected``: the names it must hold.
    ``hf_names``: the files get transformers' names first (``model.safetensors`` alone, without an
    index; or ``model-0000k-of-0000n.safetensors``)."""
    from safetensors import safe_open

    store = Path(store)
    parts = sorted(store.glob("part-*.safetensors"))
    if hf_names:
        names = [HF_WEIGHTS] if len(parts) == 1 else \
            [f"model-{k:05d}-of-{len(parts):05d}.safetensors" for k in range(1, len(parts) + 1)]
        parts = [part.rename(store / name) for part, name in zip(parts, names)]
    weight_map, total = {}, 0
    for f in parts:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                weight_map[k] = f.name
                total += math.prod(sl.get_shape()) * DTYPE_BYTES[sl.get_dtype()]
    if expected is not None and set(expected) != set(weight_map):
        missing, extra = sorted(set(expected) - set(weight_map)), sorted(set(weight_map) - set(expected))
        raise RunDirError(f"{store}: the shards do not hold the expected tensors (missing: {missing[:4]}, "
                          f"unexpected: {extra[:4]})")
    if not (hf_names and len(parts) == 1):
        write_atomic(store / WEIGHTS_INDEX, {"metadata": {"total_size": total, **(metadata or {})},
                                             "weight_map": weight_map})
    return store


def write_store(store: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """A whole (small) state dict as a complete folder of shards, by one process."""
    begin_store(store)
    w = ShardWriter(store, "000")
    for k, v in tensors.items():
        w.add(k, v)
    w.close()
    return finish_store(store, tensors.keys(), metadata)


def write_hf_weights(out: Path, tensors: dict, max_bytes: int) -> Path:
    """``tensors`` as transformers writes and reads them, into ``out`` beside other files:
    ``model.safetensors``, or files of at most ``max_bytes`` (a bigger tensor alone) and the
    index. Weight files of an earlier export there are replaced."""
    out = Path(out)
    for old in [*out.glob("model-*-of-*.safetensors"), *out.glob("part-*.safetensors"), out / HF_WEIGHTS,
                out / WEIGHTS_INDEX]:
        old.unlink(missing_ok=True)  # a re-export may shard differently
    w = ShardWriter(out, "hf", max_bytes)
    for k, v in tensors.items():
        w.add(k, v)
    w.close()
    return finish_store(out, tensors.keys(), hf_names=True)


__all__ = ["weights_at", "Weights", "ShardWriter", "begin_store", "finish_store", "write_store", "write_hf_weights",
           "INIT", "INIT_MOMENTS", "MODEL", "MOMENTS", "INIT_DIR", "MODEL_DIR", "MOMENTS_DIR", "WEIGHTS_INDEX",
           "SHARD_BYTES", "HF_WEIGHTS"]
