"""grpo's and rloo's losses against TRL's GRPOTrainer._compute_loss and RLOOTrainer._compute_loss:
the same tiny policy, the same sampled responses, old and reference log-probs and advantages;
for grpo every loss_type x importance sampling level, with clip-higher and a KL term
(|delta| <= 1e-5)."""

from __future__ import annotations

import copy
import math
import dataclasses

import pytest
import torch

from llmexp.testing import typed

GROUP = 4
TEMPERATURE = 0.7  # not 1: the log-probs' temperature is then part of what is compared


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny policy, its tokenizer, and two prompts of the same token length (TRL gives the
    model no position ids, so left-padded prompts would sit at other positions there)."""
    from transformers import AutoModelForCausalLM

    from llmexp.data.encode import render_prompt
    from llmexp.data.skill import prompts_with_answers
    from llmexp.models.build import build_model
    from llmexp.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None, None, [], False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")  # saved: TRL builds its reference model from the path
    build_model(typed(["stage=grpo"]).model, tokenizer).save_pretrained(str(path))
    policy = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    rows = list(prompts_with_answers(num_samples=50, seed=3))
    length = len(render_prompt(tokenizer, rows[0]["prompt"]))
    rows = [r for r in rows if len(render_prompt(tokenizer, r["prompt"])) == length][:2]
    assert len(rows) == 2
    return tokenizer, policy, rows


def end_responses_early(r, tokenizer, lengths):
    """Response i ends with eos after lengths[i] tokens (padding after it), as sampled ones do."""
    from llmexp.advantages import response_mask

    P = r.prompt_width
    responses = r.sequences[:, P:]
    for i, n in enumerate(lengths):
        if n < responses.shape[1]:
            responses[i, n - 1] = tokenizer.eos_token_id
            responses[i, n:] = tokenizer.pad_token_id
    r.mask = response_mask(responses, tokenizer.eos_token_id)
    r.attention_mask = torch.cat([r.attention_mask[:, :P], r.mask.long()], 1)
    r.position_ids = (r.attention_mask.cumsum(-1) - 1).clamp(min=0)


def ours(tokenizer, policy, rows, overrides, stage_name="grpo", scores=None):
    """A grpo (or rloo) rollout of the rows (sampled by llmexp), then the policy moved a little so
    the ratios to the sampling policy are not 1; returns the rollout, its advantages and llmexp's
    loss of it."""
    from llmexp import advantages as M
    from llmexp.rewards import build_reward
    from llmexp.stages import stage_class
    from llmexp.stages.reference import Reference

    cfg = typed([f"stage={stage_name}", f"stage.group_size={GROUP}", "stage.epochs=2",
                 f"stage.rollout.temperature={TEMPERATURE}", *overrides])
    stage = stage_class(stage_name)(cfg, policy, tokenizer)
    stage._frozen.update(reference=Reference.of(policy, keep_copy=cfg.stage.kl_coef > 0),
                         reward=build_reward(cfg.stage.reward))
    batch = stage.collate([stage.encoder("prompt_only")(row) for row in rows])
    torch.manual_seed(1)
    with torch.no_grad():
        r = stage.rollout(batch)
        end_responses_early(r, tokenizer, lengths=[3, 16, 7, 1, 12, 5, 16, 9])  # a random model seldom ends
        r.logprobs = stage.token_outputs(r, policy)[0] * r.mask
        if cfg.stage.kl_coef > 0:
            r.ref_logprobs = stage.reference_logprobs(r)
        r.scores = torch.arange(len(r.scores), dtype=torch.float32) % 3 if scores is None else scores
        stage.finish([r])
        advantages = r.advantages if stage_name == "rloo" else M.group_advantages(r.scores, GROUP, True)
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
        loss_sum, _ = stage.rollout_loss(r)
    lengths = r.mask.sum(1)
    assert lengths.min() < lengths.max(), "responses of different lengths tell the aggregations apart"
    return r, advantages, float(loss_sum) / stage.loss_denominators([r])[0]


def trl_loss(tmp_path, tokenizer, policy, r, advantages, loss_type, level, epsilon_high, beta):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), loss_type=loss_type, importance_sampling_level=level,
                      epsilon=0.2, epsilon_high=epsilon_high, beta=beta, temperature=TEMPERATURE, max_completion_length=16,
                      num_generations=GROUP, per_device_train_batch_size=2 * GROUP, report_to=[], use_cpu=True,
                      bf16=False, fp16=False)
    trainer = GRPOTrainer(model=policy, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * 8), processing_class=tokenizer)
    P = r.prompt_width
    inputs = {"prompt_ids": r.sequences[:, :P], "prompt_mask": r.attention_mask[:, :P],
              "completion_ids": r.sequences[:, P:], "completion_mask": r.mask.long(), "advantages": advantages,
              "old_per_token_logps": r.logprobs, "num_items_in_batch": r.mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = r.ref_logprobs
    trainer.model.eval()  # TRL's eval-mode normalisers: no accumulation window to divide by
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, inputs))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_equals_trl(tmp_path, setup, loss_type, level):
    tokenizer, policy, rows = setup
    policy = copy.deepcopy(policy)  # ours() moves the weights
    epsilon_high, beta = (0.28, 0.05) if level == "token" else (None, 0.0)
    overrides = [f"stage.loss_type={loss_type}", f"stage.importance_sampling_level={level}",
                 f"stage.kl_coef={beta}", f"stage.epsilon_high={'null' if epsilon_high is None else epsilon_high}"]
    r, advantages, loss = ours(tokenizer, policy, rows, overrides)
    expected = trl_loss(tmp_path, tokenizer, policy, r, advantages, loss_type, level, epsilon_high, beta)
    assert loss == pytest.approx(expected, abs=1e-5)
    assert abs(loss) > 1e-3  # a loss with something in it


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_filter_groups_equals_trl_on_the_groups_with_signal_alone(tmp_path, setup, loss_type):
    """stage.filter_groups: a group whose responses all scored the same is left out, so the loss
    is TRL's loss of the other groups alone (its denominator counts their responses or tokens)."""
    tokenizer, policy, rows = setup
    policy = copy.deepcopy(policy)
    scores = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # the second group: no signal
    r, advantages, loss = ours(tokenizer, policy, rows, [f"stage.loss_type={loss_type}", "stage.filter_groups=true"],
                               scores=scores)
    assert r.counted[GROUP:].sum() == 0 and r.counted[:GROUP].sum() == r.mask[:GROUP].sum()
    kept = dataclasses.replace(r, **{k: getattr(r, k)[:GROUP] for k in ("sequences", "attention_mask", "mask",
                                                                         "logprobs", "scores")})
    expected = trl_loss(tmp_path, tokenizer, policy, kept, advantages[:GROUP], loss_type, "token", None, 0.0)
    assert loss == pytest.approx(expected, abs=1e-5)
    assert abs(loss) > 1e-3


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_loss_equals_trl(tmp_path, setup, normalize):
    """With the KL in the reward and clip-higher; the advantages are checked by hand in
    test_rl_losses_and_advantages (TRL computes them inside its generation step)."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    tokenizer, policy, rows = setup
    policy = copy.deepcopy(policy)
    r, advantages, loss = ours(tokenizer, policy, rows, ["stage.kl_coef=0.05", "stage.epsilon_high=0.28",
                                                         f"stage.normalize_advantages={normalize}"], "rloo")
    args = RLOOConfig(output_dir=str(tmp_path / "trl"), epsilon=0.2, epsilon_high=0.28, beta=0.05, temperature=TEMPERATURE,
                      max_completion_length=16, num_generations=GROUP, per_device_train_batch_size=2 * GROUP,
                      report_to=[], use_cpu=True, bf16=False, fp16=False)
    trainer = RLOOTrainer(model=policy, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * 8), processing_class=tokenizer)
    P = r.prompt_width
    inputs = {"prompt_ids": r.sequences[:, :P], "prompt_mask": r.attention_mask[:, :P],
              "completion_ids": r.sequences[:, P:], "completion_mask": r.mask.long(), "advantages": advantages,
              "old_logps": (r.logprobs * r.mask).sum(1)}
    trainer.model.eval()
    with torch.no_grad():
        expected = float(trainer._compute_loss(trainer.model, inputs))
    assert loss == pytest.approx(expected, abs=1e-5)
    assert abs(loss) > 1e-3
    if normalize:
        assert float(advantages.mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(advantages.std()) == pytest.approx(1.0, abs=1e-3)


def online_dpo_loss(tokenizer, policy, rows, scores, overrides):
    """llmexp's online_dpo rollout of the rows (stage.group_size responses each, scored
    ``scores``, each prompt's chosen and rejected kept), and its loss with the policy moved a
    little from its reference: (the rollout, the reference, the loss)."""
    from llmexp.stages import stage_class
    from llmexp.stages.reference import Reference

    cfg = typed(["stage=online_dpo", *overrides])
    reference = Reference.of(policy, keep_copy=True)
    stage = stage_class("online_dpo")(cfg, policy, tokenizer)
    stage._frozen.update(reference=reference, reward=lambda prompts, texts, columns: scores)
    batch = stage.collate([stage.encoder("prompt_only")(row) for row in rows])
    torch.manual_seed(1)
    with torch.no_grad():
        r = stage.rollout(batch)
        end_responses_early(r, tokenizer, lengths=[3, 16, 7, 5])
        r.ref_logprobs = stage.reference_logprobs(r)
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
        loss_sum, extras = stage.rollout_loss(r)
    return r, reference.copy, float(loss_sum) / stage.loss_denominators([r])[0]


def trl_online_dpo_loss(tmp_path, tokenizer, policy, reference, r, scores, beta):
    """TRL's OnlineDPOTrainer.training_step on the same pairs (two responses per prompt, prompt
    by prompt): its generation returns them (TRL holds every prompt's first sample, then every
    prompt's second) and its reward function the same scores."""
    from datasets import Dataset
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    n = r.sequences.shape[0] // 2
    order = torch.cat([torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2)])  # prompt-major -> TRL's halves
    P = r.prompt_width
    args = OnlineDPOConfig(output_dir=str(tmp_path / "trl-online-dpo"), beta=beta, loss_type="sigmoid",
                           max_new_tokens=16, max_length=512, per_device_train_batch_size=n, report_to=[],
                           use_cpu=True, bf16=False, fp16=False)
    trainer = OnlineDPOTrainer(model=policy, ref_model=reference,
                               reward_funcs=lambda completions, **kw: scores[order].tolist(), args=args,
                               train_dataset=Dataset.from_list([{"prompt": "x"}] * 8), processing_class=tokenizer)
    trainer._generate = lambda model, prompts, images=None: (
        r.sequences[order, :P], r.attention_mask[order, :P], r.sequences[order, P:], r.mask[order].long(), None)
    return float(trainer.training_step(trainer.model, {"prompt": ["x"] * n}))


