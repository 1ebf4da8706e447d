"""Engine training numerics on the tiny random Llama in fp32.

References are written here from the Tinker formulas (Tinker API docs, "Loss functions"): per-token terms,
then sums, on logprobs from a plain peft / transformers forward pass; gradients are compared
parameter by parameter. Tolerances: fp32 on CPU, chunked vs full-vocab log-softmax.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from tinker import types
from transformers import AutoModelForCausalLM

from tests.conftest import demo_tokenizer, tiny_llama
from trinity.engine import Engine, LoraSpec, attention, losses
from trinity.engine.optim import AdamW
from trinity.engine.packing import batch_inputs, micro_batches, prepare_example

LENGTHS = (9, 14, 5)
BIG_STEP = types.AdamParams(learning_rate=0.05)  # moves B away from 0 so the adapter matters


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(str(tiny_model_dir), dtype=torch.float32)


def engine_of(config, directory) -> Engine:
    """An engine on a random model of ``config`` (transformers' class for its model_type)."""
    tokenizer = demo_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Engine(str(directory), dtype=torch.float32)


@pytest.fixture(scope="module")
def sliding_engine(tmp_path_factory):
    """A 2-layer Mistral whose 8-token sliding window is shorter than the test prompts."""
    from transformers import MistralConfig

    tiny = tiny_llama(demo_tokenizer()).config.to_dict()
    config = MistralConfig(**{**tiny, "model_type": "mistral", "sliding_window": 8})
    return engine_of(config, tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="module")
def mixed_engine(tmp_path_factory):
    """A 2-layer Qwen2 whose second layer alone has an 8-token sliding window."""
    from transformers import Qwen2Config

    tiny = tiny_llama(demo_tokenizer()).config.to_dict()
    window = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
    config = Qwen2Config(**{**tiny, "model_type": "qwen2", **window})
    return engine_of(config, tmp_path_factory.mktemp("tiny-qwen2"))


def make_sequences(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 49152, (n + 1,), generator=g).tolist() for n in LENGTHS]


def ce_datums(sequences, weights=None) -> list[types.Datum]:
    datums = []
    for i, seq in enumerate(sequences):
        w = weights[i] if weights is not None else [1.0] * (len(seq) - 1)
        datums.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(seq[:-1]),
                loss_fn_inputs={"target_tokens": seq[1:], "weights": w},
            )
        )
    return datums


def rl_inputs(sequences, sampler_lp, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Advantages of both signs, sampler logprobs spread so ratios fall on both sides of clips."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for seq, lp in zip(sequences, sampler_lp, strict=True):
        n = len(seq) - 1
        out.append(
            {
                "target_tokens": torch.tensor(seq[1:]),
                "logprobs": lp + 0.4 * torch.randn(n, generator=g),
                "advantages": torch.randn(n, generator=g),
            }
        )
    return out


def rl_datums(sequences, inputs) -> list[types.Datum]:
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={k: v.tolist() for k, v in inp.items()},
        )
        for seq, inp in zip(sequences, inputs, strict=True)
    ]


def reference_loss(loss_fn: str, lp: torch.Tensor, inp: dict, config: dict) -> torch.Tensor:
    """Per-token Tinker loss terms, written out independently of trinity.engine.losses."""
    if loss_fn == "cross_entropy":
        return -(inp["weights"] * lp)
    q, adv = inp["logprobs"], inp["advantages"]
    ratio = torch.exp(lp - q)
    if loss_fn == "importance_sampling":
        return -(ratio * adv)
    if loss_fn == "ppo":
        lo, hi = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
        unclipped = ratio * adv
        clipped = torch.where(ratio < lo, lo, torch.where(ratio > hi, hi, ratio)) * adv
        return -torch.where(unclipped < clipped, unclipped, clipped)
    if loss_fn == "cispo":
        lo, hi = config.get("clip_low_threshold", 0.0), config.get("clip_high_threshold", 4.0)
        weight = torch.where(ratio < lo, lo, torch.where(ratio > hi, hi, ratio)).detach()
        return -(weight * lp * adv)
    if loss_fn == "dro":
        return -(lp * adv - 0.5 * config["beta"] * (lp - q) ** 2)
    if loss_fn == "gspo":  # one datum: sequence ratio over the mask, token-level gradient
        lo = config.get("clip_low_threshold", 1 - 3e-4)
        hi = config.get("clip_high_threshold", 1 + 4e-4)
        mask = inp.get("sequence_ratio_mask", (adv != 0).float())
        seq_ratio = torch.exp(((lp.detach() - q) * mask).sum() / mask.sum())
        ratio = seq_ratio * torch.exp(lp - lp.detach())
        clipped = torch.where(ratio < lo, lo, torch.where(ratio > hi, hi, ratio))
        return -torch.minimum(ratio * adv, clipped * adv)
    if loss_fn == "stable_reinforce":
        lo, hi = config.get("clip_low_threshold", 0.5), config.get("clip_high_threshold", 2.0)
        r = ratio.detach()
        weight = torch.where((r < lo) | (r > hi), 0.0, r)
        return -(weight * lp * adv)
    raise AssertionError(loss_fn)


