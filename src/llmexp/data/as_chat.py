"""Plain-string rows asked as chat turns when the starting model is asked through a chat template.

A chat SFT's model is asked by llmexp.generate, serve and lm-eval through its chat template (role
headers). Post-training it on plain-string rows (a TRL-style ``{"prompt": str, "chosen": str}``
file) trained the raw text: the record said DPO took the task metric from 0.00 to 0.92, asked
raw, while the exported model, asked through its template as before, fell from 1.00 to 0.40.
Rendering each string prompt as the user's message and each string answer as the assistant's
trains and measures the model as it is asked.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

# The stages that train a model already asked as a chat on prompt/answer rows (sft, unless the
# template is given or the model's own, sets the template by its rows instead:
# models.tokenizer.template_as_trained; pretrain reads text).
STAGES = frozenset({"rm", "dpo", "kto", "simpo", "orpo", "ppo", "grpo", "rloo", "online_dpo"})
ANSWERS = ("completion", "chosen", "rejected")


def asked_as_chat(tok, pretrained: Optional[str], chat_template: Optional[str]) -> bool:
    """Whether the model will be asked through a chat template: one given by model.chat_template
    (it goes with the exported model: an SFT on plain rows trained them raw and exported ChatML,
    so generate got an empty answer), or the starting model's own (not the plain one an SFT on
    plain strings exports)."""
    from llmexp.models.tokenizer import PLAIN_PROMPT_TEMPLATE

    template = getattr(tok, "chat_template", None)
    if chat_template is not None:
        return True
    return pretrained is not None and bool(template) and template != PLAIN_PROMPT_TEMPLATE


def as_chat_row(row: Dict[str, Any]) -> Dict[str, Any]:
    """The row with a string prompt as one user message and each string answer as the assistant's."""
    out = dict(row)
    if isinstance(row.get("prompt"), str):
        out["prompt"] = [{"role": "user", "content": row["prompt"]}]
    for key in ANSWERS:
        if isinstance(row.get(key), str):
            out[key] = [{"role": "assistant", "content": row[key]}]
    return out


def plain_prompts(prepared) -> bool:
    train = prepared.train
    return (prepared.format != "chat" and prepared.format != "text" and train is not None and len(train) > 0
            and isinstance(train[0]["prompt"], str))


def rows_as_chat(prepared, stage: str, tok, pretrained: Optional[str], chat_template: Optional[str]) -> Optional[str]:
    """Convert ``prepared``'s plain-string rows in place when the stage trains a model asked as a
    chat; returns the run's note when it did."""
    from llmexp.models.tokenizer import own_chat_template

    # SFT: with a template given, or the starting model's own (a Qwen2's ChatML: trained raw and
    # exported with it, generate matched none of the run's recorded answers)
    chosen_template = stage == "sft" and (chat_template is not None or (pretrained is not None
                                                                        and own_chat_template(tok)))
    if (stage not in STAGES and not chosen_template) or not plain_prompts(prepared) \
            or not asked_as_chat(tok, pretrained, chat_template):
        return None
    prepared.train = prepared.train.map(as_chat_row, desc=None)
    if prepared.val is not None and len(prepared.val) > 0:
        prepared.val = prepared.val.map(as_chat_row, desc=None)
    whose = "model.chat_template" if chat_template is not None else f"{pretrained}'s chat template"
    return (f"plain-string rows asked as chat turns: the model is asked through {whose}, so each prompt trains "
            f"as the user's message and each answer as the assistant's, as generate and serve ask it")
