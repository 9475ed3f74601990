"""A run killed with SIGKILL and resumed ends with the weights of an uninterrupted run."""

from __future__ import annotations

import csv
import json
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from llmexp.testing import FAST, train_in_subprocess
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# Dropout on (gpt2, whose shipped config has none) so RNG restoration matters; several epochs so
# the data position matters.
GPT2 = ["model=gpt2", "model.extra.resid_pdrop=0.1", "model.extra.embd_pdrop=0.1", "model.extra.attn_pdrop=0.1"]
COMMON = [*FAST, "trainer.max_steps=30", "trainer.checkpoint_every_n_steps=5", "trainer.val_check_interval=10",
          "trainer.micro_batch_size=4", "trainer.grad_accum=2", "data.options.num_samples=300"]


def _rows_as_written(metrics_csv, before_step):
    """The rows of a metrics.csv logged up to a step (a checkpoint's), each cell's text as written."""
    with open(metrics_csv, newline="") as fh:
        rows = [{k: v for k, v in row.items() if v} for row in csv.DictReader(fh)]
    return [r for r in rows if float(r["step"]) <= before_step]


def _straight(build_once, overrides):
    """The uninterrupted run of ``overrides``, trained once per session (the SIGKILL and Ctrl+C
    tests of the same settings compare with the same run)."""
    import hashlib

    def build(run_dir):
        r = train_in_subprocess(overrides, run_dir)
        assert r.returncode == 0, r.stderr[-3000:]

    return build_once(f"resume-straight-{hashlib.sha256('|'.join(overrides).encode()).hexdigest()[:16]}", build)


def _weights(run_dir):
    return load_file(run_dir / "model" / "model.safetensors")


