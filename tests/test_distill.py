"""stage=distill: the divergence and the stage's loss against TRL's GKD, the student's own
samples, and the teacher checks (the learning proof is in test_post_training.py)."""

from __future__ import annotations

import math
import os
import types

import pytest
import torch

from llmexp.testing import run_cli, typed

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def gkd():
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergence_is_trls_generalised_jsd(beta, temperature):
    from llmexp.losses import distillation_divergence

    torch.manual_seed(0)
    student, teacher = torch.randn(3, 6, 17), 2 * torch.randn(3, 6, 17)
    labels = torch.randint(0, 17, (3, 6))
    labels[0, :3] = labels[2, 4:] = -100
    mask = labels != -100
    ours = (distillation_divergence(student, teacher, beta, temperature) * mask).sum() / mask.sum()
    theirs = gkd().generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-6)
    # the named ends: forward KL is KL(teacher || student), reverse KL(student || teacher)
    if beta in (0.0, 1.0):
        s, t = torch.log_softmax(student / temperature, -1), torch.log_softmax(teacher / temperature, -1)
        p, q = (t, s) if beta == 0.0 else (s, t)
        assert torch.allclose(distillation_divergence(student, teacher, beta, temperature),
                              (p.exp() * (p - q)).sum(-1), atol=1e-6)


@pytest.fixture
def teacher_dir(tiny_teacher):
    return tiny_teacher


def distill_stage(teacher_dir, *overrides):
    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.stages.distill import DistillStage

    cfg = typed(["stage=distill", f"stage.teacher={teacher_dir}", "model.hidden_size=32", *overrides])
    torch.manual_seed(0)
    return DistillStage.create(cfg, load_tokenizer(None, None, [], False))


def chat_batch(stage, n=6):
    from llmexp.data.skill import chat_examples

    rows = [stage.encoder("chat")(r) for r in list(chat_examples(num_samples=n, seed=3))]
    return stage.collate(rows)


@pytest.mark.parametrize("loss_type,beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5)])
def test_stage_loss_is_trls_gkd_loss_on_the_same_batch(teacher_dir, loss_type, beta):
    """The data batch's loss per completion token equals TRL's GKDTrainer.compute_loss (its
    student and teacher forward, causal shift and label mask) on the same tokens."""
    stage = distill_stage(teacher_dir, f"stage.loss_type={loss_type}", "stage.sft_weight=0", "stage.attention_weight=0")
    batch = chat_batch(stage)
    with torch.no_grad():
        loss, extras = stage.micro_loss(batch)
        ours = float(loss) / batch["loss_weight"]
        trainer = types.SimpleNamespace(teacher_model=stage.teacher, beta=beta,
                                        generalized_jsd_loss=gkd().generalized_jsd_loss)
        theirs = gkd().compute_loss(trainer, stage.model, {k: batch[k] for k in ("input_ids", "attention_mask",
                                                                                 "labels")})
    assert ours == pytest.approx(float(theirs), abs=1e-5)
    assert float(extras["divergence"]) == pytest.approx(float(loss))


def test_temperature_scales_by_its_square_and_sft_weight_adds_the_nll(teacher_dir):
    from llmexp.losses import distillation_divergence, token_nll_sum

    base = distill_stage(teacher_dir)
    batch = chat_batch(base)
    stage = distill_stage(teacher_dir, "stage.temperature=2.0", "stage.sft_weight=0.5", "stage.attention_weight=0")
    with torch.no_grad():
        loss, extras = stage.micro_loss(batch)
        logits = stage.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher = stage.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    divergence = 4.0 * distillation_divergence(logits[:, :-1], teacher[:, :-1], 0.0, 2.0)[mask].sum()
    nll, _ = token_nll_sum(logits, batch["labels"])
    assert float(extras["divergence"]) == pytest.approx(float(divergence), rel=1e-5)
    assert float(loss) == pytest.approx(float(divergence + 0.5 * nll), rel=1e-5)


def test_attention_divergence_by_hand():
    """KL(teacher || student) of each query's attention row, averaged over heads and the queries
    in the mask, then over the paired layers; head-averaged maps when the head counts differ."""
    from llmexp.losses import attention_divergence as summed, paired_layers

    def attention_divergence(student, teacher, mask):  # the mean over the masked tokens
        total, count = summed(student, teacher, mask)
        return total / count if count else total

    teacher = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).reshape(1, 1, 2, 2)
    student = torch.tensor([[1.0, 0.0], [0.25, 0.75]]).reshape(1, 1, 2, 2)
    second_row = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    both = torch.tensor([[True, True]])
    assert float(attention_divergence([teacher], [teacher], both)) == 0.0
    assert float(attention_divergence([student], [teacher], both)) == pytest.approx(second_row / 2)
    assert float(attention_divergence([student], [teacher], torch.tensor([[True, False]]))) == 0.0
    # two layers: the mean of their divergences
    assert float(attention_divergence([student, teacher], [teacher, teacher], both)) == pytest.approx(second_row / 4)
    # a two-head teacher of a one-head student: the teacher's heads averaged
    other = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
    two_heads = torch.cat([other, torch.tensor([[1.0, 0.0], [0.5, 0.5]]).reshape(1, 1, 2, 2)], 1)  # mean row 2: .25/.75
    assert float(attention_divergence([student], [two_heads], both)) == pytest.approx(0.0, abs=1e-6)
    assert paired_layers(2, 2) == [(0, 0), (1, 1)]
    assert paired_layers(2, 4) == [(0, 0), (1, 3)]  # first with first, last with last
    assert paired_layers(3, 12) == [(0, 0), (1, 6), (2, 11)]
    assert paired_layers(1, 2) == [(0, 0)]
    assert paired_layers(3, 2) == [(0, 0), (1, 1), (2, 1)]  # a deeper student


