"""Typed schemas of every config group: the one source of each key's type, default and help.

The YAML files in conf/ are the options; these dataclasses are the contract they (and any
command-line override) must meet. Field metadata carries what OmegaConf cannot express:
``choices`` (valid names) and ``min``/``max`` bounds, checked by :mod:`llmexp.config.check`, and
``help``, which ``python -m llmexp --help`` and docs/config.md show (:mod:`llmexp.config.reference`).
A nested config's help is its class docstring's first paragraph.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

ARCHITECTURES = ("llama", "gpt2", "qwen2", "mistral")
DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
SCHEDULERS = ("cosine", "linear", "constant")
DATA_SOURCES = ("bundled", "files", "hf", "mixture")
MIXTURE_SOURCES = ("bundled", "files", "hf")
MIXTURE_STOPPING = ("first_exhausted", "all_exhausted")
DATA_FORMATS = ("auto", "text", "chat", "prompt_completion")
PREP_STEPS = ("normalize", "collapse_whitespace", "filter_length", "dedup")
OVERLONG = ("truncate", "drop", "split")
LOGGERS = ("wandb", "csv", "none")
WANDB_MODES = ("offline", "online", "disabled")
PEFT_METHODS = ("none", "lora", "qlora")
STRATEGIES = ("auto", "ddp", "fsdp", "tp", "deepspeed_zero2", "deepspeed_zero3")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
              "apo_down", "discopop")
DPO_REFERENCES = ("copy", "adapter_disabled", "precomputed")
KL_CONTROLS = ("fixed", "adaptive")
ROLLOUT_ENGINES = ("hf", "generate", "vllm")
HEALTH_ACTIONS = ("warn", "stop", "off")
MONITOR_MODES = ("auto", "min", "max")


LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte")
# and lm-eval's usual names: acc, acc_norm, exact_match, f1, mcc, bleu
HIGHER_IS_BETTER = ("score", "reward", "accuracy", "acc", "acc_norm", "exact_match", "f1", "mcc", "bleu")


def monitor_direction(monitor: str, mode: str) -> Optional[str]:
    """``min`` or ``max`` for trainer.monitor: ``mode``, or for ``auto`` what the metric's name says
    (losses, perplexity, bits per byte: min; scores, rewards, accuracy and lm-eval's acc, exact_match,
    f1, ...: max; None: the name does not say)."""
    if mode != "auto":
        return mode
    name = monitor.rsplit("/", 1)[-1]
    if name.endswith(LOWER_IS_BETTER):
        return "min"
    if name.endswith(HIGHER_IS_BETTER):
        return "max"
    return None


def doc(default: Any, help: str = "", **meta: Any) -> Any:  # noqa: A002
    """A field with its help string (and checker metadata). A list or dict default is copied for
    every instance, as a dataclass's default_factory would."""
    metadata = {"help": help, **meta}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def choice(default: Any, choices: tuple, help: str = "", **kw: Any) -> Any:  # noqa: A002
    return doc(default, help, choices=choices, **kw)


def bounded(default: Any, *, min: float | None = None, max: float | None = None,  # noqa: A002
            above: float | None = None, help: str = "") -> Any:  # noqa: A002
    """A number within [min, max], and strictly greater than ``above`` when given."""
    return doc(default, help, min=min, max=max, above=above)


def section(schema: type, help: str = "") -> Any:  # noqa: A002
    """A nested config, defaulting to ``schema()``; its help is ``schema``'s docstring summary."""
    return field(default_factory=schema, metadata={"help": help or summary(schema)})


def summary(schema: type) -> str:
    """The first paragraph of a schema's own docstring (not the signature dataclass writes)."""
    text = schema.__dict__.get("__doc__") or ""
    if not text or text.startswith(f"{schema.__name__}("):
        raise TypeError(f"{schema.__name__} needs a docstring: it is the help of its config section")
    return " ".join(inspect.cleandoc(text).split("\n\n")[0].split())


_FROM_SCRATCH = ("; from-scratch models only (model.pretrained loads a model with its own, which a local one puts in "
                 "the run record; given with it on the command line, refused).")


@dataclass
class ModelConfig:
    """The model: an architecture built from scratch at the sizes below, or pretrained weights
    (model.pretrained)."""

    name: str = doc("llama", help=(
        "The option's name (conf/model/<name>.yaml): part of run_name and recorded in summary.json."))
    architecture: str = choice("llama", ARCHITECTURES, help=(
        "The transformers model type, built at the sizes below when model.pretrained is null; a local "
        "model.pretrained directory's own type replaces it (strategy=tp picks its plan by it, the record names it); "
        "for a hub id keep it matching the weights."))
    pretrained: Optional[str] = doc(None, help=(
        "Local directory or hub id with weights and tokenizer (e.g. an earlier run's <run dir>/model; a hub id "
        "needs offline=false); null: initialise from the architecture."))
    tokenizer: Optional[str] = doc(None, help=(
        "null: the pretrained model's tokenizer, else llmexp's bundled one; train: a BPE tokenizer trained on this "
        "run's data (cached); or a local directory / hub id. One not from the model's own directory is used as "
        "transformers loads it from a directory of the model's type, so the export loads what the run trained "
        "with (qwen2: transformers' Qwen2 class, its split and one more token)."))
    chat_template: Optional[str] = doc(None, help=(
        "The chat template chat data is rendered with and the exported model keeps: a Jinja file's path, or the "
        "template itself; it must end an assistant message with a special token (another than the eos, as Gemma's "
        "<end_of_turn>, becomes the run's eos). null: the tokenizer's "
        "own, else llmexp's role headers."))
    system_prompt: Optional[str] = doc(None, help=(
        "A system message for every conversation that starts without one: put into the chat template, so the "
        "chat data trains with it and the exported model is asked with it (generate, serve, eval); chat data only."))
    hidden_size: int = bounded(64, min=8, help="Width of the hidden states" + _FROM_SCRATCH)
    num_layers: int = bounded(2, min=1, help="Decoder layers" + _FROM_SCRATCH)
    num_heads: int = bounded(4, min=1, help="Attention heads, a divisor of hidden_size" + _FROM_SCRATCH)
    num_kv_heads: Optional[int] = bounded(None, min=1, help=(
        "Key/value heads of grouped-query attention, a divisor of num_heads (null: one per head; gpt2 has none)"
        + _FROM_SCRATCH))
    intermediate_size: int = bounded(256, min=1, help="Width of the MLP's hidden layer" + _FROM_SCRATCH)
    max_position_embeddings: int = bounded(512, min=16, help=(
        "Longest sequence the model takes, in tokens (data.max_length, plus the responses of the rollout stages, must fit)"
        + _FROM_SCRATCH))
    extra: Dict[str, Any] = doc({}, help=(
        "Architecture-specific keys passed as-is to the transformers config (rope_theta, tie_word_embeddings, ...)"
        + _FROM_SCRATCH))
    dtype: str = choice("float32", DTYPES, help=(
        "Dtype the weights are built or loaded in (trainer.precision sets mixed precision on top)."))
    attn_implementation: Optional[str] = choice("sdpa", ("sdpa", "eager", "flash_attention_2", None), help=(
        "transformers' attention kernel: sdpa (PyTorch's fused attention), eager, flash_attention_2 (needs "
        "flash-attn on CUDA); null: transformers' default."))
    gradient_checkpointing: bool = doc(False, help=(
        "Recompute activations in backward (transformers' gradient checkpointing): less memory, more compute."))
    trust_remote_code: bool = doc(False, help=(
        "Run model and tokenizer code shipped with model.pretrained or model.tokenizer (transformers' "
        "trust_remote_code)."))
    compile: bool = doc(False, help=(
        "torch.compile the forward that trains (inductor; the first step pays the compile time); forwards "
        "without gradient run eager, and packed batches are padded to data.max_length (one shape)."))
    liger_kernel: bool = doc(False, help=(
        "Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (CUDA only: pip install 'llmexp[liger]')."))


