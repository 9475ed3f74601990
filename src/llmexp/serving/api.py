"""The OpenAI chat API of ``llmexp serve``, on LitServe: requests are checked where they arrive
(HTTP 400 naming the field, before they reach the model), batched by LitServe, and answered by
``llmexp.serving.engine`` in the inference worker."""

from __future__ import annotations

import contextlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional

import litserve as ls
from fastapi import BackgroundTasks, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from litserve.specs.openai import ChatCompletionRequest, OpenAISpec
from pydantic import ConfigDict
from litserve.utils import LitAPIStatus

ROLES = ("system", "user", "assistant", "tool")
ROLE_NAMES = {"developer": "system"}  # OpenAI's newer name for the system message's role


class ChatRequest(ChatCompletionRequest):
    """LitServe's request, keeping the fields it does not declare (logprobs, top_logprobs, seed), so
    that one this server cannot honour is refused rather than dropped: a client reading
    choices[0].logprobs got None. ``tools`` as OpenAI's API has them (LitServe's required each
    function's description and parameters) and ``tool_choice`` as sent (checked in check_request)."""

    model_config = ConfigDict(extra="allow")
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Any] = None


@dataclass(frozen=True)
class ServedModel:
    """What the server answers with, and its defaults (from the run record)."""

    model_dir: str
    name: str
    max_new_tokens: int  # a request's max_tokens when it gives none: the run's task.max_new_tokens
    temperature: float  # a request's temperature when it gives none
    max_batch_size: int
    api_key: Optional[str] = None


def openai_error(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


class RequestProblem(Exception):
    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def check_request(request: ChatCompletionRequest, served: ServedModel, tokenizer, context: Optional[int]) -> None:
    """Raise RequestProblem for a request this server cannot answer as asked."""
    if request.model and request.model != served.name:
        raise RequestProblem(f"model {request.model!r} is not served here; this server serves {served.name!r} "
                             f"(GET /v1/models)", "model", 404)
    if not request.messages:
        raise RequestProblem("messages: give at least one message", "messages")
    for i, m in enumerate(request.messages):
        m.role = ROLE_NAMES.get(m.role, m.role)
        calls = m.role == "assistant" and bool(m.tool_calls)  # an assistant's tool call may have no text
        if m.role not in ROLES or (m.content is None and not calls):
            raise RequestProblem(f"messages[{i}]: each message needs a role ({', '.join(ROLES)}) and text content",
                                 f"messages[{i}]")
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.type != "text":
                raise RequestProblem(f"messages[{i}].content[{j}]: llmexp serve answers text; this part is "
                                     f"{part.type!r}: send text parts or a string", f"messages[{i}].content")
        if m.role == "user" and not text_of(m.content).strip():
            raise RequestProblem(f"messages[{i}].content: the user's message is empty; say something to answer",
                                 f"messages[{i}].content")
    if request.messages[-1].role not in ("user", "tool"):
        raise RequestProblem("messages: the last message must be the user's or a tool's result (this server answers "
                             "it)", "messages")
    extra = request.model_extra or {}
    for name in ("response_format", "stop", "logprobs", "top_logprobs"):
        if getattr(request, name, None) or extra.get(name) not in (None, False):
            raise RequestProblem(f"{name}: not supported by llmexp serve; leave it out", name)
    if request.tools:
        from llmexp.tool_use import renders_tools

        if not all(isinstance(t.get("function"), dict) and t["function"].get("name") for t in request.tools):
            raise RequestProblem('tools: each tool needs {"type": "function", "function": {"name": ...}}', "tools")
        if not renders_tools(tokenizer.chat_template):
            raise RequestProblem("tools: the model's chat template does not render tools, so it would answer without "
                                 "them; leave them out, or serve a model trained with a template that renders them",
                                 "tools")
    kwargs = extra.get("chat_template_kwargs")
    if kwargs is not None and (not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier()
                                                                      for k in kwargs)):
        raise RequestProblem('chat_template_kwargs: must be an object of the chat template\'s variables '
                             '({"enable_thinking": false})', "chat_template_kwargs")
    if kwargs and {"messages", "tools", "add_generation_prompt"} & set(kwargs):
        raise RequestProblem("chat_template_kwargs: messages, tools and add_generation_prompt are the request's "
                             "own; give them as such", "chat_template_kwargs")
    choice = request.tool_choice.value if hasattr(request.tool_choice, "value") else request.tool_choice
    if choice not in (None, "auto"):
        raise RequestProblem(f"tool_choice: {choice!r} cannot be honoured: the model decides whether to call a "
                             f"tool, as it was trained (auto); leave it out", "tool_choice")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name):
            raise RequestProblem(f"{name}: not supported by llmexp serve (no penalties are applied); leave it out "
                                 f"or give 0", name)
    # null is "the default" in OpenAI's API: n 1, top_p 1, the run's temperature (temperature_of)
    if request.n is None:
        request.n = 1
    if request.top_p is None:
        request.top_p = 1.0
    if not 1 <= request.n <= served.max_batch_size:
        raise RequestProblem(f"n: must be from 1 to {served.max_batch_size} (the server's --max-batch-size, at "
                             f"least 2: the feedback page asks for two answers)", "n")
    if request.temperature is not None and not 0 <= request.temperature <= 2:
        raise RequestProblem("temperature: must be from 0 (greedy) to 2", "temperature")
    if not 0 < request.top_p <= 1:
        raise RequestProblem("top_p: must be above 0 and at most 1", "top_p")
    limit = new_token_limit(request, served)
    if limit < 1:
        name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        raise RequestProblem(f"{name}: must be at least 1", name)
    try:
        prompt = tokenizer.apply_chat_template(messages_of(request, tokenizer.chat_template),
                                               add_generation_prompt=True, tokenize=True, **tools_for(request))
    except Exception as e:  # noqa: BLE001 - the model's template refusing these messages (a role it lacks, say)
        raise RequestProblem(f"messages: the model's chat template cannot render them: {str(e).splitlines()[0]}",
                             "messages") from None
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    if context and len(prompt) >= context:
        raise RequestProblem(f"the prompt is {len(prompt)} tokens, and the model's context is {context}: shorten it",
                             "messages")
    if context and len(prompt) + limit > context:
        raise RequestProblem(f"max_tokens: {limit} with the prompt's {len(prompt)} tokens exceeds the model's "
                             f"context of {context} tokens: at most {context - len(prompt)}", "max_tokens")


