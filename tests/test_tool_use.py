"""Tool use reaches a chat template as it reads it, in training and serving alike: a conversation's
tools (the functions it may call) and its calls' arguments."""

from __future__ import annotations

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
