"""The command line: help, config printing, clear errors, multirun, console script, wheel install."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from llmexp.testing import FAST, run_cli
REPO = Path(__file__).resolve().parents[1]


def test_help_lists_groups_and_options_without_importing_heavy_libraries():
    code = ("import sys\nfrom llmexp.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'lightning', 'datasets', 'peft', 'trl', 'wandb') "
            "if m in sys.modules]\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout
    assert "HEAVY []" in out
    for line in ("model: gpt2, llama, llama_1b, mistral, qwen2", "stage: ", "logger: csv, none, wandb",
                 "peft: lora, none, qlora", "strategy: auto"):
        assert line in out
    assert "pretrain" in out and "sft" in out
    assert "  # Peak learning rate, after warm-up" in out and "  lr: 0.001" in out


def test_help_annotates_the_config_of_the_overrides_and_hydra_help_stays_hydras(tmp_path):
    r = run_cli(["stage=dpo", "--help"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "stage: distill, dpo, grpo, kto, online_dpo, orpo, ppo, pretrain, prune, quantize, rloo, rm, sft, simpo" in lines and "eval: lm_eval, none" in lines
    lr = lines.index("  lr: 0.0005")  # the dpo stage's lr, with optim.lr's help above it
    assert lines[lr - 1].startswith("  # Peak learning rate") and lines[lr - 1].endswith("(>= 0.0)")
    beta = lines.index("  beta: 0.1")
    assert lines[beta - 2].startswith("  # DPO's temperature: scales the log-ratio margin")
    assert ("  # (one of sigmoid, ipo, hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, "
            "discopop)") in lines
    assert not any("assistant_only_loss" in line for line in lines) and not (tmp_path / "runs").exists()
    r = run_cli(["--hydra-help"], cwd=tmp_path)
    assert r.returncode == 0 and "== Flags ==" in r.stdout and "hydra/launcher" in r.stdout
    r = run_cli(["model=lama", "--help"], cwd=tmp_path)
    assert r.returncode == 2 and "Could not find 'model/lama'" in r.stderr and "Traceback" not in r.stderr
    # a misspelt key gets the closest one, as a run does (it was told to run --help)
    r = run_cli(["--help", "trainer.max_stepz=5"], cwd=tmp_path)
    assert r.returncode == 2 and "trainer.max_stepz: unknown key" in r.stderr and "did you mean 'max_steps'" in r.stderr


def test_cfg_job_prints_the_composed_config_and_trains_nothing(tmp_path):
    r = run_cli(["model=gpt2", "optim.lr=1e-3", "--cfg", "job"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "architecture: gpt2" in r.stdout and "lr: 0.001" in r.stdout
    assert not (tmp_path / "runs").exists()


def test_bad_config_exits_2_with_one_message_and_no_traceback(tmp_path):
    r = run_cli(["model=lama", "trainer.max_stepz=5", "optim.lr=fast", "stage=sft", "data=arithmetic_text"],
                cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.count("llmexp: error:") == 1
    assert "did you mean 'llama'" in r.stderr and "did you mean 'max_steps'" in r.stderr
    assert "optim.lr: expected a number, got 'fast'" in r.stderr
    assert "4 problems" in r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # two CLI runs that start training before the bad line is read
def test_user_error_during_a_run_exits_2_and_traceback_on_request(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n{oops\n')
    args = ["data=files", f"data.path={f}", "stage=pretrain", *FAST, f"hydra.run.dir={tmp_path / 'run'}"]
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 2 and "bad.jsonl line 2 is not valid JSON" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli(args[:-1] + [f"hydra.run.dir={tmp_path / 'run2'}"], cwd=tmp_path, env={"LLMEXP_TRACEBACK": "1"})
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_existing_run_directory_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"keep": true}')
    r = run_cli([*FAST, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert json.loads((run_dir / "summary.json").read_text()) == {"keep": True}
    assert sorted(p.name for p in run_dir.iterdir()) == ["summary.json"]


def test_console_script_matches_python_m(tmp_path):
    exe = shutil.which("llmexp")
    assert exe, "the llmexp console script is installed with the package"
    a = subprocess.run([exe, "model=qwen2", "--cfg", "job"], capture_output=True, text=True, cwd=tmp_path)
    b = run_cli(["model=qwen2", "--cfg", "job"], cwd=tmp_path)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_run_directory_and_wandb_run(tmp_path):
    """The jobs of a Hydra multirun train in one process: each gets its own W&B run (the second
    job's WandbLogger reused the first's, logging into job 0's directory)."""
    args = ["-m", *FAST, "logger=wandb", "trainer.max_steps=10", "trainer.val_check_interval=10",
            "optim.warmup_steps=2", "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 2
    lrs = sorted(__import__("yaml").safe_load((s.parent / "config.yaml").read_text())["optim"]["lr"]
                 for s in summaries)
    assert lrs == [1e-3, 3e-3]
    runs = [list((s.parent / "wandb").glob("offline-run-*/run-*.wandb")) for s in summaries]
    assert [len(found) for found in runs] == [1, 1], runs
    assert runs[0][0].name != runs[1][0].name
    assert "already in progress" not in r.stderr, r.stderr[-2000:]
    # each named by its job (both were 'sft-llama'), timed from its own start (job 1's first step
    # counted job 0's time, so it came after its wall_seconds)
    assert [f"sft-llama-{n}".encode() in found[0].read_bytes() for n, found in enumerate(runs)] == [True, True]
    for summary in summaries:
        s = json.loads(summary.read_text())
        assert 0 < s["seconds_to_first_step"] < s["wall_seconds"], s


def test_a_glob_sweeps_a_groups_options_and_a_run_never_writes_over_a_run(tmp_path):
    """glob() crashed in llmexp's checks ("ConfigLoader is not set"); a job whose directory holds a
    run is refused however it got there (hydra.sweep.subdir shared by every job)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from llmexp.errors import UserError
    from llmexp.overrides import sweep_values
    from llmexp.run import refuse_a_held_directory
    from llmexp.testing import typed

    (o,) = OverridesParser.create().parse_overrides(["model=glob(*,exclude=[llama_1b,mistral])"])
    assert sorted(sweep_values(o)) == ["gpt2", "llama", "qwen2"]
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a run .summary.json., which this one would write over"):
        refuse_a_held_directory(typed([]), tmp_path)
    refuse_a_held_directory(typed(["resume=auto"]), tmp_path)  # resuming it is what resume= is for


def test_a_sweep_over_stages_keeps_its_jobs_together_and_is_never_written_over(tmp_path):
    """-m stage=sft,pretrain: both jobs in one sweep directory (each job's was named after its own
    run_name, multirun/sft-llama/<t>/0 and multirun/pretrain-llama/<t>/1, and compare saw one run);
    the same sweep into that directory again is refused before a job starts (it wrote over both)."""
    args = ["-m", "stage=sft,pretrain", *FAST, "trainer.max_steps=1", "trainer.val_check_interval=null",
            "task.max_prompts=2", "eval.before_training=false"]
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "sweep").iterdir()
    stages = [json.loads((sweep / str(job) / "summary.json").read_text())["stage"] for job in (0, 1)]
    assert stages == ["sft", "pretrain"] and sorted(p.name for p in (tmp_path / "multirun").iterdir()) == ["sweep"]
    before = {p: p.stat().st_mtime_ns for p in sweep.rglob("*") if p.is_file()}
    again = run_cli([*args, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert f"already holds the runs of an earlier sweep in {sweep}/0, {sweep}/1" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_finds_its_configs(tmp_path):
    """The conf/ tree ships inside the wheel: a run from another directory composes."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
                   check=True, capture_output=True)
    (wheel,) = dist.glob("llmexp-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(py), "-c", "from llmexp.paths import config_dir; print(config_dir())"],
                           capture_output=True, text=True, cwd=elsewhere, check=True).stdout.strip()
    assert str(venv) in where and Path(where, "model", "llama.yaml").is_file()
    r = subprocess.run([str(venv / "bin" / "llmexp"), "stage=pretrain", "data=arithmetic_text", "--cfg", "job"],
                       capture_output=True, text=True, cwd=elsewhere)
    assert r.returncode == 0 and "name: pretrain" in r.stdout
    assert (Path(where).parent / "assets" / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("extra", [[], ["peft=lora"]], ids=["full", "lora"])
def test_a_run_prints_no_library_warnings(tmp_path, extra):
    """What a user sees of a short run is llmexp's own output: no deprecation or kernel-loading
    warnings from the libraries underneath (peft, transformers, torchao, Lightning)."""
    r = run_cli([*FAST, *extra, "trainer.max_steps=2", "trainer.val_check_interval=null",
                 f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    noise = [line for line in r.stderr.splitlines() if "Warning" in line or "Failed to load" in line]
    assert noise == [], noise


def test_a_run_from_a_users_shell_draws_no_library_progress_bars(tmp_path, tiny_teacher):
    """A fresh interpreter with none of llmexp's quiet variables set beforehand (a user's shell; the
    tests' fork server imports the libraries with them set): transformers reads
    HF_HUB_DISABLE_PROGRESS_BARS at import, which Lightning's import reaches before the run sets it,
    and drew "Loading weights" and "Writing model shards" bars into every run's output."""
    import os

    from llmexp.env import QUIET_VARS

    env = {k: v for k, v in os.environ.items() if k not in QUIET_VARS}
    r = subprocess.run([sys.executable, "-m", "llmexp", *FAST, "trainer.max_steps=2", "trainer.val_check_interval=null",
                        f"model.pretrained={tiny_teacher}", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "cli.log").exists()  # Hydra's log file: made only when something is logged
    for bar in ("Loading weights", "Writing model shards", "it/s]"):
        assert bar not in r.stdout + r.stderr, (bar, r.stderr[-2000:])


def test_ctrl_c_while_the_libraries_load_ends_with_one_line(tmp_path):
    """Ctrl+C in the first seconds of `python -m llmexp` (a fresh interpreter importing torch and
    Lightning) printed the traceback of the import it stopped; now one line and exit code 130, and
    the run directory holds no record to refuse a rerun with."""
    import os
    import signal
    import time

    from llmexp.testing import OFFLINE_ENV

    # -X importtime reports each import as it completes: Ctrl+C once llmexp.cli is in (main() runs
    # next and imports the libraries for seconds). A fixed 1.5 s was sometimes still inside the
    # interpreter's own start on a loaded machine, where Python itself prints the traceback.
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "llmexp", f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=tmp_path, env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    started, seen = time.time(), []
    while time.time() - started < 120:
        line = proc.stderr.readline()
        seen.append(line)
        if not line or line.rstrip().endswith("| llmexp.cli"):
            break
    assert seen[-1].rstrip().endswith("| llmexp.cli"), seen[-5:]
    time.sleep(0.2)  # into main(), among the libraries' imports
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = "".join(seen) + rest
    assert proc.returncode == 130 and err.endswith("llmexp: interrupted (Ctrl+C)\n") and "Traceback" not in err, err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_run_from_another_architectures_weights_is_named_after_them(tmp_path):
    """model.pretrained=<a qwen2 directory> with model= left at its default: the run was "sft-llama"
    (its directory, summary.json's model, the served model's id)."""
    import json

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llmexp.models.tokenizer import load_tokenizer

    tok = load_tokenizer(None, None)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
                     ).save_pretrained(str(tmp_path / "qwen"))
    tok.save_pretrained(str(tmp_path / "qwen"))
    r = run_cli([f"model.pretrained={tmp_path / 'qwen'}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                 "logger=none", "trainer.progress_bar=false", "task.max_prompts=8"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "sft-qwen2").iterdir()
    s = json.loads((run / "summary.json").read_text())
    assert (s["run_name"], s["model"], s["architecture"]) == ("sft-qwen2", "qwen2", "qwen2")
    # resume=auto looks under that name (it looked in runs/sft-llama/ and started a new run)
    (run / "summary.json").unlink()  # as a killed run leaves it, its checkpoint kept
    r = run_cli([f"model.pretrained={tmp_path / 'qwen'}", "trainer.max_steps=4", "trainer.val_check_interval=2",
                 "logger=none", "trainer.progress_bar=false", "task.max_prompts=8", "resume=auto"], cwd=tmp_path)
    assert r.returncode == 0 and "resume=auto: resuming runs/sft-qwen2/" in r.stderr, r.stderr[-2000:]
    assert [p.name for p in (tmp_path / "runs" / "sft-qwen2").iterdir()] == [run.name]
    assert json.loads((run / "summary.json").read_text())["global_step"] == 4


def test_ctrl_c_that_a_library_turns_into_an_error_of_its_own_still_ends_with_one_line():
    """OmegaConf, interrupted while it built a config (preflight), raised an AttributeError from the
    KeyboardInterrupt, and the command ended with its traceback and exit code 1."""
    code = ("import os, signal, time\nfrom llmexp.errors import quiet_exits\n\n@quiet_exits\ndef main():\n"
            "    try:\n        os.kill(os.getpid(), signal.SIGINT)\n        time.sleep(5)\n"
            "    except KeyboardInterrupt:\n        raise AttributeError('NoneType has no attribute x')\n\nmain()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and r.stderr == "llmexp: interrupted (Ctrl+C)\n", r.stderr
    plain = subprocess.run([sys.executable, "-c", code.replace("os.kill(os.getpid(), signal.SIGINT)",
                                                               "raise KeyboardInterrupt")],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 1 and "AttributeError" in plain.stderr  # no Ctrl+C: the error is the error's
