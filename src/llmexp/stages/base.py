"""The one thin base LightningModule every stage builds on.

It owns what all stages share: the optimizer and schedule from config, one optimizer step over a
window of micro-batches (gradient accumulation normalised by the window's total loss weight, so
1x8 and 8x1 micro-batches give the same gradients), gradient clipping and the common metrics
(loss, lr, tokens/s, grad norm), and validation that sums over the whole set before dividing.
A stage implements ``micro_loss`` and ``val_sums``; rollout stages may override ``training_step``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import lightning as L
import torch

from llmexp.checkpointing import restore_rng_state, rng_state
from llmexp.config.schema import RunConfig
from llmexp.faults import check_finite
from llmexp.models.compiled import compile_training_forward
from llmexp.optim import build_optimizer
from llmexp.parallel import clip_grad_norm


def activation_checkpointing(model) -> bool:
    """Whether the model checkpoints activations; transformers 5 renamed the attribute and warns
    on the old name, which older releases alone have."""
    value = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if value is None else value)




class StageModule(L.LightningModule):
    def __init__(self, cfg: RunConfig, model: torch.nn.Module, tokenizer: Any):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.automatic_optimization = False
        self._val: Dict[str, List[torch.Tensor]] = {}
        self._step_started: float | None = None
        self._tokens_since_log = 0
        self._time_since_log = 0.0
        self.train_tokens = 0  # this process's, since it started (or resumed): global_tokens() counts every rank's
        self.tokens_before_resume = 0  # every rank's, up to the checkpoint a resumed run continues from
        self.train_seconds = 0.0
        self.last_val_metrics: Dict[str, float] = {}
        self.initial_metrics: Dict[str, float] = {}
        self.last_val_at: Tuple[str, int] = ("", -1)  # (trainer function, global step) of the last validation
        self.seconds_to_first_step: float | None = None
        self.lr_changed_on_resume: Dict[str, float] | None = None
        # Seconds the sessions before a resume spent up to the checkpoint it continues from; the run
        # sets session_started (its command's start), training sets fit_started.
        self.seconds_before_resume = {"wall": 0.0, "fit": 0.0}
        self.session_started = self.fit_started = time.time()

    # -- building and exporting ------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: RunConfig, tokenizer: Any) -> "StageModule":
        """Build the stage with its model(s). The default: the causal LM of ``cfg.model`` with
        ``cfg.peft`` adapters. Stages that need other models (a reward model, a reference, a
        value head) override this."""
        from llmexp.models.build import build_model
        from llmexp.models.peft import apply_peft, quantization_config

        model = build_model(cfg.model, tokenizer, quantization_config(cfg.peft))
        return cls(cfg, apply_peft(model, cfg.peft, cfg.model), tokenizer)

    def export(self, out_dir) -> Dict[str, Any]:
        """Write the trained model in HF format; return facts for summary.json. Called on every
        rank: sharded weights are gathered collectively, rank 0 writes (and keeps the exported
        whole model as ``self.model``)."""
        from llmexp.models.export import export_model

        model = self.whole_model()
        if self.trainer.is_global_zero:
            self.model = export_model(model, self.tokenizer, out_dir, self.cfg.peft.merge_on_export)
        return {"model_dir": str(out_dir)}

    def whole_model(self) -> Optional[torch.nn.Module]:
        """The model unsharded, for export and evaluation: the model itself in one process or
        under ddp; under fsdp/tp a copy rebuilt from config holding the gathered weights, on rank 0
        (None on the others). A collective under fsdp/tp: every rank must call it."""
        if not self.is_model_parallel:
            return self.model
        state = self.full_state_dict()
        if not self.trainer.is_global_zero:
            return None
        from llmexp.config.stages import stage_spec
        from llmexp.models.build import build_model
        from llmexp.models.peft import apply_peft

        head = stage_spec(self.cfg.stage.name).head
        model = build_model(self.cfg.model, self.tokenizer, head=head)
        model = apply_peft(model, self.cfg.peft, self.cfg.model, task_type="SEQ_CLS" if head == "score" else "CAUSAL_LM")
        model.load_state_dict(state)
        return model.eval()

    @property
    def run_dir(self) -> Optional[Path]:
        """The run's directory (the Trainer's default_root_dir); None outside a Trainer."""
        return Path(self._trainer.default_root_dir) if self._trainer is not None else None

    def can_share_prefixes(self, model) -> bool:
        """Whether forward passes may run a prefix shared by several rows once and repeat its
        cache to them: the model runs whole in this process with its cache (not sharded, not
        checkpointing activations, which turns the cache off)."""
        return not self.is_model_parallel and not activation_checkpointing(model)

    # -- model parallelism (fsdp / tp through Lightning's ModelParallelStrategy) -----------------
    @property
    def is_model_parallel(self) -> bool:
        from lightning.pytorch.strategies import ModelParallelStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy)

    def configure_model(self) -> None:
        """Shard the model over the device mesh, and compile it, once (validate and fit both call
        this hook)."""
        if getattr(self, "_configured", False):
            return
        self._configured = True
        if self.is_model_parallel:
            self._parallelize()
        if self.cfg.model.compile:
            compile_training_forward(self.model)

    def _parallelize(self) -> None:
        from llmexp import parallel

        s, mesh = self.cfg.strategy, self.device_mesh
        if mesh["tensor_parallel"].size() > 1:
            parallel.apply_tensor_parallel(self.model, mesh["tensor_parallel"], self.cfg.model.architecture,
                                           s.sequence_parallel)
        if s.activation_checkpointing:
            parallel.apply_activation_checkpointing(self.model)
        if s.name == "fsdp":
            dtype = torch.bfloat16 if self.cfg.trainer.precision.startswith("bf16") else None
            parallel.apply_fsdp(self.model, mesh["data_parallel"], s.reshard_after_forward, dtype)

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The unsharded weights on CPU (a collective: every rank must call it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def summary_extras(self) -> Dict[str, Any]:
        """Stage-specific facts for summary.json (beyond initial/final validation metrics)."""
        return {}

    # -- what a stage provides -------------------------------------------------------------------
    def encoder(self, fmt: str):
        """A function mapping one prepared row (canonical columns) to the stage's encoded sample."""
        raise NotImplementedError

    def collate(self, rows):
        """Encoded samples -> one micro-batch dict, with int ``num_tokens`` and ``loss_weight``."""
        raise NotImplementedError

    @property
    def pad_to_multiple_of(self) -> int:
        """Sequence parallelism splits each batch's length over the tensor-parallel ranks; a compiled
        model trains on packed rows padded to their full length (one shape: one compile, where a
        shorter batch would compile the forward and backward again)."""
        from llmexp.parallel_plans import mesh_shape

        s = self.cfg.strategy
        split = 1
        if s.sequence_parallel and s.name in ("tp", "fsdp"):
            world = self.trainer.world_size if self._trainer is not None else 1
            split = mesh_shape(s.name, world, s.data_parallel_size, s.tensor_parallel_size)[1]
        if self.cfg.model.compile and self.cfg.data.packing:
            return -(-self.cfg.data.max_length // split) * split
        return split

    def micro_loss(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Sum of the loss terms of one micro-batch (normalised by the base) and extra metric sums."""
        raise NotImplementedError

    def val_sums(self, batch: Dict[str, Any]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Metric name -> (sum, count) over one validation batch; the base divides after the pass."""
        raise NotImplementedError

    def derived_metrics(self, means: Dict[str, float]) -> Dict[str, float]:
        """Metrics computed from the validation means (e.g. perplexity from loss)."""
        return {}

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        # Sharded (DTensor) parameters take the foreach path; plain ones the fused kernel.
        opt, sched = build_optimizer(self.model, self.cfg.optim, self.cfg.trainer.max_steps,
                                     default_fused=not self.is_model_parallel)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        """After a resume restored the scheduler: optim.lr may have changed, and the new one wins."""
        from llmexp.optim import rebase_lr

        self.fit_started = time.time()
        old = rebase_lr(self.optimizers().optimizer, self.lr_schedulers(), self.cfg.optim.lr)
        if old is not None:
            self.lr_changed_on_resume = {"from": old, "to": self.cfg.optim.lr}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, window: List[Dict[str, Any]], batch_idx: int):
        opt = self.optimizers()
        sched = self.lr_schedulers()
        weight = sum(mb["loss_weight"] for mb in window)
        world_weight = self._global_sum(weight)
        scale = self.trainer.world_size / max(world_weight, 1)
        total = torch.zeros((), device=self.device)
        extra_totals: Dict[str, torch.Tensor] = {}
        for mb in window:
            loss_sum, extras = self.micro_loss(mb)
            self.manual_backward(loss_sum * scale)
            total += loss_sum.detach()
            for k, v in extras.items():
                extra_totals[k] = extra_totals.get(k, 0) + v.detach()
        grad_norm = self._clip_and_measure(opt)
        check_finite(total, grad_norm, self.global_step + 1, self.run_dir)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        self._record_throughput(sum(mb["num_tokens"] for mb in window))
        if self.seconds_to_first_step is None:
            self.seconds_to_first_step = time.time() - self.session_started  # the run's start, as wall_seconds
        if self.global_step % self.cfg.trainer.log_every_n_steps:  # log only what will be written
            return total / max(weight, 1)
        if self.trainer.world_size > 1:  # log the global loss, not rank 0's share
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
            extra_totals = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in extra_totals.items()}
        denom = max(world_weight, 1)
        self.log("train/loss", total / denom, prog_bar=True, on_step=True, batch_size=int(denom))
        for k, v in extra_totals.items():
            self.log(f"train/{k}", v / denom, on_step=True, batch_size=int(denom))
        if grad_norm is not None:
            self.log("train/grad_norm", grad_norm, on_step=True)
        self.log("train/lr", sched.get_last_lr()[0], on_step=True)
        return total / denom

    # -- checkpoints: what Lightning does not save by itself -------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        per_rank = self._rng_states_of_all_ranks()
        checkpoint["llmexp"] = {"rng": per_rank[0], "rng_per_rank": per_rank, "initial_metrics": self.initial_metrics,
                                "train_tokens": self.global_tokens(), "train_seconds": self.train_seconds,
                                "wall_seconds": self.seconds_before_resume["wall"] + time.time() - self.session_started,
                                "fit_seconds": self.seconds_before_resume["fit"] + time.time() - self.fit_started,
                                **self.export_facts()}

    def export_facts(self) -> Dict[str, Any]:
        """What ``llmexp export --checkpoint`` needs besides the weights: the trained model's config
        (as trained: a pruned model's sizes are not the config's) and generation config, and the
        last validation's metrics with its step (a reward model's score scale is measured there)."""
        import json

        from llmexp.secrets import redact

        def written(config) -> str:  # as export writes it: a secret in model.extra stays out
            return json.dumps(redact(json.loads(config.to_json_string(use_diff=False))))

        generation = getattr(self.model, "generation_config", None)
        return {"model_config": written(self.model.config),
                "generation_config": written(generation) if generation is not None else None,
                "val_metrics": {k: float(v) for k, v in self.last_val_metrics.items()},
                "val_step": self.last_val_at[1] if self.last_val_at[0] in ("fit", "validate") else None}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state = checkpoint.get("llmexp", {})
        self.initial_metrics = state.get("initial_metrics", {})
        self.tokens_before_resume, self.train_tokens = state.get("train_tokens", 0), 0
        self.train_seconds = state.get("train_seconds", 0.0)
        self.seconds_before_resume = {"wall": state.get("wall_seconds", 0.0), "fit": state.get("fit_seconds", 0.0)}
        per_rank = state.get("rng_per_rank") or []
        rank = self.global_rank if self._trainer is not None else 0
        if rank < len(per_rank):  # each rank continues its own random stream (dropout, sampling)
            restore_rng_state(per_rank[rank])
        elif "rng" in state:
            restore_rng_state(state["rng"])

    def _rng_states_of_all_ranks(self) -> List[Dict[str, Any]]:
        """Every rank's RNG state (the checkpoint is written by rank 0 alone); a collective."""
        state = rng_state()
        if self._trainer is None or self.trainer.world_size == 1:
            return [state]
        import torch.distributed as dist

        states: List[Any] = [None] * self.trainer.world_size
        dist.all_gather_object(states, state)
        return states

    def _global_sum(self, value: float) -> float:
        if self._trainer is None or self.trainer.world_size == 1:
            return float(value)
        t = torch.tensor(float(value), device=self.device)
        return float(self.trainer.strategy.reduce(t, reduce_op="sum"))

    def _clip_and_measure(self, opt) -> torch.Tensor | None:
        clip = self.cfg.trainer.gradient_clip_val
        if self.cfg.trainer.precision.startswith("16"):  # the grad scaler unscales inside Lightning
            if clip:
                self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
            return None
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return None
        return clip_grad_norm(params, clip if clip else math.inf)

    def _record_throughput(self, tokens: int) -> None:
        elapsed = time.perf_counter() - (self._step_started or time.perf_counter())
        self.train_tokens += tokens
        self.train_seconds += elapsed
        self._tokens_since_log += tokens
        self._time_since_log += elapsed
        if self.global_step % self.cfg.trainer.log_every_n_steps == 0 and self._time_since_log > 0:
            self.log("train/tokens_per_second", self._all_ranks(self._tokens_since_log) / self._time_since_log,
                     on_step=True)
            self._tokens_since_log, self._time_since_log = 0, 0.0

    def _all_ranks(self, tokens: int) -> int:
        """``tokens`` of this process summed over the data-parallel ranks (a collective): tensor-parallel
        peers train on the same tokens and count once."""
        if self.trainer.world_size == 1:
            return tokens
        from llmexp.strategies import data_parallel_size

        total = self.trainer.strategy.reduce(torch.tensor(float(tokens), device=self.device), reduce_op="sum")
        return int(round(float(total) * data_parallel_size(self.cfg) / self.trainer.world_size))

    def global_tokens(self) -> int:
        """The tokens trained on by every rank, the sessions before a resume included (a collective;
        summary.json had rank 0's alone, half the count under 2-process ddp)."""
        return self.tokens_before_resume + self._all_ranks(self.train_tokens)

    # -- generation (the task metric here; rollouts in rollout.py) -------------------------------
    @torch.no_grad()
    def generate_responses(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                           engine: str = "hf", alone: bool = False, **sampling: Any) -> torch.Tensor:
        """Responses ``[B, T]`` to left-padded prompts (pad after eos), greedy unless ``sampling``
        says otherwise: by llmexp's decode loop, or ``engine="generate"`` by transformers'
        ``model.generate``. Sharded models generate in lockstep across ranks, unless ``alone``: one
        rank generating with a whole model (rank 0 after an export)."""
        lockstep = self.is_model_parallel and self.trainer.world_size > 1 and not alone
        if engine == "hf" and not sampling:
            from llmexp.sampler import Sampler

            sampler = Sampler(self.model, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, lockstep=lockstep)
            return sampler(prompt_ids, prompt_mask, max_new_tokens, greedy=True).responses
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                                  min_new_tokens=1, pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=self.tokenizer.eos_token_id, use_cache=True, synced_gpus=lockstep,
                                  **(sampling or {"do_sample": False}))
        self.model.train(was_training)
        return out[:, prompt_ids.shape[1]:]

    def greedy_responses(self, prompts: List[Any], max_new_tokens: int, alone: bool = False,
                         tools: Optional[List[Any]] = None) -> torch.Tensor:
        """Greedy response token ids ``[B, T]`` (pad after eos) to prompts (chat messages or strings,
        each with the ``tools`` of its conversation, if any); ``alone`` as in generate_responses."""
        from llmexp.data.collate import collate_prompts
        from llmexp.data.encode import render_prompt

        rows = [{"input_ids": render_prompt(self.tokenizer, p, t), "prompt": p, "columns": {}}
                for p, t in zip(prompts, tools or [None] * len(prompts))]
        batch = collate_prompts(rows, self.tokenizer.pad_token_id)
        return self.generate_responses(batch["prompt_ids"].to(self.device), batch["prompt_mask"].to(self.device),
                                       max_new_tokens, alone=alone)

    def greedy_answers(self, prompts: List[Any], max_new_tokens: int, tools: Optional[List[Any]] = None) -> List[str]:
        """Greedy answer texts to prompts (chat messages or strings), as a user would get them."""
        responses = self.greedy_responses(prompts, max_new_tokens, tools=tools)
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in responses.tolist()]

    def _task_sums(self) -> None:
        """Add the task metric's sums (greedy answers to held-out prompts) to this validation pass."""
        probe = getattr(self, "task_probe", None)
        if probe is None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        rank, world = dm._data_parallel_rank() if dm is not None else (0, 1)
        sums = probe.sums(lambda prompts, tools: self.greedy_answers(prompts, probe.max_new_tokens, tools), rank, world)
        for name, (s, n) in sums.items():
            self._val[name] = [torch.tensor(float(s), device=self.device, dtype=torch.float64),
                               torch.tensor(float(n), device=self.device, dtype=torch.float64)]
        answers = probe.answers
        if world > 1 and probe.log_answers:  # every rank's share (rank 0 recorded its own alone); a collective
            import torch.distributed as dist

            shares: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(shares, answers)
            answers = list({a["index"]: a for share in shares for a in share}.values())  # model-parallel twins once
        if answers and self.trainer.is_global_zero and self.run_dir is not None:
            self._record_answers(sorted(answers, key=lambda a: a["index"]))

    def _record_answers(self, answers: List[Dict[str, Any]]) -> None:
        """task.log_answers: this validation's greedy answers to the recorded prompts (spread over
        all of them, asked by every rank) in answers.jsonl, and as a W&B table."""
        from llmexp.record import append_answers, prompt_text

        answers = [{k: v for k, v in a.items() if k != "index"} for a in answers]

        step = self.trainer.global_step
        append_answers(self.run_dir, step, answers)
        rows = [[step, prompt_text(a["prompt"]), a["answer"], a["score"]] for a in answers]
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_table"):  # W&B
                logger.log_table(key="val/answers", columns=["step", "prompt", "answer", "score"], data=rows,
                                 step=step)

    # -- validation ------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = {}

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        for name, (s, n) in self.val_sums(batch).items():
            acc = self._val.setdefault(name, [torch.zeros((), device=self.device, dtype=torch.float64)] * 2)
            self._val[name] = [acc[0] + s.detach().double(), acc[1] + torch.as_tensor(n, device=self.device).double()]

    def on_validation_epoch_end(self) -> None:
        self._task_sums()
        means = {}
        for name, (s, n) in self._val.items():
            if self.trainer.world_size > 1:
                s = self.trainer.strategy.reduce(s, reduce_op="sum")
                n = self.trainer.strategy.reduce(n, reduce_op="sum")
            means[name] = float(s / n.clamp(min=1))
        means.update(self.derived_metrics(means))
        self.last_val_metrics = {f"val/{k}": v for k, v in means.items()}
        self.last_val_at = (getattr(self.trainer.state.fn, "value", ""), self.trainer.global_step)
        for k, v in self.last_val_metrics.items():
            self.log(k, v, sync_dist=False, prog_bar=k == "val/loss")
