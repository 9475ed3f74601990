"""ShareGPT and Alpaca files train as they are: both read as chat messages (llmexp.data.layouts)."""

from __future__ import annotations

import json

import pytest
from llmexp.testing import FAST, check_config, train, typed

from llmexp.data.encode import IGNORE_INDEX, lm_encoder
from llmexp.data.formats import detect_format
from llmexp.data.layouts import alpaca_messages, sharegpt_messages
from llmexp.data.module import load_examples
from llmexp.errors import ConfigError, UserError
from llmexp.models.tokenizer import load_tokenizer

QUESTIONS = [(a, b) for a in range(10) for b in range(10)]


def _sharegpt(path, system=None, speaker="gpt"):
    with open(path, "w") as fh:
        for a, b in QUESTIONS:
            row = {"conversations": [{"from": "human", "value": f"What is {a} plus {b}?"},
                                     {"from": speaker, "value": f"{a} + {b} = {a + b}"}]}
            if system:
                row["system"] = system
            fh.write(json.dumps(row) + "\n")
    return path


def _alpaca(path):
    path.write_text(json.dumps([{"instruction": "Add the numbers.", "input": f"{a} and {b}",
                                 "output": f"{a} + {b} = {a + b}"} for a, b in QUESTIONS]))
    return path


def test_sharegpt_turns_become_messages_with_roles():
    turns = [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "hi"},
             {"from": "gpt", "value": "hello"}, {"from": "function_call", "value": "{}"},
             {"from": "observation", "value": "42"}, {"from": "GPT", "value": "done"}]
    assert sharegpt_messages(turns) == [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "assistant", "content": "{}"},
        {"role": "tool", "content": "42"}, {"role": "assistant", "content": "done"}]
    # a system column comes first unless the conversation has its own; role/content turns pass through
    assert sharegpt_messages([{"from": "human", "value": "hi"}], "S")[0] == {"role": "system", "content": "S"}
    assert len(sharegpt_messages(turns, "S")) == len(turns)
    assert sharegpt_messages([{"role": "user", "content": "hi"}]) == [{"role": "user", "content": "hi"}]
    assert sharegpt_messages([{"from": "bot", "value": "x"}]) == [{"role": "bot", "content": "x"}]  # named later


def test_an_alpaca_row_becomes_chat_messages():
    row = {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7", "system": "Be terse.",
           "history": [["What is 1 plus 1?", "2"]]}
    assert alpaca_messages(row) == {"messages": [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 1 plus 1?"},
        {"role": "assistant", "content": "2"}, {"role": "user", "content": "Add the numbers.\n3 and 4"},
        {"role": "assistant", "content": "7"}]}
    bare = alpaca_messages({"instruction": "Say hi.", "input": "", "output": "hi"})["messages"]
    assert bare == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]


def test_the_layouts_are_detected_from_their_columns():
    assert detect_format(["conversations"], {}) == "chat"
    assert detect_format(["conversations", "system", "id"], {}) == "chat"
    assert detect_format(["instruction", "input", "output"], {}) == "chat"
    assert detect_format(["instruction", "output"], {}) == "chat"
    assert detect_format(["instruction", "input"], {}) is None  # no answer: not Alpaca
    assert detect_format(["messages", "conversations"], {}) == "chat"  # llmexp's own column wins


def test_a_sharegpt_file_loads_as_chat_and_learns_only_the_answers(tmp_path):
    f = _sharegpt(tmp_path / "sharegpt.jsonl", system="You add.")
    prepared = load_examples(typed(["data=files", f"data.path={f}"]).data, "sft")
    assert prepared.format == "chat"
    row = next(r for r in prepared.train if r["messages"][1]["content"] == "What is 3 plus 4?")
    assert row["messages"] == [{"role": "system", "content": "You add."}, {"role": "user", "content": "What is 3 plus 4?"},
                               {"role": "assistant", "content": "3 + 4 = 7"}]
    assert "conversations" not in prepared.train.column_names and "system" not in prepared.train.column_names
    tok = load_tokenizer(None, None)
    enc = lm_encoder("chat", tok, True)(row)
    assert tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX]) == "3 + 4 = 7<|end|>"