def _stage_name(name: str) -> Any:
    return doc(name, help=f"This stage, chosen with stage={name} (which brings conf/stage/{name}.yaml).")


@dataclass
class PretrainStageConfig:
    """pretrain: next-token loss on every token (plain text; chat and prompt/completion data are
    rendered whole)."""

    name: str = _stage_name("pretrain")


@dataclass
class SFTStageConfig:
    """sft: supervised fine-tuning on chat messages or prompt/completion pairs."""

    name: str = _stage_name("sft")
    assistant_only_loss: bool = doc(True, help=(
        "Loss on the assistant turns (chat) or the completion (prompt_completion) only; false: on every token, as "
        "pretrain."))
    neftune_noise_alpha: Optional[float] = bounded(None, above=0.0, help=(
        "NEFTune: uniform noise of scale alpha / sqrt(sequence length x hidden size) added to the input embeddings "
        "in training steps only (transformers' hook; the paper and TRL use 5-15); null: none."))


def _share_prompt() -> bool:
    """stage.share_prompt of the paired preference stages (one description for all four)."""
    return doc(False, help=(
        "Run each pair's prompt once for its chosen and rejected answers (its keys and values repeated to both, "
        "with their gradient): the same function as the whole rows to float rounding, 1.7-1.85x faster steps with "
        "long prompts on larger models, no faster on the shipped tiny one (docs/performance.md); whole rows "
        "whenever the model is sharded or checkpoints activations."))


@dataclass
class RewardModelStageConfig:
    """rm: a Bradley-Terry reward model, a one-label sequence classifier scoring prompt+response."""

    name: str = _stage_name("rm")
    margin: float = bounded(0.0, min=0.0, help=(
        "Required score gap: loss = -log sigmoid(r_chosen - r_rejected - margin)."))
    center_rewards_coefficient: float = bounded(0.0, min=0.0, help=(
        "Penalty on the squared sum of a pair's scores (keeps them centred; 0 turns it off)."))
    share_prompt: bool = _share_prompt()


@dataclass
class DPOStageConfig:
    """dpo: direct preference optimisation against a frozen reference."""

    name: str = _stage_name("dpo")
    loss_type: str = choice("sigmoid", DPO_LOSSES, help=(
        "sigmoid: DPO; ipo: (length-averaged log-ratio margin - 1/(2 beta))^2; hinge: relu(1 - beta x margin); "
        "robust: the unbiased estimator under flipped labels; exo_pair (needs label_smoothing > 0), nca_pair, "
        "bco_pair, sppo_hard, apo_zero, apo_down, discopop: TRL's losses of those names (docs/stages.md)."))
    beta: float = bounded(0.1, above=0.0, help=(
        "DPO's temperature: scales the log-ratio margin in the loss and the implicit rewards (larger keeps the "
        "policy nearer the reference)."))
    label_smoothing: float = bounded(0.0, min=0.0, max=0.49, help=(
        "sigmoid (conservative DPO), robust and exo_pair: the assumed fraction of flipped preference labels."))
    discopop_tau: float = bounded(0.05, above=0.0, help=(
        "discopop: the temperature of the sigmoid that blends its logistic and exponential losses."))
    reference: str = choice("copy", DPO_REFERENCES, help=(
        "copy: a frozen copy of the starting policy; adapter_disabled: with LoRA, the base model with the adapter "
        "switched off (no second copy); precomputed: reference log-probs computed once before training, then the "
        "reference is freed."))
    rpo_alpha: float = bounded(1.0, min=0.0, help=(
        "Weight of the chosen answers' mean token NLL added to the DPO loss (TRL's rpo_alpha; RPO, Pang et al. "
        "2024): keeps the chosen answers likely while the margin grows."))
    share_prompt: bool = _share_prompt()


@dataclass
class KTOStageConfig:
    """kto: Kahneman-Tversky optimisation against a frozen reference, from completions labelled
    desirable or not (unpaired; preference pairs give one of each)."""

    name: str = _stage_name("kto")
    loss_type: str = choice("kto", ("kto", "apo_zero_unpaired"), help=(
        "kto: the KTO loss with the batch's KL estimate as reference point; apo_zero_unpaired: APO-zero on "
        "unpaired labels (no KL term)."))
    beta: float = bounded(0.1, above=0.0, help=(
        "KTO's temperature on the log-ratios (larger keeps the policy nearer the reference)."))
    desirable_weight: float = bounded(1.0, above=0.0, help=(
        "Weight of the desirable completions' losses (raise it when they are the fewer, KTO paper Eq. 8)."))
    undesirable_weight: float = bounded(1.0, above=0.0, help="Weight of the undesirable completions' losses.")
    reference: str = choice("copy", ("copy", "adapter_disabled"), help=(
        "copy: a frozen copy of the starting policy; adapter_disabled: with LoRA, the base model with the adapter "
        "switched off."))


@dataclass
class SimPOStageConfig:
    """simpo: reference-free preference optimisation on length-averaged log-probs with a target
    margin (SimPO, Meng et al. 2024)."""

    name: str = _stage_name("simpo")
    beta: float = bounded(2.0, above=0.0, help=(
        "Scale of the difference of the chosen and rejected answers' mean token log-probs in the loss and the "
        "rewards (SimPO's beta; TRL's CPOConfig.beta)."))
    gamma: float = bounded(1.0, min=0.0, help=(
        "Target reward margin subtracted inside the sigmoid: the chosen answer's reward should beat the rejected "
        "one's by gamma (TRL's simpo_gamma)."))
    label_smoothing: float = bounded(0.0, min=0.0, max=0.49, help=(
        "The assumed fraction of flipped preference labels (conservative SimPO, as TRL's label_smoothing)."))
    cpo_alpha: float = bounded(1.0, min=0.0, help=(
        "Weight of the chosen answers' mean token NLL added to the loss (TRL's cpo_alpha, CPO-SimPO; TRL's default "
        "is 0): keeps the chosen answers likely while the margin grows; 0: plain SimPO."))
    share_prompt: bool = _share_prompt()


