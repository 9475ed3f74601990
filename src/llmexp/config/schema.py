"""Typed schemas of every config group.

The YAML files in conf/ are the options; these dataclasses are the contract they (and any
command-line override) must meet. Field metadata carries what OmegaConf cannot express:
``choices`` (valid names) and ``min``/``max`` bounds, checked by :mod:`llmexp.config.check`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

ARCHITECTURES = ("llama", "gpt2", "qwen2", "mistral")
DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
SCHEDULERS = ("cosine", "linear", "constant")
DATA_SOURCES = ("bundled", "files", "hf")
DATA_FORMATS = ("auto", "text", "chat", "prompt_completion")
PREP_STEPS = ("normalize", "filter_length", "dedup")
OVERLONG = ("truncate", "drop", "split")
LOGGERS = ("wandb", "csv", "none")
WANDB_MODES = ("offline", "online", "disabled")
PEFT_METHODS = ("none", "lora", "qlora")
STRATEGIES = ("auto", "ddp", "fsdp", "tp", "deepspeed_zero2", "deepspeed_zero3")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def choice(default: Any, choices: tuple, **kw: Any) -> Any:
    return field(default=default, metadata={"choices": choices, **kw})


def bounded(default: Any, *, min: float | None = None, max: float | None = None) -> Any:  # noqa: A002
    return field(default=default, metadata={"min": min, "max": max})


@dataclass
class ModelConfig:
    name: str = "llama"
    architecture: str = choice("llama", ARCHITECTURES)
    # Local directory or hub id with weights and tokenizer; None: initialise from architecture.
    pretrained: Optional[str] = None
    # None: the pretrained model's tokenizer, else llmexp's bundled one; "train": a BPE
    # tokenizer trained on this run's data (cached); or a local dir / hub id.
    tokenizer: Optional[str] = None
    hidden_size: int = bounded(64, min=8)
    num_layers: int = bounded(2, min=1)
    num_heads: int = bounded(4, min=1)
    num_kv_heads: Optional[int] = bounded(None, min=1)
    intermediate_size: int = bounded(256, min=1)
    max_position_embeddings: int = bounded(512, min=16)
    # Architecture-specific keys passed as-is to the transformers config (rope_theta, ...).
    extra: Dict[str, Any] = field(default_factory=dict)
    dtype: str = choice("float32", DTYPES)
    attn_implementation: Optional[str] = choice("sdpa", ("sdpa", "eager", "flash_attention_2", None))
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # torch.compile the model's forward (inductor; the first steps pay the compile time).
    compile: bool = False
    # Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (CUDA only: pip install 'llmexp[liger]').
    liger_kernel: bool = False


@dataclass
class PretrainStageConfig:
    name: str = "pretrain"


@dataclass
class SFTStageConfig:
    name: str = "sft"
    assistant_only_loss: bool = True


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
DPO_REFERENCES = ("copy", "adapter_disabled", "precomputed")
KL_CONTROLS = ("fixed", "adaptive")


@dataclass
class RewardModelStageConfig:
    """Bradley-Terry reward model: a one-label sequence classifier scoring prompt+response."""

    name: str = "rm"
    # Required score gap: loss = -log sigmoid(r_chosen - r_rejected - margin).
    margin: float = bounded(0.0, min=0.0)
    # Penalty on the squared scores (keeps them centred; 0 turns it off).
    center_rewards_coefficient: float = bounded(0.0, min=0.0)


@dataclass
class DPOStageConfig:
    name: str = "dpo"
    loss_type: str = choice("sigmoid", DPO_LOSSES)
    beta: float = bounded(0.1, min=0.0)
    # sigmoid (conservative DPO) and robust: the assumed fraction of flipped preference labels.
    label_smoothing: float = bounded(0.0, min=0.0, max=0.49)
    # copy: a frozen copy of the starting policy; adapter_disabled: with LoRA, the base model with
    # the adapter switched off (no second copy); precomputed: reference log-probs computed once
    # before training, then the reference is freed.
    reference: str = choice("copy", DPO_REFERENCES)
    # Weight of the chosen answers' mean token NLL added to the DPO loss (TRL's rpo_alpha; RPO,
    # Pang et al. 2024): keeps the chosen answers likely while the margin grows.
    rpo_alpha: float = bounded(1.0, min=0.0)


@dataclass
class RewardConfig:
    """Where ppo/grpo rewards come from: a reward function by name, or a reward model directory."""

    # A registered reward function (llmexp plugins lists them); ignored when `model` is set.
    function: Optional[str] = "arithmetic_correct"
    # An rm run's exported model (<run dir>/model) or any one-label sequence classifier.
    model: Optional[str] = None
    # Added to the score of a response that never emits eos within max_new_tokens (e.g. -1.0).
    missing_eos_penalty: Optional[float] = None
    # A reward model's scores mapped with the center/scale its rm run measured on held-out
    # pairs (mean chosen -> +1, mean rejected -> -1), the scale of a 0/1 rule reward, so that
    # kl_coef and the critic mean the same for both. Models without them are used as they score.
    normalize: bool = True


@dataclass
class RolloutConfig:
    """Sampling of responses from the policy (shared by ppo and grpo)."""

    max_new_tokens: int = bounded(16, min=1)
    temperature: float = bounded(1.0, min=0.01)
    top_k: int = bounded(0, min=0)
    top_p: float = bounded(1.0, min=0.01, max=1.0)
    # Held-out prompts scored with greedy responses for val/reward.
    val_max_new_tokens: Optional[int] = bounded(None, min=1)


@dataclass
class PPOStageConfig:
    name: str = "ppo"
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # Optimisation passes over each rollout batch, each split into num_minibatches updates.
    ppo_epochs: int = bounded(4, min=1)
    num_minibatches: int = bounded(1, min=1)
    clip_range: float = bounded(0.2, min=0.0)
    clip_range_value: float = bounded(0.2, min=0.0)
    value_loss_coef: float = bounded(0.1, min=0.0)
    gamma: float = bounded(1.0, min=0.0, max=1.0)
    lam: float = bounded(0.95, min=0.0, max=1.0)
    # Per-token KL penalty to the frozen reference: fixed coefficient, or adapted towards kl_target.
    kl_coef: float = bounded(0.05, min=0.0)
    kl_control: str = choice("fixed", KL_CONTROLS)
    kl_target: float = bounded(6.0, min=0.0)
    kl_horizon: int = bounded(10000, min=1)
    whiten_advantages: bool = True
    # Divide the per-token KL+score rewards by a running std (stabilises the critic).
    whiten_rewards: bool = False


@dataclass
class GRPOStageConfig:
    name: str = "grpo"
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # Responses sampled per prompt; advantages are relative to their group.
    group_size: int = bounded(8, min=2)
    # Divide advantages by the group's reward std (false: only subtract the mean, as Dr. GRPO).
    scale_rewards: bool = True
    # Optimisation passes over each rollout batch (>1 makes the clipped ratio matter).
    epochs: int = bounded(1, min=1)
    clip_range: float = bounded(0.2, min=0.0)
    # Weight of the KL to the frozen reference in the loss, as ppo's kl_coef (0: no reference
    # model is built).
    kl_coef: float = bounded(0.0, min=0.0)


# Stage name -> schema of stage/<name>.yaml.


@dataclass
class FieldMap:
    """Which column of the source data holds each field a stage format needs."""

    text: str = "text"
    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    chosen: str = "chosen"
    rejected: str = "rejected"
    answer: str = "answer"


@dataclass
class DataConfig:
    name: str = "arithmetic"
    source: str = choice("bundled", DATA_SOURCES)
    # bundled: a dataset registered by llmexp or a plugin (llmexp_datasets hook), chosen by `name`;
    # files: a file, directory or glob; hf: dataset id or saved dataset dir.
    path: Optional[str] = None
    split: str = "train"
    # Use this split for validation instead of holding out val_fraction of `split`.
    validation_split: Optional[str] = None
    format: str = choice("auto", DATA_FORMATS)
    fields: FieldMap = field(default_factory=FieldMap)
    # bundled: the dataset's typed options; hf: extra load_dataset kwargs (e.g. name).
    options: Dict[str, Any] = field(default_factory=dict)
    seed: int = 1234
    steps: List[str] = field(default_factory=lambda: ["normalize", "filter_length", "dedup"],
                             metadata={"choices": PREP_STEPS})
    min_chars: int = bounded(1, min=0)
    max_chars: Optional[int] = bounded(None, min=1)
    val_fraction: float = bounded(0.05, min=0.0, max=0.9)
    max_val_samples: Optional[int] = bounded(200, min=1)
    max_length: int = bounded(128, min=8)
    overlong: str = choice("truncate", OVERLONG)
    packing: bool = False
    num_workers: int = bounded(0, min=0)


@dataclass
class TrainerConfig:
    max_steps: int = bounded(600, min=1)
    micro_batch_size: int = bounded(16, min=1)
    grad_accum: int = bounded(1, min=1)
    val_batch_size: int = bounded(32, min=1)
    precision: str = choice("32-true", PRECISIONS)
    # Validate every N optimizer steps (a validation pass also runs before and after training).
    val_check_interval: Optional[int] = bounded(200, min=1)
    limit_val_batches: Optional[int] = bounded(None, min=1)
    log_every_n_steps: int = bounded(10, min=1)
    # Save a checkpoint every N steps (default: at each validation); last.ckpt at the end.
    checkpoint_every_n_steps: Optional[int] = bounded(None, min=1)
    seed: int = 42
    accelerator: str = choice("auto", ACCELERATORS)
    devices: Any = 1
    num_nodes: int = bounded(1, min=1)
    gradient_clip_val: Optional[float] = bounded(1.0, min=0.0)
    deterministic: bool = False
    progress_bar: bool = True


@dataclass
class OptimConfig:
    name: str = choice("adamw", ("adamw",))
    lr: float = bounded(3e-3, min=0.0)
    weight_decay: float = bounded(0.01, min=0.0)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = bounded(1e-8, min=0.0)
    scheduler: str = choice("cosine", SCHEDULERS)
    warmup_steps: int = bounded(10, min=0)
    min_lr_ratio: float = bounded(0.1, min=0.0, max=1.0)
    fused: Optional[bool] = None


@dataclass
class StrategyConfig:
    """How a run is distributed; each option applies to the strategies named in its comment."""

    name: str = choice("auto", STRATEGIES)
    # ddp/fsdp/tp: torch.distributed backend; null picks nccl on CUDA, gloo on CPU.
    backend: Optional[str] = choice(None, (None, "gloo", "nccl"))
    # ddp: needed when some parameters get no gradient in a step.
    find_unused_parameters: bool = False
    # fsdp/tp: the device mesh; data_parallel_size null means devices / tensor_parallel_size.
    data_parallel_size: Optional[int] = bounded(None, min=1)
    tensor_parallel_size: int = bounded(1, min=1)
    # tp (and fsdp x tp): also shard the norms and the residual stream along the sequence between
    # the tensor-parallel blocks (less activation memory; batches are padded to a multiple of the
    # tensor-parallel size).
    sequence_parallel: bool = False
    # fsdp: free each layer's gathered weights after forward (less memory, more communication).
    reshard_after_forward: bool = True
    # fsdp/tp/deepspeed: recompute each decoder layer's activations in backward.
    activation_checkpointing: bool = False
    # deepspeed: move optimizer state / parameters to CPU memory.
    offload_optimizer: bool = False
    offload_parameters: bool = False


@dataclass
class LoggerConfig:
    name: str = choice("wandb", LOGGERS)
    project: str = "llmexp"
    entity: Optional[str] = None
    mode: str = choice("offline", WANDB_MODES)
    tags: List[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    """Evaluation after training (and before it, and every N steps when asked)."""

    # none | lm_eval | the name of an eval a plugin registers (llmexp plugins lists them).
    name: str = "none"
    # lm_eval: task names (bundled: arithmetic_mc, arithmetic_gen, arithmetic_ppl; others from
    # include_path, or lm-eval's registry when offline=false).
    tasks: List[str] = field(default_factory=lambda: ["arithmetic_mc", "arithmetic_gen", "arithmetic_ppl"])
    include_path: Optional[str] = None
    every_n_steps: Optional[int] = bounded(None, min=1)
    before_training: bool = True
    limit: Optional[int] = bounded(None, min=1)
    batch_size: int = bounded(32, min=1)
    num_fewshot: Optional[int] = bounded(None, min=0)
    max_gen_toks: int = bounded(16, min=1)
    apply_chat_template: bool = True
    # Options of a plugin eval (validated against its typed schema).
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskConfig:
    """The task metric (``val/task_score``): greedy answers to held-out prompts, scored by a checker
    (see llmexp.task_probe for what ``auto`` picks)."""

    check: str = "auto"
    max_prompts: Optional[int] = bounded(200, min=1)
    max_new_tokens: int = bounded(24, min=1)
    batch_size: int = bounded(64, min=1)


HEALTH_ACTIONS = ("warn", "stop", "off")


@dataclass
class HealthConfig:
    """Post-training's known failure signs, checked on the logged metrics (see llmexp.health)."""

    action: str = choice("warn", HEALTH_ACTIONS)
    # ppo/grpo: KL of the policy to its reference, summed over a response (nats)
    max_kl: float = bounded(10.0, min=0.0)
    # dpo: how far the chosen responses' log-prob may fall below its value at the start (nats)
    max_logp_drop: float = bounded(20.0, min=0.0)
    # ppo/grpo: mean response length below this many tokens ...
    min_response_tokens: float = bounded(2.0, min=0.0)
    # ... or pinned at this fraction of stage.rollout.max_new_tokens
    max_length_fraction: float = bounded(0.98, min=0.0, max=1.0)
    # ppo/grpo: mean per-token entropy of the sampled responses below this (nats)
    min_entropy: float = bounded(0.005, min=0.0)
    # val/task_score below its value at the start by more than this
    max_task_drop: float = bounded(0.2, min=0.0)
    # logged steps in a row a sign must show before it counts (one noisy batch is not a collapse)
    patience: int = bounded(3, min=1)


@dataclass
class PeftConfig:
    name: str = choice("none", PEFT_METHODS)
    r: int = bounded(8, min=1)
    alpha: int = bounded(16, min=1)
    dropout: float = bounded(0.05, min=0.0, max=1.0)
    target_modules: Optional[List[str]] = None
    merge_on_export: bool = True


@dataclass
class RunConfig:
    """The whole composed config of one run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    stage: Any = field(default_factory=SFTStageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    run_name: str = "run"
    # Continue a run from its last checkpoint: a run directory, or "auto" (this run directory's
    # checkpoint if it has one, else the newest unfinished run of the same run_name).
    resume: Optional[str] = None
    offline: bool = True


GROUP_SCHEMAS: Dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "optim": OptimConfig,
    "strategy": StrategyConfig,
    "logger": LoggerConfig,
    "peft": PeftConfig,
    "eval": EvalConfig,
    "task": TaskConfig,
    "health": HealthConfig,
}
