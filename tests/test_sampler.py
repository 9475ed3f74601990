"""The rollout sampler against transformers' model.generate: the same greedy tokens, the same
sampling distribution, the rollout's own log-probs equal to a forward pass, compiled equal to eager."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from llmexp.advantages import response_mask
from llmexp.sampler import Sampler, draw

G, T = 4, 12


@pytest.fixture(scope="module")
def tiny():
    """A random tiny llama, its logits sharpened, whose eos takes over one common token's logit, so greedy responses end
    at different lengths (and finished rows leave the decode batch), with 6 left-padded prompts."""
    from transformers import AutoModelForCausalLM

    from llmexp.data.collate import collate_prompts
    from llmexp.data.encode import render_prompt
    from llmexp.models.build import architecture_config
    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.testing import typed

    tok = load_tokenizer(None, None)
    cfg = typed(["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                         "model.intermediate_size=128"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(architecture_config(cfg.model, tok), attn_implementation="sdpa").eval()
    prompts = ["What is 3 + 4?", "Compute 12 * 7.", "What is 100 - 58?", "9 + 9 =",
               "What is the sum of 123 and 456?", "Add 1 and 2."]
    batch = collate_prompts([{"input_ids": render_prompt(tok, [{"role": "user", "content": p}]), "prompt": p,
                              "columns": {}} for p in prompts], tok.pad_token_id)
    ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    with torch.no_grad():
        # A random init's logits are nearly flat; a trained model's are not (and sampling settings
        # only matter then).
        model.get_output_embeddings().weight.mul_(12.0)
        # eos takes the place of the token greedy decoding picks most often
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=T, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, ids.shape[1]:]
        common = int(out[:, 2:].flatten().bincount().argmax())
        head = model.get_output_embeddings().weight
        head[tok.eos_token_id] = head[common] * 1.05
    return model, tok, ids, mask


def generate(model, tok, ids, mask, k, **sampling):
    with torch.no_grad():
        out = model.generate(input_ids=ids.repeat_interleave(k, 0), attention_mask=mask.repeat_interleave(k, 0),
                             max_new_tokens=T, min_new_tokens=1, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, **(sampling or {"do_sample": False}))
    return out[:, ids.shape[1]:]


def padded(x: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=pad)


@pytest.mark.parametrize("share_prefill,drop_finished", [(True, True), (True, False), (False, True)])
def test_greedy_tokens_equal_generate_of_each_prompt_repeated(tiny, share_prefill, drop_finished):
    model, tok, ids, mask = tiny
    reference = generate(model, tok, ids, mask, G)
    lengths = response_mask(reference, tok.eos_token_id).sum(1)
    assert lengths.min() < lengths.max() < T or lengths.min() < T, "the fixture must end responses early"
    sampler = Sampler(model, tok.eos_token_id, tok.pad_token_id, share_prefill=share_prefill,
                      drop_finished=drop_finished)
    got = sampler(ids, mask, T, samples_per_prompt=G, greedy=True).responses
    assert torch.equal(padded(reference, T, tok.pad_token_id), got)


def test_rollout_logprobs_entropy_and_hidden_equal_a_forward_pass(tiny):
    model, tok, ids, mask = tiny
    torch.manual_seed(3)
    s = Sampler(model, tok.eos_token_id, tok.pad_token_id)(ids, mask, T, samples_per_prompt=G, temperature=0.7,
                                                           with_logprobs=True, with_hidden=True)
    m = response_mask(s.responses, tok.eos_token_id)
    seq = torch.cat([ids.repeat_interleave(G, 0), s.responses], 1)
    attention = torch.cat([mask.repeat_interleave(G, 0), m.long()], 1)
    with torch.no_grad():
        out = model(input_ids=seq, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
                    output_hidden_states=True)
    P = ids.shape[1]
    logp = torch.log_softmax(out.logits[:, P - 1:-1].float() / 0.7, -1)
    expected = logp.gather(-1, s.responses.unsqueeze(-1)).squeeze(-1) * m
    assert m.sum() > G * len(ids)  # responses of several tokens
    assert torch.allclose(s.logprobs * m, expected, atol=1e-4), (s.logprobs * m - expected).abs().max()
    entropy = -(logp.exp() * logp).sum(-1) * m
    assert torch.allclose(s.entropy * m, entropy, atol=1e-4)
    hidden = out.hidden_states[-1][:, P - 1:-1] * m.unsqueeze(-1)
    assert torch.allclose(s.hidden * m.unsqueeze(-1), hidden, atol=1e-4)


def _token_counts(responses: torch.Tensor, tok, vocab: int) -> torch.Tensor:
    m = response_mask(responses, tok.eos_token_id).bool()
    return responses[m].bincount(minlength=vocab).double()


def _same_distribution_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value of a chi-square test that two token histograms come from one distribution (tokens
    seen fewer than 10 times pooled into one bin)."""
    from scipy.stats import chi2_contingency

    frequent = (a + b) >= 10
    table = torch.stack([torch.cat([a[frequent], a[~frequent].sum(0, keepdim=True)]),
                         torch.cat([b[frequent], b[~frequent].sum(0, keepdim=True)])])
    return float(chi2_contingency(table.numpy())[1])


