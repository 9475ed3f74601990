"""``model.compile``: torch.compile the forward that trains, and only that one."""

from __future__ import annotations

import torch


def compile_training_forward(model: torch.nn.Module) -> None:
    """Compile ``model`` in place (``nn.Module.compile``, inductor) for the calls that record a
    graph for backward; calls without gradient (validation, the task probe, generation, a rollout's
    old log-probs) run eager. Their shapes change with every call and each would compile again: a
    40-step run compiled 9 graphs, hit dynamo's recompile limit and spent most of its time
    compiling code that then ran once."""
    model.compile()
    compiled, eager = model._compiled_call_impl, model._call_impl  # what nn.Module.__call__ dispatches to

    def call(*args, **kwargs):
        return compiled(*args, **kwargs) if torch.is_grad_enabled() else eager(*args, **kwargs)

    model._compiled_call_impl = call