def messages_of(request: ChatCompletionRequest, chat_template: Optional[str]) -> List[Dict[str, Any]]:
    """The request's messages as the chat template takes them: tool calls and results, as trained, kept
    (their arguments as the template reads them, as training gave them: llmexp.tool_use)."""
    from llmexp.tool_use import as_the_template_reads

    out = []
    for m in request.messages:
        message: Dict[str, Any] = {"role": m.role, "content": text_of(m.content) if m.content is not None else ""}
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump() if hasattr(c, "model_dump") else c for c in m.tool_calls]
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return as_the_template_reads(out, chat_template)


def tools_for(request: ChatCompletionRequest) -> Dict[str, Any]:
    """The chat template's arguments besides the messages: the request's ``tools``, and its
    ``chat_template_kwargs`` (vLLM's extension: ``{"enable_thinking": false}`` asks Qwen3 to answer
    without reasoning)."""
    given = (request.model_extra or {}).get("chat_template_kwargs") or {}
    return {**given, **({"tools": request.tools} if request.tools else {})}


def text_of(content) -> str:
    """A message's text: content given as a list of text parts (as OpenAI's API allows) is their
    texts joined by newlines, as vLLM joins them."""
    return content if isinstance(content, str) else "\n".join(part.text for part in content)


def new_token_limit(request: ChatCompletionRequest, served: ServedModel) -> int:
    given = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    return served.max_new_tokens if given is None else int(given)


def temperature_of(request: ChatCompletionRequest, served: ServedModel) -> float:
    """The request's temperature, or the run's when the client gave none (LitServe fills in 0.7)."""
    given = "temperature" in request.model_fields_set and request.temperature is not None
    return float(request.temperature) if given else served.temperature


