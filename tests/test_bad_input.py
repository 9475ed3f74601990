"""Bad input of every kind: exit code 2, one clear message naming the key or file, no traceback,
and no existing run directory touched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from llmexp.testing import FAST, run_cli


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory with an existing run record that no bad command may change."""
    root = tmp_path_factory.mktemp("bad-input")
    old = root / "runs" / "sft-llama" / "20260101-000000-000000"
    (old / "checkpoints").mkdir(parents=True)
    (old / "summary.json").write_text('{"final": {"val/loss": 0.5}}')
    (old / "config.yaml").write_text("stage: {name: sft}\n")
    (old / "checkpoints" / "last.ckpt").write_bytes(b"not really a checkpoint")
    files = root / "files"
    files.mkdir()
    (files / "empty.jsonl").write_text("")
    (files / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    (files / "body.jsonl").write_text("".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(20)))
    (files / "text.jsonl").write_text("".join(json.dumps({"text": f"row number {i}"}) + "\n" for i in range(20)))
    (files / "long.jsonl").write_text("".join(json.dumps({"text": f"word{i} " * 400}) + "\n" for i in range(20)))
    (files / "notamodel").mkdir()
    for name, arch in (("fake_rm", "LlamaForSequenceClassification"), ("fake_lm", "LlamaForCausalLM")):
        (files / name).mkdir()
        (files / name / "config.json").write_text(json.dumps({"architectures": [arch]}))
    # a stage=quantize int8 run: torchao tensors from_pretrained did not restore (a run trained random weights)
    (files / "int8_run" / "model").mkdir(parents=True)
    (files / "int8_run" / "model" / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "quantization_config": {"quant_method": "torchao"}}))
    (files / "int8_run" / "config.yaml").write_text("model: {pretrained: /runs/sft/model}\nstage: {name: quantize}\n")
    (files / "autoround_run" / "model").mkdir(parents=True)
    (files / "autoround_run" / "model" / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "quantization_config": {"quant_method": "auto-round", "bits": 4}}))
    (files / "q4_run" / "model").mkdir(parents=True)  # q4_0/q8_0: full-precision tensors of rounded values
    (files / "q4_run" / "model" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (files / "q4_run" / "config.yaml").write_text("stage: {name: quantize, method: q4_0}\n")
    (files / "a_run" / "model").mkdir(parents=True)
    (files / "a_run" / "model" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (files / "a_run" / "summary.json").write_text("{}")
    (files / "a_run" / "checkpoints").mkdir()
    (files / "a_run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    (files / "fake_gpt2").mkdir()
    (files / "rel_tasks").mkdir()  # an lm-eval task whose data file sits beside its YAML, named relatively
    (files / "rel_tasks" / "t.yaml").write_text(
        "task: rel_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data.jsonl\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "metric_list:\n  - metric: exact_match\n")
    (files / "rel_tasks" / "data.jsonl").write_text('{"q": "1+1", "a": "2"}\n')
    (files / "pretrain_run" / "model").mkdir(parents=True)  # a stage=pretrain run on the skill's text
    (files / "pretrain_run" / "model" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                                             "model_type": "llama"}))
    (files / "pretrain_run" / "config.yaml").write_text(
        "stage: {name: pretrain}\ndata: {source: bundled, name: arithmetic_text}\n")
    (files / "sweep" / "1").mkdir(parents=True)  # an earlier sweep's job 1 (its job 0 was deleted)
    (files / "sweep" / "1" / "summary.json").write_text("{}")
    (files / "fake_gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (files / "half_pairs.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"a{i}"}) + "\n"
                                                    for i in range(20)))
    def jsonl(name, rows):
        (files / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    (files / "latin1.jsonl").write_bytes('{"text": "fine"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (files / "latin1.csv").write_bytes("prompt,completion\n".encode() + "".join(
        f"caf\u00e9 {i},r\u00e9sum\u00e9\n" for i in range(20)).encode("latin-1"))
    jsonl("messages_string.jsonl", [{"messages": "hello"}] * 20)
    jsonl("null_content.jsonl", [{"messages": chat}] * 19 + [{"messages": [chat[0], {"role": "assistant", "content": None}]}])
    jsonl("unknown_role.jsonl", [{"messages": chat}] * 19 + [{"messages": [{"role": "bot", "content": "q"}, chat[1]]}])
    jsonl("empty_completions.jsonl", [{"prompt": f"q{i}", "completion": ""} for i in range(20)])
    jsonl("qa.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)])
    jsonl("numbers.jsonl", [{"prompt": f"Twice {i}?", "completion": 2 * i} for i in range(20)])
    jsonl("conversations.jsonl", [{"conversation": chat}] * 20)
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": "{\"city\": 1}"}}]}
    jsonl("tool_calls.jsonl", [{"messages": chat}] * 4 + [{"messages": [chat[0], call, {"role": "tool", "content": "9"},
                                                                       chat[1]]}] * 16)
    schemas = json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}])
    asked = lambda i: [{"role": "user", "content": f"Weather in {i}?"}, {"role": "assistant", "content": "Sunny."}]  # noqa: E731
    jsonl("tools.jsonl", [{"messages": asked(i), "tools": "" if i < 2 else schemas} for i in range(20)])
    (files / "mine").mkdir()
    (files / "mine" / "metrics.csv").write_text("the user's own numbers\n")  # not a run, yet a run would replace it
    jsonl("kto_labels.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}", "label": "yes"} for i in range(20)])
    yield root
    assert _digest(old) == before_digest[0]


