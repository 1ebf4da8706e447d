"""Auxiliary models as judges: ``explorer.auxiliary_models`` served behind OpenAI clients on the
local engine and through the Tinker SDK, and the reward workflows that use them.

The judge is a real (tiny) model whose reply the test knows: a bigram model built so that after
the chat template's ``assistant\\n`` it writes a given reply, then EOS (see ``build_judge``).
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from tests.conftest import demo_tokenizer, tiny_llama
from trinity.explorer.explorer import rollout
from trinity.explorer.sampler import AuxiliaryModel, RolloutSettings
from trinity.workflows.judges import Rubric, parse_named, parse_ranking, parse_score
from trinity.workflows.types import Task

SETTINGS = RolloutSettings(max_response_tokens=6, max_model_len=1024)
ASSISTANT_TURN = "\n"  # the last token of the template's generation prompt


def build_judge(directory, reply: str):
    """A 2-layer Llama that is a pure bigram model (attention and MLP outputs zeroed): token k of
    ``ASSISTANT_TURN + reply`` is followed by token k+1, the last by EOS, each with logit 240."""
    tokenizer = demo_tokenizer()
    chain = tokenizer.encode(ASSISTANT_TURN + reply, add_special_tokens=False)
    assert len(set(chain)) == len(chain) < 63, "a bigram chain needs distinct tokens"
    model = tiny_llama(tokenizer, tie_word_embeddings=False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        embed[:, 63] = 1.0  # any other token: a state no next token scores on (uniform)
        head.zero_()
        for state, (token, following) in enumerate(
            zip(chain, [*chain[1:], tokenizer.eos_token_id], strict=True)
        ):
            embed[token] = 0.0
            embed[token, state] = 1.0
            head[following, state] = 30.0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_parse_score_and_ranking():
    assert parse_score("The answer is right. Score: 7") == 0.7
    assert parse_score(" 10 ") == 1.0
    assert parse_score("SCORE = 2.5 of 10") == 0.25
    assert parse_score("It is good.") is None
    assert parse_score("Score: 11") is None
    assert parse_ranking("Answer 1: 3\nAnswer 2: 10", 2) == [0.3, 1.0]
    assert parse_ranking("Answer 1: 3", 2) is None  # one missing
    assert parse_ranking("Answer 1: 3 Answer 1: 4 Answer 2: 1", 2) is None  # ambiguous
    assert parse_ranking("Answer 10: 3", 1) is None  # not answer 1's
    assert parse_score('```json\n{"rating": 6}\n```') == 0.6  # the original's judge format


RUBRIC = [
    {"title": "accuracy", "description": "The sum is right.", "weight": 3},
    {"title": "clarity", "description": "It is stated plainly.", "weight": 1},
    {"title": "rudeness", "description": "It insults the user.", "weight": -2},
]


def test_rubric_scores_are_parsed_by_name_and_weighted():
    rubric = Rubric(RUBRIC, "task t")
    assert rubric.names == ["accuracy", "clarity", "rudeness"]
    assert "- rudeness (weight -2): It insults the user." in rubric.text()
    scores = parse_named("Accuracy: 10\nclarity 5\nRudeness = 0", rubric.names)
    assert scores == [1.0, 0.5, 0.0]
    assert rubric.weighted(scores) == pytest.approx((3 * 1.0 + 1 * 0.5) / 4)
    assert rubric.weighted([1.0, 0.5, 1.0]) == pytest.approx((3.5 - 2) / 4)  # a pitfall hit
    assert parse_named("accuracy: 10, clarity: 5", rubric.names) is None  # one missing
    assert parse_named("accuracy: ten, clarity: 5, rudeness: 0", rubric.names) is None
    assert parse_named("accuracy: 10, clarity: 50, rudeness: 0", rubric.names) is None
    assert Rubric(["Be short.", "Be right."], "t").names == ["criterion 1", "criterion 2"]
    for bad, message in [
        ([], "non-empty list"),
        ([{"title": "a", "weight": "heavy"}], "criterion 1's weight must be a number"),
        ([{"title": "a"}, {"title": "A"}], "names must be distinct"),
        ([{"title": "a", "weight": -1}], "a criterion of positive weight"),
    ]:
        with pytest.raises(ValueError, match=rf"^task t: .*{message}"):
            Rubric(bad, "task t")


def judge_task(workflow: str, repeat_times: int) -> Task:
    return Task(
        "q1",
        {"question": "What is 2 + 3?", "answer": "5"},
        workflow,
        repeat_times=repeat_times,
        format={"prompt_key": "question", "response_key": "answer"},
        rollout_args={"max_tokens": 6},
    )


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    return {
        reply: build_judge(tmp_path_factory.mktemp("judge"), reply)
        for reply in ("Score: 7", "Good", "Answer1:4", "accuracy=8,clarity:3", "accuracy:8")
    }


@pytest.fixture(scope="module")
def local_models(tiny_model_dir, judges):
    from trinity.backends.local import LocalRuntime, LocalSampler

    runtimes = {name: LocalRuntime(str(path)) for name, path in judges.items()}
    runtimes["policy"] = LocalRuntime(str(tiny_model_dir))
    yield {name: LocalSampler(runtime) for name, runtime in runtimes.items()}
    for runtime in runtimes.values():
        runtime.close()


@pytest.fixture(scope="module")
def tinker_models(tiny_model_dir, judges, tmp_path_factory):
    from trinity.backends.tinker_sdk import TinkerSampler, TinkerSession
    from trinity.server import ServerThread, build_service

    paths = {"policy": tiny_model_dir, **judges}
    service = build_service(
        [str(p) for p in paths.values()], tmp_path_factory.mktemp("srv"), {"tml-j": "judge"}
    )
    srv = ServerThread(service).start()
    session = TinkerSession(srv.url, "tml-j")

    async def create():
        return {n: await TinkerSampler.create(session, str(p)) for n, p in paths.items()}

    yield asyncio.run(create())
    srv.stop()


@pytest.mark.parametrize("backend", ["local_models", "tinker_models"])
def test_a_judge_model_scores_the_policy_and_non_scores_are_skipped(request, backend, caplog):
    models = request.getfixturevalue(backend)

    def run(task: Task, judge: str):
        aux = [AuxiliaryModel(models[judge], SETTINGS)]
        return asyncio.run(rollout(task, models["policy"], SETTINGS, seed=5, auxiliary=aux))

    experiences = run(judge_task("math_judge_workflow", 2), "Score: 7")
    assert len(experiences) == 2
    assert all(e.reward_components == {"judge": 0.7} for e in experiences)
    assert all(e.reward == 0.7 and e.response_length > 0 for e in experiences)

    ranked = run(judge_task("math_ruler_workflow", 1), "Answer1:4")
    assert [e.reward for e in ranked] == [0.4]

    with caplog.at_level(logging.WARNING):
        assert run(judge_task("math_judge_workflow", 2), "Good") == []
        assert run(judge_task("math_ruler_workflow", 1), "Good") == []
    assert caplog.text.count("the judge gave no score in 0..10 ('Good')") == 2
    assert "the group is skipped" in caplog.text


def rubric_task(mode: str, rubric=RUBRIC[:2]) -> Task:
    task = judge_task("rubric_judge_workflow", 2)
    task.raw["rubric"] = rubric
    task.workflow_args = {"rubric_mode": mode, "judge_max_tokens": 12}
    return task


def test_rubric_judge_workflow_weights_named_criteria_and_skips_non_scores(
    local_models, tiny_model_dir, caplog
):
    """Fixed judges (the reply known) check the weighting; a random tiny model as the judge
    checks that whatever it writes is a score or a logged skip, and the run goes on."""
    from trinity.backends.local import LocalRuntime, LocalSampler

    def run(task: Task, judge):
        aux = [AuxiliaryModel(judge, SETTINGS)]
        return asyncio.run(rollout(task, local_models["policy"], SETTINGS, seed=5, auxiliary=aux))

    explicit = run(rubric_task("explicit"), local_models["accuracy=8,clarity:3"])
    assert [e.reward_components for e in explicit] == [{"rubric": (3 * 0.8 + 0.3) / 4}] * 2
    implicit = run(rubric_task("implicit"), local_models["Score: 7"])
    assert [e.reward for e in implicit] == [0.7, 0.7]
    with caplog.at_level(logging.WARNING):
        assert run(rubric_task("explicit"), local_models["accuracy:8"]) == []
        assert run(rubric_task("implicit"), local_models["Good"]) == []
    assert caplog.text.count("no 0..10 score for each criterion ('accuracy:8')") == 2
    assert caplog.text.count("no 0..10 score for the rubric ('Good')") == 2

    runtime = LocalRuntime(str(tiny_model_dir))  # random weights: random replies
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        judged = run(rubric_task("explicit"), LocalSampler(runtime))
    runtime.close()
    skipped = caplog.text.count("the answer is skipped")
    assert len(judged) + skipped == 2
    assert all(-0.5 <= e.reward <= 1.0 for e in judged)

    with pytest.raises(ValueError, match=r"task q1 \('rubric'\): the rubric must be a non-empty"):
        run(rubric_task("explicit", rubric=None), local_models["Score: 7"])
    with pytest.raises(ValueError, match="rubric_mode must be 'implicit' or 'explicit'"):
        run(rubric_task("holistic"), local_models["Score: 7"])


def test_a_judge_workflow_without_an_auxiliary_model_says_so(local_models):
    with pytest.raises(ValueError, match=r"needs explorer.auxiliary_models\[0\] \(the judge\)"):
        asyncio.run(
            rollout(judge_task("math_judge_workflow", 1), local_models["policy"], SETTINGS, 5)
        )


def judge_run_config(tmp_path, model_dir, judge_dir, backend: str, runner_per_model: int = 2):
    """A one-step ``math_judge_workflow`` run whose judge is ``judge_dir`` (its job: ``backend``)."""
    from tests.test_rl_loop import backend_model, write_config

    return write_config(
        tmp_path,
        model_dir,
        name=backend,
        model=backend_model(tmp_path, model_dir, backend),
        buffer={
            "batch_size": 1,
            "total_steps": 1,
            "explorer_input": {
                "taskset": {
                    "name": "arith",
                    "path": "builtin:arithmetic",
                    "builtin_args": {"size": 4},
                    "format": {"prompt_key": "question", "response_key": "answer"},
                },
                "default_workflow_type": "math_judge_workflow",
            },
        },
        explorer={
            "runner_per_model": runner_per_model,
            "rollout_model": {"engine_num": 1, "seed": 7},
            "auxiliary_models": [{"model_path": str(judge_dir), "max_model_len": 1024}],
        },
    )


@pytest.mark.parametrize("backend", ["local", "tinker"])
def test_trinity_run_serves_the_configured_judge(tmp_path, tiny_model_dir, judges, backend):
    """``explorer.auxiliary_models`` from the config, through ``trinity run`` (the embedded
    Tinker server serves the judge beside the policy)."""
    from tests.test_rl_loop import job_dir, run_cli, trainer_records

    run_cli(judge_run_config(tmp_path, tiny_model_dir, judges["Score: 7"], backend))
    (step,) = trainer_records(job_dir(tmp_path, backend)).values()
    assert step["rollout/judge/mean"] == pytest.approx(0.7)
    assert "actor/final_loss" in step
