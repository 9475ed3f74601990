"""Data problems that used to get an unclear answer: chat messages given as strings, a
data.max_length shorter than every prompt, a local dataset directory with a README."""

from __future__ import annotations

import json
import re

import pytest
from llmexp.testing import FAST, run_cli, typed

from llmexp.data.encode import encode_prompt_completion
from llmexp.data.module import load_examples
from llmexp.errors import UserError
from llmexp.models.tokenizer import load_tokenizer

QUICK = [*FAST, "trainer.max_steps=2", "trainer.val_check_interval=2", "optim.warmup_steps=1",
         "trainer.micro_batch_size=4"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat(i):
    return {"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                         {"role": "assistant", "content": f"{i + 1}"}]}


@pytest.mark.slow
def test_messages_given_as_a_list_of_strings_are_named_with_the_fix(tmp_path):
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": [f"What is {i} plus 1?", f"{i + 1}"]} for i in range(40)])
    r = run_cli([*QUICK, "data=files", f"data.path={data}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "line 1: messages is a list of strings, but each message must be an object {role, content}: write " \
           '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}] instead of ["...", "..."]' \
           in r.stderr
    assert "(and 37 more)" in r.stderr  # 40 rows, 3 shown
    assert "filter_length" not in r.stderr
    # A prompt given as a list of strings gets the same answer.
    pc = _jsonl(tmp_path / "pc.jsonl", [{"prompt": [f"q{i}"], "completion": f"a{i}"} for i in range(40)])
    with pytest.raises(UserError, match=r"line 1: prompt is a list of strings, but each message must be an object"):
        load_examples(typed(["data=files", f"data.path={pc}"]).data, "sft")


def _long_prompts(tmp_path):
    """40 prompt/completion rows whose prompts are all about 30 tokens long, their file and the tokenizer."""
    rows = [{"prompt": "Please add these numbers: " + " ".join(str(j) for j in range(i % 5, i % 5 + 20)),
             "completion": str(i)} for i in range(40)]
    return rows, _jsonl(tmp_path / "long_prompts.jsonl", rows), load_tokenizer(None, None)


@pytest.mark.slow
def test_a_max_length_below_every_prompt_advises_what_helps(tmp_path):
    rows, data, tok = _long_prompts(tmp_path)
    encoded = [encode_prompt_completion(tok, r["prompt"], r["completion"], True) for r in rows]
    shortest_prompt = min(len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows)
    longest = max(len(e["input_ids"]) for e in encoded)
    base = [*QUICK, "data=files", f"data.path={data}", "data.max_length=16"]

    # data.overlong=truncate (the default) is set already: the advice is to raise data.max_length above
    # the prompts, not to set it.
    r = run_cli([*base, f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "data.max_length: every train sample was removed" in r.stderr
    assert (f"data.overlong=truncate cuts each sample to its first data.max_length=16 tokens, and every prompt is at "
            f"least that long (the shortest is {shortest_prompt} tokens; samples have ") in r.stderr
    assert (f"raise data.max_length above {shortest_prompt} (to {longest} to keep every sample whole), or shorten "
            f"the prompts") in r.stderr
    assert "use data.overlong=truncate" not in r.stderr

    # data.overlong=drop: truncating would keep nothing either, so it is not suggested.
    r = run_cli([*base, "data.overlong=drop", f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (f"data.overlong=drop drops every sample longer than data.max_length=16 (samples have "
            f"{min(len(e['input_ids']) for e in encoded)}-{longest} tokens); raise data.max_length (to {longest} to "
            f"keep every sample whole)") in r.stderr
    assert "data.overlong=truncate" not in r.stderr


@pytest.mark.slow
def test_the_advice_on_max_length_works(tmp_path):
    rows, data, tok = _long_prompts(tmp_path)
    longest = max(len(encode_prompt_completion(tok, r["prompt"], r["completion"], True)["input_ids"]) for r in rows)
    run = tmp_path / "run"
    r = run_cli([*QUICK, "data=files", f"data.path={data}", f"data.max_length={longest}", f"hydra.run.dir={run}"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((run / "summary.json").read_text())["data_stats"]["train"]
    assert stats["truncated"] == stats["dropped_no_target"] == 0


@pytest.mark.slow
def test_hf_local_directory_reads_its_data_files_not_its_readme(tmp_path):
    ds = tmp_path / "my_dataset"
    (ds / "docs").mkdir(parents=True)
    (ds / "README.md").write_text("# My dataset\n\nArithmetic chats.\n\nOne line per row? No: a card.\n")
    (ds / "LICENSE.txt").write_text("MIT License\n")
    (ds / "CHANGELOG.md").write_text("v1: first\n")
    (ds / "docs" / "usage.md").write_text("Use it with llmexp.\n")
    _jsonl(ds / "conversations.jsonl", [_chat(i) for i in range(60)])
    run = tmp_path / "run"
    r = run_cli([*QUICK, "data=hf", f"data.path={ds}", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((run / "summary.json").read_text())["data_stats"]
    assert stats["format"] == "chat"
    assert stats["preparation"][0]["rows_in"] == 60  # the JSONL's rows, and nothing of the docs


def test_hf_local_directory_files_are_split_by_name_and_docs_never_are_rows(tmp_path):
    # `datasets` alone reads this directory as a text dataset of README.txt's and notes.txt's lines.
    ds = tmp_path / "unnamed"
    ds.mkdir()
    (ds / "README.txt").write_text("hello\nworld\n")
    (ds / "notes.txt").write_text("more notes\n")
    _jsonl(ds / "conversations.jsonl", [_chat(i) for i in range(50)])
    prepared = load_examples(typed(["data=hf", f"data.path={ds}", "data.val_fraction=0.2"]).data, "sft")
    assert prepared.format == "chat" and len(prepared.train) + len(prepared.val) == 50

    named = tmp_path / "named"
    named.mkdir()
    (named / "README.md").write_text("# card\n")
    _jsonl(named / "train.jsonl", [_chat(i) for i in range(50)])
    _jsonl(named / "validation.jsonl", [_chat(i) for i in range(100, 110)])
    prepared = load_examples(typed(["data=hf", f"data.path={named}", "data.validation_split=validation"]).data, "sft")
    assert len(prepared.train) == 50 and len(prepared.val) == 10
    assert prepared.val[0]["messages"][0]["content"] == "What is 100 plus 1?"
    with pytest.raises(UserError, match=r"data.split: the directory .* has no split 'test' \(its files make the "
                                        r"splits train, validation, by their names\)"):
        load_examples(typed(["data=hf", f"data.path={named}", "data.split=test"]).data, "sft")


@pytest.mark.slow
def test_hf_local_directory_without_data_files_is_refused(tmp_path):
    ds = tmp_path / "only_docs"
    ds.mkdir()
    (ds / "README.md").write_text("# A card and nothing else\nline two\nline three\n")
    r = run_cli([*QUICK, "data=hf", f"data.path={ds}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (f"data.path: the directory '{ds}' holds no data files (JSONL/JSON/Parquet/CSV, or .txt); it has: "
            f"README.md. Point data.path at the data files") in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_rows_cut_or_dropped_for_length_are_said_where_the_user_looks(tmp_path):
    """A third of a user's rows dropped and two thirds cut to data.max_length printed nothing: only
    summary.json's data_stats held it. The printed result now says it, with the same counts."""
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(40)]
    rows += [{"prompt": f"Question {i}?", "completion": " ".join(["long"] * 80)} for i in range(40, 60)]
    rows += [{"prompt": " ".join(["wordy"] * 80) + f" {i}?", "completion": "Short."} for i in range(60, 70)]
    data = _jsonl(tmp_path / "mixed_lengths.jsonl", rows)
    run = tmp_path / "run"
    r = run_cli([*QUICK, "data=files", f"data.path={data}", "data.max_length=48", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    train = json.loads((run / "summary.json").read_text())["data_stats"]["train"]
    assert train["truncated"] > 0 and train["dropped_no_target"] > 0, train
    printed = " ".join(r.stderr.split())
    assert (f"data: of {train['samples']} training samples, {train['truncated']} cut to data.max_length, "
            f"{train['dropped_no_target']} dropped with nothing left to learn once cut") in printed, printed[-1500:]
    assert "data.overlong=split" not in printed  # (prompt/completion rows cannot be split)
    assert printed.count(f"{train['truncated']} cut to data.max_length") == 2  # before training too, as a warning
    from llmexp.record import data_cut

    cut = data_cut({"stage": "pretrain", "data_stats": {"train": {"samples": 10, "truncated": 3}}})
    assert cut.endswith("; data.overlong=split keeps the rest of each as rows of its own"), cut


def _chat_row(i):
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def test_a_bad_row_is_named_by_its_file_and_line(tmp_path):
    """Rows are placed as an editor shows them: the line of the JSONL or CSV file (blank lines
    counted, the header too), and inside a directory the file, not a row index counted from 0
    over every file."""
    good = [_chat_row(i) for i in range(6)]
    unanswered = {"messages": [{"role": "user", "content": "no answer"}]}
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in [*good[:2], unanswered, *good]))
    with pytest.raises(UserError, match=r"\n    line 5: messages has no assistant message"):
        load_examples(typed(["data=files", f"data.path={tmp_path / 'one.jsonl'}"]).data, "sft")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    _jsonl(folder / "a.jsonl", good)
    _jsonl(folder / "sub" / "b.jsonl", [good[0], unanswered])
    with pytest.raises(UserError, match=r"\n    sub/b.jsonl line 2: messages has no assistant message"):
        load_examples(typed(["data=files", f"data.path={folder}"]).data, "sft")
    csv = tmp_path / "pc.csv"
    csv.write_text('prompt,completion\nq1,a1\n"a question\nover two lines",\nq3,a3\n')
    with pytest.raises(UserError, match=r"\n    line 4: completion is null"):
        load_examples(typed(["data=files", f"data.path={csv}"]).data, "sft")


def test_a_file_mixing_two_formats_is_named_as_such(tmp_path):
    """Chat rows and prompt/completion rows in one file: one message saying so, with the
    conversion, instead of every prompt/completion row listed as 'messages is null'."""
    rows = [_chat_row(i) if i % 3 else {"prompt": f"q{i}", "completion": f"a{i}"} for i in range(30)]
    with pytest.raises(UserError) as e:
        load_examples(typed(["data=files", f"data.path={_jsonl(tmp_path / 'mixed.jsonl', rows)}"]).data, "sft")
    assert str(e.value).startswith("data: ") and "mixes formats: 10 rows are prompt_completion (prompt+completion, " \
        "the first at line 1), the others chat (messages)" in str(e.value), e.value
    assert '[{"role": "user", "content": <prompt>}, {"role": "assistant", "content": <completion>}]' in str(e.value)


def test_a_field_of_two_kinds_is_named_with_both_places(tmp_path):
    """Where datasets cannot read a field holding text in one row and a list in another (across
    files it said 'An error occurred while generating the dataset', in a file with blank lines
    'Expected object or value'), both places are named; where it reads them, each row is named
    with its own fix (above)."""
    _jsonl(tmp_path / "a.jsonl", [_chat_row(i) for i in range(5)])
    _jsonl(tmp_path / "b.jsonl", [_chat_row(5), {"messages": "a string"}])
    with pytest.raises(UserError, match=r"^data.path: \S+/b.jsonl line 2: 'messages' is text, but a list of objects at "
                                        r"\S+/a.jsonl line 1; a field holds one kind of value in every row"):
        load_examples(typed(["data=files", f"data.path={tmp_path}"]).data, "sft")
    blank = tmp_path / "blank_lines.jsonl"
    blank.write_text("".join(json.dumps(r) + "\n\n" for r in [_chat_row(0), {"messages": "hi"}, _chat_row(1)]))
    with pytest.raises(UserError, match=r"blank_lines.jsonl line 3: 'messages' is text, but a list of objects at line 1"):
        load_examples(typed(["data=files", f"data.path={blank}"]).data, "sft")


def test_a_field_of_two_kinds_that_datasets_reads_through_pandas_is_named_not_every_row(tmp_path):
    """A JSON array whose 'instruction' is a number in one row loads (through pandas, which also made
    every "3" in 'output' the number 3): every row then failed its check as 'content 3, not text';
    the row that caused it is named instead."""
    rows = [{"instruction": "Add 1 and 2.", "input": "", "output": "3"} for _ in range(50)]
    rows[7]["instruction"] = 5
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps(rows))
    with pytest.raises(UserError) as e:
        load_examples(typed(["data=files", f"data.path={f}"]).data, "sft")
    assert str(e.value) == (f"data.path: {f} row 8: 'instruction' is a number, but text at row 1; a field holds one "
                            f"kind of value in every row: fix row 8 (or the rows like row 1)")


@pytest.mark.parametrize("name,text,words", [
    ("blank.jsonl", "\n\n  \n", "blank.jsonl holds no rows, only blank lines"),
    ("header.csv", "prompt,completion\n", "header.csv' holds no rows (a CSV file is a header line, then one line per row)"),
])
def test_a_file_without_rows_says_so(tmp_path, name, text, words):
    """datasets said 'Instruction "train" corresponds to no data!'."""
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=re.escape(words)):
        load_examples(typed(["data=files", f"data.path={tmp_path / name}"]).data, "sft")


def test_rows_with_an_empty_answer_are_counted_and_said(tmp_path, capsys):
    """Some completions empty (not all: that is refused): the run trains, and says before training
    and in its printed result how many and where the first is; summary.json keeps it in notes."""
    from llmexp.data.rows import empty_answers_note
    from llmexp.record import print_result

    rows = [{"prompt": f"What is {i} plus 1?", "completion": " " if i % 10 == 3 else f"{i + 1}"} for i in range(60)]
    prepared = load_examples(typed(["data=files", f"data.path={_jsonl(tmp_path / 'pc.jsonl', rows)}"]).data, "sft")
    assert prepared.log[0] == {"step": "check_rows", "field": "completion", "empty": 6, "rows": 60, "first": "line 4"}
    note = empty_answers_note(prepared.log)
    assert note == ("data: 6 of 60 rows have a completion with no text (the first at line 4): the model learns to "
                    "answer their prompts with nothing; fill them in or remove them if that is not meant")
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "" if i == 7 else "a"}]}
             for i in range(20)]
    log = load_examples(typed(["data=files", f"data.path={_jsonl(tmp_path / 'chat.jsonl', chats)}"]).data, "sft").log
    assert empty_answers_note(log).startswith("data: 1 of 20 rows has an assistant message with no text (the first "
                                              "at line 8)")
    full = [{"prompt": r["prompt"], "completion": "x"} for r in rows]
    assert empty_answers_note(load_examples(typed(["data=files", f"data.path={_jsonl(tmp_path / 'full.jsonl', full)}"]
                                                  ).data, "sft").log) is None
    print_result({"stage": "sft", "model": "llama", "global_step": 5, "wall_seconds": 1.0, "initial": {}, "final": {},
                  "run_dir": "x", "notes": ["something else", note]})
    printed = " ".join(capsys.readouterr().err.split())
    assert "data: 6 of 60 rows have a completion with no text (the first at line 4)" in printed
    assert "something else" not in printed


def test_too_few_training_rows_says_where_the_others_went(tmp_path):
    """500 rows of 8 distinct prompts: 'one optimizer step needs 16 training rows but the data has 7'
    did not say that dedup removed 492 of them."""
    from llmexp.data.module import where_rows_went

    rows = [{"prompt": f"q{i % 8}", "completion": f"a{i % 8}"} for i in range(500)]
    prepared = load_examples(typed(["data=files", f"data.path={_jsonl(tmp_path / 'few.jsonl', rows)}"]).data, "sft")
    assert where_rows_went(prepared.log) == "of 500 rows, dedup removed 492, 1 held out for validation"
    r = run_cli([*QUICK, "data=files", f"data.path={tmp_path / 'few.jsonl'}", "trainer.micro_batch_size=16",
                 f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "needs 16 training rows (micro_batch_size x grad_accum) but the data has 7 (of 500 rows, dedup removed " \
           "492, 1 held out for validation); lower trainer.micro_batch_size or trainer.grad_accum, or give more " \
           "(distinct) rows" in " ".join(r.stderr.split()), r.stderr


def test_dedup_removing_most_of_a_users_rows_is_said_before_training(tmp_path):
    """Generated data of 500 rows kept 36 after dedup, and validation measured 2 of them: summary.json
    alone said so."""
    rows = [{"prompt": f"Question {i % 30}?", "completion": f"Answer {i % 30}."} for i in range(300)]
    data = _jsonl(tmp_path / "repeats.jsonl", rows)
    run = tmp_path / "run"
    r = run_cli([*QUICK, "data=files", f"data.path={data}", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    said = "data: dedup kept 30 of 300 rows, the others repeating one of them word for word"
    assert said in " ".join(r.stderr.split()), r.stderr[-2000:]
    assert any(n.startswith(said) for n in json.loads((run / "summary.json").read_text())["notes"])


def test_prompts_longer_than_the_model_are_not_told_to_raise_max_length_past_it():
    """DPO on long conversations: "raise data.max_length above 648 (to 668 ...)", and then 668 was
    refused as more than the model's 512 positions. Prompts past the model are said as such."""
    from llmexp.data.module import length_advice

    cfg = typed(["stage=dpo", "data.max_length=64"]).data
    pair = {"chosen_input_ids": [1] * 700, "chosen_labels": [-100] * 650 + [1] * 50,
            "rejected_input_ids": [1] * 690, "rejected_labels": [-100] * 650 + [1] * 40}
    said = length_advice([pair], cfg, "preference", context=512)
    assert said.startswith("every sample's prompt is longer than the model's 512 positions") and "raise" not in said
    assert "raise data.max_length above 650" in length_advice([pair], cfg, "preference", context=1024)
