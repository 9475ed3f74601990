"""Text corpora tokenized once, in parallel, into memory-mapped token shards that every later run
reads without holding the corpus in memory.

Preparation (``llmexp prepare``, or the first run that needs it) encodes the prepared rows in
batches through the fast tokenizer in forked processes on every core (each a contiguous range of
the memory-mapped Arrow rows, writing its ids straight to a part file) and writes, per split, one
flat file of token ids (uint16 when the vocabulary fits, else uint32) and the rows training reads
as segments of that file:

- ``documents`` (``data.packing=false``): one row per document, cut to ``data.max_length`` as
  ``data.overlong`` says (truncate, drop, or split into chunks);
- ``packed`` (``data.packing=true``): documents packed into rows of ``max_length`` tokens by best
  fit, with position ids restarting per document and no loss across documents (as for small data);
- ``concat`` (``data.concat=true``): documents joined with eos and cut into ``max_length`` blocks
  (the "group texts" of pretraining scripts; attention crosses documents).

Two levels, so that what changes only the rows does not tokenize again: the token files live in
``tokens/<token key>/`` (keyed by the data config less its row settings, the source files' sizes and
modification times, the tokenizer's fingerprint and llmexp's format version), each row layout in
``tokens/<token key>/rows/<row key>/`` (the whole key: also ``data.max_length``, ``data.packing``,
``data.concat`` and ``data.overlong``). A second run, a resumed run, every sweep trial and every
rank finds them (ranks wait on a lock while one builds) and skips loading and tokenizing the
corpus; a run with another ``max_length`` or row mode only cuts new rows from the same tokens.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from llmexp.data.encode import IGNORE_INDEX

FORMAT_VERSION = 3  # 3: data.steps' normalize keeps whitespace (the rows it made before differ)
# The data settings that decide only how tokenized documents become rows (not the tokens).
ROW_FIELDS = ("max_length", "packing", "concat", "overlong")
SPLITS = ("train", "val")


def cache_root() -> Path:
    return Path(os.environ.get("LLMEXP_CACHE", Path.home() / ".cache" / "llmexp")) / "tokens"


def row_mode(data_cfg) -> str:
    return "concat" if data_cfg.concat else "packed" if data_cfg.packing else "documents"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the token ids: the fast tokenizer's whole definition
    (vocabulary, merges, normalizer, pre-tokenizer) and the eos id appended to each document."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{type(tokenizer).__name__}|{tokenizer.eos_token_id}|{spec}".encode()).hexdigest()


def source_fingerprint(data_cfg, prepared=None) -> Optional[List[Any]]:
    """The source's identity: each file's path, size and modification time (files and local
    directories: known without reading them), the bundled dataset's name with the version of the
    code that generates it (its options and seed are in the data config), or, for a source known
    only once loaded (a hub id), the loaded rows' content fingerprints from ``datasets``. None when
    it cannot be known yet."""
    import llmexp

    if data_cfg.source == "bundled":
        from llmexp.plugins.registry import lookup

        owner = lookup("llmexp_datasets", data_cfg.name, "data.name").owner
        return ["bundled", data_cfg.name, llmexp.__version__, str(owner), getattr(owner, "version", None)]
    path = Path(os.path.expanduser(data_cfg.path)) if data_cfg.path else None
    if data_cfg.source == "files" and path is not None:
        from llmexp.data.sources import data_files

        return _file_stats([Path(f) for f in data_files(data_cfg.path)])
    if data_cfg.source == "hf" and path is not None and path.is_dir():
        from llmexp.data.sources import local_dataset_files

        saved = (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
        return _file_stats(sorted(f for f in path.rglob("*") if f.is_file()) if saved else local_dataset_files(path))
    if prepared is not None and prepared.train is not None:
        return ["loaded", prepared.train._fingerprint, getattr(prepared.val, "_fingerprint", None)]
    return None


def _file_stats(files: List[Path]) -> List[Any]:
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def key_inputs(data_cfg, tokenizer, stage: str, prepared=None) -> Optional[Dict[str, Any]]:
    """Everything the cached rows depend on (meta.json keeps it, to explain a miss)."""
    source = source_fingerprint(data_cfg, prepared)
    if source is None:
        return None
    config = {k: v for k, v in asdict(data_cfg).items() if k not in ("num_workers", "num_proc")}
    return {"version": FORMAT_VERSION, "stage_encoding": "text" if stage in ("pretrain", "sft") else stage,
            "data": config, "source": source, "tokenizer": tokenizer_fingerprint(tokenizer)}


def token_inputs(inputs: Dict[str, Any]) -> Dict[str, Any]:
    """The part of ``key_inputs`` the token files depend on: all but the row settings."""
    return {**inputs, "data": {k: v for k, v in inputs["data"].items() if k not in ROW_FIELDS}}


def _hash(inputs: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_key(data_cfg, tokenizer, stage: str, prepared=None) -> Optional[str]:
    """The rows' key (None while the source cannot be known without loading it)."""
    inputs = key_inputs(data_cfg, tokenizer, stage, prepared)
    return None if inputs is None else _hash(inputs)


