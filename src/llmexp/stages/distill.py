"""Knowledge distillation: a student learns a frozen teacher's whole next-token distribution on
the completion tokens, instead of the data's one-hot tokens alone.

Off-policy batches are the data's completions (classic distillation); with ``stage.lmbda`` a
share of micro-batches has the student sample its own completions to the data's prompts, which
the teacher then scores token by token (on-policy distillation, GKD): the student learns where
its own mistakes lead, not only on the teacher's paths. With ``stage.attention_weight`` the
student also learns where the teacher looks: each head's attention distributions (attention
transfer), which on the bundled skill is what lets it beat plain SFT.
"""

from __future__ import annotations

import os
import random
from typing import Any, Dict, Tuple

import torch

from llmexp.advantages import response_mask
from llmexp.data.collate import collate_lm, collate_prompts
from llmexp.data.encode import IGNORE_INDEX, render_prompt
from llmexp.losses import attention_divergence, distillation_divergence, paired_layers, token_nll_sum
from llmexp.stages.causal_lm import CausalLMStage
from llmexp.stages.reference import Reference, frozen

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")
JSD_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}


def load_teacher(cfg, tokenizer) -> torch.nn.Module:
    """The frozen teacher of ``stage.teacher`` (a run directory or a model); it must read the
    student's tokens as the same ids and predict over the same vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmexp.errors import UserError
    from llmexp.models.build import load_pretrained, local_model_type, torch_dtype
    from llmexp.record import model_dir_of

    source = os.path.expanduser(cfg.stage.teacher)
    path = model_dir_of(source, "stage.teacher") if os.path.exists(source) else source  # else a hub id
    theirs = load_pretrained(AutoTokenizer, path, "stage.teacher", "a tokenizer")
    problem = tokenizer_mismatch(tokenizer, theirs)
    if problem:
        kind, mine = local_model_type(path), cfg.model.architecture
        fix = (f"the student (model.architecture={mine}) reads a tokenizer as a {mine} model does and the teacher as "
               f"a {kind} model does, which differ even for one tokenizer file: distill into a student of the "
               f"teacher's architecture (model={kind}) or from a teacher trained with model={mine}"
               if kind and kind != mine else
               f"train the student with the teacher's (model.tokenizer={path}) or pick a teacher trained with the "
               "student's")
        raise UserError(f"stage.teacher: {problem}; distillation compares distributions token id by token id, so "
                        f"teacher and student need one tokenizer: {fix}")
    model = load_pretrained(AutoModelForCausalLM, path, "stage.teacher", "a causal LM",
                            dtype=torch_dtype(cfg.model.dtype), attn_implementation=cfg.model.attn_implementation)
    return frozen(model)


def switch_off_attention_dropout(model: torch.nn.Module) -> float:
    """Set every attention layer's dropout on its weights to 0 and return the rate it had: eager
    attention returns the weights after dropout, and the teacher's (in eval mode) have none, so
    with it the maps compared would be the dropped-out ones (gpt2's attn_pdrop is 0.1)."""
    rate = 0.0
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):  # llama, mistral, qwen2
            rate, module.attention_dropout = max(rate, module.attention_dropout), 0.0
        if isinstance(getattr(module, "attn_dropout", None), torch.nn.Dropout):  # gpt2
            rate, module.attn_dropout.p = max(rate, module.attn_dropout.p), 0.0
    return rate


def tokenizer_mismatch(student, teacher) -> str | None:
    """Why two tokenizers do not give the same ids (None if they do)."""
    mine, theirs = student.get_vocab(), teacher.get_vocab()
    if mine != theirs:
        differ = sorted(set(mine.items()) ^ set(theirs.items()), key=str)[:3]
        return (f"its tokenizer has {len(theirs)} tokens, the student's {len(mine)}, and they differ "
                f"(e.g. {', '.join(repr(t) for t, _ in differ)})")
    if (student.eos_token_id, student.pad_token_id) != (teacher.eos_token_id, teacher.pad_token_id):
        return "its tokenizer's eos/pad tokens differ from the student's"
    return None