def test_an_alpaca_file_loads_as_chat_learns_only_the_output_and_mixes_with_sharegpt(tmp_path):
    f = _alpaca(tmp_path / "alpaca.json")
    prepared = load_examples(typed(["data=files", f"data.path={f}"]).data, "sft")
    assert prepared.format == "chat"
    assert prepared.train.column_names == ["messages"]
    row = next(r for r in prepared.train if r["messages"][0]["content"] == "Add the numbers.\n3 and 4")
    assert row["messages"][1:] == [{"role": "assistant", "content": "3 + 4 = 7"}]
    tok = load_tokenizer(None, None)
    enc = lm_encoder("chat", tok, True)(row)
    assert tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX]) == "3 + 4 = 7<|end|>"
    s = _sharegpt(tmp_path / "sharegpt.jsonl")
    mixed = load_examples(typed(["data=mixture", f"data.mixture=[{{source: files, path: '{f}'}}, "
                                 f"{{source: files, path: '{s}'}}]"]).data, "sft")
    users = {r["messages"][0]["content"] for r in (*mixed.train, *mixed.val)}
    assert "Add the numbers.\n3 and 4" in users and "What is 3 plus 4?" in users


@pytest.mark.parametrize("layout", ["sharegpt", "alpaca"])
def test_sft_on_a_layout_file_trains_and_scores_the_held_out_answers(tmp_path, layout):
    f = _sharegpt(tmp_path / "d.jsonl") if layout == "sharegpt" else _alpaca(tmp_path / "d.json")
    run = train(tmp_path, ["data=files", f"data.path={f}", "trainer.max_steps=40"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data_stats"]["format"] == "chat"
    assert summary["task"]["check"] == "reference" and summary["task"]["prompts"] == 5  # 5 % of 100 held out
    assert summary["final"]["val/loss"] < summary["initial"]["val/loss"] - 2


def test_a_sharegpt_speaker_llmexp_does_not_know_is_named_with_its_line(tmp_path):
    f = _sharegpt(tmp_path / "bad.jsonl", speaker="bot")
    with pytest.raises(UserError) as e:
        load_examples(typed(["data=files", f"data.path={f}"]).data, "sft")
    assert "line 1: messages message 1 has role 'bot'" in str(e.value)


def test_a_layout_a_stage_cannot_train_on_is_refused_before_the_run(tmp_path):
    f = _alpaca(tmp_path / "alpaca.json")
    with pytest.raises(ConfigError) as e:
        check_config(["stage=dpo", "data=files", f"data.path={f}", *FAST[:1]])
    assert "stage=dpo needs fields prompt+chosen+rejected" in str(e.value) and "format 'chat'" in str(e.value)


def test_chat_rows_are_rollout_prompts_with_their_answer_as_reference(tmp_path):
    """grpo (ppo, rloo, online_dpo) on chat data, a ShareGPT file as it is: the conversation before
    its last answer is the prompt, the answer the reference a reward may compare with."""
    from llmexp.data.encode import as_prompt_row

    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                         {"role": "assistant", "content": "A"}], "id": 7}
    assert as_prompt_row(chat) == {"id": 7, "prompt": chat["messages"][:2], "completion": "A"}
    assert as_prompt_row({"prompt": "P"}) == {"prompt": "P"}
    question = {"messages": [{"role": "user", "content": "Q"}]}
    assert as_prompt_row(question) == {"prompt": question["messages"]}
    f = _sharegpt(tmp_path / "sharegpt.jsonl")
    run = train(tmp_path, ["stage=grpo", "data=files", f"data.path={f}", "data.max_length=64", "trainer.max_steps=2",
                           "trainer.val_check_interval=2", "trainer.micro_batch_size=4", "stage.group_size=2",
                           "stage.rollout.max_new_tokens=8"])
    summary = json.loads((run / "summary.json").read_text())
    # a user's file: rewarded and measured by its rows' own answers (reference_match), not the skill's rule
    assert summary["data_stats"]["format"] == "chat" and summary["task"]["check"] == "reference_match"
    assert -1.0 <= summary["final"]["val/reward"] <= 1.0  # -1: an answer that never ended (grpo's penalty)


