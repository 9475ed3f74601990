"""data=mixture: rows drawn from several datasets in proportion to their weights, deterministic for
a seed, each source's data.fields applied, per-source counts in the record."""

from __future__ import annotations

import json

import pytest
from llmexp.testing import FAST, run_cli, typed

from llmexp.data.mixture import SOURCE_COLUMN
from llmexp.data.module import load_examples


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    """150 distinct chat rows under another column name, mapped with the source's own fields."""
    path = tmp_path_factory.mktemp("mix") / "talk.jsonl"
    rows = [{"conversation": [{"role": "user", "content": f"Say the word number {i}."},
                              {"role": "assistant", "content": f"word{i}"}]} for i in range(150)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mixture(chat_file, *extra):
    sources = (f"[{{name: arithmetic, weight: 1, options: {{num_samples: 800, max_operand: 20}}}}, "
               f"{{source: files, name: talk, path: '{chat_file}', weight: 3, fields: {{messages: conversation}}}}]")
    return typed(["data=mixture", f"data.mixture={sources}", "data.steps=[normalize]", *extra]).data


def entry(prepared):
    (mix,) = [e for e in prepared.log if e["step"] == "mixture"]
    return mix["sources"]


def test_rows_come_from_each_source_in_proportion_to_its_weight(chat_file):
    prepared = load_examples(mixture(chat_file), "sft")
    a, b = entry(prepared)
    assert (a["share"], b["share"]) == (0.25, 0.75)
    # first_exhausted: drawing stops when the 150 file rows (weight 3) run out, no row repeats
    assert b["mixed_rows"] == 150 and a["mixed_rows"] == pytest.approx(50, abs=20)
    assert a["train_rows"] + b["train_rows"] == len(prepared.train)
    assert a["val_rows"] + b["val_rows"] == len(prepared.val)
    assert SOURCE_COLUMN not in prepared.train.column_names and prepared.format == "chat"
    contents = [row["messages"][0]["content"] for row in prepared.train]
    assert sum(c.startswith("Say the word") for c in contents) == b["train_rows"]  # mapped from `conversation`


def test_the_mixture_is_the_same_for_a_seed_and_another_for_another_seed(chat_file):
    first = [r["messages"][0]["content"] for r in load_examples(mixture(chat_file), "sft").train]
    again = [r["messages"][0]["content"] for r in load_examples(mixture(chat_file), "sft").train]
    other = [r["messages"][0]["content"] for r in load_examples(mixture(chat_file, "data.seed=7"), "sft").train]
    assert first == again and first != other


def test_all_exhausted_repeats_the_smaller_sources_to_keep_their_share(chat_file):
    prepared = load_examples(mixture(chat_file, "data.mixture_stopping=all_exhausted"), "sft")
    a, b = entry(prepared)
    assert a["mixed_rows"] >= 800 and b["mixed_rows"] == pytest.approx(3 * a["mixed_rows"], rel=0.1)


@pytest.mark.slow
def test_a_mixture_run_records_each_sources_rows(tmp_path):
    """The shipped data=mixture trains as any dataset and summary.json counts each source."""
    run_dir = tmp_path / "run"
    r = run_cli(["data=mixture", *FAST, "trainer.max_steps=10", "trainer.val_check_interval=10",
                 f"hydra.run.dir={run_dir}"])
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["data"] == "mixture" and s["global_step"] == 10
    (mix,) = [e for e in s["data_stats"]["preparation"] if e["step"] == "mixture"]
    assert [x["share"] for x in mix["sources"]] == [0.75, 0.25]
    assert sum(x["train_rows"] for x in mix["sources"]) == s["data_stats"]["train"]["samples"]
    assert all(x["train_rows"] > 0 and x["val_rows"] > 0 for x in mix["sources"])


def test_saved_datasets_of_different_formats_are_named_by_source(tmp_path):
    """Two saved datasets (data=hf directories, which the config check cannot peek into), one of
    prompt/completion rows and one of chats: "data 'mixture' has no recognised format (columns:
    __mixture_source); map your columns with data.fields": an internal column and the wrong key."""
    from datasets import Dataset

    from llmexp.errors import UserError

    Dataset.from_list([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]).save_to_disk(str(tmp_path / "pc"))
    Dataset.from_list([{"messages": [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"v{i}"}]}
                       for i in range(20)]).save_to_disk(str(tmp_path / "ch"))
    cfg = typed(["data=mixture", f"data.mixture=[{{source: hf, path: '{tmp_path / 'pc'}'}}, "
                                 f"{{source: hf, path: '{tmp_path / 'ch'}'}}]"]).data
    with pytest.raises(UserError) as e:
        load_examples(cfg, "sft")
    said = str(e.value)
    assert said.startswith("data.mixture: its sources have different formats: data.mixture[0]") and \
        ": prompt_completion, data.mixture[1]" in said and ": chat; mix sources of one format" in said, said
    assert SOURCE_COLUMN not in said
