"""Process environment for a run: offline by default, online when the user says so."""

from __future__ import annotations

import os

OFFLINE_VARS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
QUIET_VARS = {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0", "WANDB_SILENT": "true",
              "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
              "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def configure_environment(offline: bool) -> None:
    """Set the hub/W&B variables before transformers, datasets or wandb are imported.

    With ``offline=true`` (the default) nothing tries the network; a variable the user set
    explicitly is left alone, so e.g. HF_HUB_OFFLINE=0 still wins.
    """
    for key, value in QUIET_VARS.items():
        os.environ.setdefault(key, value)
    quiet_progress_bars()
    quiet_import_warnings()
    for key, value in OFFLINE_VARS.items():
        if offline:
            os.environ.setdefault(key, value)
        elif os.environ.get(key) == value:
            os.environ.pop(key)


def quiet_progress_bars() -> None:
    """Apply HF_HUB_DISABLE_PROGRESS_BARS to huggingface_hub and transformers when they were
    imported before it was set (Lightning's import pulls transformers in through torchmetrics, and
    transformers reads the variable once, at import): else every load and export of a model draws
    its "Loading weights" / "Writing model shards" bars into the run's output."""
    import sys

    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1":
        return
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers.utils.logging" in sys.modules:
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()


def quiet_import_warnings() -> None:
    """torchao (imported by transformers and peft when installed) logs a warning for each optional
    CUDA kernel library a CPU build lacks, and torch's pytree one per enum torchao registers;
    auto-round (loading a stage.method=autoround export) logs at INFO which kernel it chose, and
    sets its level from AR_LOG_LEVEL when imported (a user's own setting stays)."""
    import logging
    import os

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("AR_LOG_LEVEL", "WARNING")


# Library messages that say nothing to an llmexp user (the run record holds the facts).
_NOISE = (
    r".*Using ModelCheckpoint with manual optimization.*",
    r".*exists and is not empty.*",
    r".*LeafSpec.*",
    r".*does not have many workers.*",
    r".*litlogger.*",
    r".*sync_dist=True.*",
    r".*Detected an existing checkpoint in.*",  # llmexp reduces validation sums across ranks itself
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*configure_optimizers. returned .None., this fit will run with no optimizer.*",  # stage=quantize
    r".*`is_gradient_checkpointing` is deprecated.*",  # peft=lora: peft reads transformers' old attribute name
    # on every resume: llmexp's sampler restores the data position itself (exact resume, tests/test_resume.py)
    r".*your dataloader is not resumable.*",
    # a resume with another trainer.checkpoint_every_n_steps (a key a resume may change) asked for
    # the checkpoint callback's old settings
    r".*callbacks used to create the checkpoint need to be provided.*",
)


def quiet_libraries() -> None:
    """Keep Lightning's INFO chatter and known-harmless warnings out of the console."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
