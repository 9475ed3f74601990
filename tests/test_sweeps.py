"""Offline sweeps from W&B sweep files: trials are real runs; reports, resume, bayes, bad specs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from llmexp.sweep.engine import trial_environment, usable_cpus
from llmexp.testing import FAST, run_module
REPO = Path(__file__).resolve().parents[1]

TINY = [o for o in FAST if not o.startswith("trainer.max_steps")] + ["trainer.max_steps=15",
                                                                     "trainer.val_check_interval=15"]


def _spec(tmp_path, method="grid", parameters=None, **extra):
    spec = {"name": "t", "method": method, "metric": {"name": "val/loss", "goal": "minimize"},
            "parameters": parameters or {"optim.lr": {"values": [1e-3, 1e-2]}},
            "command": ["${env}", "${interpreter}", "-m", "llmexp", *TINY, "${args_no_hyphens}"], **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _sweep(spec, out, *args, env=None):
    return run_module("llmexp.sweep", [str(spec), "--dir", str(out), *args], cwd=REPO, timeout=900, env=env)


def test_trials_running_at_once_share_the_cpus_unless_the_user_chose_the_threads():
    assert trial_environment(2, {"PATH": "/bin"}, cpus=8) == {"PATH": "/bin", "OMP_NUM_THREADS": "4"}
    assert trial_environment(3, {}, cpus=8)["OMP_NUM_THREADS"] == "2"
    assert trial_environment(4, {}, cpus=2)["OMP_NUM_THREADS"] == "1"  # never none
    assert trial_environment(2, {"OMP_NUM_THREADS": "3"}, cpus=8)["OMP_NUM_THREADS"] == "3"
    assert trial_environment(2, {"OMP_NUM_THREADS": ""}, cpus=8)["OMP_NUM_THREADS"] == "4"
    assert "OMP_NUM_THREADS" not in trial_environment(1, {}, cpus=8)  # alone: torch's own default


def test_the_sweep_says_how_it_shares_the_cpus_and_warns_of_more_trials_than_cpus():
    from llmexp.sweep.__main__ import threads_note

    assert threads_note(2, {}, cpus=8) == "llmexp sweep: 2 trials at once on 8 CPUs, 4 CPU threads each (OMP_NUM_THREADS)"
    assert "(OMP_NUM_THREADS as set)" in threads_note(2, {"OMP_NUM_THREADS": "3"}, cpus=8)
    assert "more trials than CPUs" not in threads_note(2, {}, cpus=2)
    assert threads_note(4, {}, cpus=2) == (
        "llmexp sweep: 4 trials at once on 2 CPUs, 1 CPU thread each (OMP_NUM_THREADS); more trials than CPUs take "
        "turns on them: the sweep ends no sooner than with --parallel 2 and holds more in memory")


@pytest.mark.slow
def test_grid_sweep_runs_trials_in_parallel_and_reports(tmp_path):
    out = tmp_path / "sweep"
    # OMP_NUM_THREADS unset (the test workers set it to 1): the sweep shares the CPUs out itself.
    r = _sweep(_spec(tmp_path), out, "--parallel", "2", env={"OMP_NUM_THREADS": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    threads = max(1, usable_cpus() // 2)
    assert f"2 trials at once on {usable_cpus()} CPUs, {threads} CPU thread" in r.stdout
    state = json.loads((out / "trials.json").read_text())
    trials = state["trials"]
    assert sorted(t["params"]["optim.lr"] for t in trials) == [1e-3, 1e-2]
    for t in trials:
        summary = json.loads((Path(t["run_dir"]) / "summary.json").read_text())
        assert t["status"] == "finished" and t["metric"] == summary["final"]["val/loss"]
        assert summary["cpu_threads"] == threads
        assert yaml.safe_load((Path(t["run_dir"]) / "config.yaml").read_text())["optim"]["lr"] == t["params"]["optim.lr"]
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert [set(r) >= {"trial", "optim.lr", "val/loss", "status", "run_dir"} for r in rows] == [True, True]
    best = min(trials, key=lambda t: t["metric"])
    md = (out / "report.md").read_text()
    assert f"**Best trial:** {best['id']}" in md and "| trial |" in md
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert f"best trial {best['id']}" in r.stdout


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_repeating_finished_trials(tmp_path):
    spec, out = _spec(tmp_path), tmp_path / "sweep"
    assert _sweep(spec, out, "--count", "1").returncode == 0  # stops after one trial, as if killed
    first = json.loads((out / "trials.json").read_text())["trials"]
    assert len(first) == 1
    stamp = (Path(first[0]["run_dir"]) / "summary.json").stat().st_mtime_ns
    r = _sweep(spec, out)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert len(trials) == 2 and trials[0] == first[0]
    assert (Path(first[0]["run_dir"]) / "summary.json").stat().st_mtime_ns == stamp
    assert {t["params"]["optim.lr"] for t in trials} == {1e-3, 1e-2}


def test_a_trial_running_when_the_sweep_died_is_resumed(tmp_path):
    from llmexp.sweep.engine import INTERRUPTED, SweepEngine
    from llmexp.sweep.spec import load_spec

    out = tmp_path / "sweep"
    out.mkdir()
    (out / "trials.json").write_text(json.dumps({"trials": [
        {"id": 0, "params": {"optim.lr": 0.001}, "run_dir": str(out / "trial-000"), "status": "running",
         "metric": None, "seconds": 3.0, "extra": {}}]}))
    engine = SweepEngine(load_spec(str(_spec(tmp_path))), out, count=None)
    assert engine.trials[0].status == INTERRUPTED
    assert engine._next_trial() is engine.trials[0]  # restarted (with resume=auto) before new ones


def test_a_sweep_resumes_only_with_the_environment_its_overrides_read(tmp_path, monkeypatch):
    """`model.pretrained=${oc.env:SFT_MODEL}` (the shipped preference sweeps): resumed with another
    SFT_MODEL, its trials came from two SFT runs, side by side in one report, said nowhere."""
    from llmexp.errors import UserError
    from llmexp.sweep.engine import SweepEngine
    from llmexp.sweep.spec import load_spec

    spec = load_spec(str(_spec(tmp_path)), ["model.pretrained=${oc.env:SFT_MODEL}"])
    monkeypatch.setenv("SFT_MODEL", "runs/a/model")
    engine = SweepEngine(spec, tmp_path / "sweep", count=None)
    engine._save()
    assert json.loads((tmp_path / "sweep" / "trials.json").read_text())["environment"] == {
        "SFT_MODEL": "runs/a/model"}
    SweepEngine(spec, tmp_path / "sweep", count=None)  # the same value: resumes
    monkeypatch.setenv("SFT_MODEL", "runs/b/model")
    with pytest.raises(UserError, match=r"read SFT_MODEL='runs/a/model' when it started and SFT_MODEL='runs/b/model' "
                                        r"now; .* set SFT_MODEL=runs/a/model to resume it"):
        SweepEngine(spec, tmp_path / "sweep", count=None)


def test_nested_parameters_of_a_wandb_sweep_file_are_dotted_keys(tmp_path):
    """`optim: {parameters: {lr: ...}}` (W&B's nested syntax) was read as a parameter named optim."""
    from llmexp.sweep.engine import SweepEngine
    from llmexp.sweep.spec import check_spec, load_spec

    path = _spec(tmp_path, parameters={"optim": {"parameters": {"lr": {"values": [1e-3, 1e-2]}}},
                                       "trainer": {"parameters": {"seed": {"value": 7}}}})
    spec = load_spec(str(path))
    assert spec.parameters == {"optim.lr": {"values": [1e-3, 1e-2]}, "trainer.seed": {"value": 7}}
    check_spec(spec)
    trial = SweepEngine(spec, tmp_path / "sweep", count=None)._next_trial()
    assert trial.params["optim.lr"] in (1e-3, 1e-2) and trial.params["trainer.seed"] == 7


def test_a_parameter_given_flat_and_nested_is_refused(tmp_path):
    from llmexp.errors import UserError
    from llmexp.sweep.spec import load_spec

    path = _spec(tmp_path, parameters={"optim.lr": {"values": [1e-3]},
                                       "optim": {"parameters": {"lr": {"values": [2e-3, 5e-3]}}}})
    with pytest.raises(UserError, match=r"parameter optim.lr is given twice"):
        load_spec(str(path))


def test_interrupted_trials_are_told_apart_by_whether_they_have_a_checkpoint(tmp_path):
    """The Ctrl+C message said every running trial would continue from its last checkpoint, also
    those that had written none (a rerun starts them over)."""
    from llmexp.sweep.engine import SweepEngine, Trial
    from llmexp.sweep.spec import load_spec

    engine = SweepEngine(load_spec(str(_spec(tmp_path))), tmp_path / "sweep", count=None)
    for i in range(3):
        engine.trials.append(Trial(id=i, params={"optim.lr": 1e-3}, run_dir=str(tmp_path / "sweep" / f"trial-{i:03d}")))
    (tmp_path / "sweep" / "trial-001" / "checkpoints").mkdir(parents=True)
    (tmp_path / "sweep" / "trial-001" / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert engine.where_trials_stand([0, 1, 2]) == ["trial 1 will continue from its last checkpoint",
                                                    "trials 0, 2 will start over (no checkpoint yet)"]


def test_a_trial_that_finished_after_the_sweep_died_counts_as_finished(tmp_path):
    """The trial ran on to its end while the sweep was gone (its parent killed alone): relaunched, a
    finished run refuses any change, so it was marked failed and another trial named the best."""
    from llmexp.sweep.engine import FINISHED, SweepEngine
    from llmexp.sweep.spec import load_spec

    out = tmp_path / "sweep"
    (out / "trial-000").mkdir(parents=True)
    (out / "trial-000" / "summary.json").write_text(json.dumps({"final": {"val/loss": 0.0699}}))
    (out / "trials.json").write_text(json.dumps({"trials": [
        {"id": 0, "params": {"optim.lr": 0.001}, "run_dir": str(out / "trial-000"), "status": "running",
         "metric": None, "seconds": 3.0, "extra": {}}]}))
    engine = SweepEngine(load_spec(str(_spec(tmp_path))), out, count=1)
    assert engine.trials[0].status == FINISHED and engine.trials[0].metric == 0.0699
    assert engine._next_trial() is None  # nothing relaunched


def test_bayes_proposes_new_points_from_earlier_results(tmp_path):
    from llmexp.sweep.engine import SweepEngine, Trial
    from llmexp.sweep.spec import load_spec

    params = {"optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1}}
    spec = load_spec(str(_spec(tmp_path, method="bayes", parameters=params)))
    engine = SweepEngine(spec, tmp_path / "sweep", count=10)
    # Earlier results: loss falls as lr rises towards 1e-2.
    for i, (lr, loss) in enumerate([(1e-4, 3.0), (3e-4, 2.5), (1e-3, 2.0), (3e-3, 1.5), (1e-2, 1.2)]):
        engine.trials.append(Trial(id=i, params={"optim.lr": lr}, run_dir=str(tmp_path / f"t{i}"),
                                   status="finished", metric=loss))
    proposals = [engine._propose()["optim.lr"] for _ in range(3)]
    assert all(1e-4 <= p <= 1e-1 for p in proposals)
    assert not {round(p, 12) for p in proposals} & {1e-4, 3e-4, 1e-3, 3e-3, 1e-2}


def test_bad_spec_is_refused_before_any_trial(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("method: grod\nmetric: {name: val/loss}\nparameters:\n  optim.lrr: {values: [1, 2]}\n")
    r = _sweep(spec, tmp_path / "sweep")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'grod' is not one of" in r.stderr and "optim.lrr: unknown key" in r.stderr
    assert not (tmp_path / "sweep").exists()


def test_every_value_of_a_parameter_is_checked_before_any_trial(tmp_path):
    """A bad second value (or range end) failed its trial mid-sweep; the first alone was checked."""
    spec = _spec(tmp_path, parameters={"optim.scheduler": {"values": ["constant", "cosin"]},
                                       "optim.lr": {"values": [1e-3, -1]}})
    r = _sweep(spec, tmp_path / "sweep")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "optim.scheduler" in r.stderr and "'cosin'" in r.stderr and "optim.lr" in r.stderr, r.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_metric_no_run_records_stops_the_sweep_at_its_first_trial(tmp_path):
    """metric.name with a typo: every trial ran to its end and "failed", the sweep exited 0."""
    spec = _spec(tmp_path, metric={"name": "val/los", "goal": "minimize"})
    r = _sweep(spec, tmp_path / "sweep")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "metric.name: the sweep's metric 'val/los' is not one a run records" in r.stderr
    assert "val/loss" in r.stderr and f"fix metric.name in {spec}" in r.stderr
    trials = json.loads((tmp_path / "sweep" / "trials.json").read_text())["trials"]
    assert len(trials) == 1 and trials[0]["status"] == "failed"  # stopped at the first, not run to the end


def test_a_recorded_metric_is_told_from_a_missing_one_at_any_depth():
    """The typo check asks whether the run recorded the metric at all: a nested summary.json path
    (time_split.optimisation_seconds) is a metric, a NaN one is recorded (the trial failed), a
    misspelt one is not."""
    from llmexp.sweep.results import metric_value, recorded_value

    s = {"final": {"val/loss": 0.5, "val/reward": float("nan")}, "eval": {"t": {"em": 0.2}},
         "time_split": {"optimisation_seconds": 4.5}}
    assert metric_value(s, "time_split.optimisation_seconds") == 4.5 and metric_value(s, "eval/t/em") == 0.2
    assert metric_value(s, "val/reward") is None and recorded_value(s, "val/reward") is not None
    assert recorded_value(s, "val/los") is None and recorded_value(s, "time_split.nope") is None


@pytest.mark.slow
def test_a_sweep_whose_every_trial_failed_exits_non_zero_naming_the_logs(tmp_path):
    spec = _spec(tmp_path, parameters={"optim.lr": {"values": [1e6]}})  # diverges: the NaN guard exits 3
    r = _sweep(spec, tmp_path / "sweep")
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    assert "trial 0 failed (exit code 3; its log:" in r.stdout, r.stdout
    assert "no trial finished with a value of val/loss" in r.stderr


def test_sweep_file_and_dir_mistakes_get_one_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grid\nmetric: {name: val/loss}\nparameters:\n  optim.lr: {values: [1e-3, 1e-2}\n")
    r = _sweep(bad, tmp_path / "sweep")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is not valid YAML at line 4, column" in r.stderr and "expected ',' or ']'" in r.stderr, r.stderr
    a_file = tmp_path / "a.log"
    a_file.write_text("kept")
    r = _sweep(_spec(tmp_path), a_file)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"--dir {a_file} is a file, not a directory" in r.stderr and a_file.read_text() == "kept"


@pytest.mark.slow
def test_overrides_on_the_command_line_reach_every_trial_and_belong_to_the_sweep(tmp_path):
    """`llmexp sweep FILE key=value ...`: the user had to edit a copy of the YAML to shorten trials."""
    spec, out = _spec(tmp_path, parameters={"optim.lr": {"values": [1e-3]}}), tmp_path / "sweep"
    r = _sweep(spec, out, "trainer.max_steps=10", "trainer.val_check_interval=10")
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((out / "trials.json").read_text())
    assert state["overrides"] == ["trainer.max_steps=10", "trainer.val_check_interval=10"]
    (trial,) = state["trials"]
    assert json.loads((Path(trial["run_dir"]) / "summary.json").read_text())["global_step"] == 10
    r = _sweep(spec, out, "trainer.max_steps=12", "trainer.val_check_interval=12")  # other overrides: not this sweep
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "command-line overrides trainer.max_steps=10 trainer.val_check_interval=10 -> trainer.max_steps=12" in r.stderr
    r = _sweep(spec, tmp_path / "other", "optim.lr=1e-2")  # a swept key
    assert r.returncode == 2 and "optim.lr: is swept by spec.yaml" in r.stderr and "Traceback" not in r.stderr
    r = _sweep(spec, tmp_path / "other", "trainer.max_stepz=3")
    assert r.returncode == 2 and "trainer.max_stepz" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "other").exists()


def test_shipped_sweep_files_validate(monkeypatch, tmp_path):
    from llmexp.sweep.spec import check_spec, load_spec

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("SFT_MODEL", str(tmp_path))  # the SFT run's model/ their comments say to export
    files = sorted((REPO / "sweeps").glob("*.yaml"))
    assert len(files) >= 2
    for f in files:
        check_spec(load_spec(str(f)))


def test_a_sweep_from_an_sft_run_is_refused_before_any_trial_when_its_variable_is_unset(tmp_path, monkeypatch):
    """With `${oc.env:SFT_MODEL,null}` a forgotten export swept dpo/kto/simpo/orpo from random
    weights, every trial scoring 0; exported empty, every trial failed to load ''."""
    out = tmp_path / "sweep"
    monkeypatch.delenv("SFT_MODEL", raising=False)
    r = _sweep(REPO / "sweeps" / "preference_methods.yaml", out)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "model.pretrained: takes the environment variable SFT_MODEL, which is not set" in r.stderr
    assert "export SFT_MODEL=<value> first" in r.stderr and "Traceback" not in r.stderr
    r = _sweep(REPO / "sweeps" / "dpo_beta.yaml", out, env={"SFT_MODEL": " "})
    assert r.returncode == 2 and "model.pretrained: is empty" in r.stderr, r.stderr[-2000:]
    assert not out.exists()


def test_a_typo_in_a_sweep_files_keys_is_one_problem_with_the_key_it_resembles(tmp_path):
    """`paramters:` gave three problems (two of the schema's, each with a docs URL useless offline,
    and 'no parameters'); now one, with the suggestion."""
    from llmexp.errors import ConfigError
    from llmexp.sweep.spec import check_spec, load_spec

    good = yaml.safe_load(_spec(tmp_path).read_text())
    for typo, key in (("paramters", "parameters"), ("metrc", "metric")):
        f = tmp_path / f"{typo}.yaml"
        f.write_text(yaml.safe_dump({typo if k == key else k: v for k, v in good.items()}))
        with pytest.raises(ConfigError) as e:
            check_spec(load_spec(str(f)))
        assert [(p.key, p.message) for p in e.value.problems] == [(f"{typo}.yaml: {typo}", "is not a key of a W&B sweep file")]
        assert e.value.problems[0].fix.startswith(f"did you mean {key!r}?")
    f = tmp_path / "method.yaml"
    f.write_text(yaml.safe_dump({**good, "method": "gridd", "metric": {**good["metric"], "goal": "minimise"}}))
    with pytest.raises(ConfigError, match=r"'gridd' is not one of .*\n      fix: choose one of the values it lists"):
        check_spec(load_spec(str(f)))
    with pytest.raises(ConfigError) as e:  # the schema's messages name no key: the problem does
        check_spec(load_spec(str(f)))
    assert [p.key for p in e.value.problems] == ["method.yaml: method", "method.yaml: metric.goal"]
    # a bad value from the command line is the command line's, not the file's
    with pytest.raises(ConfigError) as e:
        check_spec(load_spec(str(_spec(tmp_path)), ["trainer.max_steps=-3"]))
    assert [p.key for p in e.value.problems] == ["the command line: trainer.max_steps"]


def test_a_directory_of_another_sweep_or_run_is_refused_and_kept(tmp_path):
    from llmexp.errors import UserError
    from llmexp.sweep.engine import SweepEngine
    from llmexp.sweep.spec import load_spec

    out = tmp_path / "sweep"
    first = SweepEngine(load_spec(str(_spec(tmp_path))), out, count=None)
    first._save()
    state = (out / "trials.json").read_text()
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = _spec(other_dir, parameters={"optim.lr": {"values": [1e-4, 1e-5]}})
    with pytest.raises(UserError, match="holds another sweep"):
        SweepEngine(load_spec(str(other)), out, count=None)
    assert (out / "trials.json").read_text() == state
    edited = _spec(tmp_path, parameters={"optim.lr": {"values": [1e-4]}})  # the same file, edited
    with pytest.raises(UserError, match=r"holds sweep 't' as .*spec.yaml was when it started; the spec has "
                                        r"changed since \(parameters\)"):
        SweepEngine(load_spec(str(edited)), out, count=None)
    _spec(tmp_path)
    # only the overrides changed: said so (it said "the spec has changed"), and with no trial
    # finished, that removing the directory starts it over
    with pytest.raises(UserError, match=r"the command-line overrides have changed since .* \(none of its trials "
                                        r"finished: removing .* starts it over there\)") as e:
        SweepEngine(load_spec(str(_spec(tmp_path)), ["trainer.max_steps=7"]), out, count=None)
    assert "the spec" not in str(e.value).split("started;")[1].split("(")[0]
    assert SweepEngine(load_spec(str(_spec(tmp_path))), out, count=None).trials == []  # its own: resumes
    run_dir = tmp_path / "a-run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="holds a run, not a sweep"):
        SweepEngine(load_spec(str(_spec(tmp_path))), run_dir, count=None)


@pytest.mark.parametrize("args, message", [(["--count", "0"], "argument --count: must be >= 1, got 0"),
                                           (["--parallel", "-1"], "argument --parallel: must be >= 1, got -1")])
def test_bad_counts_are_refused(tmp_path, args, message):
    r = _sweep(_spec(tmp_path), tmp_path / "sweep", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
@pytest.mark.parametrize("to", ["sweep", "process group", "sweep-SIGTERM"])
def test_ctrl_c_to_the_sweep_stops_its_trial_and_a_rerun_resumes_it(tmp_path, to):
    """SIGINT to the sweep alone (kill -INT) or to its process group (Ctrl+C in a terminal): it
    stops its running trial as Ctrl+C stops a run and says how to resume, exit 130 (it was a
    KeyboardInterrupt traceback, and the trial ran on; with the group, the trial got a second SIGINT
    that broke its message off with tracebacks); the rerun resumes the trial from its checkpoint."""
    import os
    import signal
    import subprocess
    import time

    from llmexp.testing import popen_module

    steps = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "t", "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"optim.lr": {"values": [1e-3]}},
        "command": ["${env}", "${interpreter}", "-m", "llmexp", *steps, "trainer.max_steps=60",
                    "trainer.val_check_interval=30", "trainer.checkpoint_every_n_steps=5", "${args_no_hyphens}"]}))
    out = tmp_path / f"sweep-{to}"
    proc = popen_module("llmexp.sweep", [str(spec), "--dir", str(out)], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not list((out / "trial-000" / "checkpoints").glob("*.ckpt")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    # SIGTERM (timeout, Slurm, systemd) as Ctrl+C: it ended the sweep alone, and its trial ran on, orphaned
    if to == "process group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM if "SIGTERM" in to else signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "interrupted" in err and "run the same command again" in err, err
    assert "trial 0 will continue from its last checkpoint" in err, err
    log = (out / "trial-000.log").read_text()
    assert "interrupted at step" in log and "Traceback" not in log, log[-3000:]  # the trial stopped, as on Ctrl+C
    assert json.loads((out / "trials.json").read_text())["trials"][0]["status"] == "running"
    r = _sweep(spec, out)
    assert r.returncode == 0, r.stderr[-3000:]
    trial = json.loads((out / "trials.json").read_text())["trials"][0]
    summary = json.loads((Path(trial["run_dir"]) / "summary.json").read_text())
    assert trial["status"] == "finished" and summary["global_step"] == 60 and summary["resumed_from"]


def test_a_tie_for_best_is_said(tmp_path):
    """Two trials with the same exact match (4 of 40 each) were reported as one clear best."""
    from llmexp.sweep.engine import Trial
    from llmexp.sweep.report import tie_note, write_report

    trials = [Trial(id=i, params={"optim.lr": lr}, run_dir=str(tmp_path / f"t{i}"), status="finished", metric=m)
              for i, (lr, m) in enumerate([(1e-3, 0.1), (3e-3, 0.1), (1e-2, 0.05)])]
    for t in trials:  # the eval metric logged once, after training; val/loss at each validation
        Path(t.run_dir).mkdir()
        (Path(t.run_dir) / "metrics.csv").write_text(
            "step,val/loss,eval/x/exact_match\n0,3.0,\n10,2.0,\n20,1.5,\n20,," + str(t.metric) + "\n")
    from llmexp.sweep.plots import curve_metric

    assert curve_metric(trials, "eval/x/exact_match") == "val/loss"  # it drew one dot per trial
    (tmp_path / "out").mkdir()
    result = write_report(tmp_path / "out", trials, "eval/x/exact_match", "maximize", "tie")
    assert "curves.png" in result["figures"]
    assert result["best"].id == 0
    assert tie_note(result["best"], trials).startswith(" (tied with trial 1: the metric does not tell them apart")
    assert "tied with trial 1" in (tmp_path / "out" / "report.md").read_text()
    trials[1].metric = 0.09
    assert tie_note(result["best"], trials) == ""


def test_a_log_axis_within_a_decade_labels_the_trials_values():
    """lr log-uniform over 1e-3..2e-3: matplotlib labelled every minor tick (1.2e-3, 1.3e-3, ...)
    into one smear; the axis names the trials' own values."""
    from llmexp.sweep.engine import Trial
    from llmexp.sweep.plots import parameter_panels

    trials = [Trial(id=i, params={"optim.lr": lr}, run_dir=f"/nonexistent/t{i}", status="finished", metric=m)
              for i, (lr, m) in enumerate([(1.21e-3, 0.1), (1.37e-3, 0.12), (1.68e-3, 0.08)])]
    fig = parameter_panels(trials, "eval/x/exact_match", "maximize", {"optim.lr": "log_uniform_values"})
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1.21e-3", "1.37e-3", "1.68e-3"]
    assert not any(t.get_text() for t in ax.xaxis.get_minorticklabels())
