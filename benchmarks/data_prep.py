"""Pretraining data at scale: preparation speed, warm-cache time to the first step, peak memory.

For generated JSONL corpora (one document of 50-400 words per line) of each size:

- the baseline: a single-process loop of ``tokenizer(batch)`` over the corpus's text (one thread:
  TOKENIZERS_PARALLELISM=false), in tokens/s (measured on its first 50 MB: a rate);
- cold: ``llmexp prepare`` into an empty cache (loading, the preparation steps, tokenizing on every
  core, writing the shards): tokens/s of the tokenization and of the whole command, against the
  baseline;
- warm: ``python -m llmexp stage=pretrain data=files data.path=<corpus> data.concat=true trainer.max_steps=2``
  with that cache: seconds from process start to the first optimizer step (summary.json), and
  the peak RSS of the process while it trains.

    python benchmarks/data_prep.py                    # 50, 200 and 1000 MB
    python benchmarks/data_prep.py --sizes 50 --workdir /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

TARGET_WARM_SECONDS = 20.0
TARGET_RSS_GROWTH_GB = 1.5


def syllable_words(n: int, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + ["th", "st", "er", "an", "on"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> Dict[str, Any]:
    """JSONL documents of 50-400 words drawn (Zipf-like) from 20k made-up words, until the file
    has ``megabytes`` MB."""
    import numpy as np

    if path.is_file() and path.stat().st_size >= megabytes * 1_000_000:
        return {"bytes": path.stat().st_size, "generated_seconds": 0.0}
    started = time.time()
    words = np.array(syllable_words(20_000, seed))
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    target, written, docs = megabytes * 1_000_000, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            lengths = rng.integers(50, 401, size=2000)
            ids = rng.choice(len(words), size=int(lengths.sum()), p=weights)
            chunks = np.split(words[ids], np.cumsum(lengths)[:-1])
            block = "".join('{"text": "' + " ".join(c) + '."}\n' for c in chunks)
            f.write(block)
            written += len(block)
            docs += len(chunks)
    return {"bytes": path.stat().st_size, "documents": docs, "generated_seconds": time.time() - started}


def baseline_tokens_per_second(corpus: Path, limit_bytes: int = 50_000_000) -> Dict[str, float]:
    """One process, one thread: ``tokenizer(batch)`` over batches of 1000 texts."""
    from llmexp.models.tokenizer import load_tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = load_tokenizer(None, None)
    texts, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size >= limit_bytes:
                break
    started, tokens = time.time(), 0
    for i in range(0, len(texts), 1000):
        tokens += sum(len(x) + 1 for x in tokenizer(texts[i:i + 1000], add_special_tokens=False)["input_ids"])
    seconds = time.time() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds, "bytes": size}


def peak_rss_of(proc: subprocess.Popen, out: Dict[str, float]) -> None:
    """Poll the process (and its children) every 50 ms; the largest RSS sum in ``out['peak']``."""
    import psutil

    try:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                out["peak"] = max(out.get("peak", 0), rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
    except psutil.Error:
        pass


def timed(cmd: List[str], env: Dict[str, str], cwd: Path) -> Dict[str, Any]:
    rss: Dict[str, float] = {}
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = threading.Thread(target=peak_rss_of, args=(proc, rss), daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return {"seconds": time.time() - started, "peak_rss_gb": rss.get("peak", 0) / 1e9, "stdout": stdout}


def measure(size_mb: int, workdir: Path) -> Dict[str, Any]:
    corpus = workdir / f"corpus_{size_mb}mb.jsonl"
    made = write_corpus(corpus, size_mb)
    cache = workdir / f"cache_{size_mb}"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "LLMEXP_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    data = ["stage=pretrain", "data=files", f"data.path={corpus}", "data.max_length=512", "data.concat=true"]
    base = baseline_tokens_per_second(corpus)
    cold = timed([sys.executable, "-m", "llmexp", "prepare", *data], env, workdir)
    meta = json.loads(next((cache / "tokens").glob("*/meta.json")).read_text())  # the tokens
    meta["splits"] = json.loads(next((cache / "tokens").glob("*/rows/*/meta.json")).read_text())["splits"]
    tokens = sum(meta["tokenized"].values())  # every token of every document, as the baseline counts
    tokenize_seconds = meta["prepare_seconds"]
    run_dir = workdir / f"run_{size_mb}"
    shutil.rmtree(run_dir, ignore_errors=True)
    warm = timed([sys.executable, "-m", "llmexp", *data, "trainer.max_steps=2", "logger=none", "task.check=none",
                  "trainer.val_check_interval=null", "trainer.limit_val_batches=2", f"hydra.run.dir={run_dir}"],
                 env, workdir)
    summary = json.loads((run_dir / "summary.json").read_text())
    row = {
        "size_mb": size_mb, "corpus_bytes": made["bytes"], "documents": meta["splits"]["train"]["samples"]
        + meta["splits"]["val"]["samples"], "tokens": tokens, "num_proc": meta["num_proc"],
        "baseline_single_process_tokens_per_second": base["tokens_per_second"],
        "cold_tokenize_tokens_per_second": tokens / tokenize_seconds,
        "cold_tokenize_ratio_vs_baseline": tokens / tokenize_seconds / base["tokens_per_second"],
        "cold_prepare_command_seconds": cold["seconds"],
        "cold_prepare_tokens_per_second": tokens / cold["seconds"],
        "cold_prepare_ratio_vs_baseline": tokens / cold["seconds"] / base["tokens_per_second"],
        "cold_prepare_peak_rss_gb": cold["peak_rss_gb"],
        "warm_cache_hit": summary["data_stats"]["cache"]["hit"],
        "training_blocks": meta["splits"]["train"]["rows"],
        "warm_seconds_to_first_step": summary["seconds_to_first_step"],
        "warm_run_seconds": warm["seconds"],
        "warm_peak_rss_gb": warm["peak_rss_gb"],
        "cache_bytes": sum(f.stat().st_size for f in (cache / "tokens").rglob("*") if f.is_file()),
    }
    print(json.dumps(row, indent=1), flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="50,200,1000", help="corpus sizes in MB, comma-separated")
    ap.add_argument("--workdir", default="/tmp/llmexp-data-prep")
    ap.add_argument("--keep", action="store_true", help="keep the corpora and caches")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [measure(int(s), workdir) for s in args.sizes.split(",")]
    smallest = min(rows, key=lambda r: r["size_mb"])
    checks = {
        "warm_first_step_within_20s": all(r["warm_seconds_to_first_step"] <= TARGET_WARM_SECONDS for r in rows),
        "largest_rss_within_1.5GB_of_smallest": max(r["warm_peak_rss_gb"] for r in rows)
        - smallest["warm_peak_rss_gb"] <= TARGET_RSS_GROWTH_GB,
        "every_warm_run_hit_the_cache": all(r["warm_cache_hit"] for r in rows),
    }
    print(f"{'MB':>6} {'tokens':>12} {'base tok/s':>11} {'prep tok/s':>11} {'ratio':>6} {'cold s':>7} "
          f"{'warm 1st step s':>15} {'warm RSS GB':>11}")
    for r in rows:
        print(f"{r['size_mb']:>6} {r['tokens']:>12,} {r['baseline_single_process_tokens_per_second']:>11,.0f} "
              f"{r['cold_tokenize_tokens_per_second']:>11,.0f} {r['cold_tokenize_ratio_vs_baseline']:>6.2f} "
              f"{r['cold_prepare_command_seconds']:>7.1f} {r['warm_seconds_to_first_step']:>15.1f} "
              f"{r['warm_peak_rss_gb']:>11.2f}")
    print("checks:", checks)
    save("data_prep", {"rows": rows, "checks": checks})
    if not args.keep:
        for r in rows:
            shutil.rmtree(workdir / f"cache_{r['size_mb']}", ignore_errors=True)


if __name__ == "__main__":
    main()
