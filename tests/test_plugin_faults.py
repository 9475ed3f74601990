"""Faults of plugins and of their users, found by an outside test (issue 16): each is refused with
one message naming the plugin (distribution and version), what is wrong and the fix; exit code 2,
no traceback unless LLMEXP_TRACEBACK=1.

Broken plugins are real distributions (a dist-info directory plus a module) put on PYTHONPATH of a
fresh ``python -m llmexp``; the in-process checks load a real module through LLMEXP_PLUGINS.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from plugin_packages import ensure_installed

from llmexp.errors import ConfigError
from llmexp.plugins import manager
from llmexp.plugins.errors import PluginError
from llmexp.testing import OFFLINE_ENV, check_config, run_cli

HEAD = "import llmexp\nfrom llmexp.plugins import DatasetDeclaration, EvalDeclaration, RewardDeclaration\n\n\n"


@pytest.fixture(scope="module", autouse=True)
def example_plugins():
    ensure_installed()


@pytest.fixture
def module_plugin(monkeypatch, tmp_path):
    """Load ``name`` (a module written to tmp_path) as a plugin of this process, next to answer_match."""
    def load(name: str, source: str) -> Path:
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setenv("LLMEXP_PLUGINS", f"{name},answer_match")
        manager.reset()
        return path

    yield load
    manager.reset()


def _distribution(root: Path, dist: str, version: str, entry: str, source: str) -> Path:
    """An installed distribution ``dist`` whose ``llmexp`` entry point ``entry`` is a one-file module."""
    root.mkdir(parents=True, exist_ok=True)
    module = f"{entry}_plugin"
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[llmexp]\n{entry} = {module}\n")
    return root / f"{module}.py"


def _cli_with(root: Path, args: List[str], env: Dict[str, str] | None = None):
    return run_cli(args, cwd=root, env={"PYTHONPATH": str(root), **(env or {})})


def _line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def _problems(stderr: str) -> List[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith(("  - ", "      fix: "))]


# -- 1. a hook-named function without @llmexp.hookimpl ---------------------------------------------

def test_hook_named_functions_without_hookimpl_are_refused_naming_plugin_function_and_fix(tmp_path):
    source = (HEAD + "def llmexp_datasets():\n    return [DatasetDeclaration('qa', lambda o, s: [])]\n\n\n"
              "def llmexp_register_dataset():\n    return []\n\n\ndef helper():\n    return 1\n")
    module = _distribution(tmp_path, "llmexp-forgetful", "1.2.0", "forgetful", source)
    for args in (["plugins"], ["--cfg", "job"]):
        r = _cli_with(tmp_path, args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "2 problems with llmexp plugins" in r.stderr
        assert (f"plugin 'forgetful' (llmexp-forgetful 1.2.0): function llmexp_datasets() ({module}:"
                f"{_line_of(module, 'def llmexp_datasets')}) is not marked @llmexp.hookimpl, so llmexp would "
                "never call it\n      fix: mark it @llmexp.hookimpl") in r.stderr
        assert ("plugin 'forgetful' (llmexp-forgetful 1.2.0): function llmexp_register_dataset() "
                f"({module}:{_line_of(module, 'def llmexp_register_dataset')}) is named like a hook") in r.stderr
        assert "fix: did you mean 'llmexp_datasets'?" in r.stderr and "mark it @llmexp.hookimpl" in r.stderr
        assert "helper()" not in r.stderr  # names not starting with llmexp_ are the plugin's own
    r = _cli_with(tmp_path, ["--cfg", "job"], {"LLMEXP_PLUGINS": "acme_qa"})  # left out, llmexp works
    assert r.returncode == 0, r.stderr


# -- 2. a plugin eval option with a typo -----------------------------------------------------------

AM = "eval 'answer_match' of plugin 'answer_match' (llmexp-answer-match 0.1.0)"
VALID = "(valid: dataset, max_new_tokens, num_samples, seed)"


def test_eval_option_typo_is_refused_up_front_naming_key_plugin_and_options(tmp_path):
    r = run_cli(["eval.name=answer_match", "eval.options.num_sampels=3", "--cfg", "job"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"eval.options.num_sampels: unknown key: not an option of {AM}" in r.stderr
    assert f"fix: did you mean 'num_samples'? {VALID}" in r.stderr
    assert "+eval.options" not in r.stderr  # a typo is never to be added as a new key
    r = run_cli(["eval.name=answer_match", "+eval.options.num_sampels=3", "--cfg", "job"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"eval.options: unknown option 'num_sampels' for {AM}" in r.stderr
    assert f"fix: did you mean 'num_samples'? {VALID}" in r.stderr and "+eval.options" not in r.stderr
    # A run is refused by the same check before anything starts: no run directory is made.
    r = run_cli(["eval.name=answer_match", "+eval.options.num_sampels=3", "logger=none",
                 f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2 and f"eval.options: unknown option 'num_sampels' for {AM}" in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
    # A declared option needs no '+', and its value is typed.
    r = run_cli(["eval.name=answer_match", "eval.options.num_samples=3", "--cfg", "job"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "  options:\n    num_samples: 3\n" in r.stdout


def test_eval_options_are_checked_by_the_config_check():
    with pytest.raises(ConfigError) as e:
        check_config(["eval.name=answer_match", "+eval.options.max_new_token=3", "+eval.options.seed=x"])
    text = str(e.value)
    assert "2 problems in the configuration" in text
    assert f"eval.options: unknown option 'max_new_token' for {AM}" in text
    assert "did you mean 'max_new_tokens'?" in text
    assert "eval.options.seed: expected an integer, got 'x'" in text
    with pytest.raises(ConfigError, match=r"eval.options: eval=lm_eval takes no options \(got limit\)"):
        check_config(["eval=lm_eval", "+eval.options.limit=3"])
    assert check_config(["eval.name=answer_match", "eval.options.seed=7"]).eval.options == {"seed": 7}


# -- 3. a name clash with llmexp's own -------------------------------------------------------------

def test_a_clash_with_llmexp_is_the_same_problem_everywhere_and_never_says_uninstall_llmexp(tmp_path):
    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True)
    (conf / "arithmetic.yaml").write_text("name: arithmetic\n")
    source = (HEAD + "@llmexp.hookimpl\ndef llmexp_datasets():\n    return [DatasetDeclaration('arithmetic', "
              "lambda o, s: [])]\n\n\n@llmexp.hookimpl\ndef llmexp_evals():\n    return [EvalDeclaration("
              "'answer_match', lambda ctx: {})]\n\n\n@llmexp.hookimpl\ndef llmexp_config_dirs():\n"
              f"    return [{str(tmp_path / 'conf')!r}]\n")
    _distribution(tmp_path, "llmexp-clash", "0.1.0", "clash", source)
    seen = []
    for args in (["plugins"], ["--cfg", "job"], ["--help"], ["stage=dpo", "data=arithmetic_pairs", "--cfg", "job"]):
        r = _cli_with(tmp_path, args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert "3 problems with llmexp plugins" in r.stderr
        seen.append(_problems(r.stderr))
    assert all(s == seen[0] for s in seen), seen  # one text, whichever command meets it
    text = "\n".join(seen[0])
    clash = "plugin 'clash' (llmexp-clash 0.1.0)"
    disable = "or disable plugin 'clash': LLMEXP_PLUGINS=acme_qa,answer_match (every loaded plugin but 'clash')"
    assert (f"  - dataset 'arithmetic': declared by both llmexp itself (built-in) and {clash}\n"
            f"      fix: rename the plugin's DatasetDeclaration('arithmetic', ...) (in llmexp-clash), {disable}"
            ) in text
    assert (f"  - data=arithmetic: declared by both llmexp itself (built-in) and {clash}\n"
            f"      fix: rename the plugin's config file data/arithmetic.yaml (in llmexp-clash), {disable}") in text
    assert (f"  - eval 'answer_match': declared by both plugin 'answer_match' (llmexp-answer-match 0.1.0) and "
            f"{clash}\n      fix: uninstall one of them") in text  # two plugins: either may go
    assert text.count("uninstall") == 1
    r = _cli_with(tmp_path, ["plugins"], {"LLMEXP_PLUGINS": "clash"})
    assert r.returncode == 2
    assert "or disable plugin 'clash': LLMEXP_DISABLE_PLUGIN_AUTOLOAD=1 with LLMEXP_PLUGINS unset" in r.stderr


# -- 4. an exception in plugin code: where it was raised -------------------------------------------

def test_a_raising_hook_names_its_file_and_line_and_keeps_its_traceback(tmp_path):
    source = HEAD + "@llmexp.hookimpl\ndef llmexp_rewards():\n    return [_reward()]\n\n\n" \
                    "def _reward():\n    raise RuntimeError('no rewards today')\n"
    module = _distribution(tmp_path, "llmexp-raiser", "0.2.0", "raiser", source)
    line = _line_of(module, "raise RuntimeError")
    r = _cli_with(tmp_path, ["--cfg", "job"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (f"plugin 'raiser' (llmexp-raiser 0.2.0): llmexp_rewards() raised RuntimeError: no rewards today "
            f"(at {module}:{line})") in r.stderr
    assert "set LLMEXP_TRACEBACK=1 for the full traceback" in r.stderr
    r = _cli_with(tmp_path, ["--cfg", "job"], {"LLMEXP_TRACEBACK": "1"})
    assert r.returncode == 2
    assert f'File "{module}", line {line}, in _reward' in r.stderr  # the plugin's own frames
    assert f'File "{module}", line {_line_of(module, "return [_reward()]")}, in llmexp_rewards' in r.stderr
    assert "The above exception was the direct cause of the following exception" in r.stderr
    assert r.stderr.rstrip().splitlines()[-2].startswith("  - plugin 'raiser' (llmexp-raiser 0.2.0)")


def test_a_raising_eval_names_its_file_and_line_and_chains_the_exception(module_plugin):
    from llmexp.plugins.evaluation import run_eval

    path = module_plugin("faulty_eval_plugin", HEAD + "@llmexp.hookimpl\ndef llmexp_evals():\n"
                         "    return [EvalDeclaration('faulty', _run)]\n\n\ndef _run(ctx):\n    return {'x': 1 / 0}\n")
    with pytest.raises(PluginError) as e:
        run_eval("faulty", model=None, tokenizer=None)
    assert str(e.value) == (
        "1 problem with llmexp plugins:\n  - plugin 'faulty_eval_plugin' (module faulty_eval_plugin): eval 'faulty' "
        f"failed: ZeroDivisionError: division by zero (at {path}:{_line_of(path, '1 / 0')})\n"
        "      fix: fix the eval where it raised (LLMEXP_TRACEBACK=1 shows the traceback), or report it to the "
        "plugin's authors")
    assert isinstance(e.value.__cause__, ZeroDivisionError)


# -- 5. rows that do not have the declared columns -------------------------------------------------

def test_rows_unlike_the_declared_columns_name_plugin_dataset_and_both_column_lists(tmp_path):
    source = (HEAD + "@llmexp.hookimpl\ndef llmexp_datasets():\n    return [DatasetDeclaration('qa', _rows, "
              "columns=('messages',))]\n\n\ndef _rows(options, seed):\n    for _ in range(40):\n"
              "        yield {'msgs': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]}\n")
    _distribution(tmp_path, "llmexp-cols", "0.4.0", "cols", source)
    r = _cli_with(tmp_path, ["data.name=qa", "~data.options", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
                  {"LLMEXP_PLUGINS": "cols"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert ("plugin 'cols' (llmexp-cols 0.4.0): dataset 'qa' declares columns (messages), but row 1 has columns "
            "(msgs): missing messages; undeclared msgs") in r.stderr
    assert "fix: make the builder's rows have exactly the declared columns" in r.stderr


def test_a_built_dataset_unlike_the_declared_columns_is_refused(module_plugin):
    from llmexp.plugins.registry import datasets

    module_plugin("columns_plugin", HEAD + "@llmexp.hookimpl\ndef llmexp_datasets():\n    return [\n"
                  "        DatasetDeclaration('table', _table, columns=('prompt', 'answer')),\n"
                  "        DatasetDeclaration('good', lambda o, s: [{'prompt': 'p', 'answer': '1'}], "
                  "columns=('prompt', 'answer')),\n    ]\n\n\n"
                  "def _table(options, seed):\n    from datasets import Dataset\n\n"
                  "    return Dataset.from_list([{'prompt': 'p', 'answer': '1', 'id': 3}])\n")
    entries = datasets()
    with pytest.raises(PluginError) as e:
        entries["table"].declaration.builder(None, 0)
    assert ("plugin 'columns_plugin' (module columns_plugin): dataset 'table' declares columns (answer, prompt), "
            "but the Dataset it built has columns (answer, id, prompt): undeclared id") in str(e.value)
    assert entries["good"].declaration.builder(None, 0) == [{"prompt": "p", "answer": "1"}]


# -- an eval that raises after training ----------------------------------------------------------

def test_an_eval_failing_after_training_keeps_the_trained_model_and_says_how_to_evaluate_it(tmp_path, monkeypatch):
    """Raised at the end of fit, it lost the export of a finished run (model/, summary.json); the
    one command it names then evaluates the run's model with the run's eval options."""
    def source(body: str) -> str:
        return (HEAD + "from dataclasses import dataclass\n\n\n@dataclass\nclass Options:\n    scale: int = 2\n\n\n"
                "@llmexp.hookimpl\ndef llmexp_evals():\n    return [EvalDeclaration('layers', _run, Options)]\n\n\n"
                f"def _run(ctx):\n{body}")

    module = _distribution(tmp_path, "llmexp-layers", "0.3.0", "layers",
                           source("    return {'n': ctx.model.config.num_hidden_layers * ctx.options.scale / 0}\n"))
    run_dir = tmp_path / "run"
    env = {"LLMEXP_PLUGINS": "layers"}
    r = _cli_with(tmp_path, ["logger=none", "trainer.progress_bar=false", "trainer.max_steps=4", "task.max_prompts=4",
                             "eval.name=layers", "eval.options.scale=5", "eval.before_training=false",
                             f"hydra.run.dir={run_dir}"], env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"eval 'layers' failed: ZeroDivisionError: division by zero (at {module}:" in r.stderr
    assert (f"The run trained and is recorded (its model: {run_dir / 'model'}; summary.json has eval_error). Once the "
            f"eval is fixed, evaluate the model without training it again: python -m llmexp.eval {run_dir}") in r.stderr
    assert "4 steps in" in r.stdout + r.stderr  # the run's result was printed
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["global_step"] == 4 and "ZeroDivisionError" in s["eval_error"] and "eval" not in s
    assert (run_dir / "model" / "config.json").is_file()

    module.write_text(source("    return {'n': ctx.model.config.num_hidden_layers * ctx.options.scale}\n"))
    from llmexp.testing import run_module

    r = run_module("llmexp.eval", [str(run_dir)], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), **env})
    assert r.returncode == 0, r.stderr[-3000:]
    layers = json.loads((run_dir / "model" / "config.json").read_text())["num_hidden_layers"]
    # the run's eval with the run's options (scale 5, not the default 2)
    assert json.loads((run_dir / "eval" / "results.json").read_text()) == {"layers": {"n": layers * 5.0}}
    # and the run's record has it now (compare and sweeps read summary.json; it kept eval_error for good)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["eval"] == {"layers": {"n": layers * 5.0}} and s["eval_results"] == str(run_dir / "eval" / "results.json")
    assert "eval_error" not in s and "ZeroDivisionError" in s["eval_failed_after_training"]
    # Evaluated again (here in-process), with other tasks: the results recorded before are kept.
    from llmexp.evals.__main__ import main

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LLMEXP_PLUGINS", "layers")
    manager.reset()
    try:
        assert main([str(run_dir), "--tasks", "layers"]) == 0
    finally:
        manager.reset()
    assert json.loads((run_dir / "eval" / "results.json").read_text()) == {"layers": {"n": layers * 5.0}}
    # and the run's record has it now (compare and sweeps read summary.json; it kept eval_error for good)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["eval"] == {"layers": {"n": layers * 5.0}} and s["eval_results"] == str(run_dir / "eval" / "results.json")
    assert "eval_error" not in s and "ZeroDivisionError" in s["eval_failed_after_training"]
    assert json.loads((run_dir / "eval" / "results-2.json").read_text()) == {"layers": {"n": layers * 2.0}}


# -- python -m llmexp.eval --tasks runs plugin evals -----------------------------------------------

def test_llmexp_eval_tasks_run_plugin_evals_by_name(tmp_path):
    source = (HEAD + "from dataclasses import dataclass\n\n\n@dataclass\nclass Options:\n    scale: int = 2\n\n\n"
              "@llmexp.hookimpl\ndef llmexp_evals():\n    return [EvalDeclaration('sizes', _run, Options)]\n\n\n"
              "def _run(ctx):\n    return {'vocab': len(ctx.tokenizer) * ctx.options.scale,\n"
              "            'layers': ctx.model.config.num_hidden_layers, 'has_dir': float(ctx.run_dir is not None)}\n")
    _distribution(tmp_path, "llmexp-sizes", "1.0.0", "sizes", source)
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(tmp_path), "LLMEXP_PLUGINS": "sizes"}
    model = tmp_path / "model"
    code = ("import sys\nfrom transformers import LlamaConfig, LlamaForCausalLM\n"
            "from llmexp.models.tokenizer import load_tokenizer\n"
            "tok = load_tokenizer(None, None)\n"
            "cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
            "                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)\n"
            "LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])\ntok.save_pretrained(sys.argv[1])\n"
            "print(len(tok))\n")
    made = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, env=env)
    assert made.returncode == 0, made.stderr[-2000:]
    vocab = int(made.stdout.split()[-1])
    eval_cmd = [sys.executable, "-m", "llmexp.eval", str(model)]
    r = subprocess.run([*eval_cmd, "--tasks", "sizez"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "--tasks: unknown task 'sizez'" in r.stderr and "did you mean 'sizes'" in r.stderr
    r = subprocess.run([*eval_cmd, "--tasks", "sizes", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results == {"sizes": {"vocab": 2.0 * vocab, "layers": 1.0, "has_dir": 1.0}}
    assert re.search(r"results: .*out/results\.json", r.stdout)
