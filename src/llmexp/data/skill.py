"""The bundled skill: small-number arithmetic, generated from a seed.

One skill serves every stage so that each stage measurably moves the same ability:
pretraining text about the facts, chat instructions for SFT, preference pairs (right answer
chosen, wrong one rejected) for rm/dpo, prompts with a checkable answer for ppo/grpo, and an
eval task. A tiny model learns it on a CPU within minutes.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

QUESTION_TEMPLATES = {
    "+": ["What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "What is the sum of {a} and {b}?"],
    "-": ["What is {a} minus {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.",
          "What is the difference between {a} and {b}?"],
}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen", "twenty"]


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    def question(self, template: int) -> str:
        return QUESTION_TEMPLATES[self.op][template].format(a=self.a, b=self.b)

    def solution(self, answer: Optional[int] = None) -> str:
        return f"{self.a} {self.op} {self.b} = {self.answer if answer is None else answer}"


def problems(max_operand: int = 9) -> List[Problem]:
    """Every distinct problem: additions, and subtractions with a non-negative result."""
    out = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            out.append(Problem(a, "+", b))
            if a >= b:
                out.append(Problem(a, "-", b))
    return out


def _sample(rng: random.Random, max_operand: int) -> Problem:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    op = rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a
    return Problem(a, op, b)


def chat_examples(num_samples: int = 4000, max_operand: int = 9, seed: int = 1234) -> Iterator[Dict]:
    """SFT data: one user question, one assistant answer of the form 'a + b = c'."""
    rng = random.Random(seed)
    for _ in range(num_samples):
        p = _sample(rng, max_operand)
        t = rng.randrange(len(QUESTION_TEMPLATES[p.op]))
        yield {"messages": [{"role": "user", "content": p.question(t)},
                            {"role": "assistant", "content": p.solution()}]}


def text_corpus(num_samples: int = 2000, max_operand: int = 9, seed: int = 1234) -> Iterator[Dict]:
    """Pretraining documents: a few facts each, in symbols and in words."""
    rng = random.Random(seed)
    for _ in range(num_samples):
        facts = []
        for _ in range(rng.randint(2, 5)):
            p = _sample(rng, max_operand)
            if rng.random() < 0.5 or max(p.a, p.b, p.answer) >= len(WORDS):
                facts.append(p.solution() + ".")
            else:
                verb = "plus" if p.op == "+" else "minus"
                facts.append(f"{WORDS[p.a].capitalize()} {verb} {WORDS[p.b]} is {WORDS[p.answer]}.")
        yield {"text": " ".join(facts)}


def wrong_answer(p: Problem, rng: random.Random) -> int:
    delta = rng.choice([-3, -2, -1, 1, 2, 3])
    wrong = p.answer + delta
    return wrong if wrong >= 0 else p.answer + abs(delta)


def misread(p: Problem, rng: random.Random, max_operand: int) -> Optional[Problem]:
    """The problem with one operand misread: its restatement is correct arithmetic of the wrong
    question ('3 + 5 = 8' for 'What is 3 plus 4?'); None when no operand can move."""
    for _ in range(20):
        delta = rng.choice([-2, -1, 1, 2])
        a, b = (p.a + delta, p.b) if rng.random() < 0.5 else (p.a, p.b + delta)
        if 0 <= a <= max_operand and 0 <= b <= max_operand and (p.op == "+" or a >= b):
            return Problem(a, p.op, b)
    return None


def malformed(p: Problem, rng: random.Random) -> str:
    """A broken answer, of the kinds a policy drifts into when it exploits a reward model: the
    solution cut off before its result, its result repeated, the sum carried on past its result,
    the solution said twice, or the question's numbers repeated without a sum."""
    text, kind = p.solution(), rng.randrange(5)
    if kind == 0:
        return text[: rng.randint(0, text.index("=") + 1)].strip()
    if kind == 1:
        return f"{text} = {p.answer}"
    if kind == 2:
        b = rng.randint(0, 9)
        return f"{text} {p.op} {b} = {p.answer + b if p.op == '+' else p.answer - b}"
    if kind == 3:
        return f"{text} {text}"
    numbers = [str(rng.choice([p.a, p.b, p.answer])) for _ in range(rng.randint(2, 6))]
    return " ".join(n if i == 0 else f"{rng.choice(['', '+ ', '- '])}{n}" for i, n in enumerate(numbers))


def preference_pairs(num_samples: int = 2000, max_operand: int = 9, seed: int = 1234,
                     misread_fraction: float = 0.25, unrelated_fraction: float = 0.25,
                     malformed_fraction: float = 0.2) -> Iterator[Dict]:
    """rm/dpo data: the right answer chosen; rejected, one of the mistakes a policy makes: a
    near-miss final number, a correct restatement of a misread question ('3 + 5 = 8' for 3 plus 4;
    ``misread_fraction``), a sum about other numbers, right or wrong ('0 - 0 = 0', '5 + 5 = 5'; ``unrelated_fraction``) or
    a broken answer ('3 + 4 =', '3 + 4 = 7 = 7'; ``malformed_fraction``), so that a reward model
    learns to check the question, the arithmetic and the form, not only the final number."""
    rng = random.Random(seed)
    for _ in range(num_samples):
        p = _sample(rng, max_operand)
        t = rng.randrange(len(QUESTION_TEMPLATES[p.op]))
        kind = rng.random()
        wrong = misread(p, rng, max_operand) if kind < misread_fraction else None
        if wrong is not None:
            rejected = wrong.solution()
        elif kind < misread_fraction + unrelated_fraction:
            other = _sample(rng, max_operand)
            while other == p:
                other = _sample(rng, max_operand)
            rejected = other.solution(None if rng.random() < 0.5 else wrong_answer(other, rng))
        elif kind < misread_fraction + unrelated_fraction + malformed_fraction:
            rejected = malformed(p, rng)
        else:
            rejected = p.solution(wrong_answer(p, rng))
        yield {"prompt": [{"role": "user", "content": p.question(t)}],
               "chosen": [{"role": "assistant", "content": p.solution()}],
               "rejected": [{"role": "assistant", "content": rejected}]}