before_digest: list = []


@pytest.fixture(scope="module", autouse=True)
def _remember(workdir):
    before_digest.append(_digest(workdir / "runs" / "sft-llama" / "20260101-000000-000000"))


CONFIG_CASES = {
    "wrong type": (["trainer.max_steps=abc"], "trainer.max_steps: expected an integer"),
    "unknown key": (["trainer.max_stepz=5"], "did you mean 'max_steps'"),
    "unknown option": (["model=lama"], "did you mean 'llama'"),
    # without data=files the path was ignored: the run trained on the bundled data, exit 0
    "data.path with a registered dataset": (["data.path={files}/qa.jsonl"],
                                            "data.path: '{files}/qa.jsonl' would not be read"),
    "resume as a command": (["resume", "{old}"], "resume is an override: python -m llmexp <the run's overrides> resume="),
    "a stage as a command": (["dpo"], "'dpo' is neither an override (key=value) nor a command"),
    "unknown group": (["modle.hidden_size=32"], "did you mean 'model'"),
    "a sweep's config": (["-m", "optim.lr=1e-3,2e-3", "--cfg", "job"], "-m and --cfg: Hydra takes one mode at a time"),
    # every job in one directory: job 1 wrote over job 0
    "a sweep's jobs in one directory": (["-m", "optim.lr=1e-3,2e-3", "hydra.sweep.subdir=same"],
                                        "hydra.sweep.subdir: 'same' is the same directory for every job"),
    # it resumed into multirun/ and left the killed run unfinished
    "a sweep resuming": (["-m", "optim.lr=1e-3,2e-3", "resume=auto"], "resume: resumes one run in its own directory"),
    # Hydra's traceback ("Can only enumerate CHOICE and RANGE sweeps")
    "an interval sweep": (["-m", "optim.lr=interval(0,1)"], "an interval is sampled by a sweeper plugin"),
    # Hydra's "Ambiguous value", exit 1
    "several values without -m": (["optim.lr=1e-3,2e-3"], "optim.lr: 1e-3,2e-3 gives several values, which make a "
                                                          "sweep"),
    # each job was composed when it started: job 0 trained, then the -1 was refused
    "a sweep's later value": (["-m", "optim.lr=1e-3,-1"], "optim.lr: must be >= 0.0, got -1.0"),
    # the second sweep wrote into the first's job directories, mixing their records
    "a sweep into an earlier sweep's directory": (["-m", "optim.lr=1e-3,2e-3", "hydra.sweep.dir={files}/sweep"],
                                                  "already holds the runs of an earlier sweep in {files}/sweep/1"),
    "lr not a number": (["optim.lr=nan"], "optim.lr: must be a finite number, got nan"),
    "lr infinite": (["optim.lr=inf"], "optim.lr: must be a finite number, got inf"),
    "no devices": (["trainer.devices=0"], "trainer.devices: 0 names no device"),
    "run directory is a file": (["hydra.run.dir={files}/empty.jsonl"], "is a file, not a directory"),
    "run directory cannot be created": (["hydra.run.dir=/proc/llmexp-test/run"],
                                        "cannot create the run directory '/proc/llmexp-test/run'"),
    "dpo without a temperature": (["stage=dpo", "stage.beta=0"], "stage.beta: must be > 0.0, got 0.0"),
    # it was told to set trainer.monitor_mode, and then failed at the first validation
    # lm-eval read it from the current directory: a traceback mid-eval, after training
    "a task's data file named relative to its YAML": (
        ["eval=lm_eval", "eval.tasks=[rel_task]", "eval.include_path={files}/rel_tasks"],
        "reads data_files 'data.jsonl', which lm-eval looks for in the current directory"),
    # its initial val/loss was measured on chat rows a text model never saw (2.78 against its own 1.12)
    "a pretrain run quantized on chat rows": (
        ["stage=quantize", "trainer.max_steps=0", "model.pretrained={files}/pretrain_run/model"],
        "is from a stage=pretrain run, trained on the text of 'arithmetic_text', and stage=quantize would validate "
        "it on the rows of 'arithmetic'"),
    "a pretrain run distilled on chat rows": (
        ["stage=distill", "stage.teacher={files}/pretrain_run", "model.hidden_size=32"],
        "stage.teacher: {files}/pretrain_run is from a stage=pretrain run"),
    "a misspelt monitor": (["trainer.monitor=val/los", "trainer.keep_best=true"],
                           "trainer.monitor: no stage validates 'val/los'\n      fix: did you mean 'val/loss'?"),
    # a run directory without model/ said "... You need to have sentencepiece or tiktoken installed"
    "a model directory without a model": (["stage=quantize", "trainer.max_steps=0", "model.pretrained={files}/notamodel"],
                                          "is neither a run's exported model nor a model directory (no config.json)"),
    "empty device list": (["trainer.devices=[]"], "trainer.devices: [] names no device"),
    "contradiction stage/data": (["stage=sft", "data=arithmetic_text"], "stage=sft needs fields messages"),
    "missing required value": (["data=files"], "data.path: a value is required"),
    "out of range": (["data.val_fraction=2.0"], "data.val_fraction: must be <= 0.9"),
    "not a valid choice": (["optim.scheduler=cosin"], "did you mean 'cosine'"),
    "heads do not divide": (["model.num_heads=3"], "not divisible by num_heads 3"),
    "qlora on cpu": (["peft=qlora"], "needs a CUDA GPU"),
    "liger kernels on cpu": (["model.liger_kernel=true"], "Liger kernels are Triton kernels and need a CUDA GPU"),
    "fp16 on cpu": (["trainer.precision=16-mixed"], "trainer.precision=16-mixed needs a CUDA GPU"),
    "bad betas": (["optim.betas=[0.9]"], "optim.betas: expected two numbers"),
    "sequence longer than positions": (["data.max_length=1024"], "exceeds model.max_position_embeddings"),
    "malformed override": (["trainer.max_steps=[1,"], "command line"),
    "adding an existing key": (["+trainer.max_steps=3"], "already exists"),
    "gpt2 has no kv heads": (["model=gpt2", "model.num_kv_heads=2"], "no grouped-query attention"),
    "missing data file": (["data=files", "data.path=/no/such/file.jsonl"], "no file or directory matches"),
    "missing pretrained dir": (["model.pretrained=/no/such/model"], "model.pretrained: directory"),
    "hub model offline": (["model.pretrained=org/model"], "offline=true"),
    "hub dataset offline": (["data=hf", "data.path=org/dataset"], "offline=true"),
    "resume without checkpoint": (["resume={files}"], "resume:"),
    "existing run directory": (["hydra.run.dir={old}"], "already holds a run"),
    "a directory holding a file a run writes": (["hydra.run.dir={files}/mine"],
                                                "already holds metrics.csv, which a run writes and would replace"),
    "format without its columns": (["data=files", "data.path={files}/text.jsonl", "data.format=chat"],
                                   "data.format=chat needs columns"),
    "dpo on chat data": (["stage=dpo", "data=arithmetic"], "stage=dpo needs fields prompt+chosen+rejected"),
    "preference data without rejected": (["stage=rm", "data=files", "data.path={files}/half_pairs.jsonl"],
                                         "stage=rm needs fields prompt+chosen+rejected"),
    "unknown dpo loss": (["stage=dpo", "stage.loss_type=sigmod"], "did you mean 'sigmoid'"),
    "simpo without a temperature": (["stage=simpo", "stage.beta=0"], "stage.beta: must be > 0.0, got 0.0"),
    "simpo margin misspelt": (["stage=simpo", "stage.gama=0.5"], "did you mean 'gamma'"),
    "simpo margin under TRL's name": (["stage=simpo", "stage.simpo_gamma=0.5"], "llmexp calls it stage.gamma"),
    "orpo on chat data": (["stage=orpo", "data=arithmetic"], "stage=orpo needs fields prompt+chosen+rejected"),
    "orpo without its odds-ratio term": (["stage=orpo", "stage.beta=0"], "stage.beta: must be > 0.0, got 0.0"),
    "orpo lambda under the paper's name": (["stage=orpo", "stage.lambda=0.5"], "llmexp calls it stage.beta"),
    "adapter-disabled reference without lora": (["stage=dpo", "stage.reference=adapter_disabled"],
                                                "stage.reference: adapter_disabled uses the base model"),
    "packing a preference stage": (["stage=dpo", "data.packing=true"], "data.packing: stage=dpo"),
    "unknown reward function": (["stage=ppo", "stage.reward.function=corect"], "no reward named 'corect'"),
    "reward model not a model": (["stage=grpo", "stage.reward.model={files}/notamodel"],
                                 "stage.reward.model:"),
    "minibatches do not divide": (["stage=ppo", "stage.num_minibatches=3"], "stage.num_minibatches: 3"),
    "group of one": (["stage=grpo", "stage.group_size=1"], "stage.group_size: must be >= 2"),
    "lm-eval on a reward model": (["stage=rm", "eval=lm_eval"], "stage=rm trains a reward model"),
    "reward model as the policy": (["stage=dpo", "model.pretrained={files}/fake_rm"],
                                   "model.pretrained: '{files}/fake_rm' is a reward model"),
    "sequence parallel without tensor parallel": (["strategy=ddp", "strategy.sequence_parallel=true"],
                                                  "strategy.sequence_parallel: sequence parallelism is part"),
    "attention transfer under tensor parallel": (["stage=distill", "stage.teacher={files}/fake_gpt2", "strategy=tp",
                                                  "trainer.devices=2"], "strategy=tp splits the heads across ranks"),
    "sequence parallel with generation": (["stage=grpo", "strategy=tp", "trainer.devices=2",
                                           "strategy.sequence_parallel=true"], "generates token by token"),
    "tensor parallel of a gpt2 directory": (["strategy=tp", "trainer.devices=2", "model.pretrained={files}/fake_gpt2"],
                                            "no tensor-parallel plan for gpt2"),  # the weights', not model=llama's
    "int8 of a gpt2 directory": (["stage=quantize", "trainer.max_steps=0", "model.pretrained={files}/fake_gpt2"],
                                 "gpt2's attention and MLP layers are transformers' Conv1D"),
    "training an int8 export": (["stage=dpo", "model.pretrained={files}/int8_run/model"],
                                "model.pretrained: '{files}/int8_run/model' is a torchao-quantized export"),
    "training an autoround export": (["stage=sft", "model.pretrained={files}/autoround_run/model"],
                                     "model.pretrained: '{files}/autoround_run/model' is an auto-round-quantized export "
                                     "(stage=quantize): its 4-bit weights load for generation and serving"),
    "quantizing an int8 export again": (["stage=quantize", "trainer.max_steps=0",
                                         "model.pretrained={files}/int8_run/model"],
                                        "fix: model.pretrained=/runs/sft/model (the model it quantized)"),
    "quantizing a q4_0 run's model again": (["stage=quantize", "trainer.max_steps=0",
                                            "model.pretrained={files}/q4_run/model"],
                                           "is the model of a stage=quantize run: its weights are rounded already"),
    "an int8 export as the teacher": (["stage=distill", "stage.teacher={files}/int8_run"],
                                      "stage.teacher: '{files}/int8_run' is a torchao-quantized export"),
    "a run directory as model.pretrained": (["stage=dpo", "model.pretrained={files}/a_run"],
                                            "fix: model.pretrained={files}/a_run/model"),
    "a run's file as model.pretrained": (["stage=dpo", "model.pretrained={files}/a_run/summary.json"],
                                         "is a file, not a model directory\n      fix: model.pretrained={files}/a_run/model"),
    "language model as the reward model": (["stage=ppo", "stage.reward.model={files}/fake_lm"],
                                           "is not a reward model (architectures: LlamaForCausalLM)"),
    "vllm rollouts on a CPU": (["stage=grpo", "stage.rollout.engine=vllm"],
                               "stage.rollout.engine: engine=vllm: vLLM runs on CUDA GPUs and none is available"),
    "unknown rollout engine": (["stage=ppo", "stage.rollout.engine=vlm"], "stage.rollout.engine"),
    "unknown grpo loss type": (["stage=grpo", "stage.loss_type=dr-grpo"], "did you mean 'dr_grpo'"),
    "grpo importance sampling per sentence": (["stage=grpo", "stage.importance_sampling_level=sentence"],
                                              "stage.importance_sampling_level"),
    "negative clip-higher": (["stage=grpo", "stage.epsilon_high=-0.1"], "stage.epsilon_high: must be >= 0.0"),
    "dpo exo_pair without label smoothing": (["stage=dpo", "stage.loss_type=exo_pair"],
                                              "stage.label_smoothing=1e-3"),
    "dpo unknown loss type": (["stage=dpo", "stage.loss_type=apo"], "apo_zero"),
    "mixture without datasets": (["data=mixture", "data.mixture=[]"],
                                 "data.mixture: data.source=mixture needs at least one dataset"),
    # a preset picked by hand: dpo's keys on the sft stage ('stage.beta: unknown key'), or 1B lrs on the tiny model
    "a real-size preset by hand": (["scale=dpo_llama_1b"], "fix: stage=dpo model=llama_1b"),
    # Hydra said only "Could not override 'data.options'", and its fix (+data.options=...) is refused
    "a dict of options with an unknown key": (["data.options={{n: 40}}"], "data.options.n: unknown key"),
    "mixture weight zero": (["data=mixture", "data.mixture=[{{name: arithmetic, weight: 0}}]"],
                            "data.mixture[0].weight: must be > 0.0"),
    "mixture entry key misspelt": (["data=mixture", "data.mixture=[{{name: arithmetic, wieght: 1}}]"],
                                   "data.mixture[0].wieght: unknown key"),
    "mixture file missing": (["data=mixture",
                              "data.mixture=[{{name: arithmetic}}, {{source: files, path: /no/x.jsonl}}]"],
                             "data.mixture[1].path: no file or directory matches"),
    "mixture dataset misspelt": (["data=mixture", "data.mixture=[{{name: arithmetc}}]"],
                                 "data.mixture[0].name: no dataset 'arithmetc'"),
    "mixture option misspelt": (["data=mixture", "data.mixture=[{{name: arithmetic, options: {{num_sample: 9}}}}]"],
                                "data.mixture[0].options: unknown option 'num_sample'"),
    "mixture of chat data for dpo": (["stage=dpo", "data=mixture"], "data.mixture[0]: stage=dpo needs fields"),
    "mixture list on one dataset": (["data.mixture=[{{name: arithmetic}}]"],
                                    "data.mixture: data.source=bundled reads one dataset"),
    "kto on chat data": (["stage=kto", "data=arithmetic"], "stage=kto needs fields prompt+completion+label or "
                                                             "prompt+chosen+rejected"),
    "kto micro-batch of one": (["stage=kto", "trainer.micro_batch_size=1"], "trainer.micro_batch_size: kto"),
    "kto labels not booleans": (["stage=kto", "data=files", "data.path={files}/kto_labels.jsonl"],
                                "label is 'yes'; a label is true (desirable) or false"),
    "rloo group of one": (["stage=rloo", "stage.group_size=1"], "stage.group_size: must be >= 2"),
    "rloo on plain text": (["stage=rloo", "data=arithmetic_text"], "stage=rloo needs fields prompt"),
    "rloo negative KL weight": (["stage=rloo", "stage.kl_coef=-0.1"], "stage.kl_coef: must be >= 0.0"),
    "rloo KL weight under TRL's name": (["stage=rloo", "stage.beta=0.1"], "llmexp calls it stage.kl_coef"),
    "online_dpo on plain text": (["stage=online_dpo", "data=arithmetic_text"], "stage=online_dpo needs fields prompt"),
    "online_dpo beta of zero": (["stage=online_dpo", "stage.beta=0"], "stage.beta: must be > 0.0"),
    "online_dpo exo_pair without smoothing": (["stage=online_dpo", "stage.loss_type=exo_pair"],
                                              "stage.loss_type: exo_pair is the KL"),
    "online_dpo length under TRL's name": (["stage=online_dpo", "stage.max_new_tokens=8"],
                                           "llmexp calls it stage.rollout.max_new_tokens"),
}

