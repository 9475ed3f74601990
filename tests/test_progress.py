"""The run's progress in optimizer steps: one bar on a terminal, a line every tenth of the run in a
log; before, Lightning's bars restarted at every epoch and stayed (a rollout stage's epoch is one
iteration: `stage=ppo` left one bar per iteration, each with its metrics, in every log file)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from llmexp.progress import fit, format_metrics, remaining
from llmexp.testing import OFFLINE_ENV, TINY, run_cli

SHOWN = [o for o in TINY if o != "trainer.progress_bar=false"]


def test_metrics_are_named_short_and_a_silent_guard_is_not_shown():
    metrics = {"train/loss": 0.123456, "health/warnings": 0.0, "val/loss": 2.0}
    assert format_metrics(metrics) == "loss 0.1235 · val/loss 2"
    assert format_metrics({**metrics, "health/warnings": 1.0}) == "loss 0.1235 · health/warnings 1 · val/loss 2"
    assert fit("reward_mean 0.9414", 8) == "reward_…" and fit("loss 1", 8) == "loss 1"
    assert remaining(10.0, 5, 15) == 30.0 and remaining(1.0, 0, 20) is None


def test_a_log_gets_a_line_per_tenth_of_a_rollout_run_not_one_per_iteration(tmp_path, tiny_teacher):
    r = run_cli([*SHOWN, "stage=ppo", f"model.pretrained={tiny_teacher}", "trainer.grad_accum=1",
                 "stage.rollout.max_new_tokens=8", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = re.findall(r"^step (\d+)/20 \((\d+)%\) · \d+ s.*$", r.stdout, re.M)
    assert [int(step) for step, _ in lines] == list(range(2, 21, 2)), r.stdout[-3000:]
    assert [int(pct) for _, pct in lines] == list(range(10, 101, 10))
    assert "reward_mean " in r.stdout and "about " in r.stdout
    assert "Epoch" not in r.stdout + r.stderr  # Lightning's per-epoch bars


def test_a_log_line_says_which_validation_its_metrics_are_from(tmp_path):
    """The last line showed the validation before last as if current (val/loss 3.149 at step 60/60,
    while the run ended at 2.854): the validation at a step comes after its line."""
    r = run_cli([*SHOWN, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(re.findall(r"^step (\d+)/20 .*?((?:val/loss \S+ \(at step \d+\))?)$", r.stdout, re.M))
    assert lines["12"].endswith("(at step 10)") and lines["20"].endswith("(at step 10)"), r.stdout[-2000:]
    assert lines["8"] == "" or lines["8"].endswith("(at step 0)")


def test_a_terminal_gets_one_bar_for_the_whole_run(tmp_path):
    import pty

    primary, secondary = pty.openpty()
    env = {**os.environ, **OFFLINE_ENV, "COLUMNS": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "llmexp", *SHOWN, f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=tmp_path, env=env, stdout=secondary, stderr=secondary, stdin=subprocess.DEVNULL)
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the command has ended and closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    assert proc.wait(timeout=600) == 0, out[-3000:]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    assert re.search(r"step\s+━+ 20/20 ", text), text[-3000:]  # the bar, at the run's last step
    assert "loss " in text and "Epoch" not in text
    assert not re.search(r"^step \d+/20 \(", text, re.M)  # no log lines on a terminal