@dataclass
class ORPOStageConfig:
    """orpo: odds-ratio preference optimisation, SFT on the chosen answers plus an odds-ratio
    penalty on the rejected ones, no reference (ORPO, Hong et al. 2024)."""

    name: str = _stage_name("orpo")
    beta: float = bounded(0.5, above=0.0, help=(
        "lambda, the weight of the odds-ratio term added to the chosen answers' NLL (TRL's ORPOConfig.beta); "
        "it also scales the logged rewards."))
    share_prompt: bool = _share_prompt()


@dataclass
class RewardConfig:
    """Where rollout-stage rewards come from: a reward function by name, or a reward model directory."""

    function: Optional[str] = doc("auto", help=(
        "A registered reward function (llmexp plugins lists them) or module:function; ignored when `model` is set. "
        "auto: arithmetic_correct on the bundled skill's data, else reference_match (the sampled answer equals the "
        "row's reference answer: a prompt/completion row's completion, a chat's last answer)."))
    model: Optional[str] = doc(None, help=(
        "An rm run's exported model (<run dir>/model) or any one-label sequence classifier."))
    missing_eos_penalty: Optional[float] = doc(None, help=(
        "Added to the score of a response that never emits eos within max_new_tokens (e.g. -1.0); null: none."))
    normalize: bool = doc(True, help=(
        "Map a reward model's scores with the center/scale its rm run measured on held-out pairs (mean chosen -> "
        "+1, mean rejected -> -1), the scale of a 0/1 rule reward, so that kl_coef and the critic mean the same for "
        "both; models without them are used as they score."))
    workers: int = bounded(0, min=0, help=(
        "Threads scoring a rollout's responses with a reward function at once (0: in the training loop); "
        "for slow rewards, e.g. a plugin calling a sandbox."))


@dataclass
class RolloutConfig:
    """Sampling of responses from the policy (shared by the rollout stages: ppo, grpo, rloo, online_dpo)."""

    max_new_tokens: int = bounded(16, min=1, help="Longest sampled response, in tokens.")
    temperature: float = bounded(1.0, min=0.01, help="Sampling temperature (the loss's log-probs are taken at it too).")
    top_k: int = bounded(0, min=0, help="Sample among the k most likely tokens (0: no top-k filtering).")
    top_p: float = bounded(1.0, min=0.01, max=1.0, help=(
        "Nucleus sampling: among the most likely tokens holding this much probability (1.0: off)."))
    val_max_new_tokens: Optional[int] = bounded(None, min=1, help=(
        "Longest greedy response to the held-out prompts scored for val/reward (null: max_new_tokens)."))
    engine: str = choice("hf", ROLLOUT_ENGINES, help=(
        "hf: llmexp's decode loop over the transformers model (shared prefill, finished responses leave the "
        "batch, log-probs from the rollout); generate: transformers' model.generate (the reference); vllm: "
        "vLLM colocated on the GPU, weights synced after each update (CUDA only)."))
    share_prefill: bool = doc(True, help=(
        "engine=hf: prefill each prompt once and expand its KV cache to its samples (grpo's group)."))
    drop_finished: bool = doc(True, help=(
        "engine=hf: responses that emitted eos leave the decode batch, so late tokens do not pay for them."))
    compile: bool = doc(False, help=(
        "engine=hf: torch.compile the decode step (pays on long responses; the first steps pay the compile)."))
    max_prompts_per_call: Optional[int] = bounded(None, min=1, help=(
        "Most prompts one sampling call answers, in whole micro-batches (null: the whole rollout batch, "
        "micro_batch_size x grad_accum prompts, so the decode's per-token cost is paid once; set it where that "
        "batch's KV cache does not fit)."))
    vllm_gpu_memory_utilization: float = bounded(0.3, above=0.0, max=1.0, help=(
        "engine=vllm: share of the GPU's memory vLLM may take beside the training process."))
    tools: List[str] = doc([], help=(
        "grpo, rloo: functions the policy may call while it answers, each a registered tool (llmexp plugins lists "
        "them; llmexp's: calculator) or module:function. The prompts are rendered with their schemas, a call the "
        "model writes is run and its result written back as the tool's message, and the model answers on; the "
        "result's tokens are in the sequence but not in the loss, the reward scores the answer after the last "
        "result, and the task metric asks with the tools too."))
    max_tool_calls: int = bounded(4, min=1, help=(
        "stage.rollout.tools: rounds of calls one response may make (TRL's max_tool_calling_iterations); a call "
        "after the last round ends the response."))


# How a policy loss's per-token terms become one number (TRL's GRPOConfig.loss_type; llmexp.losses).
POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_CLIP_RANGE = "Clip of the probability ratio to the sampling policy, to [1 - clip_range, 1 + clip_range]."


@dataclass
class PPOStageConfig:
    """ppo: clipped PPO with a value head, GAE and a per-token KL penalty to the frozen starting
    policy."""

    name: str = _stage_name("ppo")
    reward: RewardConfig = section(RewardConfig)
    rollout: RolloutConfig = section(RolloutConfig)
    ppo_epochs: int = bounded(4, min=1, help=(
        "Optimisation passes over each rollout batch, each split into num_minibatches updates."))
    num_minibatches: int = bounded(1, min=1, help=(
        "Optimizer updates per pass, each over a share of the rollout batch's micro-batches (a divisor of "
        "trainer.grad_accum)."))
    clip_range: float = bounded(0.2, min=0.0, help=_CLIP_RANGE)
    clip_range_value: float = bounded(0.2, min=0.0, help=(
        "How far a value prediction may move from its rollout value (the clipped value loss)."))
    value_loss_coef: float = bounded(0.1, min=0.0, help="Weight of the value (critic) loss added to the policy loss.")
    gamma: float = bounded(1.0, min=0.0, max=1.0, help="GAE's discount of later rewards, per response token.")
    lam: float = bounded(0.95, min=0.0, max=1.0, help=(
        "GAE's lambda: lower trades variance of the advantages for bias (1: Monte-Carlo returns)."))
    kl_coef: Optional[float] = bounded(None, min=0.0, help=(
        "Weight of the per-token KL penalty to the frozen reference in the rewards (0: no reference model is "
        "built); kl_control=adaptive starts from it. null: 0.5 against a reward model (stage.reward.model, a learned "
        "proxy the policy exploits: from the default SFT 0.1 ended at 0.865 exact match, 0.5 at 0.994), else 0.1."))
    kl_control: str = choice("fixed", KL_CONTROLS, help=(
        "fixed: kl_coef throughout; adaptive: the coefficient moves towards kl_target (Ziegler et al. 2019)."))
    kl_target: float = bounded(6.0, min=0.0, help=(
        "kl_control=adaptive: the KL per response (nats) the coefficient steers towards."))
    kl_horizon: int = bounded(10000, min=1, help=(
        "kl_control=adaptive: responses over which the coefficient adapts (larger: slower)."))
    whiten_advantages: bool = doc(True, help=(
        "Normalise the advantages to zero mean and unit variance over the rollout batch."))
    whiten_rewards: bool = doc(False, help=(
        "Rescale the per-token KL+score rewards to unit variance over the rollout batch, keeping their mean "
        "(stabilises the critic)."))