RUN_CASES = {
    "empty data file": (["data=files", "data.path={files}/empty.jsonl", "stage=pretrain"], "empty.jsonl is empty"),
    "malformed JSON line": (["data=files", "data.path={files}/broken.jsonl", "stage=pretrain"],
                            "broken.jsonl line 3 is not valid JSON"),
    "fields missing for the stage": (["data=files", "data.path={files}/body.jsonl"], "columns: body"),
    "everything filtered out": (["data=files", "data.path={files}/text.jsonl", "stage=pretrain",
                                 "data.min_chars=1000"], "every row was removed by step 'filter_length'"),
    "all samples too long": (["data=files", "data.path={files}/long.jsonl", "stage=pretrain",
                              "data.overlong=drop"], "data.max_length: every train sample was removed"),
    "not a model directory": (["model.pretrained={files}/notamodel"],
                              "model.pretrained: '{files}/notamodel' is neither a run's exported model nor a model "
                              "directory (no config.json)"),
    "model directory without a tokenizer": (["model.pretrained={small}"], "model.pretrained: '{small}' holds no "
                                            "tokenizer (none of tokenizer.json, tokenizer_config.json"),
    # a gpt2 of learned positions failed in its first step with an IndexError
    # (a data.max_length left at its default is lowered to fit: preflight.fit_max_length_to_positions)
    "data longer than a pretrained model's positions": (["model.pretrained={files}/short_gpt2", "data.max_length=128"],
                                                         "data.max_length: 128 is more than the 64 positions of"),
    "rollouts longer than a pretrained model's positions": (
        ["stage=grpo", "model.pretrained={files}/short_gpt2", "data.max_length=60"],
        "data.max_length: 60 plus stage.rollout.max_new_tokens=16 is more than the 64 positions"),
    "tokenizer does not fit the model": (["model.pretrained={small}", "model.tokenizer={bundled}"],
                                         "the tokenizer has 512 tokens as "),
    "model directory with another model's tokenizer": (["model.pretrained={files}/mismatched_model"],
                                                       "the directory's tokenizer does not belong to its model"),
    "unknown bundled data option": (["+data.options.colour=red"], "data.options: unknown option"),
    "damaged weights": (["model.pretrained={files}/damaged_model"], "its weights file is damaged or incomplete"),
    "non-UTF-8 JSONL": (["data=files", "data.path={files}/latin1.jsonl", "stage=pretrain"],
                        "latin1.jsonl line 2 is not UTF-8 text (byte 0xe9"),
    # datasets' reader logged two lines of its own and named no line
    "non-UTF-8 CSV": (["data=files", "data.path={files}/latin1.csv"],
                      "latin1.csv line 2 is not UTF-8 text (byte 0xe9 at column 4); re-encode the file as UTF-8"),
    "messages given as a string": (["data=files", "data.path={files}/messages_string.jsonl"],
                                   "line 1: messages is a string, but a list of messages"),
    "assistant content null": (["data=files", "data.path={files}/null_content.jsonl"],
                               "messages message 1 (assistant) has content None, not text"),
    "unknown role": (["data=files", "data.path={files}/unknown_role.jsonl"], "message 0 has role 'bot'; roles are"),
    "every completion empty": (["data=files", "data.path={files}/empty_completions.jsonl"],
                               "every completion in"),
    # data.source=files keeps data=arithmetic's options: they were passed on to datasets' json loader
    "data.source=files with another dataset's options": (["data.source=files", "data.path={files}/qa.jsonl"],
                                                         "use data=files"),
    # the rows cannot share one table: it said "no recognised format (columns: __mixture_source)"
    "a mixture of two formats": (["data=mixture", "data.mixture=[{{source: files, path: {files}/qa.jsonl}}, {{source: "
                                  "files, path: {files}/conversations.jsonl, fields: {{messages: conversation}}}}]"],
                                 "data.mixture: its sources have different formats"),
    # a path's typo, which offline=false would not fix
    "data=hf path typo": (["data=hf", "data.path={files}/no_such_dataset"], "no dataset directory or file at"),
    # the file has no default column either: it was called a file of no recognised format
    # a CSV file's numbers are read as text; JSON's keep their type
    "numbers as completions": (["data=files", "data.path={files}/numbers.jsonl"],
                               'line 1: completion is the number 0, not text: write it as a string ("0")'),
    # 54 packed rows of 587 samples: the count did not add up with the rows it listed
    "packed rows fewer than a batch": (["data.packing=true", "data.max_length=256", "trainer.micro_batch_size=64"],
                                       "training samples packed into rows of data.max_length=256; a smaller "
                                       "data.max_length or data.packing=false gives more rows"),
    # the calls were dropped by llmexp's template: the model learnt to answer tool requests with nothing
    "tool calls the chat template does not render": (["data=files", "data.path={files}/tool_calls.jsonl"],
                                                      "16 rows of '{files}/tool_calls.jsonl' have assistant turns with "
                                                      "tool_calls (the first at line 5), which the chat template does "
                                                      "not render"),
    # the schemas were dropped: the model learnt to call functions it was never shown
    "tools the chat template does not render": (["data=files", "data.path={files}/tools.jsonl"],
                                                "data: 18 conversations of '{files}/tools.jsonl' give tools (the "
                                                "first at line 3), which the chat template does not render"),
    "tools a rollout stage would not give the template": (["stage=grpo", "data=files", "data.path={files}/tools.jsonl"],
                                                          "give tools (the first at line 3), which the rollout stages "
                                                          "do not give the chat template"),
    "field mapping typo": (["data=files", "data.path={files}/conversations.jsonl", "data.fields.messages=conversaton"],
                           "did you mean 'conversation'"),
    "field mapped to a missing column": (["data=files", "data.path={files}/qa.jsonl", "data.fields.completion=answer"],
                                         "data.fields.completion=answer:"),
}


