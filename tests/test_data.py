"""Data: sources with field mapping, preparation steps, SFT masking, packing."""

from __future__ import annotations

import json

import pytest
from llmexp.testing import typed

from llmexp.data.encode import IGNORE_INDEX, encode_chat, encode_prompt_completion, encode_text
from llmexp.data.module import load_examples
from llmexp.data.packing import best_fit_decreasing, pack
from llmexp.data.prepare import collapse_whitespace_text, normalize_text
from llmexp.errors import UserError
from llmexp.models.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None, None)


def test_bundled_tokenizer_has_pad_eos_and_chat_template(tok):
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|end|>" and tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    # Digits are single tokens, so arithmetic is learnable token by token.
    assert tok.tokenize("12") == ["1", "2"]


def test_sft_loss_counts_only_assistant_tokens(tok):
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 3 plus 4?"},
            {"role": "assistant", "content": "3 + 4 = 7"}, {"role": "user", "content": "And 1 plus 1?"},
            {"role": "assistant", "content": "1 + 1 = 2"}]
    enc = encode_chat(tok, msgs, assistant_only=True)
    targets = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tok.decode(targets) == "3 + 4 = 7<|end|>1 + 1 = 2<|end|>"
    assert len(enc["labels"]) == len(enc["input_ids"])
    full = encode_chat(tok, msgs, assistant_only=False)
    assert full["labels"] == full["input_ids"] == enc["input_ids"]


def test_masking_without_generation_markers_matches_marker_masking(tok):
    """Pretrained tokenizers rarely mark assistant turns: masks come from rendered prefixes."""
    import copy

    msgs = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "3 + 4 = 7"}]
    plain = copy.copy(tok)
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert encode_chat(plain, msgs, True)["labels"] == encode_chat(tok, msgs, True)["labels"]


def test_prompt_completion_and_text_encoding(tok):
    enc = encode_prompt_completion(tok, "Q: 2+2?", " A: 4", completion_only=True)
    assert tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX]) == " A: 4<|end|>"
    txt = encode_text(tok, "one plus one is two.")
    assert txt["input_ids"][-1] == tok.eos_token_id and txt["labels"] == txt["input_ids"]


def test_normalize_keeps_whitespace_and_characters_and_collapse_whitespace_is_asked_for():
    code = "def f(x):\r\n    if x > 0:\r\n\treturn x\x07  \n"
    assert normalize_text(code) == "def f(x):\n    if x > 0:\n\treturn x  \n"  # indentation is syntax
    assert normalize_text(" 42") == " 42"  # a completion's leading space is part of its first token
    assert normalize_text("x² ﬁ ½") == "x² ﬁ ½"  # NFC, not NFKC (which made 'x2 fi 1⁄2')
    assert normalize_text("e\u0301") == "\u00e9"  # composed: the same character, one encoding
    assert collapse_whitespace_text("  a\u00a0 b\t\tc \nd ") == "a b c\nd"


def test_best_fit_decreasing_packs_tightly():
    bins = best_fit_decreasing([5, 4, 3, 3, 2, 1], capacity=6)
    assert sorted(sorted(b) for b in bins) == [[0, 5], [1, 4], [2, 3]]
    with pytest.raises(ValueError):
        best_fit_decreasing([7], capacity=6)


