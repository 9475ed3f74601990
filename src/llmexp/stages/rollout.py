"""The one rollout engine of ppo and grpo: sample responses from the policy, score them, and
optimise a per-token loss over the rollout batch on Lightning.

One training step is one rollout iteration: the window of prompts (micro_batch_size x
grad_accum) is answered micro-batch by micro-batch, the stage turns scores into advantages over
the whole batch, then the updates of ``update_plan()`` run over it. The step counter
(and the lr schedule, checkpoints and resume position) counts iterations, not updates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from llmexp.advantages import entropy_of, response_mask, weighted_rows
from llmexp.data.collate import collate_prompts
from llmexp.data.encode import prompt_encoder
from llmexp.errors import UserError
from llmexp.faults import check_finite
from llmexp.sampler import Sampled
from llmexp.stages.base import StageModule
from llmexp.stages.reference import Reference


@dataclass
class Rollout:
    """One micro-batch of sampled responses and what the stage computed about them."""

    sequences: torch.Tensor  # [B, P+T] prompt (left-padded) + response
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int
    mask: torch.Tensor  # [B, T] float, 1 on response tokens up to and including eos
    scores: torch.Tensor  # [B]
    logprobs: Optional[torch.Tensor] = None  # at sampling time, no grad
    ref_logprobs: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None
    loss_mask: Optional[torch.Tensor] = None  # the tokens the loss counts, where it differs from mask
    samples_per_prompt: int = 1  # consecutive rows that answer one prompt
    sampled_scores: Optional[torch.Tensor] = None  # every sampled response's, where only some rows are kept
    # [B] each row's weight in the KL term where grpo estimates it from a share of the groups that
    # scored alike (stage.kl_sample_share); 0: the row is left out of the reference and the update
    kl_weights: Optional[torch.Tensor] = None
    tool_calls: Optional[torch.Tensor] = None  # [B] calls each response made (stage.rollout.tools)
    tool_failures: Optional[torch.Tensor] = None  # [B] of them, those that failed

    @property
    def counted(self) -> torch.Tensor:
        """The response tokens the loss counts: ``mask`` less any responses a stage left out."""
        return self.mask if self.loss_mask is None else self.loss_mask

    def rows(self, index: torch.Tensor, samples_per_prompt: int) -> "Rollout":
        """These rows alone (``samples_per_prompt`` consecutive ones per prompt), every score
        sampled kept in ``sampled_scores``."""
        per_row = {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()
                   if k != "sampled_scores"}
        return Rollout(**{**per_row, "samples_per_prompt": samples_per_prompt,
                          "sampled_scores": self.scores if self.sampled_scores is None else self.sampled_scores})

    @property
    def all_scores(self) -> torch.Tensor:
        """The score of every response sampled (kept or not)."""
        return self.scores if self.sampled_scores is None else self.sampled_scores


@dataclass
class StepClock:
    """Seconds a training step spent in each part, and the response tokens it generated."""

    seconds: Dict[str, float] = field(default_factory=dict)
    generated_tokens: int = 0
    last: float = field(default_factory=time.perf_counter)

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self.last
        self.last = now

    def add(self, other: "StepClock") -> None:
        for part, sec in other.seconds.items():
            self.seconds[part] = self.seconds.get(part, 0.0) + sec
        self.generated_tokens += other.generated_tokens

    def metrics(self) -> Dict[str, float]:
        """``<part>_seconds`` for each part and ``rollout_tokens_per_second``."""
        out = {f"{part}_seconds": sec for part, sec in self.seconds.items()}
        out["generated_tokens"] = float(self.generated_tokens)
        if self.seconds.get("rollout"):
            out["rollout_tokens_per_second"] = self.generated_tokens / self.seconds["rollout"]
        return out


class RolloutStage(StageModule):
    # Samples drawn per prompt (grpo: its group size).
    samples_per_prompt = 1
    needs_values = False

    def __init__(self, cfg, model, tokenizer):
        super().__init__(cfg, model, tokenizer)
        self._clock = StepClock()
        self._frozen: Dict[str, Any] = {}  # create() adds the reference and reward
        self.time_split = StepClock()  # the whole run's, for summary.json

    @classmethod
    def create(cls, cfg, tokenizer):
        from llmexp.models.build import build_model
        from llmexp.models.peft import apply_peft, quantization_config
        from llmexp.rewards import build_reward

        from llmexp.tool_rollout import load_tools, tools_problem

        reward = build_reward(cfg.stage.reward)  # a bad reward name fails before the model is built
        tools = load_tools(list(cfg.stage.rollout.tools or []))  # and a tool that cannot be described
        model = build_model(cfg.model, tokenizer, quantization_config(cfg.peft))
        problem = tools and tools_problem(tokenizer, model.config)
        if problem:
            raise UserError(f"stage.rollout.tools: {problem}")
        reference = Reference.of(model, keep_copy=cls.uses_reference(cfg) and cfg.peft.name == "none")
        stage = cls(cfg, apply_peft(model, cfg.peft, cfg.model), tokenizer)
        stage._frozen.update(reference=reference, reward=reward, tools=tools)
        return stage

    @staticmethod
    def uses_reference(cfg) -> bool:
        raise NotImplementedError

    # -- data ------------------------------------------------------------------------------------
    def encoder(self, fmt: str):
        return prompt_encoder(self.tokenizer, [t.schema for t in self.tools] or None)

    def collate(self, rows):
        return collate_prompts(rows, self.tokenizer.pad_token_id)

    # -- frozen helpers kept out of the module tree (no optimizer state, no checkpoint) ----------
    @property
    def reward(self):
        return self._frozen["reward"]

    @property
    def tools(self) -> List[Any]:
        """The functions the policy may call while it answers (stage.rollout.tools; llmexp.tool_rollout)."""
        return self._frozen.get("tools") or []

    @property
    def reference(self):
        """The frozen copy, or None (no KL term, or the adapter-disabled policy under LoRA)."""
        return self._frozen["reference"].copy

    def _place_frozen(self) -> None:
        self._frozen["reference"].place(self.model)
        if hasattr(self.reward, "to"):
            self.reward.to(next(self.model.parameters()).device)

    def on_fit_start(self) -> None:
        self._place_frozen()

    def on_validation_start(self) -> None:
        self._place_frozen()

    # -- sampling and scoring --------------------------------------------------------------------
    @property
    def engine(self):
        """What answers prompts (stage.rollout.engine), built on first use (and again if the
        policy module was replaced, as export does)."""
        model, engine = self._frozen.get("engine", (None, None))
        if model is not self.model:
            from llmexp.rollout_engines import build_engine

            engine = build_engine(self)
            self._frozen["engine"] = (self.model, engine)
        return engine

    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, greedy: bool, samples_per_prompt: int = 1,
               with_logprobs: bool = False, with_hidden: bool = False) -> Sampled:
        """``samples_per_prompt`` responses to each prompt, prompt-major (pad after eos, cut to the
        longest): sampled as stage.rollout says, or greedy."""
        r = self.cfg.stage.rollout
        engine = self.engine
        if self.tools:  # several turns: the log-probs are taken by a forward pass over them
            from functools import partial

            from llmexp.tool_rollout import sample_with_tools

            engine = partial(sample_with_tools, self.engine, self.tokenizer, self._call_template(), self.tools,
                             max_calls=r.max_tool_calls)
            with_logprobs = with_hidden = False
        if greedy:
            out = engine(prompt_ids, prompt_mask, r.val_max_new_tokens or r.max_new_tokens,
                         samples_per_prompt=samples_per_prompt, greedy=True)
        else:
            out = engine(prompt_ids, prompt_mask, r.max_new_tokens, samples_per_prompt=samples_per_prompt,
                         temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                         **({"with_logprobs": with_logprobs, "with_hidden": with_hidden} if not self.tools else {}))
        return out.trimmed(self.tokenizer.eos_token_id)

    def _call_template(self):
        """The response template that finds the policy's calls (llmexp.serving.tool_calls)."""
        if "call_template" not in self._frozen:
            from llmexp.serving.tool_calls import response_template

            self._frozen["call_template"] = response_template(self.tokenizer, self.model.config)
        return self._frozen["call_template"]

    def response_masks(self, sampled: Sampled) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the tokens the model wrote, up to and including eos: what the loss, the KL and the
        lengths count; every token of the response, a tool's results too: what is attended to)."""
        if sampled.turns is None:
            mask = response_mask(sampled.responses, self.tokenizer.eos_token_id)
            return mask, mask
        return sampled.turns.model_mask.to(sampled.responses.device), sampled.turns.real_mask

    def score(self, prompts: List[Any], responses: torch.Tensor, mask: torch.Tensor,
              columns: List[Dict[str, Any]], turns: Any = None) -> torch.Tensor:
        """One reward per response, from the reward function or reward model, plus the penalty for
        responses cut off before eos. A response that called tools (``turns``) is scored on its
        answer after the last result; a reward taking ``tool_calls`` gets each call and its result."""
        if turns is None:
            texts = [self.tokenizer.decode(ids[: int(m.sum())], skip_special_tokens=True).strip()
                     for ids, m in zip(responses.tolist(), mask)]
            ended = (responses == self.tokenizer.eos_token_id).any(1)
        else:
            texts, ended = turns.answers, turns.ended.to(mask.device)
            columns = [{**c, "tool_calls": calls} for c, calls in zip(columns, turns.calls)]
        scores = self.reward(prompts, texts, columns).to(mask.device)
        penalty = self.cfg.stage.reward.missing_eos_penalty
        if penalty is not None:
            scores = scores + penalty * (~ended).float()
        return scores

    def rollouts(self, window: List[Dict[str, Any]]) -> List[Rollout]:
        """The window's micro-batches, their prompts answered in one engine call (the decode's cost
        per token is paid once for the whole rollout batch, as TRL generates its generation batch)
        and split back: each micro-batch keeps its own prompt width and longest response."""
        limit = self.cfg.stage.rollout.max_prompts_per_call
        calls: List[List[Dict[str, Any]]] = []  # consecutive micro-batches, as many as the limit holds
        for mb in window:
            if calls and (limit is None or sum(len(m["prompts"]) for m in calls[-1]) + len(mb["prompts"]) <= limit):
                calls[-1].append(mb)
            else:
                calls.append([mb])
        return [r for call in calls for r in self.rollouts_of(call)]

    def rollouts_of(self, window: List[Dict[str, Any]]) -> List[Rollout]:
        """These micro-batches' rollouts from one sampling call."""
        if len(window) == 1:
            return [self.rollout(window[0])]
        width = max(mb["prompt_ids"].shape[1] for mb in window)
        widen = lambda x, value: torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)  # noqa: E731
        sampled = self.sample_responses(torch.cat([widen(mb["prompt_ids"], self.tokenizer.pad_token_id)
                                                   for mb in window]),
                                        torch.cat([widen(mb["prompt_mask"], 0) for mb in window]))
        starts = torch.tensor([0] + [len(mb["prompts"]) * self.samples_per_prompt for mb in window]).cumsum(0)
        return [self.rollout(mb, sampled.rows(a, b).trimmed(self.tokenizer.eos_token_id))
                for mb, a, b in zip(window, starts.tolist(), starts[1:].tolist())]

    def sample_responses(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Sampled:
        """``samples_per_prompt`` sampled responses to each prompt, with what the stage needs of
        the sampling policy (log-probs, entropies, hidden states for the values)."""
        old = self.needs_old_logprobs()
        return self.sample(prompt_ids, prompt_mask, greedy=False, samples_per_prompt=self.samples_per_prompt,
                           with_logprobs=old or self.needs_sampling_entropy(), with_hidden=old and self.needs_values)

    def rollout(self, batch: Dict[str, Any], sampled: Optional[Sampled] = None) -> Rollout:
        """One micro-batch's rollout (its responses sampled here unless given): scored, with the
        old policy's and the reference's log-probs where the stage needs them."""
        clock = self._clock
        k = self.samples_per_prompt
        prompts = [p for p in batch["prompts"] for _ in range(k)]
        columns = [c for c in batch["columns"] for _ in range(k)]
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        old = self.needs_old_logprobs()
        sampled = sampled or self.sample_responses(prompt_ids, prompt_mask)
        responses = sampled.responses
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)
        mask, real = self.response_masks(sampled)
        attention = torch.cat([prompt_mask, real.long()], 1)
        clock.lap("rollout")
        clock.generated_tokens += int(mask.sum())
        r = Rollout(sequences=torch.cat([prompt_ids, responses], 1), attention_mask=attention,
                    position_ids=(attention.cumsum(-1) - 1).clamp(min=0), prompt_width=prompt_ids.shape[1],
                    mask=mask, scores=self.score(prompts, responses, mask, columns, sampled.turns),
                    samples_per_prompt=k)
        if sampled.turns is not None:
            r.tool_calls = torch.tensor([len(c) for c in sampled.turns.calls], dtype=torch.float32)
            r.tool_failures = torch.tensor([sum(x["failed"] for x in c) for c in sampled.turns.calls],
                                           dtype=torch.float32)
        clock.lap("scoring")
        with torch.no_grad():
            if sampled.turns is not None:  # several turns: one forward pass over the whole conversation
                r.logprobs, r.values, r.entropy = self.token_outputs(r, self.model, with_values=self.needs_values)
                clock.lap("old_logprobs")
            elif old and sampled.logprobs is not None:  # the rollout's own: no second forward pass
                r.logprobs, r.entropy = sampled.logprobs * mask, sampled.entropy * mask
                if self.needs_values:
                    r.values = self.value_head(sampled.hidden.float()).squeeze(-1)
            elif old:
                r.logprobs, r.values, r.entropy = self.token_outputs(r, self.model, with_values=self.needs_values)
                clock.lap("old_logprobs")
            elif sampled.entropy is not None:
                r.entropy = sampled.entropy * mask
            r = self.keep_rows(r)
            if self.uses_reference(self.cfg):
                r.ref_logprobs = self.reference_logprobs(r)
                clock.lap("reference")
        return r

    def keep_rows(self, r: Rollout) -> Rollout:
        """The rows the loss uses (online dpo: each prompt's chosen and rejected), before the
        reference and the loss run over them; every row by default."""
        return r

    def needs_old_logprobs(self) -> bool:
        return True

    def needs_sampling_entropy(self) -> bool:
        """Whether the rollout keeps its tokens' entropies even where it needs no old log-probs."""
        return False

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the loss's log-probs: the sampling one, so that the ratio to the
        sampling policy is exact (online dpo: 1)."""
        return self.cfg.stage.rollout.temperature

    def token_outputs(self, r: Rollout, model, with_values: bool = False, with_entropy: bool = True
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Per-response-token log-probs (at ``logprob_temperature``), values (from the value head,
        when asked) and entropies (unless a caller has no use for them)."""
        logits, hidden = self.response_logits(r, model, with_hidden=with_values)
        every = torch.log_softmax(logits.float() / self.logprob_temperature, -1)
        logprobs = every.gather(-1, r.sequences[:, r.prompt_width:].unsqueeze(-1)).squeeze(-1)
        values = self.value_head(hidden.float()).squeeze(-1) if with_values else None
        with torch.no_grad():
            entropy = entropy_of(every) if with_entropy else None
        return logprobs, values, entropy

    def response_logits(self, r: Rollout, model, with_hidden: bool = False
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The logits (and last hidden states) that predict each response token, ``[N, T, ...]``.

        A prompt answered ``r.samples_per_prompt`` times is run once: its keys and values (with
        their gradient) are repeated to its samples, whose response tokens attend to them; equal
        to running every prompt + response whole (tested), for a fraction of the prompt's cost."""
        P, k = r.prompt_width, r.samples_per_prompt
        if k == 1 or not self.shares_prefix(model):
            out = model(input_ids=r.sequences, attention_mask=r.attention_mask, position_ids=r.position_ids,
                        use_cache=False, output_hidden_states=with_hidden, logits_to_keep=r.sequences.shape[1] - P + 1)
            hidden = out.hidden_states[-1][:, P - 1 : -1] if with_hidden else None
            return out.logits[:, :-1], hidden
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        prompt = model(input_ids=r.sequences[::k, :P], attention_mask=r.attention_mask[::k, :P],
                       position_ids=r.position_ids[::k, :P], cache=cache, use_cache=True,
                       output_hidden_states=with_hidden, logits_to_keep=1)
        cache.batch_repeat_interleave(k)
        logits = prompt.logits.repeat_interleave(k, 0)
        hidden = prompt.hidden_states[-1][:, -1:].repeat_interleave(k, 0) if with_hidden else None
        if r.sequences.shape[1] - P > 1:  # the last response token predicts nothing we score
            rest = model(input_ids=r.sequences[:, P:-1], attention_mask=r.attention_mask[:, :-1],
                         position_ids=r.position_ids[:, P:-1], cache=cache, use_cache=True,
                         output_hidden_states=with_hidden)
            logits = torch.cat([logits, rest.logits], 1)
            hidden = torch.cat([hidden, rest.hidden_states[-1]], 1) if with_hidden else None
        return logits, hidden

    def shares_prefix(self, model) -> bool:
        """Whether the loss's forward passes may share each prompt among its samples: asked for,
        and the model can (StageModule.can_share_prefixes)."""
        return self.cfg.stage.rollout.share_prefill and self.can_share_prefixes(model)

    def reference_logprobs(self, r: Rollout) -> torch.Tensor:
        """The reference's log-probs of the responses; with ``r.kl_weights``, of the rows the update
        runs alone (the others' stay 0, unused)."""
        with self._frozen["reference"].model(self.model) as reference:
            if r.kl_weights is None:
                return self.token_outputs(r, reference, with_entropy=False)[0]
            index = weighted_rows(r.kl_weights, r.samples_per_prompt)
            out = torch.zeros_like(r.mask)
            out[index] = self.token_outputs(r.rows(index, r.samples_per_prompt), reference, with_entropy=False)[0]
            return out

    # -- what ppo and grpo provide ---------------------------------------------------------------
    def finish(self, rollouts: List[Rollout]) -> Dict[str, float]:
        """Turn the batch's scores into advantages (and returns); return batch statistics."""
        raise NotImplementedError

    def rollout_loss(self, r: Rollout) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Sum over response tokens of the per-token loss, and metric sums over the same tokens."""
        raise NotImplementedError

    def update_plan(self) -> Tuple[int, int]:
        """(passes over the rollout batch, optimizer updates per pass)."""
        return 1, 1

    def loss_denominators(self, group: List[Rollout]) -> List[float]:
        """What each micro-batch's rollout_loss sum is divided by in one update: the update's
        response tokens on this rank."""
        return [float(sum(r.mask.sum() for r in group))] * len(group)

    def metric_units(self, r: Rollout) -> float:
        """What the loss and the metric sums of rollout_loss are averaged over: response tokens."""
        return float(r.mask.sum())

    def per_rank_share(self, value: float) -> float:
        """``value`` summed over every rank, divided by the number of ranks (as the SFT loss is
        normalised): gradients are averaged over ranks, so a sum divided by this share is divided
        by the sum over all ranks."""
        return self._global_sum(value) / (self.trainer.world_size if self._trainer is not None else 1)

    # -- the iteration ---------------------------------------------------------------------------
    def training_step(self, window: List[Dict[str, Any]], batch_idx: int):
        self._clock = clock = StepClock()
        rollouts = self.rollouts(window)
        batch_stats = self.finish(rollouts)
        clock.lap("scoring")
        loss, update_stats = self.optimise(rollouts)
        clock.lap("optimisation")
        self.time_split.add(clock)
        self.lr_schedulers().step()
        self._record_throughput(sum(int(r.attention_mask.sum()) for r in rollouts))
        if self.seconds_to_first_step is None:
            self.seconds_to_first_step = time.time() - self.session_started  # the run's start, as wall_seconds
        if self.global_step % self.cfg.trainer.log_every_n_steps == 0:
            scores = torch.cat([r.all_scores for r in rollouts])
            lengths = torch.cat([r.mask.sum(1) for r in rollouts])
            metrics = {"loss": loss, "reward_mean": scores.mean(), "reward_std": scores.std(unbiased=False),
                       "response_length": lengths.mean(), "lr": self.lr_schedulers().get_last_lr()[0],
                       **clock.metrics(), **batch_stats, **update_stats}
            if self.tools:  # calls per response, and the share of them that failed
                calls = torch.cat([r.tool_calls for r in rollouts if r.tool_calls is not None])
                failed = torch.cat([r.tool_failures for r in rollouts if r.tool_failures is not None])
                metrics.update(tool_calls=calls.mean(), tool_failures=failed.sum() / calls.sum().clamp(min=1))
            for k, v in metrics.items():
                v = torch.as_tensor(v, dtype=torch.float32, device=self.device)
                local = k.endswith("_seconds") or k.endswith("_per_second") or k in ("lr", "generated_tokens")
                if self.trainer.world_size > 1 and not local:
                    v = self.trainer.strategy.reduce(v, reduce_op="mean")
                self.log(f"train/{k}", v, on_step=True, prog_bar=k in ("reward_mean", "rollout_tokens_per_second"))
        return loss

    def summary_extras(self) -> Dict[str, Any]:
        """Where the training steps' time went (this rank), summed over the run."""
        return {"time_split": {k: round(v, 4) for k, v in self.time_split.metrics().items()}}

    def optimise(self, rollouts: List[Rollout]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The planned updates over the rollout batch; each update's loss is normalised by
        loss_denominators (the logged loss is their mean), the metric sums by metric_units."""
        opt = self.optimizers()
        passes, per_pass = self.update_plan()
        sums: Dict[str, torch.Tensor] = {}
        total_loss, total_units = torch.zeros((), device=self.device), 0.0
        for p in range(passes):
            order = torch.randperm(len(rollouts)).tolist()
            for u in range(per_pass):
                group = [rollouts[i] for i in order[u::per_pass]]
                units = sum(self.metric_units(r) for r in group)
                for r, denominator in zip(group, self.loss_denominators(group)):
                    loss_sum, extras = self.rollout_loss(r)
                    loss = loss_sum / max(denominator, 1.0)
                    self.manual_backward(loss)
                    total_loss += loss.detach()
                    for k, v in extras.items():
                        sums[k] = sums.get(k, 0) + v.detach()
                total_units += units
                grad_norm = self._clip_and_measure(opt)
                check_finite(total_loss, grad_norm, self.global_step + 1, self.run_dir)
                if p == passes - 1 and u == per_pass - 1:
                    opt.step()  # the last update advances the step counter
                else:
                    self.trainer.strategy.optimizer_step(opt.optimizer, closure=lambda: None)
                opt.zero_grad(set_to_none=True)
        stats = {k: float(v) / max(total_units, 1.0) for k, v in sums.items()}
        if grad_norm is not None:
            stats["grad_norm"] = float(grad_norm)
        return total_loss / (passes * per_pass), stats

    # -- validation: mean reward of greedy responses to held-out prompts -------------------------
    def val_sums(self, batch):
        sampled = self.sample(batch["prompt_ids"], batch["prompt_mask"], greedy=True)
        mask, _ = self.response_masks(sampled)
        scores = self.score(batch["prompts"], sampled.responses, mask, batch["columns"], sampled.turns)
        n = len(scores)
        return {"reward": (scores.sum(), n), "response_length": (mask.sum(), n)}

    def greedy_answers(self, prompts: List[Any], max_new_tokens: int, tools: Optional[List[Any]] = None) -> List[str]:
        """The task metric's answers; with stage.rollout.tools, asked with them and answered after
        their results."""
        if not self.tools:
            return super().greedy_answers(prompts, max_new_tokens, tools)
        from llmexp.data.encode import render_prompt
        from llmexp.tool_rollout import sample_with_tools

        schemas = [t.schema for t in self.tools]
        batch = collate_prompts([{"input_ids": render_prompt(self.tokenizer, p, schemas), "prompt": p, "columns": {}}
                                 for p in prompts], self.tokenizer.pad_token_id)
        return sample_with_tools(self.engine, self.tokenizer, self._call_template(), self.tools,
                                 batch["prompt_ids"].to(self.device), batch["prompt_mask"].to(self.device),
                                 max_new_tokens, self.cfg.stage.rollout.max_tool_calls, greedy=True).turns.answers
