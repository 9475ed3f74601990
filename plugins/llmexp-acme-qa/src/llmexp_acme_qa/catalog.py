"""The ACME catalogue and the question/answer pairs generated from it (seeded, no I/O)."""

from __future__ import annotations

import random
from typing import Dict, Iterator, List, Sequence

# product -> facts; every question is answerable from this table.
CATALOG: Dict[str, Dict[str, str]] = {
    "Rocket Skates": {"price": "120", "colour": "red", "warehouse": "Tucson"},
    "Giant Magnet": {"price": "45", "colour": "grey", "warehouse": "Phoenix"},
    "Earthquake Pills": {"price": "8", "colour": "white", "warehouse": "Tucson"},
    "Portable Hole": {"price": "99", "colour": "black", "warehouse": "Mesa"},
    "Jet Bike": {"price": "300", "colour": "blue", "warehouse": "Phoenix"},
    "Bird Seed": {"price": "3", "colour": "yellow", "warehouse": "Mesa"},
    "Anvil": {"price": "60", "colour": "black", "warehouse": "Tucson"},
    "Dehydrated Boulders": {"price": "15", "colour": "brown", "warehouse": "Yuma"},
    "Tornado Seeds": {"price": "12", "colour": "green", "warehouse": "Yuma"},
    "Iron Carrot": {"price": "25", "colour": "orange", "warehouse": "Mesa"},
    "Instant Icicle Maker": {"price": "70", "colour": "white", "warehouse": "Phoenix"},
    "Spring-Powered Shoes": {"price": "85", "colour": "red", "warehouse": "Tucson"},
    "Super Outfit": {"price": "150", "colour": "purple", "warehouse": "Phoenix"},
    "Giant Kite Kit": {"price": "40", "colour": "yellow", "warehouse": "Yuma"},
    "Triple-Strength Fortified Leg Muscle Vitamins": {"price": "18", "colour": "pink", "warehouse": "Mesa"},
    "Batman Outfit": {"price": "55", "colour": "grey", "warehouse": "Tucson"},
}
TOPICS = ("price", "colour", "warehouse")
QUESTIONS = {
    "price": ["How much does the ACME {p} cost?", "What is the price of the ACME {p}?",
              "How many dollars is the ACME {p}?"],
    "colour": ["What colour is the ACME {p}?", "Which colour does the ACME {p} come in?",
               "What colour should I expect the ACME {p} to be?"],
    "warehouse": ["Where is the ACME {p} stocked?", "Which warehouse ships the ACME {p}?",
                  "From which town is the ACME {p} shipped?"],
}
SENTENCES = {
    "price": "The ACME {p} costs {v} dollars.",
    "colour": "The ACME {p} is {v}.",
    "warehouse": "The ACME {p} ships from {v}.",
}


def answer(product: str, topic: str, style: str) -> str:
    value = CATALOG[product][topic]
    return value if style == "short" else SENTENCES[topic].format(p=product, v=value)


def qa_rows(num_samples: int, topics: Sequence[str], style: str, seed: int) -> Iterator[Dict[str, List]]:
    """Chat rows: a user question about one product fact and the assistant's answer."""
    rng = random.Random(seed)
    products = sorted(CATALOG)
    for _ in range(num_samples):
        product, topic = rng.choice(products), rng.choice(list(topics))
        question = rng.choice(QUESTIONS[topic]).format(p=product)
        yield {"messages": [{"role": "user", "content": question},
                            {"role": "assistant", "content": answer(product, topic, style)}]}