def _args(args, workdir):
    from llmexp.models.tokenizer import BUNDLED_TOKENIZER_DIR

    fmt = {"files": workdir / "files", "old": workdir / "runs" / "sft-llama" / "20260101-000000-000000",
           "small": workdir / "files" / "small_model", "bundled": BUNDLED_TOKENIZER_DIR}
    return [a.format(**fmt) for a in args]


def _unchanged(workdir):
    """The existing run record is byte for byte what it was before any bad command."""
    assert _digest(workdir / "runs" / "sft-llama" / "20260101-000000-000000") == before_digest[0]


def _check(r, expected, workdir):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "LLMEXP_TRACEBACK" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("llmexp: error:") == 1
    assert expected in r.stderr, r.stderr
    _unchanged(workdir)


def test_the_table_covers_at_least_60_cases():
    assert len(CONFIG_CASES) + len(RUN_CASES) + len(COMMAND_CASES) >= 60


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_config_errors(name, workdir):
    args, expected = CONFIG_CASES[name]
    r = run_cli([*FAST, *_args(args, workdir)], cwd=workdir)
    _check(r, expected.format(files=workdir / "files"), workdir)
    assert "Validation" not in r.stderr  # refused before any training started
    assert not (workdir / "multirun").exists()  # no job of a sweep started


