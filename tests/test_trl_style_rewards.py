"""Reward functions written for TRL work unchanged: ``fn(completions, **kwargs) -> list[float]``,
by ``module:function`` (TRL's own in trl.rewards, or the user's), called once per batch with the
columns as lists, as TRL's GRPOTrainer calls them."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from llmexp.testing import FAST, run_cli

from llmexp.errors import UserError
from llmexp.rewards import FunctionReward

CHAT = [{"role": "user", "content": "What is 2 plus 3?"}]
USER_MODULE = textwrap.dedent('''
    def exact(completions, answer, **kwargs):
        """TRL-style: conversational completions, the answer column as a list."""
        return [1.0 if c[0]["content"].strip().endswith("= " + str(a)) else 0.0 for c, a in zip(completions, answer)]

    def too_few(completions, **kwargs):
        return [1.0]

    def wrong_column(completion, target):
        return 1.0

    def says_yes(completion, answer):
        return "yes"

    def as_numpy(completion, answer):
        import numpy
        return numpy.float64(completion.endswith(answer))

    def matches(completion, reference):
        return float(completion.strip() == reference.strip())

    def takes_all(completion, **columns):
        return float(len(columns))

    def not_a_number(completion, answer):
        return float("nan")

    def batch_of_inf(completions, **kwargs):
        return [1.0, float("inf")]

    def raises(completion, answer):
        return int(completion) / 0
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_trls_own_reward_function_scores_a_batch():
    reward = FunctionReward("trl.rewards:think_format_reward")
    scores = reward([CHAT, CHAT], ["<think>\n2 and 3\n</think>\n5", "5"], [{"answer": "5"}, {"answer": "5"}])
    assert reward.batched and scores.tolist() == [1.0, 0.0]


def test_a_users_trl_style_function_gets_the_columns_as_lists(user_module):
    reward = FunctionReward("my_rewards:exact")
    scores = reward([CHAT] * 3, ["2 + 3 = 5", "2 + 3 = 6", "2 + 3 = 5"],
                    [{"answer": "5"}, {"answer": "5"}, {"answer": "4"}])
    assert scores.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(UserError, match="returned 1 value for 2 completions"):
        FunctionReward("my_rewards:too_few")([CHAT] * 2, ["a", "b"], [{}, {}])
    with pytest.raises(UserError, match="module 'my_rewards' .* has no function 'missing'; fix: valid: as_numpy"):
        FunctionReward("my_rewards:missing")


def test_a_per_sample_reward_of_the_wrong_shape_is_told_what_to_take_and_return(user_module):
    """A column the rows lack, or no number back: said as such with the fix (it said 'failed on ...
    with columns []: TypeError: missing 1 required positional argument', or 'could not convert
    string to float'); a long completion is cut in the message; numpy numbers are numbers."""
    rows = [{"answer": "5", "solution": "2 + 3 = 5"}]
    with pytest.raises(UserError, match=r"cannot be called as wrong_column\(completion, \*\*columns\) \(missing a required "
                                        r"argument: 'target'\); the rows' columns are \['answer', 'solution'\]; fix: "):
        FunctionReward("my_rewards:wrong_column")([CHAT], ["5"], rows)
    with pytest.raises(UserError, match=r"returned 'yes' \(str\) for 'xxxxx.*…; fix: return one number"):
        FunctionReward("my_rewards:says_yes")([CHAT], ["x" * 500], rows)
    assert FunctionReward("my_rewards:as_numpy")([CHAT] * 2, ["= 5", "= 6"], rows * 2).tolist() == [1.0, 0.0]
    # a NaN reward made a NaN loss, which was reported as an lr problem (exit 3)
    with pytest.raises(UserError, match=r"reward 'my_rewards:not_a_number' of .* returned nan for '5'; fix: return a "
                                        r"finite number"):
        FunctionReward("my_rewards:not_a_number")([CHAT], ["5"], rows)
    with pytest.raises(UserError, match=r"returned inf for completion 1; it must return one finite number"):
        FunctionReward("my_rewards:batch_of_inf")([CHAT] * 2, ["a", "b"], rows * 2)
    # where in the user's code it raised, as a plugin hook's failure says it
    with pytest.raises(UserError, match=r"failed on '5' with columns \['answer'\]: ZeroDivisionError: division by "
                                        r"zero \(at .*my_rewards\.py:\d+\)"):
        FunctionReward("my_rewards:raises")([CHAT], ["5"], rows)


@pytest.mark.slow
def test_grpo_trains_on_a_trl_style_reward_by_module_path(tmp_path, user_module):
    """The bundled prompts' answers reach the function as TRL passes them; it also checks the task."""
    run_dir = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(user_module), os.environ.get("PYTHONPATH", "")])}
    r = run_cli([*FAST, "stage=grpo", "stage.reward.function=my_rewards:exact", "task.check=my_rewards:exact",
                 "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.micro_batch_size=4",
                 "stage.group_size=2", "stage.rollout.max_new_tokens=8", f"hydra.run.dir={run_dir}"], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["task"]["check"] == "my_rewards:exact"
    assert -1.0 <= s["final"]["val/reward"] <= 1.0 and 0.0 <= s["final"]["val/task_score"] <= 1.0
    r = run_cli([*FAST, "stage=grpo", "stage.reward.function=no_such_module:fn"], cwd=tmp_path)
    assert r.returncode == 2 and "stage.reward.function: 'no_such_module:fn': no module" in r.stderr


def test_a_rows_own_completion_reaches_a_per_sample_reward_as_reference(user_module):
    """prompt/completion (and chat) rows in a rollout stage: the row's answer beside the sampled one
    is passed as ``reference`` (under its own name every such dataset failed with "multiple values
    for argument 'completion'"); a conversational answer as its text."""
    rows = [{"completion": "2 + 3 = 5"}, {"completion": [{"role": "assistant", "content": "2 + 3 = 5"}]}]
    assert FunctionReward("my_rewards:matches")([CHAT] * 2, ["2 + 3 = 5", "2 + 3 = 6"], rows).tolist() == [1.0, 0.0]
    assert FunctionReward("my_rewards:takes_all")([CHAT], ["x"], rows[:1]).tolist() == [1.0]  # reference only
    assert FunctionReward("arithmetic_correct")([CHAT], ["2 + 3 = 5"], rows[:1]).tolist() == [1.0]


def test_the_default_reward_is_the_skills_rule_on_its_data_and_the_reference_answer_on_yours(tmp_path, user_module):
    """stage.reward.function=auto: arithmetic_correct on the bundled skill, reference_match on a
    user's data (it was arithmetic_correct everywhere: grpo on a sorting task scored every right
    answer 0); prompt rows without an answer are told what to give; a module:function typo gets the
    closest function, and a file name the module's."""
    from llmexp.testing import typed

    assert typed(["stage=grpo"]).stage.reward.function == "arithmetic_correct"
    data = tmp_path / "sort.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Sort {a} {b}.", "completion": f"{min(a, b)} {max(a, b)}"}) + "\n"
                            for a in range(6) for b in range(6)))
    for stage in ("grpo", "rloo", "ppo", "online_dpo"):
        assert typed([f"stage={stage}", "data=files", f"data.path={data}"]).stage.reward.function == "reference_match"
    assert typed(["stage=grpo", "data=files", f"data.path={data}", "stage.reward.function=my_rewards:matches"]
                 ).stage.reward.function == "my_rewards:matches"
    rows = [{"completion": "1 5"}, {"completion": [{"role": "assistant", "content": " 1  5 "}]}]
    assert FunctionReward("reference_match")(["Sort 5 1."] * 2, ["1 5", "1 5"], rows).tolist() == [1.0, 1.0]
    assert FunctionReward("reference_match")(["Sort 5 1."], ["5 1"], rows[:1]).tolist() == [0.0]
    with pytest.raises(UserError, match=r"these rows have none \(a prompt row alone\); fix: give prompt/completion"):
        FunctionReward("reference_match")(["Sort 5 1."], ["1 5"], [{"answer": "1 5"}])
    with pytest.raises(UserError, match=r"has no function 'matchs'; fix: did you mean 'matches'\?"):
        FunctionReward("my_rewards:matchs")
    r = run_cli([*FAST, "stage=grpo", "stage.reward.function=my_rewards.py:matches"], cwd=tmp_path)
    assert r.returncode == 2 and "fix: my_rewards:matches (the module's name, without .py" in r.stderr, r.stderr


