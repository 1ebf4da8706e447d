"""GiGPO: the advantage against a reference computed from the formula, what the environment
workflows and an original-style plugin record for it, the single-turn fallback and the config
check, and a real step on both backends with frozen_lake."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from loop_fakes import FakeSampler
from test_rl_loop import backend_model, job_dir, run_cli, trainer_records, write_config

from trinity.algorithms import explorer_hook, gigpo_advantages
from trinity.config import ConfigError, load_config_text
from trinity.explorer.explorer import rollout
from trinity.explorer.sampler import RolloutSettings
from trinity.plugins import load_plugins
from trinity.workflows.types import Experience, Task

EPS = 1e-6


def normalized(values, fnorm):
    """(x - mean) / (d + eps), d the unbiased std or 1; a lone value: x / (1 + eps)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 1:
        return x / (1 + EPS)
    d = x.std(ddof=1) if fnorm == "std" else 1.0
    return (x - x.mean()) / (d + EPS)


def turn(group, run, step, step_reward, state, mask=(1, 1, 0)):
    info = {"run": run, "step": step, "step_reward": step_reward}
    if state is not None:
        info["env_state_hash"] = state
    return Experience([7] * 5, 2, [0.0] * 3, list(mask), -1.0, group_id=group, info=info)


@pytest.mark.parametrize("fnorm", ["none", "std"])
def test_advantage_equals_the_formula_on_a_hand_built_batch(fnorm):
    """Task A: three episodes from state s0; e0 and e1 both reach s1 (e0 goes on to the goal, e1
    stops), e2 takes another road. Task B: one episode (a lone episode group) whose second turn
    is in state s1 too (groups span the batch, as the original's) and whose first has no hash.
    Task C: three identical episodes (zero std at both levels). gamma 0.9, omega 0.5."""
    gamma, omega = 0.9, 0.5
    batch = [
        turn("A", 0, 0, 0.0, "s0"),
        turn("A", 0, 1, 0.0, "s1"),
        turn("A", 0, 2, 1.0, "s2"),
        turn("A", 1, 0, 0.0, "s0"),
        turn("A", 1, 1, 0.0, "s1"),
        turn("A", 2, 0, 0.0, "s0"),
        turn("A", 2, 1, 1.0, "s3"),
        turn("B", 0, 0, 0.0, None),
        turn("B", 0, 1, 1.0, "s1", mask=(0, 1, 1)),
        turn("C", 0, 0, 0.1, "c0"),
        turn("C", 1, 0, 0.1, "c0"),
        turn("C", 2, 0, 0.1, "c0"),
    ]
    # by hand: episode returns, discounted returns R_t, anchor groups
    a_e = {
        "A": dict(zip((0, 1, 2), normalized([1.0, 0.0, 1.0], fnorm), strict=True)),
        "B": {0: 1.0 / (1 + EPS)},
        "C": {0: 0.0, 1: 0.0, 2: 0.0},
    }
    s0 = normalized([gamma**2, 0.0, gamma], fnorm)  # A.e0.t0, A.e1.t0, A.e2.t0
    s1 = normalized([gamma, 0.0, 1.0], fnorm)  # A.e0.t1, A.e1.t1, B.e0.t1
    a_s = {
        ("A", 0, 0): s0[0],
        ("A", 1, 0): s0[1],
        ("A", 2, 0): s0[2],
        ("A", 0, 1): s1[0],
        ("A", 1, 1): s1[1],
        ("B", 0, 1): s1[2],
    }  # s2, s3 alone and B's first turn without a hash: 0
    expected = [
        [
            (a_e[e.group_id][e.info["run"]] + omega * a_s.get((e.group_id, *key), 0.0)) * m
            for m in e.loss_mask
        ]
        for e in batch
        for key in [(e.info["run"], e.info["step"])]
    ]
    shuffled = batch[:]
    random.Random(3).shuffle(shuffled)  # turns are ordered by info["step"], not by the list
    hook = explorer_hook(
        {
            "algorithm_type": "gigpo",
            "advantage_fn_args": {"gamma": gamma, "omega": omega, "fnorm": fnorm},
        }
    )
    metrics = hook(shuffled)
    for exp, want in zip(batch, expected, strict=True):
        assert exp.advantages == pytest.approx(want, abs=1e-6), (exp.group_id, exp.info)
    # equal values give exactly 0, not float residue over epsilon (0.1 * 3 / 3 != 0.1)
    assert [exp.advantages for exp in batch[-3:]] == [[0.0, 0.0, 0.0]] * 3
    assert metrics["gigpo/anchor_groups_total"] == 5  # s0 s1 s2 s3 c0
    assert metrics["gigpo/anchor_groups_size_gt1"] == 3  # s0, s1, c0


