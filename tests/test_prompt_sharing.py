"""stage.share_prompt: each preference pair's prompt run once for both answers gives the losses,
metrics and gradients of the whole rows, for fewer tokens through the model."""

from __future__ import annotations

import pytest
import torch

from llmexp.prompt_sharing import share_pairs


def _stage(name: str, model: str, share: bool):
    from llmexp.stages import stage_class
    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.testing import typed

    torch.manual_seed(0)
    cfg = typed([f"stage={name}", f"model={model}", f"stage.share_prompt={str(share).lower()}"])
    return stage_class(name).create(cfg, load_tokenizer(None, None))


def _batch(stage, n: int = 6):
    from llmexp.data.module import load_examples

    rows = list(load_examples(stage.cfg.data, stage.cfg.stage.name).train)[:n]
    encode = stage.encoder("preference")
    return stage.collate([encode(r) for r in rows])


def _tokens_seen(model):
    """A hook counting the tokens the model's input embedding looks up."""
    seen = [0]
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.__setitem__(0, seen[0] + i[0].numel()))
    return seen


@pytest.mark.parametrize("name,model", [("rm", "llama"), ("dpo", "llama"), ("orpo", "llama"), ("rm", "gpt2"),
                                        ("dpo", "gpt2")])
def test_sharing_each_prompt_equals_whole_rows_with_gradients(name, model):
    out, grads, seen = {}, {}, {}
    for share in (False, True):
        stage = _stage(name, model, share)
        stage.model.eval()  # gpt2 has dropout: the same function both ways
        # a trained-looking model: random weights with a non-zero score head (the rm's starts at zero)
        for p in stage.model.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                torch.nn.init.normal_(p, std=0.1)
        batch = _batch(stage)
        counter = _tokens_seen(stage.model)
        terms = stage.pair_sums(batch)
        terms["loss"].sum().backward()
        out[share] = {k: v.detach() for k, v in terms.items()}
        grads[share] = {k: p.grad.clone() for k, p in stage.model.named_parameters() if p.grad is not None}
        seen[share] = counter[0]
    assert out[True].keys() == out[False].keys()
    for k in out[False]:
        assert torch.allclose(out[True][k], out[False][k], atol=1e-5), (k, out[True][k], out[False][k])
    assert grads[True].keys() == grads[False].keys() and grads[False]
    for k in grads[False]:
        assert torch.allclose(grads[True][k], grads[False][k], atol=1e-5, rtol=1e-4), k
    # the whole rows pad every row to the longest; shared, each prompt is looked up once (the
    # hook is on the policy; dpo's reference is another model)
    assert seen[True] < seen[False] == batch["input_ids"].numel()


def test_pairs_whose_prompts_differ_run_whole():
    stage = _stage("dpo", "llama", True)
    batch = _batch(stage, 4)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    pad = stage.tokenizer.pad_token_id
    shared = share_pairs(ids, mask, labels, pad)
    assert shared is not None and shared.prompt_ids.shape[0] == 4 and shared.answer_ids.shape[0] == 8
    changed = ids.clone()
    changed[5, 1] = (changed[5, 1] + 1) % 500  # the second pair's rejected row: another prompt token
    assert share_pairs(changed, mask, labels, pad) is None
    no_answer = labels.clone()
    no_answer[2] = -100
    assert share_pairs(ids, mask, no_answer, pad) is None
    assert share_pairs(ids[:3], mask[:3], labels[:3], pad) is None  # not pairs