@pytest.fixture(scope="module")
def small_model(workdir):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = workdir / "files" / "small_model"
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32)).save_pretrained(path)
    damaged = workdir / "files" / "damaged_model"  # a copy cut short, with a tokenizer that loads
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32)).save_pretrained(damaged)
    weights = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    from transformers import AutoTokenizer

    from llmexp.models.tokenizer import BUNDLED_TOKENIZER_DIR

    AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR)).save_pretrained(damaged)
    mismatched = workdir / "files" / "mismatched_model"  # embeds 100 tokens, ships a 512-token tokenizer
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32)).save_pretrained(mismatched)
    AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR)).save_pretrained(mismatched)
    from transformers import GPT2Config, GPT2LMHeadModel

    short = workdir / "files" / "short_gpt2"  # 64 learned positions
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(short)
    AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR)).save_pretrained(short)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUN_CASES))
def test_data_and_model_errors(name, workdir, small_model):
    args, expected = RUN_CASES[name]
    r = run_cli([*FAST, *_args(args, workdir)], cwd=workdir)
    _check(r, _args([expected], workdir)[0], workdir)
    assert not list((workdir / "runs" / "sft-llama").glob("*/model"))


# The small commands: argparse refuses a bad value naming the option, before any model is loaded.
COMMAND_CASES = {
    "generate: negative max_new_tokens": (["llmexp.generate", "{old}", "hi", "--max-new-tokens", "-1"],
                                          "argument --max-new-tokens: must be >= 1, got -1"),
    "generate: negative temperature": (["llmexp.generate", "{old}", "hi", "--temperature", "-0.5"],
                                       "argument --temperature: must be a finite number >= 0, got -0.5"),
    "generate: empty prompt": (["llmexp.generate", "{old}", "  "], "argument prompts: is empty"),
    "eval: negative limit": (["llmexp.eval", "{old}", "--limit", "-3"], "argument --limit: must be >= 1, got -3"),
    "eval: limit not a number": (["llmexp.eval", "{old}", "--limit", "ten"],
                                 "argument --limit: expected a whole number, got 'ten'"),
}