class CheckedOpenAISpec(OpenAISpec):
    """LitServe's OpenAI spec, with each request checked before it is queued for the model."""

    def __init__(self, served: ServedModel):
        super().__init__()
        self.served = served
        self._tokenizer = None
        self._context: Optional[int] = None

    def __getstate__(self):
        state = super().__getstate__()
        state["_tokenizer"] = None  # loaded again where it is needed
        return state

    def _load(self):
        if self._tokenizer is None:
            from transformers import AutoConfig, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.served.model_dir)
            self._context = getattr(AutoConfig.from_pretrained(self.served.model_dir), "max_position_embeddings", None)
        return self._tokenizer

    async def chat_completion(self, request: ChatRequest, background_tasks: BackgroundTasks):
        try:
            check_request(request, self.served, self._load(), self._context)
        except RequestProblem as p:
            return openai_error(p.status, str(p), p.param)
        request.model = request.model or self.served.name  # the reply names the model that answered
        return await super().chat_completion(request, background_tasks)

    # LitServe answers finish_reason "stop" always and gives each streamed chunk a new id; OpenAI's
    # API says "length" for an answer cut off at max_tokens (clients and eval harnesses check it),
    # and one id for every chunk of a completion.
    # A reasoning model's reasoning comes as reasoning_content (vLLM's and DeepSeek's field), which
    # LitServe's messages have no place for: noted as the answers pass and added to the reply.
    async def non_streaming_completion(self, request: ChatCompletionRequest, generator_list: list):
        reasons: Dict[int, str] = {}
        reasoning: Dict[int, List[str]] = {}
        response = await super().non_streaming_completion(
            request, [noting_finish_reason(g, reasons, i, reasoning) for i, g in enumerate(generator_list)])
        for choice in response.choices:
            choice.finish_reason = reasons.get(choice.index, "stop")
            if choice.message.tool_calls and not choice.message.content:
                choice.message.content = None  # OpenAI's: an answer of calls alone has no content
        if response.usage is not None and len(response.choices) > 1:  # LitServe adds each choice's prompt
            response.usage.prompt_tokens //= len(response.choices)
            response.usage.total_tokens = response.usage.prompt_tokens + response.usage.completion_tokens
        if not any("".join(parts) for parts in reasoning.values()):
            return response
        body = json.loads(response.model_dump_json(by_alias=True))
        for choice in body["choices"]:
            choice["message"]["reasoning_content"] = "".join(reasoning.get(choice["index"], [])) or None
        return JSONResponse(body)

    async def streaming_completion(self, request: ChatCompletionRequest, pipe_responses: list):
        reasons: Dict[int, str] = {}
        reasoning: Dict[int, List[str]] = {}  # each choice's newest delta, taken by the chunk that carries it
        stream_id: Optional[str] = None
        async for event in super().streaming_completion(
                request, [noting_finish_reason(p, reasons, i, reasoning) for i, p in enumerate(pipe_responses)]):
            if not event.startswith("data: {"):
                yield event  # [DONE], or an error
                continue
            chunk = json.loads(event[len("data: "):])
            stream_id = stream_id or chunk["id"]
            chunk["id"] = stream_id
            for choice in chunk.get("choices", []):
                if choice.get("finish_reason") is not None:
                    choice["finish_reason"] = reasons.get(choice["index"], choice["finish_reason"])
                for n, call in enumerate((choice.get("delta") or {}).get("tool_calls") or []):
                    call["index"] = n  # OpenAI's streamed calls are numbered (clients merge deltas by index)
                thought = "".join(reasoning.pop(choice["index"], []))
                if thought and choice.get("delta") is not None:
                    choice["delta"]["reasoning_content"] = thought
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"


async def noting_finish_reason(responses: AsyncIterator, reasons: Dict[int, str], index: int,
                               reasoning: Optional[Dict[int, List[str]]] = None) -> AsyncIterator:
    """Pass choice ``index``'s (encoded response, status) items on, noting the finish_reason the
    engine's last step carries and, in ``reasoning``, each step's reasoning text."""
    async for response, status in responses:
        if status != LitAPIStatus.ERROR and isinstance(response, (str, bytes)):
            with contextlib.suppress(ValueError, AttributeError):
                step = json.loads(response)
                if step.get("finish_reason"):
                    reasons[index] = step["finish_reason"]
                if reasoning is not None and step.get("reasoning_content"):
                    reasoning.setdefault(index, []).append(step["reasoning_content"])
        yield response, status


