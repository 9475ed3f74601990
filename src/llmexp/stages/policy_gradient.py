"""PPO, GRPO and RLOO on the shared rollout engine: they differ only in how scores become
advantages and in the loss."""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from llmexp import advantages as M
from llmexp.losses import (clipped_policy_loss, clipped_value_loss, importance_log_weights, k3_kl, policy_loss_sum,
                           policy_loss_units, sequence_clipped_policy_loss)
from llmexp.optim import build_optimizer
from llmexp.stages.rollout import Rollout, RolloutStage


class PPOStage(RolloutStage):
    """Clipped PPO with a value head on the policy's last hidden state, GAE and a per-token KL
    penalty to the frozen starting policy (fixed or adaptive coefficient)."""

    needs_values = True

    def __init__(self, cfg, model, tokenizer):
        super().__init__(cfg, model, tokenizer)
        s = cfg.stage
        self.value_head = torch.nn.Linear(model.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.kl = M.KLController(s.kl_coef, s.kl_control == "adaptive", s.kl_target, s.kl_horizon)

    @staticmethod
    def uses_reference(cfg) -> bool:
        return cfg.stage.kl_coef > 0

    def _parallelize(self) -> None:
        """The value head lives outside the policy: shard it over the data-parallel ranks too, so
        its gradients are reduced like the policy's."""
        super()._parallelize()
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.value_head, mesh=self.device_mesh["data_parallel"])

    def configure_optimizers(self):
        params = torch.nn.ModuleList([self.model, self.value_head])
        opt, sched = build_optimizer(params, self.cfg.optim, self.cfg.trainer.max_steps,
                                     default_fused=not self.is_model_parallel)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def update_plan(self) -> Tuple[int, int]:
        return self.cfg.stage.ppo_epochs, self.cfg.stage.num_minibatches

    def finish(self, rollouts: List[Rollout]) -> Dict[str, float]:
        s = self.cfg.stage
        rewards, kls = [], []
        for r in rollouts:
            ref = r.ref_logprobs if r.ref_logprobs is not None else r.logprobs
            reward, kl = M.kl_penalised_rewards(r.scores, r.logprobs, ref, r.mask, self.kl.value)
            rewards.append(reward)
            kls.append(kl)
        masks = [r.mask for r in rollouts]
        if s.whiten_rewards:
            rewards = M.masked_whiten_across(rewards, masks, shift_mean=False)
        for r, reward in zip(rollouts, rewards):
            r.advantages, r.returns = M.gae(reward, r.values, r.mask, s.gamma, s.lam)
        if s.whiten_advantages:
            for r, adv in zip(rollouts, M.masked_whiten_across([r.advantages for r in rollouts], masks)):
                r.advantages = adv
        kl_per_sequence = torch.cat([k.sum(1) for k in kls])
        mean_kl = float(kl_per_sequence.mean())
        coef = self.kl.value
        self.kl.update(mean_kl, len(kl_per_sequence))
        tokens = float(sum(m.sum() for m in masks))
        entropy = float(sum(M.masked_sum(r.entropy, r.mask) for r in rollouts)) / max(tokens, 1.0)
        return {"kl": mean_kl, "kl_coef": coef, "entropy": entropy}

    def rollout_loss(self, r: Rollout):
        s = self.cfg.stage
        logprobs, values, _ = self.token_outputs(r, self.model, with_values=True, with_entropy=False)
        pg, clipped, approx_kl = clipped_policy_loss(logprobs, r.logprobs, r.advantages, s.clip_range)
        vf, vf_clipped = clipped_value_loss(values, r.values, r.returns, s.clip_range_value)
        m = r.mask
        policy, value = M.masked_sum(pg, m), M.masked_sum(vf, m)
        return policy + s.value_loss_coef * value, {
            "policy_loss": policy, "value_loss": value, "clipfrac": M.masked_sum(clipped, m),
            "value_clipfrac": M.masked_sum(vf_clipped, m), "approx_kl": M.masked_sum(approx_kl, m)}

    def on_save_checkpoint(self, checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["llmexp"]["kl_coef"] = self.kl.value

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        self.kl.value = checkpoint.get("llmexp", {}).get("kl_coef", self.kl.value)


class GroupSampling:
    """What grpo and rloo share: ``stage.group_size`` responses per prompt, a reference model only
    with a KL term, ``stage.epochs`` passes over each rollout batch, one update each."""

    @property
    def samples_per_prompt(self) -> int:
        return self.cfg.stage.group_size

    @staticmethod
    def uses_reference(cfg) -> bool:
        return cfg.stage.kl_coef > 0

    def update_plan(self) -> Tuple[int, int]:
        return self.cfg.stage.epochs, 1


class GRPOStage(GroupSampling, RolloutStage):
    """Group-relative policy optimisation: ``group_size`` responses per prompt, each advantage its
    reward relative to the group's, a clipped token-level objective, no critic."""

    def needs_old_logprobs(self) -> bool:
        # One pass: the sampling policy is the current one, so its log-probs are the detached
        # log-probs of the update itself (ratio 1) and need no extra forward pass.
        return self.cfg.stage.epochs > 1

    def skips_groups_without_signal(self) -> bool:
        """stage.skip_groups_without_signal where it is exact: without a KL term, a group whose
        responses all scored alike has zero advantage on every token, so its rows add exactly
        nothing to the loss or its gradient (from the default SFT, 94 % of the groups). With one,
        where stage.kl_sample_share estimates it from a share of those groups."""
        s = self.cfg.stage
        return s.skip_groups_without_signal and (s.kl_coef == 0 or self.samples_kl())

    def samples_kl(self) -> bool:
        """Whether the KL term of the groups that scored alike comes from a random share of them,
        each weighted by the inverse share (an unbiased estimate; stage.kl_sample_share < 1)."""
        s = self.cfg.stage
        return s.kl_coef > 0 and s.kl_sample_share < 1 and s.skip_groups_without_signal

    def keep_rows(self, r: Rollout) -> Rollout:
        """Every row; with samples_kl, each row's weight in the KL term drawn (before the reference
        runs, over the drawn rows alone)."""
        if self.samples_kl():
            s = self.cfg.stage
            without_signal = M.groups_without_signal(r.scores, s.group_size)
            r.kl_weights = M.sampled_group_weights(without_signal, s.kl_sample_share).repeat_interleave(s.group_size)
        return r

    def needs_sampling_entropy(self) -> bool:
        return self.skips_groups_without_signal()  # train/entropy of the rows the update skips

    def finish(self, rollouts: List[Rollout]) -> Dict[str, float]:
        s = self.cfg.stage
        solved = []
        for r in rollouts:
            adv = M.group_advantages(r.scores, s.group_size, s.scale_rewards)
            r.advantages = adv.unsqueeze(1) * r.mask
            without_signal = M.groups_without_signal(r.scores, s.group_size)
            solved.append(without_signal.float())
            if s.filter_groups:
                r.loss_mask = r.mask * (~without_signal).repeat_interleave(s.group_size).unsqueeze(1)
        stats = {"groups_without_signal": float(torch.cat(solved).mean())}
        if self._skipping(rollouts):  # the update sees only some rows: the entropy is the rollout's
            tokens = float(sum(r.mask.sum() for r in rollouts))
            stats["entropy"] = float(sum(M.masked_sum(r.entropy, r.mask) for r in rollouts)) / max(tokens, 1.0)
        return stats

    def _skipping(self, rollouts: List[Rollout]) -> bool:
        return self.skips_groups_without_signal() and all(r.entropy is not None for r in rollouts)

    def loss_denominators(self, group: List[Rollout]) -> List[float]:
        """stage.loss_type's denominator for each micro-batch of one update (llmexp.losses)."""
        s = self.cfg.stage
        units = [policy_loss_units(r.counted, s.loss_type, s.rollout.max_new_tokens) for r in group]
        if s.loss_type == "bnpo":  # each micro-batch's own token mean, averaged over the update
            return [u * len(group) for u in units]
        total = self.per_rank_share(sum(units)) if s.loss_type == "dapo" else sum(units)
        return [total] * len(group)

    def rollout_loss(self, r: Rollout):
        s = self.cfg.stage
        skipping = self._skipping([r])
        kl_weights = None
        if skipping and r.kl_weights is not None:  # the groups with a signal and the share drawn for the KL
            index = M.weighted_rows(r.kl_weights, s.group_size)
            kl_weights = r.kl_weights[index].unsqueeze(1)
            r = r.rows(index, s.group_size)
        elif skipping:  # the other rows' policy loss and clipped fraction are exactly zero
            r = r.rows(M.groups_with_advantage(r.advantages, s.group_size), s.group_size)
        logprobs, _, entropy = self.token_outputs(r, self.model, with_entropy=not skipping)
        old = r.logprobs if r.logprobs is not None else logprobs.detach()
        m = r.mask  # metrics over every sampled response; the loss over those it counts
        pg, clipped, _ = clipped_policy_loss(logprobs, old, r.advantages, s.clip_range, s.epsilon_high,
                                             s.importance_sampling_level, m)
        extras = {"policy_loss": M.masked_sum(pg, m), "clipfrac": M.masked_sum(clipped, m)}
        if not skipping:
            extras["entropy"] = M.masked_sum(entropy, m)
        per_token = pg
        if s.kl_coef > 0:
            kl = k3_kl(logprobs, r.ref_logprobs)
            if kl_weights is not None:  # the drawn rows stand for every row that scored alike
                kl = kl * kl_weights
            extras["kl"] = M.masked_sum(kl.detach(), m)
            if s.use_bias_correction_kl:
                kl = kl * torch.exp(importance_log_weights(logprobs, old, m, s.importance_sampling_level))
            per_token = pg + s.kl_coef * kl
        return policy_loss_sum(per_token, r.counted, s.loss_type), extras


class RLOOStage(GroupSampling, RolloutStage):
    """REINFORCE leave-one-out (Ahmadian et al. 2024, TRL's RLOOTrainer): ``group_size``
    responses per prompt, the KL to the reference subtracted from each response's reward, each
    advantage the reward minus the mean of the others', and a clipped loss with one probability
    ratio per response, averaged over responses."""

    def needs_old_logprobs(self) -> bool:
        # The KL in the reward is the sampling policy's; several epochs need its ratio. One epoch
        # without KL needs neither: the ratio to the update's own detached log-probs is 1.
        return self.cfg.stage.epochs > 1 or self.cfg.stage.kl_coef > 0

    def finish(self, rollouts: List[Rollout]) -> Dict[str, float]:
        s = self.cfg.stage
        stats: Dict[str, List[torch.Tensor]] = {"groups_without_signal": [], "kl": []}
        for r in rollouts:
            rewards = r.scores
            if s.kl_coef > 0:
                kl = M.sequence_kl(r.logprobs, r.ref_logprobs, r.mask)
                rewards = rewards - s.kl_coef * kl
                stats["kl"].append(kl)
            r.advantages = M.leave_one_out_advantages(rewards, s.group_size)
            stats["groups_without_signal"].append(M.groups_without_signal(r.scores, s.group_size).float())
        if s.normalize_advantages:
            self._normalise_over_ranks(rollouts)
        return {k: float(torch.cat(v).mean()) for k, v in stats.items() if v}

    def _normalise_over_ranks(self, rollouts: List[Rollout]) -> None:
        """Advantages to zero mean and unit std over the rollout batch of every rank (as TRL
        normalises its gathered batch), so ddp equals one process."""
        advantages = torch.cat([r.advantages for r in rollouts])
        n = self._global_sum(advantages.numel())
        mean = self._global_sum(float(advantages.sum())) / n
        var = self._global_sum(float(((advantages - mean) ** 2).sum())) / max(n - 1, 1)
        for r in rollouts:
            r.advantages = (r.advantages - mean) / (var ** 0.5 + 1e-4)

    def loss_denominators(self, group: List[Rollout]) -> List[float]:
        """The mean over the update's responses on this rank (ranks hold equal shares)."""
        return [float(sum(r.mask.shape[0] for r in group))] * len(group)

    def rollout_loss(self, r: Rollout):
        s = self.cfg.stage
        logprobs, _, entropy = self.token_outputs(r, self.model)
        old = r.logprobs if s.epochs > 1 else logprobs.detach()
        per_response, clipped = sequence_clipped_policy_loss(logprobs, old, r.advantages, r.mask, s.clip_range,
                                                             s.epsilon_high)
        lengths = r.mask.sum(-1)
        extras = {"clipfrac": (clipped * lengths).sum(), "entropy": M.masked_sum(entropy, r.mask)}
        return per_response.sum(), extras
