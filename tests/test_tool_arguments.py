"""Tool calls' arguments reach a template as it reads them, in training and serving alike."""

from __future__ import annotations

# Qwen2.5's way of writing a call (its template, cut to the tool-call part): arguments | tojson
TOJSON = (
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
    from llmexp.tool_arguments import as_the_template_reads

    writes_itself = "{% for c in m.tool_calls %}{{ c.function.arguments }}{% endfor %}"
    assert as_the_template_reads(CHAT, writes_itself) is CHAT
    odd = [{"role": "assistant", "tool_calls": [{"name": "f", "arguments": "[1, 2]"}, {"name": "g", "arguments": "{oops"},
                                                {"name": "h", "arguments": {"x": 1}}, {"name": "k", "arguments": '{"y": 2}'}]}]
    assert [c["arguments"] for c in as_the_template_reads(odd, TOJSON)[0]["tool_calls"]] == [
        "[1, 2]", "{oops", {"x": 1}, {"y": 2}]
    assert CHAT[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 3, "b": 4}'  # the row itself unchanged