class ChatAPI(ls.LitAPI):
    """The model in LitServe's inference worker: one batch of requests -> streamed answers."""

    def __init__(self, served: ServedModel):
        super().__init__(max_batch_size=served.max_batch_size, batch_timeout=0.02, spec=CheckedOpenAISpec(served))
        self.served = served

    def setup(self, device) -> None:
        from llmexp.env import configure_environment, quiet_libraries
        from llmexp.record import load_language_model

        configure_environment(offline=True)
        quiet_libraries()
        from pathlib import Path

        self.model, self.tokenizer = load_language_model(Path(self.served.model_dir))
        self.model.to(device)
        from llmexp.serving.tool_calls import response_template

        self.calls_template = response_template(self.tokenizer, self.model.config)

    def authorize(self, request: Request) -> None:
        """``Authorization: Bearer <key>`` (the OpenAI clients) or ``X-API-Key`` when the server has a key;
        ``/health`` stays open, as load balancers and orchestrators probe it without credentials
        (it says only whether the model is loaded)."""
        if request.url.path != "/health":
            require_key(request, self.served.api_key)

    def decode_request(self, request: ChatCompletionRequest, context=None):
        from llmexp.serving.engine import GenerationRequest

        return GenerationRequest(messages_of(request, self.tokenizer.chat_template),
                                 new_token_limit(request, self.served), temperature_of(request, self.served),
                                 float(request.top_p), template_arguments=tools_for(request))

    def batch(self, inputs):
        return list(inputs)

    def predict(self, requests, context=None):
        from llmexp.serving.engine import stream_answers

        yield from stream_answers(self.model, self.tokenizer, list(requests), self.calls_template)

    def unbatch(self, output, context=None):
        yield from output

    def encode_response(self, output, context=None):
        for step in output:
            yield [{"role": "assistant", **delta} for delta in step]


def require_key(request: Request, key: Optional[str]) -> None:
    if not key:
        return
    given = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise HTTPException(401, "a wrong or missing API key: send 'Authorization: Bearer <key>' (OpenAI clients: "
                                 "api_key=<key>) with the key the server was started with")


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """An HTTP error raised anywhere (a wrong API key, an unknown route), in OpenAI's shape, which
    OpenAI clients read the message from (FastAPI's own is ``{"detail": ...}``)."""
    response = openai_error(exc.status_code, str(exc.detail))
    response.headers.update(getattr(exc, "headers", None) or {})
    return response


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A malformed body (a missing field, a wrong type, not JSON): 400 naming the field, in OpenAI's
    shape. Of a union's alternatives (content: a string or a list of parts) the error that got
    furthest into the value is named."""
    errors = exc.errors()
    if not errors:
        return openai_error(400, "body: invalid request")
    first = max(errors, key=lambda e: len(e.get("loc", ())))  # max keeps the first of the longest
    if first.get("type") == "json_invalid":
        at = next((x for x in first.get("loc", ()) if isinstance(x, int)), None)
        return openai_error(400, f"body: not valid JSON{f' (at character {at})' if at is not None else ''}")
    where = field_path(first.get("loc", ()))
    if where.startswith("response_format"):
        return openai_error(400, "response_format: not supported by llmexp serve; leave it out", "response_format")
    if not where and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        # curl -d without a JSON content type, or a JSON list or string: pydantic's "Input should be
        # a valid dictionary or object to extract fields from" says neither
        return openai_error(400, "body: not a JSON object; send one with Content-Type: application/json")
    return openai_error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where or None)


def field_path(loc) -> str:
    """pydantic's error location as the field a client wrote: ``messages[0].content[0].text``,
    without "body" and the union alternatives' names (``str``, ``list[...]``, ``TextContent``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "body" and "[" not in part and part not in ("str", "int", "float", "bool") \
                and not part[:1].isupper():
            out += f".{part}" if out else part
    return out
