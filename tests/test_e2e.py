"""End-to-end runs on tiny models: loss falls, the run record is complete, the export loads alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from llmexp.testing import FAST, run_cli, train

pytestmark = pytest.mark.slow

RECORD = ["config.yaml", "summary.json", "metrics.csv", "loss_curve.png", "checkpoints/last.ckpt",
          "model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/tokenizer_config.json"]


def _check_record(run_dir, stage, model):
    import os

    for rel in RECORD:
        assert (run_dir / rel).is_file(), rel
    # every file of the export readable as the umask says (safetensors wrote its weights 0600)
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (run_dir / "model").iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes
    s = json.loads((run_dir / "summary.json").read_text())
    for key in ("stage", "model", "strategy", "global_step", "wall_seconds", "tokens_per_second", "initial", "final"):
        assert key in s, key
    assert (s["stage"], s["model"], s["strategy"]) == (stage, model, "auto")
    assert s["initial"]["val/loss"] > 0 and s["final"]["val/perplexity"] == pytest.approx(
        __import__("math").exp(s["final"]["val/loss"]), rel=1e-6)
    assert s["tokens_per_second"] > 0 and s["wall_seconds"] > 0
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["stage"]["name"] == stage and cfg["model"]["name"] == model
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    for col in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "val/loss"):
        assert col in header
    assert (run_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    return s


def _answers_without_llmexp(model_dir):
    """Load the export with plain transformers in a fresh interpreter that never imports llmexp and
    answer every bundled arithmetic question greedily; returns (accuracy, a few completions)."""
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(model_dir)!r}, padding_side="left")
model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}).eval()
problems = [(a, op, b) for a in range(10) for b in range(10) for op in "+-" if op == "+" or a >= b]
prompts = [tok.apply_chat_template([{{"role": "user", "content": f"What is {{a}} {{'plus' if op == '+' else 'minus'}} {{b}}?"}}],
                                   add_generation_prompt=True, tokenize=False) for a, op, b in problems]
batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
with torch.no_grad():
    out = model.generate(**batch, max_new_tokens=10, do_sample=False)
texts = [tok.decode(o[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]
right = sum(t == f"{{a}} {{op}} {{b}} = {{a + b if op == '+' else a - b}}" for (a, op, b), t in zip(problems, texts))
assert "llmexp" not in sys.modules
print("ACCURACY", right / len(problems))
print("SAMPLE", texts[:3])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("ACCURACY", "SAMPLE")))
    return float(lines["ACCURACY"]), lines["SAMPLE"]


def test_default_sft_run_via_cli_learns_the_skill(default_sft):
    """The README's default experiment (conftest's shared run): val loss falls far and the exported
    model answers."""
    s = _check_record(default_sft, "sft", "llama")
    assert s["global_step"] == 600
    assert s["final"]["val/loss"] < 0.02 * s["initial"]["val/loss"]
    accuracy, sample = _answers_without_llmexp(default_sft / "model")
    assert accuracy >= 0.9, (accuracy, sample)  # measured: 0.97 on all 155 questions


def test_pretrain_gpt2_from_scratch_with_packing(tmp_path):
    run_dir = train(tmp_path, ["stage=pretrain", "data=arithmetic_text", "model=gpt2", "data.packing=true",
                               "data.max_length=256", "trainer.max_steps=60", "trainer.val_check_interval=30"])
    s = _check_record(run_dir, "pretrain", "gpt2")
    assert s["final"]["val/loss"] < 0.6 * s["initial"]["val/loss"]
    train_stats = s["data_stats"]["train"]
    assert train_stats["rows"] < train_stats["samples"] / 3 and train_stats["packing_efficiency"] > 0.8


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_train_and_their_exports_go_on(tmp_path, arch):
    """The exported directory loads the tokenizer the run trained with (transformers picks Qwen2's
    class for a qwen2 directory, which adds a token and its own split: a qwen2 run from the bundled
    tokenizer exported one the model did not embed, and every later stage refused it), and the next
    stages start from it: dpo, and int8 quantization (qwen2's attention projections have biases,
    which must stay unquantized); their records name the architecture of the weights they load."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llmexp.data.skill import task_prompts
    from llmexp.models.tokenizer import load_tokenizer

    run_dir = train(tmp_path, [f"model={arch}", "trainer.max_steps=20", "trainer.val_check_interval=20"])
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["architecture"] == arch and s["final"]["val/loss"] < s["initial"]["val/loss"]
    assert AutoConfig.from_pretrained(run_dir / "model").model_type == arch
    exported = AutoTokenizer.from_pretrained(run_dir / "model")
    trained = load_tokenizer(None, None, architecture=arch)
    rows = AutoModelForCausalLM.from_pretrained(run_dir / "model").get_input_embeddings().weight.shape[0]
    assert len(exported) == len(trained) == rows and type(exported) is type(trained)
    texts = [exported.apply_chat_template(p["prompt"], tokenize=False) for p in task_prompts()[:20]]
    texts += ["It's (x+y)*z = 42,  isn't it?\n\nhéllo"]
    assert [exported(t).input_ids for t in texts] == [trained(t).input_ids for t in texts]
    model = f"model.pretrained={run_dir / 'model'}"
    dpo = json.loads((train(tmp_path, ["stage=dpo", model, "trainer.max_steps=2"], "dpo") / "summary.json").read_text())
    assert dpo["global_step"] == 2
    assert dpo["architecture"] == arch  # from the weights: the command line left model=llama's default
    quantized = train(tmp_path, ["stage=quantize", "stage.method=int8", model, "trainer.max_steps=0"], "int8")
    q = json.loads((quantized / "summary.json").read_text())
    assert q["final"]["val/loss"] == pytest.approx(s["final"]["val/loss"], rel=0.02) and q["architecture"] == arch


