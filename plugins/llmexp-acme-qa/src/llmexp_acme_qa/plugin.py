"""The llmexp hooks of this package: the acme_qa dataset, its typed options and its config file.

Import-light on purpose (llmexp imports this module for --help and config checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List

import llmexp
from llmexp.errors import UserError
from llmexp.plugins import DatasetDeclaration

from llmexp_acme_qa.catalog import TOPICS, qa_rows

CONF_DIR = Path(__file__).parent / "conf"


@dataclass
class AcmeQAOptions:
    """data.options of data=acme_qa, checked by llmexp before anything runs."""

    num_samples: int = field(default=2000, metadata={"min": 1})
    # Which facts to ask about.
    topics: List[str] = field(default_factory=lambda: list(TOPICS), metadata={"choices": TOPICS})
    # short: just the value ("120"); sentence: "The ACME Rocket Skates costs 120 dollars."
    answer_style: str = field(default="sentence", metadata={"choices": ("short", "sentence")})
    # How many catalogue questions the model answers after training (acme_samples.jsonl); 0: none.
    sample_questions: int = field(default=4, metadata={"min": 0, "max": 100})


def build(options: AcmeQAOptions, seed: int) -> Iterator[dict]:
    if not options.topics:
        raise UserError(f"data.options.topics: choose at least one of {', '.join(TOPICS)}")
    return qa_rows(options.num_samples, options.topics, options.answer_style, seed)


@llmexp.hookimpl
def llmexp_datasets() -> List[DatasetDeclaration]:
    return [DatasetDeclaration("acme_qa", build, AcmeQAOptions, columns=("messages",),
                               description="chat QA about the ACME product catalogue")]


@llmexp.hookimpl
def llmexp_config_dirs() -> List[Any]:
    return [CONF_DIR]


@llmexp.hookimpl
def llmexp_callbacks(cfg: Any) -> List[Any]:
    """For acme_qa runs on one process: sample answers to catalogue questions after training."""
    options = cfg.data.options  # validated and complete: AcmeQAOptions as a dict
    if cfg.data.name != "acme_qa" or cfg.strategy.name in ("fsdp", "tp") or not options["sample_questions"]:
        return []
    from llmexp_acme_qa.callbacks import AcmeSamples

    return [AcmeSamples(options["sample_questions"], options["answer_style"])]