def rows_of(r, index):
    return dataclasses.replace(r, **{k: getattr(r, k)[index] for k in ("sequences", "attention_mask", "mask")})


@pytest.mark.parametrize("case", ["ties kept", "ties skipped", "best and worst of four"])
def test_online_dpo_loss_equals_trl(tmp_path, setup, case):
    """Two responses per prompt, the second prompt's tied: TRL trains on the tie anyway (its
    first response chosen), as llmexp with skip_ties=false; with skip_ties=true the loss is TRL's
    of the first pair alone. With four responses per prompt, llmexp keeps each prompt's best
    (first of the highest) and worst (last of the lowest), and the loss is TRL's of those."""
    tokenizer, policy, rows = setup
    policy = copy.deepcopy(policy)
    four = case == "best and worst of four"
    scores = torch.tensor([0.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 1.0]) if four else torch.tensor([0.0, 1.0, 1.0, 1.0])
    overrides = ["stage.beta=0.5", "stage.reward.missing_eos_penalty=null", f"stage.skip_ties={case != 'ties kept'}",
                 f"stage.group_size={4 if four else 2}", "stage.rpo_alpha=0"]
    r, reference, loss = online_dpo_loss(tokenizer, policy, rows, scores, overrides)
    kept = torch.tensor([1, 3, 4, 7] if four else [1, 0, 2, 3])  # chosen, rejected of each prompt
    assert r.scores.tolist() == scores[kept].tolist() and r.all_scores.tolist() == scores.tolist()
    if case == "ties skipped":
        r = rows_of(r, torch.arange(2))
    expected = trl_online_dpo_loss(tmp_path, tokenizer, policy, reference, r, r.scores, 0.5)
    assert loss == pytest.approx(expected, abs=1e-5)
    assert abs(loss - math.log(2)) > 1e-3  # the policy moved from the reference: not the loss at equality


