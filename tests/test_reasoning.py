"""Reasoning ("thinking") models: trained on reasoning as their template writes it, judged on the
answer after it, served with it apart (reasoning_content)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from llmexp.reasoning import ReasoningStream, answer_of, split_reasoning, with_reasoning_as_the_template_reads

WRITTEN = "<think>\nthree plus four makes 7.\n</think>\n\n3 + 4 = 7"
OPENED = "three plus four makes 7.\n</think>\n\n3 + 4 = 7"  # DeepSeek-R1's: the prompt opened the block


@pytest.mark.parametrize("text, opened, expected", [
    (WRITTEN, False, ("three plus four makes 7.", "3 + 4 = 7")),
    (OPENED, True, ("three plus four makes 7.", "3 + 4 = 7")),
    ("3 + 4 = 7", False, (None, "3 + 4 = 7")),
    ("<think>\nthree plus", False, ("three plus", "")),  # cut off while thinking: no answer
    ("<think></think>3 + 4 = 7", False, ("", "3 + 4 = 7")),  # Qwen3 asked not to think
    ("the tag <think> later", False, (None, "the tag <think> later")),
])
def test_reasoning_and_answer_are_split_as_written(text, opened, expected):
    assert split_reasoning(text, opened) == expected


def test_the_answer_is_what_follows_the_reasoning():
    assert answer_of(WRITTEN) == answer_of(OPENED) == answer_of("3 + 4 = 7") == "3 + 4 = 7"
    assert answer_of("<think>\nthree plus") == ""


@pytest.mark.parametrize("text, opened", [(WRITTEN, False), (OPENED, True), ("3 + 4 = 7", False),
                                          ("<think>\nthree plus", False), ("<thinking aloud", False)])
def test_streamed_deltas_split_as_the_whole_text_does_wherever_the_text_is_cut(text, opened):
    """A marker cut between deltas ('</th' + 'ink>') is held back, not sent as reasoning."""
    reasoning, answer = split_reasoning(text, opened)
    cuts = list(range(1, len(text)))
    for n in (1, 2):
        for points in itertools.combinations(cuts, n):
            parts = [text[a:b] for a, b in zip((0, *points), (*points, len(text)))]
            stream, got = ReasoningStream(opened), ["", ""]
            for i, part in enumerate(parts):
                r, c = stream.feed(part, final=i == len(parts) - 1)
                got[0], got[1] = got[0] + r, got[1] + c
            assert got == [reasoning or "", answer], parts


def test_reasoning_goes_under_the_key_the_template_reads_or_into_the_content():
    """Datasets name it reasoning_content, reasoning or thinking; a template reads one of them, or
    none (llmexp's own: it was dropped, and the model learnt answers without their reasoning)."""
    turns = [{"role": "user", "content": "Add 3 and 4."},
             {"role": "assistant", "content": "3 + 4 = 7", "reasoning": "three plus four makes 7."}]
    qwen3 = "{% if message.reasoning_content is string %}{{ message.reasoning_content }}{% endif %}"
    gpt_oss = "{% if message.thinking %}{{ message['thinking'] }}{% endif %}"
    assert with_reasoning_as_the_template_reads(turns, qwen3)[1] == {
        "role": "assistant", "content": "3 + 4 = 7", "reasoning_content": "three plus four makes 7."}
    assert with_reasoning_as_the_template_reads(turns, gpt_oss)[1]["thinking"] == "three plus four makes 7."
    assert with_reasoning_as_the_template_reads(turns, "{{ message.content }}")[1] == {
        "role": "assistant", "content": WRITTEN}
    plain = turns[:1] + [{"role": "assistant", "content": "3 + 4 = 7"}]
    assert with_reasoning_as_the_template_reads(plain, qwen3) is plain


def test_llmexp_template_trains_the_reasoning_before_the_answer():
    from llmexp.data.encode import encode_chat
    from llmexp.models.tokenizer import load_tokenizer

    tok = load_tokenizer(None, None)
    turns = [{"role": "user", "content": "Add 3 and 4."},
             {"role": "assistant", "content": "3 + 4 = 7", "reasoning_content": "three plus four makes 7."}]
    enc = encode_chat(tok, turns, assistant_only=True)
    trained = tok.decode([t for t in enc["labels"] if t != -100])
    assert trained == WRITTEN + tok.eos_token, trained


def qwen3_template() -> str:
    """Qwen3's chat template, as TRL keeps it to recognise the model (trl/chat_templates/qwen3.jinja)."""
    import trl

    path = Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja"
    assert path.is_file(), f"TRL {trl.__version__} keeps no {path}"
    return path.read_text()


def test_qwen3s_template_renders_a_rows_reasoning_under_its_own_name_and_labels_it():
    """A row's ``reasoning`` reaches Qwen3's template as the reasoning_content it reads, in the
    answer's labels; an earlier turn's reasoning is dropped as Qwen3's template drops it."""
    from llmexp.data.encode import encode_chat
    from llmexp.models.tokenizer import load_tokenizer

    tok = load_tokenizer(None, None)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token, tok.chat_template = "<|im_end|>", qwen3_template()
    turns = [{"role": "user", "content": "Add 1 and 1."},
             {"role": "assistant", "content": "1 + 1 = 2", "reasoning": "one plus one makes 2."},
             {"role": "user", "content": "Add 3 and 4."},
             {"role": "assistant", "content": "3 + 4 = 7", "reasoning": "three plus four makes 7."}]
    enc = encode_chat(tok, turns, assistant_only=True)
    trained = tok.decode([t for t in enc["labels"] if t != -100])
    assert trained == "1 + 1 = 2<|im_end|>" + WRITTEN + "<|im_end|>", trained


def test_serve_passes_chat_template_kwargs_to_the_template_and_refuses_bad_ones():
    """vLLM's extension, which clients send to turn Qwen3's reasoning off; it was accepted and
    dropped (the model reasoned anyway)."""
    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.serving.api import ChatRequest, RequestProblem, ServedModel, check_request, messages_of, tools_for

    tok = load_tokenizer(None, None)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token, tok.chat_template = "<|im_end|>", qwen3_template()
    served = ServedModel(model_dir="unused", name="m", max_new_tokens=8, temperature=0.0, max_batch_size=4)
    asked = [{"role": "user", "content": "Add 3 and 4."}]

    def prompt(**extra) -> str:
        request = ChatRequest(messages=asked, **extra)
        check_request(request, served, tok, None)
        return tok.apply_chat_template(messages_of(request, tok.chat_template), add_generation_prompt=True,
                                       tokenize=False, **tools_for(request))

    assert prompt().endswith("<|im_start|>assistant\n")
    assert prompt(chat_template_kwargs={"enable_thinking": False}).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    for bad in ([True], {"enable thinking": False}, {"add_generation_prompt": False}):
        with pytest.raises(RequestProblem, match="chat_template_kwargs"):
            prompt(chat_template_kwargs=bad)


def test_the_skill_and_reference_checks_judge_the_answer_after_the_reasoning():
    """Both failed every answer of a reasoning model (the whole text is not 'a op b = c')."""
    from llmexp.data.formats import reference_match
    from llmexp.data.skill import correctness_reward

    assert correctness_reward(WRITTEN, solution="3 + 4 = 7") == correctness_reward(OPENED, solution="3 + 4 = 7") == 1.0
    assert correctness_reward("<think>\n3 + 4 = 7", solution="3 + 4 = 7") == 0.0  # never answered
    assert correctness_reward(WRITTEN.replace("= 7", "= 8"), solution="3 + 4 = 7") == 0.0
    assert reference_match(WRITTEN, "3 + 4 = 7") == reference_match(WRITTEN, WRITTEN) == 1.0
    assert reference_match("<think>\n3 + 4 = 7\n</think>\n\n7", "3 + 4 = 7") == 0.0


@pytest.mark.slow
def test_a_model_trained_on_reasoning_thinks_before_answering_and_is_judged_on_its_answers(calculator_sft):
    """The task metric gives a reasoning model room for its reasoning and checks the answer after
    it: it scored 0.00 -> 0.00 while the model reasoned and answered right (the limit cut answers
    off mid-thought, and the whole text never equalled a reference). The model: calculator traces
    whose answers carry their reasoning (tests/tool_traces.py), in a template that reads none."""
    run = calculator_sft / "sft"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["val/task_score"] >= 0.8, summary["final"]
    assert summary["task"]["max_new_tokens"] > 24  # room for the reasoning
    answers = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    right = [a for a in answers if a["step"] == summary["global_step"] and a["score"] == 1.0]
    assert right and all(a["answer"].startswith("<think>\nThe calculator says ") and "\n</think>\n\n" in a["answer"]
                         for a in right), right


@pytest.mark.slow
def test_served_reasoning_comes_apart_from_the_answer_streamed_or_not(calculator_sft, tmp_path):
    """As vLLM's reasoning parsers and DeepSeek's API: message.reasoning_content and the answer in
    content; streamed, reasoning deltas first, then content deltas, adding up to the same."""
    import shutil

    from test_serving import client, serving

    run = tmp_path / "sft"
    shutil.copytree(calculator_sft / "sft", run, ignore=shutil.ignore_patterns("checkpoints"))
    call = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "3 + 4"}'}}
    asked = [{"role": "user", "content": "Add 3 and 4."}, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "content": "7"}]
    with serving(run) as s:
        c = client(s["url"], key="unused")
        reply = c.chat.completions.create(model="sft-llama", messages=asked, temperature=0, max_tokens=60)
        chunks = list(c.chat.completions.create(model="sft-llama", messages=asked, temperature=0, max_tokens=60,
                                                stream=True))
    message = reply.choices[0].message
    assert (message.content, message.model_extra.get("reasoning_content")) == ("3 + 4 = 7", "The calculator says 7."), \
        message
    deltas = [ch.delta for chunk in chunks for ch in chunk.choices]
    kinds = ["reasoning" if (d.model_extra or {}).get("reasoning_content") else "content" if d.content else None
             for d in deltas]
    kinds = [k for k in kinds if k]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning") and len(set(kinds)) == 2, kinds
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "The calculator says 7."
    assert "".join(d.content or "" for d in deltas) == "3 + 4 = 7"
