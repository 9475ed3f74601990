"""Fixtures only: offline environment, a per-session cache, and the trained models several test
files share (each trained once per session, also across pytest-xdist workers). The helpers
tests share (compose, typed, run_cli, train, FAST) are llmexp.testing's, the module plugin
authors use."""

from __future__ import annotations

import os
import shutil
import traceback
from pathlib import Path
from typing import Callable, Tuple

import pytest

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # One intra-op thread per worker (before torch is imported here or in the commands it forks):
    # the tiny models gain little from a second thread, and two workers of two threads each
    # oversubscribe the cores (measured on the 2-core machine: a 200-step SFT 13.9 s with two
    # threads, 11.2 s with one, and two one-thread runs side by side 11.5 s each).
    os.environ["OMP_NUM_THREADS"] = "1"

from llmexp.testing import OFFLINE_ENV  # noqa: E402

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
_ENV_AT_START = dict(os.environ)


@pytest.fixture(autouse=True)
def _environment_as_at_start():
    """Undo what a test's in-process run left in os.environ (Lightning's PL_GLOBAL_SEED, a DDP
    launcher's OMP_NUM_THREADS, ...): later tests, and the commands they fork, see the same one.
    pytest's own PYTEST_* and the session's LLMEXP_CACHE stay."""
    yield
    for key in set(os.environ) - set(_ENV_AT_START):
        if not key.startswith("PYTEST_") and key != "LLMEXP_CACHE":
            del os.environ[key]
    for key, value in _ENV_AT_START.items():
        if os.environ.get(key) != value and not key.startswith("PYTEST_"):
            os.environ[key] = value


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory, request) -> Path:
    """A directory every xdist worker of this session shares (the session's temp dir without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if hasattr(request.config, "workerinput") else base


@pytest.fixture(autouse=True, scope="session")
def _llmexp_cache(shared_tmp):
    cache = shared_tmp / "llmexp-cache"
    cache.mkdir(exist_ok=True)
    os.environ["LLMEXP_CACHE"] = str(cache)


def once(shared: Path, name: str, build: Callable[[Path], None]) -> Path:
    """``build(shared/name)`` runs once per session: the first worker to ask builds it, the others
    wait on a lock and reuse it (a failed build fails every test that asks, with its message)."""
    from filelock import FileLock

    path, done, failed = shared / name, shared / f"{name}.done", shared / f"{name}.failed"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists() and not failed.exists():
            try:
                build(path)
            except BaseException:
                failed.write_text(traceback.format_exc())
                raise
            done.write_text("")
    if failed.exists():
        pytest.fail(f"building the shared {name!r} failed:\n{failed.read_text()[-3000:]}")
    return path


@pytest.fixture(scope="session")
def build_once(shared_tmp) -> Callable[[str, Callable[[Path], None]], Path]:
    """``build_once(name, build)``: the directory ``build`` made, built once per session (see once)."""
    return lambda name, build: once(shared_tmp, name, build)


def _llmexp(run_dir: Path, *args: str) -> None:
    from llmexp.testing import run_cli

    r = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def _pipeline(root: Path, name: str, first_stage: Path) -> None:
    """``llmexp pipeline NAME --dir root`` with its first stage already run (``first_stage``, a run
    of exactly that stage's overrides: the pipeline checks them and keeps it); the printed output
    is saved as root/printed.txt."""
    from llmexp.testing import run_cli

    root.mkdir(parents=True)
    shutil.copytree(first_stage, root / "1-sft")
    r = run_cli(["pipeline", name, "--dir", str(root)], cwd=root.parent, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sft: finished before, kept" in r.stdout, r.stdout[-2000:]
    (root / "printed.txt").write_text(r.stdout)


def _save_tiny_teacher(path: Path) -> None:
    import torch

    from llmexp.models.build import build_model
    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.testing import typed

    tokenizer = load_tokenizer(None, None, [], False)
    torch.manual_seed(1)
    model = build_model(typed(["stage=sft"]).model, tokenizer)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


@pytest.fixture(scope="session")
def calculator_sft(shared_tmp) -> Path:
    """A directory with sft/, the default model taught to call llmexp's calculator tool, and
    prompts.jsonl (tests/tool_traces.py)."""
    from tool_traces import build_calculator_sft

    return once(shared_tmp, "calculator-sft", build_calculator_sft)


@pytest.fixture(scope="session")
def tiny_teacher(shared_tmp) -> Path:
    """An untrained default llama with the bundled tokenizer, saved as a model directory: a
    teacher for stage=distill tests that check arithmetic, not learning."""
    return once(shared_tmp, "tiny-teacher", _save_tiny_teacher)


@pytest.fixture(scope="session")
def default_sft(shared_tmp) -> Path:
    """`python -m llmexp` as the README says (logger=csv, and stage=sft as the rlhf pipeline names
    it): the default SFT run directory."""
    return once(shared_tmp, "default-sft", lambda d: _llmexp(d, "logger=csv", "stage=sft"))


@pytest.fixture(scope="session")
def short_sft(shared_tmp) -> Path:
    """The 200-step SFT the shipped post-training pipelines start with."""
    return once(shared_tmp, "short-sft-200", lambda d: _llmexp(d, "logger=csv", "stage=sft", "experiment=sft_short"))


@pytest.fixture(scope="session")
def rlhf_pipeline(shared_tmp, default_sft) -> Path:
    """`llmexp pipeline rlhf`: the default SFT, a reward model from it, PPO against that."""
    return once(shared_tmp, "rlhf-pipeline", lambda root: _pipeline(root, "rlhf", default_sft))


@pytest.fixture(scope="session")
def distill_pipeline(shared_tmp, default_sft) -> Path:
    """`llmexp pipeline distill`: the default SFT as the teacher of a half-width student, then
    the student in int8."""
    return once(shared_tmp, "distill-pipeline", lambda root: _pipeline(root, "distill", default_sft))


@pytest.fixture(scope="session")
def half_width_sft(shared_tmp) -> Path:
    """The distill pipeline's student (hidden 32, MLP 128) trained by plain SFT for the same
    steps at the lr it learns best with, 3e-3: what distillation has to beat. (Over five seeds
    0.912; 0.860 at distill's 2e-3; at stage=sft's own 1e-3, tuned for the default model, 0.57.)"""
    return once(shared_tmp, "half-width-sft", lambda d: _llmexp(d, "logger=csv", "stage=sft", "model.hidden_size=32",
                                                                 "model.intermediate_size=128", "optim.lr=3e-3"))


@pytest.fixture(scope="session")
def shipped_pipeline(shared_tmp, short_sft) -> Callable[[str], Tuple[Path, str]]:
    """``shipped_pipeline(name)``: `llmexp pipeline <name>` from the 200-step SFT (dpo, kto, grpo,
    rloo, online_dpo), built once per session: (its directory, what it printed)."""

    def build(name: str) -> Tuple[Path, str]:
        root = once(shared_tmp, f"{name}-pipeline", lambda r: _pipeline(r, name, short_sft))
        return root, (root / "printed.txt").read_text()

    return build


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (the default, pyproject.toml): one worker per core, at most 4 (each worker forks
    2- and 4-process distributed runs, and holds a forkserver with torch imported)."""
    return max(1, min(os.cpu_count() or 1, 4))


# Longest first, so that parallel workers start the long chains (the shared SFT runs and the
# pipelines built on them) at once and the short tests fill in around them. test_compile.py before
# test_sampler.py: the sampler's compiled decode step reuses inductor's kernels of the compiled
# model on disk (10 s where it ran after, 21-23 s where it ran first).
_LONGEST_FIRST = ("test_post_training.py", "test_serving.py", "test_strategies.py", "test_compression.py",
                  "test_data_scale.py", "test_resume.py", "test_pipeline.py", "test_compile.py", "test_sampler.py",
                  "test_plugins_e2e.py", "test_sweeps.py", "test_fault_injection.py", "test_evals.py", "test_e2e.py")


def pytest_collection_modifyitems(config, items) -> None:
    def rank(item) -> int:
        name = item.path.name
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