def _export(run_dir, out, checkpoint="last"):
    """``llmexp export <run_dir> --checkpoint <checkpoint> --format hf --out <out>``, in this process."""
    from llmexp.export_command import main

    assert main([str(run_dir), "--checkpoint", checkpoint, "--format", "hf", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("extra", [
    [*GPT2], ["peft=lora", "optim.lr=1e-2"],
    # Sampling draws from the restored RNG, the value head and KL coefficient come from the checkpoint.
    ["stage=ppo", *GPT2, "stage.kl_control=adaptive", "stage.kl_horizon=100", "stage.rollout.max_new_tokens=6"],
    # The KL from half the groups that scored alike: the draw of those groups resumes too.
    ["stage=grpo", "stage.group_size=2", "stage.kl_coef=0.05", "stage.kl_sample_share=0.5",
     "stage.rollout.max_new_tokens=6"],
    ["stage=rloo", "stage.epochs=2", "stage.normalize_advantages=true", "stage.rollout.max_new_tokens=6"],
    ["stage=online_dpo", "stage.rollout.max_new_tokens=6"],
    ["stage=dpo", *GPT2], ["stage=kto", *GPT2],
    ["strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", *GPT2],
    ["stage=simpo", *GPT2], ["stage=orpo", *GPT2],
    # Half the micro-batches the student's own samples: the draw and the sampling must resume too.
    ["stage=distill", "stage.teacher=TINY_TEACHER", *GPT2, "stage.lmbda=0.5", "stage.rollout.max_new_tokens=6"],
    # The resumed run prunes the same parts again before it loads the smaller model's checkpoint.
    ["stage=prune", "model.pretrained=TINY_TEACHER", "stage.kv_heads_keep=1", "optim.lr=1e-2"],
    # Small sources, so the 30 steps run over the mixed rows several times.
    [*GPT2, "data=mixture", "data.mixture=[{name: arithmetic, weight: 3, options: {num_samples: 200}}, "
     "{name: arithmetic, weight: 1, options: {num_samples: 200, max_operand: 20}}]"],
], ids=["gpt2-dropout", "lora", "ppo", "grpo", "rloo", "online_dpo", "dpo", "kto", "ddp", "simpo", "orpo", "distill",
        "prune", "mixture"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, extra, tiny_teacher, build_once):
    extra = [o.replace("TINY_TEACHER", str(tiny_teacher)) for o in extra]
    mixed = "data=mixture" in extra  # its sources carry their own options
    overrides = [*(o for o in COMMON if not (mixed and o.startswith("data.options."))), *extra]
    straight = _straight(build_once, overrides)
    # its last checkpoint, exported, is the model the run exported: every stage's trained model (a
    # pruned one's sizes, LoRA merged, a value head or teacher left out) is rebuilt from the checkpoint
    exported = _export(straight, tmp_path / "exported")
    a = load_file(exported / "model.safetensors")
    assert a.keys() == _weights(straight).keys() and all(torch.equal(a[k], _weights(straight)[k]) for k in a)
    assert json.loads((exported / "config.json").read_text()) == json.loads((straight / "model/config.json").read_text())

    killed = tmp_path / "killed"
    r = train_in_subprocess(overrides, killed, kill_at=17)
    assert r.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists()
    ckpt = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 15  # the last checkpoint before the kill
    assert not list((killed / "checkpoints").glob(".*tmp*")), "no half-written checkpoint left behind"

    logged = _rows_as_written(killed / "metrics.csv", before_step=15)
    r = train_in_subprocess([*overrides, f"resume={killed}"], killed)
    assert r.returncode == 0, r.stderr[-3000:]
    assert logged and _rows_as_written(killed / "metrics.csv", before_step=15) == logged  # kept as they were
    assert "not resumable" not in r.stderr  # Lightning's warning, untrue here: the sampler resumes the data
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-6, diff
    s_straight = json.loads((straight / "summary.json").read_text())
    s_resumed = json.loads((killed / "summary.json").read_text())
    assert s_resumed["global_step"] == s_straight["global_step"] == 30
    assert s_resumed["resumed_from"].endswith("last.ckpt")
    assert s_resumed["initial"] == s_straight["initial"]
    for key, value in s_straight["final"].items():
        assert s_resumed["final"][key] == pytest.approx(value, abs=1e-6), key
    # The metrics log is continuous: the killed run's rows before its checkpoint, then the resumed.
    from llmexp.record import read_metrics

    rows = [r for r in read_metrics(killed / "metrics.csv") if "train/loss" in r]
    expected = [r for r in read_metrics(straight / "metrics.csv") if "train/loss" in r]
    assert [int(r["step"]) for r in rows] == [int(r["step"]) for r in expected]
    assert float(rows[-1]["train/loss"]) == pytest.approx(float(expected[-1]["train/loss"]), abs=1e-5)


@pytest.mark.parametrize("extra,at", [
    ([*GPT2], 17),
    # a validated step under ddp: the step ends with its validation, every rank stops at it
    (["strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", *GPT2], 20),
], ids=["gpt2-dropout", "ddp-validated-step"])
def test_ctrl_c_saves_the_step_it_stops_at_and_the_resume_matches_uninterrupted(tmp_path, extra, at, build_once):
    """Ctrl+C stopped a run at once, keeping its last periodic checkpoint (step 15 for a Ctrl+C at
    step 17: the steps since were lost). Now the step in progress ends and is saved, and a resume
    from it ends with the weights of an uninterrupted run."""
    overrides = [*COMMON, *extra]
    straight, stopped = _straight(build_once, overrides), tmp_path / "stopped"
    r = train_in_subprocess(overrides, stopped, interrupt_at=at)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"interrupted at step {at}; its last checkpoint ({stopped}/checkpoints/last.ckpt, step {at}) is kept" \
        in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("Ctrl+C: stopping when this step ends") == 1  # said once, not per rank
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["last.ckpt", f"step-{at}.ckpt", "tokenizer"]
    # the run has not finished (no model/), and the step it stopped at is a model already
    exported, saved = _export(stopped, tmp_path / f"step-{at}", f"step-{at}"), torch.load(
        stopped / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert not (stopped / "model").exists()
    a = load_file(exported / "model.safetensors")
    assert a.keys() and all(torch.equal(v, saved[f"model.{k}"]) for k, v in a.items())
    if at == 20:  # the checkpoint holds the step's validation: the resume does not repeat it
        from llmexp.record import read_metrics

        assert any("val/loss" in row and int(row["step"]) == 20 for row in read_metrics(stopped / "metrics.csv"))
    r = train_in_subprocess([*overrides, f"resume={stopped}"], stopped)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _weights(straight), _weights(stopped)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    s = json.loads((stopped / "summary.json").read_text())
    assert s["global_step"] == 30 and s["resumed_from"].endswith("last.ckpt")
    assert s["final"] == pytest.approx(json.loads((straight / "summary.json").read_text())["final"], abs=1e-6)


def test_a_resumed_run_logs_on_as_the_same_wandb_run(tmp_path):
    """Each session was a W&B run of its own (wandb sync uploaded a fragment and a continuation):
    the resumed session logs under the first's id."""
    overrides = [*(o for o in COMMON if not o.startswith("logger=")), "logger=wandb", "trainer.max_steps=20"]
    killed = tmp_path / "killed"
    assert train_in_subprocess(overrides, killed, kill_at=12).returncode == -signal.SIGKILL
    run_id = (killed / "wandb" / "llmexp-run-id").read_text().strip()
    r = train_in_subprocess([*overrides, f"resume={killed}"], killed)
    assert r.returncode == 0, r.stderr[-3000:]
    sessions = sorted(killed.glob("wandb/offline-run-*"))
    assert len(sessions) == 2 and {p.name.rsplit("-", 1)[1] for p in sessions} == {run_id}, sessions


def test_resume_auto_finds_the_killed_run_of_the_same_name(tmp_path):
    from llmexp.testing import run_cli

    overrides = [*COMMON, "model=llama", "trainer.max_steps=20"]
    killed = tmp_path / "runs" / "sft-llama" / "20260101-000000-000000"
    start = time.time()
    assert train_in_subprocess(overrides, killed, kill_at=12).returncode == -signal.SIGKILL
    first_session = time.time() - start
    # Changing what is trained is refused; the record stays as it was.
    before = (killed / "config.yaml").read_text()
    r = run_cli([*overrides, "trainer.max_steps=25", "optim.weight_decay=0.5", "resume=auto"], cwd=tmp_path)
    assert r.returncode == 2 and "optim.weight_decay: is 0.5 but the run being resumed used" in r.stderr
    said = " ".join(r.stderr.split())  # which run resume=auto chose, and that dropping resume= starts anew
    assert f"resume: continues the run in {killed}, started with other values" in said, said
    assert "or drop resume= to start a new run" in said
    r = run_cli([*overrides, "optim.weight_decay=0.5", f"hydra.run.dir={killed}", "resume=auto"], cwd=tmp_path)
    assert r.returncode == 2 and f"resume=auto: resuming {killed}" in r.stderr, r.stderr[-2000:]  # it said nothing
    # another stage is said before its own (shorter) max_steps, which no fix of max_steps would make fit
    r = run_cli([*overrides, "stage=dpo", "trainer.max_steps=5", f"resume={killed}"], cwd=tmp_path)
    assert r.returncode == 2 and "stage: is dpo but the run being resumed is stage=sft" in r.stderr, r.stderr
    assert "trainer.max_steps" not in r.stderr
    assert (killed / "config.yaml").read_text() == before
    start = time.time()
    r = run_cli([*overrides, "resume=auto"], cwd=tmp_path)
    second_session = time.time() - start
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resume=auto: resuming {Path('runs') / 'sft-llama' / killed.name}, the newest unfinished run" in r.stderr
    assert [p.name for p in (tmp_path / "runs" / "sft-llama").iterdir()] == [killed.name]
    s = json.loads((killed / "summary.json").read_text())
    assert s["global_step"] == 20 and s["resumed_from"].endswith("last.ckpt")
    # The record's times cover the killed session up to its checkpoint (step 10) and the resumed one.
    before = s["seconds_before_resume"]
    assert 0 < before["fit"] < before["wall"] < first_session, (before, first_session)
    assert before["wall"] < s["wall_seconds"] < before["wall"] + second_session
    assert before["fit"] < s["fit_seconds"] < s["wall_seconds"]


def test_a_fresh_run_with_resume_auto_and_nothing_to_resume_starts_over(tmp_path):
    from llmexp.testing import run_cli

    r = run_cli([*FAST, "trainer.max_steps=10", "trainer.val_check_interval=10", "resume=auto"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "sft-llama").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] is None
    # said: a killed run elsewhere (its own hydra.run.dir) is not this name's, and it trained from step 0 silently
    assert "resume=auto: no unfinished run with a checkpoint in runs/sft-llama/, so this is a new run" in r.stderr


def test_a_new_lr_on_resume_is_the_lr_the_resumed_run_trains_with(tmp_path):
    """README: optim.lr may change on resume (the NaN guard's advice is to lower it and resume);
    the checkpoint's scheduler state must not bring the old lr back."""
    from llmexp.record import read_metrics

    overrides = [*COMMON, "model=llama", "trainer.max_steps=20", "trainer.log_every_n_steps=1",
                 "optim.scheduler=constant", "optim.warmup_steps=0"]
    killed = tmp_path / "killed"
    assert train_in_subprocess(overrides, killed, kill_at=12).returncode == -signal.SIGKILL
    # and so may how often it checkpoints: Lightning's warning asking for the old callback is not the user's business
    r = train_in_subprocess([*overrides, "optim.lr=1e-5", "trainer.checkpoint_every_n_steps=4", f"resume={killed}"],
                            killed)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "callbacks used to create the checkpoint" not in r.stderr, r.stderr[-2000:]
    lrs = {int(row["step"]): float(row["train/lr"]) for row in read_metrics(killed / "metrics.csv")
           if "train/lr" in row}
    # the checkpoint the run resumed from was step 10's: steps before it trained at SFT's 1e-3, after it at 1e-5
    assert sorted(lrs) == list(range(1, 21)), lrs
    assert all(lr == pytest.approx(1e-3 if step <= 10 else 1e-5) for step, lr in lrs.items()), lrs
    s = json.loads((killed / "summary.json").read_text())
    assert s["lr_changed_on_resume"] == {"from": pytest.approx(1e-3), "to": pytest.approx(1e-5)}


def _record_digest(run_dir):
    """Every file of a run record but Hydra's job log and the lock (which a refused start may touch)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(run_dir.rglob("*")):
        if p.is_file() and p.name not in ("cli.log", ".llmexp.lock"):
            h.update(str(p.relative_to(run_dir)).encode() + p.read_bytes())
    return h.hexdigest()


def test_resuming_a_finished_or_damaged_run_is_refused_and_changes_nothing(tmp_path):
    import shutil

    from llmexp.testing import run_cli

    overrides = [*FAST, "trainer.max_steps=10", "trainer.val_check_interval=10"]
    done = tmp_path / "done"
    assert run_cli([*overrides, f"hydra.run.dir={done}"], cwd=tmp_path).returncode == 0
    before = _record_digest(done)
    for args in ([f"resume={done}"], ["resume=auto", f"hydra.run.dir={done}"]):
        r = run_cli([*overrides, *args], cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert "is a finished run" in r.stderr and f"model.pretrained={done}/model" in r.stderr
    assert _record_digest(done) == before

    killed = tmp_path / "killed"  # a run killed after its checkpoint: no summary.json
    shutil.copytree(done, killed)
    (killed / "summary.json").unlink()
    ckpt = killed / "checkpoints" / "last.ckpt"
    good = ckpt.read_bytes()
    for damaged in (good[: len(good) // 2], b"not a checkpoint"):
        ckpt.write_bytes(damaged)
        before = _record_digest(killed)
        r = run_cli([*overrides, f"resume={killed}"], cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert f"the checkpoint {ckpt} cannot be read" in r.stderr
        assert _record_digest(killed) == before  # config.yaml not rewritten
    ckpt.write_bytes(good)
    # A max_steps below the checkpoint's step would end the run there, finished and untrained.
    before = _record_digest(killed)
    r = run_cli([*overrides, "trainer.max_steps=5", f"resume={killed}"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "trainer.max_steps: is 5, below step 10" in r.stderr and "trainer.max_steps=10 or more" in r.stderr
    assert _record_digest(killed) == before
    config = (killed / "config.yaml").read_text()
    (killed / "config.yaml").write_text("[: not yaml")
    r = run_cli([*overrides, f"resume={killed}"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "config.yaml is not the config a run wrote" in r.stderr
    assert (killed / "config.yaml").read_text() == "[: not yaml"
    # The checkpoint's own step is allowed: a run killed during its export finishes it.
    (killed / "config.yaml").write_text(config)
    r = run_cli([*overrides, "trainer.log_every_n_steps=5", f"resume={killed}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((killed / "summary.json").read_text())
    assert s["global_step"] == 10
    # the record names both sessions' overrides: overrides.yaml the first's (config.yaml is the last's)
    first = yaml.safe_load((killed / "overrides.yaml").read_text())
    assert "trainer.log_every_n_steps=5" not in first and not any(o.startswith("resume=") for o in first)
    assert s["resume_overrides"][-2:] == ["trainer.log_every_n_steps=5", f"resume={killed}"]


def test_a_run_interrupted_before_its_first_checkpoint_says_how_to_start_over_and_that_works(tmp_path):
    """It said "start the run again", and the same command was refused: the directory holds a run."""
    from llmexp.run import interrupted_message
    from llmexp.testing import run_cli

    overrides = [*FAST, "trainer.max_steps=10", "trainer.val_check_interval=10"]
    run_dir = tmp_path / "run"
    assert run_cli([*overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path).returncode == 0
    (run_dir / "summary.json").unlink()  # as a run interrupted before it wrote any checkpoint leaves it
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):  # its tokenizer/ stays: saved as training starts
        ckpt.unlink()
    message = interrupted_message(run_dir, 8)
    assert "nothing to resume" in message and f"hydra.run.dir={run_dir} resume=auto" in message, message
    r = run_cli([*overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 2 and "already holds a run" in r.stderr
    # resume=<it> said "not a run directory with a checkpoint ... give the run directory of the killed run"
    r = run_cli([*overrides, f"resume={run_dir}"], cwd=tmp_path)
    assert r.returncode == 2 and f"resume: '{run_dir}' is a run that stopped before it wrote a checkpoint" in r.stderr
    assert f"hydra.run.dir={run_dir} resume=auto" in r.stderr, r.stderr
    started_over = [*overrides[:-2], "trainer.max_steps=8", "trainer.val_check_interval=8"]
    r = run_cli([*started_over, f"hydra.run.dir={run_dir}", "resume=auto"], cwd=tmp_path)  # what the message says
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["global_step"] == 8 and s["resumed_from"] is None
    # overrides.yaml is the session that ran (it kept the stopped one's max_steps=10)
    recorded = yaml.safe_load((run_dir / "overrides.yaml").read_text())
    assert "trainer.max_steps=8" in recorded and "trainer.max_steps=10" not in recorded, recorded


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_says_where_the_run_stands_and_how_to_resume(tmp_path, sig):
    """Ctrl+C (SIGINT to the foreground process group): Lightning shuts down and exited 1 without a
    word; now exit 130 and the checkpoint kept with the resume= to continue from it. SIGTERM (a
    timeout, Slurm's preemption) stopped the run at once, without a checkpoint; now as Ctrl+C."""
    from llmexp.testing import interrupted_once_checkpointed

    run_dir = tmp_path / "run"
    args = [o for o in FAST if not o.startswith("trainer.max_steps")] + [
        "trainer.max_steps=100000", "trainer.checkpoint_every_n_steps=1000", f"hydra.run.dir={run_dir}"]
    from llmexp.record import read_metrics

    def training() -> bool:  # a training step logged (a Ctrl+C before training stops the run at once)
        return (run_dir / "metrics.csv").exists() and any("train/loss" in r for r in read_metrics(run_dir / "metrics.csv"))

    code, err = interrupted_once_checkpointed(args, run_dir, ready=training, sig=sig)
    assert code == 128 + sig, err[-3000:]  # 130 for Ctrl+C, 143 for SIGTERM, as a shell reports them
    heard = {signal.SIGINT: "Ctrl+C", signal.SIGTERM: "SIGTERM"}[sig]
    assert err.count(f"llmexp: {heard}: stopping when this step ends, with a checkpoint of it") == 1, err[-3000:]
    assert "interrupted at step" in err and f"resume={run_dir}" in err and "Traceback" not in err, err[-3000:]
    # the step it was in ended and was saved (a periodic checkpoint only every 1000 steps)
    step = int(err.split("interrupted at step ", 1)[1].split(";")[0])
    assert f"its last checkpoint ({run_dir}/checkpoints/last.ckpt, step {step}) is kept" in err, err[-3000:]
    assert not (run_dir / "summary.json").exists()


def test_resuming_with_another_stage_data_or_model_is_one_problem_per_option():
    """A resume given stage=pretrain data=arithmetic_text for an sft run listed five keys the stage
    changed (stage.name, run_name, ...), with fixes that could not make it fit; now the options."""
    from omegaconf import OmegaConf
    from llmexp.testing import compose

    from llmexp.resume import incompatible_keys

    def config(overrides):
        return OmegaConf.to_container(compose(overrides), resolve=True)

    sft = config([])
    problems = incompatible_keys(sft, config(["stage=pretrain", "data=arithmetic_text"]))
    assert [(p.key, p.message) for p in problems] == [
        ("stage", "is pretrain but the run being resumed is stage=sft"),
        ("data", "is arithmetic_text but the run being resumed is data=arithmetic")]
    assert problems[0].fix.startswith("stage=sft, as the run was started")
    problems = incompatible_keys(sft, config(["model=gpt2", "optim.weight_decay=0.1"]))
    assert [p.key for p in problems] == ["model", "optim.weight_decay"]  # nothing under model.*, no run_name
    assert incompatible_keys(sft, config(["trainer.max_steps=900", "optim.lr=1e-3"])) == []
