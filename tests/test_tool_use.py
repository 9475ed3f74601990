"""Tool use reaches a chat template as it reads it, in training and serving alike: a conversation's
tools (the functions it may call) and its calls' arguments."""

from __future__ import annotations

import pytest

# Qwen2.5's way of writing a call (its template, cut to the tool-call part): arguments | tojson;
# and of giving the tools: their schemas in a system turn before the conversation
TOJSON = (
    "{% if tools %}<|system|>\nYou may call: {% for t in tools %}{{ t | tojson }}{% endfor %}{{ eos_token }}\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
    "{% for c in m.tool_calls or [] %}{% set c = c.function if c.function is defined else c %}"
    "<tool_call>{\"name\": \"{{ c.name }}\", \"arguments\": {{ c.arguments | tojson }}}</tool_call>{% endfor %}"
    "{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}
CHAT = [{"role": "user", "content": "Add 3 and 4."}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "7"}]


def _tokenizer(template: str):
    from llmexp.models.tokenizer import load_tokenizer

    tok = load_tokenizer(None, None)
    tok.chat_template = template
    return tok


def test_openai_string_arguments_are_written_as_the_object_a_tojson_template_expects():
    """An OpenAI client's (and most datasets') string arguments went through `tojson` as a quoted,
    escaped string: the model trained and was asked with `"arguments": "{\\"a\\": 3, ...}"`."""
    from litserve.specs.openai import ChatCompletionRequest

    from llmexp.data.encode import encode_chat
    from llmexp.serving.api import messages_of

    tok = _tokenizer(TOJSON)
    trained = tok.decode(encode_chat(tok, [*CHAT[:2]], assistant_only=True)["input_ids"])
    assert '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>' in trained, trained
    request = ChatCompletionRequest(messages=CHAT)
    asked = tok.apply_chat_template(messages_of(request, tok.chat_template), add_generation_prompt=True,
                                    tokenize=False)
    assert '"arguments": {"a": 3, "b": 4}}</tool_call>' in asked and "\\\"" not in asked, asked
    assert asked.startswith(trained)  # asked as it trained
    from llmexp.data.encode import render_prompt

    assert tok.decode(render_prompt(tok, CHAT)) == asked  # a preference or rollout prompt likewise


def test_arguments_stay_as_given_where_the_template_writes_them_itself_or_they_are_not_an_object():
    from llmexp.tool_use import as_the_template_reads

    writes_itself = "{% for c in m.tool_calls %}{{ c.function.arguments }}{% endfor %}"
    assert as_the_template_reads(CHAT, writes_itself) is CHAT
    odd = [{"role": "assistant", "tool_calls": [{"name": "f", "arguments": "[1, 2]"}, {"name": "g", "arguments": "{oops"},
                                                {"name": "h", "arguments": {"x": 1}}, {"name": "k", "arguments": '{"y": 2}'}]}]
    assert [c["arguments"] for c in as_the_template_reads(odd, TOJSON)[0]["tool_calls"]] == [
        "[1, 2]", "{oops", {"x": 1}, {"y": 2}]
    assert CHAT[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 3, "b": 4}'  # the row itself unchanged


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_a_conversations_tools_are_given_to_the_template_it_trains_with():
    """A tools column (function schemas, as a list or, as most datasets keep it, JSON text) was
    dropped: the model learnt to call functions it was never shown. The template gets them now."""
    import json

    from llmexp.data.encode import lm_encoder

    tok = _tokenizer(TOJSON)
    row = {"messages": CHAT[:2], "tools": json.dumps(WEATHER)}
    trained = tok.decode(lm_encoder("chat", tok, True)(row)["input_ids"])
    assert trained.startswith('<|system|>\nYou may call: {"type": "function", "function": {"name": "get_weather"'), trained
    assert tok.decode(lm_encoder("chat", tok, True)({**row, "tools": WEATHER})["input_ids"]) == trained
    assert tok.decode(lm_encoder("chat", tok, True)({**row, "tools": None})["input_ids"]).startswith("<|user|>")


