"""Lightning loggers from config: always a CSV of metrics in the run directory, plus W&B."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from llmexp.config.schema import LoggerConfig


def build_loggers(cfg: LoggerConfig, run_dir: Path, run_name: str, config: Dict[str, Any]) -> List[Any]:
    from lightning.pytorch.loggers import CSVLogger

    loggers: List[Any] = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    if cfg.name == "wandb" and cfg.mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        wandb = WandbLogger(project=cfg.project, entity=cfg.entity, name=run_name, save_dir=str(run_dir),
                            offline=cfg.mode == "offline", tags=list(cfg.tags), config=config,
                            settings=_wandb_settings())
        loggers.append(wandb)
    return loggers


def _wandb_settings():
    import wandb

    # A run never waits on the network: no console capture, no code saving, quiet start.
    return wandb.Settings(console="off", save_code=False, silent=True, x_disable_stats=True)
