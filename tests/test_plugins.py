"""Plugins: hooks, entry-point discovery, selection, listing and every way a plugin can be wrong.

The example packages in plugins/ are pip-installed (editable) into this interpreter once; the
broken plugins below are real distributions (a dist-info directory plus a module) put on
PYTHONPATH of a fresh ``python -m llmexp``, discovered like any installed package.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from llmexp.testing import run_cli, run_module
REPO = Path(__file__).resolve().parents[1]
from plugin_packages import PACKAGES, ensure_installed

import llmexp
from llmexp.plugins import hookspecs
from llmexp.plugins.manager import BUILTIN, hook_names


@pytest.fixture(scope="module", autouse=True)
def example_plugins():
    ensure_installed()


def _plugins_json(env: Dict[str, str] | None = None) -> List[dict]:
    r = run_cli(["plugins", "--json"], env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["plugins"]


def test_hookspecs_are_declarations_documenting_calls_results_and_version():
    assert hook_names() == ["llmexp_callbacks", "llmexp_config_dirs", "llmexp_datasets", "llmexp_evals",
                            "llmexp_rewards", "llmexp_tools"]
    for name in hook_names():
        fn = getattr(hookspecs, name)
        assert hasattr(fn, "llmexp_spec"), name
        doc = inspect.getdoc(fn)
        assert "Called:" in doc and "Results: collected" in doc and "Since 0.1." in doc, name
        body = inspect.getsource(fn).split('"""')[-1].strip()
        assert body == "", f"{name} must be a declaration only"
    assert inspect.signature(hookspecs.llmexp_callbacks).parameters.keys() == {"cfg"}


def test_hookimpl_is_exported_for_plugin_authors():
    assert llmexp.hookimpl.project_name == "llmexp"
    from llmexp.plugins import DatasetDeclaration, EvalContext, EvalDeclaration, RewardDeclaration  # noqa: F401


def test_builtin_datasets_and_rewards_register_through_the_hooks():
    from llmexp.data import skill
    from llmexp.plugins.registry import datasets, rewards

    builtin = {n for n, e in datasets().items() if e.owner == BUILTIN}
    assert builtin == {"arithmetic", "arithmetic_text", "arithmetic_pairs", "arithmetic_prompts"}
    assert rewards()["arithmetic_correct"].owner == BUILTIN
    assert rewards()["arithmetic_correct"].declaration.fn("2 + 2 = 4", answer="4") == 1.0
    from llmexp.data.sources import load_raw
    from llmexp.testing import check_config

    run = check_config(["data.options.num_samples=5"])
    assert run.data.options == {"num_samples": 5, "max_operand": 9}  # typed and complete
    rows, _ = load_raw(run.data)
    assert list(rows) == list(skill.chat_examples(num_samples=5, seed=run.data.seed))


def test_installed_plugins_are_listed_with_versions_and_what_they_provide():
    plugins = {p["name"]: p for p in _plugins_json()}
    assert list(plugins)[0] == "llmexp"
    acme, match = plugins["acme_qa"], plugins["answer_match"]
    assert (acme["distribution"], acme["version"], acme["module"]) == ("llmexp-acme-qa", "0.1.0",
                                                                         "llmexp_acme_qa.plugin")
    assert acme["datasets"] == ["acme_qa"] and acme["configs"] == ["data=acme_qa"]
    assert "llmexp_callbacks" in acme["hooks"]
    assert (match["distribution"], match["evals"], match["rewards"]) == ("llmexp-answer-match", ["answer_match"],
                                                                         ["answer_closeness"])
    text = run_module("llmexp.plugins", []).stdout
    assert "acme_qa  [llmexp-acme-qa 0.1.0]  llmexp_acme_qa.plugin" in text
    assert "evals: answer_match" in text and "rewards: answer_closeness" in text


