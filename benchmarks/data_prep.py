"""Data preparation at scale (issue 10): ``llmagogy tokenize`` on one large text source, next to
the raw limit of the ``tokenizers`` batch encoder on the same documents, same machine, same run.

    python benchmarks/data_prep.py --corpus /work/shared/corpus [--sizes 100 400] [--workers 1 2]
                                   [--raw-size 100] [--work /tmp/data_prep] [--out docs/benchmarks]

* The source: every ``*.txt`` of ``--corpus`` concatenated (paragraphs kept), repeated until it
  holds ``SIZE`` MB, written under ``--work`` (never into the repository).
* The tokenizer: an 8k byte-level BPE trained on a spread 20 MB sample of the source (as
  ``llmagogy`` trains one), shared by every measurement.
* ``llmagogy tokenize CONFIG --workers N`` in a fresh process with an empty cache: wall time
  from start to exit (Python and megatron imports included), tokens/s, and the peak of the summed
  RSS of the process and its workers (sampled every 0.2 s).
* The raw limit: one process, ``RAYON_NUM_THREADS=N``, ``Tokenizer.encode_batch_fast`` (the
  library's fastest batch encoder, the one the workers call) over the same
  documents in the same 1 MB batches, ids discarded; only the encode calls are timed (reading the
  file is not), so it is an upper bound for any pipeline with N encoding threads.

Writes data_prep.json into --out and prints a table (docs/benchmarks/data_prep.json holds the three
runs of docs/benchmarks.md, made by hand with --sizes/--workers/--out as said there).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parents[1]

RAW = r"""
import os, sys, time
from pathlib import Path
from tokenizers import Tokenizer
from llmagogy_ds.data.reading import txt_documents
tok = Tokenizer.from_file(sys.argv[1])
n = t = 0
batch, size = [], 0
for d in txt_documents(Path(sys.argv[2])):
    batch.append(d); size += len(d)
    if size >= 1 << 20:
        t0 = time.perf_counter(); n += sum(len(e.ids) + 1 for e in tok.encode_batch_fast(batch)); t += time.perf_counter() - t0
        batch, size = [], 0
if batch:
    t0 = time.perf_counter(); n += sum(len(e.ids) + 1 for e in tok.encode_batch_fast(batch)); t += time.perf_counter() - t0
print(n, t)
"""


def build_source(corpus: Path, mb: int, out: Path) -> Path:
    path = out / f"source_{mb}mb.txt"
    if path.exists() and path.stat().st_size >= mb << 20:
        return path
    texts = [f.read_text(encoding="utf-8").strip() for f in sorted(corpus.rglob("*.txt"))]
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < mb << 20:
            for t in texts:
                f.write(t + "\n\n")
                written += len(t.encode("utf-8")) + 2
    return path


def peak_rss(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(seconds, peak summed RSS in GB of the process tree, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc, peak = psutil.Process(p.pid), 0
    while p.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    out = p.stdout.read()
    if p.returncode:
        raise RuntimeError(f"{cmd} failed ({p.returncode})")
    return time.perf_counter() - t0, peak / 1e9, out


def tokenize_run(py: str, env: dict, source: Path, mb: int, n: int, tok_path: Path, work: Path) -> dict:
    """``llmagogy tokenize`` in a fresh process with an empty cache."""
    d = Path(tempfile.mkdtemp(dir=work))
    cfg = d / "cfg.yaml"
    cfg.write_text(json.dumps({
        "run": {"name": "bench", "seed": 1, "data_cache": str(d / "cache")},
        "tokenizer": {"path": str(tok_path)},
        "defaults": {"model": {"head_dim": 16, "seq_len": 128}, "train": {"micro_batch": 1, "nproc": 1}},
        "stages": [{"name": "all", "data": [{"path": str(source)}],
                    "model": {"layers": 1, "hidden": 32, "heads": 2, "ffn": 64}, "train": {"tokens": 1000}}]}))
    secs, rss, _ = peak_rss([py, "-m", "llmagogy_ds.cli", "tokenize", str(cfg), "--run-dir", str(d / "run"),
                             "--workers", str(n)], env)
    meta = json.loads(next((d / "cache").glob("*/meta.json")).read_text())
    tokens = meta["counts"]["train"]["tokens"] + meta["counts"]["heldout"]["tokens"]
    subprocess.run(["rm", "-rf", str(d)], check=False)
    return {"what": "llmagogy tokenize", "mb": mb, "workers": n, "tokens": tokens, "seconds": secs,
            "tokens_per_s": tokens / secs, "peak_rss_gb": rss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", type=Path, default=Path(os.environ.get("LLMAGOGY_CORPUS", HERE.parent / "shared" /
                                                                       "corpus")))
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 400], help="source sizes in MB")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--raw-size", type=int, default=100, help="MB of the source the raw limit is measured on")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llmagogy_data_prep")
    ap.add_argument("--out", type=Path, default=HERE / "docs" / "benchmarks")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    py = sys.executable

    from llmagogy_ds.config import DataSource
    from llmagogy_ds.data.corpus import train_tokenizer
    from llmagogy_ds.data.reading import sample_documents

    sources = {mb: build_source(args.corpus, mb, args.work) for mb in sorted(set(args.sizes + [args.raw_size]))}
    tok_path = args.work / f"tokenizer_{args.vocab}.json"
    if not tok_path.exists():
        tok = train_tokenizer(sample_documents(DataSource(str(sources[max(sources)])), 0, 20_000_000), args.vocab)
        tok.save(str(tok_path))
    rows = []
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for n in args.workers:  # the raw limit right before the runs with as many workers: the load of a shared
        # machine changes over minutes, so each ratio compares measurements taken close together
        secs, rss, out = peak_rss([py, "-c", RAW, str(tok_path), str(sources[args.raw_size])],
                                  {**env, "RAYON_NUM_THREADS": str(n), "TOKENIZERS_PARALLELISM": "true"})
        tokens, enc_s = out.split()
        rows.append({"what": "raw encode_batch_fast", "mb": args.raw_size, "workers": n, "tokens": int(tokens),
                     "seconds": float(enc_s), "tokens_per_s": int(tokens) / float(enc_s), "peak_rss_gb": rss})
        print(rows[-1], flush=True)
        for mb in args.sizes:
            rows.append(tokenize_run(py, env, sources[mb], mb, n, tok_path, args.work))
            print(rows[-1], flush=True)
    raw = {r["workers"]: r["tokens_per_s"] for r in rows if r["what"].startswith("raw")}
    print(f"\n{'what':<20} {'MB':>5} {'workers':>7} {'tokens':>12} {'s':>8} {'tokens/s':>10} {'÷ raw':>6} {'peak RSS':>9}")
    for r in rows:
        r["vs_raw"] = r["tokens_per_s"] / raw[r["workers"]] if r["workers"] in raw else None
        print(f"{r['what']:<20} {r['mb']:>5} {r['workers']:>7} {r['tokens']:>12,} {r['seconds']:>8.1f} "
              f"{r['tokens_per_s']:>10,.0f} {r['vs_raw'] or 0:>6.2f} {r['peak_rss_gb']:>8.2f}G")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_prep.json").write_text(json.dumps({"rows": rows, "cpus": os.cpu_count(),
                                                         "load_before": os.getloadavg()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