def test_without_step_rewards_the_reward_is_on_the_last_turn():
    """The original's sparse fallback: the turns' ``reward`` (the episode's) counts once, on the
    episode's last turn, so the first turns' discounted returns are gamma^k * reward."""

    def episode(run, reward, states):
        return [
            Experience(
                [7] * 3, 2, [0.0], [1], reward, group_id="g", info={"run": run, "step": t} | hashed
            )
            for t, hashed in enumerate({"env_state_hash": s} for s in states)
        ]

    batch = episode(0, 1.0, ["x", "y"]) + episode(1, 0.0, ["x", "z"])
    explorer_hook({"algorithm_type": "gigpo", "advantage_fn_args": {"gamma": 0.5}})(batch)
    a_e = normalized([1.0, 0.0], "none")
    a_x = normalized([0.5, 0.0], "none")  # R_0 = 0.5 * 1 for the first episode
    want = [a_e[0] + a_x[0], a_e[0], a_e[1] + a_x[1], a_e[1]]
    assert [e.advantages[0] for e in batch] == pytest.approx(want, abs=1e-6)


def test_a_single_turn_workflow_gets_the_task_centred_reward():
    """The original's fallback: no run, no hash, no step reward; each sample is an episode."""
    rewards = [1.0, 0.0, 0.5, 0.5]
    batch = [Experience([7] * 3, 2, [0.0], [1], r, task_id="t") for r in rewards]
    for fnorm in ("none", "std"):
        metrics = explorer_hook({"algorithm_type": "gigpo", "advantage_fn_args": {"fnorm": fnorm}})(
            batch
        )
        want = normalized(rewards, fnorm)
        assert [e.advantages[0] for e in batch] == pytest.approx(list(want), abs=1e-6)
        assert metrics["gigpo/anchor_groups_total"] == 0


def test_the_pure_function_and_its_argument_checks():
    (advantages,), metrics = gigpo_advantages([[[(0.0, "a"), (1.0, "b")], [(0.0, "a")]]])
    a_e = normalized([1.0, 0.0], "none")
    a_s = normalized([1.0, 0.0], "none")
    assert advantages == [
        pytest.approx([a_e[0] + a_s[0], a_e[0]]),
        pytest.approx([a_e[1] + a_s[1]]),
    ]
    assert metrics["gigpo/anchor_group_hit_ratio"] == 0.5
    with pytest.raises(ValueError, match="fnorm must be 'std' or 'none', got 'mean_norm'"):
        gigpo_advantages([], fnorm="mean_norm")


def test_frozen_lake_and_sudoku_record_the_state_and_the_step_reward():
    # 'go right' on a 1x3 lake: F (reward 0), then G (reward 1); both episodes alike
    lake = Task("l", {"map": ["SFG"]}, "frozen_lake_workflow", repeat_times=2)
    experiences = asyncio.run(rollout(lake, FakeSampler(["go right"]), RolloutSettings(), 0))
    by_turn = {(e.info["run"], e.info["step"]): e.info for e in experiences}
    assert sorted(by_turn) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [by_turn[0, t]["step_reward"] for t in (0, 1)] == [0.0, 1.0]
    assert all(e.reward == 1.0 for e in experiences)  # the episode's: the sum
    hashes = {key: info["env_state_hash"] for key, info in by_turn.items()}
    assert hashes[0, 0] == hashes[1, 0] and hashes[0, 1] == hashes[1, 1]  # same states
    assert hashes[0, 0] != hashes[0, 1]
    other = Task("o", {"map": ["SFH"]}, "frozen_lake_workflow", repeat_times=1)
    (first, _) = asyncio.run(rollout(other, FakeSampler(["go right"]), RolloutSettings(), 0))
    assert first.info["env_state_hash"] != hashes[0, 0]  # another lake, another state

    # refused placements leave the board as it was: both turns in one state
    puzzle = {"puzzle": ["12.4", "3412", "2143", "4321"]}
    sudoku = Task("s", puzzle, "sudoku_workflow", workflow_args={"max_steps": 2})
    turns = asyncio.run(rollout(sudoku, FakeSampler(["1 1 9"]), RolloutSettings(), 0))
    assert [e.info["step_reward"] for e in turns] == [0.0, 0.0]
    assert turns[0].info["env_state_hash"] == turns[1].info["env_state_hash"]

    # one experience per conversation: no turn to label
    lake.format = {"enable_concatenated_multi_turn": True}
    (whole, _) = asyncio.run(rollout(lake, FakeSampler(["go right"]), RolloutSettings(), 0))
    assert "env_state_hash" not in whole.info and "step_reward" not in whole.info


