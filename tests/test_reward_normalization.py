"""A reward model's scores reach ppo/grpo on the scale its rm run measured (mean chosen -> +1,
mean rejected -> -1): raw Bradley-Terry scores (±10) swamp the KL penalty and the critic's
baseline, which made PPO against the bundled reward model collapse (measured: exact match
0.92 -> 0.00 raw, 0.92 -> 0.87 normalized, same reward model and settings)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from llmexp.models.tokenizer import load_tokenizer
from llmexp.rewards import ModelReward
from llmexp.stages.preference import score_normalization


def test_normalization_maps_the_held_out_means_to_plus_and_minus_one():
    norm = score_normalization({"val/score_chosen": 6.0, "val/score_rejected": -8.0})
    assert norm == {"llmexp_score_center": -1.0, "llmexp_score_scale": 7.0}
    assert (6.0 - norm["llmexp_score_center"]) / norm["llmexp_score_scale"] == 1.0
    assert (-8.0 - norm["llmexp_score_center"]) / norm["llmexp_score_scale"] == -1.0
    # a reward model that does not rank (or was never validated) is left as it scores
    assert score_normalization({"val/score_chosen": -1.0, "val/score_rejected": 2.0}) == {}
    assert score_normalization({}) == {}


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    tok = load_tokenizer(None, None)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_labels=1, pad_token_id=tok.pad_token_id))
    out = tmp_path_factory.mktemp("rm") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _scores(path, normalize=True):
    prompts = [[{"role": "user", "content": "What is 3 plus 4?"}]] * 3
    return ModelReward(str(path), normalize=normalize)(prompts, ["3 + 4 = 7", "3 + 4 = 8", "9"], [{}] * 3)


def test_model_reward_applies_the_saved_center_and_scale(reward_dir, tmp_path):
    raw = _scores(reward_dir)  # no normalization saved: scores as the model gives them
    assert raw.shape == (3,) and raw.std() > 0
    config = json.loads((reward_dir / "config.json").read_text())
    normalized_dir = tmp_path / "normalized"
    normalized_dir.mkdir()
    for f in reward_dir.iterdir():
        (normalized_dir / f.name).write_bytes(f.read_bytes())
    (normalized_dir / "config.json").write_text(json.dumps(
        {**config, "llmexp_score_center": 0.5, "llmexp_score_scale": 4.0}))
    assert torch.allclose(_scores(normalized_dir), (raw - 0.5) / 4.0, atol=1e-6)
    assert torch.allclose(_scores(normalized_dir, normalize=False), raw, atol=1e-6)