def test_rollout_references_are_right_answers_and_rows_without_one_are_refused_before_a_model(tmp_path):
    """A preference pair's chosen answer is its reference (it was refused as "a prompt row alone");
    a kto row labelled undesirable has none (its wrong completion was rewarded: 1.00 -> 0.93 in 60
    steps); prompt rows with an answer column are pointed to data.fields.completion."""
    from llmexp.data.encode import as_prompt_row

    assert as_prompt_row({"prompt": "q", "chosen": "a", "rejected": "b"})["completion"] == "a"
    assert "completion" not in as_prompt_row({"prompt": "q", "completion": "wrong", "label": False})
    assert as_prompt_row({"prompt": "q", "completion": "right", "label": True})["completion"] == "right"
    rows = {"kto": [{"prompt": f"Sort {a} {b}.", "completion": f"{min(a, b)} {max(a, b)}", "label": (a + b) % 2 == 0}
                    for a in range(6) for b in range(6)],
            "answer": [{"prompt": f"Sort {a} {b}.", "answer": f"{min(a, b)} {max(a, b)}"}
                       for a in range(6) for b in range(6)]}
    expected = {"kto": "of the 34 training rows of '{}' are labelled undesirable: their completion is a wrong answer",
                "answer": "fix: data.fields.completion=answer (the column that holds the answer)"}
    for name, data in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        r = run_cli([*FAST, "stage=grpo", "data=files", f"data.path={path}"], cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert expected[name].format(path) in r.stderr, r.stderr


def test_a_gpt2s_positions_are_read_by_their_name(tmp_path):
    """data.max_length fitted to a gpt2's n_positions (it read max_position_embeddings alone, so a
    gpt2 SFT's grpo on data=files was refused: set data.max_length=496)."""
    from llmexp.config.schema import RunConfig
    from llmexp.preflight import fit_max_length_to_positions
    from llmexp.testing import typed

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 512}))
    run: RunConfig = typed(["stage=grpo", "data.max_length=512"])
    run.model.pretrained = str(tmp_path)
    fit_max_length_to_positions(run, [])
    assert run.data.max_length == 496


@pytest.mark.slow
def test_grpo_on_a_users_prompt_completion_file_rewards_its_answers(tmp_path):
    """The README's grpo command on a user's file, no reward given: its rows' answers are the reward
    and the task metric (reference_match), and a 512-token data=files default fits the model's 512
    positions with the responses (it was refused: set data.max_length=496)."""
    data = tmp_path / "sort.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Sort {a} {b}.", "completion": f"{min(a, b)} {max(a, b)}"}) + "\n"
                            for a in range(8) for b in range(8)))
    run_dir = tmp_path / "run"
    r = run_cli([*FAST, "stage=grpo", "data=files", f"data.path={data}", "trainer.max_steps=2",
                 "trainer.val_check_interval=2", "trainer.micro_batch_size=4", "stage.group_size=2",
                 f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["task"]["check"] == "reference_match"
    cfg = __import__("yaml").safe_load((run_dir / "config.yaml").read_text())
    assert cfg["stage"]["reward"]["function"] == "reference_match" and cfg["data"]["max_length"] == 496
