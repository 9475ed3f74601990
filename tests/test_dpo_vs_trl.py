"""llmexp's preference losses against TRL's: DPO (DPOTrainer), SimPO (CPOTrainer) and ORPO (ORPOTrainer),
same tiny model, same pairs, same loss (|delta| <= 1e-5)."""

from __future__ import annotations

import math

import pytest
import torch

from llmexp.testing import typed

LOSSES = [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1), ("exo_pair", 1e-3), ("nca_pair", 0.0),
          ("bco_pair", 0.0), ("sppo_hard", 0.0), ("apo_zero", 0.0), ("apo_down", 0.0), ("discopop", 0.0)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama saved to disk as the reference, and a perturbed copy as the policy."""
    from transformers import AutoModelForCausalLM

    from llmexp.models.build import build_model
    from llmexp.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None, None, [], False)
    torch.manual_seed(0)
    model = build_model(typed(["stage=dpo"]).model, tokenizer)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    reference = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    policy = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tokenizer, policy, reference


@pytest.fixture(scope="module")
def pairs():
    from llmexp.data.skill import preference_pairs

    return list(preference_pairs(num_samples=6, seed=7))


def trl_batch_and_loss(tmp_path, tokenizer, policy, reference, pairs, loss_type, smoothing, sft_weight=0.0):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    losses = dict(loss_type=[loss_type, "sft"], loss_weights=[1.0, sft_weight]) if sft_weight else dict(loss_type=[loss_type])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, **losses, label_smoothing=smoothing,
                     per_device_train_batch_size=len(pairs), report_to=[], use_cpu=True, max_length=None,
                     bf16=False, fp16=False)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return batch, float(loss)


def llmexp_dpo(tokenizer, policy, reference, pairs, loss_type, smoothing, rpo_alpha=0.0):
    from llmexp.stages.preference import DPOStage
    from llmexp.stages.reference import Reference, frozen

    cfg = typed(["stage=dpo", f"stage.loss_type={loss_type}", f"stage.label_smoothing={smoothing}",
                 "stage.beta=0.1", f"stage.rpo_alpha={rpo_alpha}"])
    stage = DPOStage(cfg, policy, tokenizer)
    stage._frozen = {"reference": Reference(frozen(reference))}
    encode = stage.encoder("preference")
    batch = stage.collate([encode(row) for row in pairs])
    with torch.no_grad():
        terms = stage.pair_sums(batch)
    return batch, terms


@pytest.mark.parametrize("loss_type,smoothing", LOSSES)
def test_dpo_loss_equals_trl(tmp_path, tiny, pairs, loss_type, smoothing):
    tokenizer, policy, reference = tiny
    trl_batch, trl_loss = trl_batch_and_loss(tmp_path, tokenizer, policy, reference, pairs, loss_type, smoothing)
    ours, terms = llmexp_dpo(tokenizer, policy, reference, pairs, loss_type, smoothing)
    # The same tokens: TRL's completion mask is where llmexp's labels are not -100.
    width = trl_batch["input_ids"].shape[1]
    assert torch.equal(ours["input_ids"][:, :width], trl_batch["input_ids"])
    assert torch.equal((ours["labels"] != -100).long()[:, :width], trl_batch["completion_mask"])
    ours_loss = float(terms["loss"].mean())
    # float32 agreement (relative, for losses such as sppo_hard near 50; the prompt-shared pass sums in another order)
    assert abs(ours_loss - trl_loss) <= 1e-5 * max(1.0, abs(trl_loss)), (loss_type, ours_loss, trl_loss)
    assert ours_loss > 0


def test_rpo_term_equals_trl_sft_loss_added_to_dpo(tmp_path, tiny):
    """stage.rpo_alpha: the chosen answers' mean token NLL added to the loss; TRL's
    loss_type=[sigmoid, sft] with weights [1, alpha] (equal chosen lengths, where TRL's batch
    token mean and llmexp's per-pair token mean agree)."""
    from llmexp.data.skill import preference_pairs

    tokenizer, policy, reference = tiny
    rows = [p for p in preference_pairs(num_samples=40, seed=3) if len(p["chosen"][0]["content"]) == 9][:6]
    trl_batch, trl_loss = trl_batch_and_loss(tmp_path, tokenizer, policy, reference, rows, "sigmoid", 0.0, 0.5)
    _, terms = llmexp_dpo(tokenizer, policy, reference, rows, "sigmoid", 0.0, rpo_alpha=0.5)
    _, plain = llmexp_dpo(tokenizer, policy, reference, rows, "sigmoid", 0.0)
    assert abs(float(terms["loss"].mean()) - trl_loss) <= 1e-5
    assert torch.allclose(terms["loss"] - plain["loss"], 0.5 * terms["nll_chosen"], atol=1e-6)


def test_first_sigmoid_loss_is_ln2_when_policy_is_reference(tiny, pairs):
    tokenizer, _, reference = tiny
    _, terms = llmexp_dpo(tokenizer, reference, reference, pairs, "sigmoid", 0.0)
    assert terms["loss"].tolist() == pytest.approx([math.log(2)] * len(pairs), abs=1e-6)
    assert terms["accuracy"].sum().item() == 0  # ties are not wins


def test_label_smoothing_is_conservative_dpo(tiny, pairs):
    """sigmoid with label smoothing e: -(1-e) log s(b d) - e log s(-b d), from the same log-ratios."""
    tokenizer, policy, reference = tiny
    _, plain = llmexp_dpo(tokenizer, policy, reference, pairs, "sigmoid", 0.0)
    _, smooth = llmexp_dpo(tokenizer, policy, reference, pairs, "sigmoid", 0.2)
    bd = plain["reward_margin"]  # beta * delta
    expected = -(0.8) * torch.nn.functional.logsigmoid(bd) - 0.2 * torch.nn.functional.logsigmoid(-bd)
    assert torch.allclose(smooth["loss"], expected, atol=1e-6)
    assert not torch.allclose(smooth["loss"], plain["loss"])


# -- the reference-free stages against TRL's CPOTrainer (loss_type="simpo") and ORPOTrainer --------
# llmexp's batch (its tokens are DPO's, checked above) goes through TRL's own forward pass, log-probs
# and loss (get_batch_loss_metrics), so the comparison covers everything but TRL's tokenization.

def trl_reference_free(tmp_path, tokenizer, policy, rows, batch, stage, **options):
    from datasets import Dataset

    common = dict(output_dir=str(tmp_path / f"trl-{stage}"), per_device_train_batch_size=len(rows), report_to=[],
                  use_cpu=True, bf16=False, fp16=False, **options)
    if stage == "simpo":
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
        common["loss_type"] = "simpo"
    else:
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    strings = [{"prompt": r["prompt"][0]["content"], "chosen": r["chosen"][0]["content"],
                "rejected": r["rejected"][0]["content"]} for r in rows]
    trainer = Trainer(model=policy, args=Config(**common), train_dataset=Dataset.from_list(strings),
                      processing_class=tokenizer)
    n = len(rows)
    trl_batch = {f"{side}_{k}": batch[k][part] for side, part in (("chosen", slice(0, n)), ("rejected", slice(n, None)))
                 for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, trl_batch)
    return float(loss), metrics


def llmexp_reference_free(tokenizer, policy, rows, stage, *options):
    from llmexp.stages import stage_class

    stage_module = stage_class(stage)(typed([f"stage={stage}", *options]), policy, tokenizer)
    batch = stage_module.collate([stage_module.encoder("preference")(row) for row in rows])
    with torch.no_grad():
        return batch, stage_module.pair_sums(batch)


def equal_length_pairs(num=6):
    """Pairs whose chosen answers have one length, where TRL's batch token mean of the NLL and
    llmexp's per-pair token mean agree."""
    from llmexp.data.skill import preference_pairs

    return [p for p in preference_pairs(num_samples=40, seed=3) if len(p["chosen"][0]["content"]) == 9][:num]


@pytest.mark.parametrize("beta,gamma,smoothing,cpo_alpha", [(2.0, 1.0, 0.0, 0.0), (0.5, 0.3, 0.1, 0.0),
                                                             (2.0, 0.5, 0.0, 0.7)])
def test_simpo_loss_equals_trl_cpo_trainer(tmp_path, tiny, beta, gamma, smoothing, cpo_alpha):
    tokenizer, policy, _ = tiny
    rows = equal_length_pairs()
    batch, terms = llmexp_reference_free(tokenizer, policy, rows, "simpo", f"stage.beta={beta}",
                                         f"stage.gamma={gamma}", f"stage.label_smoothing={smoothing}",
                                         f"stage.cpo_alpha={cpo_alpha}")
    trl_loss, metrics = trl_reference_free(tmp_path, tokenizer, policy, rows, batch, "simpo", beta=beta,
                                           simpo_gamma=gamma, label_smoothing=smoothing, cpo_alpha=cpo_alpha)
    assert abs(float(terms["loss"].mean()) - trl_loss) <= 1e-5
    assert float(terms["reward_chosen"].mean()) == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert float(terms["reward_margin"].mean()) == pytest.approx(metrics["rewards/margins"], abs=1e-5)
    assert float(terms["accuracy"].mean()) == pytest.approx(metrics["rewards/accuracies"], abs=1e-6)


def test_orpo_loss_equals_trl_orpo_trainer(tmp_path, tiny, pairs):
    """The odds-ratio term and rewards as TRL's; the NLL term differs on purpose: llmexp's covers the
    chosen answer (the paper's L_SFT, as sft trains), TRL's the prompt tokens too."""
    tokenizer, policy, _ = tiny
    batch, terms = llmexp_reference_free(tokenizer, policy, pairs, "orpo", "stage.beta=0.3")
    trl_loss, metrics = trl_reference_free(tmp_path, tokenizer, policy, pairs, batch, "orpo", beta=0.3)
    ours_odds_term = float((terms["loss"] - terms["nll_chosen"]).mean())
    assert abs(ours_odds_term - (trl_loss - metrics["nll_loss"])) <= 1e-5
    assert float(terms["log_odds_ratio"].mean()) == pytest.approx(metrics["log_odds_chosen"], abs=1e-5)
    assert float(terms["reward_rejected"].mean()) == pytest.approx(metrics["rewards/rejected"], abs=1e-5)
    assert float(terms["accuracy"].mean()) == pytest.approx(metrics["rewards/accuracies"], abs=1e-6)


def unpaired(pairs):
    """Each pair as two labelled completions, chosen first (the order kto gives a preference row's)."""
    rows = []
    for p in pairs:
        rows += [{"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                 {"prompt": p["prompt"], "completion": p["rejected"], "label": False}]
    return rows


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("fmt", ["unpaired_preference", "preference"])
def test_kto_loss_equals_trl(tmp_path, tiny, pairs, loss_type, fmt):
    """stage=kto on unpaired rows, and on the same completions given as preference pairs, equals
    TRL's KTOTrainer (its tokens, its KL pairs of each prompt with the previous completion)."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from llmexp.stages.preference import KTOStage
    from llmexp.stages.reference import Reference, frozen

    tokenizer, policy, reference = tiny
    rows = unpaired(pairs)
    args = KTOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=loss_type, desirable_weight=2.0,
                     undesirable_weight=1.5, per_device_train_batch_size=len(rows), report_to=[], use_cpu=True,
                     max_length=None, bf16=False, fp16=False)
    trainer = KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, trl_batch))

    cfg = typed(["stage=kto", f"stage.loss_type={loss_type}", "stage.beta=0.1", "stage.desirable_weight=2.0",
                 "stage.undesirable_weight=1.5"])
    stage = KTOStage(cfg, policy, tokenizer)
    stage._frozen = {"reference": Reference(frozen(reference))}
    source = rows if fmt == "unpaired_preference" else pairs
    batch = stage.collate([stage.encoder(fmt)(row) for row in source])
    width = trl_batch["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][:, :width], trl_batch["input_ids"])
    assert batch["desirable"].tolist() == [True, False] * len(pairs)
    with torch.no_grad():
        terms = stage.completion_sums(batch)
    if loss_type == "kto":
        assert float(terms["kl"]) > 0  # the mismatched completions are less likely than the policy's own
    ours = float(terms["loss"].mean())
    assert abs(ours - trl_loss) <= 1e-5, (ours, trl_loss)