def test_tools_a_template_drops_or_that_are_not_schemas_are_refused_with_the_row():
    import json

    import pytest
    from datasets import Dataset

    from llmexp.data.rows import check_rows, tools_problem
    from llmexp.errors import UserError
    from llmexp.models.tokenizer import CHAT_TEMPLATE

    rows = [{"messages": CHAT[:2], "tools": json.dumps(WEATHER)}, {"messages": CHAT[:2], "tools": ""}] * 2
    entry = check_rows(Dataset.from_list(rows), "chat", "'calls.jsonl'")
    assert (entry["tools"], entry["first_tools"]) == (2, "row 1")
    problem = tools_problem([entry], CHAT_TEMPLATE, "'calls.jsonl'")
    assert problem.startswith("data: 2 conversations of 'calls.jsonl' give tools (the first at row 1), which the chat "
                              "template does not render"), problem
    assert tools_problem([entry], TOJSON, "'calls.jsonl'") is None
    with pytest.raises(UserError, match=r"'calls.jsonl', row 2: tools is text that is not JSON"):
        check_rows(Dataset.from_list([rows[0], {**rows[0], "tools": "get_weather(city)"}]), "chat", "'calls.jsonl'")


def test_preference_and_kto_rows_give_their_tools_to_the_template_too():
    import json

    import pytest
    from datasets import Dataset

    from llmexp.data.encode import preference_encoder, unpaired_encoder
    from llmexp.data.rows import check_rows, tools_problem
    from llmexp.errors import UserError

    tok = _tokenizer(TOJSON)
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    pair = {"prompt": asked, "chosen": [{"role": "assistant", "content": "Sunny."}],
            "rejected": [{"role": "assistant", "content": "Rain."}], "tools": json.dumps(WEATHER)}
    enc = preference_encoder(tok)(pair)
    assert tok.decode(enc["input_ids"]).startswith('<|system|>\nYou may call: {"type": "function"')
    assert tok.decode([t for t in enc["labels"] if t != -100]) == "Sunny.<|end|>"  # the schemas are prompt
    rated = unpaired_encoder(tok, "unpaired_preference")({"prompt": asked, "completion": "Sunny.", "label": True,
                                                          "tools": WEATHER})
    assert rated["input_ids"] == enc["input_ids"]
    entry = check_rows(Dataset.from_list([pair] * 3), "preference", "'pairs.jsonl'")
    assert entry["tools"] == 3
    assert tools_problem([entry], TOJSON, "'pairs.jsonl'", rollout=True).startswith(
        "data: 3 rows of 'pairs.jsonl' give tools (the first at row 1), which the rollout stages do not give the chat "
        "template")
    with pytest.raises(UserError, match=r"row 1: gives tools, which go to the chat template, and its prompt is plain text"):
        check_rows(Dataset.from_list([{**pair, "prompt": "Weather in Paris?", "chosen": "Sunny.", "rejected": "Rain."}]),
                   "preference", "'pairs.jsonl'")


CHATML_TOOLS = (  # Qwen2.5's shape: tools in the system turn, calls as <tool_call> JSON, <|im_end|> ends a turn
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% for c in m.tool_calls or [] %}"
    "<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


