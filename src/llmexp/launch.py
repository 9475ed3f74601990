"""Runs started by an external launcher (torchrun, srun): every rank shares one run directory.

Hydra names a run directory by the time it starts, which differs between processes; under an
external launcher llmexp names it by the launcher's job id instead, which all ranks share.
"""

from __future__ import annotations

import os
from typing import Optional


def launcher_job_id() -> Optional[str]:
    """The job id of torchrun (rendezvous id) or SLURM (job and step), if one launched us."""
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_STEP_ID', '0')}"
    if os.environ.get("TORCHELASTIC_RUN_ID") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    return None


def shared_run_dir(run_name: str) -> Optional[str]:
    job = launcher_job_id()
    return f"runs/{run_name}/{job}" if job else None
