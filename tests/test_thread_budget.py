"""Thread budgets: each compute process gets its share of the cores (trinity.engine.process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trinity.config import ConfigError, load_config
from trinity.engine.process import ENV_VAR, thread_budget
from trinity.launcher.launcher import compute_processes

ROOT = Path(__file__).resolve().parents[1]


def test_each_process_gets_its_share(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert thread_budget(1, cores=16).threads == 16
    assert thread_budget(2, cores=16).threads == 8
    assert thread_budget(3, cores=16).threads == 5
    assert thread_budget(4, cores=2).threads == 1  # never zero
    assert "16 cores / 2 process" in thread_budget(2, cores=16).why


def test_env_var_overrides_the_share(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "3")
    budget = thread_budget(2, cores=16)
    assert budget.threads == 3 and ENV_VAR in budget.why


@pytest.mark.parametrize("bad", ["0", "two", "-1", "1.5"])
def test_bad_env_var_is_one_line_config_error(monkeypatch, bad):
    monkeypatch.setenv(ENV_VAR, bad)
    with pytest.raises(ConfigError, match=rf"^{ENV_VAR}: expected a whole number") as info:
        thread_budget(2)
    assert "\n" not in str(info.value)


def _config(tmp_path: Path, mode: str):
    from tests.test_rl_loop import PLUGINS, write_config
    from trinity.plugins import load_plugins

    load_plugins([str(PLUGINS)])
    return load_config(write_config(tmp_path, Path("demo"), name=mode, mode=mode))


@pytest.mark.parametrize(("mode", "processes"), [("both", 1), ("explore", 2), ("train", 2)])
def test_modes_count_the_processes_beside_them(tmp_path, mode, processes):
    assert compute_processes(_config(tmp_path, mode)) == processes


class _Cluster:
    def actors_per_node(self) -> int:
        return 3


def test_ray_rollout_models_share_the_node_with_the_driver(tmp_path):
    config = _config(tmp_path, "both")
    assert compute_processes(config, _Cluster()) == 4
    config.model.tinker.enable = True  # the models are remote: nothing computes beside us
    assert compute_processes(config, _Cluster()) == 1


PROBE = """
import json, os, torch
from trinity.engine import configure_process
configure_process({processes})
print(json.dumps({{"torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                  "omp": os.environ.get("OMP_NUM_THREADS"), "mkl": os.environ.get("MKL_NUM_THREADS")}}))
"""


def _probe(processes, env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    if env_value is not None:
        env[ENV_VAR] = env_value
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(processes=processes)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_budget_is_applied_to_torch_and_subprocess_env():
    """Real processes: torch's pools and what OpenMP / MKL in a subprocess would read."""
    seen = _probe(None, "3")
    assert seen == {"torch": 3, "interop": 2, "omp": "3", "mkl": "3"}
    seen = _probe(64, None)  # more processes than cores: one thread each
    assert seen == {"torch": 1, "interop": 1, "omp": "1", "mkl": "1"}


def test_trinity_run_applies_the_budget_of_its_mode(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """``mode: explore`` (one half of a pair) runs on half the cores; a bad override is refused."""
    import torch

    from tests.test_rl_loop import run_cli, write_config
    from trinity.cli.main import main
    from trinity.engine.process import usable_cores

    config = write_config(
        tmp_path,
        tiny_model_dir,
        mode="explore",
        buffer={"total_steps": 1, "batch_size": 1},
        synchronizer={"sync_method": "checkpoint", "sync_interval": 1, "sync_offset": 1},
    )
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "")  # restored after the test, as are torch's threads below
    monkeypatch.delenv(ENV_VAR, raising=False)
    threads = torch.get_num_threads()
    cores = usable_cores()
    torch.set_num_threads(cores)  # what a process starts with
    try:
        run_cli(config)
        share = max(1, cores // 2)
        assert torch.get_num_threads() == share and os.environ["OMP_NUM_THREADS"] == str(share)
    finally:
        torch.set_num_threads(threads)
    log = next((tmp_path / "ckpt").rglob("trinity.log")).read_text()
    assert f"{share} compute threads per process ({cores} cores / 2 process(es))" in log
    monkeypatch.setenv(ENV_VAR, "zero")
    assert main(["run", "--config", str(config)]) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1].startswith(f"trinity: error: {ENV_VAR}:")
    )