def engine_params(engine: Engine, model_id: str) -> dict[str, torch.nn.Parameter]:
    return engine._models[model_id].params


def reference_lora(engine: Engine, model_id: str, tiny_model_dir, tmp_path) -> PeftModel:
    """An independent peft model with the engine adapter's current weights (via export_peft)."""
    engine.export_peft(model_id, str(tmp_path / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"), is_trainable=True)
    return model.eval()


def reference_logprobs(model, seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    logits_TV = model(input_ids=torch.tensor([seq[:-1]])).logits[0].float()
    logprobs_TV = logits_TV.log_softmax(-1)
    lp = logprobs_TV.gather(1, torch.tensor(seq[1:])[:, None]).squeeze(1)
    entropy = -(logprobs_TV.exp() * logprobs_TV).sum(-1)
    return lp, entropy


def assert_grads_close(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """fp32 noise (sums in another order; about 1e-5, as a float64 reference shows) scales
    with the largest entry."""
    atol = 2e-5 * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def lora_grads(model: PeftModel) -> dict[str, torch.Tensor]:
    """peft parameter names -> engine checkpoint names (``MODULE.lora_A.weight``)."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name and p.grad is not None:
            key = name.removeprefix("base_model.model.").replace(".default.", ".")
            out[key] = p.grad
    return out


def trained_lora(engine: Engine, model_id: str, spec: LoraSpec | None = None) -> None:
    engine.create_model(model_id, spec or LoraSpec(rank=4, seed=0))
    engine.forward_backward(model_id, ce_datums(make_sequences(7)), "cross_entropy")
    engine.optim_step(model_id, BIG_STEP)


@pytest.fixture(scope="module")
def parity(engine, tiny_model_dir, tmp_path_factory):
    """A trained LoRA (all targets, incl. the tied unembedding) and its peft twin."""
    trained_lora(engine, "parity")
    reference = reference_lora(engine, "parity", tiny_model_dir, tmp_path_factory.mktemp("ref"))
    yield reference
    engine.remove_model("parity")


def test_logprobs_and_entropy_match_plain_forward(engine, parity):
    sequences = make_sequences()
    out = engine.forward_backward(
        "parity", ce_datums(sequences), "cross_entropy", forward_only=True, return_entropy=True
    )
    with torch.no_grad():
        for seq, got in zip(sequences, out.loss_fn_outputs, strict=True):
            lp, entropy = reference_logprobs(parity, seq)
            torch.testing.assert_close(got["logprobs"].to_torch(), lp, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["entropy"].to_torch(), entropy, atol=1e-4, rtol=1e-5)


CASES = [
    ("cross_entropy", None),
    ("importance_sampling", None),
    ("ppo", None),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}),
    ("cispo", None),
    ("cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("dro", {"beta": 0.05}),
    ("dro", {"beta": 0.7}),
    ("gspo", None),
    ("gspo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.3}),
    ("gspo:mask", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.3}),
    ("stable_reinforce", None),
    ("stable_reinforce", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.5}),
]


@pytest.mark.parametrize(("loss_fn", "config"), CASES)
def test_loss_and_gradients_match_reference(engine, parity, loss_fn, config):
    loss_fn, _, variant = loss_fn.partition(":")
    sequences = make_sequences()
    with torch.no_grad():
        sampler_lp = [reference_logprobs(parity, seq)[0] for seq in sequences]
    if loss_fn == "cross_entropy":
        g = torch.Generator().manual_seed(3)
        inputs = [
            {"target_tokens": torch.tensor(s[1:]), "weights": torch.rand(len(s) - 1, generator=g)}
            for s in sequences
        ]
    else:
        inputs = rl_inputs(sequences, sampler_lp)
    if variant == "mask":  # an explicit GSPO mask: the ratio over the second half only
        for inp in inputs:
            n = len(inp["advantages"])
            inp["sequence_ratio_mask"] = (torch.arange(n) >= n // 2).float()
    got = engine_params(engine, "parity")
    for p in got.values():
        p.grad = None
    out = engine.forward_backward("parity", rl_datums(sequences, inputs), loss_fn, config)

    parity.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for seq, inp in zip(sequences, inputs, strict=True):
        lp, _ = reference_logprobs(parity, seq)
        total = total + reference_loss(loss_fn, lp, inp, config or {}).sum()
    total.backward()
    assert out.metrics["loss:sum"] == pytest.approx(total.item(), rel=1e-5, abs=1e-4)
    expected = lora_grads(parity)
    assert set(expected) == set(got)
    for name, grad in expected.items():
        assert_grads_close(got[name].grad, grad, name)


def test_clipping_is_exercised():
    """The parity cases above only mean something if ratios fall outside the clip range."""
    lp = torch.zeros(2000)
    inputs = rl_inputs([[0] * 2001], [lp])[0]
    ratio = torch.exp(lp - inputs["logprobs"])
    assert (ratio < 0.8).any() and (ratio > 1.2).any()


def test_per_token_clip_thresholds_from_datum(engine):
    engine.create_model("thresholds", LoraSpec(rank=4, seed=0))
    sequences = make_sequences()
    lp = [
        o["logprobs"].to_torch()
        for o in engine.forward_backward(
            "thresholds", ce_datums(sequences), "cross_entropy", forward_only=True
        ).loss_fn_outputs
    ]
    inputs = rl_inputs(sequences, lp)
    config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    by_config = engine.forward_backward(
        "thresholds", rl_datums(sequences, inputs), "ppo", config, forward_only=True
    ).metrics["loss:sum"]
    for inp in inputs:
        n = len(inp["advantages"])
        inp["clip_low_threshold"] = torch.full((n,), 0.9)
        inp["clip_high_threshold"] = torch.full((n,), 1.1)
    by_datum = engine.forward_backward(
        "thresholds", rl_datums(sequences, inputs), "ppo", forward_only=True
    ).metrics["loss:sum"]
    assert by_datum == pytest.approx(by_config, rel=1e-6)
    for inp in inputs[1:]:  # mixed: datums without thresholds fall back to the config
        del inp["clip_low_threshold"], inp["clip_high_threshold"]
    mixed = engine.forward_backward(
        "thresholds", rl_datums(sequences, inputs), "ppo", config, forward_only=True
    ).metrics["loss:sum"]
    assert mixed == pytest.approx(by_config, rel=1e-6)
    engine.remove_model("thresholds")


def test_full_finetune_gradients_match_reference(engine, tiny_model_dir):
    engine.create_model("full-parity", None)
    sequences = make_sequences()
    g = torch.Generator().manual_seed(5)
    weights = [torch.rand(len(s) - 1, generator=g).tolist() for s in sequences]
    out = engine.forward_backward("full-parity", ce_datums(sequences, weights), "cross_entropy")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    total = sum(
        -(torch.tensor(w) * reference_logprobs(reference, s)[0]).sum()
        for s, w in zip(sequences, weights, strict=True)
    )
    total.backward()
    assert out.metrics["loss:sum"] == pytest.approx(total.item(), rel=1e-5)
    got = engine_params(engine, "full-parity")
    expected = {n: p.grad for n, p in reference.named_parameters()}
    assert set(got) == set(expected)  # the tied embedding appears once
    for name, grad in expected.items():
        assert_grads_close(got[name].grad, grad, name)
    engine.remove_model("full-parity")


def test_grad_accumulation_over_calls_and_micro_batches(engine):
    sequences = make_sequences()
    datums = ce_datums(sequences)
    engine.create_model("once", LoraSpec(rank=4, seed=1))
    engine.create_model("split", LoraSpec(rank=4, seed=1))
    once = engine.forward_backward("once", datums, "cross_entropy").metrics["loss:sum"]
    first = engine.forward_backward("split", datums[:1], "cross_entropy").metrics["loss:sum"]
    saved = engine.micro_batch_tokens
    engine.micro_batch_tokens = 10  # the remaining two datums go through separate passes
    try:
        rest = engine.forward_backward("split", datums[1:], "cross_entropy").metrics["loss:sum"]
    finally:
        engine.micro_batch_tokens = saved
    assert first + rest == pytest.approx(once, rel=1e-5)
    for name, p in engine_params(engine, "once").items():
        assert_grads_close(engine_params(engine, "split")[name].grad, p.grad, name)
    a = engine.optim_step("once", BIG_STEP)
    b = engine.optim_step("split", BIG_STEP)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for name, p in engine_params(engine, "once").items():
        assert p.grad is None
        torch.testing.assert_close(engine_params(engine, "split")[name], p, atol=1e-6, rtol=1e-5)
    engine.remove_model("once")
    engine.remove_model("split")


@pytest.mark.parametrize("loss_fn", sorted(losses.LOSSES))
def test_inert_datums_are_the_ones_whose_loss_has_no_gradient(loss_fn):
    """``losses.inert`` says a datum has no gradient only where autograd finds none: zero
    advantages (zero weights and entropy weights for cross-entropy), except DRO,
    whose penalty keeps one; one nonzero gate value makes it live."""
    g = torch.Generator().manual_seed(0)
    n = 7
    loss = losses.get_loss(loss_fn)
    config = losses.resolve_config(loss_fn, {"beta": 0.1} if loss_fn == "dro" else None)
    base = {
        "target_tokens": list(range(1, n + 1)),
        "logprobs": (-2 + 0.3 * torch.randn(n, generator=g)).tolist(),
        "advantages": [0.0] * n,
        "weights": [0.0] * n,
    }

    def inert_and_gradient(inputs: dict) -> tuple[bool, bool]:
        kept = {
            k: types.TensorData.from_torch(torch.tensor(v))
            for k, v in inputs.items()
            if k in loss.inputs or k in loss.input_defaults
        }
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(list(range(n))), loss_fn_inputs=kept
        )
        example = prepare_example(0, datum, loss, 49152, 1024)
        # near the sampler's logprobs, so no ratio is clipped (GSPO's band is 1e-4 wide)
        lp = (torch.tensor(base["logprobs"]) + 1e-5 * torch.randn(n, generator=g)).requires_grad_()
        terms = losses.token_losses(loss_fn, lp, batch_inputs([example], config), config)
        (grad,) = torch.autograd.grad(terms.sum(), lp)
        return losses.inert(loss, example.inputs), bool(grad.any())

    assert inert_and_gradient(base) == (loss_fn != "dro", loss_fn == "dro")
    gate = "weights" if loss_fn == "cross_entropy" else "advantages"
    assert inert_and_gradient(base | {gate: [0.0] * (n - 1) + [0.5]}) == (False, True)
    if loss_fn == "cross_entropy":  # its entropy term enters through the pass, not ``lp``
        entropy = base | {losses.ENTROPY_WEIGHTS: [0.0, 0.2] + [0.0] * (n - 2)}
        assert inert_and_gradient(entropy)[0] is False


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_datums_without_gradient_stay_out_of_the_backward_exactly(engine, monkeypatch, lora):
    """A datum whose advantages are all 0 (a GRPO group of equal rewards) has no gradient: it
    runs forward only, so the backward covers the other datums' tokens alone, and with none
    left no backward runs and every parameter gets an exact zero gradient. Against the full
    backward over every datum: the same gradients and logprobs (fp32, another packing), and
    the optimizer's step after an all-zero pass (momentum from a step before) bit-identical."""
    from trinity.engine import engine as engine_module
    from trinity.engine import fused_layers

    sequences = make_sequences()
    lp = [torch.full((len(s) - 1,), -3.0) for s in sequences]
    zero = rl_inputs(sequences, lp)
    for inputs in zero:
        inputs["advantages"] = torch.zeros_like(inputs["advantages"])
    one = [dict(inputs) for inputs in zero]
    one[1]["advantages"] = torch.zeros_like(one[1]["advantages"]).index_fill_(
        0, torch.tensor([2]), 0.7
    )
    rows = []  # the rows of each norm's backward: the tokens the backward covers
    real = fused_layers.RmsNorm.backward
    monkeypatch.setattr(
        fused_layers.RmsNorm, "backward", lambda ctx, dy: rows.append(len(dy)) or real(ctx, dy)
    )

    def full_backward() -> None:  # every datum through the backward, as before
        monkeypatch.setattr(losses, "inert", lambda loss, inputs: False)
        monkeypatch.setattr(engine_module, "_backward", lambda loss, _: loss.backward() or True)

    def run(inputs, full: bool):
        """(logprobs, grads) of a pass over ``inputs`` after a cross-entropy step, the norms'
        backward rows, and the weights after the optimizer's step that follows the pass."""
        engine.create_model("m", LoraSpec(rank=4, seed=3) if lora else None)
        engine.forward_backward("m", ce_datums(sequences), "cross_entropy")
        engine.optim_step("m", BIG_STEP)  # momentum, so a zero-gradient step still moves
        if full:
            full_backward()
        rows.clear()
        out = engine.forward_backward("m", rl_datums(sequences, inputs), "ppo")
        monkeypatch.undo()
        monkeypatch.setattr(
            fused_layers.RmsNorm, "backward", lambda ctx, dy: rows.append(len(dy)) or real(ctx, dy)
        )
        covered = list(rows)
        params = engine_params(engine, "m")
        grads = {name: p.grad.clone() for name, p in params.items()}
        engine.optim_step("m", BIG_STEP)
        weights = {name: p.detach().clone() for name, p in params.items()}
        engine.remove_model("m")
        logprobs = [torch.tensor(o["logprobs"].data) for o in out.loss_fn_outputs]
        return logprobs, grads, covered, weights

    _, grads, covered, weights = run(zero, full=False)
    assert covered == []  # no backward at all
    assert all(not g.any() for g in grads.values())
    _, ref_grads, ref_covered, ref_weights = run(zero, full=True)
    assert ref_covered and all(not g.any() for g in ref_grads.values())
    for name, w in weights.items():
        assert torch.equal(w, ref_weights[name]), name

    logprobs, grads, covered, _ = run(one, full=False)
    assert covered and max(covered) == LENGTHS[1]  # the one datum with gradient
    ref_logprobs, ref_grads, ref_covered, _ = run(one, full=True)
    assert max(ref_covered) > LENGTHS[1]
    assert any(g.any() for g in grads.values())
    for name, g in grads.items():
        assert_grads_close(g, ref_grads[name], name)
    for got, want in zip(logprobs, ref_logprobs, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_packed_passes_serve_models_whose_layers_attend_alike():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from trinity.engine.forward import packed_attention

    assert packed_attention(LlamaConfig()) == (True, None)
    assert packed_attention(MistralConfig(sliding_window=8)) == (True, 8)
    assert packed_attention(Qwen2Config(sliding_window=8)) == (True, None)  # window off
    sliding = {"use_sliding_window": True, "sliding_window": 8, "num_hidden_layers": 2}
    assert packed_attention(Qwen2Config(**sliding, max_window_layers=0)) == (True, 8)
    assert packed_attention(Qwen2Config(**sliding, max_window_layers=1)) == (False, None)


@pytest.mark.parametrize("model", ["engine", "sliding_engine", "mixed_engine"])
def test_shared_prefix_runs_once_and_matches_separate_passes(model, request, monkeypatch):
    """GRPO-shaped datums (prompts with several responses each) share each prompt's forward pass,
    two prompts of different lengths packed in one pass; loss, per-datum logprobs and entropy,
    and gradients equal running every datum on its own. Also through a sliding window shorter
    than the prompts (the packed pass's mask applies it by position), and on a model whose
    layers attend differently (no sharing: every datum runs as a row of its own). The packed
    pass's per-block key columns are computed once, not per layer."""
    engine = request.getfixturevalue(model)
    g = torch.Generator().manual_seed(3)
    sequences = []
    for prompt_length, responses in ((24, (6, 9, 3)), (19, (4, 7))):
        prompt = torch.randint(0, 49152, (prompt_length,), generator=g).tolist()
        sequences += [
            prompt + torch.randint(0, 49152, (n,), generator=g).tolist() for n in responses
        ]
    sequences.append(torch.randint(0, 49152, (15,), generator=g).tolist())  # unrelated
    inputs = rl_inputs(sequences, [torch.full((len(s) - 1,), -9.0) for s in sequences])
    inputs[1]["target_tokens"][5] = 7  # a target that differs inside the shared prefix
    datums = rl_datums(sequences, inputs)
    engine.create_model("shared", LoraSpec(rank=4, seed=2))
    engine.create_model("separate", LoraSpec(rank=4, seed=2))
    for model_id in ("shared", "separate"):  # move B off zero so every LoRA factor has gradients
        engine.forward_backward(model_id, ce_datums(make_sequences(4)), "cross_entropy")
        engine.optim_step(model_id, BIG_STEP)
    examples = [
        prepare_example(
            i,
            d,
            losses.get_loss("ppo"),
            vocab_size=engine.vocab_size,
            max_context_length=engine.max_context_length,
        )
        for i, d in enumerate(datums)
    ]
    passes = [
        sorted(prefix for prefix, _ in clusters)
        for clusters in micro_batches(examples, engine.micro_batch_tokens, engine._share_prefixes)
    ]
    assert passes == ([[19, 24], [0]] if model != "mixed_engine" else [[0]])
    computed = []
    block_columns = attention.block_columns
    monkeypatch.setattr(
        attention, "block_columns", lambda m: computed.append(1) or block_columns(m)
    )
    shared = engine.forward_backward("shared", datums, "ppo", return_entropy=True)
    # once per pass with a boolean mask: the packed one, and the unshared row's where the model
    # has sliding windows (transformers masks it then)
    assert len(computed) == {"engine": 1, "sliding_engine": 2, "mixed_engine": 1}[model]
    separate = [
        engine.forward_backward("separate", [d], "ppo", return_entropy=True) for d in datums
    ]
    assert shared.metrics["loss:sum"] == pytest.approx(
        sum(o.metrics["loss:sum"] for o in separate), rel=1e-5
    )
    for got, alone in zip(shared.loss_fn_outputs, separate, strict=True):
        for key in ("logprobs", "entropy"):
            torch.testing.assert_close(
                got[key].to_torch(), alone.loss_fn_outputs[0][key].to_torch(), atol=1e-5, rtol=0
            )
    for name, p in engine_params(engine, "shared").items():
        assert_grads_close(p.grad, engine_params(engine, "separate")[name].grad, name)
    engine.remove_model("shared")
    engine.remove_model("separate")


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_adamw_matches_torch(clip):
    torch.manual_seed(0)
    ours = {"a": torch.nn.Parameter(torch.randn(5, 3)), "b": torch.nn.Parameter(torch.randn(7))}
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours.values()]
    optimizer = AdamW(ours)
    schedule = [
        types.AdamParams(
            learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=wd, grad_clip_norm=clip
        )
        for lr, wd in ((1e-2, 0.0), (5e-3, 0.1), (2e-2, 0.01), (1e-3, 0.0))
    ]
    reference = torch.optim.AdamW(theirs, lr=1.0)
    for hp in schedule:
        grads = [torch.randn_like(p) for p in theirs]
        for p, q, grad in zip(ours.values(), theirs, grads, strict=True):
            p.grad, q.grad = grad.clone(), grad.clone()
        norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
        if clip:
            torch.nn.utils.clip_grad_norm_(theirs, clip)
        for group in reference.param_groups:
            group.update(
                lr=hp.learning_rate,
                betas=(hp.beta1, hp.beta2),
                eps=hp.eps,
                weight_decay=hp.weight_decay,
            )
        reference.step()
        assert optimizer.step(hp)["grad_norm"] == pytest.approx(norm, rel=1e-6)
        for p, q in zip(ours.values(), theirs, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-7, rtol=1e-6)
            assert p.grad is None


def test_cross_entropy_steps_reduce_loss(engine):
    engine.create_model("learn", LoraSpec(rank=8, seed=0))
    datums = ce_datums(make_sequences(11)[:1])
    losses = []
    for _ in range(6):
        losses.append(engine.forward_backward("learn", datums, "cross_entropy").metrics["loss:sum"])
        engine.optim_step("learn", types.AdamParams(learning_rate=1e-2))
    assert losses[-1] < 0.7 * losses[0]
    assert engine.model_info("learn")["step"] == 6
    engine.remove_model("learn")


def test_bad_arguments_raise_value_error(engine):
    engine.create_model("errors", LoraSpec(rank=2))
    datums = ce_datums(make_sequences()[:1])
    with pytest.raises(ValueError, match="unknown model_id 'nope'"):
        engine.forward_backward("nope", datums, "cross_entropy")
    with pytest.raises(ValueError, match="unknown model_id"):
        engine.optim_step("nope", types.AdamParams())
    with pytest.raises(ValueError, match="unknown loss_fn 'mse'"):
        engine.forward_backward("errors", datums, "mse")
    with pytest.raises(ValueError, match="lacks \\['logprobs', 'advantages'\\]"):
        engine.forward_backward("errors", datums, "ppo")
    with pytest.raises(ValueError, match="unknown loss_fn_config keys"):
        engine.forward_backward("errors", datums, "cross_entropy", {"clip_low_threshold": 0.5})
    with pytest.raises(ValueError, match="needs loss_fn_config\\['beta'\\]"):
        engine.forward_backward(
            "errors",
            rl_datums(
                make_sequences()[:1], rl_inputs(make_sequences()[:1], [torch.zeros(LENGTHS[0])])
            ),
            "dro",
        )
    bad = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [1, 2], "weights": [1.0, 1.0]},
    )
    with pytest.raises(ValueError, match="expected \\(3,\\)"):
        engine.forward_backward("errors", [bad], "cross_entropy")
    with pytest.raises(ValueError, match="already exists"):
        engine.create_model("errors", None)
    engine.remove_model("errors")
    with pytest.raises(ValueError, match="unknown model_id"):
        engine.remove_model("errors")


def test_empty_datum_gives_empty_logprobs(engine):
    engine.create_model("empty", LoraSpec(rank=2))
    empty = types.Datum(
        model_input=types.ModelInput.from_ints([]),
        loss_fn_inputs={"target_tokens": [], "weights": []},
    )
    out = engine.forward_backward("empty", [empty], "cross_entropy")
    assert out.metrics["loss:sum"] == 0.0 and out.loss_fn_outputs[0]["logprobs"].shape == [0]
    both = engine.forward_backward(
        "empty", [empty, *ce_datums(make_sequences()[:1])], "cross_entropy"
    )
    assert [o["logprobs"].shape for o in both.loss_fn_outputs] == [[0], [LENGTHS[0]]]
    engine.remove_model("empty")


def test_a_non_finite_step_is_refused_and_changes_nothing(engine):
    """Advantages near float32's max overflow the loss and its gradients: the step is refused,
    weights and Adam moments stay bit-identical, and the next finite step runs normally."""
    from trinity.engine.optim import NonFiniteStepError

    engine.create_model("nonfinite", LoraSpec(rank=4, seed=0))
    try:
        sequences = make_sequences(3)
        engine.forward_backward("nonfinite", ce_datums(sequences), "cross_entropy")
        engine.optim_step("nonfinite", BIG_STEP)  # Adam moments exist from here on
        before = {k: p.detach().clone() for k, p in engine_params(engine, "nonfinite").items()}
        optimizer = engine._models["nonfinite"].optimizer
        moments = {k: v.clone() for k, v in optimizer.state_tensors().items()}
        huge = [[3e38] * (len(s) - 1) for s in sequences]
        out = engine.forward_backward("nonfinite", ce_datums(sequences, huge), "cross_entropy")
        assert not torch.isfinite(torch.tensor(out.metrics["loss:sum"]))
        with pytest.raises(NonFiniteStepError, match="gradients are not finite"):
            engine.optim_step("nonfinite", BIG_STEP)
        for k, p in engine_params(engine, "nonfinite").items():
            assert torch.equal(p.detach(), before[k]), k
            assert p.grad is None, k  # discarded, so they do not poison the next step
        for k, v in optimizer.state_tensors().items():
            assert torch.equal(v, moments[k]), k
        engine.forward_backward("nonfinite", ce_datums(sequences), "cross_entropy")
        metrics = engine.optim_step("nonfinite", BIG_STEP)
        assert torch.isfinite(torch.tensor(metrics["grad_norm"]))
        assert all(torch.isfinite(p).all() for p in engine_params(engine, "nonfinite").values())
    finally:
        engine.remove_model("nonfinite")


def test_optim_step_bumps_the_version_counters():
    """The fused AdamW kernel writes the weights in place without bumping their version
    counters; ``AdamW.step`` bumps them, so fast_decode.build's cached decode layout (keyed on
    data_ptr and version) is rebuilt after a step instead of sampling stale adapter weights."""
    stepped, untouched = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    optimizer = AdamW({"stepped": stepped, "untouched": untouched})
    stepped.grad = torch.ones(4)
    before = stepped.detach().clone()
    versions = stepped._version, untouched._version
    optimizer.step(types.AdamParams(learning_rate=0.1))
    assert not torch.equal(stepped.detach(), before)
    assert stepped._version > versions[0] and untouched._version == versions[1]
