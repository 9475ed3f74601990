"""Preflight: everything checked before a run starts, reported together (exit code 2).

The typed config check (llmexp.config.check), then the checks that need more than the config:
the dataset, reward, eval and task registries (plugins included), the data's format, files and
directories named in the config, and what the machine has. ``python -m llmexp``, ``llmexp
sweep`` and ``llmexp pipeline`` all call it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig

from llmexp.config import schema as S
from llmexp.config.check import check_options, typed_config
from llmexp.config.stages import STAGES
from llmexp.errors import ConfigError, Problem, suggest


def preflight(cfg: DictConfig, overrides: Optional[Sequence[str]] = None) -> S.RunConfig:
    """The typed config of ``cfg``, or ConfigError listing every problem found; ``overrides``: the
    command line it was composed from (default: Hydra's, when it composed it)."""
    run, problems = typed_config(cfg)
    given = command_line() if overrides is None else list(overrides)
    if run is None:
        raise ConfigError(in_config_files(problems, given))
    problems.extend(_check_dataset(run.data))
    problems.extend(_sizes_of_a_pretrained_model(run.model, given))
    problems.extend(_compressed_on_other_data(run, given))
    if run.trainer.epochs and any(o.lstrip("+~").split("=", 1)[0] == "trainer.max_steps" for o in given):
        problems.append(Problem("trainer.max_steps", f"trainer.epochs={run.trainer.epochs} sets the steps (the passes "
                                "over the training rows, counted once they are), so this one would be ignored",
                                "give one of trainer.epochs and trainer.max_steps"))
    adopt_pretrained_architecture(run.model)
    fit_max_length_to_positions(run, given)
    resolve_reward_function(run)
    resolve_ppo_kl(run.stage)
    flagged = {p.key for p in problems}
    problems.extend(p for p in cross_checks(run) if p.key not in flagged)
    if problems:
        raise ConfigError(in_config_files(problems, given))
    return run


def command_line() -> List[str]:
    """The run's overrides as typed (none for a config composed without Hydra's command line)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def in_config_files(problems: List[Problem], given: Sequence[str]) -> List[Problem]:
    """Problems of keys the command line did not set, with the config file that set them (a typo
    in a plugin's data/<option>.yaml read as if typed on the command line, and no file named)."""
    typed = {o.lstrip("+~").split("=", 1)[0] for o in given}
    out = []
    chosen = dict(o.lstrip("+~").split("=", 1) for o in given if "=" in o and "." not in o.split("=", 1)[0])
    for p in problems:
        where = None if p.key in typed else config_file_setting(p.key, chosen)
        out.append(Problem(p.key, f"{p.message} (set in {where})", p.fix) if where else p)
    return out


def config_file_setting(key: str, chosen: Dict[str, str]) -> Optional[Path]:
    """The config file of a group option ``chosen`` on the command line (``data=mine``: llmexp's or
    a plugin's file) that sets ``key``: a file of the key's own group by the key under it
    (``val_fracton`` for data.val_fracton, ``options: {num_sampels: 3}`` inline too), an
    ``# @package _global_`` file (an experiment) by the whole key."""
    import re

    import yaml

    from llmexp.paths import config_dir
    from llmexp.plugins.configs import plugin_config_dirs

    choices = {g: o for g, o in chosen.items() if re.fullmatch(r"[\w.\-]+", o)}
    roots = [config_dir(), *(root for _, root in plugin_config_dirs())]
    group, _, rest = key.partition(".")
    for g in sorted(choices, key=lambda g: g != group):
        for root in roots:
            path = Path(root) / g / f"{choices[g]}.yaml"
            if not path.is_file():
                continue
            text = path.read_text(errors="replace")
            try:
                node = yaml.safe_load(text)
            except yaml.YAMLError:
                continue
            parts = key.split(".") if "@package _global_" in text else rest.split(".") if g == group else None
            if parts and _sets(node, parts):
                return path
    return None


def _sets(node: Any, parts: Sequence[str]) -> bool:
    """Whether the nested mappings ``node`` hold the key path ``parts`` (whatever its value, null too)."""
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


SIZES = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_position_embeddings",
         "extra")


def _sizes_of_a_pretrained_model(m: S.ModelConfig, overrides: Sequence[str]) -> List[Problem]:
    """What the command line asks of a model that model.pretrained loads as it is: a size (it was
    ignored: the run trained the model's own), or model=<option> of another architecture than the
    weights' (the run was named after it and took its scale settings)."""
    if m.pretrained is None:
        return []
    from llmexp.models.build import local_config

    config = local_config(m.pretrained)
    p: List[Problem] = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith("model.") and key.split(".")[1] in SIZES:
            p.append(Problem(key, f"sizes a model built from its config, and model.pretrained={m.pretrained} loads "
                             "one with its own", f"drop {key}, or model.pretrained=null to build one of this size"))
        elif key == "model" and config.get("model_type") not in (None, m.architecture):
            p.append(Problem("model", f"model={value} is {m.architecture}, and model.pretrained={m.pretrained} holds "
                             f"a {config['model_type']} model (its config.json), which the run trains and records",
                             f"drop model={value}: the directory's own type ({config['model_type']}) is used"))
    return p


PPO_KL = {"reward model": 0.5, "reward function": 0.1}


REFERENCE_REWARD = "reference_match"


def resolve_reward_function(run: S.RunConfig) -> None:
    """stage.reward.function=auto: the skill's rule on the skill's data, else exact match with each
    row's reference answer. It was arithmetic_correct everywhere: grpo on a user's sorting task
    scored every right answer 0 and learnt nothing for 300 iterations."""
    reward = getattr(run.stage, "reward", None)
    if reward is not None and reward.function == "auto":
        from llmexp.task_probe import BUNDLED_CHECK, is_the_skill

        reward.function = BUNDLED_CHECK if is_the_skill(run.data) else REFERENCE_REWARD


def resolve_ppo_kl(stage) -> None:
    """ppo's kl_coef null: 0.5 against a reward model, 0.1 against a reward function. A learned
    reward is a proxy the policy exploits: the README's ppo against an rm run took the default SFT
    from 1.000 to 0.865 exact match at 0.1, and to 0.994 at 0.5 (llmexp pipeline rlhf's, measured)."""
    if stage.name == "ppo" and getattr(stage, "kl_coef", 0.0) is None:
        stage.kl_coef = PPO_KL["reward model" if stage.reward.model else "reward function"]


def _compressed_on_other_data(run: S.RunConfig, given: Sequence[str]) -> List[Problem]:
    """prune, quantize and distill of a stage=pretrain run, with no data= given, validated a text
    model on the stage's default chat rows: quantize's "initial" val/loss was 2.78 against the
    pretrain run's own 1.12, and its task metric 0.0 against 0.11. Said with the data it trained on."""
    if run.stage.name not in ("prune", "quantize", "distill"):
        return []
    if any(o.lstrip("+~").split("=", 1)[0].split(".")[0] == "data" for o in given):
        return []
    import yaml

    source = run.stage.teacher if run.stage.name == "distill" else run.model.pretrained
    if not source:
        return []
    path = Path(os.path.expanduser(source))
    from llmexp.record import run_of_model

    made_by = run_of_model(path)
    config = made_by.config if made_by is not None else path / "config.yaml"
    try:
        cfg = yaml.safe_load(config.read_text()) if config.is_file() else None
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(cfg, dict) or (cfg.get("stage") or {}).get("name") != "pretrain":
        return []
    data = cfg.get("data") or {}
    if (data.get("source"), data.get("name")) == (run.data.source, run.data.name):
        return []
    fix = f"data={data.get('name')}" if data.get("source") == "bundled" else \
        f"data={data.get('name')} data.path={data.get('path')}"
    if run.stage.name == "distill":  # it learns prompt/answer rows, which a text model never saw
        fix = "stage.teacher=<a run trained on prompts and answers (stage=sft)>"
        return [Problem("stage.teacher", f"{source} is from a stage=pretrain run, trained on the text of "
                        f"{data.get('name')!r}, and a student distils its answers to the rows of "
                        f"{run.data.name!r}, which it never saw", f"{fix}, or give data= with rows it answers")]
    return [Problem("data", f"{source} is from a stage=pretrain run, trained on the text of {data.get('name')!r}, "
                    f"and stage={run.stage.name} would validate it on the rows of {run.data.name!r}: its val/loss "
                    f"and task metric would not be the model's", f"{fix} (the data it was trained on), or give "
                    f"data= to measure it on other data")]


def fit_max_length_to_positions(run: S.RunConfig, given: Sequence[str]) -> None:
    """data.max_length lowered to what the model's positions hold (less a rollout's new tokens),
    when the data group's default asks more and the command line did not set it: data=files' 512
    and grpo's 16 new tokens were refused on every 512-position model, the README's commands
    included. A data.max_length given by hand is still refused (run.check_positions)."""
    if any(o.lstrip("+~").split("=", 1)[0] == "data.max_length" for o in given):
        return
    if run.model.pretrained is not None:
        from llmexp.models.build import local_config

        config = local_config(run.model.pretrained)
        positions = config.get("max_position_embeddings", config.get("n_positions"))  # gpt2's name
    else:
        positions = run.model.max_position_embeddings
    rollout = getattr(run.stage, "rollout", None)
    new_tokens = max(rollout.max_new_tokens, rollout.val_max_new_tokens or 0) if rollout is not None else 0
    if isinstance(positions, int) and new_tokens < positions < run.data.max_length + new_tokens:
        run.data.max_length = max(8, positions - new_tokens)


def adopt_pretrained_architecture(m: S.ModelConfig) -> None:
    """model.architecture and sizes from the weights: a local model.pretrained directory's model
    type, when llmexp knows it, and its widths, depths and heads. `stage=dpo model.pretrained=<a
    qwen2 run>/model` keeps model=llama's default architecture otherwise, and the run record,
    strategy=tp's plan and the tokenizer check would follow that instead of the model that trains;
    the record of a half-width student's quantize run said hidden_size 64 (the default) for a
    model of 32, and `llmexp compare` listed it as a difference. Also a type llmexp does not build
    from scratch (phi3, gemma): the record said llama, and strategy=tp applied llama's plan to it."""
    from llmexp.models.build import local_config, pretrained_sizes

    config = local_config(m.pretrained) if m.pretrained is not None else {}
    if isinstance(config.get("model_type"), str) and config["model_type"]:
        m.architecture = config["model_type"]
        for key, value in pretrained_sizes(config).items():
            setattr(m, key, value)


def _check_dataset(d: S.DataConfig) -> List[Problem]:
    """A registered dataset (built-in or a plugin's) exists and data.options fit its typed schema;
    on success data.options becomes the complete, coerced options (each mixture source's likewise)."""
    if d.source in ("bundled", "mixture") and d.path is not None:  # read by nothing: the run trained on other data
        what = "a mixture, whose sources name their own paths" if d.source == "mixture" else \
            f"the registered dataset {d.name!r}, which reads no file"
        return [Problem("data.path", f"{d.path!r} would not be read: the data is {what}",
                        "data=files data.path=<file or directory> (or data=hf) to train on it; in a mixture, "
                        "{source: files, path: ...}")]
    if d.source == "mixture":
        from llmexp.data.mixture import source_config

        problems = []
        for i, m in enumerate(d.mixture):
            sub = source_config(d, i)
            found = _check_dataset(sub)
            m.options = sub.options
            problems += [within_mixture(x, i) for x in found]
        return problems
    if d.source != "bundled":
        return []
    from llmexp.plugins.registry import datasets

    entries = datasets()
    if d.name not in entries:
        return [Problem("data.name", f"no dataset {d.name!r} is registered by llmexp or a plugin",
                        suggest(d.name, entries))]
    entry = entries[d.name]
    options, problems = check_options(d.options, entry.declaration.options, "data.options", entry.describe("dataset"))
    if not problems and options is not None:
        d.options = dataclasses.asdict(options)
    return problems


def _check_importable(key: str, path: str) -> List[Problem]:
    """``module:function`` names a module that can be found (imported, and its function looked up,
    when the run starts)."""
    import importlib.util

    module, _, attr = path.partition(":")
    try:
        found = bool(module and attr) and importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return []
    if module.endswith(".py") and attr:  # a file's name given for its module's
        name = Path(module).stem
        return [Problem(key, f"{path!r}: {module!r} is a file name, not a module to import",
                        f"{name}:{attr} (the module's name, without .py; its directory on PYTHONPATH or the "
                        f"current directory)")]
    return [Problem(key, f"{path!r}: no module {module!r} to import" if module and attr else
                    f"{path!r} is not module:function", "module:function of an importable module (on PYTHONPATH "
                    "or installed), e.g. trl.rewards:think_format_reward; or a registered reward's name")]


def _check_task(run: S.RunConfig) -> List[Problem]:
    """task.check names a checker llmexp knows, a registered reward function or a module:function."""
    check = run.task.check
    if check in ("auto", "reference", "none"):
        return []
    if ":" in check:
        return _check_importable("task.check", check)
    from llmexp.plugins.registry import rewards

    names = rewards()
    if check in names:
        return []
    return [Problem("task.check", f"no checker or reward named {check!r}",
                    suggest(check, ["auto", "reference", "none", *names]))]


def cross_checks(run: S.RunConfig) -> List[Problem]:
    """Contradictions between groups and facts about files and the machine."""
    p: List[Problem] = []
    m, d, t, o = run.model, run.data, run.trainer, run.optim
    if m.pretrained is None:
        if m.hidden_size % m.num_heads:
            p.append(Problem("model.num_heads", f"hidden_size {m.hidden_size} is not divisible by "
                             f"num_heads {m.num_heads}", "choose num_heads dividing hidden_size"))
        if m.num_kv_heads and m.num_heads % m.num_kv_heads:
            p.append(Problem("model.num_kv_heads", f"num_heads {m.num_heads} is not divisible by "
                             f"num_kv_heads {m.num_kv_heads}", "choose a divisor of num_heads"))
        if d.max_length > m.max_position_embeddings:
            p.append(Problem("data.max_length", f"{d.max_length} exceeds model.max_position_embeddings "
                             f"{m.max_position_embeddings}",
                             f"data.max_length={m.max_position_embeddings} or raise the model's"))
    else:
        p.extend(_check_model_source("model.pretrained", m.pretrained, run.offline))
        run_dir = Path(os.path.expanduser(m.pretrained))
        if (run_dir.is_dir() and not (run_dir / "config.json").is_file()
                and (run_dir / "model" / "config.json").is_file()):
            p.append(Problem("model.pretrained", f"{m.pretrained!r} is a run directory; its model is in model/",
                             f"model.pretrained={run_dir / 'model'}"))
    if m.tokenizer not in (None, "train"):
        p.extend(_check_model_source("model.tokenizer", m.tokenizer, run.offline))
    if m.chat_template is not None:
        p.extend(_check_chat_template(m.chat_template))
    p.extend(_check_stage_data(run))
    p.extend(_check_task(run))
    if m.architecture == "gpt2" and m.num_kv_heads and m.pretrained is None:
        p.append(Problem("model.num_kv_heads", "gpt2 has no grouped-query attention",
                         "model.num_kv_heads=null, or a llama/qwen2/mistral model"))
    p.extend(_check_data_source(run))
    p.extend(_check_mixture(run))
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        p.append(Problem("optim.betas", f"expected two numbers in [0, 1), got {o.betas}", "optim.betas=[0.9,0.95]"))
    p.extend(_check_strategy(run))
    p.extend(_check_monitor(run))
    if t.epochs and d.streaming:
        p.append(Problem("trainer.epochs", "a streamed corpus is read as training goes, so its passes cannot be "
                         "counted in steps before", "trainer.max_steps=<steps>, or data.streaming=false"))
    p.extend(_check_eval(run))
    p.extend(_check_stage_options(run))
    if m.liger_kernel and not _cuda_available():
        p.append(Problem("model.liger_kernel", "Liger kernels are Triton kernels and need a CUDA GPU",
                         "model.liger_kernel=false on a CPU"))
    p.extend(_check_machine_settings(run))
    if run.peft.name != "none" and not run.peft.merge_on_export and m.pretrained is None:
        p.append(Problem("peft.merge_on_export", "false exports the adapters alone, and a model built from its "
                         "config has no saved base for them to refer to", "peft.merge_on_export=true, or "
                         "model.pretrained=<the base directory> (the adapters then name it)"))
    if m.pretrained is not None and (Path(os.path.expanduser(m.pretrained)) / "adapter_config.json").is_file() \
            and not (Path(os.path.expanduser(m.pretrained)) / "config.json").is_file():
        p.append(Problem("model.pretrained", f"{m.pretrained!r} holds LoRA adapters alone (peft.merge_on_export="
                         "false), which load frozen: training on them failed in its first step",
                         "train on from a merged export (peft.merge_on_export=true), or give the adapters' base as "
                         "model.pretrained"))
    needs_cuda = run.peft.name == "qlora" or t.precision.startswith("16") or t.accelerator in ("gpu", "cuda")
    if needs_cuda and not _cuda_available():
        what = ("peft=qlora (4-bit bitsandbytes)" if run.peft.name == "qlora"
                else f"trainer.precision={t.precision}" if t.precision.startswith("16")
                else f"trainer.accelerator={t.accelerator}")
        key = "peft" if run.peft.name == "qlora" else "trainer.precision" if t.precision.startswith("16") \
            else "trainer.accelerator"
        p.append(Problem(key, f"{what} needs a CUDA GPU and none is available",
                         "peft=lora on CPU" if key == "peft" else "trainer.precision=32-true or bf16-mixed"
                         if key == "trainer.precision" else "trainer.accelerator=auto"))
    return p


def _check_chat_template(value: str) -> List[Problem]:
    """model.chat_template names a file or is a template, and the template is valid Jinja (whether
    it ends an answer with the tokenizer's eos is checked once the tokenizer is loaded)."""
    from llmexp.errors import UserError
    from llmexp.models.tokenizer import chat_template_text

    try:
        text = chat_template_text(value)
    except UserError as e:
        return [Problem("model.chat_template", str(e).split(": ", 1)[1], None)]
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as e:
        return [Problem("model.chat_template", f"the template is not valid Jinja: {e.message} (line {e.lineno})",
                        "fix the template; transformers renders it with Jinja2")]
    return []


def _check_machine_settings(run: S.RunConfig) -> List[Problem]:
    """Settings that went through to the run and failed there, or trained wrong: weights in float16
    without a float32 master copy (val/loss 6.26 -> 51.7 in 5 steps), a tokenizer trained anew for
    pretrained weights (its ids mean other tokens: the default SFT started at task 0.0), MPS or
    FlashAttention 2 where there is none (Lightning's and transformers' tracebacks)."""
    m, t = run.model, run.trainer
    p: List[Problem] = []
    if m.dtype == "float16" and not t.precision.startswith("16") and (t.max_steps or t.epochs):
        p.append(Problem("model.dtype", "float16 weights train without a float32 copy (AdamW's steps underflow and "
                         "the loss diverged: 6.26 -> 51.7 in 5 steps)", "model.dtype=bfloat16, or float32 with "
                         "trainer.precision=16-mixed on a GPU"))
    if m.tokenizer == "train" and m.pretrained is not None:
        p.append(Problem("model.tokenizer", f"train builds a new vocabulary, and model.pretrained={m.pretrained} "
                         "embeds the ids of its own tokenizer: every id would mean another token",
                         "model.tokenizer=null (the model's own), or model.pretrained=null to train from scratch"))
    if t.accelerator == "mps":
        import torch

        if not torch.backends.mps.is_available():
            p.append(Problem("trainer.accelerator", "mps is Apple silicon's GPU, and this machine has none",
                             "trainer.accelerator=auto"))
    if m.attn_implementation == "flash_attention_2":
        import importlib.util

        if not _cuda_available() or importlib.util.find_spec("flash_attn") is None:
            p.append(Problem("model.attn_implementation", "flash_attention_2 needs a CUDA GPU and the flash-attn "
                             "package", "model.attn_implementation=sdpa (PyTorch's fused attention)"))
    return p


# The validation metrics llmexp's stages log (a plugin's callback may log others).
VALIDATION_METRICS = (
    "val/loss", "val/perplexity", "val/task_score", "val/task_response_chars", "val/accuracy", "val/reward",
    "val/response_length", "val/kl", "val/nll_chosen", "val/logp_chosen", "val/logp_rejected", "val/reward_chosen",
    "val/reward_rejected", "val/reward_margin", "val/reward_desirable", "val/reward_undesirable",
    "val/log_odds_ratio", "val/divergence", "val/attention_divergence")


def _closest(name: str, names) -> Optional[str]:
    import difflib

    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.8)
    return close[0] if close else None


