"""The preference and policy-gradient math against hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from llmexp import advantages as M
from llmexp.losses import (
    average_logprobs,
    bradley_terry_loss,
    clipped_policy_loss,
    clipped_value_loss,
    dpo_loss,
    k3_kl,
    log1mexp,
    importance_log_weights,
    odds_ratio_loss,
    policy_loss_sum,
    policy_loss_units,
    sequence_clipped_policy_loss,
    sequence_logprobs,
    simpo_loss,
    token_logprobs,
)


def test_sequence_logprobs_sums_target_tokens_only():
    logits = torch.zeros(1, 4, 3)
    logits[0, 1, 2] = math.log(2.0)  # position 1 predicts token 2 with p = 2/4
    labels = torch.tensor([[-100, -100, 2, 0]])
    total, count = sequence_logprobs(logits, labels)
    assert count.tolist() == [2]
    assert total.item() == pytest.approx(math.log(0.5) + math.log(1 / 3), abs=1e-6)
    assert token_logprobs(logits, labels)[0, 0].item() == 0.0


def test_bradley_terry_loss_with_margin():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]), margin=0.5)
    expected = [-math.log(1 / (1 + math.exp(-0.5))), -math.log(1 / (1 + math.exp(0.5)))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_simpo_loss_by_hand():
    """-(1-e) log s(b (avg_c - avg_r) - g) - e log s(-(b (avg_c - avg_r) - g)) on mean token log-probs."""
    chosen = average_logprobs(torch.tensor([-3.0, -6.0]), torch.tensor([3, 2]))  # -1, -3
    rejected = average_logprobs(torch.tensor([-4.0, -2.0]), torch.tensor([2, 4]))  # -2, -0.5
    beta, gamma, eps = 2.0, 0.5, 0.1
    got = simpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=eps).tolist()
    z = [beta * 1.0 - gamma, beta * -2.5 - gamma]
    expected = [-(1 - eps) * math.log(_sig(x)) - eps * math.log(_sig(-x)) for x in z]
    assert got == pytest.approx(expected, abs=1e-6)
    # Equal averages still pay for the margin: the loss is -log s(-gamma) > ln 2.
    tie = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), beta=beta, gamma=gamma).item()
    assert tie == pytest.approx(-math.log(_sig(-gamma)), abs=1e-6) and tie > math.log(2)


def test_odds_ratio_loss_by_hand():
    """log odds(p) = log p - log(1 - p), on the length-averaged log-prob."""
    pc, pr = 0.6, 0.2
    loss, log_odds = odds_ratio_loss(torch.tensor([math.log(pc)]), torch.tensor([math.log(pr)]))
    expected = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
    assert log_odds.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(-math.log(_sig(expected)), abs=1e-6)
    # Equal likelihoods: ln 2; a chosen answer far likelier than the rejected one: near 0.
    same, _ = odds_ratio_loss(torch.tensor([-0.3]), torch.tensor([-0.3]))
    assert same.item() == pytest.approx(math.log(2), abs=1e-6)
    far, _ = odds_ratio_loss(torch.tensor([-0.01]), torch.tensor([-5.0]))
    assert far.item() < 0.01


def test_log1mexp_is_accurate_on_both_branches_and_finite_at_zero():
    x = torch.tensor([-1e-6, -0.1, -0.69, -0.7, -5.0, -50.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)
    at_zero = torch.tensor([0.0], requires_grad=True)
    value = log1mexp(at_zero)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(at_zero.grad).all()


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair",
                                       "sppo_hard", "apo_zero", "apo_down", "discopop"])
def test_dpo_losses_by_hand(loss_type):
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    beta, eps = 0.5, 0.1
    d = (-3 + 4) - (-5 + 4.5)  # 1.5
    tokens_c, tokens_r = torch.tensor([3]), torch.tensor([2])
    got = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps,
                   chosen_tokens=tokens_c, rejected_tokens=tokens_r).item()
    expected = {
        "sigmoid": -(1 - eps) * math.log(_sig(beta * d)) - eps * math.log(_sig(-beta * d)),
        "hinge": max(0.0, 1 - beta * d),
        "ipo": ((1 / 3) - (-0.5 / 2) - 1 / (2 * beta)) ** 2,
        "robust": (-(1 - eps) * math.log(_sig(beta * d)) + eps * math.log(_sig(-beta * d))) / (1 - 2 * eps),
        # c = 1, r = -0.5: the chosen and rejected log-ratios
        "exo_pair": (_sig(beta * d) * (math.log(_sig(beta * d)) - math.log(1 - eps))
                     + _sig(-beta * d) * (math.log(_sig(-beta * d)) - math.log(eps))),
        "nca_pair": -math.log(_sig(0.5)) - 0.5 * math.log(_sig(-0.5)) - 0.5 * math.log(_sig(0.25)),
        "bco_pair": -math.log(_sig(0.5)) - math.log(_sig(0.25)),
        "sppo_hard": (1 - 1) ** 2 + (-0.5 + 1) ** 2,
        "apo_zero": 1 - _sig(0.5) + _sig(-0.25),
        "apo_down": _sig(0.5) + 1 - _sig(0.75),
        "discopop": -math.log(_sig(0.75)) * (1 - _sig(0.75 / 0.05)) + math.exp(-0.75) * _sig(0.75 / 0.05),
    }[loss_type]
    assert got == pytest.approx(expected, abs=1e-6)


def test_dpo_sigmoid_is_ln2_when_policy_is_reference():
    x = torch.tensor([-7.0, -2.0])
    assert dpo_loss(x, x.flip(0), x, x.flip(0), beta=0.1).tolist() == pytest.approx([math.log(2)] * 2)


def test_response_mask_stops_after_first_eos():
    responses = torch.tensor([[5, 7, 1, 9, 1], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0], [5, 0, 7, 1, 0]])
    assert M.response_mask(responses, eos_id=1).tolist() == [
        [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]


def test_kl_penalised_rewards_put_the_score_on_the_last_token():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, 0.0, 0.0]])
    rewards, kl = M.kl_penalised_rewards(torch.tensor([1.0, 2.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -0.5], [-1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 0.05 + 1.0], [0.1 + 2.0, 0.0, 0.0]]))


def test_gae_matches_the_recursion():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.7
    d1 = 0.0 + gamma * 0.7 - 0.6
    d0 = 0.0 + gamma * 0.6 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = M.gae(r, v, mask, gamma, lam)
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2], abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.6, a2 + 0.7], abs=1e-6)


def test_gae_ignores_tokens_after_the_end():
    r = torch.tensor([[0.0, 1.0, 5.0]])
    v = torch.tensor([[0.5, 0.6, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, _ = M.gae(r, v, mask, 1.0, 1.0)
    assert adv.tolist()[0] == pytest.approx([1.0 - 0.5, 1.0 - 0.6, 0.0], abs=1e-6)


def test_clipped_policy_loss_clips_large_ratios():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.9]]))
    adv = torch.tensor([[1.0, -1.0]])
    loss, clipped, approx_kl = clipped_policy_loss(new, old, adv, clip_range=0.2)
    assert loss.tolist()[0] == pytest.approx([-1.2, 0.9], abs=1e-6)
    assert clipped.tolist()[0] == [1.0, 0.0]
    assert approx_kl[0, 0].item() == pytest.approx(0.5 - math.log(1.5), abs=1e-6)


def test_clip_higher_lets_a_rewarded_token_grow_further():
    """DAPO's clip-higher: with epsilon_high 0.28 a ratio of 1.25 on a positive advantage is
    inside the clip; with the symmetric 0.2 it is clipped to 1.2. The low side stays at 0.8."""
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.25, 1.4, 0.5]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    symmetric, clipped_sym, _ = clipped_policy_loss(new, old, adv, 0.2)
    higher, clipped_high, _ = clipped_policy_loss(new, old, adv, 0.2, clip_range_high=0.28)
    assert symmetric.tolist()[0] == pytest.approx([-1.2, -1.2, 0.8], abs=1e-6)
    assert higher.tolist()[0] == pytest.approx([-1.25, -1.28, 0.8], abs=1e-6)
    assert clipped_sym.tolist()[0] == [1.0, 1.0, 1.0] and clipped_high.tolist()[0] == [0.0, 1.0, 1.0]


def test_sequence_level_importance_weight_is_the_mean_token_log_ratio():
    """GSPO: one ratio per response, exp of the mean log-ratio over its tokens (padding ignored)."""
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.3, -0.1, 5.0], [0.2, 0.4, 0.6]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    w = importance_log_weights(new, old, mask, "sequence")
    assert w.shape == (2, 1) and w[:, 0].tolist() == pytest.approx([0.1, 0.4], abs=1e-6)
    assert torch.equal(importance_log_weights(new, old, mask, "token"), new)
    loss, _, _ = clipped_policy_loss(new, old, torch.tensor([[1.0], [-1.0]]), 0.2, level="sequence", mask=mask)
    assert loss[0].tolist() == pytest.approx([-math.exp(0.1)] * 3, abs=1e-6)  # inside the clip
    assert loss[1].tolist() == pytest.approx([math.exp(0.4)] * 3, abs=1e-6)  # max(-A r, -A 1.2) with A = -1
    with pytest.raises(ValueError, match="token or sequence"):
        importance_log_weights(new, old, mask, "sentence")


@pytest.mark.parametrize("loss_type,expected", [
    # per-token losses [[1, 2, x], [3, x, x]] (x: masked); 2 responses, 3 tokens, max_new_tokens 4
    ("grpo", ((1 + 2) / 2 + 3) / 2),  # mean over each response's tokens, then over responses
    ("bnpo", (1 + 2 + 3) / 3),  # mean over the micro-batch's tokens
    ("dapo", (1 + 2 + 3) / 3),  # mean over the update's tokens (one micro-batch, one rank here)
    ("dr_grpo", (1 + 2 + 3) / (2 * 4)),  # token sum over responses x max_new_tokens
])
def test_policy_loss_aggregations(loss_type, expected):
    per_token = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    total = policy_loss_sum(per_token, mask, loss_type)
    assert float(total) / policy_loss_units(mask, loss_type, max_new_tokens=4) == pytest.approx(expected)


def test_clipped_value_loss():
    loss, clipped = clipped_value_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.2)
    assert loss.item() == pytest.approx(0.5 * 1.0)  # max(1.0^2, 0.2^2)
    assert clipped.item() == 0.0
    loss, clipped = clipped_value_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0]), 0.2)
    assert loss.item() == pytest.approx(0.5 * 1.8 ** 2)
    assert clipped.item() == 1.0


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    adv = M.group_advantages(rewards, group_size=3, scale=False)
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0], abs=1e-6)
    scaled = M.group_advantages(rewards, group_size=3)
    std = torch.tensor([1.0, 0.0, 0.0]).std().item()
    assert scaled[0].item() == pytest.approx((2 / 3) / (std + 1e-4), rel=1e-5)
    assert scaled[3:].abs().max().item() == 0.0


def test_leave_one_out_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])  # two prompts, three samples each
    adv = M.leave_one_out_advantages(rewards, group_size=3)
    # 1 - (0 + 0)/2, 0 - (1 + 0)/2, ...; a group with one reward for all has no advantage
    assert adv.tolist() == pytest.approx([1.0, -0.5, -0.5, 0.0, 0.0, 0.0])
    # RLOO's advantage is the group-mean one scaled by k / (k - 1)
    assert adv.tolist() == pytest.approx((M.group_advantages(rewards, 3, scale=False) * 3 / 2).tolist())


def test_preference_pairs_choose_the_higher_score_and_mark_ties():
    """Consecutive rows are one prompt's two responses; on a tie the first counts as chosen (TRL)."""
    chosen, rejected, decided = M.preference_pairs(torch.tensor([0.0, 1.0, 1.0, -1.0, 0.5, 0.5]))
    assert chosen.tolist() == [1, 0, 0] and rejected.tolist() == [0, 1, 1]
    assert decided.tolist() == [True, True, False]


