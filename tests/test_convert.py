"""``trinity convert``: a run's checkpoint (local engine state, or a trinity server checkpoint a
Tinker-backend run points at) becomes a Hugging Face model or a peft adapter whose logits equal
the engine's; bad paths are one line and exit status 2."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from tinker import types
from transformers import AutoModelForCausalLM

from tests.engine_probe import datums, logprobs, plain_logprobs
from trinity.cli.main import main
from trinity.engine import Engine, LoraSpec
from trinity.jobdir import JobDir
from trinity.server.store import Store

STEP = types.AdamParams(learning_rate=0.02)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(str(tiny_model_dir), dtype=torch.float32)


def trained(engine: Engine, model_id: str, lora: LoraSpec | None) -> torch.Tensor:
    """Train ``model_id`` two steps; its logprobs on the probe afterwards."""
    engine.create_model(model_id, lora)
    for i in range(2):
        engine.forward_backward(model_id, datums(i), "cross_entropy")
        engine.optim_step(model_id, STEP if lora else types.AdamParams(learning_rate=1e-3))
    return logprobs(engine, model_id)


def local_run(engine: Engine, model_id: str, run_dir, step: int = 3):
    """A run directory as the local backend's trainer leaves it (state in global_step_N)."""
    job = JobDir(run_dir)
    state = job.step_dir(step) / "state"
    engine.save_state(model_id, str(state))
    job.write_checkpoint(step, str(state))
    return job


def test_lora_checkpoint_converts_to_hf_and_peft(engine, tiny_model_dir, tmp_path):
    expected = trained(engine, "lora", LoraSpec(rank=4, seed=0))
    job = local_run(engine, "lora", tmp_path / "run")
    base_logprobs = plain_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert not torch.allclose(base_logprobs, expected, atol=1e-3)  # training changed the model

    assert (
        main(
            [
                "convert",
                "--checkpoint",
                str(job.step_dir(3)),
                "--to",
                "hf",
                "-o",
                str(tmp_path / "hf"),
            ]
        )
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert merged.dtype == torch.float32
    torch.testing.assert_close(plain_logprobs(merged), expected, atol=1e-5, rtol=0)

    # the run directory itself means its latest checkpoint
    assert (
        main(
            ["convert", "--checkpoint", str(job.path), "--to", "peft", "-o", str(tmp_path / "peft")]
        )
        == 0
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    torch.testing.assert_close(plain_logprobs(adapter), expected, atol=1e-5, rtol=0)

    # a sampler checkpoint (what save_weights_for_sampler writes) converts too
    engine.snapshot_sampler("lora", "published")
    engine.save_sampler("published", str(tmp_path / "sampler"))
    engine.drop_sampler("published")
    out = tmp_path / "from-sampler"
    assert main(["convert", "--checkpoint", str(tmp_path / "sampler"), "-o", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(plain_logprobs(merged), expected, atol=1e-5, rtol=0)
    engine.remove_model("lora")


def test_full_finetune_converts_to_hf_only(engine, tmp_path, capsys):
    expected = trained(engine, "full", None)
    job = local_run(engine, "full", tmp_path / "run", step=1)
    assert main(["convert", "--checkpoint", str(job.path), "-o", str(tmp_path / "hf")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(plain_logprobs(merged), expected, atol=1e-5, rtol=0)
    capsys.readouterr()
    assert (
        main(["convert", "--checkpoint", str(job.path), "--to", "peft", "-o", str(tmp_path / "p")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "full fine-tune has no adapter; use --to hf" in err
    engine.remove_model("full")


def test_tinker_checkpoint_found_in_the_runs_server_state(engine, tiny_model_dir, tmp_path):
    """A Tinker-backend run records ``tinker://RUN/weights/NAME``; with ``base_url: local`` the
    embedded server's store (``<run>/server``) says where that checkpoint's directory is."""
    expected = trained(engine, "remote", LoraSpec(rank=4, seed=1))
    job = JobDir(tmp_path / "run")
    directory = job.server_dir / "checkpoints" / "run-1" / "weights" / "trinity-state-2"
    engine.save_state("remote", str(directory))
    store = Store(str(job.server_dir / "server.sqlite"))
    ref = "tinker://run-1/weights/trinity-state-2"
    store.add_checkpoint(
        "run-1", "weights/trinity-state-2", "t", "training", ref, str(directory), 0, None, None
    )
    store.close()
    job.write_checkpoint(2, ref)
    assert (
        main(
            [
                "convert",
                "--checkpoint",
                str(job.step_dir(2)),
                "--to",
                "peft",
                "-o",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "p")
    ).eval()
    torch.testing.assert_close(plain_logprobs(adapter), expected, atol=1e-5, rtol=0)
    engine.remove_model("remote")


def test_bad_checkpoints_are_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    hosted = JobDir(tmp_path / "hosted")
    hosted.write_checkpoint(5, "tinker://abc/weights/trinity-state-5")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = {
        str(tmp_path / "nowhere"): "no such directory",
        str(tmp_path / "empty"): "not a checkpoint",
        str(hosted.step_dir(5)): "is on a Tinker service",
    }
    for path, message in cases.items():
        assert main(["convert", "--checkpoint", path, "-o", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