@dataclass
class GRPOStageConfig:
    """grpo: group-relative policy optimisation, several responses per prompt, advantages
    relative to their group, no critic."""

    name: str = _stage_name("grpo")
    reward: RewardConfig = section(RewardConfig)
    rollout: RolloutConfig = section(RolloutConfig)
    group_size: int = bounded(8, min=2, help="Responses sampled per prompt; advantages are relative to their group.")
    scale_rewards: bool = doc(True, help=(
        "Divide advantages by the group's reward std (false: only subtract the mean, as Dr. GRPO)."))
    epochs: int = bounded(1, min=1, help=(
        "Optimisation passes over each rollout batch (>1 makes the clipped ratio matter)."))
    clip_range: float = bounded(0.2, min=0.0, help=_CLIP_RANGE)
    epsilon_high: Optional[float] = bounded(None, min=0.0, help=(
        "Upper clip of the ratio, to 1 + epsilon_high (DAPO's clip-higher, e.g. 0.28); null: clip_range."))
    loss_type: str = choice("dapo", POLICY_LOSS_TYPES, help=(
        "How per-token losses become one (TRL's names): grpo averages each response's tokens, then the responses; "
        "bnpo averages each micro-batch's tokens; dr_grpo divides the token sum by responses x max_new_tokens; "
        "dapo divides it by the update's tokens on all ranks."))
    importance_sampling_level: str = choice("token", ("token", "sequence"), help=(
        "token: a probability ratio per token; sequence: one per response, the mean of its tokens' log-ratios (GSPO)."))
    kl_coef: float = bounded(0.0, min=0.0, help=(
        "Weight of the KL to the frozen reference in the loss, as ppo's kl_coef (0: no reference model is built)."))
    use_bias_correction_kl: bool = doc(True, help=(
        "Multiply the per-token KL by the probability ratio to the sampling policy, which makes its gradient the "
        "unbiased reverse-KL gradient (DeepSeek-V3.2; TRL's default)."))
    filter_groups: bool = doc(False, help=(
        "Leave the groups whose responses all scored the same out of the update (DAPO's dynamic filtering, without "
        "re-sampling): they have no advantage to learn from, and in the loss's token count they dilute the rest."))
    skip_groups_without_signal: bool = doc(True, help=(
        "Run the update's forward and backward passes only over groups whose responses scored differently, where "
        "that changes nothing (kl_coef 0): the others have zero advantage on every token, so the gradient, loss "
        "and loss's token count are the same; train/entropy is then the sampling policy's, from the rollout. With "
        "kl_coef > 0, it also runs the share of the others that kl_sample_share draws."))
    kl_sample_share: float = bounded(1.0, above=0.0, max=1.0, help=(
        "With kl_coef > 0: the share of the groups whose responses all scored alike that carry their KL term into "
        "each update, drawn at random and weighted by its inverse (an unbiased estimate of the KL term, noisier); the "
        "rest skip the reference and the update, as with kl_coef 0. 1: every group, exact."))


@dataclass
class RLOOStageConfig:
    """rloo: REINFORCE with a leave-one-out baseline, several responses per prompt, each response's
    advantage its reward minus the mean reward of the others, no critic (TRL's RLOOTrainer)."""

    name: str = _stage_name("rloo")
    reward: RewardConfig = section(RewardConfig)
    rollout: RolloutConfig = section(RolloutConfig)
    group_size: int = bounded(2, min=2, help=(
        "Responses sampled per prompt; each one's baseline is the mean reward of the others."))
    epochs: int = bounded(1, min=1, help=(
        "Optimisation passes over each rollout batch (>1 makes the clipped ratio matter)."))
    clip_range: float = bounded(0.2, min=0.0, help=(
        "Clip of each response's probability ratio to the sampling policy, to [1 - clip_range, 1 + clip_range]."))
    epsilon_high: Optional[float] = bounded(None, min=0.0, help=(
        "Upper clip of the ratio, to 1 + epsilon_high; null: clip_range."))
    kl_coef: float = bounded(0.05, min=0.0, help=(
        "Weight of the KL to the frozen reference, summed over each response and subtracted from its reward "
        "(0: no reference model is built)."))
    normalize_advantages: bool = doc(False, help=(
        "Scale the advantages to zero mean and unit std over the rollout batch of every rank."))


@dataclass
class OnlineDPOStageConfig:
    """online_dpo: two responses sampled per prompt from the current policy, the one the reward
    scores higher is chosen, and the DPO loss against the frozen starting policy (Guo et al. 2024,
    TRL's OnlineDPOTrainer)."""

    name: str = _stage_name("online_dpo")
    reward: RewardConfig = section(RewardConfig)
    rollout: RolloutConfig = section(RolloutConfig)
    group_size: int = bounded(2, min=2, help=(
        "Responses sampled per prompt; the highest- and the lowest-scored form its pair (2: TRL's online DPO)."))
    loss_type: str = choice("sigmoid", DPO_LOSSES, help=(
        "The preference loss of each sampled pair, as dpo's stage.loss_type (TRL has sigmoid and ipo)."))
    beta: float = bounded(0.1, above=0.0, help=(
        "DPO's temperature on the log-ratio margin (larger keeps the policy nearer the reference)."))
    label_smoothing: float = bounded(0.0, min=0.0, max=0.49, help=(
        "sigmoid, robust and exo_pair: the assumed fraction of flipped preference labels."))
    discopop_tau: float = bounded(0.05, above=0.0, help="discopop: as dpo's.")
    rpo_alpha: float = bounded(0.0, min=0.0, help=(
        "Weight of the chosen responses' mean token NLL added to each pair's loss, as dpo's."))
    skip_ties: bool = doc(True, help=(
        "Leave pairs whose responses scored the same out of the loss: a tie says nothing about which is better "
        "(false: the first response counts as chosen, as TRL does)."))