class TokenRows:
    """Rows of one split, read from the memory-mapped token file: ``{"input_ids", "labels"}`` (and
    ``position_ids`` when packed), as the stage's collator takes them. Indexing by a slice (a
    rank's share of the validation rows) gives a view."""

    def __init__(self, rows_dir: Path, split: str, mode: str, index: Optional[np.ndarray] = None):
        self.dir, self.split, self.mode = Path(rows_dir), split, mode
        tokens_dir = self.dir.parent.parent  # tokens/<token key>/rows/<row key>
        meta = json.loads((tokens_dir / f"{split}.json").read_text())
        self.tokens = np.memmap(tokens_dir / f"{split}.tokens", dtype=meta["dtype"], mode="r",
                                shape=(meta["tokens"],)) if meta["tokens"] else np.zeros(0, dtype=meta["dtype"])
        self.segments = np.load(self.dir / f"{split}.segments.npy", mmap_mode="r")
        self.row_offsets = np.load(self.dir / f"{split}.rows.npy", mmap_mode="r")
        self.index = index

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else len(self.row_offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return TokenRows(self.dir, self.split, self.mode, np.arange(len(self))[i] if self.index is None
                             else self.index[i])
        row = int(self.index[i]) if self.index is not None else int(i)
        segs = self.segments[self.row_offsets[row]:self.row_offsets[row + 1]]
        pieces = [np.asarray(self.tokens[s:s + n], dtype=np.int64) for s, n in segs]
        ids = np.concatenate(pieces).tolist() if len(pieces) > 1 else pieces[0].tolist()
        if self.mode != "packed":
            return {"input_ids": ids, "labels": list(ids)}
        labels, positions = [], []
        for p in pieces:  # the first token of a document is never a target of the one before
            labels += [IGNORE_INDEX] + p[1:].tolist()
            positions += list(range(len(p)))
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


_JOB: Dict[str, Any] = {}  # what forked tokenizer workers inherit (no pickling of the dataset)


def _tokenize_range(task: Tuple[int, int, int]) -> np.ndarray:
    """Tokenize documents [start, stop) of the job's dataset into part file ``index``; return
    their lengths (eos included)."""
    index, start, stop = task
    ds, tokenizer, dtype = _JOB["ds"], _JOB["tokenizer"], _JOB["dtype"]
    eos, lengths = tokenizer.eos_token_id, []
    with open(_JOB["out"] / f".{_JOB['split']}.part{index:05d}", "wb") as f:
        for i in range(start, stop, 1000):
            ids = tokenizer(ds[i:min(i + 1000, stop)]["text"], add_special_tokens=False)["input_ids"]
            for x in ids:
                x.append(eos)
            lengths.append(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths[-1].sum()))
            f.write(flat.tobytes())
    return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)