def test_preference_pairs_of_larger_groups_are_the_best_and_the_worst():
    chosen, rejected, decided = M.preference_pairs(torch.tensor([0.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0]), 4)
    assert chosen.tolist() == [1, 0] and rejected.tolist() == [3, 3]  # first best, last worst
    assert decided.tolist() == [True, False]


def test_sequence_kl_sums_the_log_ratio_over_the_response():
    logprobs, ref = torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[-1.5, -1.0, -1.0]])
    assert M.sequence_kl(logprobs, ref, torch.tensor([[1.0, 1.0, 0.0]])).tolist() == pytest.approx([0.5 - 1.0])


def test_sequence_clipped_policy_loss_uses_the_response_probability_ratio():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    old = torch.zeros(2, 3)
    logprobs = torch.tensor([[0.1, 0.2, 5.0], [-0.3, -0.3, -0.4]])  # ratios e^0.3 and e^-1.0
    advantages = torch.tensor([1.0, -2.0])
    loss, clipped = sequence_clipped_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # response 0: ratio e^0.3 = 1.35 > 1.2 with A > 0 -> clipped to -1.2; response 1: ratio e^-1 = 0.37
    # < 0.8 with A < 0: the unclipped -A r = 0.74 is below -A 0.8 = 1.6, so the clipped term wins
    assert loss.tolist() == pytest.approx([-1.2, 1.6])
    assert clipped.tolist() == [1.0, 1.0]
    _, clipped = sequence_clipped_policy_loss(logprobs * 0.1, old, advantages, mask, clip_range=0.2)
    assert clipped.tolist() == [0.0, 0.0]  # ratios e^0.03 and e^-0.1 within [0.8, 1.2]
    loss, _ = sequence_clipped_policy_loss(logprobs, old, advantages, mask, clip_range=0.2, clip_range_high=0.5)
    assert loss[0] == pytest.approx(-math.exp(0.3))  # clip-higher leaves 1.35 alone