def test_online_dpo_rpo_alpha_adds_the_chosen_responses_mean_token_nll(setup):
    """stage.rpo_alpha (TRL's online DPO has none): each counted pair's loss gains alpha times its
    chosen response's mean token NLL, computed here from a plain forward pass of the policy."""
    tokenizer, policy, rows = setup
    scores = torch.tensor([0.0, 1.0, 1.0, 0.0])
    base = ["stage.beta=0.5", "stage.reward.missing_eos_penalty=null", "stage.group_size=2"]
    r, _, plain = online_dpo_loss(tokenizer, copy.deepcopy(policy), rows, scores, [*base, "stage.rpo_alpha=0"])
    moved = copy.deepcopy(policy)
    r, _, with_nll = online_dpo_loss(tokenizer, moved, rows, scores, [*base, "stage.rpo_alpha=0.5"])
    P = r.prompt_width
    with torch.no_grad():
        logits = moved(input_ids=r.sequences, attention_mask=r.attention_mask).logits[:, P - 1 : -1]
        token_logps = torch.log_softmax(logits, -1).gather(-1, r.sequences[:, P:].unsqueeze(-1)).squeeze(-1)
    nll = -(token_logps * r.mask).sum(1) / r.mask.sum(1)
    assert with_nll - plain == pytest.approx(0.5 * float(nll[0::2].mean()), abs=1e-5)  # rows 0, 2: the chosen
    assert float(nll[0::2].mean()) > 0.1
