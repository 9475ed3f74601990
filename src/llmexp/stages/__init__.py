"""The LightningModules of the stages; which class a stage name means is the stage registry's
(llmexp.config.stages), imported only when a run starts."""

from __future__ import annotations


def stage_class(name: str):
    from llmexp.config.stages import stage_spec

    return stage_spec(name).load()