def test_sampled_tokens_follow_generates_distribution(tiny):
    """Token frequencies of 900 sampled responses: shared prefill and dropped rows against
    generate's, at temperature 0.7 with top-k 40. The test can tell: temperature 1.0 is refused."""
    model, tok, ids, mask = tiny
    vocab, k, kw = model.config.vocab_size, 150, {"temperature": 0.7, "top_k": 40, "top_p": 1.0}
    torch.manual_seed(11)
    ours = Sampler(model, tok.eos_token_id, tok.pad_token_id)(ids, mask, T, samples_per_prompt=k, **kw).responses
    torch.manual_seed(12)
    theirs = generate(model, tok, ids, mask, k, do_sample=True, **kw)
    torch.manual_seed(13)
    hotter = generate(model, tok, ids, mask, k, do_sample=True, temperature=1.0, top_k=40)
    a, b, c = (_token_counts(x, tok, vocab) for x in (ours, theirs, hotter))
    assert _same_distribution_p(a, b) > 1e-3
    assert _same_distribution_p(c, b) < 1e-6
    first = [x[:, 0].view(len(ids), k) for x in (ours, theirs)]  # per prompt: the same first-token law
    for i in range(len(ids)):
        assert _same_distribution_p(*(f[i].bincount(minlength=vocab).double() for f in first)) > 1e-4


def test_draw_follows_the_probabilities_and_never_picks_a_token_without_any(monkeypatch):
    """The inverse-CDF draw against torch.multinomial on the same rows (a top-k-like row with zeros
    and a near one-hot row), 60,000 draws each; then with the uniform at its very top, where rounding
    could step past the row's last token with probability."""
    from scipy.stats import chi2_contingency

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 50) * 2, -1)
    probs[0, 10:] = 0.0  # only the first 10 tokens, as top-k 10 leaves them
    probs[1] = torch.softmax(torch.tensor([9.0] + [0.0] * 49), -1)
    probs = probs / probs.sum(-1, keepdim=True)
    rows = probs.repeat_interleave(30_000, 0)
    ours, theirs = draw(rows).view(2, -1), torch.multinomial(rows, 1).view(2, -1)
    assert (ours[0] < 10).all()
    for i in range(2):
        a, b = ours[i].bincount(minlength=50).double(), theirs[i].bincount(minlength=50).double()
        seen = (a + b) > 0
        assert chi2_contingency(torch.stack([a[seen], b[seen]]).numpy())[1] > 1e-3
        assert (a / a.sum() - probs[i]).abs().max() < 0.01
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, **kw))
    assert draw(probs).tolist() == [9, 49]