def test_pack_restarts_positions_and_masks_boundaries():
    a = {"input_ids": [1, 2, 3], "labels": [1, 2, 3]}
    b = {"input_ids": [4, 5], "labels": [IGNORE_INDEX, 5]}
    (row,) = pack([a, b], capacity=8)
    assert row["input_ids"] == [1, 2, 3, 4, 5]
    assert row["position_ids"] == [0, 1, 2, 0, 1]
    assert row["labels"] == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_jsonl_with_field_mapping_and_prep_steps(tmp_path):
    rows = [{"conv": [{"role": "user", "content": f"q{i}  "}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(40)]
    rows += rows[:10]  # exact duplicates
    f = _jsonl(tmp_path / "chat.jsonl", rows)
    cfg = typed(["data=files", f"data.path={f}", "data.fields.messages=conv", "data.val_fraction=0.1"]).data
    prepared = load_examples(cfg, "sft")
    assert prepared.format == "chat"
    log = {e["step"]: e for e in prepared.log}
    assert log["dedup"]["rows_in"] == 50 and log["dedup"]["rows_out"] == 40
    assert log["split"] == {"step": "split", "train_rows": 36, "val_rows": 4}
    contents = {m["content"] for r in prepared.train for m in r["messages"]}
    assert "q0  " in contents or "q1  " in contents  # whitespace is content: kept as written
    cfg = typed(["data=files", f"data.path={f}", "data.fields.messages=conv", "data.val_fraction=0.1",
                 "data.steps=[normalize,collapse_whitespace,filter_length,dedup]"]).data
    contents = {m["content"] for r in load_examples(cfg, "sft").train for m in r["messages"]}
    assert ("q0" in contents or "q1" in contents) and not any(c.endswith(" ") for c in contents)  # asked for


@pytest.mark.parametrize("suffix", ["csv", "parquet", "json"])
def test_csv_parquet_json_prompt_completion(tmp_path, suffix):
    import pandas as pd

    df = pd.DataFrame({"question": [f"What is {i} plus 1?" for i in range(30)],
                       "answer": [f"{i} + 1 = {i + 1}" for i in range(30)]})
    f = tmp_path / f"d.{suffix}"
    {"csv": lambda: df.to_csv(f, index=False), "parquet": lambda: df.to_parquet(f),
     "json": lambda: f.write_text(df.to_json(orient="records"))}[suffix]()
    cfg = typed(["data=files", f"data.path={f}", "data.fields.prompt=question",
                 "data.fields.completion=answer"]).data
    prepared = load_examples(cfg, "sft")
    assert prepared.format == "prompt_completion"
    assert len(prepared.train) + len(prepared.val) == 30


def test_csv_cells_are_the_text_they_are_and_an_empty_one_is_missing(tmp_path):
    """Answers that look like numbers or NA are text; pandas read them as int ('row 0: completion is
    int, not text') or as missing, which the user could not fix in the file. An empty cell is still
    missing, and refused as before."""
    rows = [(f"{q} ({i})", a) for i in range(8)
            for q, a in [("What is 3 plus 3?", "6"), ("Is it known?", "NA"), ("Say null.", "null"), ("Half of 3?", "1.50")]]
    f = tmp_path / "answers.csv"
    f.write_text("question,answer\n" + "".join(f"{q},{a}\n" for q, a in rows))
    cfg = typed(["data=files", f"data.path={f}", "data.fields.prompt=question", "data.fields.completion=answer"]).data
    prepared = load_examples(cfg, "sft")
    got = {r["prompt"]: r["completion"] for split in (prepared.train, prepared.val) for r in split}
    assert got == dict(rows)
    f.write_text("question,answer\n" + "".join(f"{q},{a}\n" for q, a in rows) + "Empty?,\n")
    with pytest.raises(UserError, match="completion is null"):
        load_examples(cfg, "sft")


def test_saved_dataset_directory_as_hf_source(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"text": f"doc {i}"} for i in range(20)]),
                 "test": Dataset.from_list([{"text": f"held {i}"} for i in range(5)])}).save_to_disk(str(tmp_path / "ds"))
    cfg = typed(["data=hf", f"data.path={tmp_path / 'ds'}", "data.validation_split=test", "stage=pretrain"]).data
    prepared = load_examples(cfg, "pretrain")
    assert (len(prepared.train), len(prepared.val)) == (20, 5) and prepared.format == "text"
    # a split name's typo is named with the key and the splits there are (it said "(split 'train'): 'tst'")
    for override, words in [("data.split=trian", "data.split=trian: "), ("data.validation_split=tst",
                                                                        "data.validation_split=tst: ")]:
        bad = typed(["data=hf", f"data.path={tmp_path / 'ds'}", override, "stage=pretrain"]).data
        with pytest.raises(UserError, match=words + ".*has no split.*did you mean") as e:
            load_examples(bad, "pretrain")
        assert "(valid: test, train)" in str(e.value)
    Dataset.from_list([{"text": f"doc {i}"} for i in range(20)]).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(UserError, match="is one dataset without splits; unset data.validation_split"):
        load_examples(typed(["data=hf", f"data.path={tmp_path / 'one'}", "data.validation_split=test",
                             "stage=pretrain"]).data, "pretrain")