def test_help_lists_plugin_config_options_without_importing_heavy_libraries():
    code = ("import sys\nfrom llmexp.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('torch', 'transformers', 'lightning', 'datasets') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout
    assert "data: acme_qa, arithmetic, arithmetic_pairs, arithmetic_prompts, arithmetic_text, feedback, files, hf" in out
    assert "HEAVY []" in out


def test_plugin_dataset_composes_and_bad_options_exit_2_naming_the_plugin(tmp_path):
    r = run_cli(["data=acme_qa", "data.options.topics=[price]", "--cfg", "job"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "name: acme_qa" in r.stdout and "- price" in r.stdout
    r = run_cli(["data=acme_qa", "data.options.answer_style=long", "data.options.num_sample=3",
                 "+data.options.colour=red"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "data.options.answer_style: 'long' is not one of short, sentence" in r.stderr
    assert "data.options.num_sample: unknown key" in r.stderr and "did you mean 'num_samples'" in r.stderr
    assert "unknown option 'colour' for dataset 'acme_qa' of plugin 'acme_qa' (llmexp-acme-qa 0.1.0)" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_autoload_can_be_disabled_and_plugins_chosen_by_name(tmp_path):
    off = {"LLMEXP_DISABLE_PLUGIN_AUTOLOAD": "1"}
    assert [p["name"] for p in _plugins_json(off)] == ["llmexp"]
    r = run_cli(["data=acme_qa", "--cfg", "job"], env=off, cwd=tmp_path)
    assert r.returncode == 2 and "data=acme_qa: unknown data option" in r.stderr
    assert [p["name"] for p in _plugins_json({"LLMEXP_PLUGINS": "acme_qa"})] == ["llmexp", "acme_qa"]
    assert [p["name"] for p in _plugins_json({**off, "LLMEXP_PLUGINS": " answer_match "})] == ["llmexp",
                                                                                               "answer_match"]
    r = run_cli(["--cfg", "job"], env={"LLMEXP_PLUGINS": "acme"}, cwd=tmp_path)
    assert r.returncode == 2 and "LLMEXP_PLUGINS=acme: no installed plugin" in r.stderr
    assert "did you mean 'acme_qa'" in r.stderr


def test_plugin_callbacks_come_from_the_callbacks_hook():
    from llmexp.plugins import plugin_callbacks
    from llmexp.testing import check_config

    callbacks = plugin_callbacks(check_config(["data=acme_qa", "data.options.sample_questions=2"]))
    assert [type(c).__name__ for c in callbacks] == ["AcmeSamples"] and callbacks[0].num_questions == 2
    assert plugin_callbacks(check_config([])) == []
    assert plugin_callbacks(check_config(["data=acme_qa", "data.options.sample_questions=0"])) == []


# -- broken plugins, as real distributions on PYTHONPATH -----------------------------------------

def _distribution(root: Path, dist: str, version: str, entry: str, source: str, requires=()) -> None:
    module = entry.replace("-", "_") + "_plugin"
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
    (info / "entry_points.txt").write_text(f"[llmexp]\n{entry} = {module}\n")


HOOK = "import llmexp\n\n\n@llmexp.hookimpl\n"
BROKEN = {
    "broken": ("llmexp-broken", "0.3.0", "import llmexp_no_such_dependency\n", ()),
    "typo": ("llmexp-typo", "1.0.0", HOOK + "def llmexp_datsets():\n    return []\n", ()),
    "wrongsig": ("llmexp-wrongsig", "2.0.0", HOOK + "def llmexp_callbacks(cfg, trainer):\n    return []\n", ()),
    "future": ("llmexp-future", "5.0.0", HOOK + "def llmexp_datasets():\n    return []\n",
               ("llmexp>=9.0", "pytest; extra == 'test'")),
}


def _cli_with(root: Path, args: List[str], env: Dict[str, str] | None = None):
    return run_cli(args, cwd=root, env={"PYTHONPATH": str(root), **(env or {})})


def test_a_package_requiring_llmexp_under_another_entry_point_group_is_named(tmp_path):
    """[project.entry-points."llmexp.plugins"]: loaded by nothing, and `llmexp plugins` said nothing;
    a run then said only 'no reward named ... is registered'."""
    (tmp_path / "nogroup_plugin.py").write_text(HOOK + "def llmexp_rewards():\n    return []\n")
    info = tmp_path / "llmexp_nogroup-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llmexp-nogroup\nVersion: 0.1.0\n"
                                   "Requires-Dist: llmexp>=0.1\n")
    (info / "entry_points.txt").write_text("[llmexp.plugins]\nnogroup = nogroup_plugin\n")
    r = _cli_with(tmp_path, ["plugins"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("not loaded: llmexp-nogroup requires llmexp but declares no entry point in the group 'llmexp' (its "
            "groups: llmexp.plugins); fix: [project.entry-points.llmexp]") in r.stdout, r.stdout
    assert "acme_qa" in r.stdout and "not loaded: llmexp-acme-qa" not in r.stdout


def test_broken_plugins_are_all_reported_with_name_and_distribution(tmp_path):
    for entry, (dist, version, source, requires) in BROKEN.items():
        _distribution(tmp_path, dist, version, entry, source, requires)
    for args in (["--cfg", "job"], ["--help"], ["plugins"]):
        r = _cli_with(tmp_path, args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert "4 problems with llmexp plugins" in r.stderr
    err = r.stderr
    assert ("plugin 'broken' (llmexp-broken 0.3.0): failed to import broken_plugin: ModuleNotFoundError: "
            "No module named 'llmexp_no_such_dependency'") in err
    assert "plugin 'typo' (llmexp-typo 1.0.0): implements unknown hook 'llmexp_datsets'" in err
    assert "did you mean 'llmexp_datasets'" in err
    assert "plugin 'wrongsig' (llmexp-wrongsig 2.0.0): wrong hook signature" in err and "'trainer'" in err
    assert "llmexp_callbacks(cfg)" in err  # the fix shows the spec
    assert "plugin 'future' (llmexp-future 5.0.0): supports llmexp >=9.0, but this is llmexp 0.1.0" in err
    assert "LLMEXP_DISABLE_PLUGIN_AUTOLOAD=1" in err
    # Leaving them out makes llmexp usable again.
    r = _cli_with(tmp_path, ["--cfg", "job"], {"LLMEXP_PLUGINS": "acme_qa,answer_match"})
    assert r.returncode == 0, r.stderr


def test_an_import_failure_says_where_and_comes_with_every_other_problem(tmp_path):
    """A plugin raising on import was named without the file and line, even with LLMEXP_TRACEBACK=1
    (only llmexp's frames), and the names another plugin declared twice were said only once the
    broken one was left out."""
    _distribution(tmp_path, "llmexp-keyerr", "0.1.0", "keyerr", "X = {'a': 1}\nY = 2\nZ = X['b']\n")
    copycat = ("from llmexp.plugins import RewardDeclaration\n" + HOOK
               + "def llmexp_rewards():\n    return [RewardDeclaration('arithmetic_correct', lambda c, **_: 0.0)]\n")
    _distribution(tmp_path, "llmexp-copycat", "1.0.0", "copycat", copycat)
    r = _cli_with(tmp_path, ["plugins"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    said = " ".join(r.stderr.split())
    assert "2 problems with llmexp plugins" in said, said
    assert (f"plugin 'keyerr' (llmexp-keyerr 0.1.0): failed to import keyerr_plugin: KeyError: 'b' "
            f"(at {tmp_path / 'keyerr_plugin.py'}:3)") in said, said
    assert "reward 'arithmetic_correct': declared by both llmexp itself (built-in) and plugin 'copycat'" in said
    r = _cli_with(tmp_path, ["plugins"], {"LLMEXP_TRACEBACK": "1"})
    assert r.returncode == 2 and f'File "{tmp_path / "keyerr_plugin.py"}", line 3' in r.stderr, r.stderr[-3000:]
    # a module named in LLMEXP_PLUGINS (not installed): the same, and a whole fix line
    (tmp_path / "loose.py").write_text("import os\nos.environ['NOPE_NOT_SET']\n")
    r = _cli_with(tmp_path, ["plugins"], {"LLMEXP_PLUGINS": "loose"})
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and f"plugin 'loose' (module loose): failed to import: KeyError: 'NOPE_NOT_SET' " \
        f"(at {tmp_path / 'loose.py'}:2)" in said and "fix: fix module loose, or skip plugins" in said, said
    # its own missing dependency named like it (it said "no installed plugin or importable module of that
    # name"), and a syntax error at its line (it was importlib's)
    (tmp_path / "loose.py").write_text("import loose_helpers_missing\n")
    r = _cli_with(tmp_path, ["plugins"], {"LLMEXP_PLUGINS": "loose"})
    assert "No module named 'loose_helpers_missing'" in r.stderr and "no installed plugin" not in r.stderr, r.stderr
    (tmp_path / "loose.py").write_text("x = 1\ny = (\n")
    r = _cli_with(tmp_path, ["plugins"], {"LLMEXP_PLUGINS": "loose"})
    assert "SyntaxError" in r.stderr and f"(at {tmp_path / 'loose.py'}:2)" in r.stderr, r.stderr


def test_a_name_declared_twice_is_an_error_naming_both_plugins(tmp_path):
    copycat = ("from llmexp.plugins import DatasetDeclaration\n" + HOOK
               + "def llmexp_datasets():\n    return [DatasetDeclaration('acme_qa', lambda o, s: [])]\n")
    _distribution(tmp_path, "llmexp-copycat", "1.0.0", "copycat", copycat)
    r = _cli_with(tmp_path, ["--cfg", "job"])
    assert r.returncode == 2
    assert ("dataset 'acme_qa': declared by both plugin 'acme_qa' (llmexp-acme-qa 0.1.0) and "
            "plugin 'copycat' (llmexp-copycat 1.0.0)") in r.stderr

    other = tmp_path / "configs"
    (other / "conf" / "data").mkdir(parents=True)
    (other / "conf" / "data" / "arithmetic.yaml").write_text("name: arithmetic\n")
    shadow = HOOK + f"def llmexp_config_dirs():\n    return [{str(other / 'conf')!r}]\n"
    _distribution(other, "llmexp-shadow", "0.1.0", "shadow", shadow)
    r = _cli_with(other, ["--help"])
    assert r.returncode == 2
    assert ("data=arithmetic: declared by both llmexp itself (built-in) and plugin 'shadow' (llmexp-shadow 0.1.0)"
            in r.stderr)


def test_one_entry_point_name_from_two_distributions_is_an_error(tmp_path):
    for dist in ("llmexp-twin-a", "llmexp-twin-b"):
        root = tmp_path / dist
        root.mkdir()
        _distribution(root, dist, "1.0.0", "twin", "")
    r = run_cli(["--cfg", "job"], cwd=tmp_path,
                env={"PYTHONPATH": f"{tmp_path / 'llmexp-twin-a'}:{tmp_path / 'llmexp-twin-b'}"})
    assert r.returncode == 2
    assert "plugin 'twin': is installed by two distributions: llmexp-twin-a and llmexp-twin-b" in r.stderr


def test_malformed_declarations_name_the_plugin(tmp_path):
    bad = HOOK + "def llmexp_datasets():\n    return [{'name': 'rows'}]\n"
    _distribution(tmp_path, "llmexp-sloppy", "0.0.1", "sloppy", bad)
    r = _cli_with(tmp_path, ["--cfg", "job"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("plugin 'sloppy' (llmexp-sloppy 0.0.1): llmexp_datasets() returned {'name': 'rows'}, "
            "not a DatasetDeclaration") in r.stderr


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_example_package_tests_pass(package):
    r = run_module("pytest", ["-q", "-m", "not slow", "-p", "no:cacheprovider", "tests"], cwd=PACKAGES[package])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


def test_a_module_named_in_LLMEXP_PLUGINS_loads_without_being_installed(tmp_path):
    (tmp_path / "house_rewards.py").write_text(
        "from llmexp.plugins import RewardDeclaration\n" + HOOK
        + "def llmexp_rewards():\n    return [RewardDeclaration('shout', lambda completion, **_: float("
          "completion.isupper()))]\n")
    r = _cli_with(tmp_path, ["plugins", "--json"], {"LLMEXP_PLUGINS": "house_rewards"})
    assert r.returncode == 0, r.stderr
    listing = json.loads(r.stdout)
    assert listing["autoload"] is False and listing["listed"] == ["house_rewards"]
    assert [(p["name"], p["distribution"], p["rewards"]) for p in listing["plugins"]] == [
        ("llmexp", "llmexp", ["arithmetic_continues", "arithmetic_correct", "reference_match"]), ("house_rewards", None, ["shout"])]


def test_a_typo_in_a_plugins_config_file_names_the_file(tmp_path):
    """data.val_fracton in a plugin's data/<option>.yaml was said as if typed on the command line."""
    (tmp_path / "conf" / "data").mkdir(parents=True)
    typo = tmp_path / "conf" / "data" / "typo_data.yaml"
    typo.write_text("name: arithmetic\noptions: {num_samples: 400, max_operand: 9}\nval_fracton: 0.1\n")
    (tmp_path / "typo_cfg.py").write_text(HOOK + f"def llmexp_config_dirs():\n    return [{str(tmp_path / 'conf')!r}]\n")
    r = _cli_with(tmp_path, ["data=typo_data", f"hydra.run.dir={tmp_path / 'run'}"], {"LLMEXP_PLUGINS": "typo_cfg"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"data.val_fracton: unknown key (set in {typo})" in r.stderr and "did you mean 'val_fraction'" in r.stderr
    assert not (tmp_path / "run").exists()
    # an inline option's typo names its file; another group's key the file does not set is not blamed on it
    typo.write_text("name: arithmetic\noptions: {num_sampels: 400, max_operand: 9}\nseed: 3\n")
    (tmp_path / "conf" / "experiment").mkdir()
    exp = tmp_path / "conf" / "experiment" / "mine.yaml"
    exp.write_text("# @package _global_\ntrainer:\n  seed: abc\n")
    r = _cli_with(tmp_path, ["data=typo_data", "experiment=mine", f"hydra.run.dir={tmp_path / 'run'}"],
                  {"LLMEXP_PLUGINS": "typo_cfg"})
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and f"unknown option 'num_sampels' for dataset 'arithmetic' (set in {typo})" in said, said
    assert f"trainer.seed: expected an integer, got 'abc' (set in {exp})" in said, said


def test_exceptions_in_plugin_code_name_the_plugin(tmp_path):
    raiser = HOOK + "def llmexp_rewards():\n    raise RuntimeError('no rewards today')\n"
    _distribution(tmp_path, "llmexp-raiser", "0.2.0", "raiser", raiser)
    boom = ("from llmexp.plugins import DatasetDeclaration\n" + HOOK
            + "def llmexp_datasets():\n    return [DatasetDeclaration('boom', _build)]\n\n\n"
              "def _build(options, seed):\n    raise RuntimeError('disk on fire')\n")
    _distribution(tmp_path, "llmexp-boom", "0.2.0", "boom", boom)
    for args in (["plugins"], ["--cfg", "job"]):  # a raising hook is refused by every command alike
        r = _cli_with(tmp_path, args)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert ("plugin 'raiser' (llmexp-raiser 0.2.0): llmexp_rewards() raised RuntimeError: no rewards today"
                in r.stderr)
    r = _cli_with(tmp_path, ["data.name=boom", "~data.options", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
                  {"LLMEXP_PLUGINS": "boom"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    # the builder named, with where in the plugin it raised
    assert ("data.name: dataset 'boom' of plugin 'boom' (llmexp-boom 0.2.0): _build() failed: "
            "RuntimeError: disk on fire (at ") in r.stderr and "boom_plugin.py:" in r.stderr, r.stderr
    (tmp_path / "boom_plugin.py").write_text(boom.replace("raise RuntimeError('disk on fire')", "return None"))
    r = _cli_with(tmp_path, ["data.name=boom", "~data.options", "logger=none", f"hydra.run.dir={tmp_path / 'run2'}"],
                  {"LLMEXP_PLUGINS": "boom"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "_build() returned None; fix: return the rows (a list or iterator of dicts) or a datasets.Dataset" in r.stderr
    # not rows at all, and rows no table holds (pyarrow said "Could not convert 'q' with type str")
    for built, said in (("42", "_build() returned int; fix: return the rows"),
                        ("[{'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 5}]}] * 9",
                         "_build() made rows that do not fit one table: row 1 messages[1].content is a number, but "
                         "text at row 1 messages[0].content")):
        (tmp_path / "boom_plugin.py").write_text(boom.replace("raise RuntimeError('disk on fire')", f"return {built}"))
        r = _cli_with(tmp_path, ["data.name=boom", "~data.options", "logger=none",
                                 f"hydra.run.dir={tmp_path / 'run3'}"], {"LLMEXP_PLUGINS": "boom"})
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert said in " ".join(r.stderr.split()), r.stderr


def test_a_plugin_callback_that_raises_in_training_is_named_with_its_hook_and_line(tmp_path):
    """It gave Lightning's traceback and exit 1, naming no plugin."""
    source = ("from lightning.pytorch.callbacks import Callback\n\n\n"
              "class Boom(Callback):\n"
              "    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):\n"
              "        if trainer.global_step == 2:\n"
              "            raise RuntimeError('callback broke')\n\n\n"
              + HOOK + "def llmexp_callbacks(cfg):\n    return [Boom()]\n")
    _distribution(tmp_path, "llmexp-cbraise", "0.1.0", "cbraise", source)
    r = _cli_with(tmp_path, ["logger=none", "trainer.max_steps=4", "trainer.progress_bar=false",
                             "trainer.checkpoint_every_n_steps=1", f"hydra.run.dir={tmp_path / 'run'}"],
                  {"LLMEXP_PLUGINS": "cbraise"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    said = " ".join(r.stderr.split())
    assert ("plugin 'cbraise' (llmexp-cbraise 0.1.0): its callback Boom.on_train_batch_end() raised RuntimeError: "
            "callback broke (at ") in said and "cbraise_plugin.py:7)" in said, said
    # and where the run stands: the checkpoint a resume continues from, once the callback is fixed
    assert (f"stopped at step 2; its last checkpoint ({tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}, step 1) "
            f"is kept: continue with the same overrides and resume={tmp_path / 'run'}") in said, said
