"""The ``trinity`` command: exit status 2 and one stderr line per broken config, ``--dry-run``
output, ``--debug`` tracebacks, plugins before validation, and the registered subcommands."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from trinity.cli.main import main

HERE = Path(__file__).parent
REPO = HERE.parent
BROKEN = sorted((HERE / "configs" / "broken").glob("*.yaml"))
DEMO = REPO / "examples" / "grpo_demo.yaml"
SEED = HERE / "configs" / "seed" / "tinker-llama3.2-3b-gsm8k.yaml"
BY_SUBPROCESS = ["typo_tinker_rank", "wrong_type_int", "unset_env_var", "yaml_list", "empty"]

PLUGIN = """
from trinity.workflows import WORKFLOWS, SimpleWorkflow

WORKFLOWS.register("plugin_workflow")(SimpleWorkflow)
"""


def fragments(path: Path) -> list[str]:
    return [
        line[len("# expect: ") :]
        for line in path.read_text().splitlines()
        if line.startswith("# expect: ")
    ]


def trinity(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real command in a fresh interpreter, as a user runs it."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TRINITY_DEBUG", "TRINITY_PLUGIN_DIRS", "TRINITY_TEST_SURELY_UNSET")
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "trinity.cli.main", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (
        "TRINITY_DEBUG",
        "TRINITY_PLUGIN_DIRS",
        "TRINITY_TEST_SURELY_UNSET",
        "TRINITY_CHECKPOINT_ROOT_DIR",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_config_check_broken_in_process(path, capsys):
    assert main(["config", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trinity: error: ")
    for fragment in fragments(path):
        assert fragment in lines[0]


@pytest.mark.parametrize("stem", BY_SUBPROCESS)
def test_config_check_broken_subprocess(stem):
    path = HERE / "configs" / "broken" / f"{stem}.yaml"
    result = trinity("config", "check", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("trinity: error: ")
    assert all(fragment in result.stderr for fragment in fragments(path))


def test_run_broken_config_same_one_line(capsys):
    path = HERE / "configs" / "broken" / "typo_taskset.yaml"
    assert main(["run", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "trinity: error: unknown key 'buffer.explorer_input.tasket' (did you mean 'taskset'?)\n"
    )


def test_missing_config_file(capsys):
    assert main(["run", "--config", "no/such/config.yaml"]) == 2
    assert capsys.readouterr().err == (
        "trinity: error: cannot read config 'no/such/config.yaml': no such file\n"
    )


def test_debug_shows_the_traceback(capsys, monkeypatch):
    path = str(HERE / "configs" / "broken" / "negative_batch_size.yaml")
    assert main(["config", "check", path, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("buffer.batch_size must be >= 1, got -4\n")
    monkeypatch.setenv("TRINITY_DEBUG", "1")
    assert main(["config", "check", path]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_dry_run_prints_resolved_values(tmp_path):
    result = trinity(
        "run",
        "--config",
        str(SEED),
        "--dry-run",
        env={"TRINITY_CHECKPOINT_ROOT_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "rank: 32" in out
    assert "base_model: meta-llama/Llama-3.2-3B" in out
    assert f"checkpoint_root_dir: {tmp_path}\n" in out
    assert (
        f"checkpoint_job_dir: {tmp_path}/Trinity-RFT-gsm8k/alignment-tinker/tinker-llama3.2-3B-off1"
    ) in out
    assert "train_batch_size: 768" in out
    assert "${" not in out.replace("{{", "")


def test_dry_run_fills_base_model_from_model_path(capsys):
    assert main(["run", "--config", str(DEMO), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "    base_model: demo\n" in out and "    rank: 32\n" in out


def test_config_check_ok(capsys):
    assert main(["config", "check", str(SEED)]) == 0
    out, err = capsys.readouterr()
    assert "sync_offset: 1" in out and err.endswith(": ok\n")


def test_run_calls_the_launcher(monkeypatch):
    seen = []
    fake = types.ModuleType("trinity.launcher.launcher")
    fake.run = lambda config: seen.append(config) or 0
    monkeypatch.setitem(sys.modules, "trinity.launcher.launcher", fake)
    assert main(["run", "--config", str(DEMO)]) == 0
    assert seen[0].buffer.explorer_input.tasksets[0].builtin_args["num_terms"] == 2


def test_plugins_load_before_validation(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "my_workflow.py").write_text(PLUGIN)
    config = tmp_path / "config.yaml"
    config.write_text(
        DEMO.read_text().replace(
            "default_workflow_type: simple_workflow", "default_workflow_type: plugin_workflow"
        )
    )
    without = trinity("config", "check", str(config))
    assert without.returncode == 2
    assert "unknown workflow 'plugin_workflow'" in without.stderr
    assert trinity("config", "check", str(config), "--plugin-dir", str(plugins)).returncode == 0
    by_env = trinity(
        "run", "--config", str(config), "--dry-run", env={"TRINITY_PLUGIN_DIRS": str(plugins)}
    )
    assert by_env.returncode == 0 and "default_workflow_type: plugin_workflow" in by_env.stdout


def test_missing_plugin_dir_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["config", "check", str(DEMO), "--plugin-dir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plugin directory not found" in err


@pytest.mark.parametrize("command", ["server", "fetch-model", "plot", "studio", "convert"])
def test_other_subcommands_are_registered(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: trinity {command}" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == 2
    assert "--config" in capsys.readouterr().err


def test_run_overrides_config_keys(capsys):
    assert main(["run", "--config", str(DEMO), "--dry-run", "buffer.total_steps=5"]) == 0
    assert "  total_steps: 5\n" in capsys.readouterr().out


def test_run_bad_override_is_one_line(capsys):
    assert main(["run", "--config", str(DEMO), "--dry-run", "model.tinker.rnak=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["trinity: error: unknown key 'model.tinker.rnak' (did you mean 'rank'?)"]


def test_unreachable_hub_dataset_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    """The seed's ``openai/gsm8k`` with no network: exit 2 naming the path, no model loaded."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline even where CI has network
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    code = main(
        [
            "run",
            "--config",
            str(SEED),
            f"checkpoint_root_dir={tmp_path}",
            "model.tinker.base_url=local",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "openai/gsm8k" in err[0] and "local file" in err[0]
