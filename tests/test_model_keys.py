"""The original's model keys that shape the trained model: ``lora_configs[*].path`` (start from a
peft adapter), ``lora_configs[*].exclude_modules``, ``rope_scaling`` / ``rope_theta``; and the
multimodal keys, refused in one line."""

from __future__ import annotations

import asyncio

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tinker import types
from transformers import AutoModelForCausalLM

from tests.engine_probe import datums, logprobs, plain_logprobs
from trinity.config import ConfigError, load_config
from trinity.engine import Engine, LoraSpec

STEP = types.AdamParams(learning_rate=0.02)


@pytest.fixture(autouse=True)
def _root(tmp_path, monkeypatch):
    monkeypatch.setenv("TRINITY_CHECKPOINT_ROOT_DIR", str(tmp_path))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(str(tiny_model_dir), dtype=torch.float32)


def config_text(model_path, model_extra: str = "", extra: str = "") -> str:
    return (
        f"model:\n  model_path: {model_path}\n  max_prompt_tokens: 32\n  max_response_tokens: 8\n"
        f"{model_extra}"
        "buffer:\n  total_steps: 1\n  explorer_input:\n"
        "    taskset: {path: 'builtin:arithmetic'}\n    default_workflow_type: math_workflow\n"
        f"{extra}"
    )


def load(tmp_path, *args, **kwargs):
    path = tmp_path / "config.yaml"
    path.write_text(config_text(*args, **kwargs))
    return load_config(path)


def trained_adapter(engine: Engine, model_id: str, spec: LoraSpec, out) -> torch.Tensor:
    """Train ``model_id`` two steps, save it as a peft directory ``out``; its probe logprobs."""
    engine.create_model(model_id, spec)
    for i in range(2):
        engine.forward_backward(model_id, datums(i), "cross_entropy")
        engine.optim_step(model_id, STEP)
    engine.export_peft(model_id, str(out))
    return logprobs(engine, model_id)


# ---- lora_configs[*].path ----------------------------------------------------------------------
def test_a_saved_adapter_loaded_into_a_fresh_model_gives_its_logits(engine, tmp_path):
    spec = LoraSpec(rank=4, alpha=8, seed=0)
    saved = trained_adapter(engine, "saved", spec, tmp_path / "adapter")
    engine.create_model("fresh", LoraSpec(rank=4, alpha=8, seed=1))
    assert not torch.allclose(logprobs(engine, "fresh"), saved, atol=1e-4)
    engine.load_adapter("fresh", str(tmp_path / "adapter"))
    torch.testing.assert_close(logprobs(engine, "fresh"), saved, atol=1e-5, rtol=0)
    # it trains on from there: a step moves it
    engine.forward_backward("fresh", datums(5), "cross_entropy")
    engine.optim_step("fresh", STEP)
    assert not torch.allclose(logprobs(engine, "fresh"), saved, atol=1e-4)


