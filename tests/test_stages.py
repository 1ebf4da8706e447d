"""Multi-stage training: each stage starts from the previous stage's final weights.

SFT -> GRPO on a tiny random model, on the local engine and through the Tinker SDK against the
``trinity server`` the run starts. The GRPO stage trains with lr 1e-12, so its final checkpoint holds
the weights it started from; those must be the SFT stage's final weights, not the base model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tinker
import torch
import yaml
from tinker import types

from tests.test_rl_loop import backend_model, job_dir, run_cli, trainer_records, write_config
from trinity.jobdir import JobDir

TOKENS = [1, 520, 314, 2023, 4416, 28, 216, 33, 34, 35, 2, 1542]


def _datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_torch(torch.tensor(TOKENS[1:])),
            "weights": types.TensorData.from_torch(torch.ones(len(TOKENS) - 1)),
        },
    )


def local_logprobs(
    model_dir: Path, ref: str | None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Logprobs of ``TOKENS`` under a local checkpoint (None: the base model)."""
    from trinity.engine import Engine, LoraSpec

    engine = Engine(str(model_dir), dtype=dtype)
    if ref is None:
        engine.create_model("m", LoraSpec(rank=4, seed=0))
    else:
        engine.load_state("m", ref, optimizer=False)
    out = engine.forward_backward("m", [_datum()], "cross_entropy", None, forward_only=True)
    return out.loss_fn_outputs[0]["logprobs"].to_torch().float()


def tinker_logprobs(model_dir: Path, server_dir: Path, ref: str) -> torch.Tensor:
    """Logprobs of ``TOKENS`` under a ``tinker://`` state kept in a run's server store."""
    from trinity.server import build_service
    from trinity.server.runner import ServerThread

    server = ServerThread(build_service([str(model_dir)], server_dir, "tml-test=local")).start()
    try:
        client = tinker.ServiceClient(base_url=server.url, api_key="tml-test")
        training = client.create_training_client_from_state(ref).result()
        out = training.forward([_datum()], "cross_entropy").result()
        return out.loss_fn_outputs[0]["logprobs"].to_torch().float()
    finally:
        server.stop()


def sft_stage(tmp_path: Path) -> dict:
    """A 2-step SFT stage on four chats (lr high enough to move a tiny model's weights)."""
    data = tmp_path / "chats.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "response": str(2 * i)} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "stage_name": "sft",
        "mode": "train",
        "algorithm": {"algorithm_type": "sft", "optimizer": {"lr": 5e-2}},
        "buffer": {
            "batch_size": 2,
            "train_batch_size": 2,
            "total_steps": 2,
            "trainer_input": {
                "experience_buffer": {"name": "sft", "storage_type": "file", "path": str(data)}
            },
        },
    }


@pytest.mark.parametrize("backend", ["local", "tinker"])
def test_sft_then_grpo_starts_from_the_sft_weights(tmp_path, tiny_model_dir, backend, monkeypatch):
    # fp32 on every machine: in bf16 the sampler's and the trainer's logprobs of the same weights
    # differ by bf16 roundings (a KL of ~1e-3 on this model), which would hide stale weights
    monkeypatch.setenv("TRINITY_DTYPE", "float32")
    config_path = write_config(tmp_path, tiny_model_dir)
    config = yaml.safe_load(config_path.read_text())
    config["model"] = backend_model(tmp_path, tiny_model_dir, backend)
    config["buffer"]["total_steps"] = 1
    config["stages"] = [
        sft_stage(tmp_path),
        {
            "stage_name": "grpo",
            "algorithm": {"algorithm_type": "grpo", "repeat_times": 4, "optimizer": {"lr": 1e-12}},
        },
    ]
    config_path.write_text(yaml.safe_dump(config))
    run_cli(config_path)

    root = job_dir(tmp_path)
    sft_ref = JobDir(root / "sft").latest_checkpoint()[1]
    grpo_ref = JobDir(root / "grpo").latest_checkpoint()[1]
    if backend == "local":
        sft_lp, grpo_lp = (local_logprobs(tiny_model_dir, ref) for ref in (sft_ref, grpo_ref))
    else:
        assert sft_ref.startswith("tinker://") and grpo_ref.startswith("tinker://")
        sft_lp, grpo_lp = (
            tinker_logprobs(tiny_model_dir, root / "server", ref) for ref in (sft_ref, grpo_ref)
        )
    base_lp = local_logprobs(tiny_model_dir, None)
    assert (sft_lp - base_lp).abs().max() > 1e-2  # SFT moved the weights: the test can fail
    torch.testing.assert_close(grpo_lp, sft_lp, atol=1e-5, rtol=0)
    # the explorer sampled the GRPO stage's first step with the same weights the trainer had
    first = trainer_records(root / "grpo")[1]
    assert abs(first["actor/ppo_kl"]) < 1e-5


def hf_logprobs(model_dir: Path) -> torch.Tensor:
    """Logprobs of ``TOKENS`` under a Hugging Face model directory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS[:-1]])).logits[0].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(TOKENS[1:])[:, None])[:, 0]


@pytest.mark.parametrize(
    ("backend", "critic_path"), [("local", None), ("local", "given"), ("tinker", None)]
)
def test_sft_then_ppo_critic_starts_from_the_sft_weights(
    tmp_path, tiny_model_dir, backend, critic_path
):
    """The PPO stage's critic is built over the SFT stage's final weights, as the original's
    critic_model_path defaults to the stage's seeded model_path; a given critic_model_path wins."""
    from trinity.engine.checkpoint import read_state_meta
    from trinity.server.checkpoints import stored_directory

    config_path = write_config(tmp_path, tiny_model_dir)
    config = yaml.safe_load(config_path.read_text())
    config["model"] = backend_model(tmp_path, tiny_model_dir, backend)
    if critic_path:
        config["model"]["critic_model_path"] = str(tiny_model_dir)
    config["buffer"]["total_steps"] = 1
    config["trainer"]["save_interval"] = 1
    config["stages"] = [
        sft_stage(tmp_path),
        {"stage_name": "ppo", "algorithm": {"algorithm_type": "ppo", "repeat_times": 2}},
    ]
    config_path.write_text(yaml.safe_dump(config))
    run_cli(config_path)

    root = job_dir(tmp_path)
    critic_base = read_state_meta(JobDir(root / "ppo").critic_dir(1))["base_model"]
    if critic_path:
        assert critic_base == str(tiny_model_dir)
        return
    start = root / "ppo" / "stage_start" / "critic"
    assert critic_base == str(start)
    sft_ref = JobDir(root / "sft").latest_checkpoint()[1]
    if backend == "tinker":  # the state's directory in the run's server store
        sft_ref = str(stored_directory(root / "server", sft_ref))
    sft_lp = local_logprobs(tiny_model_dir, sft_ref, torch.float32)
    assert (sft_lp - local_logprobs(tiny_model_dir, None, torch.float32)).abs().max() > 1e-2
    torch.testing.assert_close(hf_logprobs(start), sft_lp, atol=1e-5, rtol=0)
