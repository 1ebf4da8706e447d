"""The Tinker backend in ``trinity run``: the official SDK against an embedded ``trinity server``.

Parity: the same config, seed and tiny model give the same per-step reward and loss on the local
backend (engine in-process) and on the Tinker backend (``model.tinker.base_url: local``).
Tolerance: both run the same engine code; the server batches sample requests differently, which
changes floating-point rounding only, so rewards must match to 1e-6 and losses to 1e-3 relative.
"""

from __future__ import annotations

import pytest
import yaml

from tests.test_rl_loop import job_dir, run_cli, trainer_records, write_config
from trinity.cli.main import main


def per_step(tmp_path, model_dir, name: str, tinker: dict) -> dict[int, dict]:
    base = yaml.safe_load(write_config(tmp_path, model_dir).read_text())
    config = write_config(
        tmp_path,
        model_dir,
        name=name,
        model={**base["model"], "tinker": {**base["model"]["tinker"], **tinker}},
    )
    run_cli(config)
    return trainer_records(job_dir(tmp_path, name))


def test_grpo_local_and_tinker_backends_agree(tmp_path, tiny_model_dir):
    local = per_step(tmp_path, tiny_model_dir, "local", {"enable": False})
    remote = per_step(tmp_path, tiny_model_dir, "tinker", {"enable": True, "base_url": "local"})
    assert sorted(local) == sorted(remote) == [1, 2, 3]
    for step in (1, 2, 3):
        assert remote[step]["critic/rewards/mean"] == pytest.approx(
            local[step]["critic/rewards/mean"], abs=1e-6
        )
        assert remote[step]["actor/final_loss"] == pytest.approx(
            local[step]["actor/final_loss"], rel=1e-3, abs=1e-6
        )
    job = job_dir(tmp_path, "tinker")
    assert (
        (job / "global_step_3" / "remote_checkpoint_path.txt").read_text().startswith("tinker://")
    )
    # the service exports Tinker's names; the backend renames them so peft loads the adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), job / "final_adapter"
    )
    assert any("lm_head.lora_B" in name for name, _ in adapter.named_parameters())
    # Each sync deletes the sampler weights the explorer stopped using on the service.
    (samplers,) = (job / "server" / "checkpoints").glob("*/*/sampler_weights")
    assert sorted(p.name for p in samplers.iterdir()) == [
        "loop-tests-tinker-sampler-2",
        "loop-tests-tinker-sampler-3",
    ]


def test_missing_api_key_fails_before_any_work(tmp_path, tiny_model_dir, monkeypatch, capsys):
    for var in ("TRINITY_API_KEY", "TINKER_API_KEY", "TINKER_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    base = yaml.safe_load(write_config(tmp_path, tiny_model_dir).read_text())
    config = write_config(
        tmp_path,
        tiny_model_dir,
        name="nokey",
        model={**base["model"], "tinker": {"enable": True, "base_url": "http://127.0.0.1:9"}},
    )
    assert main(["run", "--config", str(config)]) == 2
    assert "TINKER_API_KEY" in capsys.readouterr().err
    assert not job_dir(tmp_path, "nokey").exists()
