"""The task metric of every run that ends with a language model: greedy answers to held-out
prompts, scored by a checker.

A stage's own metric (DPO's implicit-reward accuracy, a reward model's score) can rise while the
model gets worse; this one looks at what the model says. The prompts are the run's validation
rows (the prompt of a chat, a prompt/completion pair, a preference pair, a kto completion labelled
desirable or a prompt row), or, on the bundled skill, its 155 distinct questions in each of their
four wordings (620 prompts), so that every stage is measured on the same set (asked in one wording
each, rloo's model scored 1.000 while it missed 6 of the 620);
the checker is, by ``task.check``:

- ``auto``: the bundled skill's rule (``arithmetic_correct``) on bundled data (on its text, for
  stage=pretrain: ``arithmetic_continues`` of the facts' starts, '3 + 4 ='); else the stage's
  reward function (ppo/grpo); else exact match against the row's reference answer; else none;
- ``reference``: the greedy answer equals the reference completion (whitespace-normalised);
- ``<name>``: a registered reward function (``llmexp plugins`` lists them), called with the
  completion and the row's columns, plus ``reference`` (the reference answer text, where the data
  has one);
- ``none``: no task metric.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from llmexp.data.formats import answer_text, reference_match

BUNDLED_CHECK = "arithmetic_correct"
BUNDLED_TEXT_CHECK = "arithmetic_continues"  # a model trained on the skill's text continues 'a op b ='
# llmexp's own datasets of the arithmetic skill (plugins/builtin.py): only these are judged by the
# skill's rule on the skill's questions. A plugin's bundled dataset is its own task (its rows were
# replaced by arithmetic questions and checked by arithmetic_correct, silently).
SKILL_DATASETS = frozenset({"arithmetic", "arithmetic_text", "arithmetic_pairs", "arithmetic_prompts"})


def is_the_skill(data_cfg: Any) -> bool:
    """Whether the run trains on llmexp's bundled arithmetic skill."""
    return data_cfg.source == "bundled" and data_cfg.name in SKILL_DATASETS


def judged_on_the_skill(data_cfg: Any, rows: Sequence[Dict[str, Any]]) -> bool:
    """Whether the run trains on judgements of the bundled skill's questions (data=feedback from
    `llmexp serve` of a run on the skill): every held-out row's question is one of the skill's, in
    any of its wordings. Its task metric is then the skill's, on all its questions: the held-out
    judgements were a handful (one of 16, in a tour), checked against whichever answer a judge chose."""
    if data_cfg.name != "feedback" or not rows:
        return False
    from llmexp.data.skill import task_prompts

    questions = {_question(r["prompt"]) for r in task_prompts(every_wording=True)}
    return all(_question(r.get("prompt")) in questions for r in rows)


def _question(prompt: Any) -> Optional[str]:
    """A prompt's text: itself, or its last user message's."""
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else None
    return prompt if isinstance(prompt, str) else None



def task_rows(rows: Sequence[Dict[str, Any]], fmt: str) -> List[Dict[str, Any]]:
    """``{"prompt", "columns"}`` for each held-out row with something to answer; ``columns``
    carries the row's other columns and ``reference`` (the reference answer) where there is one."""
    out = []
    for row in rows:
        if fmt == "chat":
            messages = list(row["messages"])
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            if not last:  # no assistant turn, or nothing before it to answer
                continue
            prompt, reference = messages[:last], answer_text(messages[last:last + 1])
        elif fmt in ("prompt_completion", "preference"):
            prompt = row["prompt"]
            reference = answer_text(row["completion"] if fmt == "prompt_completion" else row["chosen"])
        elif fmt == "unpaired_preference":  # kto: the prompts of the completions labelled desirable
            if not row.get("label"):
                continue
            prompt, reference = row["prompt"], answer_text(row["completion"])
        elif fmt == "prompt_only":
            prompt, reference = row["prompt"], None
        else:
            return []
        skip = {"messages", "prompt", "completion", "chosen", "rejected", "label"}
        columns = {k: v for k, v in row.items() if k not in skip}
        if reference is not None:
            columns["reference"] = reference
        out.append({"prompt": prompt, "columns": columns})
        tools = _tools_of(row)
        if tools:  # the functions the conversation was given: asked with them, as it trained
            out[-1]["tools"] = tools
        reasoning = _reasoning_of(row, fmt)
        if reasoning and reference is not None:  # the model writes it before the answer: room for both
            from llmexp.reasoning import CLOSE, OPEN

            out[-1]["written"] = f"{OPEN}\n{reasoning}\n{CLOSE}\n\n{reference}"
    return out


