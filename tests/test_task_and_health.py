"""The task metric's pieces (held-out prompts, checkers) and the health guard's signs, as pure
functions with hand-made inputs; the end-to-end behaviour is in test_post_training.py."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from llmexp.testing import typed

from llmexp.config.schema import HealthConfig
from llmexp.data import skill
from llmexp.health import FIXES, HealthGuard, lr_scale_note, step_signs, task_sign
from llmexp.task_probe import TaskProbe, build_probe, reference_match, resolve_check, task_rows

USER = {"role": "user", "content": "What is 3 plus 4?"}
ANSWER = {"role": "assistant", "content": "3 + 4 = 7"}


def test_task_rows_take_the_prompt_and_reference_of_every_format():
    chat = task_rows([{"messages": [USER, ANSWER]}, {"messages": [ANSWER]}], "chat")
    assert chat == [{"prompt": [USER], "columns": {"reference": "3 + 4 = 7"}}]  # nothing before the answer: skipped
    pc = task_rows([{"prompt": "Q", "completion": "A", "id": 3}], "prompt_completion")
    assert pc == [{"prompt": "Q", "columns": {"id": 3, "reference": "A"}}]
    pref = task_rows([{"prompt": [USER], "chosen": [ANSWER], "rejected": [ANSWER]}], "preference")
    assert pref[0]["columns"] == {"reference": "3 + 4 = 7"}
    assert task_rows([{"prompt": [USER], "answer": "7"}], "prompt_only")[0]["columns"] == {"answer": "7"}
    kto = task_rows([{"prompt": "Q", "completion": "A", "label": True}, {"prompt": "Q", "completion": "B", "label": False}],
                    "unpaired_preference")
    assert kto == [{"prompt": "Q", "columns": {"reference": "A"}}]  # the desirable completion is the reference
    assert task_rows([{"text": "x"}], "text") == []


def test_checkers_score_what_the_model_said():
    assert reference_match(" 3 +  4 = 7 ", "3 + 4 = 7") == 1.0 and reference_match("3 + 4 = 8", "3 + 4 = 7") == 0.0
    assert skill.correctness_reward("3 + 4 = 7", answer="7") == 1.0
    assert skill.correctness_reward("3 + 4 = 7", reference="3 + 4 = 7") == 1.0  # chat/preference rows
    assert skill.correctness_reward("3 + 5 = 8", reference="3 + 4 = 7") == 0.0
    assert skill.correctness_reward("no number", reference=None) == 0.0
    # The bundled prompts carry the solution: the question's operands must be restated, the result right,
    # nothing else (a policy rewarded on the number alone learnt to answer '9 + 9 = 12' to 'Add 3 and 9').
    sol = "3 + 9 = 12"
    assert skill.correctness_reward("3 + 9 = 12", answer="12", solution=sol) == 1.0
    assert skill.correctness_reward("9 + 3 = 12.", answer="12", solution=sol) == 1.0  # an addition commutes
    for wrong in ("9 + 9 = 12", "4 + 8 = 12", "3 + 9 = 12 + 0 = 12", "3 + 9 = 12 = 12", "= 12", "12", "3 + 9 = 13"):
        assert skill.correctness_reward(wrong, answer="12", solution=sol) == 0.0, wrong
    assert skill.correctness_reward("6 - 2 = 4", solution="6 - 2 = 4") == 1.0
    assert skill.correctness_reward("2 - 6 = 4", solution="6 - 2 = 4") == 0.0  # a subtraction does not
    assert skill.correctness_reward("9 + 9 = 12", reference="3 + 9 = 12") == 0.0  # chat/preference rows alike
    # Other prompt data has only the answer: the number after '=', and any sum stated must be true.
    assert skill.correctness_reward("The sum: 4 + 8 = 12", answer="12") == 1.0
    assert skill.correctness_reward("9 + 9 = 12", answer="12") == 0.0
    assert skill.correctness_reward("so it is = 12", answer="12") == 1.0


def test_auto_picks_the_skill_rule_the_reward_function_or_the_reference():
    sft, ppo = typed([]), typed(["stage=ppo"])
    assert resolve_check("auto", True, sft.stage, "chat") == "arithmetic_correct"
    assert resolve_check("auto", False, ppo.stage, "prompt_only") == "arithmetic_correct"  # ppo's reward
    assert resolve_check("auto", False, sft.stage, "chat") == "reference"
    assert resolve_check("auto", False, sft.stage, "text") is None
    assert resolve_check("none", True, sft.stage, "chat") is None
    assert resolve_check("reference", True, sft.stage, "chat") == "reference"


def test_the_bundled_probe_is_the_skills_155_questions_in_every_wording_for_every_stage():
    """620 distinct prompts: each question in its seeded wording first (so that task.max_prompts=155
    asks each once), then in each of its other three."""
    from llmexp.data.skill import task_prompts

    for overrides, fmt in (([], "chat"), (["stage=dpo"], "preference"), (["stage=grpo"], "prompt_only")):
        probe = build_probe(typed(overrides), [], fmt)
        assert probe.check == "arithmetic_correct" and len(probe.rows) == 620
        assert len({r["prompt"][0]["content"] for r in probe.rows}) == 620
        assert probe.rows[:155] == task_prompts()
        solutions = [r["columns"]["solution"] for r in probe.rows]
        assert all(solutions[k * 155:(k + 1) * 155] == solutions[:155] for k in range(4))
    assert build_probe(typed(["task.max_prompts=155"]), [], "chat").rows == task_prompts()
    # a model pretrained on the skill's text is asked to continue its facts: '3 + 4 =' -> '7. ...'
    text = build_probe(typed(["stage=pretrain", "data=arithmetic_text", "task.check=auto"]), [], "text")
    assert text.check == "arithmetic_continues" and len(text.rows) == 155
    assert text.rows[0] == {"prompt": "0 + 0 =", "columns": {"answer": "0"}}
    assert resolve_check("auto", True, typed(["stage=pretrain"]).stage, "text") == "arithmetic_continues"


def test_a_plugins_bundled_dataset_is_judged_on_its_own_rows_not_the_skills():
    """data=acme_qa (a plugin's bundled dataset): its held-out rows, checked against their reference
    answers; they were replaced by the arithmetic skill's 155 questions and checked by
    arithmetic_correct, silently (a rollout stage's: by its reward function, test above)."""
    from plugin_packages import ensure_installed

    ensure_installed()  # the example plugin llmexp-acme-qa, whose bundled dataset this is
    val = [{"messages": [{"role": "user", "content": "What is the price of the widget?"},
                         {"role": "assistant", "content": "It costs 12 dollars."}]}]
    probe = build_probe(typed(["data=acme_qa"]), val, "chat")
    assert probe.check == "reference" and len(probe.rows) == 1
    assert probe.rows[0]["columns"]["reference"] == "It costs 12 dollars."


def test_a_continuation_counts_when_it_starts_with_the_answer():
    assert skill.continues_with_answer(" 7. 9 - 2 = 7.", answer="7") == 1.0
    assert skill.continues_with_answer("7", answer="7") == 1.0
    assert skill.continues_with_answer("71.", answer="7") == 0.0  # not the number 7
    assert skill.continues_with_answer("8. 3 + 4 = 7.", answer="7") == 0.0  # the answer comes later
    assert skill.continues_with_answer("seven.", answer="7") == 0.0


def test_the_probe_shards_ranks_in_lockstep_and_scores_only_real_rows():
    rows = [{"prompt": [USER], "columns": {"answer": str(i)}} for i in range(5)]
    probe = TaskProbe(check="arithmetic_correct", rows=rows, max_new_tokens=8, batch_size=2)
    assert [len(probe.shard(r, 2)) for r in (0, 1)] == [3, 3] and probe.shard(1, 2)[-1] is None
    calls = []

    def generate(prompts, tools):
        calls.append(len(prompts))
        assert tools == [None] * len(prompts)
        return ["1 - 0 = 1"] * len(prompts)  # right only for the row whose answer is 1

    sums = probe.sums(generate, rank=1, world=2)  # rows 1 and 3, plus one padding row
    assert calls == [2, 1] and sums["task_score"] == (1.0, 2)


def test_prompts_whose_answer_would_overrun_the_context_are_left_out_and_counted(tmp_path):
    """A 501-token held-out prompt and 24 new tokens crashed a gpt2 of 512 positions in its first
    validation (IndexError from the position embedding); it is now left out, and the record says so."""
    import json

    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.testing import run_cli

    tok = load_tokenizer(None, None)
    long_prompt = "Summarize item 1: " + "word " * 162
    probe = TaskProbe(check="reference", rows=[{"prompt": long_prompt, "columns": {"reference": "ok"}},
                                               {"prompt": "Short?", "columns": {"reference": "ok"}}],
                      max_new_tokens=24, batch_size=8)
    assert len(tok(long_prompt, add_special_tokens=False)["input_ids"]) + 24 > 512
    kept = probe.within_context(tok, 512)
    assert [r["prompt"] for r in kept.rows] == ["Short?"] and kept.too_long == 1
    assert probe.within_context(tok, 10) is None and probe.within_context(tok, None) is probe
    rows = [{"prompt": f"Summarize item {i}: " + "word " * 162, "completion": "ok"} for i in range(40)]
    rows += [{"prompt": f"Short item {i}?", "completion": "ok"} for i in range(40)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli(["model=gpt2", "data=files", f"data.path={tmp_path / 'long.jsonl'}",
                 "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=none",
                 f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    task = json.loads((tmp_path / "run" / "summary.json").read_text())["task"]
    assert task["too_long_left_out"] > 0 and task["prompts"] > 0, task
    assert "longer than the model's context with the answer, left out" in " ".join((r.stdout + r.stderr).split())
    # every held-out prompt too long: the metric was gone without a word
    (tmp_path / "all_long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    r = run_cli(["model=gpt2", "data=files", f"data.path={tmp_path / 'all_long.jsonl'}",
                 "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=none",
                 f"hydra.run.dir={tmp_path / 'run2'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert "task" not in s and any(n.startswith("no task metric: every one of the") for n in s["notes"]), s
    assert "no task metric: every one of the" in " ".join(r.stderr.split())


def test_preference_pairs_reject_the_mistakes_a_policy_makes():
    pairs = list(skill.preference_pairs(num_samples=400, seed=5))
    rejected = [p["rejected"][0]["content"] for p in pairs]
    chosen = [p["chosen"][0]["content"] for p in pairs]
    assert all(r != c for r, c in zip(rejected, chosen))
    consistent = [r for r in rejected if r.count("=") == 1 and r.split("=")[1].strip()
                  and eval(r.split("=")[0]) == int(r.split("=")[1])]  # noqa: S307 - our own sums
    assert len(consistent) > 60  # misread questions: right arithmetic, wrong question
    assert any(r.endswith("=") or r.count("=") == 2 for r in rejected)  # broken answers
    p = skill.Problem(3, "+", 4)
    m = skill.misread(p, random.Random(0), 9)
    assert m != p and m.op == "+" and (m.a == 3 or m.b == 4)


def cfg(**kw) -> HealthConfig:
    return HealthConfig(**kw)


def test_each_sign_fires_past_its_threshold_and_not_before():
    c = cfg()
    healthy = {"train/kl": 4.0, "train/response_length": 8.0, "train/entropy": 0.3, "train/reward_std": 0.4}
    assert step_signs(healthy, {}, c, "ppo", 16) == {}
    assert set(step_signs({**healthy, "train/kl": 19.0}, {}, c, "ppo", 16)) == {"kl_runaway"}
    assert set(step_signs({"train/kl": 2.0, "train/response_length": 8.0}, {}, c, "grpo", 16)) == {"kl_runaway"}  # per token x length
    assert set(step_signs({**healthy, "train/response_length": 1.5}, {}, c, "ppo", 16)) == {"length_collapse"}
    assert set(step_signs({**healthy, "train/response_length": 16.0}, {}, c, "ppo", 16)) == {"length_at_cap"}
    assert set(step_signs({**healthy, "train/entropy": 0.001}, {}, c, "ppo", 16)) == {"entropy_collapse"}
    # ... unless the held-out answers got better: converging on the right answers, not collapsing
    assert step_signs({**healthy, "train/entropy": 0.001}, {}, c, "ppo", 16, task_converging=True) == {}
    # ... or were all right from the start (a 1.000 SFT's GRPO samples one right answer per question)
    guard = HealthGuard(c, "grpo", 16)
    assert guard.converging(SimpleNamespace(initial_metrics={"val/task_score": 1.0}))
    assert not guard.converging(SimpleNamespace(initial_metrics={"val/task_score": 0.92}))
    assert not guard.converging(SimpleNamespace(initial_metrics={}))
    assert set(step_signs({**healthy, "train/reward_std": 0.0}, {}, c, "ppo", 16)) == {"no_reward_signal"}
    # Every response right: solved, not broken (the mean rose from its start to its highest yet) ...
    solved = {**healthy, "train/reward_std": 0.0, "train/reward_mean": 1.0}
    start, peak = {"train/reward_mean": 0.4}, {"train/reward_mean": 0.95}
    assert "no_reward_signal" not in step_signs(solved, start, c, "ppo", 16, peak)
    # ... but the same reward throughout, or a fall to one reward for all, is a sign.
    assert "no_reward_signal" in step_signs(solved, {"train/reward_mean": 1.0}, c, "ppo", 16, peak)
    fallen = {**solved, "train/reward_mean": 0.5}
    assert "no_reward_signal" in step_signs(fallen, start, c, "ppo", 16, {"train/reward_mean": 0.95})
    start = {"train/logp_chosen": -0.3}
    assert step_signs({"train/logp_chosen": -5.0}, start, c, "dpo", None) == {}
    assert set(step_signs({"train/logp_chosen": -40.0}, start, c, "dpo", None)) == {"logp_drop"}
    assert task_sign(0.80, 0.92, c) == {} and set(task_sign(0.5, 0.92, c)) == {"task_drop"}
    assert task_sign(None, 0.9, c) == {}
    # At the last validation the export is judged: 0.923 -> 0.761 (measured: PPO against a reward model
    # of another seed in the rlhf pipeline) is a sign there, not during training; 0.923 -> 0.871 is not.
    assert task_sign(0.761, 0.923, c) == {} and task_sign(0.871, 0.923, c, final=True) == {}
    assert "health.max_final_task_drop=0.1" in task_sign(0.761, 0.923, c, final=True)["task_drop"]
    assert set(FIXES) == {"kl_runaway", "logp_drop", "length_collapse", "length_at_cap", "entropy_collapse",
                          "no_reward_signal", "task_drop"}


def test_a_large_model_with_the_tiny_models_lr_is_warned_about():
    assert lr_scale_note("dpo", 1_200_000_000, 5e-4) is not None
    assert lr_scale_note("dpo", 1_200_000_000, 5e-7) is None
    assert lr_scale_note("dpo", 1_000_000, 5e-4) is None and lr_scale_note("sft", 1_200_000_000, 3e-3) is None


@pytest.mark.parametrize("bad", ["health.action=panic", "health.patience=0", "task.max_new_tokens=0"])
def test_bad_task_and_health_settings_are_refused(bad):
    from llmexp.testing import compose

    from llmexp.preflight import preflight
    from llmexp.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        preflight(compose([bad]))
    assert e.value.problems[0].key == bad.split("=")[0]


def test_scores_of_the_reference_checker_are_a_tensor():
    from llmexp.task_probe import build_checker

    scores = build_checker("reference")([None, None], ["a", "b"], [{"reference": "a"}, {"reference": "c"}])
    assert torch.equal(scores, torch.tensor([1.0, 0.0]))


def test_reward_model_note_warns_of_a_reward_model_near_chance(tmp_path):
    import json

    from llmexp.config.schema import RewardConfig
    from llmexp.health import reward_model_note

    def note(accuracy, normalize=True):
        (tmp_path / "config.json").write_text(json.dumps({"llmexp_score_scale": 0.0015, **(
            {"llmexp_heldout_accuracy": accuracy} if accuracy is not None else {})}))
        return reward_model_note(RewardConfig(model=str(tmp_path), normalize=normalize))

    assert "ranks its held-out pairs at 0.56 (chance is 0.5)" in note(0.56)
    assert "divided by half its held-out margin (0.0015)" in note(0.56)
    assert "margin" not in note(0.56, normalize=False)
    assert note(0.98) is None and note(0.65) is None and note(None) is None  # unknown: a reward model from elsewhere
    assert reward_model_note(RewardConfig(function="arithmetic_correct")) is None
    assert reward_model_note(None) is None


def test_every_validation_records_its_greedy_answers_and_their_scores(tmp_path):
    """task.log_answers: answers.jsonl (and a W&B table) holds what the model said at each
    validation; with every probe prompt logged, each step's mean score is its val/task_score."""
    import csv
    import json

    from llmexp.record import append_answers, keep_answers_up_to
    from llmexp.testing import train

    run = train(tmp_path, ["logger=wandb"])  # FAST: validations at 0, 20 and 40 on 16 prompts
    lines = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    assert [sum(1 for a in lines if a["step"] == s) for s in (0, 20, 40)] == [16, 16, 16]
    assert set(lines[0]) == {"step", "prompt", "answer", "score"} and lines[0]["prompt"][0]["role"] == "user"
    with open(run / "metrics.csv", newline="") as fh:
        logged = {int(float(r["step"])): float(r["val/task_score"]) for r in csv.DictReader(fh) if r.get("val/task_score")}
    for step, score in logged.items():
        assert sum(a["score"] for a in lines if a["step"] == step) / 16 == pytest.approx(score)
    tables = sorted(run.glob("wandb/offline-run-*/files/media/table/val/answers_*.table.json"))
    assert len(tables) == 3
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["step", "prompt", "answer", "score"] and len(table["data"]) == 16
    assert table["data"][0][2] in {a["answer"] for a in lines}

    # a resumed run drops the answers the killed run recorded after its checkpoint
    keep_answers_up_to(run, 20)
    assert {json.loads(line)["step"] for line in (run / "answers.jsonl").read_text().splitlines()} == {0, 20}
    append_answers(run, 40, [{"prompt": "p", "answer": "a", "score": 1.0}])
    assert json.loads((run / "answers.jsonl").read_text().splitlines()[-1]) == {
        "step": 40, "prompt": "p", "answer": "a", "score": 1.0}
    quiet = train(tmp_path, ["task.log_answers=0", "trainer.max_steps=5"], name="quiet")
    assert not (quiet / "answers.jsonl").exists()


def test_the_recorded_answers_are_spread_over_the_prompts():
    """The bundled questions come in order (0 + 0 first): 16 of 155 are taken evenly, not the first 16."""
    from llmexp.task_probe import recorded

    assert sorted(recorded(155, 16))[:4] == [0, 9, 19, 29] and len(recorded(155, 16)) == 16
    assert recorded(16, 16) == set(range(16)) and recorded(5, 16) == set(range(5)) and recorded(10, 0) == set()


def test_the_probe_asks_only_the_held_out_rows_validation_kept(tmp_path):
    """data.overlong=drop removes the samples longer than data.max_length from validation; the task
    metric leaves their prompts out as well (it scored them, though no validation sample held them)."""
    import json

    from llmexp.testing import train

    rows = [{"prompt": f"Spell item {i}?", "completion": "long " * 40 if i % 2 else "ok"} for i in range(80)]
    (tmp_path / "half_long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = train(tmp_path, ["data=files", f"data.path={tmp_path / 'half_long.jsonl'}", "data.max_length=32",
                           "data.overlong=drop", "trainer.max_steps=2", "trainer.val_check_interval=2",
                           "task.log_answers=200"])
    summary = json.loads((run / "summary.json").read_text())
    val = summary["data_stats"]["val"]
    assert val["dropped_overlong"] > 0 and val["samples"] > val["dropped_overlong"], val
    assert summary["task"]["prompts"] == val["samples"] - val["dropped_overlong"]
    asked = {json.loads(line)["prompt"] for line in (run / "answers.jsonl").read_text().splitlines()}
    assert asked and all(int(p.split()[2].rstrip("?")) % 2 == 0 for p in asked), asked  # the short ones only


def test_kto_on_a_users_file_records_the_task_metric_and_starts_at_accuracy_0(tmp_path):
    """stage=kto on prompt/completion/label rows: the task metric asks the prompts of the desirable
    completions (it recorded none), and the implicit-reward accuracy of the model as its own
    reference is 0 (a zero reward counted as right for every undesirable row: 0.7 before a step)."""
    import json

    from llmexp.testing import train

    rows = [{"prompt": f"Add {i} and 1.", "completion": f"{i} + 1 = {i + 1}" if i % 3 else f"{i} + 1 = {i}",
             "label": bool(i % 3)} for i in range(90)]
    (tmp_path / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = train(tmp_path, ["stage=kto", "data=files", f"data.path={tmp_path / 'kto.jsonl'}", "data.val_fraction=0.2",
                           "trainer.max_steps=2", "trainer.val_check_interval=2"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["initial"]["val/accuracy"] == 0.0
    assert summary["task"]["check"] == "reference" and 0 < summary["task"]["prompts"] < 18, summary["task"]
    assert "val/task_score" in summary["final"]


def test_answers_longer_than_the_answer_limit_raise_it_for_the_metric_generate_and_serve(tmp_path):
    """A 49-token reply was cut at task.max_new_tokens (24) and scored 0 while the model had learnt
    it; serve cut its answers there too, and generate at its own 32. The limit fits the held-out
    answers, in the config the run is served and asked by."""
    import json

    import yaml

    from llmexp.testing import run_cli, run_module

    reply = "Arr matey, aye! The sea be calm today and the wind be fair, so we sail at dawn."
    data = tmp_path / "longans.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i}"},
                                                     {"role": "assistant", "content": reply}]}) + "\n"
                            for i in range(200)))
    run = tmp_path / "run"
    r = run_cli(["data=files", f"data.path={data}", "trainer.max_steps=150", "logger=none",
                 "trainer.progress_bar=false", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    limit = yaml.safe_load((run / "config.yaml").read_text())["task"]["max_new_tokens"]
    assert limit > 24 and f"task.max_new_tokens: 24 -> {limit}, to fit the held-out answers" in r.stderr
    s = json.loads((run / "summary.json").read_text())
    assert s["task"]["max_new_tokens"] == limit and s["final"]["val/task_score"] == 1.0
    g = run_module("llmexp.generate", [str(run), "hello 3"], cwd=tmp_path)
    assert g.returncode == 0 and reply in g.stdout, g.stdout
