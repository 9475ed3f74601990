"""Lightning strategy objects from config.

ddp: Lightning's DDPStrategy. fsdp / tp: Lightning's ModelParallelStrategy with FSDP2 and a
tensor-parallel plan applied in StageModule.configure_model (see llmexp.parallel); checkpoints are
sharded (distributed checkpoint directories) and the export gathers full weights. deepspeed_zero2/3:
Lightning's DeepSpeedStrategy (CUDA only, ``pip install 'llmexp[deepspeed]'``). Each rank takes its own windows of samples (llmexp's WindowSampler),
and the loss is normalised by the global number of loss tokens, so N ranks compute exactly the
step a single process computes on the same global batch.
"""

from __future__ import annotations

from typing import Any

from llmexp.config.schema import RunConfig


def build_strategy(cfg: RunConfig) -> Any:
    """What Lightning's Trainer(strategy=...) receives for ``cfg.strategy.name``."""
    s = cfg.strategy
    if s.name == "auto":
        return "auto"
    if s.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend=s.backend, find_unused_parameters=s.find_unused_parameters)
    if s.name in ("fsdp", "tp"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        from llmexp.parallel_plans import mesh_shape

        dp, tp = mesh_shape(s.name, world_size(cfg), s.data_parallel_size, s.tensor_parallel_size)
        return ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp,
                                     save_distributed_checkpoint=True, process_group_backend=s.backend)
    if s.name.startswith("deepspeed"):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=3 if s.name.endswith("3") else 2, offload_optimizer=s.offload_optimizer,
                                 offload_parameters=s.offload_parameters)
    raise ValueError(f"unknown strategy {s.name!r}")  # validation refuses it earlier


def world_size(cfg: RunConfig) -> int:
    """Processes in the run: devices per node x nodes (devices must be a count for fsdp/tp)."""
    devices = cfg.trainer.devices
    return (int(devices) if str(devices).isdigit() else 1) * cfg.trainer.num_nodes


def data_parallel_size(cfg: RunConfig) -> int:
    """Data-parallel replicas, each taking its own windows of the training rows: the processes, less
    the tensor-parallel peers that share theirs (devices as Lightning counts them: a count, a list,
    or auto / -1: every CUDA device, one CPU process)."""
    s, t = cfg.strategy, cfg.trainer
    if s.name in ("fsdp", "tp"):
        from llmexp.parallel_plans import mesh_shape

        return mesh_shape(s.name, world_size(cfg), s.data_parallel_size, s.tensor_parallel_size)[0]
    devices = t.devices
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    elif str(devices).isdigit() and int(devices) > 0:
        n = int(devices)
    else:
        import torch

        n = torch.cuda.device_count() if t.accelerator != "cpu" and torch.cuda.is_available() else 1
    return n * t.num_nodes