# The divergence a distilled student minimises to its teacher (llmexp.losses.distillation_divergence).
DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class DistillStageConfig:
    """distill: a student (any model= option) learns a frozen teacher's next-token distributions
    on the completion tokens: on the data's completions, and on a share of completions the student
    samples itself, which the teacher scores (on-policy distillation: GKD, Agarwal et al. 2024;
    TRL's GKDTrainer)."""

    name: str = _stage_name("distill")
    teacher: Optional[str] = doc(None, help=(
        "The teacher: a run directory (its model/ is used), a model directory or a hub id; a causal LM with the "
        "student's tokenizer."))
    loss_type: str = choice("forward_kl", DISTILL_LOSSES, help=(
        "forward_kl: KL(teacher || student), classic distillation (the student covers all the teacher's likely "
        "tokens); reverse_kl: KL(student || teacher), mode-seeking; jsd: the generalised Jensen-Shannon divergence "
        "with weight stage.jsd_beta (GKD)."))
    jsd_beta: float = bounded(0.5, above=0.0, max=0.99, help=(
        "loss_type=jsd: the teacher's weight in the mixture both are compared with (GKD's beta; near 0 acts like "
        "forward_kl, near 1 like reverse_kl)."))
    temperature: float = bounded(1.0, above=0.0, help=(
        "Softens both distributions before they are compared; the divergence is multiplied by temperature^2 so "
        "its gradients keep their size (Hinton et al. 2015)."))
    sft_weight: float = bounded(1.0, min=0.0, help=(
        "Weight of the plain SFT loss (the data completion's mean token NLL) added on the data's batches."))
    attention_weight: float = bounded(1.0, min=0.0, help=(
        "Weight of attention transfer: the KL divergence of the student's attention distributions from the "
        "teacher's at every token, per layer (a student of another depth spreads its layers evenly over the "
        "teacher's, first with first and last with last) and head "
        "(head-averaged maps when the head counts differ); MiniLM, Wang et al. 2020. The student learns where the "
        "teacher looks, not only what it says. Both models then compute attention in eager mode."))
    lmbda: float = bounded(0.0, min=0.0, max=1.0, help=(
        "Share of micro-batches whose completions the student samples itself (stage.rollout), scored by the "
        "teacher: on-policy distillation (GKD's lambda). 0: the data's completions only."))
    rollout: RolloutConfig = section(RolloutConfig, help=(
        "How the student samples its completions when stage.lmbda > 0 (engine hf or generate)."))


# Weight-only quantization (llmexp.stages.quantize): torchao's schemes, AutoRound (the auto-round
# library), and llama.cpp's GGUF block formats (written by the gguf package).
TORCHAO_METHODS = ("int8", "int4")
GGUF_METHODS = ("q8_0", "q4_0")
QUANTIZE_METHODS = TORCHAO_METHODS + ("autoround",) + GGUF_METHODS


@dataclass
class QuantizeStageConfig:
    """quantize: a trained model's weights stored in fewer bits (torchao weight-only quantization
    through transformers' TorchAoConfig), its task metric measured before and after; no training."""

    name: str = _stage_name("quantize")
    method: str = choice("int8", QUANTIZE_METHODS, help=(
        "int8: 8-bit weights with one scale per output channel (torchao, CPU and GPU); int4: 4-bit weights in "
        "groups (stage.group_size) with torchao's CUDA kernels (a GPU); autoround: 4-bit weights in groups whose "
        "rounding and ranges are tuned on the run's training tokens (AutoRound, any machine; GPTQ-packed, loaded "
        "by transformers with auto-round installed and by vLLM); "
        "q8_0 / q4_0: llama.cpp's 8- / 4-bit blocks of 32 weights, written as <run dir>/model.gguf (any "
        "machine; model/ holds its weights dequantized)."))
    group_size: Optional[int] = choice(None, (None, 32, 64, 128, 256), help=(
        "int4, autoround: weights sharing one scale, a divisor of every quantized layer's input size; null: "
        "the largest of 128, 64 and 32 that divides them (the record keeps the size used)."))
    calibration_samples: int = bounded(128, min=1, help=(
        "autoround: calibration windows of stage.calibration_length tokens, cut from the run's training "
        "data laid end to end."))
    calibration_length: int = bounded(128, min=8, help=(
        "autoround: tokens per calibration window (at most the model's max_position_embeddings)."))
    iters: int = bounded(200, min=0, help=(
        "autoround: tuning steps per decoder layer (auto-round's default); 0: rounded to nearest, untuned (the "
        "baseline the tuning improves on)."))
    embeddings: bool = doc(True, help=(
        "Quantize the input embedding and the output projection too (in a tiny model they are most of the "
        "weights; the output projection is untied from the input embedding for it). autoround: the output projection "
        "only (auto-round keeps the input embedding)."))


@dataclass
class PruneStageConfig:
    """prune: structured pruning that really shrinks a trained model (MLP neurons, key/value head
    groups, whole layers, chosen by importance measured on validation data) and/or unstructured
    sparsity, then a recovery SFT of trainer.max_steps steps (0: none)."""

    name: str = _stage_name("prune")
    mlp_keep: float = bounded(1.0, above=0.0, max=1.0, help=(
        "Fraction of each layer's MLP neurons kept, the least important dropped (importance: mean |input| of the "
        "neuron's down-projection column on validation tokens x that column's norm)."))
    kv_heads_keep: Optional[int] = bounded(None, min=1, help=(
        "Key/value heads kept per layer, each with its query heads (importance: the group's mean output norm on "
        "validation tokens x its o_proj columns' norm); null: all."))
    layers_keep: Optional[int] = bounded(None, min=1, help=(
        "Decoder layers kept, those that change the hidden state least dropped (1 - cosine of a layer's input "
        "and output on validation tokens, ShortGPT's block influence); null: all."))
    sparsity: float = bounded(0.0, min=0.0, max=0.99, help=(
        "Unstructured sparsity: the fraction of each decoder linear layer's weights (per output row) set to zero "
        "and kept zero through recovery; 0: none. Applied after any structured pruning. The model keeps its shape "
        "(dense zeros): it compresses, it is not faster on dense kernels."))
    sparsity_score: str = choice("magnitude", ("magnitude", "wanda"), help=(
        "Which weights sparsity drops: magnitude, the smallest |w|; wanda, the smallest |w| x the L2 norm of its "
        "input feature on validation tokens (Sun et al. 2023)."))
    importance_batches: int = bounded(8, min=1, help="Validation batches the importances are measured on.")


@dataclass
class FieldMap:
    """Which column of the source data holds each field a stage format needs."""

    text: str = doc("text", help="Plain text (format text: pretrain).")
    messages: str = doc("messages", help="Chat messages, a list of {role, content} (format chat).")
    prompt: str = doc("prompt", help="The prompt (formats prompt_completion, preference and prompt_only).")
    completion: str = doc("completion", help="The completion (formats prompt_completion, unpaired_preference).")
    label: str = doc("label", help="Whether the completion is desirable, true/false (format unpaired_preference: kto).")
    chosen: str = doc("chosen", help="The preferred response (format preference: rm, dpo).")
    rejected: str = doc("rejected", help="The dispreferred response (format preference: rm, dpo).")
    answer: str = doc("answer", help=(
        "The reference answer a reward function checks (rollout stages; e.g. arithmetic_correct)."))
    tools: str = doc("tools", help=(
        "The functions a conversation may call (OpenAI's tools: a list of function schemas, or its JSON text), "
        "given to the chat template with the messages (chat, conversational prompt/completion, preference and kto "
        "rows; not the rollout stages), as serve's tools are."))


