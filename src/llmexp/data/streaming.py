"""Stream a local corpus without preparing it: documents read file by file, shuffled through a
seeded buffer, tokenized as they come, cut into rows, grouped into optimizer-step windows.

For a corpus that should not be copied (``data.streaming=true``). Everything that decides the
order is in the stream's state: the epoch's file order (seeded), the position in the current file,
the documents waiting in the shuffle buffer, the buffer's random state and, in concat mode, the
tokens carried into the next block. The state after each window is kept, and the checkpoint holds
the one after the last window trained on, so a run killed and resumed trains on exactly the rows
the uninterrupted run would have (tested after SIGKILL).

Ranks and DataLoader workers split the documents round-robin before tokenizing (document i goes to
part i mod (ranks x workers)), so they read disjoint data. Each window carries its part's state to
the training process, which keeps the state of every part after the last window trained on; a
resumed run restores each part and rotates the workers so that the next window comes from the part
that would have made it. The first ``data.max_val_samples`` documents (in file order) are the
validation rows and never trained on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from torch.utils.data import IterableDataset

from llmexp.data.sources import TEXT_SUFFIXES, _data_suffix, data_files, not_utf8, open_binary
from llmexp.errors import UserError


def read_documents(path: str, text_field: str) -> Iterator[str]:
    """The documents of one file, in order: JSONL lines' ``text_field``, .txt lines, Parquet rows."""
    suffix = _data_suffix(Path(path))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=[text_field], batch_size=1024):
            yield from batch.column(0).to_pylist()
        return
    with open_binary(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:  # (a traceback from the loader, exit 1)
                raise not_utf8(path, n, raw, e) from None
            if suffix in TEXT_SUFFIXES:
                if line.strip():
                    yield line.rstrip("\n")
            elif line.strip():
                yield json.loads(line)[text_field]


class DocumentStream:
    """Windows of rows from the corpus, resumable from ``state``."""

    def __init__(self, data_cfg, tokenizer, window: int, seed: int, part: int = 0, parts: int = 1,
                 state: Optional[Dict[str, Any]] = None):
        self.cfg, self.tokenizer, self.window, self.seed = data_cfg, tokenizer, window, seed
        self.part, self.parts = part, parts
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

    def has_training_documents(self) -> bool:
        """Whether any document follows the validation ones."""
        return self._val_boundary() != (len(self.files), 0)

    def training_documents(self, up_to: int) -> int:
        """How many documents follow the validation ones, counted no further than ``up_to`` (the
        stream is read that far only)."""
        count, skip = 0, self.n_val
        for f in self.files:
            for _ in read_documents(f, self.text_field):
                if skip:
                    skip -= 1
                    continue
                count += 1
                if count >= up_to:
                    return count
        return count

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
            rng.seed(self.seed + 7919 * self.part)
        else:
            rng.setstate((st["rng"][0], tuple(st["rng"][1]), st["rng"][2]))
        size = self.cfg.shuffle_buffer
        pending: List[List[int]] = []
        while True:
            order = self.file_order(st["epoch"])
            counter_at_start, whole_pass = st["counter"], st["file"] == 0 and st["doc"] == 0
            while st["file"] < len(order):
                index = order[st["file"]]
                for doc, text in enumerate(read_documents(self.files[index], self.text_field)):
                    if doc < st["doc"]:
                        continue
                    st["doc"] = doc + 1
                    if self._is_validation(index, doc):
                        continue
                    mine = st["counter"] % self.parts == self.part
                    st["counter"] += 1
                    if not mine:
                        continue
                    st["buffer"].append(self.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
                    if len(st["buffer"]) < size:
                        continue
                    yield from self._windows(st["buffer"].pop(rng.randrange(len(st["buffer"]))), pending, rng)
                st["file"], st["doc"] = st["file"] + 1, 0
            while st["buffer"]:  # the epoch's last documents, in random order
                yield from self._windows(st["buffer"].pop(rng.randrange(len(st["buffer"]))), pending, rng)
            if whole_pass and st["counter"] - counter_at_start < self.parts:  # nothing for a part: ever
                raise UserError(f"data.path: {self.cfg.path!r} has {st['counter'] - counter_at_start} training "
                                f"documents (after the first data.max_val_samples={self.n_val}), fewer than the "
                                f"{self.parts} readers that share it; add documents or lower data.max_val_samples")
            st["epoch"], st["file"], st["doc"] = st["epoch"] + 1, 0, 0

    def _windows(self, ids: List[int], pending: List[List[int]], rng: random.Random):
        """The windows one document completes (its rows join ``pending``, the rows not yet in a
        window; a window's snapshot is taken when ``pending`` has just become that window)."""
        for row in self._rows_of(ids):
            pending.append(row)
            if len(pending) == self.window:
                window = self._emit(pending, rng)
                pending.clear()
                yield window

    def _emit(self, rows: List[List[int]], rng: random.Random):
        """One window and this part's state after it (what a checkpoint after this step saves)."""
        st = self.state
        st["windows"] += 1
        version, internal, gauss = rng.getstate()
        st["rng"] = [version, list(internal), gauss]
        snapshot = {**st, "buffer": list(st["buffer"]), "carry": list(st["carry"])}
        return [{"input_ids": r, "labels": list(r)} for r in rows], snapshot


class IterableWindows(IterableDataset):
    """The stream as a torch IterableDataset: each DataLoader worker reads its own part; an item
    is (one optimizer step's rows, its part, the part's state after it)."""

    def __init__(self, data_cfg, tokenizer, window: int, seed: int, rank: int, world: int, workers: int,
                 resume: Optional[Dict[str, Any]] = None):
        self.args = (data_cfg, tokenizer, window, seed)
        self.rank, self.world, self.workers = rank, world, workers
        self.resume = resume or {"states": [None] * workers, "windows": 0}

    def __iter__(self):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.resume["windows"]) % self.workers  # the part whose window comes next
        part = self.rank * self.workers + logical
        state = self.resume["states"][logical]
        stream = DocumentStream(*self.args, part=part, parts=self.world * self.workers,
                                state=dict(state) if state else None)
        for rows, snapshot in stream:
            yield rows, logical, snapshot


class StreamCollator:
    """The window's micro-batches (as WindowCollator makes them), the first carrying the part's
    state under ``_stream`` for the data module to keep (and remove) before the step."""

    def __init__(self, window_collator):
        self.window_collator = window_collator

    def __call__(self, item):
        rows, logical, snapshot = item
        batches = self.window_collator(rows)
        batches[0]["_stream"] = (logical, snapshot)
        return batches
