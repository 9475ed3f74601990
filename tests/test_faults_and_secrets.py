"""Training faults stop cleanly with advice; secrets never reach the run record."""

from __future__ import annotations

import json
import os

import pytest
import torch
from llmexp.testing import FAST, run_cli

from llmexp.faults import TrainingFault, check_finite, explain_faults, oom_error
from llmexp.secrets import REDACTED, is_secret_key, redact, redact_override


@pytest.mark.slow
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "diverged"
    r = run_cli([*FAST, "optim.lr=1e5", "trainer.gradient_clip_val=null", "optim.warmup_steps=0",
                 "trainer.checkpoint_every_n_steps=2", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert "non-finite" in r.stderr and "the step was not applied" in r.stderr and "optim.lr" in r.stderr
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] >= 2
    said = " ".join(r.stderr.split())
    assert f"the last good checkpoint {run_dir / 'checkpoints' / 'last.ckpt'} (step {ckpt['global_step']}) is " \
           f"kept; with the fix, continue with the same overrides and resume={run_dir}" in said, said
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model").exists()


def test_check_finite(tmp_path):
    check_finite(torch.tensor(1.0), torch.tensor(2.0), 1)
    # A run without a checkpoint yet is told so (it was promised "the last good checkpoint is kept",
    # and resume= then found none).
    with pytest.raises(TrainingFault, match="no checkpoint had been written yet .* nothing to resume"):
        check_finite(torch.tensor(float("nan")), None, 3, tmp_path)
    with pytest.raises(TrainingFault, match="non-finite loss = inf at optimizer step 7"):
        check_finite(torch.tensor(float("inf")), None, 7)
    with pytest.raises(TrainingFault, match="gradient norm = nan"):
        check_finite(torch.tensor(1.0), torch.tensor(float("nan")), 1)


def test_out_of_memory_gets_advice_even_when_wrapped(tmp_path):
    # A real torch OOM exception object (a CPU cannot run out of GPU memory to raise one).
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(TrainingFault) as e:
        with explain_faults():
            try:
                raise oom
            except torch.OutOfMemoryError as inner:
                raise RuntimeError("wrapped by a strategy") from inner
    assert "micro_batch_size" in str(e.value) and "gradient_checkpointing" in str(e.value)
    assert oom_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 TB")) is not None
    assert oom_error(RuntimeError("shape mismatch")) is None
    with pytest.raises(ValueError):
        with explain_faults():
            raise ValueError("not a fault")


def test_secret_keys_and_values():
    for key in ("api_key", "hf_token", "token", "WANDB_API_KEY", "password", "client_secret", "auth"):
        assert is_secret_key(key), key
    for key in ("tokenizer", "max_new_tokens", "pad_token", "eos_token", "num_tokens", "keep_in_memory", "author"):
        assert not is_secret_key(key), key
    cfg = {"data": {"options": {"token": "hf_abc", "name": "x"}}, "model": {"pretrained": "envsecret"}}
    assert redact(cfg, env=["envsecret"]) == {"data": {"options": {"token": REDACTED, "name": "x"}},
                                              "model": {"pretrained": REDACTED}}
    assert redact_override("+data.options.token=hf_abc") == f"+data.options.token={REDACTED}"
    assert redact_override("optim.lr=1e-3") == "optim.lr=1e-3"


@pytest.mark.slow
def test_secrets_never_reach_the_run_record_or_wandb(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(60)))
    run_dir = tmp_path / "run"
    # The default logger (W&B, offline by default): no logger= override.
    args = [*(o for o in FAST if not o.startswith("logger=")), "data=files", f"data.path={data}", "+data.options.token=hf_SECRETxyz123",
            "+model.extra.auth_token=hf_SECRETxyz123",  # reaches the exported model/config.json
            "trainer.max_steps=10", "trainer.val_check_interval=10", f"hydra.run.dir={run_dir}"]
    r = run_cli(args, cwd=tmp_path, env={"WANDB_API_KEY": "wandbSECRET456", "HF_TOKEN": "hfenvSECRET789"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "summary.json").is_file()
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb")), "W&B logs offline by default"
    assert "wandb: WARNING" not in r.stderr, r.stderr[-2000:]  # e.g. Lightning's anonymous=None, deprecated
    for path in run_dir.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            for secret in (b"hf_SECRETxyz123", b"wandbSECRET456", b"hfenvSECRET789"):
                assert secret not in blob, (path, secret)
    for out in (r.stdout, r.stderr):
        assert "hf_SECRETxyz123" not in out
    assert "token: '***'" in (run_dir / "config.yaml").read_text()
    assert os.path.basename(run_dir) == "run"