def test_a_jsonl_file_saved_with_a_byte_order_mark_loads(tmp_path):
    """Windows' editors write UTF-8 with a BOM; datasets reads it, and llmexp's line check refused
    line 1 as invalid JSON ('fix or remove that line')."""
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n"
                                           for i in range(30)).encode())
    prepared = load_examples(typed(["data=files", f"data.path={f}"]).data, "sft")
    rows = [*prepared.train, *prepared.val]
    assert len(rows) == 30 and {r["prompt"] for r in rows} == {f"q{i}" for i in range(30)}


def test_malformed_json_line_is_named(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken}\n')
    cfg = typed(["data=files", f"data.path={f}", "stage=pretrain"]).data
    with pytest.raises(UserError, match=r"bad.jsonl line 2 is not valid JSON"):
        load_examples(cfg, "pretrain")


def test_everything_filtered_out_is_a_clear_error(tmp_path):
    f = _jsonl(tmp_path / "t.jsonl", [{"text": "short"}] * 3)
    cfg = typed(["data=files", f"data.path={f}", "stage=pretrain", "data.min_chars=100"]).data
    with pytest.raises(UserError, match="filter_length"):
        load_examples(cfg, "pretrain")


def test_bundled_generators_are_seeded_and_checkable():
    from llmexp.data import skill

    a = list(skill.chat_examples(5, seed=7))
    assert a == list(skill.chat_examples(5, seed=7)) and a != list(skill.chat_examples(5, seed=8))
    q = a[0]["messages"][1]["content"]
    left, right = q.split(" = ")
    assert eval(left) == int(right)  # noqa: S307 - our own generated arithmetic
    assert skill.correctness_reward("2 + 2 = 4", "4") == 1.0 and skill.correctness_reward("2 + 2 = 5", "4") == 0.0


def test_preference_rows_with_an_implicit_prompt_get_it_extracted_as_trl_does(tmp_path):
    """TRL's implicit-prompt format (whole conversations in chosen and rejected): the shared turns
    become the prompt, and every preference stage takes the rows (dpo here, kto unpairs them)."""
    rows = [{"chosen": [{"role": "user", "content": f"What is {i} plus 1?"},
                        {"role": "assistant", "content": f"{i} + 1 = {i + 1}"}],
             "rejected": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"{i} + 1 = {i + 2}"}]} for i in range(40)]
    path = tmp_path / "implicit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for stage in ("dpo", "kto"):
        prepared = load_examples(typed([f"stage={stage}", "data=files", f"data.path={path}"]).data, stage)
        assert prepared.format == "preference"
        row = prepared.train[0]
        assert len(row["prompt"]) == 1 and row["prompt"][0]["role"] == "user"
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        n = row["prompt"][0]["content"].split()[2]  # "What is <n> plus 1?": the answers to that question
        assert row["chosen"][0]["content"].startswith(f"{n} + 1 = ") and row["rejected"][0]["content"].startswith(n)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}<|im_end|>{% endif %}\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_chat_template_of_ones_own_trains_the_chat_data_and_goes_with_the_export(tmp_path):
    """model.chat_template: a Jinja file (or the template itself) renders the chat data, SFT learns
    the answer and its eos under it, and the exported tokenizer keeps it for generate/serve/eval."""
    from llmexp.testing import train
    from transformers import AutoTokenizer

    f = tmp_path / "chatml.jinja"
    f.write_text(CHATML)
    tok = load_tokenizer(None, None, chat_template=str(f))
    msgs = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "3 + 4 = 7"}]
    enc = encode_chat(tok, msgs, assistant_only=True)
    assert tok.decode(enc["input_ids"]).startswith("<|im_start|>user\nWhat is 3 plus 4?<|im_end|>")
    assert tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX]).startswith("3 + 4 = 7<|end|>")
    run = train(tmp_path, [f"model.chat_template={f}", "trainer.max_steps=5"])
    exported = AutoTokenizer.from_pretrained(run / "model")
    assert exported.chat_template == CHATML
    literal = '{% for m in messages %}{{ m["content"] }}{% if m["role"] == "assistant" %}{{ eos_token }}{% endif %}{% endfor %}'
    assert typed([f"model.chat_template='{literal}'"]).model.chat_template == literal