@dataclass
class MixtureSource:
    """One dataset of a data=mixture run and its weight."""

    name: str = doc("arithmetic", help="bundled: the registered dataset; files/hf: a label for the record.")
    source: str = choice("bundled", MIXTURE_SOURCES, help="Where its rows come from, as data.source.")
    path: Optional[str] = doc(None, help="files/hf: as data.path.")
    split: str = doc("train", help="hf: the split to take.")
    options: Dict[str, Any] = doc({}, help="As data.options: a bundled dataset's options, or load_dataset's.")
    fields: FieldMap = section(FieldMap)
    weight: float = bounded(1.0, above=0.0, help=(
        "Its share of the mixed rows is weight / the sum of the weights."))


@dataclass
class DataConfig:
    """The training data: where its rows come from, how they are prepared and held out, and how
    they become token sequences."""

    name: str = doc("arithmetic", help=(
        "bundled: the registered dataset to build (llmexp plugins lists them); files/hf/mixture: a label recorded "
        "in summary.json."))
    source: str = choice("bundled", DATA_SOURCES, help=(
        "Where rows come from: bundled (a dataset llmexp or a plugin registers, by data.name), files or hf "
        "(data.path), or mixture (the datasets of data.mixture)."))
    mixture: List[MixtureSource] = doc([], help=(
        "mixture: the datasets to mix, each with its weight; rows are drawn from them in proportion to the weights "
        "(datasets.interleave_datasets, seeded by data.seed), then prepared and held out as one dataset."))
    mixture_stopping: str = choice("first_exhausted", MIXTURE_STOPPING, help=(
        "mixture: stop drawing when the first dataset runs out (no row repeats), or when every one has (smaller "
        "ones repeat to keep their share)."))
    path: Optional[str] = doc(None, help=(
        "files: a JSONL/JSON/Parquet/CSV file, directory or glob; hf: a hub dataset id (needs offline=false) or a "
        "saved dataset directory; bundled: unused."))
    split: str = doc("train", help="hf: the split to train on.")
    validation_split: Optional[str] = doc(None, help=(
        "hf: validate on this split instead of holding out val_fraction of `split`."))
    format: str = choice("auto", DATA_FORMATS, help=(
        "auto: detected from the columns (after data.fields); or the format whose columns the rows must have."))
    fields: FieldMap = section(FieldMap)
    options: Dict[str, Any] = doc({}, help=(
        "bundled: the dataset's typed options; files/hf: extra keyword arguments of datasets.load_dataset (e.g. "
        "name)."))
    seed: int = doc(1234, help=(
        "Seed of a bundled dataset's generator and of the held-out validation rows (trainer.seed orders the "
        "training rows)."))
    steps: List[str] = choice(["normalize", "filter_length", "dedup"], PREP_STEPS, help=(
        "Preparation of the raw rows, in order: normalize (Unicode NFC, line endings as newlines, control characters "
        "dropped; whitespace kept as written), collapse_whitespace (runs of spaces as one, lines trimmed: prose only, "
        "never code), filter_length (min_chars, max_chars), dedup (rows of identical content)."))
    min_chars: int = bounded(1, min=0, help=(
        "filter_length: drop rows with fewer content characters (message contents included)."))
    max_chars: Optional[int] = bounded(None, min=1, help=(
        "filter_length: drop rows with more content characters (null: no limit)."))
    val_fraction: float = bounded(0.05, min=0.0, max=0.9, help=(
        "Fraction of the rows held out for validation when no validation_split is given."))
    max_val_samples: Optional[int] = bounded(200, min=1, help="At most this many validation rows (null: all).")
    max_length: int = bounded(128, min=8, help=(
        "Longest sequence, in tokens (with packing: of a packed row); rollout-stage prompts keep their last max_length "
        "tokens."))
    overlong: str = choice("truncate", OVERLONG, help=(
        "Samples longer than max_length: truncate (keep the start), drop (the task metric leaves out the held-out "
        "prompts dropped too), or split into chunks (format text; others truncate)."))
    packing: bool = doc(False, help=(
        "Pack several samples into each row of max_length tokens, with no attention or loss across samples "
        "(pretrain and sft only)."))
    concat: bool = doc(False, help=(
        "Format text: join the documents with eos and cut the stream into rows of exactly max_length tokens (the "
        "'group texts' of pretraining scripts; attention crosses documents, nothing is padded or cut away but the "
        "last partial row). Instead of packing."))
    num_proc: Optional[int] = bounded(None, min=1, help=(
        "Processes that tokenize a text corpus into the token cache (null: every core for a large corpus, one for a "
        "small one). The cache is reused by every run with the same data, tokenizer and lengths (llmexp prepare)."))
    streaming: bool = doc(False, help=(
        "files, format text: read the corpus as training goes, never prepared or copied (documents shuffled through "
        "a seeded buffer, tokenized as they come; exact resume). The first max_val_samples documents validate."))
    shuffle_buffer: int = bounded(1000, min=1, help=(
        "streaming: documents held in the shuffle buffer (1: file order, files themselves shuffled per epoch)."))
    num_workers: int = bounded(0, min=0, help="DataLoader worker processes (0: load in the main process).")


