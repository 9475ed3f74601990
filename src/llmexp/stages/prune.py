"""Pruning as a stage: the run validates the trained model (``initial``), measures importances on
validation batches, removes the least important parts (llmexp.pruning) and/or zeroes the least
important weights (unstructured sparsity, kept zero through recovery), trains by SFT for
``trainer.max_steps`` steps (recovery; 0 for none), validates (``final``) and exports the model."""

from __future__ import annotations

import itertools
from typing import Any, Dict

from llmexp.stages.causal_lm import CausalLMStage


class PruneStage(CausalLMStage):
    loss_on_targets_only = True

    def setup(self, stage: str) -> None:
        """Prune once, when fit starts (after the initial validation, before the optimizer is
        built over the parameters; a resumed run prunes alike and then loads its checkpoint)."""
        if stage != "fit" or getattr(self, "pruned", None) is not None:
            return
        from llmexp.pruning import importances, prune

        s, config = self.cfg.stage, self.model.config
        device = self.trainer.strategy.root_device
        self.model.to(device)
        before = sum(p.numel() for p in self.model.parameters())
        n_kv = config.num_key_value_heads or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        batches = ({k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()}
                   for b in itertools.islice(self.trainer.datamodule.val_dataloader(), s.importance_batches))
        scores = importances(self.model, list(batches), head_dim, n_kv)
        kept = prune(self.model, scores, s.mlp_keep, s.kv_heads_keep, s.layers_keep)
        after = sum(p.numel() for p in self.model.parameters())
        self.sparsity = self._sparsify(device) if s.sparsity > 0 else None
        self.pruned = {"parameters_before": before, "parameters_after": after,
                       "parameter_fraction": round(after / before, 4), "kept": kept,
                       "layer_influence": [round(x, 5) for x in scores["influence"]],
                       "sizes": {"intermediate_size": config.intermediate_size,
                                 "num_attention_heads": config.num_attention_heads,
                                 "num_key_value_heads": config.num_key_value_heads,
                                 "num_hidden_layers": config.num_hidden_layers},
                       **({"sparsity": self.sparsity["measured"]} if self.sparsity else {})}
        if self.cfg.trainer.max_steps > 0:  # what recovery starts from (with none, final says it)
            score = self._task_score()
            if score is not None:
                self.pruned["task_score_before_recovery"] = round(score, 4)

    def _task_score(self):
        """The task metric of the pruned model before any recovery step: the damage the recovery
        SFT repairs (it took a second run with trainer.max_steps=0 to see)."""
        probe = getattr(self, "task_probe", None)
        if probe is None:
            return None
        import torch

        rank, world = self.trainer.datamodule._data_parallel_rank()
        total, n = probe.sums(lambda prompts, tools: self.greedy_answers(prompts, probe.max_new_tokens, tools),
                              rank, world)[
            "task_score"]
        sums = torch.tensor([float(total), float(n)], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        return float(sums[0] / sums[1].clamp(min=1))

    def _sparsify(self, device) -> Dict[str, Any]:
        """Zero ``stage.sparsity`` of each decoder linear's weights (scored on the validation
        batches for wanda); the masks are kept to zero them again after every optimizer step."""
        from llmexp.pruning import apply_masks, decoder_linears, input_norms, sparsity_masks, zero_fraction

        s = self.cfg.stage
        self._linears = decoder_linears(self.model)
        norms = None
        if s.sparsity_score == "wanda":
            batches = ({k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()}
                       for b in itertools.islice(self.trainer.datamodule.val_dataloader(), s.importance_batches))
            norms = input_norms(self.model, self._linears, batches)
        self._masks = sparsity_masks(self._linears, s.sparsity, norms)
        apply_masks(self._linears, self._masks)
        total = sum(p.numel() for p in self.model.parameters())
        zeros = sum(int((p == 0).sum()) for p in self.model.parameters())
        return {"measured": {"target": s.sparsity, "score": s.sparsity_score,
                             "linear_weights_zero": round(zero_fraction(self._linears), 4),
                             "parameters_zero": round(zeros / total, 4)}}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """Pruned weights stay zero: the optimizer step just taken may have moved them."""
        if getattr(self, "sparsity", None):
            from llmexp.pruning import apply_masks

            apply_masks(self._linears, self._masks)

    def configure_optimizers(self):
        if self.cfg.trainer.max_steps == 0:
            return None  # no recovery steps: nothing to optimise
        return super().configure_optimizers()

    def export(self, out_dir) -> Dict[str, Any]:
        """The pruned model's export, and how it compares with the model it came from (loaded
        again from model.pretrained to measure it)."""
        from pathlib import Path

        from transformers import AutoModelForCausalLM

        from llmexp.models.build import load_pretrained
        from llmexp.stages.compression import compression_record, describe, generation_speed

        facts = super().export(out_dir)
        if self.trainer.is_global_zero:
            source = self.cfg.model.pretrained
            original = load_pretrained(AutoModelForCausalLM, source, "model.pretrained", "a causal LM").to(self.device)
            original.config.pad_token_id = self.tokenizer.pad_token_id
            before = describe(self, original.eval(), Path(source))
            facts["compression"] = compression_record(before, self.model, Path(out_dir),
                                                      generation_speed(self, self.model))
        return facts

    def summary_extras(self) -> Dict[str, Any]:
        pruned = getattr(self, "pruned", None)
        if pruned and getattr(self, "sparsity", None):  # what the exported weights hold, after recovery
            from llmexp.pruning import zero_fraction

            pruned["sparsity"]["final_linear_weights_zero"] = round(zero_fraction(self._linears), 4)
        return {"pruning": pruned}
