"""The health guard of post-training: the known signs of a collapsing run, checked on the metrics
the stage logs, each with what to change.

A sign counts once it shows on ``health.patience`` logged steps in a row (one noisy batch is not a
collapse); the task metric is checked at every validation pass. ``health.action`` says what a
sign does: ``warn`` (the log, the progress bar and summary.json's ``health``), ``stop`` (the run
ends with exit code 4, keeping the last checkpoint written before; with ``trainer.keep_best`` and a
validation already kept, it stops there and exports that validation's model first) or ``off``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import lightning as L

from llmexp.config.schema import HealthConfig
from llmexp.errors import UserError

FIXES = {
    "kl_runaway": "the policy is running away from its reference: lower optim.lr, or raise stage.kl_coef",
    "logp_drop": "the preference loss is pushing the chosen answers down too (the model forgets them): lower "
                 "optim.lr or trainer.max_steps, or raise stage.rpo_alpha (dpo; or stage.beta), stage.cpo_alpha "
                 "(simpo)",
    "length_collapse": "responses are collapsing to a few tokens: lower optim.lr, raise stage.kl_coef, and "
                       "check that the reward does not favour short answers",
    "length_at_cap": "responses run to stage.rollout.max_new_tokens without ending: lower optim.lr, or set "
                     "stage.reward.missing_eos_penalty=-1",
    "entropy_collapse": "the policy samples (nearly) one answer: lower optim.lr or raise "
                        "stage.rollout.temperature",
    "no_reward_signal": "every sampled answer gets the same reward, so nothing is learnt: check the reward "
                        "and the data's answer column, raise stage.rollout.temperature or stage.group_size",
    "task_drop": "the stage is making the model worse at its task (val/task_score): lower optim.lr or "
                 "trainer.max_steps",
}
EXPORT_BEST = ", or export the best validation's model (trainer.monitor=val/task_score trainer.keep_best=true)"
FIXES["task_drop"] += EXPORT_BEST
EXIT_HEALTH = 4


class HealthStop(UserError):
    """``health.action=stop`` and a failure sign showed."""

    exit_code = EXIT_HEALTH


def step_signs(m: Dict[str, float], start: Dict[str, float], cfg: HealthConfig, stage: str,
               max_new_tokens: Optional[int], peak: Optional[Dict[str, float]] = None,
               task_converging: bool = False) -> Dict[str, str]:
    """Sign name -> what was seen, for one logged step's metrics ``m``; ``start`` holds the
    first logged values (DPO's chosen log-prob at the start), ``peak`` the highest ones before;
    ``task_converging``: the task metric rose above its start at the last validation pass, or it
    started with every held-out answer right (see HealthGuard.converging)."""
    signs: Dict[str, str] = {}
    length = m.get("train/response_length")
    kl = m.get("train/kl")
    if kl is not None:
        per_response = kl * length if stage == "grpo" and length is not None else kl  # grpo logs it per token
        if per_response > cfg.max_kl:
            signs["kl_runaway"] = f"KL to the reference {per_response:.2f} nats per response > health.max_kl={cfg.max_kl}"
    logp, logp0 = m.get("train/logp_chosen"), start.get("train/logp_chosen")
    if logp is not None and logp0 is not None and logp0 - logp > cfg.max_logp_drop:
        signs["logp_drop"] = (f"log-prob of the chosen answers {logp:.1f}, down {logp0 - logp:.1f} nats from "
                              f"{logp0:.1f} > health.max_logp_drop={cfg.max_logp_drop}")
    if length is not None:
        if length < cfg.min_response_tokens:
            signs["length_collapse"] = f"mean response length {length:.1f} tokens < health.min_response_tokens"
        elif max_new_tokens and length >= cfg.max_length_fraction * max_new_tokens:
            signs["length_at_cap"] = (f"mean response length {length:.1f} of at most {max_new_tokens} tokens "
                                      f"(>= health.max_length_fraction={cfg.max_length_fraction})")
    entropy = m.get("train/entropy")
    # A policy that samples one answer while its held-out answers got better (or were all right from
    # the start) is converging on the right ones (a deterministic task's optimum), not collapsing.
    if entropy is not None and entropy < cfg.min_entropy and not task_converging:
        signs["entropy_collapse"] = f"mean entropy {entropy:.4f} nats < health.min_entropy={cfg.min_entropy}"
    if m.get("train/reward_std") == 0.0 and not solved(m, start, peak or {}):
        signs["no_reward_signal"] = "reward std 0 over the rollout batch"
    return signs


def solved(m: Dict[str, float], start: Dict[str, float], peak: Dict[str, float]) -> bool:
    """Every response scored the same because the policy got them all as right as it ever has:
    the mean reward rose from its start to its highest yet (a broken reward stays where it began)."""
    mean, first = m.get("train/reward_mean"), start.get("train/reward_mean")
    return mean is not None and first is not None and mean > first and mean >= peak.get("train/reward_mean", mean)


def task_sign(score: Optional[float], initial: Optional[float], cfg: HealthConfig,
              final: bool = False) -> Dict[str, str]:
    """``task_drop`` when the task metric fell further below its start than allowed: during training
    ``max_task_drop`` (early dips recover), at the last validation ``max_final_task_drop`` (what the
    export keeps)."""
    if score is None or initial is None:
        return {}
    limit, key = (cfg.max_final_task_drop, "max_final_task_drop") if final else (cfg.max_task_drop, "max_task_drop")
    if initial - score <= limit:
        return {}
    when = "ends at" if final else ""
    return {"task_drop": f"val/task_score {when + ' ' if when else ''}{score:.3f}, down from {initial:.3f} at the "
                         f"start (> health.{key}={limit})"}


class HealthGuard(L.Callback):
    """Checks every logged step and validation pass; keeps what it found for summary.json."""

    def __init__(self, cfg: HealthConfig, stage: str, max_new_tokens: Optional[int], run_dir: Any = None,
                 best: Any = None):
        self.cfg, self.stage, self.max_new_tokens, self.run_dir = cfg, stage, max_new_tokens, run_dir
        self.best = best  # the run's BestValidation (trainer.monitor), or None
        self.stopped: Optional[Dict[str, Any]] = None  # the sign that stopped the run, its best model exported
        self.start: Dict[str, float] = {}
        self.peak: Dict[str, float] = {}
        self.task_improved = False
        self.streak: Dict[str, int] = {}
        self.warnings: List[Dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % pl_module.cfg.trainer.log_every_n_steps:
            return  # metrics are logged on these steps only
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        for k, v in m.items():
            self.start.setdefault(k, v)
        signs = step_signs(m, self.start, self.cfg, self.stage, self.max_new_tokens, self.peak,
                           self.converging(pl_module))
        for k, v in m.items():
            self.peak[k] = max(self.peak.get(k, v), v)
        for name in list(self.streak):
            if name not in signs:
                self.streak[name] = 0
        for name, seen in signs.items():
            self.streak[name] = self.streak.get(name, 0) + 1
            if self.streak[name] == self.cfg.patience:
                self._raise(trainer, pl_module, name, seen)
        if self.warnings:
            pl_module.log("health/warnings", float(len(self.warnings)), on_step=True, prog_bar=True)

    def converging(self, pl_module) -> bool:
        """The task metric rose above its start at the last validation pass, or the model answered
        every held-out prompt right before training (GRPO from a 1.000 SFT samples one answer per
        question by step 240 while its reward is 0.996: the optimum, not a collapse; a fall of the
        task metric itself is task_drop's to report)."""
        return self.task_improved or pl_module.initial_metrics.get("val/task_score") == 1.0

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit" and not pl_module.initial_metrics:
            return  # the pass before training: nothing to compare with yet
        score = pl_module.last_val_metrics.get("val/task_score")
        initial = pl_module.initial_metrics.get("val/task_score")
        self.task_improved = score is not None and initial is not None and score > initial
        final = bool(trainer.max_steps) and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        for name, seen in task_sign(score, initial, self.cfg, final).items():
            if not any(w["sign"] == name and w["step"] == trainer.global_step for w in self.warnings):
                self._raise(trainer, pl_module, name, seen)

    def _raise(self, trainer, pl_module, name: str, seen: str) -> None:
        step = trainer.global_step
        self.warnings.append({"sign": name, "step": step, "seen": seen, "fix": self._fix(name)})
        # after the last step, or once stopped: record only
        stop = self.cfg.action == "stop" and trainer.state.fn == "fit" and self.stopped is None
        if stop and self.best is not None and self.best.keep and self.best.step is not None \
                and self.best.step < step:  # a validation before the sign showed (not the collapse itself)
            # Stop on every rank (the metrics judged are the ranks' reduced ones, the same on each);
            # the run then ends as usual but for last.ckpt, exporting its best validation's model.
            trainer.should_stop = True
            self.stopped = {"sign": name, "step": step, "seen": seen}
        if not trainer.is_global_zero:
            return
        from rich.console import Console

        Console(stderr=True).print(f"[bold yellow]health[/] step {step}: {name}: {seen}\n  fix: {self._fix(name)}",
                                   highlight=False)
        if stop and self.stopped is None:
            raise HealthStop(f"health.action=stop: {name} at step {step}: {seen}. {self._kept()} "
                             f"Fix: {self._fix(name)}; or set health.action=warn to let the run go on")

    def _fix(self, name: str) -> str:
        """What to change for sign ``name`` (not to export the best validation where the run does)."""
        keeps_best = self.best is not None and self.best.keep and self.best.monitor == "val/task_score"
        return FIXES[name].removesuffix(EXPORT_BEST) if keeps_best else FIXES[name]

    def stop_error(self, model_dir: Any) -> Optional[HealthStop]:
        """The exit of a run this guard stopped after exporting its best validation's model, or None."""
        if self.stopped is None:
            return None
        name, step, seen = self.stopped["sign"], self.stopped["step"], self.stopped["seen"]
        b = self.best
        return HealthStop(f"health.action=stop: {name} at step {step}: {seen}. The run stopped there and exported "
                          f"its best validation's model (step {b.step}, {b.monitor} {b.value:.4f}) to {model_dir}: "
                          f"train on from it in a new run with model.pretrained={model_dir}. Fix: {self._fix(name)}; "
                          f"or set health.action=warn to let a run go on")

    def _kept(self) -> str:
        from llmexp.record import RunDir

        ckpt = RunDir(self.run_dir or ".").checkpoint_to_resume()
        if ckpt is not None:
            return f"The run stopped without saving; {ckpt} (written before) is kept."
        return "The run stopped without saving (no checkpoint had been written before)."

    def summary(self) -> Dict[str, Any]:
        """What summary.json records of the guard."""
        out: Dict[str, Any] = {"action": self.cfg.action, "warnings": self.warnings}
        if self.stopped is not None:
            out["stopped"] = dict(self.stopped)
        return {"health": out}


def lr_scale_note(stage: str, parameters: int, lr: float) -> Optional[str]:
    """A warning when a large model gets the bundled tiny model's post-training lr: the stage
    defaults suit the ~1M-parameter models llmexp builds offline; real models want ~1e-6."""
    from llmexp.config.stages import stage_spec

    spec = stage_spec(stage)
    if (spec.post_training or not spec.language_model) and parameters >= 100_000_000 and lr > 1e-4:
        return (f"optim.lr={lr:g} is the stage default for llmexp's tiny models, but this model has "
                f"{parameters / 1e9:.2f}B parameters: set optim.lr (about 1e-6 for dpo/ppo/grpo, 1e-5 for rm) "
                f"or use a model option that ships real-size settings (conf/scale/, e.g. model=llama_1b)")
    return None


# Below this held-out pair accuracy a reward model's ranking is mostly noise (chance is 0.5).
WEAK_REWARD_MODEL = 0.65


def reward_model_note(reward_cfg) -> Optional[str]:
    """A warning when the policy is to follow a reward model that barely ranks its own held-out
    pairs: its normalised scores (divided by half its held-out margin, RewardConfig.normalize) are
    then mostly noise, magnified (a 3-step reward model at 0.56 had a margin of 0.003, so its
    scores were multiplied by ~660, and PPO against it ran every answer to the length cap)."""
    import json
    from pathlib import Path

    if not getattr(reward_cfg, "model", None):
        return None
    try:
        config = json.loads((Path(reward_cfg.model).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    accuracy = config.get("llmexp_heldout_accuracy")
    if accuracy is None or accuracy >= WEAK_REWARD_MODEL:
        return None
    scale = config.get("llmexp_score_scale")
    magnified = (f"; its scores are divided by half its held-out margin ({scale:.3g})"
                 if reward_cfg.normalize and scale else "")
    return (f"stage.reward.model ranks its held-out pairs at {accuracy:.2f} (chance is 0.5), so the policy will "
            f"mostly follow noise{magnified}: train the reward model further (its val/accuracy) before this stage")


def watched(stage: str) -> bool:
    """Stages the guard watches: post-training of a language model."""
    from llmexp.config.stages import stage_spec

    return stage_spec(stage).post_training