def _module(args, workdir):
    from llmexp.testing import run_module

    module, *rest = _args(args, workdir)
    return run_module(module, rest, cwd=workdir, timeout=300)


@pytest.mark.parametrize("name", list(COMMAND_CASES))
def test_command_errors(name, workdir):
    args, expected = COMMAND_CASES[name]
    r = _module(args, workdir)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and expected in r.stderr, r.stderr
    assert f"{args[0]}: error:" in r.stderr and not r.stdout
    _unchanged(workdir)


# What python -m llmexp.eval is pointed at: each refused in one line naming the option (an empty task
# list evaluated nothing, exit 0, and a missing --include-path was not noticed).
EVAL_CASES = {
    "no task": (["{old}", "--tasks", ","], "--tasks: names no task (',')"),
    "missing include path": (["{old}", "--tasks", "arithmetic_gen", "--include-path", "{files}/nope"],
                             "--include-path: '{files}/nope' is not a directory"),
    "registry task offline": (["{old}", "--tasks", "hellaswag"], "--online reaches lm-eval's registry"),
    "a file of a run": (["{files}/a_run/summary.json"], "is a file; give the directory it is in ({files}/a_run)"),
    "a task's data file relative to its YAML": (["{old}", "--tasks", "rel_task", "--include-path",
                                                 "{files}/rel_tasks"],
                                                "fix: give its absolute path in the YAML ({files}/rel_tasks/data.jsonl)"),
    # it named checkpoints/, which then failed as "neither a run directory ... nor a model directory"
    "a checkpoint of a run": (["{files}/a_run/checkpoints/last.ckpt"],
                              "is a file; give the directory it is in ({files}/a_run)"),
    "a folder of runs": (["{files}"], "holds runs (a_run), not a model; give one of them, e.g. {files}/a_run"),
}


