"""The data module: raw rows -> prepared, split, encoded (and packed) -> micro-batch windows.

Raw loading and preparation need no tokenizer, so a run can check the data (and train a
tokenizer on it) before any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from llmexp.config.schema import DataConfig, TrainerConfig
from llmexp.data import formats, mixture, prepare, sources
from llmexp.data.fields import (check_field_map, diverging_pairs, extract_implicit_prompt, field_map,
                                 rename_fields)
from llmexp.data.layouts import read_layout
from llmexp.data.collate import WindowCollator
from llmexp.data.encode import IGNORE_INDEX
from llmexp.data.packing import pack
from llmexp.data.rows import check_rows, row_number
from llmexp.data.sampler import WindowSampler
from llmexp.errors import UserError


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with canonical column names (None when read from the token cache)
    val: Any
    format: str
    log: List[Dict[str, Any]] = field(default_factory=list)
    cache: Optional[Dict[str, Any]] = None  # a text corpus's token cache (llmexp.data.token_cache.summary_of)

    def texts(self):
        """Every string in the training rows (for training a tokenizer on the run's data)."""
        for row in self.train:
            for value in row.values():
                yield from _strings(value)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        yield from _strings(value.get("content"))


def load_examples(cfg: DataConfig, stage: str) -> PreparedData:
    """Load, map fields, check the format for ``stage``, prepare and split."""
    if cfg.source == "mixture":  # each source's own data.fields are applied as it is loaded
        train, val = mixture.load_mixture(cfg), None
    else:
        train, val = sources.load_raw(cfg)
        fields = field_map(cfg.fields)
        check_field_map(fields, train.column_names, cfg.path or cfg.name)
        train = read_layout(rename_fields(train, fields))
        val = read_layout(rename_fields(val, fields)) if val is not None else None
    train, val = extract_implicit_prompt(train), extract_implicit_prompt(val)
    diverging = diverging_pairs(train)
    fmt = cfg.format if cfg.format != "auto" else formats.detect_format(train.column_names, {})
    if fmt is not None and fmt != "auto":
        missing = [c for c in formats.FORMAT_COLUMNS[fmt] if c not in train.column_names]
        if missing:
            raise UserError(f"data.format={fmt} needs columns {missing}, not found in {cfg.path or cfg.name!r} "
                            f"(columns: {', '.join(train.column_names)}); map them with data.fields.<name>=<column>")
    problem = formats.format_problem(stage, fmt, train.column_names, {}, f"data {cfg.path or cfg.name!r}",
                                     train[0] if len(train) else None)
    if problem:
        raise UserError(f"data: {problem}")
    try:
        empty = check_rows(train, fmt, sources.described(cfg), sources.row_places(cfg) or row_number)
    except UserError:
        conflict = sources.json_kind_conflict(cfg)  # the cause of rows that all look wrong, said instead
        if conflict:
            raise UserError(f"data.path: {conflict}") from None
        raise
    if val is not None:
        check_rows(val, fmt, f"{sources.described(cfg)} split {cfg.validation_split!r}")
    mixed = mixture.source_counts(train) if cfg.source == "mixture" else None
    train, log = prepare.run_steps(train, cfg)
    for entry in (empty, diverging):
        if entry:
            log.insert(0, entry)
    if val is not None:
        val, _ = prepare.run_steps(val, cfg)
    train, val = prepare.split(train, val, cfg)
    log.append({"step": "split", "train_rows": len(train), "val_rows": len(val)})
    if cfg.concat and fmt != "text":
        raise UserError(f"data.concat: joins plain-text documents into blocks, and {cfg.path or cfg.name!r} has format "
                        f"{fmt!r}; use data.packing=true for rows of several samples, or data.concat=false")
    if cfg.source == "mixture":
        train, val, counts = mixture.count_and_untag(mixed, train, val, cfg)
        log.insert(0, counts)
    return PreparedData(train=train, val=val, format=fmt, log=log)


def where_rows_went(log: List[Dict[str, Any]]) -> str:
    """'of 500 rows, dedup removed 492, 1 held out for validation': what preparation took, from its
    log (a row-count error said only how many were left)."""
    steps = [e for e in log if "rows_in" in e]
    removed = [f"{e['step']} removed {e['rows_in'] - e['rows_out']}" for e in steps if e["rows_in"] > e["rows_out"]]
    split = next((e for e in log if e.get("step") == "split"), None)
    if split and split.get("val_rows"):
        removed.append(f"{split['val_rows']} held out for validation")
    return f"of {steps[0]['rows_in']} rows, {', '.join(removed)}" if steps and removed else ""


def fit_length(encoded: List[Dict[str, List[int]]], cfg: DataConfig, fmt: str, split: str,
               dropped: Optional[List[int]] = None, context: Optional[int] = None):
    """Apply data.overlong to samples longer than data.max_length; drop samples with no targets
    (their indices appended to ``dropped``)."""
    out, stats = [], {"truncated": 0, "dropped_overlong": 0, "dropped_no_target": 0, "split_chunks": 0}
    n = cfg.max_length
    dropped = [] if dropped is None else dropped
    for i, s in enumerate(encoded):
        if "labels" not in s:  # prompts for rollouts: keep the end, where the question is asked
            if len(s["input_ids"]) > n:
                s = {**s, "input_ids": s["input_ids"][-n:]}
                stats["truncated"] += 1
            out.append(s)
            continue
        if _length(s) > n:
            if cfg.overlong == "drop":
                stats["dropped_overlong"] += 1
                dropped.append(i)
                continue
            if cfg.overlong == "split" and fmt == "text":
                for i in range(0, len(s["input_ids"]), n):
                    chunk = {k: v[i : i + n] for k, v in s.items()}
                    if len(chunk["input_ids"]) > 1:
                        out.append(chunk)
                        stats["split_chunks"] += 1
                continue
            s = {k: v[:n] if isinstance(v, list) else v for k, v in s.items()}
            stats["truncated"] += 1
        if not all(any(t != IGNORE_INDEX for t in s[k][1:]) for k in s if k.endswith("labels")):
            stats["dropped_no_target"] += 1
            dropped.append(i)
            continue
        out.append(s)
    if not out:
        raise UserError(f"data.max_length: every {split} sample was removed ({stats}); "
                        + length_advice(encoded, cfg, fmt, context))
    return out, stats


def _target_start(sample: Dict[str, Any]) -> float:
    """The fewest tokens a sample can be cut to and still keep a token to learn from (every
    labels sequence of it: preference samples hold two); inf when it has none at any length."""
    need = 0
    for key, labels in sample.items():
        if key.endswith("labels"):
            first = next((i for i, t in enumerate(labels) if i >= 1 and t != IGNORE_INDEX), None)
            if first is None:
                return float("inf")
            need = max(need, first + 1)
    return need


def length_advice(encoded: List[Dict[str, List[int]]], cfg: DataConfig, fmt: str,
                  context: Optional[int] = None) -> str:
    """What keeps samples when data.max_length removed them all: the advice fits the setting that
    removed them (suggesting data.overlong=truncate when it is set, or cannot help, helps no one),
    and the model's ``context`` (a data.max_length past it, advised, was then refused)."""
    n, lengths = cfg.max_length, [_length(s) for s in encoded]
    needs = [x for x in map(_target_start, encoded) if x != float("inf")]
    if not needs:
        return "no sample has a token to learn from at any length; check the data's completions / assistant turns"
    span = f"samples have {min(lengths)}-{max(lengths)} tokens"
    if context and min(needs) > context:
        return (f"every sample's prompt is longer than the model's {context} positions ({span}), so no length the "
                f"model takes keeps a token to learn from; shorten the prompts (keep a conversation's last turns) "
                f"or leave those rows out")
    if cfg.overlong == "drop" and any(len_ > n for len_ in lengths):
        keep = " or use data.overlong=truncate (keeps each sample's first data.max_length tokens)" \
            if min(needs) <= n else ""
        return (f"data.overlong=drop drops every sample longer than data.max_length={n} ({span}); raise "
                f"data.max_length (to {max(lengths)} to keep every sample whole){keep}")
    shortest = min(needs) - 1
    return (f"data.overlong={cfg.overlong} cuts each sample to its first data.max_length={n} tokens, and every "
            f"prompt is at least that long (the shortest is {shortest} tokens; {span}), so no token to learn from is "
            f"left; raise data.max_length above {shortest} (to {max(lengths)} to keep every sample whole), or shorten "
            f"the prompts")


def _length(sample: Dict[str, Any]) -> int:
    """The longest token sequence of a sample (preference samples hold two)."""
    return max(len(v) for k, v in sample.items() if k.endswith("input_ids"))


def count_tokens(rows: List[Dict[str, Any]]) -> int:
    return sum(len(v) for r in rows for k, v in r.items() if k.endswith("input_ids"))


class StageDataModule(L.LightningDataModule):
    """Encodes with the stage's encoder and collates windows of micro-batches with its collator."""

    def __init__(self, prepared: PreparedData, data_cfg: DataConfig, trainer_cfg: TrainerConfig, stage):
        super().__init__()
        self.prepared, self.cfg, self.tcfg, self.stage = prepared, data_cfg, trainer_cfg, stage
        self.train_rows: Optional[List[Dict[str, List[int]]]] = None
        self.val_rows: Optional[List[Dict[str, List[int]]]] = None
        self.val_dropped: frozenset = frozenset()  # indices of prepared.val rows no validation sample holds
        self.stats: Dict[str, Any] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_rows is not None:
            return
        if self.cfg.streaming:
            self._stream_validation()
            return
        if self.prepared.cache is not None:
            self._from_cache()
        else:
            self._encode()
        window = self.tcfg.micro_batch_size * self.tcfg.grad_accum * (self.trainer.world_size if self.trainer else 1)
        if len(self.train_rows) < window:
            lost = where_rows_went(self.prepared.log)
            packed = self.stats.get("train", {}).get("samples") if self.cfg.packing else None
            if packed:  # the rows counted are packed ones: say so, and what else gives more of them
                lost = (f"{packed} training samples packed into rows of data.max_length={self.cfg.max_length}; "
                        f"a smaller data.max_length or data.packing=false gives more rows"
                        + (f"; {lost}" if lost else ""))
            raise UserError(f"trainer.micro_batch_size: one optimizer step needs {window} training rows "
                            f"(micro_batch_size x grad_accum) but the data has {len(self.train_rows)}"
                            f"{f' ({lost})' if lost else ''}; lower trainer.micro_batch_size or trainer.grad_accum"
                            f"{', or give more (distinct) rows' if lost else ''}")

    def _from_cache(self) -> None:
        """A text corpus: rows read from the memory-mapped token cache, nothing held in memory."""
        from pathlib import Path

        from llmexp.data.token_cache import TokenRows

        cache = self.prepared.cache
        for split in ("train", "val"):
            setattr(self, f"{split}_rows", TokenRows(Path(cache["dir"]), split, cache["mode"]))
            self.stats[split] = dict(cache["splits"][split])
        self.stats["cache"] = {k: v for k, v in cache.items() if k != "splits"}

    def _stream_validation(self) -> None:
        """Streaming: the validation rows are the corpus's first documents, tokenized here; training
        rows come from the stream (train_dataloader)."""
        from llmexp.data.streaming import DocumentStream

        probe = DocumentStream(self.cfg, self.stage.tokenizer, 1, self.tcfg.seed)
        eos, n = self.stage.tokenizer.eos_token_id, self.cfg.max_length
        documents = probe.validation_documents()
        if not probe.has_training_documents():  # the stream would read the corpus forever for a row
            raise UserError(f"data.max_val_samples: {self.cfg.path!r} holds {len(documents)} documents, and the first "
                            f"{self.cfg.max_val_samples} are validation rows, so none is left to train on; lower "
                            f"data.max_val_samples (say {max(1, len(documents) // 10)}) or add documents")
        ids = [self.stage.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in documents]
        if self.cfg.concat:
            flat = [t for x in ids for t in x]
            ids = [flat[i:i + n] for i in range(0, len(flat) - n + 1, n)]
        rows = [{"input_ids": x[:n], "labels": x[:n]} for x in ids if len(x) >= 2]
        if not rows:
            raise UserError(f"data.max_val_samples: the first {self.cfg.max_val_samples} documents of "
                            f"{self.cfg.path!r} make no validation row; raise data.max_val_samples")
        self.train_rows, self.val_rows = [], rows
        self.stats = {"streaming": {"files": len(probe.files), "shuffle_buffer": self.cfg.shuffle_buffer,
                                    "val_documents": len(documents)},
                      "val": {"rows": len(rows), "tokens": sum(len(r["input_ids"]) for r in rows)}}
        following = probe.training_documents(up_to=len(documents))
        if following < len(documents):  # a small corpus: most of it held out, which nothing said
            share = len(documents) / (len(documents) + following)
            note = (f"data.streaming: validation holds the first {len(documents)} documents of {self.cfg.path!r}, "
                    f"{share:.0%} of its {len(documents) + following}; lower data.max_val_samples (say "
                    f"{max(1, (len(documents) + following) // 20)}) to train on more of it")
            self.stats["streaming"].update(training_documents=following, warning=note)
            from rich.console import Console

            Console(stderr=True).print(f"[bold yellow]warning[/]: {note}", highlight=False)
        self._resume_state = getattr(self, "_resume_state", None)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Streaming: keep the state a training window carries (its part's, after it), in the
        training process, right before the step trains on it."""
        if isinstance(batch, list) and batch and isinstance(batch[0], dict) and "_stream" in batch[0]:
            logical, snapshot = batch[0].pop("_stream")
            self._trained["states"][logical] = snapshot
            self._trained["windows"] += 1
        return batch

    def state_dict(self) -> Dict[str, Any]:
        """Streaming: every part's state after the last window trained on, of every rank (each
        rank's stream is its own, and only rank 0 writes the checkpoint): for exact resume."""
        trained = getattr(self, "_trained", None)
        if not trained:
            return {}
        mine = {**trained, "states": list(trained["states"])}
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            every: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
            return {"stream_ranks": every}
        return {"stream_ranks": [mine]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        ranks = state_dict.get("stream_ranks")
        if ranks:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            if rank >= len(ranks):
                raise UserError(f"resume: the stream was saved by {len(ranks)} process(es) and this run has more; "
                                f"resume with the devices it was trained with")
            self._resume_state = ranks[rank]

    def _encode(self) -> None:
        encode = self.stage.encoder(self.prepared.format)
        for split, ds in (("train", self.prepared.train), ("val", self.prepared.val)):
            encoded = [encode(row) for row in ds]
            dropped: List[int] = []
            rows, stats = fit_length(encoded, self.cfg, self.prepared.format, split, dropped,
                                     getattr(getattr(getattr(self.stage, "model", None), "config", None),
                                             "max_position_embeddings", None))
            if split == "val":
                self.val_dropped = frozenset(dropped)
            tokens = count_tokens(rows)
            if self.cfg.packing:
                rows = pack(rows, self.cfg.max_length)
                stats["packing_efficiency"] = tokens / (len(rows) * self.cfg.max_length)
            stats.update(samples=len(encoded), rows=len(rows), tokens=tokens)
            self.stats[split] = stats
            setattr(self, f"{split}_rows", rows)

    def _data_parallel_rank(self):
        """(rank, size) among data-parallel replicas; tensor-parallel peers share their data."""
        if self.trainer is None:
            return 0, 1
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return kwargs.get("rank", 0), kwargs.get("num_replicas", 1)

    def train_dataloader(self) -> DataLoader:
        """Windows in a seeded order that resumes at the trainer's current optimizer step."""
        trainer = self.trainer
        rank, world = self._data_parallel_rank()
        if self.cfg.streaming:
            return self._stream_dataloader(rank, world)
        sampler = WindowSampler(len(self.train_rows), self.tcfg.micro_batch_size * self.tcfg.grad_accum,
                                self.tcfg.seed, start_step=trainer.global_step if trainer else 0,
                                rank=rank, world_size=world)
        # A private generator: creating the iterator must not draw from the global RNG, which a
        # resumed run restores to its state at the checkpoint.
        return DataLoader(self.train_rows, batch_sampler=sampler, generator=torch.Generator(),
                          collate_fn=WindowCollator(self.stage.collate, self.tcfg.micro_batch_size),
                          num_workers=self.cfg.num_workers, persistent_workers=self.cfg.num_workers > 0)

    def _stream_dataloader(self, rank: int, world: int) -> DataLoader:
        from llmexp.data.streaming import IterableWindows, StreamCollator

        workers = max(1, self.cfg.num_workers)
        resume = self._resume_state
        if self.trainer is not None and self.trainer.global_step and resume is None:
            raise UserError("resume: this checkpoint holds no stream position (saved without data.streaming); "
                            "resume with the data settings it was trained with")
        if resume is not None and len(resume["states"]) != workers:
            raise UserError(f"data.num_workers: the stream was saved with {len(resume['states'])} reading "
                            f"part(s) per rank; resume with data.num_workers={len(resume['states'])}")
        self._trained = {"states": list(resume["states"]) if resume else [None] * workers,
                         "windows": resume["windows"] if resume else 0}
        windows = IterableWindows(self.cfg, self.stage.tokenizer, self.tcfg.micro_batch_size * self.tcfg.grad_accum,
                                  self.tcfg.seed, rank, world, workers, resume)
        return DataLoader(windows, batch_size=None, num_workers=self.cfg.num_workers,
                          collate_fn=StreamCollator(WindowCollator(self.stage.collate, self.tcfg.micro_batch_size)))

    def val_dataloader(self) -> DataLoader:
        """Each rank evaluates its own slice (no padding), and the stage sums across ranks."""
        rank, world = self._data_parallel_rank()
        return DataLoader(self.val_rows[rank::world], batch_size=self.tcfg.val_batch_size, shuffle=False,
                          collate_fn=self.stage.collate, num_workers=self.cfg.num_workers)