def _check_monitor(run: S.RunConfig) -> List[Problem]:
    """trainer.monitor and what uses it: a validation (or eval) metric, a direction, validations to compare."""
    t = run.trainer
    example = "trainer.monitor=val/loss (or val/task_score, val/reward, val/accuracy: the stage's val/ metrics)"
    if not t.monitor:
        return [Problem(f"trainer.{key}", "needs trainer.monitor, the validation metric that says which validation "
                        "is best", example) for key in ("keep_best", "early_stopping_patience") if getattr(t, key)]
    p: List[Problem] = []
    kind, parts = t.monitor.split("/")[0], t.monitor.count("/") + 1
    if kind == "eval" and parts >= 3 and run.eval.name == "none":
        p.append(Problem("trainer.monitor", f"{t.monitor!r} is an eval's metric, and eval=none runs no eval",
                         f"eval=lm_eval (with eval.tasks naming {t.monitor.split('/')[1]!r}) or the eval that "
                         "reports it"))
    elif not ((kind == "val" and parts >= 2) or (kind == "eval" and parts >= 3)):
        p.append(Problem("trainer.monitor", f"{t.monitor!r} is neither a validation metric nor an eval's metric",
                         example + ", or eval/<task>/<metric> with eval=lm_eval"))
    elif kind == "val" and t.monitor not in VALIDATION_METRICS and _closest(t.monitor, VALIDATION_METRICS):
        # a typo: it was reported as a monitor_mode problem, whose fix then failed after the first validation
        p.append(Problem("trainer.monitor", f"no stage validates {t.monitor!r}",
                         f"did you mean {_closest(t.monitor, VALIDATION_METRICS)!r}? (the val/ metrics a run logs are "
                         f"the columns of its metrics.csv)"))
    elif S.monitor_direction(t.monitor, t.monitor_mode) is None:
        p.append(Problem("trainer.monitor_mode", f"auto cannot tell whether a higher or a lower {t.monitor} is "
                         "better", "trainer.monitor_mode=min or trainer.monitor_mode=max"))
    if t.val_check_interval is None:
        p.append(Problem("trainer.val_check_interval", "trainer.monitor compares the validations in training, and "
                         "null validates only after the last step", "trainer.val_check_interval=<steps>"))
    if t.keep_best and run.strategy.name.startswith("deepspeed"):
        p.append(Problem("trainer.keep_best", f"strategy={run.strategy.name} partitions the weights in its own "
                         "format, which the best validation's weights are not kept in yet",
                         "strategy=ddp or strategy=fsdp, or trainer.keep_best=false"))
    return p