def _tools_of(row: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
    from llmexp.tool_use import tools_of

    try:
        return tools_of(row.get("tools"))
    except ValueError:  # refused with its row before training (llmexp.data.rows)
        return None


def _reasoning_of(row: Dict[str, Any], fmt: str) -> Optional[str]:
    """The reasoning the row's reference answer turn carries in a key of its own (llmexp.reasoning)."""
    from llmexp.reasoning import REASONING_KEYS

    answer = {"chat": "messages", "prompt_completion": "completion", "preference": "chosen",
              "unpaired_preference": "completion"}.get(fmt)
    turns = row.get(answer) if answer else None
    if not isinstance(turns, list):
        return None
    last = next((m for m in reversed(turns) if isinstance(m, dict) and m.get("role") == "assistant"), None)
    return next((str(last[k]) for k in REASONING_KEYS if last and last.get(k)), None)


def resolve_check(check: str, skill: bool, stage_cfg: Any, fmt: str) -> Optional[str]:
    """The checker ``task.check=auto`` stands for in this run (a reward name, ``reference`` or None);
    ``skill``: the run trains on the bundled arithmetic skill (is_the_skill)."""
    if check != "auto":
        return None if check == "none" else check
    if skill:
        return BUNDLED_TEXT_CHECK if fmt == "text" else BUNDLED_CHECK
    reward = getattr(stage_cfg, "reward", None)
    if reward is not None and reward.function and not reward.model:
        return reward.function
    if fmt in ("chat", "prompt_completion", "preference", "unpaired_preference"):
        return "reference"
    return None


def build_checker(name: str) -> Callable[[List[Any], List[str], List[Dict[str, Any]]], torch.Tensor]:
    """A scorer of (prompts, completions, columns), like a reward function."""
    if name == "reference":
        return lambda prompts, completions, columns: torch.tensor(
            [reference_match(c, cols.get("reference")) for c, cols in zip(completions, columns)])
    from llmexp.rewards import FunctionReward

    return FunctionReward(name, key="task.check")


@dataclass
class TaskProbe:
    """Held-out prompts, their checker and the greedy-generation settings."""

    check: str
    rows: List[Dict[str, Any]]
    max_new_tokens: int
    batch_size: int

    def __post_init__(self) -> None:
        self.score = build_checker(self.check)
        self.answers: List[Dict[str, Any]] = []  # the last pass's recorded answers (task.log_answers) on this rank

    too_long: int = 0  # held-out prompts left out: with max_new_tokens they exceed the model's context
    log_answers: int = 0  # answers of each pass kept in ``answers`` (task.log_answers)

    def within_context(self, tokenizer, context: Optional[int]) -> Optional["TaskProbe"]:
        """The probe without the prompts whose answer would run past ``context`` positions (a
        501-token prompt and 24 new tokens crashed a gpt2 of 512 positions mid-validation); None
        when no prompt is left."""
        from llmexp.data.encode import render_prompt

        if not context:
            return self
        room = context - self.max_new_tokens
        kept = [r for r in self.rows if len(render_prompt(tokenizer, r["prompt"], r.get("tools"))) <= room]
        if not kept:
            return None
        return dataclasses.replace(self, rows=kept, too_long=self.too_long + len(self.rows) - len(kept))

    def fit_to_references(self, tokenizer, context: Optional[int]) -> Optional[int]:
        """A longer answer limit when held-out reference answers are longer than it (a 49-token reply
        was cut at 24 and scored 0 while the model had learnt it); None when they fit. At most half
        the model's context. A reasoning model's reference counts its reasoning too, as it is written
        before the answer (``<think>\\n...\\n</think>\\n\\n``)."""
        longest = max((len(tokenizer(str(r.get("written") or r["columns"]["reference"]),
                                     add_special_tokens=False)["input_ids"]) + 1
                       for r in self.rows if r["columns"].get("reference") is not None), default=0)
        if longest <= self.max_new_tokens:
            return None
        self.max_new_tokens = min(longest, context // 2) if context else longest
        return self.max_new_tokens

    def shard(self, rank: int, world: int) -> List[Optional[Dict[str, Any]]]:
        """This rank's rows, padded with None to the longest shard, so that every rank generates
        the same number of batches (sharded models generate in lockstep)."""
        longest = -(-len(self.rows) // world)
        mine: List[Optional[Dict[str, Any]]] = list(self.rows[rank::world])
        return mine + [None] * (longest - len(mine))

    @torch.no_grad()
    def sums(self, generate: Callable[[List[Any], List[Any]], List[str]], rank: int = 0, world: int = 1
             ) -> Dict[str, tuple]:
        """``{"task_score": (sum, count), "task_response_chars": (sum, count)}`` over this rank's
        shard; ``generate`` maps a batch of prompts (and each one's tools, or None) to greedy answer
        texts."""
        rows = self.shard(rank, world)
        total, chars, n = 0.0, 0.0, 0
        self.answers = []
        # the prompts recorded are chosen among all of them (as by one process), each answer kept
        # by the rank that asked it with its place among them ("index")
        keep = recorded(len(self.rows), self.log_answers)
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i : i + self.batch_size]
            real = [r for r in chunk if r is not None]
            # padding rows repeat a real prompt so generation stays in lockstep; they are not scored
            filler = real[0] if real else self.rows[0]
            answers = generate([(r or filler)["prompt"] for r in chunk],
                               [(r or filler).get("tools") for r in chunk])[: len(real)]
            if real:
                scores = self.score([r["prompt"] for r in real], answers, [r["columns"] for r in real])
                self.answers += [{"index": rank + j * world, "prompt": r["prompt"], "answer": a, "score": float(sc)}
                                 for j, (r, a, sc) in enumerate(zip(real, answers, scores.tolist()), start=n)
                                 if rank + j * world in keep]
                total += float(scores.sum())
                chars += float(sum(len(a) for a in answers))
                n += len(real)
        return {"task_score": (total, n), "task_response_chars": (chars, n)}


def recorded(rows: int, count: int) -> set:
    """Which of ``rows`` prompts (by position) task.log_answers records: ``count`` spread evenly over
    them (the bundled questions come in order, 0 + 0 first: the first 16 were all additions of 0)."""
    if count <= 0 or rows <= 0:
        return set()
    return {i * rows // count for i in range(count)} if count < rows else set(range(rows))


def unavailable(run_cfg: Any) -> Optional[str]:
    """Why this run cannot generate its task metric, or None when it can."""
    s = run_cfg.strategy
    if s.sequence_parallel and s.name in ("tp", "fsdp"):
        return ("no task metric: a sequence-parallel model cannot generate token by token; "
                "score the exported model with python -m llmexp.eval")
    return None


def build_probe(run_cfg: Any, val_rows: Sequence[Dict[str, Any]], fmt: str) -> Optional[TaskProbe]:
    """The run's probe, or None when no checker applies (plain-text data, ``task.check=none``) or
    the run cannot generate (see ``unavailable``)."""
    t = run_cfg.task
    if unavailable(run_cfg):
        return None
    skill = is_the_skill(run_cfg.data) or judged_on_the_skill(run_cfg.data, val_rows)
    check = resolve_check(t.check, skill, run_cfg.stage, fmt)
    if check is None:
        return None
    if skill and check in (BUNDLED_CHECK, BUNDLED_TEXT_CHECK):
        from llmexp.data.skill import task_prompts, text_task_prompts

        max_operand = int((run_cfg.data.options or {}).get("max_operand", 9))
        rows = (text_task_prompts(max_operand) if check == BUNDLED_TEXT_CHECK
                else task_prompts(max_operand, every_wording=True))
    else:
        rows = task_rows(val_rows, fmt)
    rows = rows[: t.max_prompts]
    if not rows:
        return None
    return TaskProbe(check=check, rows=rows, max_new_tokens=t.max_new_tokens, batch_size=t.batch_size,
                     log_answers=t.log_answers)
