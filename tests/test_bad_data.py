"""Bad data never hangs a run: tasksets are checked before any work, in one line (exit status 2),
a workflow that keeps producing nothing stops the run with the reason, and cut prompts are
counted in the log."""

from __future__ import annotations

import asyncio
import logging

import pytest
from loop_fakes import FakeSampler
from test_explorer import explorer_for, reader
from tinker import types

from trinity.buffer.tasksets import TasksetError, TasksetReader
from trinity.cli.main import main
from trinity.explorer import explorer as explorer_module
from trinity.explorer.sampler import PolicySampler, RolloutSettings
from trinity.synchronizer.synchronizer import Synchronizer

FORMAT = {"prompt_key": "question", "response_key": "answer"}


def read(path, **fields) -> TasksetReader:
    config = {"name": "t", "path": str(path), "format": FORMAT, **fields}
    return TasksetReader(config, repeat_times=1, batch_size=1, default_workflow="math_workflow")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "latin1.jsonl",
            b'{"question": "caf\xe9", "answer": "2"}\n',
            "is not UTF-8 text (byte 0xe9 at line 1)",
        ),
        ("latin1.csv", b"question,answer\n1+1,2\ncaf\xe9,2\n", "(byte 0xe9 at line 3)"),
        ("empty.jsonl", b"\n \n", "is empty"),
        ("cut.jsonl", b'{"question": "1+1", "answer": "2"}\n{"question": "2', "JSON parse error"),
        (
            "no_prompt.jsonl",
            b'{"q": "1+1", "answer": "2"}\n',
            "no field for format.prompt_key 'question'",
        ),
        ("no_answer.jsonl", b'{"question": "1+1"}\n', "no field for format.response_key 'answer'"),
        (
            "null_prompt.jsonl",
            b'{"question": "1+1", "answer": "2"}\n{"question": null, "answer": "3"}\n',
            "1 of 2 rows have no value for format.prompt_key 'question' (first: row 1)",
        ),
        (
            "blank_answer.jsonl",
            b'{"question": "1+1", "answer": "2"}\n{"question": "2+2", "answer": " "}\n',
            "1 of 2 rows have no value for format.response_key 'answer'",
        ),
    ],
)
def test_bad_tasksets_fail_in_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TasksetError, match=None) as error:
        read(path)
    text = str(error.value)
    assert message in text and "\n" not in text and text.startswith("taskset 't'")


def test_rows_that_name_their_own_workflow_are_not_checked_against_the_default(tmp_path):
    path = tmp_path / "own.jsonl"
    path.write_text('{"q": "1+1", "answer": "2", "wf": "simple_workflow"}\n')
    assert len(read(path, format={**FORMAT, "workflow_key": "wf"})) == 1


def test_a_bad_eval_taskset_stops_the_run_before_the_server_starts(tmp_path, capsys):
    bad = tmp_path / "eval.jsonl"
    bad.write_bytes(b'{"question": "caf\xe9", "answer": "2"}\n')
    config = tmp_path / "c.yaml"
    config.write_text(
        f"checkpoint_root_dir: {tmp_path / 'ck'}\nname: run\n"
        "model: {model_path: demo, max_prompt_tokens: 32, max_response_tokens: 8,"
        " tinker: {enable: true, base_url: local}}\n"
        "buffer:\n  total_steps: 1\n  explorer_input:\n"
        "    taskset: {path: 'builtin:arithmetic', format: {prompt_key: question, response_key: answer}}\n"
        f"    eval_tasksets: [{{name: ev, path: '{bad}'}}]\n"
        "    default_workflow_type: math_workflow\n"
        "monitor: {monitor_type: none}\n"
    )
    assert main(["run", "--config", str(config)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    job = tmp_path / "ck" / "Trinity-RFT" / "" / "run"
    assert not (job / "server").exists()  # stopped before the run's own server started


def test_a_workflow_that_never_produces_stops_the_run_with_the_reason(tmp_path, monkeypatch):
    from test_explorer import FAILURES

    FAILURES.clear()
    monkeypatch.setattr(explorer_module, "MAX_FAILED_TASKS_IN_A_ROW", 5)
    hopeless = reader("test_flaky_workflow", workflow_args={"fail_times": 99})
    # no trainer reads here: room for every step in flight
    never_waits = Synchronizer(tmp_path, sync_style="trainer_driven", max_inflight_batches=10)
    explorer, buffer, _, _ = explorer_for(
        tmp_path, FakeSampler(["2"]), hopeless, max_retry_times=0, synchronizer=never_waits
    )
    with pytest.raises(RuntimeError, match=r"5 tasks in a row produced no experience .*flaky"):
        asyncio.run(explorer.run(0, 10))
    assert len(buffer.puts) == 2 and buffer.closed  # steps 1-2 (4 tasks) ran; step 3 raised


def test_cut_prompts_are_logged_with_a_count(caplog):
    class Backend:
        tokenizer = FakeSampler([]).tokenizer

        async def sample(self, prompt_tokens, n, params):
            return types.SampleResponse(sequences=[])

    sampler = PolicySampler(Backend(), RolloutSettings(max_prompt_tokens=4))
    with caplog.at_level(logging.WARNING, logger="trinity.explorer.sampler"):
        for _ in range(3):
            asyncio.run(sampler.generate(list(range(10)), 1))
        asyncio.run(sampler.generate(list(range(3)), 1))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # at the 1st and 2nd cut, not the 3rd; the short prompt is not cut
    assert "of 10 tokens was cut to its last 4" in lines[0] and lines[1].endswith(
        "2 prompt(s) cut so far"
    )
