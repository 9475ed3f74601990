"""The llmexp hooks of this package: the answer_match eval and the answer_closeness reward.

Import-light on purpose: the eval's torch code is imported only when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

import llmexp
from llmexp.plugins import EvalContext, EvalDeclaration, RewardDeclaration

from llmexp_answer_match.scoring import closeness


@dataclass
class AnswerMatchOptions:
    """Options of the answer_match eval."""

    # A registered dataset with `prompt` (chat messages) and `answer` columns.
    dataset: str = "arithmetic_prompts"
    num_samples: int = field(default=50, metadata={"min": 1})
    max_new_tokens: int = field(default=12, metadata={"min": 1, "max": 256})
    seed: int = 4321


def run_answer_match(ctx: EvalContext) -> Dict[str, float]:
    from llmexp_answer_match.evaluate import run

    return run(ctx)


def answer_closeness(completion: str, answer: str, **_: Any) -> float:
    """Reward: 1 / (1 + |number in the completion - answer|); 0.0 when there is no number."""
    return closeness(completion, answer)


@llmexp.hookimpl
def llmexp_evals() -> List[EvalDeclaration]:
    return [EvalDeclaration("answer_match", run_answer_match, AnswerMatchOptions,
                            "greedy answers to a prompt+answer dataset: accuracy and closeness")]


@llmexp.hookimpl
def llmexp_rewards() -> List[RewardDeclaration]:
    return [RewardDeclaration("answer_closeness", answer_closeness,
                              "1/(1+|predicted-answer|): partial credit for near misses")]