@dataclass
class TrainerConfig:
    """The training loop (Lightning's Trainer): length, batches, precision, devices, validation
    and checkpoints."""

    max_steps: int = bounded(600, min=0, help=(
        "Optimizer steps to train (rollout stages: rollout iterations); the lr schedule runs over them (0: only "
        "for the stages that change a trained model: prune without recovery, quantize)."))
    epochs: Optional[float] = bounded(None, above=0.0, help=(
        "Train this many passes over the training rows instead of a step count: trainer.max_steps becomes "
        "ceil(epochs x steps per epoch), a step per micro_batch_size x grad_accum x data-parallel ranks rows (rollout "
        "stages: prompts; summary.json epochs); null: trainer.max_steps. Not with data.streaming."))
    micro_batch_size: int = bounded(16, min=1, help=(
        "Samples per forward/backward pass on each device (rollout stages: prompts, each answered stage.group_size times "
        "in grpo)."))
    grad_accum: int = bounded(1, min=1, help=(
        "Micro-batches per optimizer step (rollout stages: per rollout batch); the global batch is micro_batch_size x "
        "grad_accum x data-parallel ranks."))
    val_batch_size: int = bounded(32, min=1, help=(
        "Samples per validation batch (and per batch of dpo's precomputed reference pass)."))
    precision: str = choice("32-true", PRECISIONS, help=(
        "Lightning's precision; 16-* need a CUDA GPU, and fsdp with bf16-* keeps bf16 parameters with fp32 gradient "
        "reduction."))
    val_check_interval: Optional[int] = bounded(200, min=1, help=(
        "Validate every N optimizer steps (a validation pass also runs before training, and after it unless the "
        "last step was one of the N; null: only those)."))
    limit_val_batches: Optional[int] = bounded(None, min=1, help=(
        "Validate on at most this many batches per pass (null: the whole validation set)."))
    log_every_n_steps: int = bounded(10, min=1, help=(
        "Log training metrics (and flush metrics.csv) every N optimizer steps; the health guard checks these steps."))
    checkpoint_every_n_steps: Optional[int] = bounded(None, min=1, help=(
        "Save a checkpoint every N optimizer steps (null: at each validation); checkpoints/last.ckpt at the end."))
    keep_checkpoints: Optional[int] = bounded(1, min=1, help=(
        "How many step checkpoints (checkpoints/step-N.ckpt) to keep: the newest this many, older ones removed as "
        "new ones are written; null: every one. last.ckpt is kept besides. Any of them becomes a model with "
        "`llmexp export <run> --checkpoint step-N --format hf`."))
    monitor: Optional[str] = doc(None, help=(
        "A validation metric (val/loss, val/task_score, val/reward, val/accuracy, ...), or an eval's metric "
        "(eval/<task>/<metric>, with eval=...: the eval then also runs at each validation in training), that names the "
        "best validation (summary.json best) for trainer.keep_best and trainer.early_stopping_patience; null: none."))
    monitor_mode: str = choice("auto", MONITOR_MODES, help=(
        "Whether a lower (min) or higher (max) trainer.monitor is better; auto: min for losses, perplexity and bits "
        "per byte, max for scores, rewards, accuracy and lm-eval's acc, exact_match, f1, mcc, bleu."))
    keep_best: bool = doc(False, help=(
        "Export the model of the validation with the best trainer.monitor (model/, the final metrics, the eval after "
        "training) instead of the last step's; its weights wait in checkpoints/best-step-N.ckpt, and "
        "checkpoints/last.ckpt still resumes the last step."))
    early_stopping_patience: Optional[int] = bounded(None, min=1, help=(
        "Stop training once trainer.monitor has not improved for this many validations in a row (Lightning's "
        "EarlyStopping; null: train all trainer.max_steps)."))
    seed: int = doc(42, help="Seed of training: Lightning's seed_everything and the order of the training rows.")
    accelerator: str = choice("auto", ACCELERATORS, help=(
        "Lightning's accelerator (auto: a GPU when there is one); gpu/cuda need CUDA."))
    devices: Any = doc(1, help=(
        "Devices per node: a count, a list of device ids or auto (Lightning's devices); fsdp/tp need a count."))
    num_nodes: int = bounded(1, min=1, help=(
        "Machines (launched with torchrun or srun); the world size is devices x num_nodes."))
    gradient_clip_val: Optional[float] = bounded(1.0, min=0.0, help=(
        "Clip the global gradient norm to this (null or 0: no clipping; train/grad_norm is logged either way)."))
    deterministic: bool = doc(False, help=(
        "Lightning's deterministic: deterministic algorithms only (reproducible, possibly slower)."))
    progress_bar: bool = doc(True, help=(
        "Show the run's progress in optimizer steps: a bar on a terminal, a line every tenth of the run elsewhere."))


@dataclass
class OptimConfig:
    """The optimizer (AdamW, with no weight decay on biases and norms) and its learning-rate
    schedule: linear warm-up, then decay."""

    name: str = choice("adamw", ("adamw",), help="The optimizer.")
    lr: float = bounded(3e-3, min=0.0, help="Peak learning rate, after warm-up (stages and conf/scale/ set their own).")
    weight_decay: float = bounded(0.01, min=0.0, help="AdamW's decoupled weight decay of the weight matrices.")
    betas: List[float] = doc([0.9, 0.95], help="AdamW's beta1 and beta2, each in [0, 1).")
    eps: float = bounded(1e-8, min=0.0, help="AdamW's epsilon, added to the denominator.")
    scheduler: str = choice("cosine", SCHEDULERS, help=(
        "After warm-up: cosine or linear decay to min_lr_ratio x lr at trainer.max_steps, or constant."))
    warmup_steps: int = bounded(10, min=0, help=(
        "Steps of linear warm-up to the peak lr (clamped below trainer.max_steps; summary.json notes it)."))
    min_lr_ratio: float = bounded(0.1, min=0.0, max=1.0, help=(
        "The final lr of cosine and linear decay, as a fraction of the peak."))
    fused: Optional[bool] = doc(None, help="AdamW's fused kernel; null: fused unless fsdp/tp shard the model.")


@dataclass
class StrategyConfig:
    """How a run is distributed; each option says which strategies it applies to."""

    name: str = choice("auto", STRATEGIES, help=(
        "auto: one device (Lightning's DDP when trainer.devices > 1); ddp; fsdp (FSDP2); tp (tensor parallel); "
        "deepspeed_zero2/3 (CUDA only)."))
    backend: Optional[str] = choice(None, (None, "gloo", "nccl"), help=(
        "ddp/fsdp/tp: torch.distributed backend; null picks nccl on CUDA, gloo on CPU."))
    find_unused_parameters: bool = doc(False, help="ddp: needed when some parameters get no gradient in a step.")
    data_parallel_size: Optional[int] = bounded(None, min=1, help=(
        "fsdp/tp: data-parallel size of the device mesh (null: devices / tensor_parallel_size)."))
    tensor_parallel_size: int = bounded(1, min=1, help=(
        "fsdp/tp: tensor-parallel size of the device mesh (tp: 1 means every device not given to data parallelism; "
        "fsdp: >1 adds tensor parallelism)."))
    sequence_parallel: bool = doc(False, help=(
        "tp (and fsdp x tp): also shard the norms and the residual stream along the sequence between the "
        "tensor-parallel blocks (less activation memory; batches are padded to a multiple of the tensor-parallel "
        "size; not for the rollout stages)."))
    reshard_after_forward: bool = doc(True, help=(
        "fsdp: free each layer's gathered weights after forward (less memory, more communication)."))
    activation_checkpointing: bool = doc(False, help="fsdp/tp: recompute each decoder layer's activations in backward.")
    offload_optimizer: bool = doc(False, help="deepspeed: keep the optimizer state in CPU memory.")
    offload_parameters: bool = doc(False, help="deepspeed: keep the parameters in CPU memory.")


@dataclass
class LoggerConfig:
    """The experiment tracker; <run dir>/metrics.csv is written whichever it is."""

    name: str = choice("wandb", LOGGERS, help="wandb, or csv / none: no tracker, only metrics.csv.")
    project: str = doc("llmexp", help="wandb: the project.")
    entity: Optional[str] = doc(None, help="wandb: the team or user (null: your default entity).")
    mode: str = choice("offline", WANDB_MODES, help=(
        "wandb: offline (files under <run dir>/wandb; wandb sync uploads them), online (after wandb login) or "
        "disabled."))
    tags: List[str] = doc([], help="wandb: tags of the run.")


