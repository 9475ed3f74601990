"""llmexp-acme-qa through llmexp itself: discovered by its entry point, validated, trained on."""

from __future__ import annotations

import json

import pytest

from llmexp.errors import ConfigError
from llmexp.testing import check_config, tiny_run
from llmexp_acme_qa.catalog import CATALOG, answer, qa_rows
from llmexp_acme_qa.plugin import AcmeQAOptions, build


def test_rows_are_seeded_and_answer_from_the_catalogue():
    rows = list(build(AcmeQAOptions(num_samples=30, topics=["price"], answer_style="short"), seed=7))
    assert rows == list(qa_rows(30, ["price"], "short", 7)) and len(rows) == 30
    assert rows != list(qa_rows(30, ["price"], "short", 8))
    for row in rows:
        user, assistant = row["messages"]
        product = max((p for p in CATALOG if f"ACME {p}" in user["content"]), key=len)
        assert assistant == {"role": "assistant", "content": CATALOG[product]["price"]}


def test_sentence_answers():
    assert answer("Rocket Skates", "price", "sentence") == "The ACME Rocket Skates costs 120 dollars."
    assert answer("Anvil", "warehouse", "sentence") == "The ACME Anvil ships from Tucson."


def test_data_acme_qa_composes_and_its_options_are_typed():
    run = check_config(["data=acme_qa", "data.options.num_samples=50", "data.options.topics=[colour]"])
    assert run.data.name == "acme_qa" and run.data.source == "bundled"
    assert run.data.options == {"num_samples": 50, "topics": ["colour"], "answer_style": "sentence",
                                "sample_questions": 4}


def test_bad_options_are_refused_with_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        check_config(["data=acme_qa", "data.options.answer_style=long", "data.options.topics=[size]",
                      "data.options.num_samples=0", "+data.options.colour=red"])
    text = str(e.value)
    assert "4 problems" in text
    assert "data.options.answer_style: 'long' is not one of short, sentence" in text
    assert "data.options.topics: 'size' is not one of price, colour, warehouse" in text
    assert "data.options.num_samples: must be >= 1, got 0" in text
    assert "unknown option 'colour' for dataset 'acme_qa' of plugin 'acme_qa' (llmexp-acme-qa 0.1.0)" in text


@pytest.mark.slow
def test_tiny_sft_run_on_acme_qa_with_sample_answers(tmp_path):
    summary = tiny_run(tmp_path / "run", ["data=acme_qa", "data.options.sample_questions=3"])
    assert summary["data"] == "acme_qa" and summary["global_step"] == 20
    assert summary["final"]["val/loss"] < summary["initial"]["val/loss"]
    assert summary["data_stats"]["format"] == "chat"
    dedup = next(s for s in summary["data_stats"]["preparation"] if s["step"] == "dedup")
    assert dedup["rows_out"] == 144  # 16 products x 3 topics x 3 phrasings
    samples = [json.loads(line) for line in (tmp_path / "run" / "acme_samples.jsonl").read_text().splitlines()]
    from llmexp_acme_qa.callbacks import sample_questions  # imports torch: only in the slow test

    asked = sample_questions(3)
    assert [s["question"] for s in samples] == [q for q, _, _ in asked]
    assert [s["expected"] for s in samples] == ["The ACME Anvil costs 60 dollars.",
                                                "The ACME Batman Outfit is grey.",
                                                "The ACME Bird Seed ships from Mesa."]
    for s, (_, product, topic) in zip(samples, asked):
        assert s["value_found"] == (CATALOG[product][topic] in s["answer"])