def test_an_original_style_plugin_sets_the_keys_gigpo_reads():
    load_plugins([Path(__file__).parent / "plugins_original"])
    task = Task(
        "arith/0/1",
        {"question": "What is 1 + 2?", "answer": "3"},
        "anchored_two_turn_workflow",
        repeat_times=2,
        reward_fn="digit_count_reward",
        format={"prompt_key": "question", "response_key": "answer"},
    )
    experiences = asyncio.run(rollout(task, FakeSampler(["4", "x2"]), RolloutSettings(), 1))
    assert {e.info["step"]: e.info["step_reward"] for e in experiences} == {0: 0.0, 1: 1.0}
    metrics = explorer_hook({"algorithm_type": "gigpo"})(experiences)
    # both episodes pass through the same two states with the same returns: all advantages 0
    assert metrics["gigpo/anchor_groups_size_gt1"] == 2
    assert all(a == 0.0 for e in experiences for a in e.advantages)


def gigpo_config(workflow: str, taskset: str, **algorithm):
    """``trinity config check`` on a small gigpo config (the loaded config)."""
    config = {
        "model": {"model_path": "demo", "max_prompt_tokens": 128, "max_response_tokens": 16},
        "buffer": {
            "batch_size": 2,
            "total_steps": 1,
            "explorer_input": {
                "taskset": {"path": f"builtin:{taskset}"},
                "default_workflow_type": workflow,
            },
        },
        "algorithm": {"algorithm_type": "gigpo", **algorithm},
    }
    return load_config_text(yaml.safe_dump(config), "gigpo.yaml")


def test_config_check_names_a_bad_argument():
    with pytest.raises(ConfigError, match="algorithm.advantage_fn_args.fnorm must be 'std' or"):
        gigpo_config("frozen_lake_workflow", "frozen_lake", advantage_fn_args={"fnorm": "x"})
    config = gigpo_config("frozen_lake_workflow", "frozen_lake", advantage_fn_args={"omega": 0.5})
    assert config.algorithm.algorithm_type == "gigpo"


def test_a_single_turn_workflow_is_one_warning_line_at_config_check(caplog):
    gigpo_config("frozen_lake_workflow", "frozen_lake")
    assert not [r for r in caplog.records if "gigpo" in r.getMessage()]
    gigpo_config("simple_workflow", "arithmetic")
    (line,) = [r.getMessage() for r in caplog.records if "gigpo" in r.getMessage()]
    assert "'simple_workflow'" in line and "single-turn" in line and "\n" not in line


@pytest.mark.parametrize("backend", ["local", "tinker"])
def test_gigpo_runs_a_step_on_frozen_lake(tmp_path, tiny_model_dir, backend):
    taskset = {
        "name": "lake",
        "path": "builtin:frozen_lake",
        "builtin_args": {"size": 8, "grid": 3, "hole_prob": 0.3},  # distinct lakes
        "workflow_args": {"max_steps": 2},
    }
    config = write_config(
        tmp_path,
        tiny_model_dir,
        model={**backend_model(tmp_path, tiny_model_dir, backend), "max_prompt_tokens": 512},
        algorithm={"algorithm_type": "gigpo", "repeat_times": 3, "optimizer": {"lr": 1e-3}},
        buffer={
            "batch_size": 2,
            "total_steps": 1,
            "explorer_input": {
                "taskset": taskset,
                "default_workflow_type": "frozen_lake_workflow",
            },
        },
    )
    run_cli(config)
    (record,) = trainer_records(job_dir(tmp_path)).values()
    assert record["actor/final_loss"] == pytest.approx(record["actor/final_loss"])  # not NaN
    # each task's episodes start in its lake's start state: recorded per turn, grouped
    assert record["experience_pipeline/gigpo/anchor_groups_size_gt1"] >= 2
    assert record["experience_pipeline/experience_count"] >= 2 * 3 * 1
