"""People's judgements of a served model's answers, kept as the data the preference stages read.

A choice between two answers is a row of ``pairs.jsonl`` (prompt/chosen/rejected: stage=dpo,
simpo, orpo, rm); a thumbs up or down on one answer, and "both bad" / "both good" on a pair, are
rows of ``ratings.jsonl`` (prompt/completion/label: stage=kto). Every row also says when, on
which model and from which page or client it was judged, plus the prompt file's own columns
(the bundled skill's ``solution``), so a task checker can score the prompts later.

Writes are safe under concurrent clients and a killed server: a writer holds an exclusive lock
(``fcntl.flock``, across the server's processes), writes the whole new file beside the old one,
fsyncs it and renames it over the old one. A reader sees the file before or after a judgement,
never a part of one; the cost is a copy of the file per judgement (milliseconds for the
thousands of judgements people give).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

PAIRS, RATINGS = "pairs.jsonl", "ratings.jsonl"
CHOICES = ("a", "b", "both_bad", "both_good")
LABELS = {"up": True, "down": False}


class BadJudgement(ValueError):
    """A judgement the server refuses (HTTP 400); the message names the field and what it takes."""

    @property
    def param(self) -> Optional[str]:
        """The field the message starts with ("choice: ..."), for the error's ``param``."""
        found = re.match(r"([A-Za-z_][\w\[\]]*):", str(self))
        return found.group(1) if found else None


def _text(value: Any, name: str, may_be_empty: bool = False) -> str:
    if not isinstance(value, str) or not (may_be_empty or value.strip()):
        raise BadJudgement(f"{name}: must be a {'' if may_be_empty else 'non-empty '}string")
    return value


def judgement_rows(body: Any, extra: Optional[Dict[str, Any]] = None) -> Dict[str, List[Dict[str, Any]]]:
    """The rows one judgement adds, by file name. ``body`` is the page's (or a client's) JSON:

    - ``{"kind": "pair", "prompt", "answers": [a, b], "choice": "a"|"b"|"both_bad"|"both_good"}``
    - ``{"kind": "rating", "prompt", "answer", "label": "up"|"down"}``

    ``extra`` (when, which model, the prompt's columns) is added to every row."""
    if not isinstance(body, dict):
        raise BadJudgement("the body must be a JSON object with kind, prompt and the answers")
    kind = body.get("kind")
    if kind not in ("pair", "rating"):
        raise BadJudgement(f"kind: must be 'pair' or 'rating', got {kind!r}")
    prompt = [{"role": "user", "content": _text(body.get("prompt"), "prompt")}]
    meta = {"judged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "judgement": uuid.uuid4().hex,
            **(extra or {})}

    def answer(text: str) -> List[Dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    if kind == "pair":
        answers = body.get("answers")
        if not isinstance(answers, list) or len(answers) != 2:
            raise BadJudgement("answers: must be a list of the two answers shown")
        a, b = (_text(x, f"answers[{i}]", True) for i, x in enumerate(answers))
        choice = body.get("choice")
        if choice not in CHOICES:
            raise BadJudgement(f"choice: must be one of {', '.join(CHOICES)}, got {choice!r}")
        same = a.strip() == b.strip()
        if choice in ("a", "b"):
            if same:  # a pair that prefers an answer to itself teaches dpo and rm nothing
                raise BadJudgement("choice: the two answers are the same, so neither is better; rate the answer "
                                   "(kind 'rating') or sample two answers again")
            chosen, rejected = (a, b) if choice == "a" else (b, a)
            if not chosen.strip():  # DPO later warned of a chosen answer with no text
                raise BadJudgement(f"answers[{0 if choice == 'a' else 1}]: the chosen answer is empty; choose "
                                   f"the other, or say both_bad")
            return {PAIRS: [{"prompt": prompt, "chosen": answer(chosen), "rejected": answer(rejected), **meta}]}
        label = choice == "both_good"
        if label and not (a.strip() and b.strip()):
            raise BadJudgement("choice: both_good with an empty answer would teach the model to say nothing; say "
                               "which is better, or both_bad")
        return {RATINGS: [{"prompt": prompt, "completion": answer(x), "label": label, **meta}
                          for x in ((a,) if same else (a, b))]}  # one rating where the two answers are one
    if body.get("label") not in LABELS:  # a rating
        raise BadJudgement(f"label: must be 'up' or 'down', got {body.get('label')!r}")
    if body["label"] == "up" and isinstance(body.get("answer"), str) and not body["answer"].strip():
        raise BadJudgement("answer: an empty answer rated up would teach the model to say nothing; rate it down")
    return {RATINGS: [{"prompt": prompt, "completion": answer(_text(body.get("answer"), "answer", True)),
                       "label": LABELS[body["label"]], **meta}]}


@dataclass
class FeedbackLog:
    """The feedback directory: ``pairs.jsonl`` and ``ratings.jsonl``, appended safely."""

    directory: Path

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)

    def path(self, name: str) -> Path:
        return self.directory / name

    def append(self, rows_by_file: Dict[str, List[Dict[str, Any]]]) -> Dict[str, int]:
        """Add the rows, each file replaced whole (see the module docstring); returns the count of
        rows in every file afterwards."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for name, rows in rows_by_file.items():
                self._replace(self.path(name), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            return self.counts()

    def counts(self) -> Dict[str, int]:
        return {name: count_rows(self.path(name)) for name in (PAIRS, RATINGS)}

    @staticmethod
    def _replace(path: Path, added: str) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as out:
            if path.exists():
                with open(path, "rb") as old:
                    while chunk := old.read(1 << 20):
                        out.write(chunk)
            out.write(added.encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)


def count_rows(path: Path) -> int:
    """Judgement rows in a feedback file (0 when it does not exist)."""
    if not Path(path).is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def feedback_record(data_cfg, prepared) -> Dict[str, Any]:
    """summary.json's ``feedback`` for a run trained on judgements (``data=feedback``): the file(s)
    they came from, how many judgements those hold, and how many rows the run used."""
    if data_cfg.name != "feedback" or not data_cfg.path:
        return {}
    from llmexp.data.sources import data_files

    files = [str(Path(f).resolve()) for f in data_files(data_cfg.path)]
    return {"feedback": {"files": files, "judgements": sum(count_rows(Path(f)) for f in files),
                         "train_rows": len(prepared.train), "val_rows": len(prepared.val or [])}}