LLAMA31_TOOLS = (  # Llama 3.1's shape: the tools in a system turn, an answer that calls is the call's JSON alone
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\n{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "<|eot_id|>{% endif %}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", \"parameters\": "
    "{{ c.function.arguments | tojson }}}{% endfor %}{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


MISTRAL_TOOLS = (  # Mistral v0.3's shape: no generation prompt (the answer follows [/INST]), calls as a JSON list
    "{% for m in messages %}{% if m.role == 'user' %}{% if tools and loop.last %}[AVAILABLE_TOOLS] {{ tools | tojson }}"
    "[/AVAILABLE_TOOLS]{% endif %}[INST] {{ m.content }} [/INST]{% elif m.tool_calls %}[TOOL_CALLS] ["
    "{% for c in m.tool_calls %}{% if c.id | length != 9 %}{{ raise_exception('ids are 9 characters') }}{% endif %}"
    "{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}, \"id\": "
    "\"{{ c.id }}\"}{% endfor %}]{{ eos_token }}{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}")


def test_the_response_template_that_finds_a_models_calls():
    """The tokenizer's own, else transformers' for the family where the chat template is that
    family's (a qwen2 model with Qwen's ChatML), else Hermes' for a template writing <tool_call>;
    none for a template that writes no calls (llmexp's)."""
    from transformers import LlamaConfig, Qwen2Config

    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.serving.tool_calls import response_template

    assert response_template(load_tokenizer(None, None), LlamaConfig()) is None
    hermes = response_template(_tokenizer(TOJSON), LlamaConfig())
    assert hermes["start_anchor"] == "<|end|><|assistant|>\n" and hermes["fields"]["tool_calls"]["open_pattern"] == r"\s*<tool_call>"
    assert response_template(_tokenizer(TOJSON), Qwen2Config()) == hermes  # Qwen's anchor is not this template's
    qwen = response_template(_tokenizer(CHATML_TOOLS), Qwen2Config())  # transformers', its thinking kept as content
    assert qwen["start_anchor"] == "<|im_start|>assistant\n" and set(qwen["fields"]) == {"tool_calls", "content"}
    assert response_template(_tokenizer(CHATML_TOOLS), LlamaConfig())["start_anchor"] == \
        "<|im_end|>\n<|im_start|>assistant\n"
    llama = response_template(_tokenizer(LLAMA31_TOOLS), LlamaConfig())  # found by rendering a call
    assert llama["start_anchor"] == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert llama["fields"]["tool_calls"]["transform"]["function"]["arguments"] == "{content.parameters}"
    mistral = response_template(_tokenizer(MISTRAL_TOOLS), LlamaConfig())  # no generation prompt: after [/INST]
    assert mistral["start_anchor"] == " [/INST]" and "TOOL_CALLS" in mistral["fields"]["tool_calls"]["open_pattern"]
    own = _tokenizer(TOJSON)
    own.response_template = {**hermes, "defaults": {"role": "assistant", "mine": True}}
    assert response_template(own, LlamaConfig())["defaults"]["mine"]


@pytest.mark.parametrize("answer,content,calls", [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 2}}', "",
     [("a", {}), ("b", {"x": 2})]),
    ("Paris is sunny.", "Paris is sunny.", None),
    ('{"x": 1}', '{"x": 1}', None),  # an answer in JSON that names no function: the text as written
    ('{"name": "get_weather", "parameters": {"ci', '{"name": "get_weather", "parameters": {"ci', None),
])
def test_llama_31_calls_are_parsed_into_openais_form(answer, content, calls):
    _parsed_as(LLAMA31_TOOLS, answer, content, calls)


@pytest.mark.parametrize("answer,content,calls", [
    ('[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}, "id": "abcdefghi"}, {"name": "b", "arguments": {}}]', "",
     [("a", {"x": 1}), ("b", {})]),
    ("Sunny.", "Sunny.", None),
    ('[TOOL_CALLS] [{"x": 1}]', '[TOOL_CALLS] [{"x": 1}]', None),
])
def test_mistral_calls_are_parsed_into_openais_form(answer, content, calls):
    _parsed_as(MISTRAL_TOOLS, answer, content, calls)


@pytest.mark.parametrize("answer,content,calls", [
    ('Let me see.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', "Let me see.",
     [("get_weather", {"city": "Paris"})]),
    ('<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n<tool_call>{"name": "b", "arguments": {}}</tool_call>',
     "", [("a", {"x": 1}), ("b", {})]),
    ("Sunny.", "Sunny.", None),
    # cut off at max_tokens, or JSON that is no call: the text as the model wrote it
    ('<tool_call>{"name": "get_weather", "arguments": {"ci', '<tool_call>{"name": "get_weather", "arguments": {"ci', None),
    ('<tool_call>{"x": 1}</tool_call>', '<tool_call>{"x": 1}</tool_call>', None),
])
def test_an_answers_calls_are_parsed_into_openais_form(answer, content, calls):
    _parsed_as(CHATML_TOOLS, answer, content, calls)