def test_lora_trains_adapters_only_and_exports_merged_weights(tmp_path):
    run_dir = train(tmp_path, ["peft=lora", "optim.lr=1e-2", "trainer.max_steps=40"])
    s = json.loads((run_dir / "summary.json").read_text())
    assert 0 < s["trainable_parameters"] < 0.3 * s["parameters"]
    assert s["final"]["val/loss"] < s["initial"]["val/loss"]
    files = {p.name for p in (run_dir / "model").iterdir()}
    assert "adapter_config.json" not in files and "model.safetensors" in files
    from safetensors.torch import load_file

    weights = load_file(run_dir / "model" / "model.safetensors")
    assert not any("lora" in k for k in weights)
    # The merged export computes what the adapted model computed: its val loss matches the run's.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmexp.data.collate import collate_lm
    from llmexp.data.encode import lm_encoder
    from llmexp.losses import token_nll_sum

    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    encode = lm_encoder("chat", tok, True)
    from llmexp.data.module import load_examples
    from llmexp.testing import typed

    val = load_examples(typed(FAST).data, "sft").val
    batch = collate_lm([encode(r) for r in val], tok.pad_token_id)
    with torch.no_grad():
        total, count = token_nll_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                     batch["labels"])
        loss = total / count
    assert float(loss) == pytest.approx(s["final"]["val/loss"], rel=1e-3)


def test_continue_from_a_previous_runs_export_and_trained_tokenizer(tmp_path):
    first = train(tmp_path, ["model.tokenizer=train", "trainer.max_steps=20", "trainer.val_check_interval=20"],
                  name="first")
    s1 = json.loads((first / "summary.json").read_text())
    second = train(tmp_path, [f"model.pretrained={first / 'model'}", "trainer.max_steps=20",
                              "trainer.val_check_interval=20"], name="second")
    s2 = json.loads((second / "summary.json").read_text())
    # The second run starts where the first ended (same weights, same data, same tokenizer).
    assert s2["initial"]["val/loss"] == pytest.approx(s1["final"]["val/loss"], rel=1e-4)
    assert s2["final"]["val/loss"] < s2["initial"]["val/loss"]
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(second / "model")) == len(AutoTokenizer.from_pretrained(first / "model"))


@pytest.mark.parametrize("max_steps,logged_at", [(20, [0, 10, 20]), (25, [0, 10, 20, 25])])
def test_validation_after_training_only_when_the_last_step_was_not_validated(tmp_path, max_steps, logged_at):
    """Before training, every val_check_interval steps, and after training unless the last step
    was just validated (the same weights would give the same metrics a second time). Each is
    logged at the steps done, as the evals and summary.json count them (Lightning's own index
    put the validation after step 10 at 9)."""
    from llmexp.record import read_metrics
    from llmexp.testing import TINY, tiny_run

    assert "trainer.val_check_interval=10" in TINY
    s = tiny_run(tmp_path / "run", ["logger=csv", f"trainer.max_steps={max_steps}"])
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.csv") if "val/loss" in r]
    assert [int(r["step"]) for r in rows] == logged_at
    assert s["global_step"] == max_steps and s["final"]["val/loss"] == pytest.approx(rows[-1]["val/loss"], rel=1e-6)