def test_plain_rows_under_ones_own_chat_template_train_as_its_turns(tmp_path):
    """Plain prompt/completion rows with model.chat_template: trained raw, exported with ChatML, so
    generate asked through ChatML got an empty answer. They train (and are measured) as its turns."""
    from llmexp.testing import train

    f = tmp_path / "chatml.jinja"
    f.write_text(CHATML)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} plus 1?", "completion": f"{a} + 1 = {a + 1}"}) + "\n"
                            for a in range(60)))
    run = train(tmp_path, [f"model.chat_template={f}", "data=files", f"data.path={data}", "trainer.max_steps=5"])
    s = json.loads((run / "summary.json").read_text())
    assert any("asked as chat turns: the model is asked through model.chat_template" in n for n in s["notes"])
    asked = [json.loads(line)["prompt"] for line in (run / "answers.jsonl").read_text().splitlines()]
    assert asked and all(isinstance(p, list) and p[0]["role"] == "user" for p in asked)


def test_plain_rows_sft_from_a_model_with_its_own_chat_template_train_as_its_turns(tmp_path):
    """A Qwen2-like model whose tokenizer carries ChatML, fine-tuned on plain prompt/completion rows:
    trained raw and exported with ChatML, generate matched none of the run's recorded answers."""
    from llmexp.models.build import build_model
    from llmexp.testing import train

    tok = load_tokenizer(None, None)
    tok.chat_template = CHATML
    build_model(typed([]).model, tok).save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} plus 1?", "completion": f"{a} + 1 = {a + 1}"}) + "\n"
                            for a in range(60)))
    run = train(tmp_path, [f"model.pretrained={tmp_path / 'base'}", "data=files", f"data.path={data}",
                           "trainer.max_steps=5"])
    s = json.loads((run / "summary.json").read_text())
    assert any(f"asked as chat turns: the model is asked through {tmp_path / 'base'}'s chat template" in n
               for n in s["notes"]), s.get("notes")
    asked = [json.loads(line)["prompt"] for line in (run / "answers.jsonl").read_text().splitlines()]
    assert asked and all(isinstance(p, list) and p[0]["role"] == "user" for p in asked)