@pytest.mark.parametrize("name", list(EVAL_CASES))
def test_eval_command_errors(name, workdir):
    args, expected = EVAL_CASES[name]
    r = _module(["llmexp.eval", *args], workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert expected.format(files=workdir / "files") in r.stderr, r.stderr
    _unchanged(workdir)


@pytest.mark.slow  # trains the small model it generates with
@pytest.mark.parametrize("module", ["llmexp.generate", "llmexp.eval"])
def test_generate_and_eval_name_a_model_without_a_tokenizer(workdir, module):
    """It said "cannot load a tokenizer from ...: Couldn't instantiate the backend tokenizer from one of: `"."""
    r = _module([module, "{files}/fake_lm", *(["hi"] if module == "llmexp.generate" else [])], workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"'{workdir}/files/fake_lm' holds no tokenizer (none of tokenizer.json" in r.stderr, r.stderr
    assert "copy the tokenizer files it was trained with" in r.stderr


def test_generate_refuses_a_prompt_longer_than_the_context(workdir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmexp.models.tokenizer import BUNDLED_TOKENIZER_DIR

    model_dir = workdir / "files" / "short_context"
    tok = AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR))
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=32)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    r = _module(["llmexp.generate", str(model_dir), "word " * 40, "--max-new-tokens", "4"], workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "exceeds the model's context of 32 tokens" in r.stderr and "--max-new-tokens" in r.stderr
    r = _module(["llmexp.generate", str(model_dir), "hi", "--max-new-tokens", "4"], workdir)
    assert r.returncode == 0 and r.stdout.startswith("> hi"), r.stderr[-2000:]


def test_a_reader_that_stops_early_ends_the_listing_quietly(workdir):
    """`llmexp plugins | head -1`: the pipe is closed before llmexp writes (no BrokenPipeError)."""
    import subprocess

    from llmexp.testing import popen_module

    p = popen_module("llmexp.plugins", [], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err[-2000:]


@pytest.mark.slow
def test_eval_names_a_model_whose_weights_are_damaged(workdir, small_model):
    r = _module(["llmexp.eval", "{files}/damaged_model", "--tasks", "arithmetic_mc"], workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "run: cannot load a causal LM from" in r.stderr and "damaged or incomplete" in r.stderr