@pytest.mark.slow
def test_compiled_decode_step_equals_eager(tiny):
    """The same tokens and log-probs, from one compiled graph for every decode step (the cache
    held views after the prefill, whole tensors later: that alone compiled a second graph)."""
    from torch._dynamo.utils import counters

    model, tok, ids, mask = tiny
    eager = Sampler(model, tok.eos_token_id, tok.pad_token_id)(ids, mask, T, samples_per_prompt=G, greedy=True,
                                                               with_logprobs=True)
    counters.clear()
    compiled = Sampler(model, tok.eos_token_id, tok.pad_token_id, compile=True)(
        ids, mask, T, samples_per_prompt=G, greedy=True, with_logprobs=True)
    assert torch.equal(eager.responses, compiled.responses)
    assert torch.allclose(eager.logprobs, compiled.logprobs, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_reward_function_workers_score_concurrently_and_alike():
    """stage.reward.workers: the same scores in the same order, from several threads at once (a
    slow reward function, as a plugin's calling a sandbox, in place of the built-in one)."""
    from llmexp.rewards import FunctionReward, accepted_columns

    running, most = [0], [0]
    lock = threading.Lock()

    def slow_length(completion: str) -> float:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return float(len(completion))

    texts = [f"answer {'x' * i}" for i in range(8)]
    scores = {}
    for workers in (0, 4):
        reward = FunctionReward("arithmetic_correct", workers=workers)
        reward.fn, reward.accepted = slow_length, accepted_columns(slow_length)
        scores[workers] = reward([None] * 8, texts, [{"answer": "1"}] * 8)
        if workers == 0:
            assert most[0] == 1
    assert torch.equal(scores[0], scores[4]) and scores[0].tolist() == [float(len(t)) for t in texts]
    assert most[0] > 1


def test_loss_forward_sharing_each_prompt_equals_whole_sequences_with_gradients(tiny):
    """grpo's loss runs a prompt once for its group (keys and values repeated to the samples):
    the same log-probs, entropies and parameter gradients as every prompt + response run whole."""
    import copy

    from llmexp.stages.policy_gradient import GRPOStage
    from llmexp.stages.rollout import Rollout
    from llmexp.testing import typed

    model, tok, ids, mask = tiny
    cfg = typed(["stage=grpo", f"stage.group_size={G}", "stage.rollout.temperature=0.7", "model.hidden_size=64",
                 "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.intermediate_size=128"])
    torch.manual_seed(5)
    responses = Sampler(model, tok.eos_token_id, tok.pad_token_id)(ids, mask, T, samples_per_prompt=G,
                                                                   temperature=0.7).trimmed(tok.eos_token_id).responses
    m = response_mask(responses, tok.eos_token_id)
    attention = torch.cat([mask.repeat_interleave(G, 0), m.long()], 1)
    r = Rollout(sequences=torch.cat([ids.repeat_interleave(G, 0), responses], 1), attention_mask=attention,
                position_ids=(attention.cumsum(-1) - 1).clamp(min=0), prompt_width=ids.shape[1], mask=m,
                scores=torch.zeros(len(responses)), samples_per_prompt=G)
    results = {}
    for share in (True, False):
        policy = copy.deepcopy(model).train()
        cfg.stage.rollout.share_prefill = share
        stage = GRPOStage(cfg, policy, tok)
        assert stage.shares_prefix(policy) is share
        logprobs, _, entropy = stage.token_outputs(r, policy)
        (logprobs * m).sum().backward()
        results[share] = (logprobs * m, entropy * m, {n: p.grad.clone() for n, p in policy.named_parameters()})
    (lp_a, ent_a, grad_a), (lp_b, ent_b, grad_b) = results[True], results[False]
    assert torch.allclose(lp_a, lp_b, atol=1e-4) and torch.allclose(ent_a, ent_b, atol=1e-4)
    for name in grad_b:
        assert torch.allclose(grad_a[name], grad_b[name], atol=1e-4, rtol=1e-3), name


def sampled_grpo_rollouts(tiny, unrewarded):
    """``G`` responses to each of the tiny prompts (temperature 0.7, seed 5), each scored 1 but the
    rows ``unrewarded``; returns a function that makes a fresh Rollout of them (with the sampling
    policy's log-probs and entropies)."""
    from llmexp.stages.rollout import Rollout

    model, tok, ids, mask = tiny
    torch.manual_seed(5)
    sampled = Sampler(model, tok.eos_token_id, tok.pad_token_id)(
        ids, mask, T, samples_per_prompt=G, temperature=0.7, with_logprobs=True).trimmed(tok.eos_token_id)
    m = response_mask(sampled.responses, tok.eos_token_id)
    attention = torch.cat([mask.repeat_interleave(G, 0), m.long()], 1)
    scores = torch.ones(len(m))
    scores[unrewarded] = 0.0
    return lambda: Rollout(
        sequences=torch.cat([ids.repeat_interleave(G, 0), sampled.responses], 1), attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0), prompt_width=ids.shape[1], mask=m, scores=scores,
        samples_per_prompt=G, logprobs=sampled.logprobs * m, entropy=sampled.entropy * m)


