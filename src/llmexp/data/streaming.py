"""Stream a local corpus without preparing it: documents read file by file, shuffled through a
seeded buffer, tokenized as they come, cut into rows, grouped into optimizer-step windows.

For a corpus that should not be copied (``data.streaming=true``). Everything that decides the
order is in the stream's state: the epoch's file order (seeded), the position in the current file,
the documents waiting in the shuffle buffer, the buffer's random state and, in concat mode, the
tokens carried into the next block. The state after each window is kept, and the checkpoint holds
the one after the last window trained on, so a run killed and resumed trains on exactly the rows
the uninterrupted run would have (tested after SIGKILL).

Ranks split the documents round-robin before tokenizing (document i goes to rank i mod world), so
they read disjoint data. The first ``data.max_val_samples`` documents (in file order) are the
validation rows and never trained on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from torch.utils.data import IterableDataset

from llmexp.data.sources import TEXT_SUFFIXES, _data_suffix, data_files, open_binary


def read_documents(path: str, text_field: str) -> Iterator[str]:
    """The documents of one file, in order: JSONL lines' ``text_field``, .txt lines, Parquet rows."""
    suffix = _data_suffix(Path(path))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=[text_field], batch_size=1024):
            yield from batch.column(0).to_pylist()
        return
    with open_binary(path) as f:
        for raw in f:
            line = raw.decode("utf-8")
            if suffix in TEXT_SUFFIXES:
                if line.strip():
                    yield line.rstrip("\n")
            elif line.strip():
                yield json.loads(line)[text_field]


class DocumentStream:
    """Windows of rows from the corpus, resumable from ``state``."""

    def __init__(self, data_cfg, tokenizer, window: int, seed: int, rank: int = 0, world: int = 1,
                 state: Optional[Dict[str, Any]] = None):
        self.cfg, self.tokenizer, self.window, self.seed = data_cfg, tokenizer, window, seed
        self.rank, self.world = rank, world
        self.files = data_files(data_cfg.path)
        self.text_field = (data_cfg.fields.text if getattr(data_cfg.fields, "text", None) else "text")
        self.n_val = data_cfg.max_val_samples or 0
        self.state = state or {"epoch": 0, "file": 0, "doc": 0, "counter": 0, "buffer": [], "carry": [],
                               "rng": None, "windows": 0}
        self.snapshots: Dict[int, Dict[str, Any]] = {}

    def file_order(self, epoch: int) -> List[int]:
        order = list(range(len(self.files)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def validation_documents(self) -> List[str]:
        out: List[str] = []
        for f in self.files:
            for text in read_documents(f, self.text_field):
                if len(out) >= self.n_val:
                    return out
                out.append(text)
        return out

    def _is_validation(self, file_index: int, doc: int) -> bool:
        """Whether (file, document) is among the first n_val documents in file order."""
        return (file_index, doc) < self._val_end

    def _val_boundary(self):
        """(file, document) where training documents start: reads only as far as that."""
        left = self.n_val
        for i, f in enumerate(self.files):
            seen = 0
            for _ in read_documents(f, self.text_field):
                if seen == left:
                    return (i, left)
                seen += 1
            left -= seen
        return (len(self.files), 0)

    def _rows_of(self, ids: List[int]) -> Iterator[List[int]]:
        """Rows of one document: itself cut to max_length, or (concat) the blocks it completes; the
        tokens not yet in a block stay in the state, so a snapshot between two blocks is exact."""
        n = self.cfg.max_length
        if self.cfg.concat:
            self.state["carry"] = self.state["carry"] + ids
            while len(self.state["carry"]) >= n:
                row, self.state["carry"] = self.state["carry"][:n], self.state["carry"][n:]
                yield row
        elif len(ids) >= 2:
            yield ids[:n]

    def __iter__(self) -> Iterator[List[Dict[str, List[int]]]]:
        self._val_end = self._val_boundary()
        st, eos = self.state, self.tokenizer.eos_token_id
        rng = random.Random()
        if st["rng"] is None:
            rng.seed(self.seed + 7919 * self.rank)
        else:
            rng.setstate((st["rng"][0], tuple(st["rng"][1]), st["rng"][2]))
        size = self.cfg.shuffle_buffer
        pending: List[List[int]] = []
        while True:
            order = self.file_order(st["epoch"])
            while st["file"] < len(order):
                index = order[st["file"]]
                for doc, text in enumerate(read_documents(self.files[index], self.text_field)):
                    if doc < st["doc"]:
                        continue
                    st["doc"] = doc + 1
                    if self._is_validation(index, doc):
                        continue
                    mine = st["counter"] % self.world == self.rank
                    st["counter"] += 1
                    if not mine:
                        continue
                    st["buffer"].append(self.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
                    if len(st["buffer"]) < size:
                        continue
                    out = st["buffer"].pop(rng.randrange(len(st["buffer"])))
                    for row in self._rows_of(out):
                        pending.append(row)
                        if len(pending) == self.window:
                            yield self._emit(pending, rng)
                            pending = []
                st["file"], st["doc"] = st["file"] + 1, 0
            while st["buffer"]:  # the epoch's last documents, in random order
                out = st["buffer"].pop(rng.randrange(len(st["buffer"])))
                for row in self._rows_of(out):
                    pending.append(row)
                    if len(pending) == self.window:
                        yield self._emit(pending, rng)
                        pending = []
            st["epoch"], st["file"], st["doc"] = st["epoch"] + 1, 0, 0

    def _emit(self, rows: List[List[int]], rng: random.Random) -> List[Dict[str, List[int]]]:
        """One window; the state after it is kept (a checkpoint taken after this step saves it)."""
        st = self.state
        st["windows"] += 1
        version, internal, gauss = rng.getstate()
        st["rng"] = [version, list(internal), gauss]
        self.snapshots[st["windows"]] = {**st, "buffer": list(st["buffer"]), "carry": list(st["carry"])}
        for old in [k for k in self.snapshots if k < st["windows"] - 8]:
            del self.snapshots[old]
        return [{"input_ids": r, "labels": list(r)} for r in rows]

    def state_after(self, windows: int) -> Optional[Dict[str, Any]]:
        return self.snapshots.get(windows)


class IterableWindows(IterableDataset):
    """The stream as a torch IterableDataset (one item: one optimizer step's rows)."""

    def __init__(self, stream: DocumentStream):
        self.stream = stream

    def __iter__(self):
        return iter(self.stream)
