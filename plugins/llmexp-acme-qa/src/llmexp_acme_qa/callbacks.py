"""A Lightning callback that shows what an acme_qa run learned: greedy answers to catalogue questions.

Imported only from the ``llmexp_callbacks`` hook, when a run is about to train (Lightning is
loaded by then).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

import torch
from lightning.pytorch.callbacks import Callback

from llmexp_acme_qa.catalog import CATALOG, QUESTIONS, answer

SAMPLES_FILE = "acme_samples.jsonl"


def sample_questions(n: int) -> List[Tuple[str, str, str]]:
    """(question, product, topic) for the first ``n`` products, cycling through the topics."""
    topics = list(QUESTIONS)
    products = sorted(CATALOG)
    return [(QUESTIONS[topics[i % len(topics)]][0].format(p=products[i % len(products)]),
             products[i % len(products)], topics[i % len(topics)]) for i in range(n)]


class AcmeSamples(Callback):
    """After training, write ``acme_samples.jsonl`` into the run directory: one greedy answer per
    sample question, the expected answer, and whether the expected value appears in it."""

    def __init__(self, num_questions: int, answer_style: str, max_new_tokens: int = 24):
        self.num_questions, self.answer_style, self.max_new_tokens = num_questions, answer_style, max_new_tokens

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        model, tok = pl_module.model, pl_module.tokenizer
        was_training = model.training
        model.eval()
        rows = []
        with torch.no_grad():
            for question, product, topic in sample_questions(self.num_questions):
                text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
                ids = tok(text, return_tensors="pt", add_special_tokens=False).to(pl_module.device)
                out = model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
                expected = answer(product, topic, self.answer_style)
                rows.append({"question": question, "answer": reply, "expected": expected,
                             "value_found": CATALOG[product][topic] in reply})
        model.train(was_training)
        path = Path(trainer.default_root_dir) / SAMPLES_FILE
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
