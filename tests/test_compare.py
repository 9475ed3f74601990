"""Reading experiments offline: the sweep report's figures and importance table, and
``llmexp compare`` on sweep trials, pipeline-style stage directories and bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from llmexp.testing import FAST, run_cli

REPO = Path(__file__).resolve().parents[1]
# A few steps per trial: generation for the task score is what costs, so few prompts.
TINY = [o for o in FAST if not o.startswith(("trainer.max_steps", "trainer.val_check_interval", "task.max_prompts"))] + [
    "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "task.max_prompts=8"]


def _cli(*args, cwd=REPO):
    return run_cli(list(map(str, args)), cwd=cwd)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One real grid sweep of two trials: lr over two decades, warmup held constant."""
    root = tmp_path_factory.mktemp("sweep")
    spec = {"name": "lr", "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
            "parameters": {"optim.lr": {"values": [1e-4, 1e-2]}, "optim.warmup_steps": {"value": 2}},
            "command": ["${env}", "${interpreter}", "-m", "llmexp", *TINY, "${args_no_hyphens}"]}
    (root / "lr.yaml").write_text(yaml.safe_dump(spec))
    r = _cli("sweep", root / "lr.yaml", "--dir", root / "sw", "--parallel", "2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return root / "sw"


def _trials(sweep_dir):
    from llmexp.sweep.engine import Trial

    return [Trial(**t) for t in json.loads((sweep_dir / "trials.json").read_text())["trials"]]


def _trial(i, lr, metric, status="finished", **params):
    from llmexp.sweep.engine import Trial

    return Trial(id=i, params={"optim.lr": lr, **params}, run_dir=f"/nonexistent/t{i}", status=status, metric=metric)


# -- the sweep report -------------------------------------------------------------------------

@pytest.mark.slow
def test_sweep_report_plots_metric_per_swept_parameter_on_a_log_axis(sweep):
    from llmexp.sweep.plots import parameter_panels

    fig = parameter_panels(_trials(sweep), "val/loss", "minimize")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["val/loss against optim.lr"]  # warmup_steps was constant
    ax = panels[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "optim.lr (log scale)"
    assert ax.get_ylabel() == "val/loss (nats / token)"
    best = min(_trials(sweep), key=lambda t: t.metric)
    assert f"best: trial {best.id}" in [t.get_text() for t in ax.get_legend().get_texts()]
    for name in ("report.png", "curves.png"):
        assert (sweep / name).read_bytes()[:4] == b"\x89PNG"
    assert not (sweep / "parallel.png").exists()  # two swept parameters at most: the panels say it all


@pytest.mark.slow
def test_sweep_report_overlays_every_trials_validation_curve(sweep):
    from llmexp.sweep.plots import validation_curves

    trials = _trials(sweep)
    fig = validation_curves(trials, "val/loss", "minimize")
    ax, colourbar = fig.axes
    assert colourbar.get_ylabel() == "final val/loss"
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "val/loss (nats / token)"
    best = min(trials, key=lambda t: t.metric)
    names = sorted(line.get_label() for line in ax.get_lines())
    assert names == sorted(["best: lr=0.01" if best.params["optim.lr"] == 1e-2 else "lr=0.01",
                            "best: lr=1e-4" if best.params["optim.lr"] == 1e-4 else "lr=1e-4"])
    assert all(len(line.get_xdata()) >= 2 for line in ax.get_lines())  # initial and later validations


@pytest.mark.slow
def test_sweep_report_md_has_importance_of_swept_parameters_only(sweep):
    md = (sweep / "report.md").read_text()
    section = md.split("## Parameter importance", 1)[1]
    assert "| optim.lr |" in section and "optim.warmup_steps" not in section
    assert "too few for the forest" in section  # two trials: correlation only
    assert "![val/loss against each swept parameter" in md and "(curves.png)" in md


def test_failed_trials_are_marked_and_categorical_values_get_ticks():
    from llmexp.sweep.plots import parameter_panels

    trials = [_trial(0, 1e-4, 3.0, loss="dpo"), _trial(1, 1e-3, 2.0, loss="ipo"),
              _trial(2, 1e-2, None, status="failed", loss="dpo")]
    fig = parameter_panels(trials, "val/loss", "minimize")
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    lr, loss = panels["val/loss against optim.lr"], panels["val/loss against loss"]
    legend = fig.axes[0].get_legend()  # the first panel carries the legend for all
    assert "failed / stopped" in [t.get_text() for t in legend.get_texts()]
    assert len(lr.collections[-1].get_offsets()) == 1  # the failed trial, crossed at the panel's worse end:
    assert lr.collections[-1].get_offsets()[0][1] > 0.9  # the top when minimizing (at the foot it read as the best)
    maximized = parameter_panels(trials, "val/loss", "maximize").axes[0]
    assert maximized.collections[-1].get_offsets()[0][1] < 0.1
    assert lr.get_xlim()[0] < 1e-4 and lr.get_xlim()[1] > 1e-2  # inside the axis, beyond the finished ones
    assert [t.get_text() for t in loss.get_xticklabels()] == ["dpo", "ipo"] and loss.get_xscale() == "linear"


def test_parallel_coordinates_from_three_swept_parameters_with_values_on_the_axes():
    from llmexp.sweep.plots import parallel_coordinates

    two = [_trial(i, lr, m, beta=b) for i, (lr, b, m) in enumerate([(1e-4, 0.1, 3.0), (1e-2, 0.5, 2.0)])]
    assert parallel_coordinates(two, "val/loss", "minimize") is None
    three = [_trial(i, lr, m, beta=b, warmup=w, fixed=1)
             for i, (lr, b, w, m) in enumerate([(1e-4, 0.1, 0, 3.0), (1e-3, 0.5, 10, 2.5), (1e-2, 0.9, 20, 2.0)])]
    fig = parallel_coordinates(three, "val/loss", "minimize")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["beta", "optim.lr", "warmup", "val/loss"]
    texts = {t.get_text() for t in ax.texts}
    assert {"1e-4", "1e-3", "0.01", "0.1", "0.9", "20"} <= texts
    assert len(ax.get_lines()) == 3 + 4  # a line per trial and an axis per column; "fixed" left out


def test_importance_ranks_the_parameter_that_moves_the_metric():
    from llmexp.sweep.importance import correlation, importance, swept

    params = [{"lr": 10 ** -e, "seed": s, "const": 1} for e, s in [(4, 1), (3, 3), (2, 2), (4, 2), (3, 1), (2, 3)]]
    metric = [3.0, 2.0, 1.0, 3.1, 2.1, 0.9]  # falls as lr rises; the seed does nothing
    assert swept(params) == ["lr", "seed"]
    rows = importance(params, metric)
    assert [r["param"] for r in rows] == ["lr", "seed"]
    assert rows[0]["importance"] > 0.8 and rows[0]["correlation"] < -0.99
    assert correlation([1, 1, 1], [1, 2, 3]) is None


def test_a_categorical_parameter_has_an_importance_and_no_correlation():
    """stage=dpo,kto,simpo,orpo: the codes' order is arbitrary, so a correlation with it means nothing."""
    from llmexp.sweep.importance import importance

    params = [{"stage": s, "lr": lr} for s, lr in [("dpo", 1e-3), ("kto", 1e-3), ("orpo", 1e-4), ("simpo", 1e-4)]]
    rows = {r["param"]: r for r in importance(params, [0.66, 0.53, 0.71, 0.57])}
    assert rows["stage"]["correlation"] is None and rows["stage"]["importance"] is not None
    assert rows["lr"]["correlation"] is not None


def test_log_scale_short_values_and_labels():
    from llmexp.plotting import describe, log_scale, short

    assert log_scale([1e-4, 1e-3]) is False and log_scale([1e-4, 1e-2]) is True
    assert log_scale([1e-4, 2e-4], "log_uniform_values") is True and log_scale([0, 1e-3, 1]) is False
    assert [short(v) for v in (3e-4, 0.01, 0.1, 2, 1e5, "sft")] == ["3e-4", "0.01", "0.1", "2", "1e5", "sft"]
    assert describe({"optim.lr": 3e-4, "stage.beta": 0.1}) == "lr=3e-4, beta=0.1"
    assert describe({"a.lr": 1e-3, "b.lr": 2e-3}) == "a.lr=1e-3, b.lr=2e-3"


# -- compare ---------------------------------------------------------------------------------

def test_differing_keys_collapse_a_changed_group_to_its_name():
    from llmexp.compare.diff import differing_keys, run_labels

    sft = {"stage": {"name": "sft", "assistant_only_loss": True}, "optim": {"lr": 1e-4}, "run_name": "sft-llama",
           "model": {"name": "llama", "pretrained": None}}
    dpo = {"stage": {"name": "dpo", "beta": 0.1}, "optim": {"lr": 1e-4}, "run_name": "dpo-llama",
           "model": {"name": "llama", "pretrained": "/runs/pipelines/dpo/1-sft/model"}}
    keys = differing_keys([sft, dpo])
    assert keys == ["stage.name", "model.pretrained"]
    assert run_labels([sft, dpo], keys, ["p/1-sft", "p/2-dpo"]) == [
        "stage=sft, pretrained=null", "stage=dpo, pretrained=…/1-sft/model"]
    sft["stage"]["reward"], dpo["data"], sft["data"] = {"function": "x"}, {"name": "pairs", "options": {"n": 2}}, \
        {"name": "chat", "options": {"n": 1}}
    assert differing_keys([sft, dpo]) == ["stage.name", "model.pretrained", "data.name"]  # nested keys follow too
    same = differing_keys([sft, sft])
    assert same == [] and run_labels([sft, sft], same, ["a/x", "a/y"]) == ["x", "y"]
    # Three sft runs told apart by lr and seed, beside a dpo run: the names show lr and seed (they
    # showed the first three differing keys, the same for the three sft runs, and the directory).
    runs = [{"model": {"pretrained": p}, "stage": {"name": st}, "data": {"name": d}, "optim": {"lr": lr},
             "trainer": {"seed": seed}} for p, st, d, lr, seed in [
        (None, "sft", "arithmetic", 3e-3, 42), (None, "sft", "arithmetic", 1e-3, 42),
        (None, "sft", "arithmetic", 3e-3, 1), ("/r/model", "dpo", "pairs", 5e-4, 42)]]
    keys = differing_keys(runs)
    assert keys == ["model.pretrained", "stage.name", "data.name", "optim.lr", "trainer.seed"]
    labels = run_labels(runs, keys, ["r/a", "r/b", "r/c", "r/d"])
    assert len(set(labels)) == 4 and all("(" not in label for label in labels), labels
    assert all("lr=" in label and "seed=" in label for label in labels), labels
    # A key of a changed group that also differs between runs of the same choice stays (a sweep over
    # a dataset option next to a run on other data: the option was hidden, two trials alike).
    for run, style in zip(runs, ("plain", "loud", "plain", None)):
        run["data"]["options"] = {"style": style} if style else {"n": 2}
    assert "data.options.style" in differing_keys(runs) and "data.options.n" not in differing_keys(runs)


@pytest.mark.slow
def test_compare_cli_on_sweep_trials_writes_table_and_curves(sweep, tmp_path):
    out = tmp_path / "cmp"
    r = _cli("compare", f"{sweep}/trial-*", "--out", out)  # a quoted glob; .log files are skipped
    assert r.returncode == 0, r.stderr[-3000:]
    assert "differing in optim.lr" in r.stdout and "lr=1e-4" in r.stdout
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert sorted(row["run"] for row in rows) == ["lr=0.01", "lr=1e-4"]
    assert "optim.warmup_steps" not in rows[0] and {"stage", "model", "data", "optim.lr", "val/loss initial",
                                                    "val/loss final", "val/task_score final", "wall_seconds",
                                                    "tokens_per_second"} <= set(rows[0])
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert float(row["val/loss final"]) == summary["final"]["val/loss"] and row["stage"] == "sft"
    md = (out / "compare.md").read_text()
    assert "| run | stage | model | data | optim.lr |" in md and "val/loss (initial → final)" in md
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_compare_on_pipeline_stage_directories_names_runs_by_stage(sweep, tmp_path):
    from llmexp.compare.__main__ import compare
    from llmexp.compare.curves import curves_figure
    from llmexp.compare.runs import load_run, run_paths

    pipe = tmp_path / "pipe"  # the layout `llmexp pipeline` leaves: <dir>/<i>-<stage>/
    shutil.copytree(sweep / "trial-000", pipe / "1-sft")
    shutil.copytree(sweep / "trial-001", pipe / "2-dpo")
    config = yaml.safe_load((pipe / "2-dpo" / "config.yaml").read_text())
    config["stage"] = {"name": "dpo", "beta": 0.1}
    (pipe / "2-dpo" / "config.yaml").write_text(yaml.safe_dump(config))
    result = compare([str(pipe)], str(tmp_path / "cmp"), show=False)
    assert result["keys"] == ["stage.name", "optim.lr"]
    assert result["labels"] == ["stage=sft, lr=1e-4", "stage=dpo, lr=0.01"]
    runs = [load_run(p) for p in run_paths([str(pipe)])]
    fig = curves_figure([r.metrics for r in runs], result["labels"], "t")
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles[:3] == ["train/loss", "val/loss", "val/task_score"]
    val = fig.axes[1]
    assert [line.get_label() for line in val.get_lines()] == result["labels"]
    assert val.get_xlabel() == "optimizer step" and val.get_ylabel() == "val/loss (nats / token)"


@pytest.mark.slow
def test_compare_refuses_bad_input_with_exit_2(sweep, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    earlier = tmp_path / "report"  # an earlier comparison: not written over (nor mixed with a new one)
    earlier.mkdir()
    (earlier / "compare.md").write_text("# the earlier report\n")
    cases = [([str(sweep / "trial-000"), "--out", str(earlier)], "holds an earlier comparison (compare.md)"),
             ([f"{tmp_path}/nothing-*"], "no run directories match"),
             ([str(empty)], f"{empty} is not a run directory"),
             ([str(tmp_path / "missing")], "does not exist"),
             ([str(sweep / "trial-000"), "--out", str(sweep / "trial-001")], "holds a run or a sweep"),
             ([str(sweep), "--out", str(sweep)], "holds a run or a sweep"),
             # inside a run (its model/) or a sweep: its files are the run's, the comparison's are not
             ([str(sweep / "trial-000"), "--out", str(sweep / "trial-000" / "model")], "holds a run or a sweep"),
             ([str(sweep / "trial-000"), "--out", str(sweep / "new" / "sub")], "holds a run or a sweep")]
    for args, message in cases:
        r = _cli("compare", *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert "give finished run directories" in r.stderr or "choose a new directory" in r.stderr
    assert sorted(p.name for p in earlier.iterdir()) == ["compare.md"]
    assert (earlier / "compare.md").read_text() == "# the earlier report\n"
    assert not (sweep / "trial-000" / "model" / "compare.md").exists() and not (sweep / "new").exists()
    # An unfinished run: named with how to finish it (no checkpoint: no resume= to suggest); in a
    # folder of runs it is left out with a note.
    folder = tmp_path / "folder"
    shutil.copytree(sweep / "trial-001", folder / "done", ignore=shutil.ignore_patterns("model", "checkpoints"))
    unfinished = folder / "killed"
    shutil.copytree(sweep / "trial-000", unfinished, ignore=shutil.ignore_patterns("model", "checkpoints"))
    (unfinished / "summary.json").unlink()
    r = _cli("compare", str(unfinished), str(sweep / "trial-001"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"it has no checkpoint: start it over (its overrides with hydra.run.dir={unfinished} resume=auto)" in r.stderr
    r = _cli("compare", str(folder), str(sweep / "trial-000"), "--out", str(tmp_path / "out-folder"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"compare: left out 1 run(s) in {folder} that did not finish (stopped or failed: no summary.json): " \
           "killed" in r.stderr
    # a folder of runs inside (a pipeline's, a sweep's) is named, not silently skipped
    shutil.copytree(sweep / "trial-001", folder / "pipeline" / "1-sft", ignore=shutil.ignore_patterns("model", "checkpoints"))
    r = _cli("compare", str(folder), "--out", str(tmp_path / "out-nested"))
    assert r.returncode == 0 and f"compare: 1 folder(s) in {folder} hold runs of their own, not compared: pipeline " \
        "(give them as paths too to include their runs)" in r.stderr, r.stderr[-2000:]
    for name, damage in (("summary.json", "{not json"), ("config.yaml", "[: not yaml")):
        damaged = tmp_path / f"damaged-{name}"
        shutil.copytree(sweep / "trial-000", damaged, ignore=shutil.ignore_patterns("model", "checkpoints"))
        (damaged / name).write_text(damage)
        r = _cli("compare", str(damaged), str(sweep / "trial-001"), "--out", str(tmp_path / "out"))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"{damaged / name} is not valid" in r.stderr and "leave the run out" in r.stderr, r.stderr


def test_losses_of_different_kinds_get_columns_and_panels_of_their_own():
    """An sft run's cross-entropy and a dpo run's preference loss were one val/loss column and one
    panel, labelled nats / token; runs whose losses agree in kind keep the plain names, and
    progress bars or loggers are not differences."""
    from llmexp.compare.curves import panel_metrics
    from llmexp.compare.diff import differing_keys
    from llmexp.compare.losses import axis_label, loss_names
    from llmexp.compare.runs import Run
    from llmexp.compare.table import records

    runs = [Run(Path(name), {"stage": stage, "initial": {"val/loss": 2.0}, "final": {"val/loss": 0.5}})
            for name, stage in (("a", "sft"), ("b", "dpo"), ("c", "prune"))]
    row = records(runs, [], ["a", "b", "c"])[1]
    assert row["val/loss (dpo) final"] == 0.5 and row["val/loss (cross-entropy) final"] is None
    assert records(runs, [], ["a", "b", "c"])[2]["val/loss (cross-entropy) final"] == 0.5  # prune's is the sft loss
    assert loss_names(["sft", "pretrain", "quantize"]) == [{}, {}, {}]
    assert panel_metrics(["val/loss (dpo)", "val/loss (cross-entropy)", "lr", "val/task_score"]) == [
        "val/loss (cross-entropy)", "val/loss (dpo)", "val/task_score"]
    assert axis_label("val/loss (dpo)") == "val/loss (dpo's loss)"
    assert axis_label("val/loss") == "val/loss (nats / token)"
    assert axis_label("val/loss (cross-entropy)") == "val/loss (cross-entropy, nats / token)"
    configs = [{"trainer": {"progress_bar": bar, "seed": 1}, "logger": {"name": name}}
               for bar, name in ((True, "csv"), (False, "wandb"))]
    assert differing_keys(configs) == []


def test_comparisons_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    """The default runs/compare/<time>: the second comparison within a second overwrote the first."""
    from llmexp.compare.__main__ import output_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt: "20261206-120000")
    first, second, third = (output_dir(None, []) for _ in range(3))
    assert [p.name for p in (first, second, third)] == ["20261206-120000", "20261206-120000-2", "20261206-120000-3"]
    assert all(p.is_dir() and not any(p.iterdir()) for p in (first, second, third))


def test_a_table_too_wide_for_the_console_is_turned_a_column_per_run(capsys, monkeypatch):
    from llmexp.compare.table import print_table

    monkeypatch.setenv("COLUMNS", "80")
    rows = [{"run": f"stage={stage}", "stage": stage, **{f"stage.option_{i}": f"{stage}-{i}" for i in range(12)},
             "val/loss initial": 6.0, "val/loss final": loss, "wall_seconds": 10.0, "tokens_per_second": 900.0,
             "run_dir": f"/runs/p/{n}-{stage}"} for n, (stage, loss) in enumerate((("sft", 0.5), ("dpo", 0.4)), 1)]
    print_table(rows, "2 runs")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines)
    header = next(line for line in lines if "1-sft" in line)
    assert "2-dpo" in header  # one column per run, named by its directory
    for i in range(12):  # a row per differing key, each whole on one line with both runs' values
        assert any(f"stage.option_{i} " in line and f"sft-{i} " in line and f"dpo-{i} " in line for line in lines)
    assert any("val/loss" in line and "6 → 0.5" in line and "6 → 0.4" in line for line in lines)


def test_evaluations_made_after_training_are_compared(tmp_path):
    """python -m llmexp.eval <run> writes eval/results*.json; compare showed '–' for them, reading
    only summary.json's eval (the run's own, kept as it was)."""
    import json

    from llmexp.compare.runs import load_run
    from llmexp.compare.table import metric_pairs

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"stage": "sft", "eval": {"a": {"acc": 0.9}}}))
    (run / "config.yaml").write_text("stage: {name: sft}\n")
    (run / "eval" / "results.json").write_text(json.dumps({"a": {"acc": 0.9}, "b": {"acc": 0.5}}))
    (run / "eval" / "results-2.json").write_text(json.dumps({"a": {"acc": 0.1}, "b": {"acc": 0.7}, "c": {"f1": 0.3}}))
    pairs = metric_pairs(load_run(run).summary)
    assert pairs["eval/a/acc"] == (None, 0.9)  # the run's own
    assert pairs["eval/b/acc"] == (None, 0.7) and pairs["eval/c/f1"] == (None, 0.3)  # the newest later one


def test_compare_md_names_each_run_directory_whole():
    from llmexp.compare.table import to_markdown

    path = "/runs/multirun/sft-llama/20261206-190553/0"
    assert f"| {path} |" in to_markdown([{"run": "lr=1e-3 (0)", "run_dir": path}], "t")


def test_a_run_that_exported_its_best_validation_says_from_which_step():
    """trainer.keep_best: a run's final metrics are an earlier step's than its last; the table says
    which step its model is (and adds nothing when no run kept a best)."""
    from llmexp.compare.runs import Run
    from llmexp.compare.table import records

    done = {"stage": "sft", "global_step": 600, "initial": {"val/loss": 2.0}, "final": {"val/loss": 0.5}}
    kept = {**done, "best": {"monitor": "val/task_score", "step": 400, "exported": True}}
    found = {**done, "best": {"monitor": "val/task_score", "step": 200, "exported": False}}
    rows = records([Run(Path(n), s) for n, s in (("a", done), ("b", kept), ("c", found))], [], ["a", "b", "c"])
    assert [(r["steps"], r["model_step"]) for r in rows] == [(600, 600), (600, 400), (600, 600)]
    assert "model_step" not in records([Run(Path("a"), done), Run(Path("c"), found)], [], ["a", "c"])[0]


def test_compare_shows_what_each_runs_model_answered(sweep, tmp_path):
    """answers.md: the trials' recorded greedy answers (answers.jsonl) at their last validation,
    joined by prompt, the prompts they answer differently first."""
    from llmexp.compare.answers import exported_answers, exported_step

    out = tmp_path / "said"
    r = _cli("compare", sweep, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out / "answers.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| prompt")]
    assert len(table) == 8  # task.max_prompts=8, every one recorded
    trials = sorted(p for p in sweep.iterdir() if (p / "answers.jsonl").is_file())
    said = [exported_answers(t, json.loads((t / "summary.json").read_text())) for t in trials]
    differ = sum(1 for p in said[0] if said[0][p][0] != said[1].get(p, (None,))[0])
    assert f"{differ} of 8 prompts answered differently" in md
    assert f"their models answered {differ} of 8 recorded prompts differently (answers.md)" in r.stdout
    first = table[0].split(" | ")
    assert (first[1] != first[2]) == (differ > 0)  # a differing prompt comes first
    assert "[answers.md](answers.md)" in (out / "compare.md").read_text()
    assert exported_step({"global_step": 9, "best": {"step": 4, "exported": True}}) == 4
    assert exported_step({"global_step": 9, "best": {"step": 4, "exported": False}}) == 9


def test_answers_of_runs_asked_other_prompts_are_not_counted_as_different(tmp_path):
    """A chat SFT beside a run on other data: no prompt in common, and compare said "their models
    answered 32 of 32 recorded prompts differently"."""
    from types import SimpleNamespace

    from llmexp.compare.answers import answers_markdown

    runs = []
    for name, asked in (("a", ["Add 1 and 2.", "Sort 3 1."]), ("b", ["Sort 3 1.", "Sort 9 5."])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "answers.jsonl").write_text("".join(
            json.dumps({"step": 4, "prompt": p, "answer": f"{name}:{p}" if p != "Sort 3 1." else "1 3", "score": 1.0})
            + "\n" for p in asked))
        runs.append(SimpleNamespace(path=tmp_path / name, summary={"global_step": 4}))
    md, differ, shared = answers_markdown(runs, ["a", "b"])
    assert (differ, shared) == (0, 1)  # 'Sort 3 1.' alone was asked of both, and answered alike
    assert "0 of 1 prompts answered differently (first); 2 asked of only some runs (last)" in md
    runs[0].path.joinpath("answers.jsonl").write_text(json.dumps({"step": 4, "prompt": "x", "answer": "y",
                                                                  "score": 0.0}) + "\n")
    md, differ, shared = answers_markdown(runs, ["a", "b"])
    assert (differ, shared) == (0, 0) and "no prompt was asked of every run; 3 asked of only some runs" in md