def test_attention_transfer_adds_the_weighted_attention_divergence(teacher_dir):
    """stage.attention_weight: both models run eager attention, and the loss is the divergence
    and NLL of the stage without it plus the weight x the attention divergence of the same
    forward; the record names the paired layers."""
    from llmexp.losses import attention_divergence

    without = distill_stage(teacher_dir, "stage.attention_weight=0")
    stage = distill_stage(teacher_dir, "stage.attention_weight=2")
    assert stage.model.config._attn_implementation == "eager" == stage.teacher.config._attn_implementation
    assert without.model.config._attn_implementation == "sdpa"
    batch = chat_batch(stage)
    with torch.no_grad():
        loss, extras = stage.micro_loss(batch)
        plain, _ = without.micro_loss(batch)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        mine = stage.model(**inputs, output_attentions=True).attentions
        theirs = stage.teacher(**inputs, output_attentions=True).attentions
        total, count = attention_divergence(mine, theirs, batch["attention_mask"].bool())
        expected = total / count
    assert float(expected) > 1e-4  # untrained, both attend nearly uniformly, but not alike
    assert float(loss) == pytest.approx(float(plain) + 2 * float(expected) * batch["loss_weight"], rel=1e-5)
    assert float(extras["attention_divergence"]) / batch["loss_weight"] == pytest.approx(float(expected), rel=1e-5)
    assert stage.summary_extras()["attention_transfer"] == {"layers": [(0, 0), (1, 1)], "heads": "one to one",
                                                            "attention_dropout_switched_off": 0.0}
    sums = stage.val_sums(batch)  # a sum over the tokens and their count: exact over any batching
    assert int(sums["attention_divergence"][1]) == int(batch["attention_mask"].sum())
    assert float(sums["attention_divergence"][0] / sums["attention_divergence"][1]) == pytest.approx(float(expected),
                                                                                                    rel=1e-5)


def test_a_gpt2_student_compares_its_maps_without_attention_dropout(teacher_dir):
    """gpt2 as HF configures it drops out 10 % of its attention weights in training, and eager
    attention returns them dropped out: compared so, the divergence was 2.8 in training against 0.4 in validation. With
    attention transfer the student's attention dropout is off (recorded); its maps are whole."""
    stage = distill_stage(teacher_dir, "model=gpt2", "model.hidden_size=32", "model.extra.attn_pdrop=0.1")
    assert stage.summary_extras()["attention_transfer"]["attention_dropout_switched_off"] == pytest.approx(0.1)
    batch = chat_batch(stage)
    stage.model.train()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    maps = stage.model(**inputs, output_attentions=True).attentions[0]
    assert torch.allclose(maps.sum(-1)[batch["attention_mask"].bool().unsqueeze(1).expand_as(maps[..., 0])],
                          torch.tensor(1.0), atol=1e-5)  # every row a distribution, nothing dropped
    assert stage.model.config.attn_pdrop == pytest.approx(0.1)  # the exported config keeps the user's value