def test_a_models_own_template_ending_answers_with_another_token_than_eos_learns_to_stop(tmp_path):
    """Gemma's template ends an answer with <end_of_turn>, its eos is <eos>: the model learnt to end
    with <end_of_turn>, generation stopped at eos only, and every answer ran on (task score 0.00
    with val/loss 0.73). That token is the run's eos now: the default SFT from such a model learns
    the task, and its export stops there."""
    from llmexp.models.build import build_model
    from llmexp.testing import run_cli
    from transformers import AutoTokenizer, GenerationConfig

    tok = load_tokenizer(None, None)
    tok.add_tokens(["<end_of_turn>", "<start_of_turn>"], special_tokens=True)
    tok.chat_template = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                         "{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}")
    build_model(typed([]).model, tok).save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    run = tmp_path / "run"
    r = run_cli(["logger=none", "trainer.progress_bar=false", f"model.pretrained={tmp_path / 'base'}",
                 f"hydra.run.dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert any("the model's chat template ends an answer with '<end_of_turn>', not the eos '<|end|>'" in n
               for n in s["notes"]), s.get("notes")
    assert s["final"]["val/task_score"] >= 0.9, s["final"]
    exported = AutoTokenizer.from_pretrained(run / "model")
    assert exported.eos_token == "<end_of_turn>"
    # generation stops at the turn end, and at the eos the base model's generation config named (as Gemma's own do)
    assert GenerationConfig.from_pretrained(run / "model").eos_token_id == \
        [exported.convert_tokens_to_ids("<end_of_turn>"), exported.convert_tokens_to_ids("<|end|>")]
    # the same tokenizer given by model.tokenizer to a model built from its config (it got no fix)
    r = run_cli(["logger=none", "trainer.progress_bar=false", f"model.tokenizer={tmp_path / 'base'}",
                 "trainer.max_steps=5", "trainer.val_check_interval=5", f"hydra.run.dir={tmp_path / 'built'}"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert AutoTokenizer.from_pretrained(tmp_path / "built" / "model").eos_token == "<end_of_turn>"
    # the same template given as model.chat_template (it was refused: only eos could end an answer)
    (tmp_path / "turns.jinja").write_text(tok.chat_template)
    r = run_cli(["logger=none", "trainer.progress_bar=false", f"model.tokenizer={tmp_path / 'base'}",
                 f"model.chat_template={tmp_path / 'turns.jinja'}", "trainer.max_steps=5", "trainer.val_check_interval=5",
                 f"hydra.run.dir={tmp_path / 'given'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert AutoTokenizer.from_pretrained(tmp_path / "given" / "model").eos_token == "<end_of_turn>"
    assert any(n.startswith("model.chat_template ends an answer with '<end_of_turn>', not the eos '<|end|>'")
               for n in json.loads((tmp_path / "given" / "summary.json").read_text())["notes"])
    # a template that ends an answer with no special token at all is refused, as model.chat_template is
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(str(tmp_path / "base"))
    r = run_cli([f"model.pretrained={tmp_path / 'base'}", f"hydra.run.dir={tmp_path / 'refused'}"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "chat template does not end an assistant message with a special token" in r.stderr


def test_the_fallback_templates_generation_prompt_is_a_prefix_of_the_trained_turns():
    """'assistant: ' ended the prompt with a space that a GPT-2-style byte-level tokenizer keeps as a
    token alone, while in training it began the answer's first token: asked, the model dropped it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmexp.models.tokenizer import plain_headers_template

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["user: Add 5 and 6.\nassistant: 5 + 6 = 11"] * 50, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    tok.chat_template = plain_headers_template("</s>")
    user = [{"role": "user", "content": "Add 5 and 6."}]
    whole = tok.apply_chat_template([*user, {"role": "assistant", "content": "5 + 6 = 11"}], tokenize=True)
    asked = tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True)
    whole, asked = (x["input_ids"] if hasattr(x, "keys") else x for x in (whole, asked))
    assert whole[: len(asked)] == asked and tok.decode(whole[len(asked):]) == "5 + 6 = 11</s>"


def test_a_chat_template_that_is_missing_broken_or_never_ends_an_answer_is_refused(tmp_path):
    from llmexp.errors import ConfigError
    from llmexp.testing import check_config

    with pytest.raises(ConfigError, match="'nothere.jinja' is neither a file nor a Jinja template"):
        check_config(["model.chat_template=nothere.jinja"])
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ConfigError, match="the template is not valid Jinja"):
        check_config([f"model.chat_template={broken}"])
    endless = tmp_path / "endless.jinja"
    endless.write_text(CHATML.replace("{{ eos_token }}", "<|im_end|>"))
    with pytest.raises(UserError) as e:
        load_tokenizer(None, None, chat_template=str(endless))
    assert "an assistant message is not followed by the tokenizer's eos token '<|end|>'" in str(e.value)


def test_a_system_prompt_goes_into_the_template_for_conversations_without_one(tmp_path):
    """model.system_prompt: put first in every conversation that has no system message, by the chat
    template itself, so training and the exported model's users (generate, serve, eval) see it."""
    from llmexp.run import prepare_data
    from llmexp.testing import train
    from transformers import AutoTokenizer

    text = 'You are "terse".\nAnswer with numbers.'
    tok = load_tokenizer(None, None, system_prompt=text)
    msgs = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "3 + 4 = 7"}]
    enc = encode_chat(tok, msgs, assistant_only=True)
    assert tok.decode(enc["input_ids"]).startswith(f"<|system|>\n{text}<|end|>\n<|user|>\nWhat is 3 plus 4?")
    assert tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX]) == "3 + 4 = 7<|end|>"  # not the system's
    own = [{"role": "system", "content": "Mine."}, *msgs]
    assert tok.apply_chat_template(own, tokenize=False).count("<|system|>") == 1  # a conversation's own is kept
    run = train(tmp_path, ["model.system_prompt=Be brief.", "trainer.max_steps=5"])
    exported = AutoTokenizer.from_pretrained(run / "model")
    assert exported.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                        add_generation_prompt=True).startswith("<|system|>\nBe brief.<|end|>")
    plain = _jsonl(tmp_path / "plain.jsonl", [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(30)])
    for overrides in (["stage=pretrain", "data=arithmetic_text"], ["data=files", f"data.path={plain}"]):
        with pytest.raises(UserError, match="model.system_prompt: .* holds plain text"):
            prepare_data(typed([*overrides, "model.system_prompt=x"]))


def test_the_default_preparation_keeps_code_as_written():
    """data.steps' defaults (normalize, filter_length, dedup) on chat rows of code: every character
    stays, the indentation included."""
    from datasets import Dataset
    from llmexp.config.schema import DataConfig
    from llmexp.data.prepare import run_steps

    code = "def f(x):\n    if x > 0:\n        return x\n    return -x  # |x|, x² ≥ 0"
    rows = [{"messages": [{"role": "user", "content": f"abs, take {i}"}, {"role": "assistant", "content": code}]}
            for i in range(3)]
    ds, log = run_steps(Dataset.from_list(rows), DataConfig())
    assert [s["step"] for s in log] == ["normalize", "filter_length", "dedup"]
    assert [r["messages"][1]["content"] for r in ds] == [code] * 3


def test_dedup_keeps_rows_that_differ_only_in_their_label():
    """KTO rows: the same completion labelled good and bad are two examples (dedup dropped every
    bad one of such a file); exact repeats still go."""
    from datasets import Dataset
    from llmexp.config.schema import DataConfig
    from llmexp.data.prepare import run_steps

    rows = [{"prompt": f"Add {i} and 1.", "completion": f"{i} + 1 = {i + 1}", "label": label}
            for label in (True, False) for i in range(5)]
    ds, log = run_steps(Dataset.from_list(rows + rows[:3]), DataConfig())
    assert log[-1] == {"step": "dedup", "rows_in": 13, "rows_out": 10}
    assert sorted(r["label"] for r in ds) == [False] * 5 + [True] * 5


def test_tool_calls_train_through_a_template_that_renders_them_and_empty_turns_are_counted(tmp_path):
    """OpenAI-style tool_calls: refused with llmexp's template (tests/test_bad_input.py); a template
    that renders them trains the call. An empty assistant turn among others is counted for the
    warning (the rows' joined answers were not empty, so it was not)."""
    from datasets import Dataset
    from llmexp.data.encode import lm_encoder
    from llmexp.data.rows import check_rows, tool_calls_problem
    from llmexp.models.tokenizer import CHAT_TEMPLATE, load_tokenizer

    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": 3}'}}]}
    row = {"messages": [{"role": "user", "content": "Weather in 3?"}, call, {"role": "tool", "content": "9 degrees"},
                        {"role": "assistant", "content": "It is 9 degrees."}]}
    entry = check_rows(Dataset.from_list([row] * 3), "chat", "'tools.jsonl'")
    assert (entry["tool_calls"], entry["empty"]) == (3, 0)  # a turn that calls a tool is not empty
    assert "3 rows of 'tools.jsonl' have assistant turns with tool_calls" in tool_calls_problem([entry], CHAT_TEMPLATE,
                                                                                                "'tools.jsonl'")
    renders = CHAT_TEMPLATE.replace(
        "{% generation %}{{ message['content']",
        "{% generation %}{% for c in message.tool_calls or [] %}{{ '<call>' + c.function.name + ' ' + "
        "c.function.arguments + '</call>' }}{% endfor %}{{ message['content']")
    assert tool_calls_problem([entry], renders, "'tools.jsonl'") is None
    (tmp_path / "tools.jinja").write_text(renders)
    tok = load_tokenizer(None, None, None, False, "llama", chat_template=str(tmp_path / "tools.jinja"))
    encoded = lm_encoder("chat", tok, True)(row)
    trained = tok.decode([t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != -100])
    assert trained == '<call>get_weather {"city": 3}</call><|end|>It is 9 degrees.<|end|>'

    one_empty = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "},
                              {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]}
    entry = check_rows(Dataset.from_list([one_empty, row]), "chat", "'chats.jsonl'")
    assert (entry["empty"], entry["first"]) == (1, "row 1")


def test_a_builder_that_never_ends_is_stopped_with_its_name(monkeypatch):
    """A plugin's generator that ignored its num_samples ran until memory ran out, printing nothing."""
    import itertools

    from llmexp.data import sources
    from llmexp.errors import UserError

    monkeypatch.setattr(sources, "MOST_GENERATED_ROWS", 50)  # 10 million in use: the same check, sooner
    where = "data.name: dataset 'forever' of plugin 'p' (p 1.0): build()"
    endless = ({"text": f"row {n}"} for n in itertools.count())
    with pytest.raises(UserError, match=r"build\(\) made more than 50 rows and had not ended; fix: make the builder stop"):
        sources._table(where, endless)
    assert len(sources._table(where, [{"text": str(n)} for n in range(80)])) == 80  # a list has its end
    assert len(sources._table(where, ({"text": str(n)} for n in range(50)))) == 50


def test_a_plugin_row_of_another_format_or_with_a_misnamed_field_is_said_so():
    """One prompt/completion row among a builder's chat rows: Dataset.from_list kept the first row's
    columns only, so it was "messages must be a non-empty list, got NoneType"; a message with
    "text" for "content" was "has content None, not text"."""
    from llmexp.data import sources
    from llmexp.data.rows import check_rows

    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ds = sources._table("b()", [chat] * 37 + [{"prompt": "p", "completion": "c"}])
    assert ds.column_names == ["messages", "prompt", "completion"]
    with pytest.raises(UserError, match=r"mixes formats: 1 row is prompt_completion \(prompt\+completion, the first "
                                        r"at row 38\), the others chat"):
        check_rows(ds, "chat", "dataset 'x'")
    misnamed = sources._table("b()", [{"messages": [{"role": "user", "text": "q"},
                                                    {"role": "assistant", "text": "a"}]}] * 3)
    with pytest.raises(UserError, match=r"row 1: messages message 0 \(user\) has text but no content: a message is "
                                        r"\{role, content\}"):
        check_rows(misnamed, "chat", "dataset 'x'")


def test_a_text_file_that_is_not_utf8_and_text_files_beside_structured_ones_are_named(tmp_path, capsys):
    """A .txt corpus with a latin-1 byte: "cannot read 'corpus/' as text: 'utf-8' codec can't decode",
    naming the directory; a .txt beside one .jsonl was left out without a word (the run then said
    "1 row is too few")."""
    from llmexp.data import sources

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_bytes(b"hello world\nabc \xff def\n")
    with pytest.raises(UserError, match=r"c/a.txt line 2 is not UTF-8 text \(byte 0xff at column 5\)"):
        sources._files(typed(["stage=pretrain", "data=files", f"data.path={tmp_path / 'c'}"]).data)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.txt").write_text("hello world\n" * 10)
    (tmp_path / "m" / "b.jsonl").write_text('{"text": "hi"}\n{"text": "there"}\n')
    assert sources.text_files_left_out(str(tmp_path / "m")) == ["a.txt"]
    assert len(sources._files(typed(["stage=pretrain", "data=files", f"data.path={tmp_path / 'm'}"]).data)) == 2
    assert f"and 1 text file(s), which are not (a.txt); for the text give a glob, e.g. data.path='{tmp_path / 'm'}/*.txt'" \
        in capsys.readouterr().err


def test_a_dataset_directory_with_a_card_or_an_unused_validation_split_is_said(tmp_path, capsys):
    """data=files on a directory whose README card names train and validation files trained on both;
    a saved DatasetDict's validation split went unused while rows of train were held out instead."""
    from datasets import Dataset, DatasetDict

    from llmexp.data import sources
    from llmexp.errors import ConfigError

    card = tmp_path / "carded"
    card.mkdir()
    for name, n in (("alpha", 30), ("beta", 10)):
        (card / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n"
                                                    for i in range(n)))
    (card / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: alpha.jsonl\n  - split: validation\n    path: beta.jsonl\n---\n")
    with pytest.raises(ConfigError) as e:
        typed(["data=files", f"data.path={card}"])
    assert "README.md card names its files and splits" in str(e.value) and f"data=hf data.path={card}" in str(e.value)
    train, val = sources.load_raw(typed(["data=hf", f"data.path={card}", "data.validation_split=validation"]).data)
    assert (len(train), len(val)) == (30, 10)
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    DatasetDict({"train": Dataset.from_list(rows[:30]), "validation": Dataset.from_list(rows[30:])}).save_to_disk(
        str(tmp_path / "saved"))
    capsys.readouterr()
    train, val = sources.load_raw(typed(["data=hf", f"data.path={tmp_path / 'saved'}"]).data)
    assert val is None and "has a 'validation' split, which is not used" in capsys.readouterr().err
    # a mixture's source has no validation split to give: not told to set one it cannot
    sources.load_raw(typed(["data=hf", f"data.path={tmp_path / 'saved'}"]).data, in_mixture=True)
    assert "which is not used" not in capsys.readouterr().err


def test_a_template_without_a_system_role_refuses_a_system_prompt_in_one_line(tmp_path):
    """Gemma's template raises on a system message: model.system_prompt gave a traceback from the
    encoder, and generate --system one of its own."""
    from llmexp.errors import UserError
    from llmexp.generate import generate
    from llmexp.models.build import build_model

    tok = load_tokenizer(None, None)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    tok.save_pretrained(str(tmp_path / "tok"))
    with pytest.raises(UserError, match=r"model.system_prompt: the chat template cannot render a system message "
                                        r"\(System role not supported\)"):
        load_tokenizer(str(tmp_path / "tok"), None, system_prompt="Be terse.")
    model = build_model(typed([]).model, tok)
    with pytest.raises(UserError, match=r"--system: the model's chat template cannot render it"):
        generate(model, tok, ["Add 2 and 3."], max_new_tokens=2, system="Be terse.")