def test_a_qwen_models_thinking_stays_in_content_as_without_tools():
    """transformers' Qwen template parses <think>...</think> into reasoning_content, which the API's
    response model drops: the thinking vanished from answers asked with tools."""
    from transformers import Qwen2Config

    _parsed_as(CHATML_TOOLS, '<think>rain?</think>Sunny.<tool_call>{"name": "a", "arguments": {}}</tool_call>',
               "<think>rain?</think>Sunny.", [("a", {})], Qwen2Config())


def _parsed_as(template, answer, content, calls, config=None):
    import json

    from transformers import LlamaConfig

    from llmexp.serving.tool_calls import parsed_answer, response_template

    config = config or LlamaConfig()
    tok = _tokenizer(template)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Weather?"}], tools=WEATHER, add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"]
    ids = tok(answer + tok.eos_token, add_special_tokens=False).input_ids
    got_content, got_calls = parsed_answer(tok, response_template(tok, config), ids, prompt, WEATHER)
    assert got_content == content
    if calls is None:
        assert got_calls is None
    else:
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
        assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got_calls)
        assert len({c["id"] for c in got_calls}) == len(calls)


def test_a_pretrained_models_other_stop_tokens_are_kept(tmp_path):
    """Llama 3.1's generation config stops at <|eot_id|>, <|eom_id|> (after a tool call) and
    <|end_of_text|>; a run kept only the tokenizer's eos, so a served model ran on past a tool call
    to max_tokens. The tokenizer's eos comes first, the model's others are kept, and serve stops
    at each."""
    from transformers import GenerationConfig

    from llmexp.models.build import build_model, stop_tokens
    from llmexp.serving.engine import stop_ids
    from llmexp.testing import typed

    tok = _tokenizer(TOJSON)
    tok.add_tokens(["<|eom|>"], special_tokens=True)
    eom = tok.convert_tokens_to_ids("<|eom|>")
    base = build_model(typed([]).model, tok)
    base.generation_config.eos_token_id = [tok.eos_token_id, eom]
    base.save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    model = build_model(typed([f"model.pretrained={tmp_path / 'base'}"]).model, tok)
    assert model.generation_config.eos_token_id == [tok.eos_token_id, eom]
    assert stop_ids(model, tok) == {tok.eos_token_id, eom}
    model.save_pretrained(str(tmp_path / "out"))
    assert GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [tok.eos_token_id, eom]
    assert stop_tokens([7, 2], 2) == [2, 7] and stop_tokens(2, 2) == 2 and stop_tokens(None, 5) == 5
    assert stop_tokens(None, None) is None


def test_an_answer_without_calls_streams_as_it_is_written_when_tools_are_given(tiny_teacher):
    """A request with tools was answered whole at its end (its text held back in case it was a
    call): a chat client that passes tools with every request lost streaming. The text outside calls
    streams token by token, the same text as without the parser."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmexp.serving.engine import GenerationRequest, stream_answers
    from llmexp.serving.tool_calls import response_template

    tok = _tokenizer(CHATML_TOOLS)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher)).eval()
    asked = [GenerationRequest([{"role": "user", "content": "Weather?"}], max_new_tokens=12,
                                   template_arguments={"tools": WEATHER})]
    template = response_template(tok, model.config)
    torch.manual_seed(0)
    parsed = [step[0] for step in stream_answers(model, tok, asked, template)]
    plain = [step[0] for step in stream_answers(model, tok, asked)]
    assert len([s for s in parsed[:-1] if s["content"]]) > 3  # streamed, not one chunk at the end
    assert "".join(s["content"] for s in parsed).strip() == "".join(s["content"] for s in plain).strip() != ""
    assert "tool_calls" not in parsed[-1] and parsed[-1]["finish_reason"] == plain[-1]["finish_reason"]
