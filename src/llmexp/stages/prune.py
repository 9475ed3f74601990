"""Structured pruning as a stage: the run validates the trained model (``initial``), measures
importances on validation batches, removes the least important parts (llmexp.pruning), trains
the smaller model by SFT for ``trainer.max_steps`` (recovery; 0 for none), validates
(``final``) and exports a smaller model of the same architecture."""

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
        scores = importances(self.model, batches, head_dim, n_kv)
        kept = prune(self.model, scores, s.mlp_keep, s.kv_heads_keep, s.layers_keep)
        after = sum(p.numel() for p in self.model.parameters())
        self.pruned = {"parameters_before": before, "parameters_after": after,
                       "parameter_fraction": round(after / before, 4), "kept": kept,
                       "layer_influence": [round(x, 5) for x in scores["influence"]],
                       "sizes": {"intermediate_size": config.intermediate_size,
                                 "num_attention_heads": config.num_attention_heads,
                                 "num_key_value_heads": config.num_key_value_heads,
                                 "num_hidden_layers": config.num_hidden_layers}}

    def configure_optimizers(self):
        if self.cfg.trainer.max_steps == 0:
            return None  # no recovery steps: nothing to optimise
        return super().configure_optimizers()

    def summary_extras(self) -> Dict[str, Any]:
        return {"pruning": getattr(self, "pruned", None)}