class DistillStage(CausalLMStage):
    """The student (``model=``) trained on ``stage.loss_type``'s divergence from the teacher,
    times temperature^2, averaged over completion tokens, plus ``stage.sft_weight`` x the data
    completion's token NLL."""

    loss_on_targets_only = True

    @classmethod
    def create(cls, cfg, tokenizer):
        stage = super().create(cfg, tokenizer)
        teacher = load_teacher(cfg, tokenizer)
        stage.attention_dropout_was = 0.0
        if cfg.stage.attention_weight > 0:  # only eager attention returns its weights
            stage.model.set_attn_implementation("eager")
            teacher.set_attn_implementation("eager")
            stage.attention_dropout_was = switch_off_attention_dropout(stage.model)
        stage._frozen = {"teacher": Reference(teacher)}
        return stage

    @property
    def teacher(self) -> torch.nn.Module:
        return self._frozen["teacher"].copy

    def summary_extras(self) -> Dict[str, Any]:
        extras = {"teacher": {"source": self.cfg.stage.teacher,
                              "parameters": sum(p.numel() for p in self.teacher.parameters())}}
        if self.cfg.stage.attention_weight > 0:
            mine, theirs = self.model.config.get_text_config(), self.teacher.config.get_text_config()
            heads = mine.num_attention_heads == theirs.num_attention_heads
            extras["attention_transfer"] = {
                "layers": paired_layers(mine.num_hidden_layers, theirs.num_hidden_layers),
                "heads": "one to one" if heads else "head-averaged maps (the head counts differ)",
                "attention_dropout_switched_off": self.attention_dropout_was}
        return extras

    def export(self, out_dir) -> Dict[str, Any]:
        """The student's export, and how it compares with its teacher."""
        from pathlib import Path

        from llmexp.record import model_dir_of
        from llmexp.stages.compression import compression_record, describe, generation_speed

        if self.cfg.stage.attention_weight > 0:  # measured and evaluated from here on as it will be loaded
            for model in (self.model, self.teacher):
                model.set_attn_implementation(self.cfg.model.attn_implementation)
        facts = super().export(out_dir)
        if self.trainer.is_global_zero:
            source = os.path.expanduser(self.cfg.stage.teacher)
            local = Path(model_dir_of(source, "stage.teacher")) if os.path.exists(source) else None
            self._frozen["teacher"].place(self.model)
            before = describe(self, self.teacher, local, source=self.cfg.stage.teacher)
            facts["compression"] = compression_record(before, self.model, Path(out_dir),
                                                      generation_speed(self, self.model))
        return facts

    def on_fit_start(self) -> None:
        self._frozen["teacher"].place(self.model)

    def on_validation_start(self) -> None:
        self._frozen["teacher"].place(self.model)

    # -- data: the SFT encoding, plus the prompt alone for the student's own completions ---------
    def encoder(self, fmt: str):
        encode_lm = super().encoder(fmt)

        def encode(row: Dict[str, Any]) -> Dict[str, Any]:
            out = dict(encode_lm(row))
            prompt = row["messages"][:-1] if fmt == "chat" else row["prompt"]
            out["prompt_ids"] = render_prompt(self.tokenizer, prompt)
            return out

        return encode

    def collate(self, rows):
        batch = collate_lm(rows, self.tokenizer.pad_token_id, self.pad_to_multiple_of)
        if self.cfg.stage.lmbda > 0:
            batch["prompt"] = collate_prompts([{"input_ids": r["prompt_ids"], "prompt": None, "columns": {}}
                                               for r in rows], self.tokenizer.pad_token_id)
        return batch

    # -- the loss --------------------------------------------------------------------------------
    def divergence_sum(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """(sum of the divergence x temperature^2 over completion tokens, their count, the
        student's logits, the attention divergence's (sum, count) over tokens or None) for one batch
        of sequences with labels."""
        s = self.cfg.stage
        inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
        attentions = s.attention_weight > 0
        out = self.model(**inputs, use_cache=False, output_attentions=attentions)
        with self._frozen["teacher"].model(self.model) as teacher:
            theirs = teacher(**inputs, use_cache=False, output_attentions=attentions)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        beta = JSD_BETA.get(s.loss_type, s.jsd_beta)
        per_token = distillation_divergence(out.logits[:, :-1][mask], theirs.logits[:, :-1][mask], beta,
                                            s.temperature)
        attention = (attention_divergence(out.attentions, theirs.attentions, batch["attention_mask"].bool())
                     if attentions else None)
        return per_token.sum() * s.temperature ** 2, mask.sum(), out.logits, attention

    def micro_loss(self, batch):
        s = self.cfg.stage
        on_policy = self._on_policy()
        if on_policy:
            sampled = self.sample_completions(batch["prompt"])
            div, n, _, attention = self.divergence_sum(sampled)
            # weighed like the data batch it replaces, so every micro-batch counts as its data does
            loss = div / n.clamp(min=1) * batch["loss_weight"]
        else:
            div, n, logits, attention = self.divergence_sum(batch)
            loss = div
            if s.sft_weight:
                nll, _ = token_nll_sum(logits, batch["labels"])
                loss = loss + s.sft_weight * nll
        extras = {"divergence": (loss if on_policy else div).detach(), "on_policy": torch.tensor(float(batch["loss_weight"]) if on_policy else 0.0)}
        if attention is not None:
            # a mean over the sequences' tokens, weighed as the completion tokens' losses are
            mean = attention[0] / attention[1].clamp(min=1)
            loss = loss + s.attention_weight * mean * batch["loss_weight"]
            extras["attention_divergence"] = mean.detach() * batch["loss_weight"]
        return loss, extras

    def _on_policy(self) -> bool:
        """Whether this micro-batch is the student's own: drawn from the seed, step and micro-batch
        index, so every rank draws alike and a resumed run draws as the uninterrupted one."""
        lmbda = self.cfg.stage.lmbda
        if lmbda <= 0:
            return False
        self._micro = getattr(self, "_micro", -1) + 1
        draw = random.Random(f"{self.cfg.trainer.seed}:{self.global_step}:{self._micro}").random()
        return draw < lmbda

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._micro = -1

    @torch.no_grad()
    def sample_completions(self, prompt: Dict[str, Any]) -> Dict[str, Any]:
        """The student's completions to the prompts (stage.rollout), as left-padded prompt +
        response sequences with labels on the response up to its eos."""
        r = self.cfg.stage.rollout
        ids, pmask = prompt["prompt_ids"].to(self.device), prompt["prompt_mask"].to(self.device)
        sampling = {"temperature": r.temperature, "top_k": r.top_k, "top_p": r.top_p}
        if r.engine == "generate":
            responses = self.generate_responses(ids, pmask, r.max_new_tokens, engine="generate", do_sample=True,
                                                **sampling)
        else:
            from llmexp.sampler import Sampler

            lockstep = self.is_model_parallel and self.trainer.world_size > 1
            sampler = Sampler(self.model, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                              share_prefill=r.share_prefill, drop_finished=r.drop_finished, lockstep=lockstep)
            responses = sampler(ids, pmask, r.max_new_tokens, **sampling).responses
        mask = response_mask(responses, self.tokenizer.eos_token_id).long()
        attention = torch.cat([pmask, mask], 1)
        labels = torch.cat([torch.full_like(ids, IGNORE_INDEX), responses.masked_fill(mask == 0, IGNORE_INDEX)], 1)
        return {"input_ids": torch.cat([ids, responses], 1), "attention_mask": attention,
                "position_ids": (attention.cumsum(-1) - 1).clamp(min=0), "labels": labels}

    def val_sums(self, batch):
        div, n, logits, attention = self.divergence_sum(batch)
        nll, count = token_nll_sum(logits, batch["labels"])
        sums = {"loss": (nll, count), "divergence": (div, n)}
        if attention is not None:
            sums["attention_divergence"] = attention
        return sums
