"""`llmexp serve`: the real server (LitServe, uvicorn) on a loopback port, the official `openai`
client, the feedback page in Debian's chromium through Playwright, and training on the judgements."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from llmexp.testing import popen_module, run_cli

KEY = "test-key-123"
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, key: Optional[str] = KEY, timeout: float = 60):
    """(status, parsed JSON body) of one request; a ``bytes`` body is sent as it is."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")  # /health answers plain text


@contextlib.contextmanager
def serving(run_dir: Path, *args: str, timeout: float = 180) -> Iterator[Dict[str, object]]:
    """`llmexp serve run_dir --port <free> *args` until the block ends (the whole process group is
    killed then); yields its url and process."""
    port = free_port()
    log = run_dir.parent / f"serve-{port}.log"
    with open(log, "w") as out:
        proc = popen_module("llmexp", ["serve", str(run_dir), "--port", str(port), *args], stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llmexp serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError, ValueError):  # not listening yet
                if http("GET", f"{url}/health", key=None, timeout=2)[0] == 200:  # open, even with a key
                    break
            if time.time() > deadline:
                pytest.fail(f"llmexp serve did not answer /health in time:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield {"url": url, "proc": proc}
        stops_on_sigterm(proc, url)
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]  # stopped, not crashed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def stops_on_sigterm(proc, url: str) -> None:
    """kill (SIGTERM) stops the server as Ctrl+C does, workers and all (its default action ended the
    main process alone and left LitServe's workers running, reparented, still answering): every
    served test ends this way unless it stopped the server itself."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.time() + 30
    while True:  # the workers stay in the server's process group (its session)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        if time.time() > deadline:
            pytest.fail("a worker of the server stopped by SIGTERM is still running")
        time.sleep(0.3)
    with pytest.raises(OSError):
        http("GET", f"{url}/health", key=None, timeout=2)


@pytest.fixture(scope="module")
def served_sft(tmp_path_factory, short_sft):
    """The 200-step SFT run (a copy: the judgements land in its feedback/), served with an API key."""
    run = tmp_path_factory.mktemp("serve") / "sft"
    shutil.copytree(short_sft, run, ignore=shutil.ignore_patterns("checkpoints"))
    with serving(run, "--api-key", KEY) as s:
        yield {**s, "run": run}


def greedy_reference(model_dir: Path, prompts: List[str], max_new_tokens: int = 24) -> List[str]:
    """What `python -m llmexp.generate` answers (its generate(), one prompt at a time)."""
    from llmexp.generate import generate
    from llmexp.record import load_language_model

    model, tokenizer = load_language_model(model_dir)
    return [generate(model, tokenizer, [p], max_new_tokens)[0] for p in prompts]


PROMPTS = ["Add 3 and 4.", "What is 9 minus 2?", "What is 5 plus 8?", "Subtract 1 from 7.", "Tell me a story."]


def client(url: str, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_gets_the_greedy_answers_of_llmexp_generate(served_sft):
    c = client(served_sft["url"])
    models = [m.id for m in c.models.list().data]
    assert models == ["sft-llama"]
    expected = greedy_reference(served_sft["run"] / "model", PROMPTS)
    got = [c.chat.completions.create(model="sft-llama", messages=[{"role": "user", "content": p}], temperature=0)
           for p in PROMPTS]
    assert [r.choices[0].message.content for r in got] == expected
    assert all(r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0 for r in got)
    assert len(set(expected)) > 2  # different prompts, different answers: not one canned reply
    # Streaming: many chunks whose text joins to the same answer.
    stream = c.chat.completions.create(model="sft-llama", messages=[{"role": "user", "content": PROMPTS[0]}],
                                       temperature=0, stream=True)
    chunks = list(stream)
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces) == expected[0], pieces
    assert len({ch.id for ch in chunks}) == 1  # one completion, one id, as OpenAI streams it
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == "stop" == got[0].choices[0].finish_reason
    # max_tokens is the answer's token limit, and an answer cut off there finishes for "length"
    short = c.chat.completions.create(model="sft-llama", messages=[{"role": "user", "content": PROMPTS[0]}],
                                      temperature=0, max_tokens=2)
    assert short.usage.completion_tokens == 2 and expected[0].startswith(short.choices[0].message.content)
    assert short.choices[0].finish_reason == "length"
    cut = list(c.chat.completions.create(model="sft-llama", messages=[{"role": "user", "content": PROMPTS[0]}],
                                         temperature=0, max_tokens=2, stream=True))
    assert cut[-1].choices[0].finish_reason == "length" and len({ch.id for ch in cut}) == 1


def test_concurrent_requests_are_batched_and_all_answered(served_sft):
    c = client(served_sft["url"])
    prompts = [f"What is {a} plus {b}?" for a in range(4) for b in range(6)]
    expected = greedy_reference(served_sft["run"] / "model", prompts)

    def ask(p: str) -> str:
        r = c.chat.completions.create(model="sft-llama", messages=[{"role": "user", "content": p}], temperature=0)
        return r.choices[0].message.content

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, prompts))
    assert got == expected
    # n=2 sampled answers come back as two choices (the feedback page asks this way)
    # (at temperature 1 this small model ends at once about one time in nine: an empty answer is a sample)
    sampled = []
    for _ in range(4):
        r = c.chat.completions.create(model="sft-llama", messages=[{"role": "user", "content": prompts[0]}], n=2,
                                      temperature=1.0)
        assert [ch.index for ch in r.choices] == [0, 1]
        assert r.model == "sft-llama"
        sampled += [ch.message.content for ch in r.choices]
    assert all(isinstance(a, str) for a in sampled) and len(set(sampled)) >= 2  # samples, not one greedy answer
    # usage counts the prompt once, as OpenAI does, however many answers; a request without model gets its name
    code, one = http("POST", f"{served_sft['url']}/v1/chat/completions",
                     {"messages": [{"role": "user", "content": prompts[0]}], "max_tokens": 4})
    code3, three = http("POST", f"{served_sft['url']}/v1/chat/completions",
                        {"messages": [{"role": "user", "content": prompts[0]}], "max_tokens": 4, "n": 3})
    assert code == code3 == 200 and one["model"] == "sft-llama" == three["model"], (one, three)
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"] > 0
    assert three["usage"]["total_tokens"] == three["usage"]["prompt_tokens"] + three["usage"]["completion_tokens"]


@pytest.mark.parametrize("case,body,status,words", [
    ("no messages", {"messages": []}, 400, "messages: give at least one message"),
    ("messages not a list", {"messages": "hi"}, 400, "messages"),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "GET /v1/models"),
    ("too many answers", {"messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, "n: must be from 1 to 8"),
    ("no answers", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n: must be from 1 to 8"),
    ("bad temperature", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ("too long", {"messages": [{"role": "user", "content": "hi " * 600}], "max_tokens": 10}, 400,
     "and the model's context is 512: shorten it"),
    # the answer's room, not the prompt, is too long: the field is max_tokens (it said messages)
    ("too many tokens", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400,
     "max_tokens: 100000 with the prompt's"),
    ("not JSON at all", b'hello', 400, "body: not valid JSON"),
    ("a list", [1, 2], 400, "body: not a JSON object"),
    ("ends with the assistant", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message"),
    ("empty message", {"messages": [{"role": "user", "content": "  "}]}, 400, "messages[0].content: the user's message "
                                                                              "is empty"),
    ("no parts", {"messages": [{"role": "user", "content": []}]}, 400, "the user's message is empty"),
    ("a text part without text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
     "messages[0].content[0].text: Field required"),
    ("not JSON", b'{"messages":', 400, "body: not valid JSON (at character 12)"),
    # fields LitServe does not declare were dropped: the reply's logprobs was None
    ("logprobs", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2}, 400,
     "logprobs: not supported by llmexp serve"),
    ("top_logprobs", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs: not supported"),
    # a tool without a description was "Field required", and once it had one "not supported"; a
    # template that does not render tools (llmexp's) would answer without them
    ("a tool", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function",
                                                                             "function": {"name": "f"}}]}, 400,
     "tools: the model's chat template does not render tools"),
    ("a tool without a name", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     'tools: each tool needs {"type": "function", "function": {"name": ...}}'),
    ("a forced tool", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400,
     "tool_choice: 'required' cannot be honoured"),
    ("a penalty", {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 1.5}, 400,
     "frequency_penalty: not supported by llmexp serve (no penalties are applied)"),
    # the field the client sent (it said max_tokens)
    ("no new tokens", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens: must be at least 1"),
])
def test_bad_requests_get_4xx_with_a_message(served_sft, case, body, status, words):
    code, reply = http("POST", f"{served_sft['url']}/v1/chat/completions", body)
    assert code == status, (code, reply)
    assert words in reply["error"]["message"], reply
    assert reply["error"]["param"] is None or not reply["error"]["param"][:1].isdigit(), reply  # a field, not "12"


def test_the_developer_role_is_the_system_role(served_sft):
    """OpenAI's newer name for the system message ("each message needs a role" before)."""
    def ask(role):
        return http("POST", f"{served_sft['url']}/v1/chat/completions", {"temperature": 0, "messages": [
            {"role": role, "content": "You answer arithmetic."}, {"role": "user", "content": "Add 3 and 4."}]})

    (code, developer), (code2, system) = ask("developer"), ask("system")
    assert code == code2 == 200, developer
    assert developer["choices"][0]["message"]["content"] == system["choices"][0]["message"]["content"]