def test_any_peft_adapter_on_fewer_modules_loads_with_peft_s_logits(
    engine, tiny_model_dir, tmp_path
):
    """An adapter made by peft itself on q_proj / v_proj only: the trained adapter (every
    linear layer) equals it, its other targets starting at zero."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(3)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = plain_logprobs(peft_model.eval())

    engine.create_model("from_peft", LoraSpec(rank=4, alpha=8, seed=0))
    engine.load_adapter("from_peft", str(tmp_path / "peft"))
    torch.testing.assert_close(logprobs(engine, "from_peft"), expected, atol=1e-5, rtol=0)


def test_an_adapter_that_does_not_fit_is_refused(engine, tmp_path):
    trained_adapter(engine, "r2", LoraSpec(rank=2, alpha=8, seed=0), tmp_path / "r2")
    engine.create_model("r4", LoraSpec(rank=4, alpha=8))
    with pytest.raises(ValueError, match="rank 2 / alpha 8"):
        engine.load_adapter("r4", str(tmp_path / "r2"))
    engine.create_model("no_head", LoraSpec(rank=2, alpha=8, exclude_modules=("lm_head",)))
    with pytest.raises(ValueError, match="has no LoRA on .*lm_head"):
        engine.load_adapter("no_head", str(tmp_path / "r2"))


def test_the_run_starts_from_the_adapter_in_lora_configs_path(
    engine, tiny_model_dir, tmp_path, monkeypatch
):
    from trinity.launcher.backends import build_backends

    # the run's engine computes in fp32 as the reference does, so logits compare exactly
    monkeypatch.setattr("trinity.engine.engine.default_dtype", lambda device: torch.float32)
    saved = trained_adapter(engine, "for_run", LoraSpec(rank=4, alpha=8), tmp_path / "adapter")
    lora = f"  lora_configs:\n  - {{path: {tmp_path / 'adapter'}, lora_rank: 4, lora_alpha: 8}}\n"
    config = load(tmp_path, tiny_model_dir, lora)

    async def run() -> torch.Tensor:
        backends = await build_backends(config, explore=False, train=True, resume_ref=None)
        try:
            trainer = backends.trainer
            return logprobs(trainer.runtime.engine, trainer.model_id)
        finally:
            await backends.close()

    torch.testing.assert_close(asyncio.run(run()), saved, atol=1e-5, rtol=0)


def test_lora_path_is_checked_at_config_check(tiny_model_dir, tmp_path, engine):
    with pytest.raises(ConfigError, match=r"lora_configs\[0\].path: .* not a peft adapter"):
        load(tmp_path, tiny_model_dir, f"  lora_configs: [{{path: {tmp_path}}}]\n")
    trained_adapter(engine, "r8", LoraSpec(rank=8, alpha=32), tmp_path / "r8")
    with pytest.raises(ConfigError, match=r"lora_rank is 32 but the adapter at .* has r=8"):
        load(tmp_path, tiny_model_dir, f"  lora_configs: [{{path: {tmp_path / 'r8'}}}]\n")


# ---- lora_configs[*].exclude_modules -----------------------------------------------------------
@pytest.mark.parametrize(
    ("exclude", "excluded"),
    [
        ("[o_proj, lm_head]", ("o_proj", "lm_head")),  # a list: names or name suffixes
        (r"'.*layers\.1\.mlp\..*'", ("layers.1.mlp.",)),  # a string: a regex on the whole name
    ],
)
def test_excluded_modules_carry_no_lora_weights(tiny_model_dir, tmp_path, exclude, excluded):
    from trinity.launcher.backends import _lora_spec

    lora = f"  lora_configs:\n  - {{lora_rank: 4, exclude_modules: {exclude}}}\n"
    spec = _lora_spec(load(tmp_path, tiny_model_dir, lora))
    engine = Engine(str(tiny_model_dir), dtype=torch.float32)
    engine.create_model("m", spec)
    names = set(engine._models["m"].params)
    lora_modules = {n.rsplit(".lora_", 1)[0] for n in names}
    assert lora_modules and not any(part in m for m in lora_modules for part in excluded)
    everything = Engine(str(tiny_model_dir), dtype=torch.float32)
    everything.create_model("m", LoraSpec(rank=4))
    all_modules = {n.rsplit(".lora_", 1)[0] for n in everything._models["m"].params}
    assert {m for m in all_modules if any(part in m for part in excluded)} == (
        all_modules - lora_modules
    )
    # the exclusion survives a checkpoint round trip
    engine.save_state("m", str(tmp_path / "state"))
    engine.remove_model("m")
    engine.load_state("again", str(tmp_path / "state"))
    assert set(engine._models["again"].params) == names


# ---- rope_scaling / rope_theta -----------------------------------------------------------------
def test_rope_keys_change_the_loaded_model_s_positions(tiny_model_dir, tmp_path):
    from trinity.launcher.backends import _rope

    plain = Engine(str(tiny_model_dir), dtype=torch.float32)
    config = load(
        tmp_path,
        tiny_model_dir,
        "  rope_theta: 500.0\n  rope_scaling: {type: linear, factor: 2.0}\n",
    )
    roped = Engine(str(tiny_model_dir), dtype=torch.float32, rope=_rope(config))
    params = roped.base.config.rope_parameters
    assert (params["rope_type"], params["factor"], params["rope_theta"]) == ("linear", 2.0, 500.0)
    assert plain.base.config.rope_parameters["rope_theta"] == 10000.0
    inv_plain = plain.base.model.rotary_emb.inv_freq
    inv_roped = roped.base.model.rotary_emb.inv_freq
    expected = 1.0 / (500.0 ** (torch.arange(0, 16, 2).float() / 16)) / 2.0  # head dim 16
    torch.testing.assert_close(inv_roped, expected)
    assert not torch.allclose(inv_plain, inv_roped)
    for model_id, engine in (("p", plain), ("r", roped)):
        engine.create_model(model_id, LoraSpec(rank=2))
    assert not torch.allclose(logprobs(plain, "p"), logprobs(roped, "r"), atol=1e-4)
    # a published sampler and a full fine-tune load the same positions
    assert roped._load_causal_lm(torch.float32).config.rope_parameters == params


def test_rope_keys_and_lora_path_are_refused_on_tinker(tiny_model_dir, tmp_path):
    tinker = "  tinker: {enable: true}\n"
    with pytest.raises(ConfigError, match=r"^model.rope_theta: the Tinker backend"):
        load(tmp_path, tiny_model_dir, tinker + "  rope_theta: 500.0\n")
    with pytest.raises(ConfigError, match=r"^model.lora_configs\[0\].path: the Tinker backend"):
        load(tmp_path, tiny_model_dir, tinker + f"  lora_configs: [{{path: {tmp_path}}}]\n")


# ---- multimodal ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("explorer: {rollout_model: {enable_multimodal: true}}\n", "explorer.rollout_model"),
        ("", "buffer.explorer_input.taskset.format.image_key"),
    ],
)
def test_multimodal_keys_are_refused_in_one_line(tiny_model_dir, tmp_path, extra, key):
    text = config_text(tiny_model_dir, extra=extra)
    if not extra:
        text = text.replace(
            "'builtin:arithmetic'}", "'builtin:arithmetic', format: {image_key: img}}"
        )
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=rf"^{key}.*multimodal .* not supported") as error:
        load_config(tmp_path / "c.yaml")
    assert "\n" not in str(error.value)