def test_conversational_prompt_completion_trains_the_completion_alone():
    """A prompt of several turns, an assistant's among them: its tokens were trained too (val/loss
    6.26 -> 2.76 on a prompt's random assistant turn), where TRL trains the completion alone."""
    row = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "noise xyz"},
                      {"role": "user", "content": "again"}],
           "completion": [{"role": "assistant", "content": "Hello there."}]}
    tok = load_tokenizer(None, None)
    enc = lm_encoder("prompt_completion", tok, True)(row)
    assert tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX]) == "Hello there.<|end|>"
    whole = lm_encoder("prompt_completion", tok, False)(row)  # without the completion-only loss: everything
    assert whole["labels"] == whole["input_ids"] == enc["input_ids"]


def test_a_column_of_turns_under_another_name_is_suggested_as_the_messages(tmp_path):
    """A "conversation" column of turns: "no recognised format ... map your columns with
    data.fields.<name>=<column>", naming no field."""
    from llmexp.errors import ConfigError

    f = tmp_path / "conv.jsonl"
    f.write_text("".join(json.dumps({"id": i, "conversation": [{"role": "user", "content": f"u{i}"},
                                                               {"role": "assistant", "content": f"v{i}"}]}) + "\n"
                         for i in range(20)))
    with pytest.raises(ConfigError) as e:
        typed(["data=files", f"data.path={f}"])
    assert "(data.fields.messages=conversation: it holds a conversation's turns; in data.mixture: fields: " \
        "{messages: conversation})" in str(e.value)
    assert typed(["data=files", f"data.path={f}", "data.fields.messages=conversation"]).data.fields.messages == \
        "conversation"


def test_pairs_that_differ_before_their_last_answer_are_said(tmp_path):
    """Whole conversations in chosen/rejected that differ at a user turn: the shared prefix became the
    prompt and DPO trained the turns after it, the user's among them, without a word."""
    from llmexp.data.fields import diverging_note

    def turns(user2, answer):
        return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": user2}, {"role": "assistant", "content": answer}]

    rows = [{"chosen": turns("add 1 and 2", "3"), "rejected": turns("add 1 and 2", "4")} for _ in range(30)]
    rows += [{"chosen": turns(f"add {i} and 2", "x"), "rejected": turns(f"add {i} and 3", "y")} for i in range(10)]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = load_examples(typed(["stage=dpo", "data=files", f"data.path={f}", "data.steps=[]"]).data, "dpo")
    note = diverging_note(prepared.log)
    assert note is not None and note.startswith("data: 10 pairs' chosen and rejected differ before the last answer "
                                                "(the first at row 31)"), note


def test_preference_labels_end_at_the_answers_eos():
    """A template that writes a newline after the turn's end (ChatML): DPO labelled it, a token the
    model never emits (12 nats under the SFT model): chosen answers started at 1.66 nats, not 0.006."""
    from llmexp.data.encode import encode_preference, unpaired_encoder

    tok = load_tokenizer(None, None)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    prompt = [{"role": "user", "content": "Add 3 and 4."}]
    enc = encode_preference(tok, prompt, [{"role": "assistant", "content": "3 + 4 = 7"}],
                            [{"role": "assistant", "content": "3 + 4 = 8"}])
    for ids, labels in ((enc["input_ids"], enc["labels"]), (enc["rejected_input_ids"], enc["rejected_labels"])):
        assert tok.decode(ids).endswith("<|end|>\n")
        assert tok.decode([t for t in labels if t != IGNORE_INDEX]) in ("3 + 4 = 7<|end|>", "3 + 4 = 8<|end|>")
    kto = unpaired_encoder(tok, "unpaired_preference")({"prompt": prompt, "label": True,
                                                         "completion": [{"role": "assistant", "content": "7"}]})
    assert tok.decode([t for t in kto["labels"] if t != IGNORE_INDEX]) == "7<|end|>"