def _write_tokens(ds, tokenizer, dtype, out: Path, split: str, num_proc: int) -> np.ndarray:
    """Tokenize one split in ``num_proc`` forked processes (each a contiguous range of documents,
    batches of 1000 through the fast tokenizer), write its ids to ``out/<split>.tokens`` in order,
    return each document's length. A progress bar shows on a terminal."""
    import multiprocessing as mp

    from tqdm.auto import tqdm

    n = len(ds)
    chunks = max(1, min(num_proc * 16, -(-n // 1000)))
    bounds = [round(n * k / chunks) for k in range(chunks + 1)]
    tasks = [(k, bounds[k], bounds[k + 1]) for k in range(chunks)]
    _JOB.update(ds=ds, tokenizer=tokenizer, dtype=dtype, out=out, split=split)
    bar = tqdm(total=n, desc=f"tokenize {split}", unit="doc", disable=None)
    try:
        if num_proc > 1:
            with mp.get_context("fork").Pool(num_proc) as pool:
                lengths = []
                for (k, a, b), got in zip(tasks, pool.imap(_tokenize_range, tasks)):
                    lengths.append(got)
                    bar.update(b - a)
        else:
            lengths = []
            for task in tasks:
                lengths.append(_tokenize_range(task))
                bar.update(task[2] - task[1])
    finally:
        bar.close()
        _JOB.clear()
    with open(out / f"{split}.tokens", "wb") as whole:
        for k in range(chunks):
            part = out / f".{split}.part{k:05d}"
            with open(part, "rb") as f:
                shutil.copyfileobj(f, whole, 16 << 20)
            part.unlink()
    return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)


def _rows(lengths: np.ndarray, data_cfg, split: str) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """(segments (start, length), row offsets into the segments, stats) for the split's documents,
    as ``llmexp.data.module.fit_length`` and ``pack`` make them for small data."""
    from llmexp.data.packing import best_fit_decreasing

    n = data_cfg.max_length
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else np.zeros(0, np.int64)
    stats: Dict[str, Any] = {"truncated": 0, "dropped_overlong": 0, "dropped_no_target": 0, "split_chunks": 0,
                             "samples": int(len(lengths))}
    if data_cfg.concat:
        total = int(lengths.sum())
        blocks = total // n
        segs = np.stack([np.arange(blocks, dtype=np.int64) * n, np.full(blocks, n, dtype=np.int64)], axis=1)
        stats.update(blocks=blocks, tokens_dropped_at_end=total - blocks * n)
        return segs.reshape(-1, 2), np.arange(blocks + 1, dtype=np.int64), stats
    over = lengths > n
    if data_cfg.overlong == "drop":
        keep = ~over
        stats["dropped_overlong"] = int(over.sum())
        segs = np.stack([starts[keep], lengths[keep]], axis=1)
    elif data_cfg.overlong == "split":
        pieces = -(-lengths // n)
        doc = np.repeat(np.arange(len(lengths)), pieces)
        within = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        seg_start = starts[doc] + within * n
        seg_len = np.minimum(n, lengths[doc] - within * n)
        keep = (seg_len > 1) | ~over[doc]  # as fit_length: a 1-token chunk has nothing to learn
        stats["split_chunks"] = int((keep & over[doc]).sum())
        segs = np.stack([seg_start[keep], seg_len[keep]], axis=1)
    else:
        stats["truncated"] = int(over.sum())
        segs = np.stack([starts, np.minimum(lengths, n)], axis=1)
    targets = segs[:, 1] >= 2  # a row needs a next token to predict
    stats["dropped_no_target"] = int((~targets).sum())
    segs = segs[targets].astype(np.int64).reshape(-1, 2)
    if not len(segs):
        from llmexp.errors import UserError

        raise UserError(f"data.max_length: every {split} sample was removed ({stats}); "
                        + length_advice(lengths, data_cfg))
    tokens = int(segs[:, 1].sum())
    if not data_cfg.packing:
        return segs, np.arange(len(segs) + 1, dtype=np.int64), stats
    bins = best_fit_decreasing(segs[:, 1].tolist(), n)
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(segs))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in bins])]).astype(np.int64)
    stats["packing_efficiency"] = tokens / (len(bins) * n) if bins else 0.0
    return segs[order], offsets, stats


def length_advice(lengths: np.ndarray, data_cfg) -> str:
    """What keeps documents that data.max_length removed (as data.module.length_advice says for rows)."""
    n, lo, hi = data_cfg.max_length, int(lengths.min()), int(lengths.max())
    span = f"samples have {lo}-{hi} tokens"
    if hi < 2:
        return "no sample has a token to learn from at any length; check the data's text"
    return (f"data.overlong={data_cfg.overlong} drops every sample longer than data.max_length={n} ({span}); raise "
            f"data.max_length (to {hi} to keep every sample whole) or use data.overlong=truncate (keeps each "
            f"sample's first data.max_length tokens), data.overlong=split, or data.concat=true")