def test_grpo_update_without_the_groups_that_scored_alike_has_the_same_loss_and_gradients(tiny):
    """stage.skip_groups_without_signal: the update's passes run only the groups whose responses
    scored differently (here 2 of 6 prompts), with the loss, its metric sums and every parameter
    gradient of the update over all rows; train/entropy comes from the rollout instead."""
    import copy

    from llmexp.stages.policy_gradient import GRPOStage
    from llmexp.testing import typed

    model, tok, ids, mask = tiny
    cfg = typed(["stage=grpo", f"stage.group_size={G}", "stage.epochs=2", "stage.rollout.temperature=0.7",
                 "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                 "model.intermediate_size=128"])
    rollout = sampled_grpo_rollouts(tiny, [1, 2, 13])  # prompts 0 and 3 have a signal; the other four scored alike
    m = rollout().mask
    rows_run = []
    results = {}
    for skip in (True, False):
        cfg.stage.skip_groups_without_signal = skip
        policy = copy.deepcopy(model).train()
        stage = GRPOStage(cfg, policy, tok)
        assert stage.needs_sampling_entropy() is skip
        r = rollout()
        stats = stage.finish([r])
        hook = policy.get_input_embeddings().register_forward_hook(lambda mod, i, o: rows_run.append(len(i[0])))
        loss, extras = stage.rollout_loss(r)
        hook.remove()
        (loss / 100).backward()
        results[skip] = (loss.detach(), extras, stats, {n: p.grad.clone() for n, p in policy.named_parameters()})
    assert rows_run == [2, 2 * G, 6, 6 * G]  # prompts then responses: 2 groups of 6, then all 6
    (loss_a, extras_a, stats_a, grad_a), (loss_b, extras_b, stats_b, grad_b) = results[True], results[False]
    assert loss_a != 0 and torch.allclose(loss_a, loss_b, atol=1e-5)
    assert set(extras_b) - set(extras_a) == {"entropy"}
    assert all(torch.allclose(extras_a[k], extras_b[k], atol=1e-5) for k in extras_a)
    # the rollout's entropy is the update's (same weights, same temperature) over every row
    assert stats_a["entropy"] == pytest.approx(float(extras_b["entropy"] / m.sum()), rel=1e-4)
    assert "entropy" not in stats_b
    for name in grad_b:
        assert grad_b[name].abs().sum() > 0, name
        assert torch.allclose(grad_a[name], grad_b[name], atol=1e-6, rtol=1e-4), name


def test_grpo_kl_from_a_share_of_the_groups_that_scored_alike_is_the_full_kl_term_on_average(tiny):
    """stage.kl_sample_share: with a KL term, the update runs the groups with a signal and a drawn
    share of the others, each drawn one weighted by the inverse share, and the reference runs over
    those rows alone. Averaged over every draw of share 0.5 (each of the 4 subsets of the two
    groups that scored alike, equally likely), the loss, its KL sum and every gradient equal the
    update over all rows; the draw itself keeps each such group with that probability."""
    import copy
    import itertools

    from llmexp import advantages as M
    from llmexp.stages.policy_gradient import GRPOStage
    from llmexp.stages.reference import Reference
    from llmexp.testing import typed

    model, tok, ids, mask = tiny
    rollout = sampled_grpo_rollouts(tiny, [1, 5, 13, 17])  # prompts 2 and 5 scored alike; the other four have a signal
    policy = copy.deepcopy(model).train()
    reference = Reference.of(policy, keep_copy=True)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))

    def update(share, kl_weights=None):
        cfg = typed(["stage=grpo", f"stage.group_size={G}", "stage.epochs=2", "stage.rollout.temperature=0.7",
                     "stage.kl_coef=0.04", f"stage.kl_sample_share={share}"])
        stage = GRPOStage(cfg, policy, tok)
        stage._frozen["reference"] = reference
        r = stage.keep_rows(rollout())
        if kl_weights is not None:
            r.kl_weights = kl_weights
        r.ref_logprobs = stage.reference_logprobs(r)
        stage.finish([r])
        rows = []
        hook = policy.get_input_embeddings().register_forward_hook(lambda mod, i, o: rows.append(len(i[0])))
        policy.zero_grad()
        loss, extras = stage.rollout_loss(r)
        hook.remove()
        loss.backward()
        return r, float(loss), float(extras["kl"]), {n: p.grad.clone() for n, p in policy.named_parameters()}, rows

    full, loss_full, kl_full, grad_full, rows_full = update(1.0)
    assert full.kl_weights is None and rows_full == [6, 6 * G] and kl_full > 0
    losses, kls, grads = [], [], []
    for drawn in itertools.product([0.0, 2.0], repeat=2):
        weights = torch.tensor([1.0, 1.0, drawn[0], 1.0, 1.0, drawn[1]]).repeat_interleave(G)
        r, loss, kl, grad, rows = update(0.5, weights)
        groups = 4 + sum(d > 0 for d in drawn)
        assert rows == [groups, groups * G]  # prompts, then responses: the drawn groups alone
        ran = weights > 0
        assert torch.allclose(r.ref_logprobs[ran], full.ref_logprobs[ran], atol=1e-6)
        assert (r.ref_logprobs[~ran] == 0).all()  # the reference never ran them
        losses.append(loss), kls.append(kl), grads.append(grad)
    assert sum(losses) / 4 == pytest.approx(loss_full, rel=1e-5)
    assert sum(kls) / 4 == pytest.approx(kl_full, rel=1e-5)
    for name, g in grad_full.items():
        avg = sum(d[name] for d in grads) / 4
        assert torch.allclose(avg, g, atol=1e-5, rtol=1e-4), name
    # the draw: groups with a signal weigh 1, the others 1 / share with probability share
    torch.manual_seed(0)
    without = torch.arange(40_000) % 4 != 0
    w = M.sampled_group_weights(without, 0.25)
    assert (w[~without] == 1).all() and set(w[without].unique().tolist()) == {0.0, 4.0}
    assert float(w[without].mean()) == pytest.approx(1.0, abs=0.03)
    assert M.weighted_rows(torch.zeros(3 * G), G).tolist() == list(range(G))  # none drawn: the first group, weight 0


