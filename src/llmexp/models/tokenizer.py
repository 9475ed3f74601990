"""Tokenizers: a pretrained one, llmexp's bundled byte-level BPE, or one trained on the run's data.

The bundled tokenizer (src/llmexp/assets/tokenizer, made by scripts/train_tokenizer.py) lets a
run start with no network. Every llmexp tokenizer has pad and eos tokens and a chat template.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from llmexp.errors import UserError
from llmexp.paths import ASSETS_DIR

BUNDLED_TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# `{% generation %}` marks assistant tokens for transformers' return_assistant_tokens_mask.
# Messages are separated by a newline *before* each header, so a rendered conversation ends with
# the eos token: a response's tokens (SFT labels, DPO's completion) are exactly what generation
# produces, with no trailing token the model never learns to emit after eos.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\n' }}{% endif %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer (digits split) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
                                   additional_special_tokens=SPECIAL_TOKENS[2:])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1_000_000
    return fast


def load_tokenizer(source: Optional[str], pretrained: Optional[str], train_texts=None, trust_remote_code=False,
                   architecture: Optional[str] = None, chat_template: Optional[str] = None,
                   system_prompt: Optional[str] = None):
    """Pick the tokenizer: explicit source, else the pretrained model's, else the bundled one.

    With ``architecture`` (the model a run builds from its config), a tokenizer that does not come
    from the model's own directory is the one that directory will load once exported (see
    as_a_model_directory_loads_it)."""
    from transformers import AutoTokenizer

    if source == "train":
        tok = _trained_on(train_texts() if callable(train_texts) else train_texts)
    else:
        where = source or pretrained or str(BUNDLED_TOKENIZER_DIR)
        try:
            tok = ensure_special_tokens(AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code))
        except (OSError, ValueError) as e:
            raise _unloadable(where, "model.tokenizer" if source else "model.pretrained", e) from None
    if architecture is not None and (source is not None or pretrained is None):
        from llmexp.models.build import local_model_type

        model_type = architecture if pretrained is None else local_model_type(pretrained)
        if model_type is not None:
            tok = as_a_model_directory_loads_it(tok, model_type)
    if chat_template is not None:
        use_chat_template(tok, chat_template)
    if system_prompt is not None:
        tok.chat_template = with_system_prompt(tok.chat_template, system_prompt)
        try:  # a template without a system role (Gemma's) raised mid-encoding: a traceback
            tok.apply_chat_template([{"role": "user", "content": "Q1"}], tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - the template's own refusal, said as one line
            raise UserError(f"model.system_prompt: the chat template cannot render a system message "
                            f"({str(e).splitlines()[0]}); drop model.system_prompt, or give a model.chat_template "
                            f"that has a system role") from None
    return tok


def with_system_prompt(template: str, text: str) -> str:
    """``template`` that first puts ``text`` as a system message before a conversation that has none
    (how LLaMA-Factory's default_system works): saved with the model, it asks as the run trained."""
    import json

    return ("{%- if messages and messages[0]['role'] != 'system' -%}{%- set messages = [{'role': 'system', "
            f"'content': {json.dumps(text)}}}] + messages -%}}{{%- endif -%}}" + template)


def is_template_text(value: str) -> bool:
    """model.chat_template holds the template itself (else it names a file)."""
    return "{{" in value or "{%" in value


def chat_template_text(value: str) -> str:
    """model.chat_template's template: the value itself, or the file it names."""
    if is_template_text(value):
        return value
    path = Path(os.path.expanduser(value))
    if not path.is_file():
        raise UserError(f"model.chat_template: {value!r} is neither a file nor a Jinja template; give a .jinja "
                        f"file's path, or the template itself")
    return path.read_text(encoding="utf-8")


def use_chat_template(tok, value: str) -> None:
    """Give ``tok`` model.chat_template, checked to end an assistant message with the eos token or
    another special token (else the model never learns to stop: SFT's labels and generation both end
    there); another one becomes the run's eos (adopt_turn_end)."""
    tok.chat_template = chat_template_text(value)
    turns = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    try:
        text = tok.apply_chat_template(turns, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template's own error (undefined name, raise_exception), said as one
        raise UserError(f"model.chat_template: rendering a user and an assistant message failed: "
                        f"{str(e).splitlines()[0]}") from None
    if turn_end(tok, text) is None:
        raise UserError(f"model.chat_template: an assistant message is not followed by the tokenizer's eos token "
                        f"{tok.eos_token!r} or another special token (rendered: {text!r}), so the model would not "
                        f"learn where an answer ends; end assistant messages with {{{{ eos_token }}}}")


def turn_end(tok, text: str) -> Optional[str]:
    """The special token that ends the assistant's ``A1`` in a rendered ``text`` (its eos, or another
    one: Gemma's ``<end_of_turn>``), or None (no special token: the model could not learn to stop)."""
    after = text.split("A1", 1)[1].lstrip() if "A1" in text else None  # (a turn's end may be on a line of its own)
    if after is None:
        return None
    special = sorted({tok.eos_token, *tok.all_special_tokens, *tok.get_added_vocab()}, key=len, reverse=True)
    return tok.eos_token if after.startswith(tok.eos_token) else next(
        (t for t in special if t and after.startswith(t)), None)


def adopt_turn_end(tok, key: str = "model.pretrained") -> Optional[str]:
    """A chat template (the model's own, or model.chat_template) that ends an answer with a token
    other than the eos (Gemma's ``<end_of_turn>``, a base Qwen2's ``<|im_end|>``): the model learnt
    to end answers with that token while sampling, generate and serve stopped at eos only, so answers
    ran on to the token limit. That token becomes the eos the run trains, samples, exports and is
    asked with (as the instruct releases of those models set it). Returns the run's note when it
    changed; a template that ends an answer with no special token at all is refused."""
    turns = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    try:
        text = tok.apply_chat_template(turns, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this (system first, say): left as it is
        return None
    if "A1" not in text:
        return None
    end = turn_end(tok, text)
    if end is None:
        raise UserError(f"{key}: {tok.name_or_path}'s chat template does not end an assistant message with "
                        f"a special token (rendered: {text!r}), so the model would not learn where an answer ends; "
                        f"give model.chat_template=<a template ending answers with {{{{ eos_token }}}}>")
    if end == tok.eos_token:
        return None
    was, tok.eos_token = tok.eos_token, end
    whose = "model.chat_template" if key == "model.chat_template" else "the model's chat template"
    return (f"{whose} ends an answer with {end!r}, not the eos {was!r}: {end!r} is the eos this run "
            f"trains, samples and exports with (generate and serve stop there)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def holds_no_tokenizer(where: Any) -> bool:
    """A local model directory (config.json) saved without any tokenizer file."""
    local = Path(os.path.expanduser(str(where)))
    return (local / "config.json").is_file() and not any((local / f).is_file() for f in TOKENIZER_FILES)


def no_tokenizer_error(where: Any, key: str) -> UserError:
    """What to do about a model directory without a tokenizer (generate, eval, serve: copy it in)."""
    fix = {"model.pretrained": "model.tokenizer=<the directory or hub id of the tokenizer it was trained with>",
           "model.tokenizer": "model.tokenizer=<a directory holding one>"}.get(
        key, "copy the tokenizer files it was trained with (tokenizer.json, tokenizer_config.json) into it")
    return UserError(f"{key}: {str(where)!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                     f"{'give ' if key.startswith('model.') else ''}{fix}")


def _unloadable(where: str, key: str, error: Exception) -> UserError:
    """Why no tokenizer loads from ``where``: a model directory saved without one is told where
    else to take it from (transformers only says which backends it could not build)."""
    local = Path(os.path.expanduser(where))
    if holds_no_tokenizer(local):
        return no_tokenizer_error(where, key)
    if local.is_dir() and not (local / "config.json").is_file():  # a run without model/, an empty directory
        return UserError(f"{key}: {where!r} is neither a run's exported model nor a model directory (no "
                         f"config.json); give <run dir>/model of a finished run, or a model directory")
    return UserError(f"{key}: cannot load a tokenizer from {where!r}: {' '.join(str(error).split())}")


def as_a_model_directory_loads_it(tok, model_type: str):
    """``tok`` as ``AutoTokenizer`` loads it from a model directory of ``model_type``.

    transformers picks the tokenizer class by the directory's model type, and some classes rebuild
    the tokenizer: Qwen2's adds an ``<|endoftext|>`` token and its own pre-tokenizer and
    normaliser. A run that trained with the tokenizer as given would export a directory whose
    tokenizer has a token the model does not embed (every later stage refused it) and may split
    text otherwise; trained with this one, the export loads exactly what the model learnt."""
    import json
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        Path(d, "config.json").write_text(json.dumps({"model_type": model_type}))
        loaded = ensure_special_tokens(AutoTokenizer.from_pretrained(d))
    loaded.name_or_path = tok.name_or_path
    return loaded


def ensure_special_tokens(tok):
    """Give a tokenizer a pad token (its eos) and llmexp's chat template when it has none."""
    if tok.eos_token is None:
        raise UserError(f"tokenizer {tok.name_or_path!r} has no eos token; set model.tokenizer to one that has")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = plain_headers_template(tok.eos_token)
    return tok


def plain_headers_template(eos: str) -> str:
    """llmexp's chat template for a tokenizer without its special tokens: ``user:`` headers, each on
    a line of its own. (``assistant: `` ended the generation prompt with a space, which a GPT-2-style
    byte-level tokenizer keeps as a token alone, while in training it was part of the answer's first
    token: the model, never having seen it alone, dropped that token when asked.)"""
    return CHAT_TEMPLATE.replace("<|end|>", eos).replace(
        "'<|' + message['role'] + '|>\n'", "message['role'] + ':\n'").replace("'<|assistant|>\n'", "'assistant:\n'")


def own_chat_template(tok) -> bool:
    """Whether ``tok`` carries a chat template of its model's own, not one llmexp gave it."""
    return getattr(tok, "chat_template", None) not in (None, "", CHAT_TEMPLATE, plain_headers_template(tok.eos_token),
                                                       PLAIN_PROMPT_TEMPLATE)


# A model fine-tuned on plain-string prompts and completions learns them raw (prompt + completion
# + eos, as TRL trains them): the template that asks it as it learned renders each message's text
# as it is, an answer followed by eos.
PLAIN_PROMPT_TEMPLATE = ("{% for message in messages %}{{ message['content'] }}"
                         "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")


def template_as_trained(tok, stage: str, prepared) -> Optional[str]:
    """SFT on plain-string prompt/completion rows trains the text raw, but llmexp.generate, serve,
    lm-eval's chat mode and llama.cpp ask the exported model through its chat template: with
    llmexp's own (role headers), the model saw prompts it was never trained on and answered
    garbage. Such a run's tokenizer gets PLAIN_PROMPT_TEMPLATE instead (it is saved with the
    model); a model's own template (a hub chat model's) is kept. Returns a note when it changed."""
    train = getattr(prepared, "train", None)
    if stage != "sft" or prepared.format != "prompt_completion" or train is None or len(train) == 0:
        return None
    if not isinstance(train[0]["prompt"], str):
        return None  # conversational prompt/completion: rendered with the chat template, as trained
    if own_chat_template(tok):  # (its rows train as chat turns: llmexp.data.as_chat)
        return None
    tok.chat_template = PLAIN_PROMPT_TEMPLATE
    return ("plain-string prompts and completions, trained raw: the exported model's chat template "
            "renders a prompt as it is (no role headers), so generate, serve and eval ask it as it learned")


def _trained_on(texts: Iterable[str]):
    """A BPE tokenizer trained on this run's texts, cached by their content hash."""
    from transformers import AutoTokenizer

    texts = list(texts)
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("LLMEXP_CACHE", Path.home() / ".cache" / "llmexp")) / "tokenizers" / digest
    if (cache / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cache))
    tok = train_bpe(texts)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(cache)
    except OSError:  # another process cached it first
        pass
    return AutoTokenizer.from_pretrained(str(cache if cache.exists() else tmp))
