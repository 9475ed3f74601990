"""The engines that answer a rollout stage's prompts (stage.rollout.engine), one call shape:
``engine(prompt_ids, prompt_mask, max_new_tokens, samples_per_prompt=, greedy=, temperature=,
top_k=, top_p=, with_logprobs=, with_hidden=) -> Sampled``.

- ``hf``: llmexp's decode loop (llmexp.sampler) over the policy itself; the default.
- ``generate``: transformers' ``model.generate``, kept as the reference the others are tested against.
- ``vllm``: vLLM colocated in this process on the GPU, the policy's weights loaded into it after
  every optimizer step (TRL's "colocate" mode). CUDA only; refused before anything is built.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Tuple

from llmexp.errors import UserError

if TYPE_CHECKING:  # torch loads with the run, not with preflight's vllm_problem
    import torch

    from llmexp.sampler import Sampled


def build_engine(stage) -> Any:
    from llmexp.sampler import Sampler

    r = stage.cfg.stage.rollout
    tok = stage.tokenizer
    lockstep = stage.is_model_parallel and stage.trainer.world_size > 1
    if r.engine == "generate":
        return GenerateEngine(stage)
    if r.engine == "vllm":
        return VLLMEngine(stage)
    sampler = Sampler(stage.model, tok.eos_token_id, tok.pad_token_id, share_prefill=r.share_prefill,
                      drop_finished=r.drop_finished, lockstep=lockstep, compile=r.compile)
    return sampler


class GenerateEngine:
    """``model.generate`` on the prompts repeated per sample: the reference path."""

    def __init__(self, stage):
        self.stage = stage

    def __call__(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, *,
                 samples_per_prompt: int = 1, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, with_logprobs: bool = False, with_hidden: bool = False) -> Sampled:
        from llmexp.sampler import Sampled

        k = samples_per_prompt
        sampling = {} if greedy else {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}
        ids, mask = prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)
        responses = self.stage.generate_responses(ids, mask, max_new_tokens, engine="generate", **sampling)
        return Sampled(responses)  # no log-probs: the stage takes them with a forward pass


def vllm_problem(cuda_available: bool) -> str | None:
    """Why engine=vllm cannot run here (None: it can)."""
    if not cuda_available:
        return "vLLM runs on CUDA GPUs and none is available"
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vLLM is not installed (pip install vllm, a build matching this torch and CUDA)"
    return None


class VLLMEngine:
    """vLLM in this process, sharing the GPU with training; the policy's current weights are loaded
    into it whenever the optimizer has stepped since the last rollout."""

    def __init__(self, stage):
        import torch

        problem = vllm_problem(torch.cuda.is_available())
        if problem:
            raise UserError(f"stage.rollout.engine=vllm: {problem}; use stage.rollout.engine=hf")
        from vllm import LLM

        self.stage = stage
        model = stage.model
        # Every rank holds its own engine in this process (vLLM's external_launcher backend, as TRL's
        # colocate mode): the engine then runs in-process, where its model can take the policy's
        # weights, and under ddp it joins the process group Lightning launched.
        os.environ.update(launch_env(os.environ, stage.global_rank, stage.local_rank, stage.trainer.world_size))
        self.llm = LLM(model=_export_for_vllm(stage), tensor_parallel_size=1,
                       gpu_memory_utilization=stage.cfg.stage.rollout.vllm_gpu_memory_utilization,
                       dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                       enable_prefix_caching=True, seed=stage.cfg.trainer.seed + stage.global_rank,
                       distributed_executor_backend="external_launcher",
                       # vLLM's memory profiler reserves for its default 32768 tokens a step and finds too
                       # little room beside the training process (TRL passes the same)
                       max_num_batched_tokens=4096)
        self.synced_step = stage.global_step

    def sync_weights(self) -> None:
        llm_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        with policy_weights(self.stage.model) as weights:
            llm_model.load_weights(weights)
        self.llm.reset_prefix_cache()
        self.synced_step = self.stage.global_step

    def __call__(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, *,
                 samples_per_prompt: int = 1, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, with_logprobs: bool = False, with_hidden: bool = False) -> Sampled:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from llmexp.data.collate import pad_rows
        from llmexp.sampler import Sampled

        if self.synced_step != self.stage.global_step:
            self.sync_weights()
        params = SamplingParams(n=samples_per_prompt, max_tokens=max_new_tokens, min_tokens=1,
                                temperature=0.0 if greedy else temperature, top_k=top_k or -1, top_p=top_p,
                                stop_token_ids=[self.stage.tokenizer.eos_token_id])
        prompts = [TokensPrompt(prompt_token_ids=ids[m.bool()].tolist()) for ids, m in zip(prompt_ids, prompt_mask)]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        eos = self.stage.tokenizer.eos_token_id
        # A response that stopped at eos ends with it (the mask of what the loss sees ends there).
        rows = [list(c.token_ids) + ([eos] if c.finish_reason == "stop" and list(c.token_ids[-1:]) != [eos] else [])
                for o in outputs for c in o.outputs]
        responses = pad_rows(rows, self.stage.tokenizer.pad_token_id).to(prompt_ids.device)
        return Sampled(responses[:, :max_new_tokens])  # log-probs by the policy's own forward pass


def launch_env(environ: Mapping[str, str], rank: int, local_rank: int, world_size: int) -> Dict[str, str]:
    """The variables vLLM's external_launcher reads to join (or, on one device, start) the process
    group: this rank's place, and a rendezvous address and port where none is set (a free port,
    so that two runs on one machine do not collide)."""
    env = {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size),
           "MASTER_ADDR": environ.get("MASTER_ADDR") or "localhost"}
    port = environ.get("MASTER_PORT", "").strip().lower()
    env["MASTER_PORT"] = port if port not in ("", "0", "auto") else str(_free_port())
    return env


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def policy_weights(model) -> Iterator[List[Tuple[str, torch.Tensor]]]:
    """The policy's weights under the base model's names; a LoRA adapter is merged in for the
    duration (and taken out again after)."""
    if not hasattr(model, "merge_adapter"):
        yield list(model.state_dict().items())
        return
    model.merge_adapter()
    try:
        prefix = "base_model.model."
        yield [(n.removeprefix(prefix).replace(".base_layer", ""), p.data) for n, p in model.state_dict().items()
               if "lora_" not in n]
    finally:
        model.unmerge_adapter()


def _export_for_vllm(stage) -> str:
    """A directory vLLM can load the policy's architecture, weights and tokenizer from."""
    import tempfile

    path = tempfile.mkdtemp(prefix="llmexp-vllm-")
    model = stage.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with policy_weights(model) as weights:
        base.save_pretrained(path, state_dict=dict(weights))
    stage.tokenizer.save_pretrained(path)
    return path