def test_only_an_rm_runs_expected_load_report_is_kept_quiet():
    """transformers' LOAD REPORT of a reward model built from a causal LM lists its new score head
    (MISSING) and the unused LM head (UNEXPECTED): kept out of the run's output. Any other key is
    a real problem, and its report still shows."""
    import logging

    from llmexp.models.build import _NewScoreHeadReport

    def shown(*rows):
        table = "Key | Status |\n----+----\n" + "\n".join(f"{k} | {s} |" for k, s in rows)
        record = logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0,
                                   "\x1b[1mLlamaForSequenceClassification LOAD REPORT\x1b[0m from: x\n" + table,
                                   None, None)
        return _NewScoreHeadReport().filter(record)

    assert not shown(("score.weight", "MISSING"), ("lm_head.weight", "UNEXPECTED"))
    assert shown(("score.weight", "MISSING"), ("model.layers.0.mlp.up_proj.weight", "MISSING"))
    assert shown(("model.embed_tokens.weight", "MISMATCH"))


def test_neftune_noises_the_embeddings_in_training_steps_only(tmp_path):
    """stage.neftune_noise_alpha: the same seed trains on other (noisy) inputs, while validation
    sees the model's own embeddings."""
    import csv

    def losses(run):
        with open(run / "metrics.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        return ([float(r["train/loss"]) for r in rows if r.get("train/loss")],
                {int(float(r["step"])): float(r["val/loss"]) for r in rows if r.get("val/loss")})

    plain = train(tmp_path, ["trainer.max_steps=20", "trainer.val_check_interval=20"], name="plain")
    noisy = train(tmp_path, ["trainer.max_steps=20", "trainer.val_check_interval=20",
                             "stage.neftune_noise_alpha=5"], name="noisy")
    (train_plain, val_plain), (train_noisy, val_noisy) = losses(plain), losses(noisy)
    assert val_noisy[0] == val_plain[0]  # no noise in validation
    assert train_noisy[0] != train_plain[0]
    summary = json.loads((noisy / "summary.json").read_text())
    assert summary["final"]["val/loss"] == pytest.approx(val_noisy[20])


def test_lora_exported_unmerged_names_its_base_by_path_and_loads_merged(tmp_path, monkeypatch):
    """peft.merge_on_export=false: model/ holds the adapters, naming their base by an absolute path
    (a relative model.pretrained was written as given, and loading elsewhere went to the hub);
    llmexp's commands load them onto it, merged (they said 'neither a run directory with model/
    nor a model directory'). From scratch there is no base to name: refused before the run."""
    from llmexp.errors import ConfigError
    from llmexp.models.build import build_model
    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.record import load_language_model, model_dir_of
    from llmexp.testing import check_config, typed
    from safetensors.torch import load_file

    tokenizer = load_tokenizer(None, None)
    build_model(typed([]).model, tokenizer).save_pretrained(str(tmp_path / "base"))
    tokenizer.save_pretrained(str(tmp_path / "base"))
    monkeypatch.chdir(tmp_path)
    run_dir = train(tmp_path, ["peft=lora", "peft.merge_on_export=false", "model.pretrained=base", "optim.lr=1e-2",
                               "trainer.max_steps=10", "trainer.val_check_interval=10"])
    adapter_config = json.loads((run_dir / "model" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    monkeypatch.chdir("/")
    model, _ = load_language_model(model_dir_of(str(run_dir)))
    adapters = load_file(run_dir / "model" / "adapter_model.safetensors")
    layer = "model.layers.0.self_attn.q_proj"
    a, b = (adapters[f"base_model.model.{layer}.lora_{x}.weight"] for x in "AB")
    base = load_file(tmp_path / "base" / "model.safetensors")[f"{layer}.weight"]
    assert not torch.equal(b, torch.zeros_like(b))  # trained
    assert torch.allclose(model.state_dict()[f"{layer}.weight"], base + b @ a * (16 / 8), atol=1e-6)
    # llmexp export merges them too (it offered to train again with peft.merge_on_export=true)
    import numpy as np
    from gguf import GGUFReader

    r = run_cli(["export", str(run_dir), "--format", "gguf"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".merged")) == []
    tensors = {t.name: t for t in GGUFReader(str(run_dir / "model.gguf")).tensors}
    v = model.state_dict()["model.layers.0.self_attn.v_proj.weight"]
    assert not torch.equal(v, load_file(tmp_path / "base" / "model.safetensors")["model.layers.0.self_attn.v_proj.weight"])
    assert np.array_equal(np.asarray(tensors["blk.0.attn_v.weight"].data).reshape(tuple(v.shape)), v.numpy())
    with pytest.raises(ConfigError) as e:
        check_config(["peft=lora", "peft.merge_on_export=false"])
    assert [p.key for p in e.value.problems] == ["peft.merge_on_export"]
    with pytest.raises(ConfigError) as e:
        check_config(["stage=dpo", f"model.pretrained={run_dir / 'model'}"])
    assert "holds LoRA adapters alone" in str(e.value)
