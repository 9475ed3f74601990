"""llmexp's own datasets, rewards and tools, registered through the same hooks a third-party plugin uses.

The bundled arithmetic skill (:mod:`llmexp.data.skill`) in its four shapes, each with typed
options, and the reward that checks its answers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional

from llmexp.config.schema import bounded
from llmexp.data import skill
from llmexp.plugins.declarations import DatasetDeclaration, RewardDeclaration, ToolDeclaration
from llmexp.plugins.markers import hookimpl


@dataclass
class ChatOptions:
    num_samples: int = bounded(4000, min=1)
    # Largest operand of the generated problems.
    max_operand: int = bounded(9, min=1)


@dataclass
class TextOptions(ChatOptions):
    num_samples: int = bounded(2000, min=1)


@dataclass
class PairOptions(ChatOptions):
    num_samples: int = bounded(2000, min=1)
    # pairs whose rejected answer restates a misread question ('3 + 5 = 8' for 3 plus 4)
    misread_fraction: float = bounded(0.25, min=0.0, max=1.0)
    # pairs whose rejected answer is a sum about other numbers, right or wrong ('0 - 0 = 0')
    unrelated_fraction: float = bounded(0.25, min=0.0, max=1.0)
    # pairs whose rejected answer is broken ('3 + 4 =', '3 + 4 = 7 = 7')
    malformed_fraction: float = bounded(0.2, min=0.0, max=1.0)


@dataclass
class PromptOptions(ChatOptions):
    num_samples: int = bounded(1000, min=1)


def reference_reward(completion: str, reference: Optional[str] = None) -> float:
    """The rollout stages' default reward on a user's data: the sampled answer is the row's own."""
    if reference is None:
        from llmexp.errors import UserError

        raise UserError("stage.reward.function: the default reward on data other than the bundled skill's, "
                        "reference_match, compares each sampled answer with the row's reference answer, and these "
                        "rows have none (a prompt row alone); fix: give prompt/completion rows (or chat rows ending "
                        "with the answer), or set stage.reward.function=<a registered reward or module:function> "
                        "or stage.reward.model=<rm run>/model")
    from llmexp.data.formats import reference_match

    return reference_match(completion, reference)


def _from_generator(gen: Callable[..., Iterator[dict]]) -> Callable[[Any, int], Iterator[dict]]:
    def build(options: Any, seed: int) -> Iterator[dict]:
        return gen(seed=seed, **dataclasses.asdict(options))

    return build


@hookimpl
def llmexp_datasets() -> List[DatasetDeclaration]:
    return [
        DatasetDeclaration("arithmetic", _from_generator(skill.chat_examples), ChatOptions, ("messages",),
                           "chat questions about small-number arithmetic with checkable answers"),
        DatasetDeclaration("arithmetic_text", _from_generator(skill.text_corpus), TextOptions, ("text",),
                           "plain-text facts of the same skill, for stage=pretrain"),
        DatasetDeclaration("arithmetic_pairs", _from_generator(skill.preference_pairs), PairOptions,
                           ("prompt", "chosen", "rejected"), "preference pairs: right answer chosen (rm, dpo)"),
        DatasetDeclaration("arithmetic_prompts", _from_generator(skill.prompts_with_answers), PromptOptions,
                           ("prompt", "answer", "solution"),
                           "prompts with the number that answers them and its solution (rollout stages)"),
    ]


@hookimpl
def llmexp_rewards() -> List[RewardDeclaration]:
    return [RewardDeclaration("arithmetic_correct", skill.correctness_reward,
                              "1.0 when the answer is the question's solution 'a op b = c' (its operands, the "
                              "right result, nothing else; with only an answer column: the number after '=' and "
                              "a true sum), else 0.0"),
            RewardDeclaration("reference_match", reference_reward,
                              "1.0 when the answer equals the row's reference answer (a prompt/completion row's "
                              "completion, a chat's last answer), whitespace-normalised, else 0.0 (the rollout "
                              "stages' default reward on data other than the bundled skill's)"),
            RewardDeclaration("arithmetic_continues", skill.continues_with_answer,
                              "1.0 when a continuation of 'a op b =' starts with the answer, else 0.0 (the task "
                              "metric of stage=pretrain on the bundled text)")]


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "37 * (2 + 5)"
    """
    import ast
    import operator

    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.USub: operator.neg, ast.UAdd: operator.pos}

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return ops[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    result = value(ast.parse(str(expression).strip(), mode="eval").body)
    return str(int(result) if isinstance(result, float) and result.is_integer() else result)


@hookimpl
def llmexp_tools() -> List[ToolDeclaration]:
    return [ToolDeclaration("calculator", calculator, "evaluates an arithmetic expression ('37 * (2 + 5)' -> '259')")]
