"""Plugins: a directory of modules that register a workflow and a reward, then run via a config."""

from __future__ import annotations

import asyncio
import textwrap

import pytest
from workflow_fakes import ScriptedSampler

from trinity.plugins import PluginError, load_plugins
from trinity.workflows import REWARD_FUNCTIONS, WORKFLOWS, Task

REWARD_PLUGIN = """
from trinity.workflows import REWARD_FUNCTIONS

CALLS = []
CALLS.append("imported")


@REWARD_FUNCTIONS.register("shout_reward_{tag}")
def shout_reward(response_text, truth, **kwargs):
    return {{"accuracy": float(response_text.strip() == str(truth).upper())}}
"""

WORKFLOW_PLUGIN = """
from helper_{tag} import SUFFIX  # a sibling module: the plugin dir is importable

from trinity.workflows import WORKFLOWS, SimpleWorkflow


@WORKFLOWS.register("shout_workflow_{tag}")
class ShoutWorkflow(SimpleWorkflow):
    default_reward_fn = "shout_reward_{tag}"

    def prompt(self):
        return super().prompt() + SUFFIX
"""


def write_plugins(directory, tag):
    directory.mkdir()
    (directory / "rewards.py").write_text(REWARD_PLUGIN.format(tag=tag))
    (directory / "workflows.py").write_text(WORKFLOW_PLUGIN.format(tag=tag))
    (directory / f"helper_{tag}.py").write_text("SUFFIX = ' (shout it)'\n")
    (directory / "_private.py").write_text("raise RuntimeError('never imported')\n")
    return directory


def test_plugin_registers_a_workflow_and_a_reward(tmp_path):
    write_plugins(tmp_path / "plugins", "a")
    names = load_plugins([tmp_path / "plugins"])
    assert len(names) == 3
    assert "shout_workflow_a" in WORKFLOWS and "shout_reward_a" in REWARD_FUNCTIONS

    sampler = ScriptedSampler(["HELLO", "hello"])
    task = Task(
        task_id="t",
        raw={"prompt": "say hello", "response": "hello"},
        workflow="shout_workflow_a",
        repeat_times=2,
    )
    experiences = asyncio.run(WORKFLOWS.get(task.workflow)(task, sampler).run())
    assert [e.reward for e in experiences] == [1.0, 0.0]
    assert sampler.calls[0]["messages"][-1]["content"] == "say hello (shout it)"

    load_plugins([tmp_path / "plugins"])  # loading again does not re-run the modules
    module = __import__("sys").modules[next(n for n in names if ".rewards_" in n)]
    assert module.CALLS == ["imported"]


def test_plugin_dirs_from_the_environment(tmp_path, monkeypatch):
    write_plugins(tmp_path / "env_plugins", "b")
    monkeypatch.setenv(
        "TRINITY_PLUGIN_DIRS", f"{tmp_path / 'env_plugins'}::"
    )  # empty parts skipped
    load_plugins()
    assert "shout_workflow_b" in WORKFLOWS


def test_a_broken_plugin_is_one_line_naming_the_file(tmp_path):
    directory = tmp_path / "broken"
    directory.mkdir()
    (directory / "bad.py").write_text(textwrap.dedent("import does_not_exist_anywhere\n"))
    with pytest.raises(PluginError) as err:
        load_plugins([directory])
    message = str(err.value)
    assert str(directory / "bad.py") in message and "ModuleNotFoundError" in message
    assert "\n" not in message


def test_a_missing_plugin_dir(tmp_path):
    with pytest.raises(PluginError, match="plugin directory not found"):
        load_plugins([tmp_path / "nope"])