def _architectures(config: Path) -> List[str]:
    import json

    try:
        return list(json.loads(config.read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return []


def _check_stage_options(run: S.RunConfig) -> List[Problem]:
    """Options of the preference and rollout stages that cannot work together."""
    st, d, t = run.stage, run.data, run.trainer
    p: List[Problem] = []
    pretrained = run.model.pretrained
    spec = STAGES[st.name]
    if spec.language_model and pretrained and (Path(os.path.expanduser(pretrained)) / "config.json").is_file():
        scorers = [a for a in _architectures(Path(os.path.expanduser(pretrained)) / "config.json")
                   if a.endswith("ForSequenceClassification")]
        if scorers:
            p.append(Problem("model.pretrained", f"{pretrained!r} is a reward model ({scorers[0]}), not a "
                             f"language model for stage={st.name}",
                             "a policy run's model (sft, dpo, ppo, grpo); a reward model goes in stage.reward.model"))
    if getattr(st, "loss_type", None) == "exo_pair" and st.label_smoothing == 0:
        p.append(Problem("stage.loss_type", "exo_pair is the KL to the label distribution [1 - label_smoothing, "
                         "label_smoothing], undefined with label_smoothing 0", "stage.label_smoothing=1e-3 (as "
                         "the EXO paper recommends), or another stage.loss_type"))
    if getattr(st, "loss_type", None) == "kto" and t.micro_batch_size < 2:
        p.append(Problem("trainer.micro_batch_size", "kto estimates its KL term by pairing each prompt with "
                         "another row's completion in the micro-batch, and 1 row has no other",
                         "trainer.micro_batch_size=2 or more (or stage.loss_type=apo_zero_unpaired, without KL)"))
    if d.streaming:
        for key, bad, fix in (("data.source", d.source != "files", "data=files data.path=<files, a directory or a glob>"),
                              ("data.packing", d.packing, "data.packing=false (or data.concat=true)"),
                              ("stage", not spec.packs, "stage=pretrain")):
            if bad:
                p.append(Problem(key, "data.streaming reads local text files, one document per row or in concat "
                                 "blocks, for pretrain/sft", fix))
    if d.concat and not spec.packs:
        p.append(Problem("data.concat", f"stage={st.name} scores whole sequences one per row; joining "
                         "documents into blocks would mix several into one", "data.concat=false"))
    if d.concat and d.packing:
        p.append(Problem("data.concat", "data.concat and data.packing both put several documents in a row; "
                         "choose one", "data.packing=false (blocks across documents) or data.concat=false "
                         "(packed rows, no attention across documents)"))
    if not spec.packs and d.packing:
        p.append(Problem("data.packing", f"stage={st.name} scores whole sequences one per row; packing "
                         "would mix several into one", "data.packing=false"))
    if getattr(st, "reference", None) == "adapter_disabled" and run.peft.name == "none":
        p.append(Problem("stage.reference", "adapter_disabled uses the base model under a LoRA adapter, "
                         "and peft=none has none", "peft=lora, or stage.reference=copy or precomputed"))
    if st.name == "distill":
        p.extend(_check_teacher(run))
    if spec.steps == "required" and t.max_steps < 1:
        p.append(Problem("trainer.max_steps", f"stage={st.name} trains, and 0 steps would leave the model as it "
                         "started", "trainer.max_steps=1 or more"))
    if spec.steps == "none" and t.max_steps:
        p.append(Problem("trainer.max_steps", f"stage={st.name} changes a trained model without training "
                         f"steps, and {t.max_steps} were asked", "trainer.max_steps=0"))
    if spec.changes_a_trained_model:
        if not pretrained:
            p.append(Problem("model.pretrained", f"stage={st.name} needs the trained model to change",
                             "model.pretrained=<run dir>/model (e.g. an sft run's)"))
        if run.strategy.name != "auto" or run.peft.name != "none":
            key = "strategy" if run.strategy.name != "auto" else "peft"
            p.append(Problem(key, f"stage={st.name} changes a whole model in one process, without "
                             f"{key}={getattr(run, key).name}", f"{key}={'auto' if key == 'strategy' else 'none'}"))
    if st.name == "prune" and pretrained:
        p.extend(_check_prune_sizes(st, Path(os.path.expanduser(pretrained)) / "config.json"))
    if st.name == "quantize" and st.method == "int4" and not _cuda_available():
        p.append(Problem("stage.method", "int4 uses torchao's CUDA kernels (tinygemm), and no CUDA GPU is "
                         "available", "stage.method=int8, or stage.method=q4_0 for llama.cpp's 4-bit GGUF, on a CPU"))
    quantized_by_us = pretrained and _made_by(Path(os.path.expanduser(pretrained)), "stage", "name") == "quantize"
    if st.name == "quantize" and quantized_by_us:
        p.append(Problem("model.pretrained", f"{pretrained!r} is the model of a stage=quantize run: its weights "
                         "are rounded already, and quantizing them again measures the rounding twice",
                         "model.pretrained=<the full-precision model it quantized> (its run's config.yaml, "
                         "model.pretrained)"))
    if st.name == "quantize" and st.method in S.GGUF_METHODS and pretrained:
        p.extend(_check_gguf_writable(st, Path(os.path.expanduser(pretrained))))
    elif st.name == "quantize" and pretrained and run.model.architecture == "gpt2":
        library = "torchao" if st.method in S.TORCHAO_METHODS else "auto-round"
        p.append(Problem("stage.method", f"{st.method} ({library}) quantizes nn.Linear layers, and gpt2's "
                         "attention and MLP layers are transformers' Conv1D", "llmexp export <run dir> --format gguf "
                         "--type q8_0 (or q4_0) writes gpt2's weights quantized for llama.cpp; stage=quantize takes "
                         "llama, mistral and qwen2"))
    elif st.name == "quantize" and st.method != "int8" and pretrained:
        p.extend(_check_quantize_sizes(st, Path(os.path.expanduser(pretrained)) / "config.json"))
    if getattr(st, "rollout", None) is not None:
        p.extend(_check_tools(st))
    if not spec.generates:
        return p
    if t.grad_accum % getattr(st, "num_minibatches", 1):
        p.append(Problem("stage.num_minibatches", f"{st.num_minibatches} minibatches must divide the "
                         f"{t.grad_accum} micro-batches of a rollout batch (trainer.grad_accum)",
                         "a divisor of trainer.grad_accum, or raise trainer.grad_accum"))
    r = st.reward
    if r.model:
        config = Path(os.path.expanduser(r.model)) / "config.json"
        if not config.is_file():
            p.append(Problem("stage.reward.model", f"{r.model!r} is not a model directory (no config.json)",
                             "give an rm run's <run dir>/model, or unset it to use stage.reward.function"))
        elif not any(a.endswith("ForSequenceClassification") for a in _architectures(config)):
            p.append(Problem("stage.reward.model", f"{r.model!r} is not a reward model (architectures: "
                             f"{', '.join(_architectures(config)) or 'none'})",
                             "give the model/ of a stage=rm run (a one-label sequence classifier)"))
    elif not r.function:
        p.append(Problem("stage.reward", "no reward: neither stage.reward.function nor stage.reward.model is set",
                         "stage.reward.function=auto (or a reward's name), or stage.reward.model=<rm run>/model"))
    elif ":" in r.function:  # module:function, imported when the run starts
        p.extend(_check_importable("stage.reward.function", r.function))
    else:
        from llmexp.plugins.registry import rewards

        names = rewards()
        if r.function not in names:
            p.append(Problem("stage.reward.function", f"no reward named {r.function!r} is registered",
                             suggest(r.function, names)))
    if st.rollout.engine == "vllm":
        from llmexp.rollout_engines import vllm_problem

        problem = vllm_problem(_cuda_available())
        if problem:
            p.append(Problem("stage.rollout.engine", f"engine=vllm: {problem}",
                             "stage.rollout.engine=hf (llmexp's decode loop, on any device)"))
        elif run.strategy.name not in ("auto", "ddp"):
            p.append(Problem("stage.rollout.engine", f"engine=vllm holds a whole copy of the policy per process, "
                             f"which strategy={run.strategy.name} shards", "strategy=ddp, or stage.rollout.engine=hf"))
    longest = d.max_length + max(st.rollout.max_new_tokens, st.rollout.val_max_new_tokens or 0)
    if run.model.pretrained is None and longest > run.model.max_position_embeddings:
        p.append(Problem("stage.rollout.max_new_tokens", f"prompts up to data.max_length={d.max_length} plus "
                         f"responses make {longest} positions, more than model.max_position_embeddings="
                         f"{run.model.max_position_embeddings}", "lower data.max_length or max_new_tokens"))
    return p


def _check_tools(st) -> List[Problem]:
    """stage.rollout.tools: a stage that runs them, and names that resolve."""
    tools = list(st.rollout.tools or [])
    if not tools:
        return []
    if st.name not in ("grpo", "rloo"):
        return [Problem("stage.rollout.tools", f"stage={st.name} samples without tools (grpo and rloo call them: their "
                        f"advantages are a response's, not a token's, so the results inside it need no value)",
                        "stage=grpo or stage=rloo, or stage.rollout.tools=[]")]
    from llmexp.plugins.registry import tools as registered

    p: List[Problem] = []
    for name in tools:
        if ":" in name:
            p.extend(_check_importable("stage.rollout.tools", name))
        elif name not in registered():
            p.append(Problem("stage.rollout.tools", f"no tool named {name!r} is registered",
                             suggest(name, registered()) + " (or module:function)"))
    return p


def _check_eval(run: S.RunConfig) -> List[Problem]:
    """The eval exists and, offline, every lm-eval task is one llmexp ships or include_path holds."""
    e = run.eval
    if e.name in ("none", "lm_eval") and e.options:
        return [Problem("eval.options", f"eval={e.name} takes no options (got {', '.join(map(str, e.options))}); "
                        "eval.options are a plugin eval's", "drop them with ~eval.options, or choose a plugin "
                        "eval with eval.name=<name> (llmexp plugins lists them)")]
    if e.name == "none":
        return []
    if not STAGES[run.stage.name].language_model:
        return [Problem("eval", "stage=rm trains a reward model (a sequence scorer, not a language model), "
                        "which lm-eval tasks and generation evals cannot run",
                        "eval=none for rm; evaluate policies (sft, dpo, ppo, grpo) instead")]
    if e.name != "lm_eval":
        from llmexp.plugins.registry import evals

        known = ["none", "lm_eval", *evals()]
        if e.name not in known:
            return [Problem("eval.name", f"unknown eval {e.name!r}", suggest(e.name, known))]
        from llmexp.plugins.evaluation import option_problems

        return option_problems(e.name, e.options, "eval.options")[1]  # before any model is built
    p: List[Problem] = []
    if e.include_path and not Path(e.include_path).is_dir():
        p.append(Problem("eval.include_path", f"{e.include_path!r} is not a directory",
                         "give a directory of lm-eval task YAML files"))
    if run.offline:
        from llmexp.evals.tasks import task_names

        names = task_names(e.include_path)
        for task in e.tasks:
            if task not in names:
                p.append(Problem("eval.tasks", f"unknown task {task!r} (offline: bundled tasks and "
                                 f"eval.include_path only)", suggest(task, names)))
    from llmexp.evals.tasks import missing_data_files

    for message in missing_data_files(e.include_path, list(e.tasks)):
        problem, _, fix = message.partition("; ")
        p.append(Problem("eval.include_path", problem, fix))
    return p


def _valid_devices(devices) -> bool:
    """Lightning's ``devices``: a count >= 1 (or its string), -1 or "auto", or a non-empty list (or
    comma-separated string) of device ids."""
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return True
        ids = [x for x in text.split(",") if x.strip()]
        return bool(ids) and all(x.strip().isdigit() for x in ids) and ("," in text or int(text) >= 1)
    if isinstance(devices, (list, tuple)):
        return bool(devices) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    return False


def _check_strategy(run: S.RunConfig) -> List[Problem]:
    """Strategies that cannot run as configured, refused before anything starts."""
    s, t, m = run.strategy, run.trainer, run.model
    p: List[Problem] = []
    if not _valid_devices(t.devices):
        p.append(Problem("trainer.devices", f"{t.devices!r} names no device",
                         "a count >= 1, -1 or auto (every device), or a list of device ids, e.g. trainer.devices=[0,1]"))
        return p
    if s.name.startswith("deepspeed"):
        if not _cuda_available():
            p.append(Problem("strategy", f"strategy={s.name} needs CUDA GPUs and none is available",
                             "strategy=ddp or strategy=fsdp (both run on CPU with gloo)"))
        else:
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                p.append(Problem("strategy", f"strategy={s.name} needs deepspeed",
                                 "pip install 'llmexp[deepspeed]'"))
    if s.sequence_parallel and s.name not in ("fsdp", "tp"):
        p.append(Problem("strategy.sequence_parallel", f"sequence parallelism is part of tensor parallelism, "
                         f"which strategy={s.name} does not do", "strategy=tp, or strategy=fsdp with "
                         "strategy.tensor_parallel_size>1"))
    if s.name in ("fsdp", "tp"):
        if not str(t.devices).isdigit():
            p.append(Problem("trainer.devices", f"strategy={s.name} needs a device count, got {t.devices!r}",
                             "trainer.devices=<number of devices per node>"))
        else:
            from llmexp.parallel_plans import mesh_shape

            world = int(t.devices) * t.num_nodes
            dp, tp = mesh_shape(s.name, world, s.data_parallel_size, s.tensor_parallel_size)
            if dp * tp != world:
                p.append(Problem("strategy.data_parallel_size", f"data_parallel_size {dp} x tensor_parallel_size "
                                 f"{tp} must equal the {world} devices (trainer.devices x trainer.num_nodes)",
                                 "set strategy.data_parallel_size/tensor_parallel_size so their product matches"))
            if tp > 1:
                from llmexp.parallel_plans import TP_ARCHITECTURES

                if m.architecture not in TP_ARCHITECTURES:
                    p.append(Problem("strategy.tensor_parallel_size", f"no tensor-parallel plan for "
                                     f"{m.architecture}", f"use one of {', '.join(TP_ARCHITECTURES)}, or strategy=fsdp"))
                elif m.pretrained is None and (m.num_heads % tp or (m.num_kv_heads or m.num_heads) % tp
                                               or m.intermediate_size % tp):
                    p.append(Problem("strategy.tensor_parallel_size", f"model heads ({m.num_heads}), kv heads "
                                     f"({m.num_kv_heads}) and intermediate_size ({m.intermediate_size}) must "
                                     f"divide by {tp}", "choose a tensor_parallel_size that divides them"))
        if s.sequence_parallel and str(t.devices).isdigit():
            from llmexp.parallel_plans import mesh_shape

            tp_size = mesh_shape(s.name, int(t.devices) * t.num_nodes, s.data_parallel_size, s.tensor_parallel_size)[1]
            if tp_size < 2:
                p.append(Problem("strategy.sequence_parallel", "sequence parallelism shards along the sequence "
                                 "between tensor-parallel ranks, and this mesh has none",
                                 "strategy=tp, or strategy.tensor_parallel_size>1 with fsdp"))
            if STAGES[run.stage.name].generates:
                p.append(Problem("strategy.sequence_parallel", f"stage={run.stage.name} generates token by token, "
                                 "which a sequence-sharded model cannot", "strategy.sequence_parallel=false"))
        tensor_parallel = s.name == "tp" or s.tensor_parallel_size > 1
        if run.peft.name == "qlora" or (run.peft.name == "lora" and tensor_parallel):
            p.append(Problem("peft", f"peft={run.peft.name} with strategy={s.name}"
                             f"{' and tensor parallelism' if tensor_parallel else ''} is not supported yet",
                             "LoRA with strategy=ddp or strategy=fsdp (without tensor parallelism), "
                             "or peft=none"))
    return p


def within_mixture(problem: Problem, i: int) -> Problem:
    """A problem of one mixture source, keyed where the user wrote it: data.mixture[i].<key>."""
    if problem.key.startswith("data."):
        return Problem(problem.key.replace("data.", f"data.mixture[{i}].", 1), problem.message, problem.fix)
    return Problem(problem.key, f"data.mixture[{i}]: {problem.message}", problem.fix)


def _check_mixture(run: S.RunConfig) -> List[Problem]:
    """Each source of data=mixture as if it were the run's only data: its path, its format, the
    stage's needs; and a mixture has sources, and only data.source=mixture has them."""
    d = run.data
    if d.source != "mixture":
        return [Problem("data.mixture", f"data.source={d.source} reads one dataset; data.mixture is read only "
                        "with data.source=mixture", "data=mixture (or drop data.mixture)")] if d.mixture else []
    if not d.mixture:
        return [Problem("data.mixture", "data.source=mixture needs at least one dataset",
                        "data.mixture=[{name: arithmetic, weight: 1}, {source: files, path: my.jsonl, weight: 1}]")]
    from llmexp.data.mixture import source_config

    from llmexp.data.formats import detect_format
    from llmexp.data.mixture import MIXED_FORMATS_FIX, label, mixed_formats
    from llmexp.data.peek import peek_columns

    problems: List[Problem] = []
    formats: Dict[str, str] = {}
    for i in range(len(d.mixture)):
        sub = source_config(d, i)
        one = dataclasses.replace(run, data=sub)
        found = _check_data_source(one) + _check_stage_data(one)
        problems += [within_mixture(x, i) for x in found]
        columns = None if found else peek_columns(sub)
        fmt = sub.format if sub.format != "auto" else detect_format(columns, dataclasses.asdict(sub.fields)) \
            if columns is not None else None
        if fmt:
            formats[f"data.mixture[{i}] {label(d, i)!r}"] = fmt
    said = mixed_formats(formats) if not problems else None
    if said:
        return [Problem("data.mixture", said, MIXED_FORMATS_FIX)]
    return problems


def _check_data_source(run: S.RunConfig) -> List[Problem]:
    """data.path names something readable for data.source."""
    d, p = run.data, []
    if d.source == "files" and d.path:
        from llmexp.data.sources import card_names_files

        if not glob.glob(os.path.expanduser(d.path)):
            p.append(Problem("data.path", f"no file or directory matches {d.path!r}",
                             "give an existing JSONL/JSON/Parquet/CSV or text (.txt) file, directory or glob"))
        elif Path(os.path.expanduser(d.path)).is_dir() and card_names_files(Path(os.path.expanduser(d.path))):
            # data=files read every file, its validation split's too, into the training rows
            p.append(Problem("data.path", f"{d.path!r} is a dataset whose README.md card names its files and splits, "
                             "which data=files does not read", f"data=hf data.path={d.path} (with "
                             "data.validation_split=<its validation split>; in data.mixture: source: hf)"))
    if d.source == "hf" and d.path and not Path(os.path.expanduser(d.path)).exists():
        if d.path.startswith(("/", ".", "~")):  # a path, not a hub id: a typo, which no download fixes
            p.append(Problem("data.path", f"no dataset directory or file at {d.path!r}",
                             "give an existing directory (save_to_disk, or data files) or a hub id (org/name)"))
        elif run.offline:
            p.append(Problem("data.path", f"{d.path!r} is not a local dataset and offline=true",
                             "set offline=false to download it from the hub, or use a local path"))
    if d.source not in ("bundled", "mixture") and not d.path:
        p.append(Problem("data.path", f"data.source={d.source} needs a path", "data.path=..."))
    return p


def _check_stage_data(run: S.RunConfig) -> List[Problem]:
    """The stage can train on the data's format (known from the config or the first row)."""
    from llmexp.data.fields import unknown_mappings
    from llmexp.data.formats import FORMAT_COLUMNS, detect_format, format_problem
    from llmexp.data.peek import peek_columns

    d = run.data
    if d.source == "mixture":
        return []  # each source is checked by _check_mixture
    fields = dataclasses.asdict(d.fields)
    columns = peek_columns(d)
    for canon, source in unknown_mappings(fields, columns) if columns is not None else []:  # a typo, said as one
        return [Problem(f"data.fields.{canon}={source}", f"{d.path or d.name!r} has no column {source!r} (columns: "
                        f"{', '.join(columns)})", suggest(source, columns))]
    if d.format != "auto":
        fmt = d.format
        if columns is not None:
            present = detect_columns = set(columns)
            need = [fields.get(c, c) for c in FORMAT_COLUMNS[fmt] if fields.get(c, c) not in present]
            if need:
                return [Problem("data.format", f"data.format={fmt} needs columns {need}, but "
                                f"{d.path or d.name!r} has {sorted(detect_columns)}",
                                "map them with data.fields.<name>=<column>, or data.format=auto")]
        columns = columns or [fields[c] for c in FORMAT_COLUMNS[fmt]]
    elif columns is None:
        return []
    else:
        fmt = detect_format(columns, fields)
    from llmexp.data.peek import peek_row

    problem = format_problem(run.stage.name, fmt, columns, fields, f"data {d.path or d.name!r}",
                             peek_row(d) if fmt is None else None)
    return [Problem("stage", problem, None)] if problem else []


def _check_teacher(run: S.RunConfig) -> List[Problem]:
    """distill's teacher: given, a causal LM (not a reward model) where it says, and sampled with
    an engine distill runs."""
    st = run.stage
    if not st.teacher:
        return [Problem("stage.teacher", "distillation needs a teacher and none is given",
                        "stage.teacher=<run dir> (e.g. an sft run) or a model directory")]
    p = _check_model_source("stage.teacher", st.teacher, run.offline)
    local = Path(os.path.expanduser(st.teacher))
    if not p and local.is_dir():
        config = next((c for c in (local / "model" / "config.json", local / "config.json") if c.is_file()), None)
        if config is None:
            p.append(Problem("stage.teacher", f"{st.teacher!r} is neither a run directory with model/ nor a model "
                             "directory (no config.json)", "give a finished run's directory or its model/"))
        elif any(a.endswith("ForSequenceClassification") for a in _architectures(config)):
            p.append(Problem("stage.teacher", f"{st.teacher!r} is a reward model, not a language model",
                             "give the run directory of a language-model stage (sft, dpo, grpo, ...)"))
    if st.lmbda > 0 and st.rollout.engine == "vllm":
        p.append(Problem("stage.rollout.engine", "distill samples the student's completions with engine hf or "
                         "generate", "stage.rollout.engine=hf"))
    if st.attention_weight > 0 and run.strategy.name == "tp":
        p.append(Problem("stage.attention_weight", "attention transfer compares each head's whole attention map "
                         "with the teacher's, and strategy=tp splits the heads across ranks",
                         "strategy=fsdp (or ddp), or stage.attention_weight=0"))
    return p


def _check_prune_sizes(st, config_file: Path) -> List[Problem]:
    """What stage=prune keeps must exist in the model: a llama-style decoder with at least that
    many layers and key/value heads."""
    import json

    if not config_file.is_file():
        return []
    config = json.loads(config_file.read_text())
    if not any(a in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
               for a in config.get("architectures") or []):
        return [Problem("stage", f"stage=prune prunes llama-style decoders (llama, mistral, qwen2), and this model "
                        f"is {', '.join(config.get('architectures') or ['unknown'])}", "model.pretrained=<a llama, "
                        "mistral or qwen2 run>/model")]
    p: List[Problem] = []
    layers = config.get("num_hidden_layers", 0)
    kv = config.get("num_key_value_heads") or config.get("num_attention_heads", 0)
    if st.layers_keep is not None and st.layers_keep > layers:
        p.append(Problem("stage.layers_keep", f"keeps {st.layers_keep} layers of a model that has {layers}",
                         _keep_fix("stage.layers_keep", layers, "layers")))
    if st.kv_heads_keep is not None and st.kv_heads_keep > kv:
        p.append(Problem("stage.kv_heads_keep", f"keeps {st.kv_heads_keep} key/value heads of a model that has {kv} "
                         "per layer", _keep_fix("stage.kv_heads_keep", kv, "key/value heads")))
    return p


def _keep_fix(key: str, has: int, what: str) -> str:
    """What to keep of ``has``: fewer prunes, all of them (or null) prunes none."""
    if has <= 1:
        return f"{key}=null: the model has only one of its {what}, nothing to prune"
    return f"{key}={has - 1} or fewer prunes {what}; {key}={has} (or null) keeps all {has}"


def _check_quantize_sizes(st, config_file: Path) -> List[Problem]:
    """int4 and autoround split each quantized layer's input into groups of stage.group_size
    weights: the size must divide every layer's input (auto-round failed deep inside otherwise);
    autoround's calibration windows must fit the model's positions."""
    from types import SimpleNamespace

    from llmexp.weight_groups import group_size_problem, layer_input_sizes

    if not config_file.is_file():
        return []
    try:
        config = json.loads(config_file.read_text())
        sizes = layer_input_sizes(SimpleNamespace(**{"head_dim": None, **config}))
    except (OSError, ValueError, TypeError, AttributeError):
        return []  # not a decoder config this can read: the load reports it
    p: List[Problem] = []
    wrong = group_size_problem(st.group_size, sizes)
    if wrong:
        p.append(Problem("stage.group_size", f"{wrong[0]}, from {config_file}", wrong[1]))
    positions = config.get("max_position_embeddings")
    if st.method == "autoround" and positions and st.calibration_length > positions:
        p.append(Problem("stage.calibration_length", f"windows of {st.calibration_length} tokens are longer than "
                         f"the {positions} positions of this model ({config_file})",
                         f"stage.calibration_length={min(128, positions)} (at most {positions})"))
    return p


def _check_gguf_writable(st, model_dir: Path) -> List[Problem]:
    """stage.method=q8_0/q4_0 writes GGUF: what GGUF export writes (architecture, full-precision
    weights, a byte-level BPE tokenizer llama.cpp splits alike)."""
    from llmexp.export_gguf import check_writable

    if not (model_dir / "config.json").is_file():
        return []
    try:
        arch, _ = check_writable(model_dir)
    except ValueError as e:
        return [Problem("stage.method", f"{st.method} writes a GGUF file and cannot write {e}",
                        "stage.method=int8 (torchao), or model.pretrained=<a full-precision llama, mistral, qwen2 "
                        "or gpt2 run>/model")]
    if arch == "gpt2":  # transformers' GGUF reader builds gpt2 with 1024 positions, whatever the file says
        return [Problem("stage.method", f"{st.method} measures the GGUF file as transformers reads it back, and "
                        "transformers cannot read a gpt2 GGUF with its own context length",
                        f"llmexp export <run dir> --format gguf --type {st.method} writes the file for llama.cpp; "
                        "stage=quantize takes llama, mistral and qwen2")]
    return []


def _check_model_source(key: str, source: str, offline: bool) -> List[Problem]:
    if not source.strip():  # an empty environment variable, say: Path("") is the working directory
        return [Problem(key, "is empty", "give a model directory (e.g. <run dir>/model) or a hub id")]
    path = Path(os.path.expanduser(source))
    looks_local = source.startswith((".", "/", "~")) or path.exists() or source.count("/") > 1
    if looks_local and path.is_file():
        model = path.parent / "model"
        return [Problem(key, f"{source!r} is a file, not a model directory",
                        f"{key}={model}" if (model / "config.json").is_file() else
                        "give a directory with config.json (e.g. <run dir>/model)")]
    if looks_local and not path.is_dir():
        return [Problem(key, f"directory {source!r} does not exist",
                        "give a directory with config.json (e.g. <run dir>/model)")]
    if not looks_local and offline:
        return [Problem(key, f"{source!r} is not a local directory and offline=true (no hub downloads)",
                        "set offline=false to download it, or give a local directory")]
    if looks_local:
        return _check_not_quantized(key, source, path)
    return []


def _made_by(model_dir: Path, group: str, key: str):
    """``<group>.<key>`` in the config.yaml of the run whose model ``model_dir`` is, else None."""
    from llmexp.record import run_of_model

    run = run_of_model(model_dir)
    run_config = run.config if run is not None else model_dir / "config.yaml"
    if not run_config.is_file():
        return None
    import yaml

    try:
        return ((yaml.safe_load(run_config.read_text()) or {}).get(group) or {}).get(key)
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def _check_not_quantized(key: str, source: str, path: Path) -> List[Problem]:
    """A stage=quantize int8/int4/autoround export holds torchao tensors or packed integer weights:
    a run from it trained a model of random weights (torchao's tensors are not restored outside
    generate/serve) or nothing at all (packed weights are buffers, not parameters)."""
    config = next((c for c in (path / "config.json", path / "model" / "config.json") if c.is_file()), None)
    try:
        quant = json.loads(config.read_text()).get("quantization_config") if config else None
    except (OSError, ValueError):
        return []
    if not isinstance(quant, dict) or quant.get("quant_method") not in ("torchao", "auto-round"):
        return []
    origin = _made_by(config.parent, "model", "pretrained")
    weights = f"{quant['bits']}-bit" if quant.get("bits") else "int8/int4"
    article = "an" if quant["quant_method"][0] in "aeiou" else "a"
    return [Problem(key, f"{source!r} is {article} {quant['quant_method']}-quantized export (stage=quantize): its "
                    f"{weights} weights load for generation and serving, not for training or quantizing again",
                    f"{key}={origin} (the model it quantized)" if origin else
                    "give the full-precision model it was quantized from")]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
