"""Weight handoff between a trainer and an explorer in another process: the trainer writes its
weights straight to disk (no in-memory snapshot), the explorer loads them into the adapter of the
weights it switches away from. Both are exact: the same files, the same tokens and logprobs."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.test_engine_models import greedy, train
from trinity.engine import Engine, LoraSpec


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(str(tiny_model_dir), dtype=torch.float32)


def adapters(engine: Engine) -> int:
    return len(engine._adapters.peft.peft_config)


def saved(directory) -> tuple[dict, dict]:
    weights = load_file(str(directory / "adapter_model.safetensors"))
    return weights, json.loads((directory / "trinity_sampler.json").read_text())


def test_saving_a_model_writes_what_its_snapshot_would(engine, tmp_path):
    engine.create_model("policy", LoraSpec(rank=4, seed=0))
    train(engine, "policy", 1)
    engine.save_sampler("policy", str(tmp_path / "direct"))
    engine.snapshot_sampler("policy", "snap")
    engine.save_sampler("snap", str(tmp_path / "snap"))
    (direct_w, direct_meta), (snap_w, snap_meta) = (
        saved(tmp_path / "direct"),
        saved(tmp_path / "snap"),
    )
    assert direct_meta == snap_meta and direct_w.keys() == snap_w.keys()
    for key, value in direct_w.items():
        assert torch.equal(value, snap_w[key]), key
    engine.drop_sampler("snap")
    engine.remove_model("policy")


def test_loading_reuses_the_adapter_it_replaces(engine, tmp_path):
    engine.create_model("policy", LoraSpec(rank=4, seed=0))
    for version in (1, 2):
        train(engine, "policy", 1, seed=version)
        engine.save_sampler("policy", str(tmp_path / f"v{version}"))
    engine.load_sampler("v1", str(tmp_path / "v1"))
    before = adapters(engine)
    engine.load_sampler("v2", str(tmp_path / "v2"), reuse="v1")
    assert adapters(engine) == before and not engine.has_sampler("v1")
    engine.load_sampler("fresh", str(tmp_path / "v2"))  # a new adapter: the reference path
    assert adapters(engine) == before + 1
    assert greedy(engine, "v2") == greedy(engine, "fresh")  # same tokens, same logprobs
    # Another shape does not fit: a new adapter, and the one named stays for its owner to drop.
    engine.create_model("rank8", LoraSpec(rank=8, seed=0))
    engine.save_sampler("rank8", str(tmp_path / "r8"))
    before = adapters(engine)
    engine.load_sampler("r8", str(tmp_path / "r8"), reuse="v2")
    assert engine.has_sampler("v2") and adapters(engine) == before + 1
    for name in ("v2", "fresh", "r8"):
        engine.drop_sampler(name)
    for model_id in ("policy", "rank8"):
        engine.remove_model(model_id)


def test_a_snapshot_takes_over_the_adapter_of_a_dropped_sampler(engine):
    """A new sampler per step, the previous one dropped after it (one process's weight sync):
    the snapshot fills the dropped sampler's adapter instead of building one, and samples its
    own weights (the same tokens and logprobs as a snapshot into a new adapter)."""
    engine.create_model("policy", LoraSpec(rank=4, seed=0))
    for step in (1, 2):
        train(engine, "policy", 1, seed=step)
        engine.snapshot_sampler("policy", f"s{step}")
    engine.drop_sampler("s1")
    before = adapters(engine)
    train(engine, "policy", 1, seed=3)
    engine.snapshot_sampler("policy", "s3")
    assert adapters(engine) == before
    engine.snapshot_sampler("policy", "fresh")  # no spare left: a new adapter
    assert adapters(engine) == before + 1
    assert greedy(engine, "s3") == greedy(engine, "fresh")
    assert greedy(engine, "s3")[1] != greedy(engine, "s2")[1]
    for name in ("s2", "s3", "fresh"):
        engine.drop_sampler(name)
    engine.remove_model("policy")


def test_the_first_snapshot_builds_the_adapter_of_the_second(tiny_model_dir):
    """The first LoRA sampler comes with a spare adapter, so the second weight sync (the first
    sampler still there) builds none inside its step; a dropped sampler's is reused after."""
    engine = Engine(str(tiny_model_dir), dtype=torch.float32)  # no spare from other tests
    engine.create_model("policy", LoraSpec(rank=4, seed=0))
    before = adapters(engine)
    engine.snapshot_sampler("policy", "s1")
    assert adapters(engine) == before + 2
    train(engine, "policy", 1, seed=1)
    engine.snapshot_sampler("policy", "s2")
    engine.drop_sampler("s1")
    train(engine, "policy", 1, seed=2)
    engine.snapshot_sampler("policy", "s3")
    assert adapters(engine) == before + 2
    assert greedy(engine, "s3")[1] != greedy(engine, "s2")[1]


def test_two_process_handoff_keeps_one_adapter_per_side(tiny_model_dir, tmp_path):
    """The trainer of a pair publishes without snapshots (its adapters stay its own model's), the
    explorer's sampler switches weights in one adapter however many versions go by."""
    from trinity.backends.local import LocalRuntime, LocalSampler, LocalTrainer

    trainer_side, explorer_side = (
        LocalRuntime(str(tiny_model_dir)),
        LocalRuntime(str(tiny_model_dir)),
    )
    try:
        trainer = LocalTrainer(
            trainer_side, "policy", LoraSpec(rank=4, seed=0), persist_samplers=True
        )
        sampler = LocalSampler(explorer_side)

        async def go():
            for step in range(1, 4):
                ref = await trainer.publish_sampler(f"s{step}", str(tmp_path / f"s{step}"))
                await sampler.switch(ref)
                assert sampler.ref == ref and explorer_side.engine.has_sampler(ref)
                assert not trainer_side.engine._samplers.by_name
                assert adapters(trainer_side.engine) == 1 and adapters(explorer_side.engine) == 1

        asyncio.run(go())
    finally:
        trainer_side.close()
        explorer_side.close()