@dataclass
class EvalConfig:
    """Evaluation after training (and before it, and every N steps when asked)."""

    name: str = doc("none", help=(
        "none, lm_eval (lm-evaluation-harness on the trained model), or the name of an eval a plugin registers "
        "(llmexp plugins lists them)."))
    tasks: List[str] = doc(["arithmetic_mc", "arithmetic_gen", "arithmetic_ppl"], help=(
        "lm_eval: task names (bundled: arithmetic_mc, arithmetic_gen, arithmetic_ppl; others from include_path, or "
        "lm-eval's registry when offline=false)."))
    include_path: Optional[str] = doc(None, help="lm_eval: a directory of extra task YAML files.")
    every_n_steps: Optional[int] = bounded(None, min=1, help=(
        "Also evaluate every N optimizer steps during training (null: not during training)."))
    before_training: bool = doc(True, help="Also evaluate the starting model (not when resuming).")
    limit: Optional[int] = bounded(None, min=1, help="lm_eval: at most this many examples per task (null: all).")
    batch_size: int = bounded(32, min=1, help="lm_eval: batch size.")
    num_fewshot: Optional[int] = bounded(None, min=0, help=(
        "lm_eval: few-shot examples per prompt (null: each task's own)."))
    max_gen_toks: int = bounded(16, min=1, help="lm_eval: most tokens generated per answer in generation tasks.")
    apply_chat_template: bool = doc(True, help="lm_eval: render prompts with the tokenizer's chat template.")
    options: Dict[str, Any] = doc({}, help="Options of a plugin eval (validated against its typed schema).")


@dataclass
class TaskConfig:
    """The task metric (val/task_score, every stage but rm): greedy answers to held-out prompts,
    scored by a checker (see llmexp.task_probe for what auto picks)."""

    check: str = doc("auto", help=(
        "auto: the bundled skill's rule on its datasets (arithmetic*) and on judgements of its questions (data=feedback), else the stage's reward function (rollout stages), else exact "
        "match with the reference answer; reference; a registered reward function; or none."))
    max_prompts: Optional[int] = bounded(1000, min=1, help=(
        "At most this many held-out prompts (null: all). They are the validation rows (data.max_val_samples caps "
        "them), or the bundled skill's 620: its 155 questions in each of their four wordings, every question in one "
        "wording first."))
    max_new_tokens: int = bounded(24, min=1, help=(
        "Longest greedy answer, in tokens (serve's and generate's default too); not given, raised to fit the "
        "longest held-out reference answer (at most half the model's context)."))
    batch_size: int = bounded(64, min=1, help="Prompts per generation batch.")
    log_answers: int = bounded(16, min=0, help=(
        "At every validation, record the greedy answers to this many of the held-out prompts with their scores: "
        "answers.jsonl in the run directory, and a W&B table (val/answers) with logger=wandb; 0: none."))


@dataclass
class HealthConfig:
    """Post-training's known failure signs (dpo, kto, simpo, orpo and the rollout stages), checked on the logged metrics (see
    llmexp.health)."""

    action: str = choice("warn", HEALTH_ACTIONS, help=(
        "What a sign does: warn (printed, logged, in summary.json), stop (the run ends with exit code 4; with "
        "trainer.keep_best, after exporting the best validation before the sign) or off."))
    max_kl: float = bounded(10.0, min=0.0, help=(
        "rollout stages: most KL of the policy to its reference, summed over a response (nats)."))
    max_logp_drop: float = bounded(20.0, min=0.0, help=(
        "dpo, simpo, orpo: how far the chosen responses' log-prob may fall below its value at the start (nats)."))
    min_response_tokens: float = bounded(2.0, min=0.0, help="rollout stages: least mean response length, in tokens.")
    max_length_fraction: float = bounded(0.98, min=0.0, max=1.0, help=(
        "rollout stages: mean response length, as a fraction of stage.rollout.max_new_tokens, that counts as running to "
        "the cap."))
    min_entropy: float = bounded(0.005, min=0.0, help=(
        "rollout stages: least mean per-token entropy of the sampled responses (nats)."))
    max_task_drop: float = bounded(0.2, min=0.0, help=(
        "How far val/task_score may fall below its value at the start during training (early dips recover)."))
    max_final_task_drop: float = bounded(0.1, min=0.0, help=(
        "How far val/task_score may end below its value at the start: the exported model that much worse at its "
        "task than the model the stage started from."))
    patience: int = bounded(3, min=1, help=(
        "Logged steps in a row a sign must show before it counts (one noisy batch is not a collapse)."))


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: LoRA adapters on a frozen base (PEFT), or none."""

    name: str = choice("none", PEFT_METHODS, help=(
        "none (every weight trains), lora, or qlora (LoRA on a 4-bit NF4 base; CUDA and bitsandbytes)."))
    r: int = bounded(8, min=1, help="lora/qlora: rank of the adapters.")
    alpha: int = bounded(16, min=1, help="lora/qlora: lora_alpha; the adapters' update is scaled by alpha / r.")
    dropout: float = bounded(0.05, min=0.0, max=1.0, help="lora/qlora: dropout on the adapters' input.")
    target_modules: Optional[List[str]] = doc(None, help=(
        "lora/qlora: names of the modules to adapt (null: the architecture's attention and MLP projections)."))
    merge_on_export: bool = doc(True, help=(
        "lora/qlora: merge the adapters into the exported weights (false: model/ holds the adapters alone, naming "
        "their base model.pretrained by its absolute path; generate, eval, serve and export load them onto it, "
        "merged)."))


@dataclass
class RunConfig:
    """The whole composed config of one run."""

    model: ModelConfig = section(ModelConfig)
    stage: Any = section(SFTStageConfig, help=(
        "The training stage, chosen with stage=<name>; its keys are that stage's."))
    data: DataConfig = section(DataConfig)
    trainer: TrainerConfig = section(TrainerConfig)
    optim: OptimConfig = section(OptimConfig)
    strategy: StrategyConfig = section(StrategyConfig)
    logger: LoggerConfig = section(LoggerConfig)
    peft: PeftConfig = section(PeftConfig)
    eval: EvalConfig = section(EvalConfig)
    task: TaskConfig = section(TaskConfig)
    health: HealthConfig = section(HealthConfig)
    run_name: str = doc("run", help=(
        "Name of the run; the run directory is runs/<run_name>/<timestamp> unless hydra.run.dir is set "
        "(conf/config.yaml makes it <stage>-<model>)."))
    resume: Optional[str] = doc(None, help=(
        "Continue a run from its last checkpoint: a run directory, or auto (this run directory's checkpoint if it "
        "has one, else the newest unfinished run of the same run_name)."))
    offline: bool = doc(True, help=(
        "No network: models, datasets and lm-eval tasks must be local (false: hub downloads are allowed)."))


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