def build_tokens(prepared, tokenizer, out: Path, num_proc: Optional[int] = None,
                 inputs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Tokenize ``prepared`` (its train and val datasets) into ``out``: per split the flat token
    file and each document's length; returns the meta."""
    started = time.time()
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    num_proc = num_proc or (os.cpu_count() or 1 if len(prepared.train) >= 5000 else 1)
    meta: Dict[str, Any] = {"dtype": np.dtype(dtype).name, "num_proc": num_proc, "preparation": prepared.log,
                            "key_inputs": inputs, "tokenized": {}}
    for split in SPLITS:
        lengths = _write_tokens(getattr(prepared, split), tokenizer, dtype, out, split, num_proc)
        np.save(out / f"{split}.lengths.npy", lengths)
        tokens = int((out / f"{split}.tokens").stat().st_size // np.dtype(dtype).itemsize)
        (out / f"{split}.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "tokens": tokens}))
        meta["tokenized"][split] = tokens  # every document's every token
    meta["prepare_seconds"] = time.time() - started
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def build_rows(tokens_dir: Path, data_cfg, out: Path, inputs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Cut the documents of ``tokens_dir`` into rows as ``data_cfg`` says, into ``out``; returns the meta."""
    started = time.time()
    meta: Dict[str, Any] = {"mode": row_mode(data_cfg), "splits": {}, "key_inputs": inputs}
    for split in SPLITS:
        lengths = np.load(tokens_dir / f"{split}.lengths.npy")
        segs, offsets, stats = _rows(lengths, data_cfg, split)
        np.save(out / f"{split}.segments.npy", segs)
        np.save(out / f"{split}.rows.npy", offsets)
        stats.update(rows=len(offsets) - 1, tokens=int(segs[:, 1].sum()) if len(segs) else 0,
                     tokenized=int(lengths.sum()))
        meta["splits"][split] = stats
    meta["rows_seconds"] = time.time() - started
    meta["tokens"] = {s: meta["splits"][s]["tokens"] for s in SPLITS}  # in rows (after max_length)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _built_once(final: Path, build) -> Tuple[Dict[str, Any], bool]:
    """(meta, hit): ``final``'s meta, or ``build(tmp)`` renamed to ``final`` under a lock (so that
    concurrent ranks and trials build it once, and no reader sees it half-written)."""
    from filelock import FileLock

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f"{final.name}.lock")):
        if (final / "meta.json").is_file():
            return json.loads((final / "meta.json").read_text()), True
        tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            meta = build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, final)
    return meta, False


def prepare_cached(inputs: Dict[str, Any], load_prepared, tokenizer, data_cfg, num_proc: Optional[int] = None
                   ) -> Tuple[Path, Dict[str, Any], bool]:
    """(rows dir, meta, hit): the cached rows for ``inputs`` (key_inputs), tokenized from
    ``load_prepared()`` when the tokens are missing and cut into rows when the rows are."""
    tokens_dir = cache_root() / _hash(token_inputs(inputs))
    token_meta, tokens_hit = _built_once(
        tokens_dir, lambda out: build_tokens(load_prepared(), tokenizer, out, num_proc, token_inputs(inputs)))
    rows_dir = tokens_dir / "rows" / _hash(inputs)
    row_meta, hit = _built_once(rows_dir, lambda out: build_rows(tokens_dir, data_cfg, out, inputs))
    return rows_dir, {**token_meta, **row_meta, "tokens_hit": tokens_hit}, hit


def split_rows(cache_dir: Path, meta: Dict[str, Any]) -> Dict[str, TokenRows]:
    return {s: TokenRows(cache_dir, s, meta["mode"]) for s in SPLITS}


def summary_of(cache_dir: Path, meta: Dict[str, Any], hit: bool, key: Optional[str]) -> Dict[str, Any]:
    """PreparedData.cache: what the data module reads, and what summary.json's data_stats.cache says."""
    return {"dir": str(cache_dir), "hit": hit, "tokens_hit": meta["tokens_hit"], "fingerprint": key,
            "mode": meta["mode"], "dtype": meta["dtype"], "num_proc": meta["num_proc"],
            "prepare_seconds": meta["prepare_seconds"], "rows_seconds": meta["rows_seconds"],
            "tokens": meta["tokens"], "splits": meta["splits"]}


def peeked_format(data_cfg) -> Optional[str]:
    """The data's format when it can be known without loading it (the first row's columns)."""
    from llmexp.data import formats
    from llmexp.data.fields import field_map
    from llmexp.data.peek import peek_columns

    if data_cfg.format != "auto":
        return data_cfg.format
    columns = peek_columns(data_cfg)
    return formats.detect_format(columns, field_map(data_cfg.fields)) if columns else None
