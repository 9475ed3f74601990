"""`python -m llmexp` and the `llmexp` console script: Hydra's CLI with llmexp's error handling.

The overrides are checked first (llmexp.overrides, then llmexp.preflight), so every problem is
reported at once with exit code 2; heavy libraries are imported only once a run starts. ``--help``
is llmexp's own (llmexp.help: the composed config with each key's help); ``--hydra-help`` Hydra's.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from llmexp.errors import UserError, quiet_exits, report
from llmexp.help import HELP_FLAGS, help_text
from llmexp.commands import SUBCOMMANDS
from llmexp.multirun import is_multirun, refuse_a_sweep_without_m, sweep_args
from llmexp.overrides import resolve_overrides, split_overrides
from llmexp.paths import config_dir, config_groups
from llmexp.run_lock import distributed_child


# Flags after which Hydra only prints help or information: no need to check overrides.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc"}
# Hydra's modes: one at a time (Hydra raises a ValueError with a traceback for two).
_MODE_FLAGS = {"-m": "-m", "--multirun": "-m", "--cfg": "--cfg", "-c": "--cfg", "--run": "--run", "-r": "--run",
               "--info": "--info", "-i": "--info", "--shell-completion": "--shell-completion",
               "-sc": "--shell-completion"}


def check_one_mode(argv: List[str]) -> None:
    """-m (a sweep of several runs) with --cfg, --info or --run is refused with the fix."""
    modes = list(dict.fromkeys(_MODE_FLAGS[a] for a in argv if a in _MODE_FLAGS))
    if len(modes) > 1:
        example = " ".join(a for a in argv if a not in _MODE_FLAGS and "," not in a and a not in ("job", "hydra", "all"))
        raise UserError(f"{' and '.join(modes)}: Hydra takes one mode at a time; -m runs a sweep of several runs, "
                        f"--cfg and --info show one run's config. To see one run's config, drop -m and give one value "
                        f"per key (python -m llmexp {example + ' ' if example else ''}--cfg job); to run the sweep, "
                        f"drop {' '.join(m for m in modes if m != '-m')}")


def run_dir_overrides(cfg, overrides: List[str]) -> List[str]:
    """``hydra.run.dir=...`` for a resumed run (it continues in its own directory) and for a run
    under torchrun/srun (all ranks share one directory)."""
    from llmexp.resume import resume_run_dir

    from llmexp.launch import shared_run_dir

    explicit = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")), None)
    run_dir = resume_run_dir(cfg.get("resume"), explicit, str(cfg.run_name)) or shared_run_dir(str(cfg.run_name))
    return [f"hydra.run.dir={run_dir}"] if run_dir and not explicit else []


def named_after_the_weights(cfg, overrides: List[str]) -> List[str]:
    """``model.name=<type>`` when model.pretrained is a local directory of another model type than
    the model option left at its default: a Qwen2's or a Gemma's run was "sft-llama" (its directory,
    summary.json's model, the served model's id)."""
    from llmexp.models.build import local_model_type

    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    pretrained = cfg.model.get("pretrained")
    if given & {"model", "model.name"} or not pretrained:
        return []
    found = local_model_type(pretrained)
    return [f"model.name={found}"] if found and found != cfg.model.name else []


_JOBS_STARTED: List[int] = []  # the runs this command started: Hydra's -m trains its jobs one after another


def _task(cfg) -> Optional[float]:
    try:
        from llmexp.run import run

        # The command's first run began when the command did (its imports are part of the wait, in
        # wall_seconds and seconds_to_first_step); a later job of -m when it starts.
        started = None if _JOBS_STARTED else process_started()
        _JOBS_STARTED.append(1)
        return run(cfg, started=started)
    except UserError as e:
        from llmexp.run import Interrupted

        if isinstance(e, Interrupted) and distributed_child():  # rank 0 says where the run stands, once
            sys.exit(e.exit_code)
        sys.exit(report(e))


def process_started() -> float:
    """When this process started, to a clock tick on Linux (psutil's create_time counts from the boot
    time in whole seconds: up to a second early)."""
    import os
    import time

    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: ticks after boot
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        import psutil

        return psutil.Process().create_time()


@quiet_exits
def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:
        import importlib

        module, function = SUBCOMMANDS[argv[0]].split(":")
        sys.exit(getattr(importlib.import_module(module), function)(argv[1:]))
    try:
        check_one_mode(argv)
        groups = config_groups()  # loads the plugins: a broken one is reported for --help too
        if HELP_FLAGS.intersection(argv):
            print(help_text(groups, argv), end="")
            return
        if not _INFO_FLAGS.intersection(argv):
            overrides = split_overrides(argv)
            cfg, as_hydra = resolve_overrides(overrides)
            rewritten = dict(zip(overrides, as_hydra))
            renamed = named_after_the_weights(cfg, overrides)
            if renamed:  # the run's name (and so resume=auto's and -m's directories) follows it
                cfg.model.name = renamed[0].split("=", 1)[1]
            argv = [rewritten.get(a, a) for a in argv] + renamed + run_dir_overrides(cfg, overrides)
            if is_multirun(argv) and not distributed_child():
                argv += sweep_args(overrides, str(cfg.run_name))
            elif not is_multirun(argv):
                refuse_a_sweep_without_m(overrides)
    except UserError as e:
        sys.exit(report(e))
    import hydra

    sys.argv = [sys.argv[0]] + argv
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