def prompts_with_answers(num_samples: int = 1000, max_operand: int = 9, seed: int = 1234) -> Iterator[Dict]:
    """Rollout-stage and eval data: a question, the number that answers it and its solution."""
    rng = random.Random(seed)
    for _ in range(num_samples):
        p = _sample(rng, max_operand)
        t = rng.randrange(len(QUESTION_TEMPLATES[p.op]))
        yield {"prompt": [{"role": "user", "content": p.question(t)}], "answer": str(p.answer),
               "solution": p.solution()}


def task_prompts(max_operand: int = 9, seed: int = 4321, every_wording: bool = False) -> List[Dict]:
    """The task metric's prompts: every distinct problem once (155 with operands up to 9), each
    worded by a seeded template, with its answer. Every stage's run is measured on the same set.

    ``every_wording``: then each problem again in each of its other wordings (620 prompts), in
    passes: the seeded wording of every problem first, then the next wording of each, so that a
    prefix (task.max_prompts) asks every problem before it asks one twice."""
    rng = random.Random(seed)
    chosen = [(p, rng.randrange(len(QUESTION_TEMPLATES[p.op]))) for p in problems(max_operand)]
    passes = len(QUESTION_TEMPLATES["+"]) if every_wording else 1
    return [{"prompt": [{"role": "user", "content": p.question((t + k) % len(QUESTION_TEMPLATES[p.op]))}],
             "columns": {"answer": str(p.answer), "solution": p.solution()}}
            for k in range(passes) for p, t in chosen]


def text_task_prompts(max_operand: int = 9) -> List[Dict]:
    """The task metric's prompts for a model trained on the text corpus (stage=pretrain): every
    distinct problem once as the start of a fact ('3 + 4 ='), with its answer."""
    return [{"prompt": f"{p.a} {p.op} {p.b} =", "columns": {"answer": str(p.answer)}} for p in problems(max_operand)]


def continues_with_answer(completion: str, answer: str) -> float:
    """1.0 when a continuation of 'a op b =' starts with the answer ('7. 9 - 2 = 7.' after
    '3 + 4 ='), else 0.0."""
    match = _LEADING_NUMBER.match(completion)
    return float(bool(match) and match.group(1) == str(answer))


_LEADING_NUMBER = re.compile(r"\s*(-?\d+)(?!\d)")
_LAST_NUMBER = re.compile(r"=\s*(-?\d+)")
_SOLUTION = re.compile(r"\s*(\d+)\s*([+-])\s*(\d+)\s*=\s*(-?\d+)\s*\.?\s*")
_STATED = re.compile(r"(\d+)\s*([+-])\s*(\d+)\s*=\s*(-?\d+)")


def extract_answer(completion: str) -> Optional[str]:
    """The number after the first '=' of a completion ('3 + 4 = 7' -> '7'), if any."""
    match = _LAST_NUMBER.search(completion)
    return match.group(1) if match else None


def parse_solution(text: str) -> Optional[tuple]:
    """``(a, op, b, c)`` of a text that is exactly one solution 'a op b = c' (an optional full
    stop), else None."""
    m = _SOLUTION.fullmatch(text)
    return (int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))) if m else None


def same_solution(completion: str, solution: str) -> bool:
    """Whether the completion is the solution: the question's operands (an addition's in either
    order), its operation and the right result, and nothing else."""
    got, want = parse_solution(completion), parse_solution(solution)
    if got is None or want is None:
        return False
    (a, op, b, c), (wa, wop, wb, wc) = got, want
    return op == wop and c == wc and ((a, b) == (wa, wb) or (op == "+" and (a, b) == (wb, wa)))


def correctness_reward(completion: str, answer: Optional[str] = None, reference: Optional[str] = None,
                       solution: Optional[str] = None) -> float:
    """1.0 when the completion is the question's solution 'a op b = c', else 0.0: the question's
    operands restated ('9 + 9 = 12' for 'Add 3 and 9' is wrong, though 12 is the sum), the right
    result, nothing else. The solution is the ``solution`` column (the bundled prompts) or the
    ``reference`` answer (chat and preference data). With only an ``answer`` column (other prompt
    data): 1.0 when the number after '=' is the answer and any sum stated before it is true. A
    reasoning model's answer is what follows its reasoning (llmexp.reasoning)."""
    from llmexp.reasoning import answer_of

    completion, reference = answer_of(completion), answer_of(reference) if reference else reference
    expected = solution or (reference if reference and parse_solution(reference) else None)
    if expected is not None:
        return float(same_solution(completion, expected))
    if answer is None:
        answer = extract_answer(reference) if reference else None
    if answer is None or extract_answer(completion) != str(answer):
        return 0.0
    stated = _STATED.search(completion)
    if stated:
        a, op, b, c = int(stated.group(1)), stated.group(2), int(stated.group(3)), int(stated.group(4))
        return float((a + b if op == "+" else a - b) == c)
    return 1.0


GENERATORS = {"arithmetic": chat_examples, "arithmetic_text": text_corpus,
              "arithmetic_pairs": preference_pairs, "arithmetic_prompts": prompts_with_answers}
