"""Engine model management on the tiny random Llama in fp32: checkpoints, samplers, exports,
several LoRA models on one base, full fine-tuning, LoRA target selection."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tinker import types
from transformers import AutoModelForCausalLM

from tests.engine_probe import PROBE, datums, logprobs, plain_logprobs
from trinity.engine import Engine, LoraSpec, SampleRequest

STEP = types.AdamParams(learning_rate=0.02, weight_decay=0.01, grad_clip_norm=5.0)
PROMPT = [1, 520, 33, 918, 77]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(str(tiny_model_dir), dtype=torch.float32)


def train(engine: Engine, model_id: str, steps: int, seed: int = 0) -> None:
    for i in range(steps):
        engine.forward_backward(model_id, datums(seed + i), "cross_entropy")
        engine.optim_step(model_id, STEP)


def greedy(engine: Engine, adapter: str | None) -> tuple[list[int], list[float]]:
    request = SampleRequest(
        prompt_tokens=PROMPT,
        adapter=adapter,
        prompt_logprobs=True,
        params=types.SamplingParams(max_tokens=6, temperature=0, stop=[]),
    )
    (response,) = engine.sample([request])
    return response.sequences[0].tokens, response.prompt_logprobs[1:]


def test_every_module_stays_in_eval_mode_through_training_and_sampling(engine):
    """No dropout anywhere, ever: a datum's logprobs are the sampler's. (peft's wrapper starts in
    training mode, and a sample call that found it so switched every module to training mode.)"""
    engine.create_model("modes", LoraSpec(rank=4, seed=0))
    train(engine, "modes", 1)
    engine.snapshot_sampler("modes", "modes-sampler")
    greedy(engine, "modes-sampler")
    train(engine, "modes", 1)
    assert not [n for n, m in engine._adapters.shared_module().named_modules() if m.training]
    engine.drop_sampler("modes-sampler")
    engine.remove_model("modes")


def test_save_load_continues_like_uninterrupted(engine, tmp_path):
    engine.create_model("run", LoraSpec(rank=4, seed=0))
    train(engine, "run", 2)
    engine.save_state("run", str(tmp_path / "state"))
    train(engine, "run", 2, seed=2)
    engine.load_state("resumed", str(tmp_path / "state"))  # created from the checkpoint meta
    assert engine.model_info("resumed")["step"] == 2
    assert engine.model_info("resumed")["rank"] == 4
    train(engine, "resumed", 2, seed=2)
    torch.testing.assert_close(
        logprobs(engine, "resumed"), logprobs(engine, "run"), atol=1e-6, rtol=0
    )

    # Weights only: a fresh optimizer makes the next steps differ.
    engine.load_state("fresh-optim", str(tmp_path / "state"), optimizer=False)
    assert engine.model_info("fresh-optim")["step"] == 0
    train(engine, "fresh-optim", 2, seed=2)
    assert not torch.allclose(logprobs(engine, "fresh-optim"), logprobs(engine, "run"), atol=1e-4)
    meta = json.loads((tmp_path / "state" / "trinity_state.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["step"] == 2 and meta["optimizer"]

    # Into an existing model of another shape: refused with the reason.
    engine.create_model("rank8", LoraSpec(rank=8))
    with pytest.raises(ValueError, match="holds"):
        engine.load_state("rank8", str(tmp_path / "state"))
    for model_id in ("run", "resumed", "fresh-optim", "rank8"):
        engine.remove_model(model_id)


def assert_same(got: tuple, expected: tuple) -> None:
    """Same greedy tokens; logprobs equal up to fp32 rounding (a frozen sampler decodes on a
    merged copy, W + BA, while a trainable model runs W and BA separately)."""
    assert got[0] == expected[0]
    torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(expected[1]), atol=1e-5, rtol=0)


def test_snapshot_sampler_is_isolated_from_training(engine):
    engine.create_model("policy", LoraSpec(rank=4, seed=0))
    train(engine, "policy", 2)
    engine.snapshot_sampler("policy", "/samplers/v1")  # a path-like name is fine
    assert engine.has_sampler("/samplers/v1")
    before = greedy(engine, "/samplers/v1")
    assert engine._samplers.merged_adapter is not None  # decoded on the merged copy
    assert_same(before, greedy(engine, "policy"))
    train(engine, "policy", 3, seed=5)
    assert greedy(engine, "/samplers/v1") == before
    assert greedy(engine, "policy")[1] != before[1]
    engine.snapshot_sampler("policy", "/samplers/v1")  # replaced in place by the newer weights
    assert_same(greedy(engine, "/samplers/v1"), greedy(engine, "policy"))
    engine.drop_sampler("/samplers/v1")
    assert not engine.has_sampler("/samplers/v1")
    with pytest.raises(ValueError, match="unknown"):
        greedy(engine, "/samplers/v1")
    engine.remove_model("policy")


def test_save_and_load_sampler(engine, tmp_path):
    engine.create_model("pub", LoraSpec(rank=4, seed=3, train_unembed=False))
    train(engine, "pub", 2)
    engine.snapshot_sampler("pub", "s")
    engine.save_sampler("s", str(tmp_path / "s"))
    engine.load_sampler("s-loaded", str(tmp_path / "s"))
    assert_same(greedy(engine, "s-loaded"), greedy(engine, "s"))
    for name in ("s", "s-loaded"):
        engine.drop_sampler(name)
    engine.remove_model("pub")


def test_export_peft_loads_with_peft_and_matches(engine, tiny_model_dir, tmp_path):
    engine.create_model("exp", LoraSpec(rank=4, seed=0, alpha=16))
    train(engine, "exp", 2)
    engine.export_peft("exp", str(tmp_path / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(plain_logprobs(model), logprobs(engine, "exp"), atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16
    engine.remove_model("exp")


@pytest.mark.parametrize("unembed", [True, False])
def test_export_merged_matches(engine, tmp_path, unembed):
    """With tied embeddings, an unembedding LoRA must untie the export (input side unchanged)."""
    engine.create_model("merge", LoraSpec(rank=4, seed=0, train_unembed=unembed))
    train(engine, "merge", 2)
    engine.export_merged("merge", str(tmp_path / "merged"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(plain_logprobs(model), logprobs(engine, "merge"), atol=1e-5, rtol=0)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied != unembed
    engine.remove_model("merge")


def test_full_finetune(engine, tiny_model_dir, tmp_path):
    base_before = greedy(engine, None)
    engine.create_model("full", None)
    info = engine.model_info("full")
    assert not info["is_lora"] and info["rank"] is None
    losses = []
    for _ in range(3):
        losses.append(engine.forward_backward("full", PROBE, "cross_entropy").metrics["loss:sum"])
        engine.optim_step("full", types.AdamParams(learning_rate=1e-3))
    assert losses[2] < losses[1] < losses[0]
    assert greedy(engine, None) == base_before  # the shared base is untouched
    engine.snapshot_sampler("full", "full-v1")
    snap = greedy(engine, "full-v1")
    assert snap == greedy(engine, "full") and snap[1] != base_before[1]
    train(engine, "full", 1, seed=9)
    assert greedy(engine, "full-v1") == snap
    engine.save_sampler("full-v1", str(tmp_path / "sampler"))
    engine.load_sampler("full-v1-loaded", str(tmp_path / "sampler"))
    assert greedy(engine, "full-v1-loaded") == snap
    engine.drop_sampler("full-v1-loaded")

    engine.export_merged("full", str(tmp_path / "merged"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(
        plain_logprobs(model.eval()), logprobs(engine, "full"), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="full fine-tune"):
        engine.export_peft("full", str(tmp_path / "nope"))

    engine.save_state("full", str(tmp_path / "state"))
    engine.load_state("full-copy", str(tmp_path / "state"))
    torch.testing.assert_close(logprobs(engine, "full-copy"), logprobs(engine, "full"))
    train(engine, "full", 1, seed=20)
    train(engine, "full-copy", 1, seed=20)
    torch.testing.assert_close(
        logprobs(engine, "full-copy"), logprobs(engine, "full"), atol=1e-6, rtol=0
    )
    engine.drop_sampler("full-v1")
    engine.remove_model("full")
    engine.remove_model("full-copy")


def test_lora_models_on_one_base_are_isolated(engine):
    engine.create_model("alone", LoraSpec(rank=4, seed=1))
    engine.create_model("a", LoraSpec(rank=4, seed=1))
    engine.create_model("b", LoraSpec(rank=8, seed=2, train_mlp=False))
    base_before = greedy(engine, None)
    b_before = logprobs(engine, "b")
    for i in range(2):  # interleaved: a's and b's gradients must not mix
        engine.forward_backward("a", datums(i), "cross_entropy")
        engine.forward_backward("b", datums(50 + i), "cross_entropy")
        engine.optim_step("a", STEP)
        engine.forward_backward("alone", datums(i), "cross_entropy")
        engine.optim_step("alone", STEP)
    torch.testing.assert_close(logprobs(engine, "a"), logprobs(engine, "alone"), atol=1e-6, rtol=0)
    torch.testing.assert_close(logprobs(engine, "b"), b_before)  # accumulated, never stepped
    engine.optim_step("b", STEP)
    assert not torch.allclose(logprobs(engine, "b"), b_before)
    assert greedy(engine, None) == base_before
    # One sample call serves the base and both adapters in one batch.
    requests = [
        SampleRequest(
            prompt_tokens=PROMPT,
            adapter=a,
            params=types.SamplingParams(max_tokens=4, temperature=0, stop=[]),
        )
        for a in ("a", None, "b")
    ]
    batched = [r.sequences[0].tokens for r in engine.sample(requests)]
    assert batched == [greedy(engine, a)[0][:4] for a in ("a", None, "b")]
    for model_id in ("alone", "a", "b"):
        engine.remove_model(model_id)
    assert greedy(engine, None) == base_before


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            {"train_attn": True, "train_mlp": False, "train_unembed": False},
            {"q_proj", "k_proj", "v_proj", "o_proj"},
        ),
        (
            {"train_attn": False, "train_mlp": True, "train_unembed": False},
            {"gate_proj", "up_proj", "down_proj"},
        ),
        ({"train_attn": False, "train_mlp": False, "train_unembed": True}, {"lm_head"}),
        (
            {},
            {
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
                "lm_head",
            },
        ),
    ],
)
def test_lora_flags_choose_modules(engine, tmp_path, flags, expected):
    engine.create_model("flags", LoraSpec(rank=2, **flags))
    engine.export_peft("flags", str(tmp_path / "a"))
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    modules = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys}
    assert modules == expected
    layers = 2
    per_module = layers if expected != {"lm_head"} else 1
    assert len(keys) == 2 * sum(per_module if m != "lm_head" else 1 for m in expected)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == expected
    engine.remove_model("flags")
    with pytest.raises(ValueError, match="at least one"):
        engine.create_model(
            "none", LoraSpec(train_attn=False, train_mlp=False, train_unembed=False)
        )


def test_seed_makes_lora_init_reproducible(engine):
    engine.create_model("s1", LoraSpec(rank=4, seed=7))
    engine.create_model("s2", LoraSpec(rank=4, seed=7))
    train(engine, "s1", 1)
    train(engine, "s2", 1)
    torch.testing.assert_close(logprobs(engine, "s1"), logprobs(engine, "s2"), atol=0, rtol=0)
    engine.remove_model("s1")
    engine.remove_model("s2")


def test_unknown_names_raise_value_error(engine, tmp_path):
    with pytest.raises(ValueError, match="unknown model_id"):
        engine.snapshot_sampler("ghost", "x")
    with pytest.raises(ValueError, match="unknown sampler"):
        engine.drop_sampler("ghost")
    with pytest.raises(ValueError, match="unknown model or sampler"):
        engine.export_peft("ghost", str(tmp_path))
    with pytest.raises(ValueError, match="not an engine training state"):
        engine.load_state("x", str(tmp_path))


def test_bf16_autocast_path_tracks_fp32(tiny_model_dir):
    """The default precision on bf16 hardware: bf16 base, fp32 adapters, autocast matmuls."""
    fast = Engine(str(tiny_model_dir), dtype=torch.bfloat16)
    exact = Engine(str(tiny_model_dir), dtype=torch.float32)
    for e in (fast, exact):
        e.create_model("m", LoraSpec(rank=4, seed=0))
        e.create_model("full", None)
        for model_id in ("m", "full"):
            train(e, model_id, 1)
    for model_id in ("m", "full"):
        torch.testing.assert_close(
            logprobs(fast, model_id), logprobs(exact, model_id), atol=0.1, rtol=0.02
        )
        assert fast.model_info(model_id)["step"] == 1
    fast.snapshot_sampler("m", "snap")
    tokens, prompt_lp = greedy(fast, "snap")
    assert len(tokens) == 6
    torch.testing.assert_close(
        torch.tensor(prompt_lp), torch.tensor(greedy(exact, "m")[1]), atol=0.1, rtol=0.02
    )


def test_trinity_dtype_overrides_the_machines_pick(monkeypatch):
    """``TRINITY_DTYPE`` forces the engine's dtype (fp32-exact logprobs on a bf16 machine); any
    other value is refused in one line naming the variable."""
    from trinity.engine.forward import default_dtype

    cpu = torch.device("cpu")
    for name in ("float32", "bfloat16"):
        monkeypatch.setenv("TRINITY_DTYPE", name)
        assert default_dtype(cpu) == getattr(torch, name)
    monkeypatch.setenv("TRINITY_DTYPE", "fp8")
    with pytest.raises(ValueError, match="TRINITY_DTYPE: expected float32 or bfloat16"):
        default_dtype(cpu)
