"""trainer.keep_checkpoints keeps the newest N step checkpoints, and `llmexp export --checkpoint`
makes any of them a model: a Hugging Face directory generate/eval/serve load, or a GGUF file.
(Every stage's last checkpoint exports as its run's model/: test_resume; a sharded fsdp checkpoint
of an unfinished run: test_strategies.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llmexp.testing import TINY, run_cli
from safetensors.torch import load_file

EVERY_5 = [*TINY, "trainer.checkpoint_every_n_steps=5", "task.max_prompts=8"]


@pytest.fixture(scope="module")
def kept_three(tmp_path_factory) -> Path:
    """A 20-step SFT saving every 5 steps, keeping the newest three."""
    run_dir = tmp_path_factory.mktemp("keep") / "run"
    r = run_cli([*EVERY_5, "trainer.keep_checkpoints=3", f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def export(*args, cwd):
    return run_cli(["export", *map(str, args)], cwd=cwd)


def test_the_newest_checkpoints_are_kept_with_the_tokenizer(kept_three):
    names = sorted(p.name for p in (kept_three / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step-10.ckpt", "step-15.ckpt", "step-20.ckpt", "tokenizer"]
    assert (kept_three / "checkpoints" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (kept_three / "model" / "tokenizer.json").read_bytes()


def test_a_checkpoint_exports_as_a_model_that_generates(kept_three, tmp_path):
    from llmexp.record import load_language_model

    r = export(kept_three, "--checkpoint", "step-15", "--format", "hf", cwd=tmp_path)
    out = kept_three / "exports" / "step-15"
    assert r.returncode == 0 and f"wrote {out} (step 15 of {kept_three})" in r.stdout, r.stderr[-3000:]
    saved = torch.load(kept_three / "checkpoints" / "step-15.ckpt", weights_only=True)["state_dict"]
    weights = load_file(out / "model.safetensors")
    assert weights.keys() and all(torch.equal(v, saved[f"model.{k}"]) for k, v in weights.items())
    final = load_file(kept_three / "model" / "model.safetensors")
    assert not all(torch.equal(weights[k], final[k]) for k in final)  # step 15, not the end
    model, tokenizer = load_language_model(out)
    ids = tokenizer("Add 3 and 9.", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]
    # the step-20 checkpoint is the run's model/, validated at its step (said with its metrics)
    r = export(kept_three, "--checkpoint", "20", "--format", "hf", "--out", tmp_path / "last", cwd=tmp_path)
    assert r.returncode == 0 and "validated at its step: val/loss" in r.stdout, r.stderr[-3000:]
    assert (tmp_path / "last" / "model.safetensors").read_bytes() == (kept_three / "model" / "model.safetensors").read_bytes()


def test_an_export_is_its_runs_model_to_generate_serve_and_gguf(kept_three, tmp_path):
    """A checkpoint's export in <run>/exports/ answers at its run's length and is named after it
    with its step (generate, serve, GGUF); a model elsewhere has no run."""
    from llmexp.export_gguf import model_name
    from llmexp.generate import run_answer_limit
    from llmexp.record import RunDir, run_of_model

    export_dir = kept_three / "exports" / "step-10"
    export_dir.mkdir(parents=True, exist_ok=True)
    assert run_of_model(export_dir) == run_of_model(kept_three / "model") == RunDir(kept_three)
    assert run_of_model(tmp_path / "exports" / "step-10") is None and run_of_model(kept_three) is None
    assert run_answer_limit(export_dir) == run_answer_limit(kept_three / "model") == 24
    assert (model_name(export_dir), model_name(kept_three / "model")) == ("sft-llama-step-10", "sft-llama")


def test_a_checkpoint_exports_as_gguf(kept_three, tmp_path):
    from gguf import GGUFReader

    r = export(kept_three, "--checkpoint", "step-10", "--format", "gguf", "--out", tmp_path / "m.gguf", cwd=tmp_path)
    assert r.returncode == 0 and f"wrote {tmp_path / 'm.gguf'}" in r.stdout, r.stderr[-3000:]
    saved = torch.load(kept_three / "checkpoints" / "step-10.ckpt", weights_only=True)["state_dict"]
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    v = saved["model.model.layers.0.self_attn.v_proj.weight"]
    assert torch.equal(torch.from_numpy(tensors["blk.0.attn_v.weight"].data.copy()).reshape(v.shape), v)
    name = GGUFReader(str(tmp_path / "m.gguf")).fields["general.name"]
    assert bytes(name.parts[name.data[0]]).decode() == "sft-llama-step-10"
    assert not list(tmp_path.glob(".*"))  # no scratch directory or partial file left


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "step-7", "--format", "hf"],
     "--checkpoint: RUN has no step-7.ckpt; it has step-10, step-15, step-20, last"),
    (["--checkpoint", "best-step-10", "--format", "hf"], "holds the best validation's trained weights alone"),
    (["--checkpoint", "best", "--format", "hf"], "--checkpoint best: RUN keeps no best validation's weights "
                                                 "(trainer.keep_best=true with trainer.monitor keeps them)"),
    (["--format", "hf"], "--format hf: a run's model/ is a Hugging Face model already; give --checkpoint step-N"),
    (["--checkpoint", "last", "--format", "hf", "--type", "q8_0"], "--type: sets how a GGUF file stores its weights"),
    (["--checkpoint", "last", "--format", "hf", "--out", "RUN/model"], "--out: 'RUN/model' exists and is kept"),
])
def test_bad_export_requests_are_refused_by_name(kept_three, tmp_path, args, message):
    before = sorted(str(p.relative_to(kept_three)) for p in kept_three.rglob("*"))
    r = export(kept_three, *(a.replace("RUN", str(kept_three)) for a in args), cwd=tmp_path)
    assert r.returncode == 2 and message.replace("RUN", str(kept_three)) in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(str(p.relative_to(kept_three)) for p in kept_three.rglob("*")) == before  # nothing written


def test_not_a_run_is_refused(tmp_path, tiny_teacher):
    r = export(tiny_teacher, "--checkpoint", "last", "--format", "hf", cwd=tmp_path)
    assert r.returncode == 2 and "is not a run directory (no config.yaml)" in r.stderr, r.stderr[-2000:]


def test_a_reward_model_checkpoint_keeps_the_score_scale_of_its_step_when_validated(tmp_path, tiny_teacher):
    """A reward model's scores are normalized by the validation at the end of its run; a checkpoint
    of a validated step gets that step's scale, one of another step says its scores are raw."""
    run_dir = tmp_path / "rm"
    r = run_cli([*EVERY_5, "stage=rm", f"model.pretrained={tiny_teacher}", "trainer.max_steps=10",
                 "trainer.keep_checkpoints=null", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = export(run_dir, "--checkpoint", "step-5", "--format", "hf", cwd=tmp_path)
    assert r.returncode == 0 and "its scores are not normalized" in r.stdout, r.stderr[-3000:]
    assert "llmexp_score_center" not in json.loads((run_dir / "exports" / "step-5" / "config.json").read_text())
    assert export(run_dir, "--checkpoint", "last", "--format", "hf", cwd=tmp_path).returncode == 0
    exported = json.loads((run_dir / "exports" / "step-10" / "config.json").read_text())
    final = json.loads((run_dir / "model" / "config.json").read_text())
    assert exported["llmexp_score_scale"] == final["llmexp_score_scale"] > 0 and exported == final


def test_a_checkpoint_removed_while_it_is_read_is_said_so(tmp_path):
    """A run still training removes its older checkpoints (trainer.keep_checkpoints) as it writes
    new ones: one found and then gone is a UserError naming it, not a FileNotFoundError traceback."""
    from llmexp.checkpoint_export import load_checkpoint, step_of
    from llmexp.errors import UserError

    for read in (step_of, load_checkpoint):
        with pytest.raises(UserError, match="was removed while it was read .* give a newer one"):
            read(tmp_path / "step-5.ckpt")