def test_on_policy_batches_are_the_students_samples_scored_by_the_teacher(teacher_dir):
    """stage.lmbda=1: every micro-batch is the prompts answered by the student; labels cover each
    response up to its eos and nothing of the prompt; the loss is TRL's on those tokens."""
    stage = distill_stage(teacher_dir, "stage.lmbda=1", "stage.rollout.max_new_tokens=8", "stage.attention_weight=0")
    batch = chat_batch(stage)
    torch.manual_seed(5)
    sampled = stage.sample_completions(batch["prompt"])
    width = batch["prompt"]["prompt_ids"].shape[1]
    assert torch.equal(sampled["input_ids"][:, :width], batch["prompt"]["prompt_ids"])
    assert (sampled["labels"][:, :width] == -100).all()
    eos = stage.tokenizer.eos_token_id
    for ids, labels in zip(sampled["input_ids"][:, width:].tolist(), sampled["labels"][:, width:].tolist()):
        end = ids.index(eos) + 1 if eos in ids else len(ids)
        assert labels[:end] == ids[:end] and all(x == -100 for x in labels[end:])
    with torch.no_grad():
        torch.manual_seed(5)
        loss, extras = stage.micro_loss(batch)
        trainer = types.SimpleNamespace(teacher_model=stage.teacher, beta=0.0,
                                        generalized_jsd_loss=gkd().generalized_jsd_loss)
        theirs = gkd().compute_loss(trainer, stage.model, {k: sampled[k] for k in ("input_ids", "attention_mask",
                                                                                   "labels")})
    # mean over the sampled tokens (left-padded prompts: position ids from the mask, as the sampler's)
    assert float(loss) / batch["loss_weight"] == pytest.approx(float(theirs), abs=1e-4)
    assert float(extras["on_policy"]) == batch["loss_weight"]


def test_the_on_policy_draw_is_the_same_on_every_rank_and_after_a_resume(teacher_dir):
    stage = distill_stage(teacher_dir, "stage.lmbda=0.5")
    draws = []
    for _ in range(2):  # the same step twice: a resumed run redraws exactly
        stage.on_train_batch_start(None, 0)
        draws.append([stage._on_policy() for _ in range(40)])
    assert draws[0] == draws[1] and 10 < sum(draws[0]) < 30


def _other_tokenizer_teacher(path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llmexp.models.tokenizer import ensure_special_tokens, train_bpe

    tokenizer = ensure_special_tokens(train_bpe([f"the number {i} is here" for i in range(200)], vocab_size=300))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


@pytest.mark.parametrize("case", ["no teacher", "missing", "reward model", "other tokenizer", "qwen2 student"])
def test_bad_teachers_exit_2_with_the_fix(tmp_path, teacher_dir, case):
    if case == "reward model":
        import json
        import shutil

        teacher = tmp_path / "rm"
        shutil.copytree(teacher_dir, teacher)
        config = json.loads((teacher / "config.json").read_text())
        (teacher / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    elif case == "other tokenizer":
        teacher = tmp_path / "other"
        _other_tokenizer_teacher(teacher)
    elif case == "qwen2 student":  # reads the bundled tokenizer as Qwen2's, which adds <|endoftext|>
        teacher = teacher_dir
    else:
        teacher = tmp_path / "nowhere"
    overrides = [] if case == "no teacher" else [f"stage.teacher={teacher}"]
    overrides += ["model=qwen2"] if case == "qwen2 student" else []
    r = run_cli(["stage=distill", *overrides, "logger=none", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"],
                cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "stage.teacher" in r.stderr
    expected = {"no teacher": "needs a teacher", "missing": "does not exist", "reward model": "is a reward model",
                "other tokenizer": "one tokenizer",
                "qwen2 student": "distill into a student of the teacher's architecture (model=llama)"}[case]
    assert expected in r.stderr, r.stderr[-2000:]
    # refused before training: nothing of the run is left to block the same hydra.run.dir
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "model").exists()