def test_k3_kl_is_zero_at_equality_and_positive_otherwise():
    a = torch.tensor([-1.0, -2.0])
    assert k3_kl(a, a).tolist() == [0.0, 0.0]
    assert k3_kl(a, a - 0.5).min().item() > 0


def test_adaptive_kl_controller_moves_towards_the_target():
    c = M.KLController(0.1, adaptive=True, target=1.0, horizon=100)
    c.update(current_kl=3.0, n_samples=10)  # error clipped to 0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    c.update(current_kl=0.5, n_samples=10)
    assert c.value < 0.1 * 1.02
    fixed = M.KLController(0.1)
    fixed.update(5.0, 10)
    assert fixed.value == 0.1


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = M.masked_whiten(x, mask)
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-4)
    assert w[0, 3].item() == 0.0


def test_masked_whiten_across_micro_batches_of_different_widths_is_one_whitening():
    """PPO whitens advantages (and optionally rewards) over a rollout batch of several micro-batches."""
    a, b = torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[3.0, 4.0], [5.0, 6.0]])
    ma, mb = torch.tensor([[1.0, 1.0, 0.0]]), torch.ones(2, 2)
    wa, wb = M.masked_whiten_across([a, b], [ma, mb])
    assert wa.shape == a.shape and wb.shape == b.shape
    flat = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    whole = M.masked_whiten(flat, torch.ones_like(flat))[0].tolist()
    assert wa[0, :2].tolist() + wb.flatten().tolist() == pytest.approx(whole, abs=1e-6)
    assert wa[0, 2].item() == 0.0
    # shift_mean=False keeps the mean: only the scale changes
    wa, wb = M.masked_whiten_across([a, b], [ma, mb], shift_mean=False)
    assert (wa[0, :2].sum() + wb.sum()).item() / 6 == pytest.approx(3.5, abs=1e-5)


def test_groups_without_signal_are_those_whose_rewards_all_agree():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0])
    assert M.groups_without_signal(rewards, 3).tolist() == [True, False, True]


def test_groups_with_advantage_are_whole_groups_with_a_nonzero_token():
    adv = M.group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 1.0]), 2).unsqueeze(1) * torch.ones(8, 3)
    assert M.groups_with_advantage(adv, 2).tolist() == [2, 3, 6, 7]
    assert M.groups_with_advantage(adv, 4).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    adv[2, 1:] = 0.0  # a group moves when any token of any of its rows has an advantage
    adv[3] = 0.0
    assert M.groups_with_advantage(adv, 2).tolist() == [2, 3, 6, 7]
    # none moves: the first group still runs (every rank keeps a backward pass)
    assert M.groups_with_advantage(torch.zeros(6, 3), 3).tolist() == [0, 1, 2]


def test_responses_left_out_add_nothing_to_the_denominators():
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # the second one left out
    assert policy_loss_units(mask, "grpo", 3) == 2
    assert policy_loss_units(mask, "dr_grpo", 3) == 6
    assert policy_loss_units(mask, "dapo", 3) == 3