def test_a_tool_result_is_answered_with_the_tool_call_it_follows(served_sft):
    """Training takes tool calls and results (a template that renders them); serve refused the tool
    role, so the turn after a tool's result could never be asked."""
    from transformers import AutoTokenizer

    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 3, \"b\": 4}"}}
    messages = [{"role": "user", "content": "Add 3 and 4."}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "7"}]
    code, reply = http("POST", f"{served_sft['url']}/v1/chat/completions", {"messages": messages, "temperature": 0})
    assert code == 200, reply
    tok = AutoTokenizer.from_pretrained(served_sft["run"] / "model")
    rendered = tok.apply_chat_template([{**m, "content": m["content"] or ""} for m in messages],
                                       add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert reply["usage"]["prompt_tokens"] == len(rendered)  # every message asked, the tool's result last
    code, reply = http("POST", f"{served_sft['url']}/v1/chat/completions",
                       {"messages": [{"role": "assistant", "content": None, "tool_calls": [call]}]})
    assert code == 400 and "the last message must be the user's or a tool's result" in reply["error"]["message"]


@pytest.mark.slow
def test_a_model_trained_to_call_functions_is_asked_with_them_and_its_calls_come_back_parsed(calculator_sft, tmp_path):
    """serve refused `tools`, then passed them to the template but returned the model's calls as
    text in `content`. A model trained to call llmexp's calculator (a tools column, assistant
    tool_calls; the shipped SFT with a tokenizer trained on the rows, so that it writes the call
    whole: tests/tool_traces.py) is asked with the tool and its call comes back as OpenAI's API
    gives it: message.tool_calls, arguments as JSON text, finish_reason "tool_calls", no content;
    streamed, in a numbered delta. Asked without tools, nothing is parsed (as vLLM): the text is
    the content."""
    from transformers import AutoTokenizer

    from tool_traces import calculator_schema

    run = tmp_path / "sft"
    shutil.copytree(calculator_sft / "sft", run, ignore=shutil.ignore_patterns("checkpoints"))
    tools = [calculator_schema()]
    tok = AutoTokenizer.from_pretrained(run / "model")
    asked = [{"role": "user", "content": "Add 3 and 4."}]
    with serving(run) as s:
        c = client(s["url"], key="unused")
        reply = c.chat.completions.create(model="sft-llama", messages=asked, tools=tools, tool_choice="auto",
                                          max_tokens=80, temperature=0)
        streamed = list(c.chat.completions.create(model="sft-llama", messages=asked, tools=tools, max_tokens=80,
                                                  temperature=0, stream=True))
        plain = c.chat.completions.create(model="sft-llama", messages=asked, max_tokens=80, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    [got] = choice.message.tool_calls
    assert (got.type, got.function.name, json.loads(got.function.arguments)) == ("function", "calculator",
                                                                                 {"expression": "3 + 4"})
    assert got.id.startswith("call_")
    deltas = [d for chunk in streamed for ch in chunk.choices for d in (ch.delta.tool_calls or [])]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [(0, "calculator", {"expression": "3 + 4"})]
    assert [ch.finish_reason for chunk in streamed for ch in chunk.choices if ch.finish_reason] == ["tool_calls"]
    assert not "".join(ch.delta.content or "" for chunk in streamed for ch in chunk.choices)  # the call is no text
    rendered = tok.apply_chat_template(asked, tools=tools, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
    unasked = tok.apply_chat_template(asked, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert reply.usage.prompt_tokens == len(rendered) > plain.usage.prompt_tokens == len(unasked)  # asked with them
    assert plain.choices[0].message.tool_calls is None and "calculator" in plain.choices[0].message.content


def test_content_as_text_parts_is_answered_and_other_parts_get_400(served_sft):
    """OpenAI's API allows content as a list of parts; text parts are the text (joined by newlines)."""
    c = client(served_sft["url"])
    as_string = c.chat.completions.create(model="sft-llama", messages=[{"role": "user", "content": "Add 3 and 4."}],
                                          temperature=0)
    as_parts = c.chat.completions.create(model="sft-llama", temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Add 3 and 4."}]}])
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    code, reply = http("POST", f"{served_sft['url']}/v1/chat/completions", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]})
    assert code == 400 and "messages[0].content[1]" in reply["error"]["message"] and "'image_url'" in \
        reply["error"]["message"], reply


def test_both_good_on_two_same_answers_is_one_rating(served_sft):
    feedback = served_sft["run"] / "feedback" / "ratings.jsonl"
    before = len(feedback.read_text().splitlines()) if feedback.exists() else 0
    code, reply = http("POST", f"{served_sft['url']}/feedback/judgements",
                       {"kind": "pair", "prompt": "Add 1 and 1.", "answers": ["1 + 1 = 2", "1 + 1 = 2"],
                        "choice": "both_good"})
    assert code == 200 and reply["ratings"] == before + 1, reply


def test_null_sampling_fields_take_their_defaults(served_sft):
    """null means "the default" in OpenAI's API (temperature null was a 500: a comparison with None)."""
    body = {"messages": [{"role": "user", "content": "Add 3 and 9."}], "temperature": None, "top_p": None, "n": None}
    code, reply = http("POST", f"{served_sft['url']}/v1/chat/completions", body)
    assert code == 200, reply
    assert len(reply["choices"]) == 1 and isinstance(reply["choices"][0]["message"]["content"], str)


def test_a_wrong_or_missing_api_key_gets_401(served_sft):
    import openai

    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError) as e:
            client(served_sft["url"], key or "none").chat.completions.create(
                model="sft-llama", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 401
        code, reply = http("POST", f"{served_sft['url']}/feedback/judgements",
                           {"kind": "rating", "prompt": "p", "answer": "a", "label": "up"}, key=key or None)
        assert "API key" in e.value.message  # the client reads OpenAI's {"error": {"message"}}, not FastAPI's detail
        assert code == 401 and "API key" in reply["error"]["message"] and reply["error"]["type"] == "authentication_error"
    code, _ = http("GET", f"{served_sft['url']}/v1/models", key=None)
    assert code == 401
    assert http("GET", f"{served_sft['url']}/health", key=None)[0] == 200  # probes need no key
    # the page's config is open (it asks whether a key is needed), the server's feedback path is not
    code, open_config = http("GET", f"{served_sft['url']}/feedback/config", key=None)
    assert code == 200 and open_config["key_required"] is True and "feedback_dir" not in open_config
    assert http("GET", f"{served_sft['url']}/feedback/config")[1]["feedback_dir"].endswith("feedback")
    assert not (served_sft["run"] / "feedback" / "ratings.jsonl").exists() or all(
        "\"prompt\": [{\"role\": \"user\", \"content\": \"p\"}]" not in line
        for line in (served_sft["run"] / "feedback" / "ratings.jsonl").read_text().splitlines())


@pytest.mark.parametrize("body,words", [
    ({"kind": "pair", "prompt": "p", "answers": ["a"], "choice": "a"}, "answers: must be a list of the two"),
    ({"kind": "pair", "prompt": "p", "answers": ["a", "b"], "choice": "c"}, "choice: must be one of"),
    ({"kind": "rating", "prompt": "", "answer": "a", "label": "up"}, "prompt: must be a non-empty string"),
    ({"kind": "vote", "prompt": "p"}, "kind: must be 'pair' or 'rating'"),
    ({"kind": "poll"}, "kind: must be 'pair' or 'rating'"),
    ({"kind": "pair", "prompt": "p", "answers": ["3 + 4 = 7", "3 + 4 = 7 "], "choice": "b"},
     "choice: the two answers are the same"),
    # a prompt_id not on the page, or of another prompt: its answer/solution fields were dropped silently
    ({"kind": "rating", "prompt": "p", "answer": "a", "label": "up", "prompt_id": 999}, "prompt_id: 999 is not the id"),
    # true was prompt 1 to a dict, and the row took prompt 1's answer columns
    ({"kind": "rating", "prompt": "p", "answer": "a", "label": "up", "prompt_id": True}, "prompt_id: True is not the id"),
    # an empty answer as the better one (DPO warned of it only later)
    ({"kind": "pair", "prompt": "p", "answers": ["", "x"], "choice": "a"}, "answers[0]: the chosen answer is empty"),
    ({"kind": "pair", "prompt": "p", "answers": ["", "x"], "choice": "both_good"}, "choice: both_good with an empty answer"),
    ({"kind": "rating", "prompt": "p", "answer": " ", "label": "up"}, "answer: an empty answer rated up"),
    ({"kind": "rating", "prompt": "p", "answer": "a", "label": "up", "prompt_id": 0},
     "prompt: is not the text of prompt_id 0"),
])
def test_bad_judgements_get_400_and_write_nothing(served_sft, body, words):
    feedback = served_sft["run"] / "feedback"
    before = {p.name: p.read_text() for p in feedback.glob("*.jsonl")} if feedback.is_dir() else {}
    code, reply = http("POST", f"{served_sft['url']}/feedback/judgements", body)
    assert code == 400 and words in reply["error"]["message"], reply
    assert reply["error"]["param"] == words.split(":")[0], reply  # the field, as the chat API names it
    after = {p.name: p.read_text() for p in feedback.glob("*.jsonl")} if feedback.is_dir() else {}
    assert after == before


def test_the_feedback_page_in_a_real_browser_records_exactly_the_judgements(tmp_path, short_sft):
    """Debian's chromium (apt-get install chromium), driven by Playwright: pick a prompt, sample
    two answers, choose; 'both bad'; a thumbs up. The files hold exactly those judgements."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "install the browser first: apt-get install -y chromium (README)"
    run = tmp_path / "sft"
    shutil.copytree(short_sft, run, ignore=shutil.ignore_patterns("checkpoints"))
    with serving(run, "--api-key", KEY) as s, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(s["url"] + "/")
        page.wait_for_selector("body[data-ready='1']")
        assert page.is_visible("#api-key")  # the server has a key: the page asks for it
        with page.expect_navigation():  # the page reloads with the key
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_function("document.querySelectorAll('#prompt-select option').length > 100")
        shown = []
        for choice, status in (("#choose-a", "1 pair(s) and 0 rating(s)"), ("#both-bad", "1 pair(s) and 3 rating(s)")):
            page.select_option("#prompt-select", index=3)
            prompt = page.input_value("#prompt-text")
            for _ in range(20):  # two different answers: the same one twice cannot be preferred to itself
                page.click("#sample")
                page.wait_for_function("!document.getElementById('both-good').disabled")
                answers = [page.inner_text("#answer-a"), page.inner_text("#answer-b")]
                if answers[0].strip() != answers[1].strip() and all(a.strip() for a in answers):
                    break  # (an empty answer may be neither chosen nor rated up)
                if answers[0].strip() == answers[1].strip():
                    assert page.is_disabled("#choose-a") and "the same" in page.inner_text("#status")
            if choice == "#both-bad":
                page.click("#up-a")  # a thumbs up on answer A first, then the pair is 'both bad'
                page.wait_for_function("document.getElementById('status').textContent.includes('1 rating')")
            page.click(choice)
            page.wait_for_function(f"document.getElementById('status').textContent.includes('{status}')")
            shown.append((prompt, answers))
        assert "Saved. 1 pair(s) and 3 rating(s) so far." in page.inner_text("#status")
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
    pairs = [json.loads(x) for x in (run / "feedback" / "pairs.jsonl").read_text().splitlines()]
    ratings = [json.loads(x) for x in (run / "feedback" / "ratings.jsonl").read_text().splitlines()]
    (prompt, (a, b)), (prompt2, (a2, b2)) = shown
    assert len(pairs) == 1 and pairs[0]["prompt"] == [{"role": "user", "content": prompt}]
    assert pairs[0]["chosen"][0]["content"] == a and pairs[0]["rejected"][0]["content"] == b
    assert pairs[0]["model"] == "sft-llama" and "solution" in pairs[0]  # the prompt's own columns come along
    assert [(r["completion"][0]["content"], r["label"]) for r in ratings] == [(a2, True), (a2, False), (b2, False)]
    assert all(r["prompt"][0]["content"] == prompt2 for r in ratings)


_WRITER = """
import sys
from llmexp.serving.feedback import FeedbackLog
log = FeedbackLog(sys.argv[1])
big = "x" * 32_000_000  # 32 MB answers: writing one takes tens of milliseconds, so kills land inside writes
i = 0
while True:
    log.append({"pairs.jsonl": [{"prompt": [{"role": "user", "content": f"q{i}"}],
                                 "chosen": [{"role": "assistant", "content": big}],
                                 "rejected": [{"role": "assistant", "content": "no"}]}]})
    print(i, flush=True)
    i += 1
"""


FAST_MONITOR = """
import sys
import litserve.server

init = litserve.server.LitServer.__init__


def fast_monitor(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.monitor_internal = 0.001  # LitServe polls its workers every 2 s: a stop's race, every time


litserve.server.LitServer.__init__ = fast_monitor
if __name__ == "__main__":
    from llmexp.serving.server import main

    sys.exit(main(sys.argv[1:]))
"""


def test_a_stopped_server_logs_no_dead_worker_and_no_traceback(tmp_path, tiny_teacher):
    """kill stops the server quietly even while LitServe's worker monitor polls: it used to see the
    workers the stop had ended ("Worker died; shutting down", in every stop at this poll rate) or
    poll a stopped manager (a BrokenPipeError traceback, seen once in a test run at 2 s)."""
    script = tmp_path / "serve_fast_monitor.py"
    script.write_text(FAST_MONITOR)
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(script), str(tiny_teacher), "--port", str(port),
                                 "--feedback", str(tmp_path / "feedback")], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(OSError, ValueError):
                if http("GET", f"http://127.0.0.1:{port}/health", key=None, timeout=2)[0] == 200:
                    break
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        stops_on_sigterm(proc, f"http://127.0.0.1:{port}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    printed = log.read_text()
    assert "serving" in printed and "died" not in printed and "crashed" not in printed, printed[-3000:]
    assert "Traceback" not in printed and "ERROR" not in printed, printed[-3000:]


def test_a_writer_killed_mid_write_never_leaves_a_broken_line(tmp_path):
    """SIGKILL a process appending 32 MB judgements at 12 moments spread over its writes (a plain
    append leaves a torn last line for about a quarter of them): every file ends at a line's end,
    every line is whole JSON, and every append the writer finished is there, in order."""
    for attempt in range(12):
        d = tmp_path / f"fb{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(d)], stdout=subprocess.PIPE, text=True)
        acknowledged = [proc.stdout.readline()]
        time.sleep(0.025 * attempt)
        proc.kill()
        proc.wait()
        acknowledged += proc.stdout.read().splitlines()
        lines = (d / "pairs.jsonl").read_bytes().split(b"\n")
        assert lines[-1] == b"", f"attempt {attempt}: the file ends inside a line"
        prompts = [json.loads(x)["prompt"][0]["content"] for x in lines[:-1]]
        assert prompts == [f"q{i}" for i in range(len(prompts))] and len(prompts) >= len(acknowledged)
        shutil.rmtree(d)


def test_judgements_from_concurrent_clients_while_the_server_is_killed(tmp_path, short_sft):
    """Eight clients post judgements at once; the server is SIGKILLed mid-stream. Every judgement
    the server acknowledged is in the file, once, and no line is broken. (Served as <run>/model:
    as its run, with its name, its questions and its feedback/; it was served as "model", with no
    prompts on its page, writing ./feedback.)"""
    run = tmp_path / "sft"
    shutil.copytree(short_sft, run, ignore=shutil.ignore_patterns("checkpoints"))
    acknowledged: List[str] = []
    stop = threading.Event()
    with serving(run / "model") as s:
        _, listing = http("GET", f"{s['url']}/feedback/prompts", key=None)
        _, models = http("GET", f"{s['url']}/v1/models", key=None)
        assert len(listing["prompts"]) == 620  # every question in each of its wordings
        assert [m["id"] for m in models["data"]] == [json.loads((run / "summary.json").read_text())["run_name"]]

        def client_loop(c: int) -> None:
            i = 0
            while not stop.is_set():
                prompt = f"client {c} judgement {i}"
                try:
                    code, _ = http("POST", f"{s['url']}/feedback/judgements", {
                        "kind": "pair", "prompt": prompt, "answers": ["a" * 20000, "b"], "choice": "a"}, key=None,
                        timeout=10)
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    return
                if code == 200:
                    acknowledged.append(prompt)
                i += 1

        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        while len(acknowledged) < 40:
            time.sleep(0.01)
        os.killpg(s["proc"].pid, signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    text = (run / "feedback" / "pairs.jsonl").read_text()
    assert text.endswith("\n")
    prompts = [json.loads(line)["prompt"][0]["content"] for line in text.splitlines()]
    assert len(prompts) == len(set(prompts)) and set(acknowledged) <= set(prompts)


def simulated_judges(url: str, n_pairs: int, key: Optional[str] = None, clients: int = 8) -> Dict[str, int]:
    """The bundled skill's checker as the people, ``clients`` of them at once: each takes the page's
    next prompt, samples two answers through the chat API and posts what a careful person would:
    the right answer over a wrong one, both bad, or both good; until ``n_pairs`` pairs had a right
    answer to choose. Returns the count of each choice, and of the rating rows they wrote."""
    from llmexp.data.skill import correctness_reward, task_prompts

    _, listing = http("GET", f"{url}/feedback/prompts", key=key)
    _, config = http("GET", f"{url}/feedback/config", key=key)
    prompts, solutions = listing["prompts"], [r["columns"]["solution"] for r in task_prompts(every_wording=True)]
    counts: Dict[str, int] = {}
    lock, turn = threading.Lock(), iter(range(10**9))

    def judge() -> None:
        while True:
            with lock:
                if counts.get("a", 0) + counts.get("b", 0) >= n_pairs:
                    return
                p = prompts[(next(turn) * 7) % len(prompts)]
            code, r = http("POST", f"{url}/v1/chat/completions", {
                "model": config["model"], "n": 2, "temperature": config["temperature"],
                "messages": [{"role": "user", "content": p["text"]}]}, key=key)
            assert code == 200, r
            answers = [c["message"]["content"] for c in r["choices"]]
            right = [correctness_reward(a, solution=solutions[p["id"]]) == 1.0 for a in answers]
            choice = "both_good" if all(right) else "both_bad" if not any(right) else "a" if right[0] else "b"
            with lock:
                if choice in ("a", "b") and counts.get("a", 0) + counts.get("b", 0) >= n_pairs:
                    return
                code, _ = http("POST", f"{url}/feedback/judgements", {
                    "kind": "pair", "prompt": p["text"], "prompt_id": p["id"], "answers": answers, "choice": choice},
                    key=key)
                assert code == 200
                counts[choice] = counts.get(choice, 0) + 1
                if choice.startswith("both"):  # one rating row per different answer
                    counts["rating_rows"] = counts.get("rating_rows", 0) + len({a.strip() for a in answers})

    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(judge) for _ in range(clients)]:
            f.result()
    return counts


def held_out_exact_match(model_dir: Path) -> float:
    """The bundled skill's 155 questions in their four wordings, greedy, scored by its checker (the task
    metric of the SFT run)."""
    from llmexp.data.skill import task_prompts
    from llmexp.generate import generate
    from llmexp.record import load_language_model
    from llmexp.task_probe import TaskProbe

    model, tokenizer = load_language_model(model_dir)
    probe = TaskProbe(check="arithmetic_correct", rows=task_prompts(every_wording=True), max_new_tokens=24,
                      batch_size=64)
    total, n = probe.sums(lambda prompts, _: generate(model, tokenizer, [p[-1]["content"] for p in prompts], 24))[
        "task_score"]
    return total / n


@pytest.mark.slow
def test_dpo_on_judgements_collected_through_the_api_raises_exact_match(tmp_path, short_sft):
    """Serve the 200-step SFT, let simulated judges label 200 pairs with a right answer to choose
    (and the both-bad / both-good pairs they meet on the way) over HTTP, then the README's
    command: `python -m llmexp stage=dpo model.pretrained=<sft>/model data=feedback
    data.path=<sft>/feedback/pairs.jsonl` (shipped defaults). Held-out exact match rises."""
    run = tmp_path / "sft"
    shutil.copytree(short_sft, run, ignore=shutil.ignore_patterns("checkpoints"))
    with serving(run, "--max-batch-size", "32") as s:  # 16 judges asking for 2 answers each: one batch
        counts = simulated_judges(s["url"], 200, clients=16)
    pairs = run / "feedback" / "pairs.jsonl"
    assert counts["a"] + counts["b"] == 200 and counts["a"] > 50 and counts["b"] > 50, counts  # no position bias
    dpo = tmp_path / "dpo"
    r = run_cli(["stage=dpo", f"model.pretrained={run}/model", "data=feedback", f"data.path={pairs}", "logger=csv",
                 f"hydra.run.dir={dpo}"], cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((dpo / "summary.json").read_text())
    assert summary["feedback"]["files"] == [str(pairs.resolve())]
    assert summary["feedback"]["judgements"] == 200
    assert 150 <= summary["feedback"]["train_rows"] + summary["feedback"]["val_rows"] <= 200  # repeats deduplicated
    ratings = (run / "feedback" / "ratings.jsonl").read_text().splitlines()
    assert len(ratings) == counts.get("rating_rows", 0) > counts.get("both_bad", 0) + counts.get("both_good", 0)
    before, after = held_out_exact_match(run / "model"), held_out_exact_match(dpo / "model")
    sft_metric = json.loads((run / "summary.json").read_text())["final"]["val/task_score"]
    assert before == pytest.approx(sft_metric, abs=1e-6)
    print(f"dpo on {counts['a'] + counts['b']} judged pairs ({counts}): exact match {before:.3f} -> {after:.3f}")
    # The server samples unseeded, 16 clients at once, so the judged pairs differ from run to run:
    # 0.348 -> 0.497, 0.537, 0.606, 0.618 over four runs on 2026-12-07 (the first in the whole suite).
    assert after >= before + 0.10, (before, after, counts)
    # The run's own task metric is that: judgements of the skill's questions are measured on all of
    # them (it was exact match with the chosen answers of the ~8 held-out pairs).
    assert summary["task"] == {**summary["task"], "check": "arithmetic_correct", "prompts": 620}
    assert summary["initial"]["val/task_score"] == pytest.approx(before, abs=1e-6)
    assert summary["final"]["val/task_score"] == pytest.approx(after, abs=1e-6)


@pytest.mark.parametrize("case,args,words", [
    ("no run", ["{tmp}/nothing"], "does not exist; give a finished run's directory or an exported model"),
    ("not a run", ["{tmp}"], "is neither a run directory with model/ nor a model directory"),
    ("bad host", ["{run}", "--host", "10.1.2.3"], "--host: '10.1.2.3' is not one llmexp serve can bind"),
    ("port taken", ["{run}", "--port", "{busy}"], "is not free"),
    ("no port", ["{run}", "--port", "0"], "--port: 0 is outside 1"),
    ("no prompt file", ["{run}", "--prompts", "{tmp}/missing.jsonl"], "--prompts: no file"),
    ("prompt file not JSON", ["{run}", "--prompts", "{tmp}/bad.jsonl"], "line 2 is not JSON"),
    ("reward model", ["{rm}"], "reward model"),
    # found by the inference worker: two tracebacks after the banner, exit 1
    ("no tokenizer", ["{tmp}/notok"], "holds no tokenizer (none of tokenizer.json"),
    # every judgement was a bare 500
    ("feedback is a file", ["{run}", "--feedback", "{tmp}/bad.jsonl"], "--feedback: '{tmp}/bad.jsonl' is a file"),
    ("feedback unwritable", ["{run}", "--feedback", "/proc/llmexp/feedback"], "--feedback: cannot write judgements"),
    # its prompts were wrapped in the chat template: answers other than generate's
    ("a pretrain run", ["{tmp}/pretrain"], "a stage=pretrain run's model continues text"),
])
def test_serve_refuses_bad_input_with_exit_2_before_loading(tmp_path, tiny_teacher, case, args, words):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{not json\n')
    rm = tmp_path / "rm"
    rm.mkdir()
    config = json.loads((tiny_teacher / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    (tmp_path / "notok").mkdir()
    (tmp_path / "notok" / "config.json").write_text(json.dumps(config))
    shutil.copytree(tiny_teacher, tmp_path / "pretrain" / "model")
    (tmp_path / "pretrain" / "config.yaml").write_text("stage: {name: pretrain}\ndata: {name: arithmetic_text}\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        filled = [a.format(tmp=tmp_path, run=tiny_teacher, busy=busy.getsockname()[1], rm=rm) for a in args]
        r = run_cli(["serve", *filled], cwd=tmp_path, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert words.format(tmp=tmp_path) in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]



def test_served_temperature_is_the_runs_sampling_temperature_where_it_sampled(tmp_path):
    """A rollout stage's temperature is served; a distill run that never sampled (lmbda 0) does not
    lend its unused rollout temperature (1.0), the default 0.7 is served."""
    import yaml

    from llmexp.serving.server import DEFAULT_TEMPERATURE, run_defaults

    cases = {"grpo": ({"name": "grpo", "rollout": {"temperature": 0.9}}, 0.9),
             "distill-offline": ({"name": "distill", "lmbda": 0.0, "rollout": {"temperature": 1.0}}, DEFAULT_TEMPERATURE),
             "distill-on-policy": ({"name": "distill", "lmbda": 0.5, "rollout": {"temperature": 1.0}}, 1.0),
             "sft": ({"name": "sft"}, DEFAULT_TEMPERATURE)}
    for name, (stage, expected) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"stage": stage, "data": {"name": "arithmetic"}}))
        assert run_defaults(tmp_path / name)["temperature"] == expected, name
    # a dpo run on judgements of the skill's questions was measured on the skill: its page asks them
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "config.yaml").write_text(yaml.safe_dump({"stage": {"name": "dpo"},
                                                                  "data": {"name": "feedback", "source": "files"}}))
    assert run_defaults(tmp_path / "dpo")["bundled_skill"] is False
    (tmp_path / "dpo" / "summary.json").write_text(json.dumps({"task": {"check": "arithmetic_correct"}}))
    assert run_defaults(tmp_path / "dpo")["bundled_skill"] is True
