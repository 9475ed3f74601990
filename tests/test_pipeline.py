"""``llmexp pipeline``: stages in sequence, each in its own run directory, outputs wired into the
next stage, one summary at the end; bad specs refused; a failed stage resumed by rerunning."""

from __future__ import annotations

import json

import pytest
import yaml
from llmexp.testing import run_cli

pytestmark = pytest.mark.slow

SHORT = ["trainer.progress_bar=false", "logger=none", "trainer.val_check_interval=10", "optim.warmup_steps=2",
         "trainer.micro_batch_size=8", "sft:trainer.max_steps=30"]


def pipeline(args, cwd):
    return run_cli(["pipeline", *args], cwd=cwd)


def test_sft_then_dpo_wires_the_sft_export_and_summarises(tmp_path):
    root = tmp_path / "p"
    r = pipeline(["dpo", *SHORT, "dpo:trainer.max_steps=10", "--dir", str(root)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((root / "pipeline_summary.json").read_text())
    assert out["pipeline"] == "dpo" and [s["name"] for s in out["stages"]] == ["sft", "dpo"]
    sft, dpo = out["stages"]
    assert sft["run_dir"] == str((root / "1-sft").resolve()) and dpo["run_dir"] == str((root / "2-dpo").resolve())
    assert (sft["global_step"], dpo["global_step"]) == (30, 10)
    cfg = yaml.safe_load((root / "2-dpo" / "config.yaml").read_text())
    assert cfg["model"]["pretrained"] == f"{sft['run_dir']}/model"
    assert cfg["stage"]["beta"] == 0.1 and cfg["stage"]["rpo_alpha"] == 1.0  # the stage's shipped defaults
    # starts at the SFT model: the DPO term is ln 2, plus the RPO term (chosen answers' NLL)
    assert dpo["initial"]["val/loss"] == pytest.approx(0.6931 + dpo["initial"]["val/nll_chosen"], abs=1e-4)
    assert "val/accuracy" in dpo["final"] and sft["final"]["val/loss"] < sft["initial"]["val/loss"]
    assert "pipeline dpo" in r.stdout

    again = pipeline(["dpo", *SHORT, "dpo:trainer.max_steps=10", "--dir", str(root)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished before, kept") == 2
    # A changed override is not silently ignored by keeping the finished stage.
    changed = pipeline(["dpo", *SHORT, "dpo:trainer.max_steps=12", "--dir", str(root)], tmp_path)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "stage 'dpo' finished in" in changed.stderr and "use a new --dir" in changed.stderr
    assert json.loads((root / "pipeline_summary.json").read_text())["stages"][1]["global_step"] == 10
    # The SFT deleted to run it again: the DPO trained from the old one is not kept beside the new one
    # (it was, and the summary paired them); refused before the SFT runs again.
    import shutil

    shutil.rmtree(root / "1-sft")
    stale = pipeline(["dpo", *SHORT, "dpo:trainer.max_steps=10", "--dir", str(root)], tmp_path)
    assert stale.returncode == 2 and "Traceback" not in stale.stderr, stale.stderr[-2000:]
    assert (f"stage 'dpo' finished in {root / '2-dpo'} from the run of sft, which is not finished there and would "
            f"run again; delete {root / '2-dpo'} too") in stale.stderr
    assert not (root / "1-sft").exists()


def test_sft_then_rm_then_ppo_scores_with_the_trained_reward_model(tmp_path):
    root = tmp_path / "rlhf"
    r = pipeline(["rlhf", *SHORT, "rm:trainer.max_steps=10", "ppo:trainer.max_steps=3", "ppo:trainer.grad_accum=1",
                  "ppo:stage.rollout.max_new_tokens=8", "ppo:trainer.val_check_interval=3", "--dir", str(root)],
                 tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((root / "pipeline_summary.json").read_text())
    assert [s["stage"] for s in out["stages"]] == ["sft", "rm", "ppo"]
    cfg = yaml.safe_load((root / "3-ppo" / "config.yaml").read_text())
    assert cfg["model"]["pretrained"] == str((root / "1-sft" / "model").resolve())
    assert cfg["stage"]["reward"]["model"] == str((root / "2-rm" / "model").resolve())
    reward = out["stages"][2]["initial"]["val/reward"]
    assert reward not in (0.0, 1.0)  # a reward model's mean score, not the 0/1 rule
    # A 10-step reward model barely ranks its held-out pairs: PPO says so before it follows it.
    accuracy = json.loads((root / "2-rm" / "summary.json").read_text())["final"]["val/accuracy"]
    assert json.loads((root / "2-rm" / "model" / "config.json").read_text())["llmexp_heldout_accuracy"] == accuracy
    assert accuracy < 0.65
    notes = json.loads((root / "3-ppo" / "summary.json").read_text())["notes"]
    assert any(f"ranks its held-out pairs at {accuracy:.2f}" in n for n in notes), notes
    assert f"stage.reward.model ranks its held-out pairs at {accuracy:.2f}" in r.stderr
    assert "LOAD REPORT" not in r.stderr  # rm's new score head is what stage=rm means, not news


def test_a_failed_stage_stops_the_pipeline_and_a_rerun_continues(tmp_path):
    root = tmp_path / "p"
    # A stage that fails when it runs: a later row of its data has no chosen answer, which only
    # reading every row finds (a bad key, a missing file or a wrong format is refused before any
    # stage runs, see test_bad_pipelines_are_refused).
    pairs = tmp_path / "pairs.jsonl"
    good = '{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}\n'
    pairs.write_text(good * 3 + '{"prompt": "What is 3+3?", "chosen": null, "rejected": "7"}\n')
    bad = pipeline(["dpo", *SHORT, "dpo:data=files", f"dpo:data.path={pairs}", "--dir", str(root)], tmp_path)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "stage 'dpo' failed" in bad.stderr and "pairs.jsonl" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert (root / "1-sft" / "summary.json").is_file() and not (root / "pipeline_summary.json").exists()
    # as a stage killed in training before its first checkpoint leaves it (the tokenizer saved as
    # training starts): nothing to resume, so it starts over (it was resumed, and refused)
    (root / "2-dpo" / "checkpoints" / "tokenizer").mkdir(parents=True)
    good = pipeline(["dpo", *SHORT, "dpo:trainer.max_steps=5", "--dir", str(root)], tmp_path)
    assert good.returncode == 0, good.stderr[-3000:]
    assert "sft: finished before, kept" in good.stdout
    assert json.loads((root / "pipeline_summary.json").read_text())["stages"][1]["global_step"] == 5


@pytest.mark.parametrize("args,expected", [
    (["rlhff"], "did you mean 'rlhf'"),
    (["dpo", "ppo:trainer.max_steps=3"], "names stage 'ppo', not in dpo"),
    (["{spec}"], "refers to ${runs.rm}, which is not an earlier stage"),
    (["{missing}"], "no file"),
    # a bad key in the last stage: refused before the first stage runs (no directory made)
    (["rlhf", "ppo:stage.kl_cof=0.1"], "ppo:stage.kl_cof: unknown key"),
    # stage= replaces a stage's own (a global one made the sft stage a dpo run from scratch, silently)
    (["dpo", "stage=dpo"], "'stage=dpo': each stage of dpo is the stage its pipeline file names (sft: stage=sft, "
                           "dpo: stage=dpo)"),
    (["dpo", "dpo:stage=kto"], "'dpo:stage=kto': each stage of dpo is the stage"),
    # an experiment preset for every stage gave the dpo stage sft_lora's lr 5e-3 and replaced sft_short
    (["dpo", "experiment=sft_lora"], "'experiment=sft_lora': an experiment preset sets several groups, its stage's "
                                     "settings too, and a global one would give them to every stage of dpo"),
    # a key only some stages have, given for every stage: the fix names the stage prefix
    (["rlhf", "stage.kl_coef=0.2"], "stage.kl_coef=0.2: applies to every stage of rlhf, and sft, rm have no such "
                                    "key\n      fix: ppo:stage.kl_coef=0.2 (for that stage alone)"),
    (["dpo", "stage.bta=0.2"], "dpo:stage.bta: unknown key\n      fix: did you mean 'beta'?"),
    # a value only some stages take (the fix was quantize's own, trainer.max_steps=0, for every stage)
    (["distill", "trainer.max_steps=5"], "trainer.max_steps=5: applies to every stage of distill, and quantize "
                                         "refuses it (stage=quantize changes a trained model without training steps, "
                                         "and 5 were asked)\n      fix: sft:trainer.max_steps=5 "
                                         "distill:trainer.max_steps=5 (for those stages alone)"),
    # overrides after --dir are overrides too (argparse said "unrecognized arguments")
    (["dpo", "--dir", "{root}", "stage.bta=0.2"], "dpo:stage.bta: unknown key"),
    # a stray word: once, not once per stage
    (["dpo", "nosuch"], "pipeline: 'nosuch' is not an override; after the pipeline's name come key=value for every "
                        "stage, or <stage>:key=value for one (sft, dpo)"),
])
def test_bad_pipelines_are_refused(tmp_path, args, expected):
    spec = tmp_path / "spec.yaml"
    spec.write_text("stages:\n  - name: ppo\n    overrides: [stage=ppo, 'stage.reward.model=${runs.rm}/model']\n"
                    "  - name: rm\n    overrides: [stage=rm]\n")
    args = [a.format(spec=spec, missing=tmp_path / "nope.yaml", root=tmp_path / "runs" / "p") for a in args]
    r = pipeline(args, tmp_path)
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_stops_the_stage_says_how_to_continue_and_the_rerun_does(tmp_path):
    """Ctrl+C in the terminal (SIGINT to the whole process group) during the dpo stage: the stage
    stops as a run stops, keeping its checkpoint, and the pipeline says the command that continues
    it, exit 130 and no traceback (the pipeline printed a KeyboardInterrupt traceback, and its
    stage got a second SIGINT); that command finishes it from the checkpoint."""
    import os
    import signal
    import subprocess
    import time

    from llmexp.testing import popen_module

    root = tmp_path / "p"
    args = ["pipeline", "dpo", *SHORT, "dpo:trainer.max_steps=60", "dpo:trainer.checkpoint_every_n_steps=10",
            "--dir", str(root)]
    proc = popen_module("llmexp", args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        start_new_session=True)
    deadline = time.time() + 300
    while not list((root / "2-dpo" / "checkpoints").glob("*.ckpt")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "interrupted at step" in err  # the stage's own message, whole
    line = next(x for x in err.splitlines() if "pipeline: interrupted in stage 'dpo'" in x)
    assert f"`llmexp pipeline dpo {' '.join(SHORT)} dpo:trainer.max_steps=60 dpo:trainer.checkpoint_every_n_steps=10 " \
           f"--dir {root}` continues it" in line and "dpo resumes from its last checkpoint (step " in line, line
    again = pipeline(args[1:], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    dpo = json.loads((root / "2-dpo" / "summary.json").read_text())
    assert dpo["global_step"] == 60 and dpo["resumed_from"]
    spent = json.loads((root / "pipeline_summary.json").read_text())["wall_seconds"]
    assert spent >= sum(json.loads((root / d / "summary.json").read_text())["wall_seconds"] for d in ("1-sft", "2-dpo"))