def test_online_dpo_runs_tied_pairs_without_gradient_and_computes_the_same(tiny):
    """stage.skip_ties: the tied pairs (left out of the loss) run without recording a gradient,
    for their metrics; the loss, every metric sum and every parameter gradient equal one pass
    over all rows with gradients, and a batch of ties alone still runs one pair with gradient."""
    import copy

    from llmexp.stages.online_dpo import OnlineDPOStage
    from llmexp.stages.rollout import Rollout
    from llmexp.testing import typed

    model, tok, ids, mask = tiny
    cfg = typed(["stage=online_dpo", "stage.group_size=2", "model.hidden_size=64", "model.num_layers=2",
                 "model.num_heads=4", "model.num_kv_heads=2", "model.intermediate_size=128"])
    torch.manual_seed(5)
    responses = Sampler(model, tok.eos_token_id, tok.pad_token_id)(ids, mask, T, samples_per_prompt=2,
                                                                   temperature=0.7).trimmed(tok.eos_token_id).responses
    m = response_mask(responses, tok.eos_token_id)
    attention = torch.cat([mask.repeat_interleave(2, 0), m.long()], 1)
    for scores, learned in ((torch.tensor([1.0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0]), 3), (torch.ones(12), 1)):
        results, rows_run = {}, []
        for split in (True, False):
            policy = copy.deepcopy(model).train()
            stage = OnlineDPOStage(cfg, policy, tok)
            r = Rollout(sequences=torch.cat([ids.repeat_interleave(2, 0), responses], 1), attention_mask=attention,
                        position_ids=(attention.cumsum(-1) - 1).clamp(min=0), prompt_width=ids.shape[1], mask=m,
                        scores=scores, samples_per_prompt=2)
            r.ref_logprobs = torch.zeros_like(m)
            if not split:  # one pass over every row, with gradients
                stage.pair_outputs = lambda r, stage=stage: stage.token_outputs(r, stage.model)[::2]
            hook = policy.get_input_embeddings().register_forward_hook(
                lambda mod, i, o: rows_run.append((len(i[0]), torch.is_grad_enabled())))
            loss, extras = stage.rollout_loss(r)
            hook.remove()
            loss.backward()
            results[split] = (loss.detach(), extras, {n: p.grad.clone() for n, p in policy.named_parameters()})
        # the split run: prompts then responses of the learned pairs with gradient, of the rest without
        assert rows_run[:4] == [(learned, True), (2 * learned, True), (6 - learned, False), (12 - 2 * learned, False)]
        (loss_a, extras_a, grad_a), (loss_b, extras_b, grad_b) = results[True], results[False]
        assert torch.allclose(loss_a, loss_b, atol=1e-5)
        assert all(torch.allclose(extras_a[k], extras_b[k], atol=1e-5) for k in extras_b)
        for name in grad_b:
            assert torch.allclose(grad_a[name], grad_b[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("limit,calls", [(None, 1), (4, 2), (1, 3)])
def test_the_rollout_batch_is_sampled_in_as_few_calls_as_max_prompts_per_call_allows(tiny, limit, calls):
    """A rollout window's micro-batches are answered together (stage.rollout.max_prompts_per_call
    caps a call, in whole micro-batches), and each micro-batch gets back its own prompts' rows."""
    from llmexp.rewards import build_reward
    from llmexp.stages.policy_gradient import GRPOStage
    from llmexp.testing import typed

    model, tok, ids, mask = tiny
    cfg = typed(["stage=grpo", f"stage.group_size={G}", "model.hidden_size=64", "model.num_layers=2",
                 "model.num_heads=4", "model.num_kv_heads=2", "model.intermediate_size=128"]
                + ([f"stage.rollout.max_prompts_per_call={limit}"] if limit else []))
    stage = GRPOStage(cfg, model, tok)
    stage._frozen.update(reward=build_reward(cfg.stage.reward))
    window = [{"prompt_ids": ids[i:i + 2, (ids[i:i + 2] != tok.pad_token_id).any(0).nonzero().min():],
               "prompt_mask": mask[i:i + 2, (ids[i:i + 2] != tok.pad_token_id).any(0).nonzero().min():],
               "prompts": [f"p{i}", f"p{i + 1}"], "columns": [{"answer": "7"}] * 2} for i in (0, 2, 4)]
    seen = []
    sample = stage.sample
    stage.sample = lambda prompt_ids, *a, **kw: seen.append(len(prompt_ids)) or sample(prompt_ids, *a, **kw)
    rollouts = stage.rollouts(window)
    assert len(seen) == calls and sum(seen) == 6
    for r, mb in zip(rollouts, window):
        assert r.sequences.shape[0] == 2 * G and r.prompt_width == mb["prompt_ids"].shape[1]
        assert torch.equal(r.sequences[:, :r.prompt_width], mb["prompt_ids"].repeat_interleave(G, 0))
        assert r.mask.sum(1).min() >= 1 and r.mask.shape[1] == int(r.mask.sum(1).max())  # each trimmed to its own


def test_vllm_weight_sync_merges_a_lora_adapter_under_the_base_models_names(tiny):
    """What engine=vllm loads into vLLM after each update (the vLLM side needs a GPU): the
    policy's weights with its LoRA adapter merged, named as the base model's, and the adapter
    unmerged again afterwards."""
    import copy

    from peft import LoraConfig, get_peft_model

    from llmexp.rollout_engines import policy_weights

    model, tok, ids, mask = tiny
    policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    before = policy(input_ids=ids, attention_mask=mask).logits
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    with policy_weights(policy) as weights:  # compared inside: unmerging changes them in place
        weights = dict(weights)
        assert set(weights) == set(merged)
        assert all(torch.allclose(weights[n], merged[n], atol=1e-6) for n in merged)
    assert not torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"],
                              model.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    assert torch.allclose(policy(input_ids=ids, attention_mask=mask).logits, before, atol=1e-5)


def test_vllm_joins_the_run_as_trls_colocate_mode_does():
    """engine=vllm starts vLLM with its external_launcher backend on every rank, one device
    included (the engine then runs in this process, where the policy's weights reach it): the
    variables it reads name this rank, keep a rendezvous the launcher set, and otherwise pick a
    free port on localhost."""
    import socket

    from llmexp.rollout_engines import launch_env

    env = launch_env({}, 0, 0, 1)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost"}
    with socket.socket() as s:
        s.bind(("localhost", int(env["MASTER_PORT"])))  # free
    launched = {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29511", "RANK": "stale"}
    assert launch_env(launched, 3, 1, 4) == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
                                             "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29511"}
    assert launch_env({"MASTER_PORT": "auto"}, 0, 0, 1)["MASTER_PORT"] not in ("auto", "0")


def test_the_stage_answers_alike_with_either_engine(tiny):
    """stage.rollout.engine=hf and =generate give a grpo stage the same greedy responses (cut to
    the longest), and only hf brings the rollout's own log-probs."""
    from llmexp.stages.policy_gradient import GRPOStage
    from llmexp.testing import typed

    model, tok, ids, mask = tiny
    got = {}
    for engine in ("hf", "generate"):
        cfg = typed(["stage=grpo", f"stage.rollout.engine={engine}", f"stage.rollout.max_new_tokens={T}"])
        stage = GRPOStage(cfg, model, tok)
        got[engine] = stage.sample(ids, mask, greedy=True, samples_per_prompt=G)
        sampled = stage.sample(ids, mask, greedy=False, samples_per_prompt=G, with_logprobs=True)
        assert (sampled.logprobs is not None) is (engine == "hf")
    assert torch.equal(got["hf"].responses, got["generate"].responses)
    assert got["hf"].responses.shape[0] == G * len(ids)
