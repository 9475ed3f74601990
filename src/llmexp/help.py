"""``python -m llmexp [overrides] --help``: the config groups, and the config the overrides compose
with each key's help from the schemas (llmexp.config.reference) above it.

It composes with Hydra as a run does but checks nothing more and imports no torch, so help is
instant and shows what ``stage=dpo`` or ``data=files`` bring; ``--hydra-help`` stays Hydra's.
"""

from __future__ import annotations

from typing import Dict, List

from llmexp.config.reference import annotated_yaml
from llmexp.overrides import compose, split_overrides

HELP_FLAGS = {"--help", "-h"}

HEADER = """\
llmexp: declarative experiments for training language models.

Usage: python -m llmexp [group=option ...] [key=value ...]
  e.g. python -m llmexp model=llama stage=sft strategy=auto trainer.max_steps=100
"""

FOOTER = """\
This help for other choices:                python -m llmexp stage=dpo data=files --help
Every key of every group and stage:         docs/config.md
Print the composed config without training: python -m llmexp [overrides] --cfg job
Sweep with Hydra multirun:                  python -m llmexp -m optim.lr=1e-4,3e-4
Stages in sequence (SFT -> RM -> PPO):       llmexp pipeline rlhf   (also: dpo, kto, simpo, orpo, grpo, rloo, online_dpo, distill)
Sweep with a W&B sweep file:                llmexp sweep sweeps/lr.yaml
A run's model as GGUF for llama.cpp:        llmexp export <run dir> --format gguf
Tokenize a text corpus once, before runs:   llmexp prepare stage=pretrain data=files data.path=DIR
Serve a run (OpenAI API + feedback page):   llmexp serve <run dir> [--port N] [--api-key KEY]
Ask a run's model:                          llmexp generate <run dir> "What is 3 plus 4?"
Evaluate a run's model (lm-eval, plugins):  llmexp eval <run dir> [--tasks arithmetic_gen,...]
Hydra's own flags:                          python -m llmexp --hydra-help
"""


def help_text(groups: Dict[str, List[str]], argv: List[str]) -> str:
    """The help page for the command line ``argv`` (flags ignored), given the config groups and
    their options (llmexp.paths.config_groups, plugins' included). ConfigError when the overrides
    do not compose."""
    cfg = compose(split_overrides(argv))
    listing = "\n".join(f"{group}: {', '.join(options)}" + (" (chosen by stage= and model=, not by hand)"
                                                            if group == "scale" else "")
                        for group, options in groups.items())
    return (f"{HEADER}\n== Config groups (group=option) ==\n\n{listing}\n\n"
            f"== Composed config (override any key with key=value) ==\n\n{annotated_yaml(cfg)}\n{FOOTER}")

