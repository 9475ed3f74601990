"""What the compared runs' models said: each run's recorded greedy answers (answers.jsonl,
task.log_answers) at the validation of the model it exported (its last, or its best with
trainer.keep_best), joined by prompt into answers.md, the prompts they answer differently first."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from llmexp.record import RunDir, prompt_text


def exported_step(summary: Dict[str, Any]) -> Optional[int]:
    """The step whose model the run exported: its best validation's under keep_best, else its last."""
    best = summary.get("best") or {}
    return best["step"] if best.get("exported") else summary.get("global_step")


def exported_answers(path: Path, summary: Dict[str, Any]) -> Dict[str, Tuple[str, float]]:
    """prompt text -> (answer, score) at the exported model's validation (the last recorded one at or
    before it); {} for a run without answers.jsonl."""
    file = RunDir(path).answers
    if not file.is_file():
        return {}
    rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    step = exported_step(summary)
    steps = [r["step"] for r in rows if step is None or r["step"] <= step]
    if not steps:
        return {}
    last = max(steps)
    return {prompt_text(r["prompt"]): (r["answer"], r["score"]) for r in rows if r["step"] == last}


# Characters that would end a Markdown table's row (or a line for str.splitlines): an untrained
# model's answers are full of them.
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def _one_line(text: str) -> str:
    return _LINE_BREAKING.sub(" ", text).replace("|", "\\|")


def _cell(found: Optional[Tuple[str, float]]) -> str:
    if found is None:
        return "–"
    answer, score = found
    mark = "✓" if score >= 1 else "✗" if score <= 0 else f"{score:.2f}"
    return f"{mark} `{_one_line(answer).replace('`', '')}`"


def answers_markdown(runs: Sequence[Any], labels: Sequence[str]) -> Optional[Tuple[str, int, int]]:
    """(answers.md, prompts answered differently, prompts every run was asked) for runs of which two
    or more recorded answers; None otherwise. A prompt only some runs were asked is listed last and
    not counted as answered differently (runs on other data shared none, and all "differed")."""
    answered = [(label, exported_answers(r.path, r.summary)) for r, label in zip(runs, labels)]
    answered = [(label, a) for label, a in answered if a]
    if len(answered) < 2:
        return None
    prompts: List[str] = []
    for _, a in answered:
        prompts += [p for p in a if p not in prompts]
    shared = [p for p in prompts if all(p in a for _, a in answered)]
    differ = [p for p in shared if len({a[p][0] for _, a in answered}) > 1]
    same = [p for p in shared if p not in differ]
    some = [p for p in prompts if p not in shared]
    said = (f"{len(differ)} of {len(shared)} prompts answered differently (first)" if shared
            else "no prompt was asked of every run")
    if some:
        said += f"; {len(some)} asked of only some runs (last)"
    lines = ["# What each run's model answered", "",
             f"At the validation of the model each run exported; {said}. ✓/✗: the task metric's score.", "",
             "| prompt | " + " | ".join(label for label, _ in answered) + " |",
             "|" + "---|" * (len(answered) + 1)]
    for p in differ + same + some:
        lines.append(f"| {_one_line(p)} | " + " | ".join(_cell(a.get(p)) for _, a in answered) + " |")
    return "\n".join(lines) + "\n", len(differ), len(shared)
